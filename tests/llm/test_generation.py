"""Text-to-image and image-to-text generation: cache parity, guidance, valid codes, a learned toy mapping."""

from __future__ import annotations

import pytest
import torch

from tests.llm.conftest import DUAL_SPEC, VQRAE_SPEC, image_batch, make_unimm
from unimm.llm import UniMMForCausalLM
from unimm.llm.embedding import SinCosImagePositionEmbedding, image_position_index, sincos_2d_table
from unimm.llm.generation import filter_logits, generate_images, generate_text, guide

PROMPTS = ["a red circle", "a blue square at the top right", "a green triangle"]


@pytest.mark.parametrize("spec, flat", [(DUAL_SPEC, False), (VQRAE_SPEC, True)], ids=["dual", "flat"])
def test_kv_cache_matches_recompute_and_codes_are_valid(tiny_qwen2_path, spec, flat):
    model, tokenizer, _ = make_unimm(tiny_qwen2_path, spec, flat_codes=flat)
    kwargs = dict(num_positions=6, cfg_scale=2.5, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    cached = generate_images(model, tokenizer, PROMPTS, **kwargs)
    recomputed = generate_images(model, tokenizer, PROMPTS, use_cache=False, **kwargs)
    assert list(cached) == list(spec)
    for name, (num_codes, depth) in spec.items():
        assert cached[name].shape == (len(PROMPTS), 6, depth) and cached[name].dtype == torch.long
        assert torch.equal(cached[name], recomputed[name])
        assert int(cached[name].min()) >= 0 and int(cached[name].max()) < num_codes
    again = generate_images(model, tokenizer, PROMPTS, **kwargs)
    assert all(torch.equal(again[n], cached[n]) for n in spec)  # deterministic for a seed
    other = generate_images(model, tokenizer, PROMPTS, **{**kwargs, "seed": 4})
    assert not all(torch.equal(other[n], cached[n]) for n in spec)
    batched = generate_images(model, tokenizer, PROMPTS, batch_size=1, **{**kwargs, "temperature": 0.0})
    greedy = generate_images(model, tokenizer, PROMPTS, **{**kwargs, "temperature": 0.0})
    assert all(torch.equal(batched[n], greedy[n]) for n in spec)


def test_cfg_scale_one_equals_conditional_only(tiny_llama_path):
    model, tokenizer, _ = make_unimm(tiny_llama_path, DUAL_SPEC)
    guided = generate_images(model, tokenizer, PROMPTS, num_positions=5, cfg_scale=1.0, seed=7)
    conditional = generate_images(model, tokenizer, PROMPTS, num_positions=5, cfg_scale=None, seed=7)
    strong = generate_images(model, tokenizer, PROMPTS, num_positions=5, cfg_scale=8.0, seed=7)
    assert all(torch.equal(guided[n], conditional[n]) for n in DUAL_SPEC)
    assert not all(torch.equal(strong[n], conditional[n]) for n in DUAL_SPEC)


def test_negative_prompts_replace_the_unconditional_branch(tiny_llama_path):
    model, tokenizer, _ = make_unimm(tiny_llama_path, DUAL_SPEC)
    kwargs = dict(num_positions=5, cfg_scale=8.0, seed=7)
    conditional = generate_images(model, tokenizer, PROMPTS, num_positions=5, cfg_scale=None, seed=7)
    unconditional = generate_images(model, tokenizer, PROMPTS, **kwargs)
    default = generate_images(model, tokenizer, PROMPTS, negative_prompts=[None] * len(PROMPTS), **kwargs)
    assert all(torch.equal(default[n], unconditional[n]) for n in DUAL_SPEC)
    # The prompt as its own negative: s * (c - c) vanishes, so scale 8 draws what no guidance draws.
    itself = generate_images(model, tokenizer, PROMPTS, negative_prompts=list(PROMPTS), **kwargs)
    assert all(torch.equal(itself[n], conditional[n]) for n in DUAL_SPEC)
    other = generate_images(model, tokenizer, PROMPTS, negative_prompts=["a blue square"] * len(PROMPTS), **kwargs)
    assert not all(torch.equal(other[n], unconditional[n]) for n in DUAL_SPEC)
    with pytest.raises(ValueError, match="set cfg_scale"):
        generate_images(model, tokenizer, PROMPTS, num_positions=5, cfg_scale=None, negative_prompts=list(PROMPTS))
    with pytest.raises(ValueError, match="1 negative_prompts for 3 prompts"):
        generate_images(model, tokenizer, PROMPTS, negative_prompts=["x"], **kwargs)


def test_guidance_and_filtering_arithmetic():
    cond, uncond = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(guide(torch.cat([cond, uncond]), 1.0), cond)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # p(top)=0.64 < 0.7, so the second token is kept


def test_toy_mapping_is_learned_and_reproduced_greedily(tiny_qwen2_path):
    """Train on prompt word -> fixed code pattern; greedy guided generation must reproduce each pattern."""
    spec = {"pixel": (16, 2), "semantic": (8, 1)}
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, spec, seed=0)
    prompts = ["red", "green", "blue", "yellow"]
    num_positions = 6
    batch = image_batch(tokenizer, layout, spec, prompts, num_positions, seed=11)
    # one unconditional row (prompt dropout) so guidance has a trained unconditional branch
    uncond = image_batch(tokenizer, layout, spec, [None], num_positions, seed=12)
    patterns = {name: torch.stack([c[i][c[i][..., 0] >= 0] for i in range(len(prompts))])
                for name, c in batch["visual_codes"].items()}  # [4, N, D]
    pad = batch["input_ids"].shape[1] - uncond["input_ids"].shape[1]
    padded = {k: torch.nn.functional.pad(v, (0, pad), value=-100 if k == "labels" else 0)
              for k, v in uncond.items() if k != "visual_codes"}
    padded["visual_codes"] = {k: torch.nn.functional.pad(v, (0, 0, 0, pad), value=-1)
                              for k, v in uncond["visual_codes"].items()}
    train = {k: torch.cat([batch[k], padded[k]]) for k in ("input_ids", "attention_mask", "labels")}
    train["visual_codes"] = {k: torch.cat([batch["visual_codes"][k], padded["visual_codes"][k]]) for k in spec}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(100):
        loss = model(**train).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    codes = generate_images(model, tokenizer, prompts, num_positions=num_positions, cfg_scale=2.0, temperature=0.0)
    for name in spec:
        assert torch.equal(codes[name], patterns[name]), name


