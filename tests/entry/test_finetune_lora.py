"""unimm-finetune with LoRA (in-process `main(argv)`): intermediate checkpoints reload and resume exactly, and
unimm-merge-lora writes a plain model equal to base + adapter. Plus the freeze switches of pretraining."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.entry.conftest import log_history
from unimm.cli import finetune, merge_lora, pretrain

pytestmark = pytest.mark.slow


def finetune_args(toy, base, output_dir) -> list[str]:
    # lora_dropout 0: the Trainer restores the RNG state of a checkpoint, but after the epoch boundary the
    # resumed run's dropout masks differ from the uninterrupted run's, so exact loss equality needs no dropout.
    return [
        "--model_path", str(base), "--visual_tokenizer_path", str(toy["tokenizer"]),
        "--conversation_json", str(toy["conversations"]), "--conversation_code_cache", str(toy["conversation_cache"]),
        "--conversation_weight", "1", "--caption_weight", "0", "--t2i_weight", "0", "--max_length", "64",
        "--use_lora", "true", "--lora_r", "4", "--lora_dropout", "0", "--output_dir", str(output_dir), "--max_steps", "4",
        "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
        "--warmup_steps", "0", "--report_to", "none", "--seed", "3", "--use_cpu", "true",
    ]


@pytest.fixture(scope="module")
def lora_run(toy, tiny_unimm, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune_lora")
    finetune.main(finetune_args(toy, tiny_unimm, out))
    return out


def test_lora_checkpoint_reloads_and_resumes(lora_run, toy, tiny_unimm, tmp_path):
    from unimm.train.llm.lora import base_model_path, load_lora_model

    checkpoint = lora_run / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert base_model_path(checkpoint) == tiny_unimm
    model = load_lora_model(checkpoint)
    # the checkpoint carries the fully trained modules and the new token rows next to the adapter; the tiny Qwen2.5
    # ties its head to the embedding, so the head reads the embedding's rows (one tied adapter, not a second copy)
    names = [n for n, _ in model.named_modules()]
    assert any(n.endswith("embed_tokens.token_adapter") for n in names)
    assert any(n.endswith("depth_heads.pixel.modules_to_save.default") for n in names)
    assert model.get_base_model().config.tie_word_embeddings
    assert model.get_base_model().get_output_embeddings().token_adapter.tied_adapter is not None

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    finetune.main(finetune_args(toy, tiny_unimm, resumed))
    reference = {e["step"]: e["loss"] for e in log_history(lora_run)}
    after = {e["step"]: e["loss"] for e in log_history(resumed)}
    assert reference[4] < reference[1]
    for step in (3, 4):
        assert after[step] == pytest.approx(reference[step], rel=1e-5)


def test_merged_model_matches_base_plus_adapter(lora_run, tiny_unimm, tmp_path):
    from unimm.llm import UniMMForCausalLM
    from unimm.train.llm.lora import load_lora_model

    merged_dir = tmp_path / "merged"
    merge_lora.main(["--adapter_path", str(lora_run / "checkpoint-4"), "--output_dir", str(merged_dir)])
    merged = UniMMForCausalLM.from_pretrained(merged_dir).eval()
    adapted = load_lora_model(lora_run / "checkpoint-4").eval()
    base = UniMMForCausalLM.from_pretrained(tiny_unimm).eval()
    layout = merged.config.layout
    ids = torch.tensor([[5, 9, layout.boi_token_id, layout.image_token_id, layout.image_token_id,
                         layout.eoi_token_id, 7]])
    codes = {g: torch.full((1, 7, spec["depth"]), -1) for g, spec in layout.codebook_spec.items()}
    for group in codes:
        codes[group][0, 3:5] = torch.randint(0, 8, (2, codes[group].shape[-1]))
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, visual_codes=codes).logits
        adapted_logits = adapted(input_ids=ids, visual_codes=codes).logits
        base_logits = base(input_ids=ids, visual_codes=codes).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the finetune changed something
    assert (merged_dir / "tokenizer_config.json").is_file()

    # The served (merged) model is the trained one: the loss of the training path (adapter on the base) equals the
    # merged model's on a batch whose text targets include the added tokens (read through the tied LM head).
    labels = ids.clone()
    with torch.no_grad():
        trained_loss = adapted(input_ids=ids, visual_codes=codes, labels=labels).loss
        served_loss = merged(input_ids=ids, visual_codes=codes, labels=labels).loss
    torch.testing.assert_close(served_loss, trained_loss, rtol=1e-5, atol=1e-6)
    # tied in the merged model too; only the added rows moved, the text rows are bit-identical
    embed, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert merged.config.tie_word_embeddings and embed.data_ptr() == head.data_ptr()
    rows = layout.original_vocab_size
    assert torch.equal(embed[:rows], base.get_input_embeddings().weight[:rows])
    assert (embed[rows:] - base.get_input_embeddings().weight[rows:]).abs().max() > 0


def test_frozen_llm_trains_only_new_rows_and_heads(toy, tmp_path):
    from unimm.llm import UniMMForCausalLM

    out = tmp_path / "heads_only"
    pretrain.main([
        "--llm_path", str(toy["llm"]), "--visual_tokenizer_path", str(toy["tokenizer"]), "--code_cache",
        str(toy["cache"]), "--depth_head_layers", "1", "--max_length", "64", "--num_samples", "16",
        "--train_llm", "false", "--gradient_checkpointing", "true", "--output_dir", str(out), "--max_steps", "2",
        "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--weight_decay", "0.1",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
    ])
    from transformers import AutoModelForCausalLM

    trained = UniMMForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(toy["llm"])
    layout = trained.config.layout
    rows = layout.original_vocab_size
    embed = trained.get_input_embeddings().weight
    torch.testing.assert_close(embed[:rows], original.get_input_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(trained.language_model.model.layers[0].mlp.up_proj.weight,
                               original.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0)
    # the added rows moved away from their shared mean initialisation
    new_rows = embed[layout.boi_token_id: layout.uncond_token_id + 1]
    assert new_rows.std(dim=0).max() > 0


def test_attn_implementation_applies_to_a_model_path_run(toy, tiny_unimm):
    """`--attn_implementation` replaces the implementation a saved model was built with ("auto" keeps it), so a
    finetune can pair `--cpu_matmul_precision bf16` with eager attention (the CPU SDPA kernel slows under it)."""
    from unimm.train.args import ModelArguments
    from unimm.train.llm.build import build_model

    def loaded(attn: str) -> str:
        args = ModelArguments(model_path=str(tiny_unimm), visual_tokenizer_path=str(toy["tokenizer"]),
                              attn_implementation=attn)
        return build_model(args).model.language_model.config._attn_implementation

    assert loaded("auto") == "sdpa"
    assert loaded("eager") == "eager"


def test_cpu_matmul_precision_holds_through_a_pretraining_run(toy, tmp_path, monkeypatch):
    """`--cpu_matmul_precision bf16` through the program: bf16 products while it trains (so the weights differ from an
    exact run's, and only slightly), the process's own precision after."""
    from safetensors.torch import load_file

    from unimm.train.llm import trainer as trainer_module
    from unimm.utils.hf_compat import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has neither AMX nor AVX512-BF16 (bf16 falls back to ieee)")
    seen: list[str] = []
    original_train = trainer_module.UniMMTrainer.train

    def recording_train(self, *args, **kwargs):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.UniMMTrainer, "train", recording_train)
    before = torch.backends.mkldnn.matmul.fp32_precision
    weights = {}
    for precision in ("ieee", "bf16"):
        out = tmp_path / precision
        pretrain.main([
            "--llm_path", str(toy["llm"]), "--visual_tokenizer_path", str(toy["tokenizer"]), "--code_cache",
            str(toy["cache"]), "--depth_head_layers", "1", "--max_length", "64", "--num_samples", "16",
            "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
            "--attn_implementation", "eager", "--cpu_matmul_precision", precision, "--seed", "5",
        ])
        weights[precision] = load_file(out / "model.safetensors")
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert seen == ["ieee", "bf16"]
    moved = max((weights["bf16"][k] - weights["ieee"][k]).abs().max().item() for k in weights["ieee"])
    assert 0 < moved < 1e-2
