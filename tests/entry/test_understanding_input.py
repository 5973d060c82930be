"""`understanding_input`: VQRAE's way, in one run, of text-to-image from a code cache (SimVQ codes) and conversations
read from pixels (`encode_features` -> the feature projector), through the real pretraining path; and the `auto`
rule DualToken runs keep (a code cache given: conversations from codes, no projector)."""

from __future__ import annotations

import pytest
import torch


def _pretrain(paths: dict, output_dir, *extra: str):
    from unimm.cli import pretrain
    from unimm.train.llm.trainer import run_training
    from unimm.utils.runtime import prepare_training_arguments

    model_args, modules, data_args, training_args = pretrain.parse_args([
        "--llm_path", str(paths["llm"]), "--visual_tokenizer_path", str(paths["tokenizer"]),
        "--code_cache", str(paths["cache"]), "--conversation_json", str(paths["conversations"]),
        "--caption_weight", "0", "--t2i_weight", "1", "--conversation_weight", "1", "--depth_head_layers", "1",
        "--num_samples", "16", "--max_length", "64", "--per_device_train_batch_size", "8", "--max_steps", "4",
        "--logging_steps", "1", "--learning_rate", "3e-3", "--seed", "3", "--save_steps", "100",
        "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "true",
        "--dataloader_num_workers", "0", *extra])
    prepare_training_arguments(training_args)
    return run_training(model_args, modules, data_args, training_args)


def test_t2i_from_codes_and_conversations_from_pixels_train_in_one_run(vqrae_toy, tmp_path):
    from unimm.llm import UniMMForCausalLM

    trainer = _pretrain(vqrae_toy, tmp_path / "run", "--understanding_input", "features")
    model = trainer.model
    assert model.feature_projector is not None  # a new model gets a projector although code_cache is set
    dataset = trainer.train_dataset
    samples = {task: [dataset[i] for i in range(len(dataset)) if dataset.task_of(i) == task]
               for task in ("t2i", "conversation")}
    assert all(samples.values())
    # text-to-image: codes from the cache, supervised; conversations: pixels, no codes
    assert all(s.visual_codes and not s.pixel_values for s in samples["t2i"])
    assert all(len(s.pixel_values) == 1 and not s.visual_codes for s in samples["conversation"])
    # one collated batch holds both kinds, and the trainer turns the pixels into the tokenizer's features
    batch = trainer.data_collator(samples["t2i"][:2] + samples["conversation"][:2])
    encoded = trainer._encode_pixels(batch)
    with torch.no_grad():
        expected = trainer.visual_tokenizer.encode_features(batch["pixel_values"])
    assert torch.equal(encoded["image_features"], expected)
    model.zero_grad()
    model(**{k: v for k, v in encoded.items() if k != "sample_ids"}).loss.backward()
    assert model.feature_projector.linear_1.weight.grad.abs().sum() > 0
    assert next(model.visual_embedding.parameters()).grad.abs().sum() > 0
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert history and all("text_loss" in e and "visual_loss/semantic" in e for e in history)
    reloaded = UniMMForCausalLM.from_pretrained(tmp_path / "run")
    assert reloaded.feature_projector is not None and reloaded.config.feature_dim == expected.shape[-1]


def test_auto_with_code_caches_keeps_conversations_on_codes(vqrae_toy, tmp_path):
    """What DualToken runs do (no understanding_input, the conversation images in a code cache): no projector,
    conversations from the cache's codes, t2i beside them."""
    trainer = _pretrain(vqrae_toy, tmp_path / "run", "--conversation_code_cache", str(vqrae_toy["conversation_cache"]))
    assert trainer.model.feature_projector is None
    dataset = trainer.train_dataset
    conversations = [dataset[i] for i in range(len(dataset)) if dataset.task_of(i) == "conversation"]
    assert conversations and all(s.visual_codes and not s.pixel_values for s in conversations)
    # every image from a code cache: the trainer holds no tokenizer (its weights are freed after the checks)
    assert trainer.visual_tokenizer is None


@pytest.mark.parametrize("mode, fields, needs", [
    ("auto", {}, True),  # no cache at all: pixels, the old rule
    ("auto", {"code_cache": "c"}, False),
    ("auto", {"conversation_code_cache": "c"}, False),
    ("features", {"code_cache": "c"}, True),
    ("codes", {}, False),
])
def test_new_model_needs_projector(mode, fields, needs):
    from unimm.data.mixture import MixtureConfig

    config = MixtureConfig(conversation_weight=1.0, caption_weight=0.0, understanding_input=mode, **fields)
    assert config.new_model_needs_projector is needs
    assert MixtureConfig(conversation_weight=0.0, caption_weight=0.0, understanding_input=mode,
                         **fields).new_model_needs_projector is False


@pytest.mark.parametrize("fields, message", [
    ({"understanding_input": "pixels"}, "understanding_input must be one of"),
    ({"understanding_input": "features", "conversation_code_cache": "c", "caption_weight": 0.0},
     "conversation_code_cache=c is set"),
    ({"understanding_input": "features"}, "caption_weight=1.0"),
])
def test_bad_understanding_input_names_the_key(fields, message):
    from unimm.data.mixture import MixtureConfig

    with pytest.raises(ValueError, match=message):
        MixtureConfig(conversation_weight=1.0, **fields)


def test_features_without_a_pixel_source_and_codes_without_a_cache_are_refused(vqrae_toy):
    from unimm.data.mixture import MixtureConfig, build_mixture

    features = MixtureConfig(conversation_weight=1.0, caption_weight=0.0, t2i_weight=0.0,
                             conversation_json=str(vqrae_toy["conversations"]), understanding_input="features")
    with pytest.raises(ValueError, match="understanding_input=features needs a model with a feature projector"):
        build_mixture(features, factory=None)
    codes = MixtureConfig(conversation_weight=1.0, caption_weight=0.0, t2i_weight=0.0,
                          conversation_json=str(vqrae_toy["conversations"]), understanding_input="codes")
    with pytest.raises(ValueError, match="understanding_input=codes needs conversation_code_cache or code_cache"):
        build_mixture(codes, factory=None)