def test_generate_text_through_hf_generate(tiny_qwen2_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle"], 3)
    length = int(batch["attention_mask"].sum())
    input_ids = batch["input_ids"][:, :length]
    codes = {k: v[:, :length] for k, v in batch["visual_codes"].items()}
    answer = generate_text(model, tokenizer, input_ids, visual_codes=codes, max_new_tokens=4)
    # the first greedy token equals the argmax of a plain forward pass over the same inputs
    with torch.no_grad():
        logits = model(input_ids=input_ids, visual_codes=codes).logits[0, -1]
    first = tokenizer.decode([int(logits.argmax())], skip_special_tokens=True)
    assert isinstance(answer, list) and len(answer) == 1 and answer[0].startswith(first)


def test_image_position_index_restarts_at_every_image_run():
    is_image = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert image_position_index(is_image).tolist() == [[0, 0, 1, 2, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0, 1]]


def _position_parameter(model) -> torch.Tensor:
    """The trained tensor of the model's image position embedding (the table, or the sin-cos gain)."""
    table = model.image_position_embedding
    return table.gain if isinstance(table, SinCosImagePositionEmbedding) else table.weight


@pytest.mark.parametrize("kind, positions", [("learned", 5), ("sincos_2d", 9)])
@pytest.mark.parametrize("spec, flat", [(DUAL_SPEC, False), (VQRAE_SPEC, True)], ids=["dual", "flat"])
def test_image_position_embedding_is_the_same_in_training_and_generation(tiny_qwen2_path, tmp_path, spec, flat,
                                                                         kind, positions):
    """Greedy codes from generate_images must be the argmax of the teacher-forced forward over those same codes:
    the position embedding is added identically on both paths (and survives save/load)."""
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, spec, flat_codes=flat, num_image_positions=positions,
                                          image_position_embedding=True, image_position_embedding_type=kind)
    with torch.no_grad():  # a clearly non-zero embedding, so a path that forgot it would disagree
        _position_parameter(model).normal_(std=1.0)
    model.save_pretrained(tmp_path / "m")
    loaded = UniMMForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded.image_position_embedding) is type(model.image_position_embedding)
    assert torch.equal(loaded.image_position_embedding.weight, model.image_position_embedding.weight)
    codes = generate_images(loaded, tokenizer, PROMPTS[:2], cfg_scale=None, temperature=0.0)
    assert all(codes[n].shape[1] == positions for n in spec)
    batch = image_batch(tokenizer, layout, spec, PROMPTS[:2], positions)
    for name in spec:
        image = batch["input_ids"] == layout.image_token_id
        batch["visual_codes"][name][image] = codes[name].reshape(-1, codes[name].shape[-1])
    with torch.no_grad():
        out = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     visual_codes=batch["visual_codes"], return_logits=True)
    for row in range(2):
        first = int((batch["input_ids"][row] == layout.image_token_id).nonzero()[0])
        hidden = out.last_hidden_state[row, first - 1: first + positions - 1]  # they predict positions 0..N-1
        for name, (num_codes, depth) in spec.items():
            target = codes[name][row]  # [N, D]
            if flat:
                start = layout.code_token_offset
                predicted = out.logits[row, first - 1: first + positions - 1, start: start + num_codes].argmax(-1)
                assert torch.equal(predicted, target[:, 0])
                continue
            head = loaded.depth_heads[name]
            for d in range(depth):
                predicted = head.next_logits(hidden, target[:, :d]).argmax(-1)
                assert torch.equal(predicted, target[:, d]), (name, d)
    # the embedding does reach the LLM: without it, the image positions' states change (the text prefix's do not)
    _position_parameter(loaded).data.zero_()
    with torch.no_grad():
        plain = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       visual_codes=batch["visual_codes"], return_logits=True).last_hidden_state
    image = batch["input_ids"] == layout.image_token_id
    prefix = image.cumsum(-1) == 0
    assert torch.allclose(plain[prefix], out.last_hidden_state[prefix], atol=1e-5)
    assert not torch.allclose(plain[image], out.last_hidden_state[image], atol=1e-3)


