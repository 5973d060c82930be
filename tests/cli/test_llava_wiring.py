"""The LLaVA-1.5 translation wired into `unimm-pretrain` / `unimm-finetune`: what a LLaVA line parses into, the
conversation-only mixture rule, notes once on rank 0, refusals as one-line user errors, `--help`, and the pieces
the trainer adds (the projector's parameter group, the QLoRA refusal without CUDA)."""

from __future__ import annotations

import pytest
import torch

from unimm.cli import finetune, pretrain


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    from unimm.testing import build_tiny_vision_tower

    return build_tiny_vision_tower(tmp_path_factory.mktemp("tower") / "clip", "clip")


def llava_line(llm, tower, tmp_path, *extra: str) -> list[str]:
    data = tmp_path / "llava.json"
    data.write_text("[]")
    return ["--model_name_or_path", str(llm), "--version", "v1", "--data_path", str(data),
            "--vision_tower", str(tower), "--pretrain_mm_mlp_adapter", str(tmp_path / "mm_projector.bin"),
            "--mm_projector_lr", "2e-5", "--lora_enable", "True", "--lora_bias", "lora_only",
            "--image_aspect_ratio", "pad", "--mm_projector_type", "linear", "--output_dir", str(tmp_path / "out"),
            *extra]


def test_finetune_parses_a_llava_line_into_unimm_options(tiny_llama_path, tower, tmp_path, capsys):
    model, _modules, data, lora, training = finetune.parse_args(llava_line(tiny_llama_path, tower, tmp_path))
    assert model.llm_path == str(tiny_llama_path) and model.vision_tower == str(tower)
    assert model.visual_tokenizer_path is None  # a tower-only (LLaVA-style) model
    assert model.pretrained_projector == str(tmp_path / "mm_projector.bin")
    assert (model.projector_type, model.image_aspect, model.tower_aspect_ratio) == ("linear", "pad", "pad")
    assert (lora.use_lora, lora.lora_bias) == (True, "lora_only")
    assert training.projector_learning_rate == 2e-5
    assert data.chat_format == "v1" and data.conversation_json == str(tmp_path / "llava.json")
    # a bare --data_path: conversations only, said once
    assert (data.conversation_weight, data.caption_weight, data.t2i_weight, data.text_weight) == (1, 0, 0, 0)
    assert capsys.readouterr().err.count("training on its conversations only") == 1


def test_explicit_mixture_weights_are_kept(tiny_llama_path, tower, tmp_path):
    _model, _modules, data, *_ = finetune.parse_args(
        llava_line(tiny_llama_path, tower, tmp_path, "--conversation_weight", "2", "--text_weight", "1"))
    assert (data.conversation_weight, data.caption_weight, data.t2i_weight, data.text_weight) == (2, 1, 1, 1)


def test_notes_are_printed_by_rank_zero_only(tiny_llama_path, tower, tmp_path, capsys, monkeypatch):
    line = llava_line(tiny_llama_path, tower, tmp_path, "--lazy_preprocess", "True")
    i = line.index("--lora_enable")
    del line[i:i + 4]  # pretrain takes the same line, without finetune's LoRA flags
    monkeypatch.setenv("RANK", "1")
    pretrain.parse_args(line)
    assert "note:" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    pretrain.parse_args(line)
    assert "note: --lazy_preprocess: accepted, no effect" in capsys.readouterr().err


def test_refused_llava_flag_is_a_one_line_error(tiny_llama_path, tower, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        finetune.main(llava_line(tiny_llama_path, tower, tmp_path, "--mm_use_im_start_end", "True"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mm_use_im_start_end True is not supported" in err[0]


@pytest.mark.parametrize("program", [pretrain, finetune])
def test_help_mentions_llava_flags(program, capsys):
    with pytest.raises(SystemExit) as exit_:
        program.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "LLaVA-1.5 launch flags" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_without_cuda_is_refused(tiny_llama_path, tower, tmp_path):
    from unimm.cli.errors import ConfigError
    from unimm.train.llm.build import quantization_kwargs

    model, *_ = finetune.parse_args(llava_line(tiny_llama_path, tower, tmp_path, "--bits", "4"))
    assert model.quantization_bits == 4
    with pytest.raises(ConfigError, match=r"--bits 4 \(QLoRA\) needs a CUDA GPU and bitsandbytes"):
        quantization_kwargs(model, torch.bfloat16)


def test_split_param_groups_moves_selected_params_with_their_group_settings():
    from unimm.train.llm.trainer import split_param_groups

    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    optimizer = torch.optim.AdamW([{"params": [a, b], "weight_decay": 0.1}, {"params": [c], "weight_decay": 0.0}],
                                  lr=1e-3)
    moved = split_param_groups(optimizer, lambda p: p is b or p is c, lr=2e-5)
    assert moved == 2
    groups = [(len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert groups == [(1, 1e-3, 0.1), (1, 2e-5, 0.1), (1, 2e-5, 0.0)]
    assert optimizer.param_groups[0]["params"][0] is a
