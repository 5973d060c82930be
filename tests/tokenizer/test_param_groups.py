"""Weight-decay decisions for tokenizer parameters (unimm.tokenizer.param_groups) and the trainer's use of them."""

from __future__ import annotations

import pytest

from unimm.tokenizer import build_tokenizer
from unimm.tokenizer.param_groups import is_position_table, no_weight_decay_names, split_weight_decay
from unimm.train.tokenizer.args import TokenizerTrainingArguments
from unimm.train.tokenizer.build import trainable_groups


def test_position_table_names():
    assert is_position_table("decoder.position_embedding")
    assert is_position_table("encoder.embeddings.position_embedding.weight")
    assert is_position_table("encoder.embeddings.position_embeddings")
    assert not is_position_table("decoder.blocks.0.qkv.weight")
    assert not is_position_table("encoder.embeddings.patch_embedding.weight")


@pytest.mark.parametrize("encoder_type", ["siglip", "dinov2"])
def test_simvq_projection_and_position_tables_get_no_decay(encoder_type):
    model = build_tokenizer("vqrae-tiny", encoder_type=encoder_type)
    names = no_weight_decay_names(model)
    params = dict(model.named_parameters())
    assert {"quantizer.codebook_proj.weight", "quantizer.codebook_proj.bias", "decoder.position_embedding"} <= names
    encoder_positions = [n for n in params if n.startswith("encoder.") and "position_embedding" in n]
    assert encoder_positions and set(encoder_positions) <= names
    # Ordinary matrices are decayed; every vector is not.
    for name in ("proj_in.weight", "decoder.input_proj.weight", "decoder.head.weight", "decoder.blocks.0.qkv.weight"):
        assert name not in names
    assert all(name in names for name, p in params.items() if p.ndim < 2)

    decay, no_decay = split_weight_decay(model, params.values())
    assert len(decay) + len(no_decay) == len(params)
    assert id(params["quantizer.codebook_proj.weight"]) in {id(p) for p in no_decay}
    assert id(params["decoder.head.weight"]) in {id(p) for p in decay}


def test_dualtoken_position_tables_get_no_decay():
    model = build_tokenizer("dualtoken-tiny")
    names = no_weight_decay_names(model)
    assert "decoder.position_embedding" in names
    assert "pixel_proj_in.weight" not in names and "semantic_proj_out.weight" not in names


def test_tokenizer_trainer_groups_follow_the_decision():
    model = build_tokenizer("vqrae-tiny")
    model.set_stage(2)  # encoder trainable: its position table reaches the optimizer too
    groups = {group["name"]: group for group in trainable_groups(model, TokenizerTrainingArguments())}
    params = dict(model.named_parameters())
    no_decay_ids = {id(p) for name in ("encoder/no_decay", "other/no_decay") for p in groups[name]["params"]}
    decay_ids = {id(p) for name in ("encoder/decay", "other/decay") for p in groups[name]["params"]}
    for name in ("quantizer.codebook_proj.weight", "decoder.position_embedding"):
        assert id(params[name]) in no_decay_ids, name
    encoder_position = next(n for n in params if n.startswith("encoder.") and is_position_table(n))
    assert id(params[encoder_position]) in no_decay_ids
    assert id(params["decoder.head.weight"]) in decay_ids
    assert all(group["weight_decay"] == 0.0 for name, group in groups.items() if name.endswith("/no_decay"))


def test_weight_decay_help_names_every_exemption():
    """The trainer's --help says what gets no decay: vectors, SimVQ's W and the positional tables."""
    import dataclasses

    help_text = next(f for f in dataclasses.fields(TokenizerTrainingArguments) if f.name == "weight_decay").metadata
    assert "matrices only" not in help_text["help"]
    assert all(word in help_text["help"] for word in ("SimVQ", "W", "positional tables", "vectors"))