def test_sincos_2d_table_encodes_row_and_column_apart():
    table = sincos_2d_table(4, 16)  # cells in raster order; first half: the row, second half: the column
    cells = table.reshape(4, 4, 16)
    assert torch.equal(cells[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert all(torch.equal(cells[r, 0, :8], cells[r, c, :8]) for r in range(4) for c in range(4))
    assert all(torch.equal(cells[0, c, 8:], cells[r, c, 8:]) for r in range(4) for c in range(4))
    # one step along a row is the same rotation of each (sin, cos) pair wherever it starts
    step = [cells[0, c + 1, 8:] @ cells[0, c, 8:] for c in range(3)]
    assert torch.allclose(torch.stack(step), step[0].expand(3), atol=1e-6)
    assert len({tuple(row.tolist()) for row in table}) == 16


def test_sincos_2d_image_position_embedding_checks_its_grid_and_kind(tiny_qwen2_path):
    with pytest.raises(ValueError, match="square grid, got 5 positions"):
        make_unimm(tiny_qwen2_path, VQRAE_SPEC, num_image_positions=5, image_position_embedding=True,
                   image_position_embedding_type="sincos_2d")
    with pytest.raises(ValueError, match="image_position_embedding_type must be"):
        make_unimm(tiny_qwen2_path, VQRAE_SPEC, num_image_positions=4, image_position_embedding=True,
                   image_position_embedding_type="rope")
    model, _, _ = make_unimm(tiny_qwen2_path, VQRAE_SPEC, num_image_positions=4, image_position_embedding=True,
                             image_position_embedding_type="sincos_2d")
    table = model.image_position_embedding
    # only the gain trains (it starts at the learned tables' scale); the sin-cos table is rebuilt, never saved
    assert [name for name, _ in table.named_parameters()] == ["gain"]
    assert torch.allclose(table.gain, torch.full_like(table.gain, 0.02))
    assert not any("image_position_embedding" in key for key in model.state_dict() if key.endswith("table"))


def test_sincos_2d_temperature_is_configured_and_saved(tiny_qwen2_path, tmp_path):
    model, _, _ = make_unimm(tiny_qwen2_path, VQRAE_SPEC, num_image_positions=4, image_position_embedding=True,
                             image_position_embedding_type="sincos_2d", image_position_sincos_temperature=16)
    table = model.image_position_embedding
    assert torch.allclose(table.weight, 0.02 * sincos_2d_table(2, table.dim, temperature=16))
    assert not torch.allclose(table.weight, 0.02 * sincos_2d_table(2, table.dim))
    model.save_pretrained(tmp_path / "m")
    loaded = UniMMForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.image_position_sincos_temperature == 16
    assert torch.equal(loaded.image_position_embedding.weight, table.weight)
    with pytest.raises(ValueError, match="image_position_sincos_temperature must be greater than 1"):
        make_unimm(tiny_qwen2_path, VQRAE_SPEC, num_image_positions=4, image_position_embedding=True,
                   image_position_embedding_type="sincos_2d", image_position_sincos_temperature=1.0)


def test_sincos_2d_image_positions_train_under_lora_beside_the_visual_heads(tiny_qwen2_path):
    """LoRA with `train_visual_heads`: peft wraps the sin-cos embedding in a trainable copy of its gain, and the
    model (training and generation alike) reads the copy."""
    from unimm.train.args import LoraArguments, ModelArguments
    from unimm.train.llm.lora import wrap_lora

    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC, num_image_positions=4,
                                          image_position_embedding=True, image_position_embedding_type="sincos_2d")
    peft_model = wrap_lora(model, LoraArguments(use_lora=True), ModelArguments(model_path="unused", train_visual_heads=True),
                           engine="ddp")
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and "image_position" in n]
    assert trained == ["base_model.model.image_position_embedding.modules_to_save.default.gain"]
    inner = peft_model.base_model.model
    before = generate_images(inner, tokenizer, PROMPTS[:2], cfg_scale=None, temperature=0.0)
    with torch.no_grad():
        inner.image_position_embedding.modules_to_save["default"].gain.fill_(3.0)
    table = sincos_2d_table(2, inner.image_position_embedding.modules_to_save["default"].dim)
    assert torch.allclose(inner.image_position_embedding.weight, 3.0 * table)
    assert torch.allclose(inner.add_image_position(torch.zeros(1, table.shape[-1]), 3), 3.0 * table[3])
    after = generate_images(inner, tokenizer, PROMPTS[:2], cfg_scale=None, temperature=0.0)
    assert any(not torch.equal(before[name], after[name]) for name in DUAL_SPEC)


