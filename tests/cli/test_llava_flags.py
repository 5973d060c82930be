"""The LLaVA-1.5 flag translation layer (unimm/cli/llava.py), flag by flag, on folders shaped like the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unimm.cli import llava
from unimm.cli.llava import LLAVA_FLAGS, LlavaFlagError, llava_flag_table, translate_llava_argv


@pytest.fixture(autouse=True)
def _with_cuda(monkeypatch):
    """Translate as on a GPU machine (no `--use_cpu` added); tests of the CPU behaviour switch it off."""
    monkeypatch.setattr(llava, "_has_cuda", lambda: True)


def _folder(root: Path, name: str, model_type: str) -> Path:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {"llm": _folder(tmp_path, "vicuna", "llama"), "unimm": _folder(tmp_path, "unimm_model", "unimm"),
            "clip": _folder(tmp_path, "clip", "clip_vision_model"),
            "siglip": _folder(tmp_path, "siglip", "siglip_vision_model"),
            "dualtoken": _folder(tmp_path, "dualtoken", "unimm_dualtoken")}


def test_model_name_or_path_is_a_local_llm_or_unimm_model(folders):
    assert translate_llava_argv(["--model_name_or_path", str(folders["llm"])]).argv == \
        ["--llm_path", str(folders["llm"])]
    assert translate_llava_argv([f"--model_name_or_path={folders['unimm']}"]).argv == \
        ["--model_path", str(folders["unimm"])]


def test_a_hub_id_is_refused_and_nothing_is_downloaded():
    with pytest.raises(LlavaFlagError, match="lmsys/vicuna-13b-v1.5.*downloads nothing"):
        translate_llava_argv(["--model_name_or_path", "lmsys/vicuna-13b-v1.5"])


def test_vision_tower_kinds(folders):
    for kind in ("clip", "siglip"):
        assert translate_llava_argv(["--vision_tower", str(folders[kind])]).argv == \
            ["--vision_tower", str(folders[kind])]
    translation = translate_llava_argv(["--vision_tower", str(folders["dualtoken"])])
    assert translation.argv == ["--visual_tokenizer_path", str(folders["dualtoken"])]
    assert "UniMM visual tokenizer" in translation.notes[0]
    with pytest.raises(LlavaFlagError, match="neither a CLIP / SigLIP"):
        translate_llava_argv(["--vision_tower", str(folders["llm"])])


@pytest.mark.parametrize("version, chat_format", [("v1", "v1"), ("plain", "llava_plain"),
                                                  ("llava_llama_2", "llava_llama_2"),
                                                  ("chat_template", "chat_template")])
def test_version_is_the_chat_format(version, chat_format):
    assert translate_llava_argv(["--version", version]).argv == ["--chat_format", chat_format]


def test_unknown_version_is_refused_with_the_choices():
    with pytest.raises(LlavaFlagError, match="'mpt' is not supported.*'v1'"):
        translate_llava_argv(["--version", "mpt"])


def test_booleans_take_llava_spellings_and_bare_flags():
    assert translate_llava_argv(["--lora_enable", "True", "--lora_r", "128"]).argv == \
        ["--use_lora", "true", "--lora_r", "128"]
    assert translate_llava_argv(["--lora_enable"]).argv == ["--use_lora", "true"]
    assert translate_llava_argv(["--lora_enable", "False"]).argv == ["--use_lora", "false"]
    with pytest.raises(LlavaFlagError, match="True or False"):
        translate_llava_argv(["--lora_enable", "maybe"])


def test_tune_mm_mlp_adapter_trains_only_the_projector_and_writes_it():
    argv = translate_llava_argv(["--tune_mm_mlp_adapter", "True"]).argv
    assert argv == ["--train_llm", "false", "--train_new_embeddings", "false", "--train_visual_heads", "false",
                    "--train_projector", "true", "--save_mm_projector", "true"]
    assert translate_llava_argv(["--tune_mm_mlp_adapter", "False"]).argv == []


def test_refused_values_say_why():
    with pytest.raises(LlavaFlagError, match="image-start/end"):
        translate_llava_argv(["--mm_use_im_start_end", "True"])
    with pytest.raises(LlavaFlagError, match="<im_patch>"):
        translate_llava_argv(["--mm_use_im_patch_token", "True"])
    with pytest.raises(LlavaFlagError, match="anyres"):
        translate_llava_argv(["--image_aspect_ratio", "anyres"])
    with pytest.raises(LlavaFlagError, match="4, 8 and 16"):
        translate_llava_argv(["--bits", "2"])


def test_no_ops_leave_a_note_and_no_argument():
    translation = translate_llava_argv(["--lazy_preprocess", "True", "--mm_use_im_start_end", "False"])
    assert translation.argv == []
    assert len(translation.notes) == 2 and "no effect" in translation.notes[0]


def test_renamed_trainer_options(monkeypatch):
    assert translate_llava_argv(["--evaluation_strategy", "no", "--warmup_ratio", "0.03"]).argv == \
        ["--eval_strategy", "no", "--warmup_steps", "0.03"]
    assert translate_llava_argv(["--image_aspect_ratio", "pad"]).argv == ["--image_aspect", "pad"]
    assert translate_llava_argv(["--image_aspect_ratio", "square"]).argv == ["--image_aspect", "crop"]


def test_tf32_and_missing_loggers_without_cuda(monkeypatch):
    monkeypatch.setattr(llava, "_has_cuda", lambda: False)
    translation = translate_llava_argv(["--tf32", "True", "--report_to", "unimm_no_such_logger"])
    assert translation.argv == ["--report_to", "none", "--use_cpu", "true"]
    assert any("no CUDA device" in note for note in translation.notes)
    assert any("unimm_no_such_logger: not installed" in note for note in translation.notes)


def test_a_llava_line_without_cuda_trains_on_cpu(monkeypatch):
    monkeypatch.setattr(llava, "_has_cuda", lambda: False)
    translation = translate_llava_argv(["--lora_r", "8", "--bf16", "True"])
    assert translation.argv == ["--lora_r", "8", "--bf16", "True", "--use_cpu", "true"]
    assert translate_llava_argv(["--lora_r", "8", "--use_cpu", "false"]).argv == ["--lora_r", "8", "--use_cpu", "false"]
    monkeypatch.setattr(llava, "_has_cuda", lambda: True)
    assert translate_llava_argv(["--lora_r", "8"]).argv == ["--lora_r", "8"]


def test_other_flags_pass_through_untouched():
    argv = ["configs/finetune/llava_lora.yaml", "--deepspeed", "zero3.json", "--output_dir", "out",
            "--per_device_train_batch_size", "16", "--bf16", "True", "--max_steps", "2"]
    translation = translate_llava_argv(argv)
    assert translation.argv == argv and translation.notes == [] and translation.llava_flags == []


def test_a_flag_without_its_value_is_refused():
    with pytest.raises(LlavaFlagError, match="--data_path needs a value"):
        translate_llava_argv(["--data_path", "--image_folder", "x"])


def test_every_flag_is_in_the_table_once():
    names = [flag.name for flag in LLAVA_FLAGS]
    assert len(names) == len(set(names))
    table = llava_flag_table()
    assert all(f"| `--{name}` |" in table for name in names)


def test_readme_lists_the_flag_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = readme.split("<!-- llava-flags -->\n", 1)[1].split("\n<!-- /llava-flags -->", 1)[0]
    assert listed == llava_flag_table()