def test_image_position_embedding_needs_num_image_positions(tiny_qwen2_path):
    with pytest.raises(ValueError, match="num_image_positions"):
        make_unimm(tiny_qwen2_path, VQRAE_SPEC, image_position_embedding=True)
    model, tokenizer, _ = make_unimm(tiny_qwen2_path, VQRAE_SPEC, num_image_positions=4,
                                     image_position_embedding=True)
    with pytest.raises(ValueError, match="num_positions=5 exceeds"):
        generate_images(model, tokenizer, PROMPTS, num_positions=5)


@pytest.mark.parametrize("spec, flat", [(DUAL_SPEC, False), (VQRAE_SPEC, True)], ids=["dual", "flat"])
def test_progress_counts_every_position_of_every_batch_and_leaves_the_codes_alone(tiny_qwen2_path, spec, flat):
    model, tokenizer, _ = make_unimm(tiny_qwen2_path, spec, flat_codes=flat)
    calls: list[tuple[int, int]] = []

    def record(done: int, total: int) -> None:
        calls.append((done, total))

    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=3)):
        kwargs.update(num_positions=5, cfg_scale=2.5, batch_size=2)  # 3 prompts: batches of 2 and 1
        calls.clear()
        reported = generate_images(model, tokenizer, PROMPTS, progress=record, **kwargs)
        plain = generate_images(model, tokenizer, PROMPTS, **kwargs)
        assert all(torch.equal(reported[n], plain[n]) for n in spec), kwargs
        assert calls == [(p, 5) for p in range(1, 6)] * 2


def test_generate_text_streams_the_ids_of_the_answer(tiny_qwen2_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle"], 3)
    length = int(batch["attention_mask"].sum())
    input_ids = batch["input_ids"][:, :length]
    codes = {k: v[:, :length] for k, v in batch["visual_codes"].items()}
    for sampling in (dict(), dict(do_sample=True, temperature=1.5, seed=4)):
        streamed: list[int] = []
        (text,) = generate_text(model, tokenizer, input_ids, visual_codes=codes, max_new_tokens=6,
                                on_token=streamed.append, **sampling)
        assert generate_text(model, tokenizer, input_ids, visual_codes=codes, max_new_tokens=6, **sampling) == [text]
        assert 1 <= len(streamed) <= 6 and all(isinstance(t, int) for t in streamed)
        assert tokenizer.decode(streamed, skip_special_tokens=True) == text, sampling
    with pytest.raises(ValueError, match="on_token streams one answer: got 2 rows"):
        generate_text(model, tokenizer, input_ids.repeat(2, 1), on_token=streamed.append)
