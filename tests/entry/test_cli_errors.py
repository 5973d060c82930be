"""Clean errors at every program boundary: each known user error is one line on stderr, exit status 2, no
traceback; `--debug` / `UNIMM_DEBUG=1` bring the traceback back. Every case runs the real program in a fresh
interpreter, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.entry.conftest import REPO
from unimm.testing import free_port

pytestmark = pytest.mark.slow


def run_program(args: list[str], env: dict[str, str] | None = None, user: int | None = None,
                timeout: int = 300) -> subprocess.CompletedProcess:
    base = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}
    base.pop("UNIMM_DEBUG", None)
    command = [sys.executable, *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, cwd=REPO, env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, one `<program>: error: ...` line holding every fragment; returns it."""
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def pretokenize_args(data, tokenizer, output_dir, *extra: str) -> list[str]:
    return ["scripts/pretokenize.py", "--data", str(data), "--tokenizer_path", str(tokenizer), "--output_dir",
            str(output_dir), "--num_workers", "0", "--batch_size", "4", *extra]


def pretrain_args(toy, cache, tokenizer, output_dir) -> list[str]:
    return ["scripts/pretrain.py", "--llm_path", str(toy["llm"]), "--tokenizer_path", str(tokenizer),
            "--code_cache", str(cache), "--model_config_overrides", '{"depth_head_layers": 1}', "--max_length", "64",
            "--num_samples", "8", "--output_dir", str(output_dir), "--max_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0"]


def test_missing_config_file_and_debug_traceback(tmp_path):
    missing = tmp_path / "nope" / "recipe.yaml"
    proc = run_program(["scripts/train_tokenizer.py", str(missing)])
    assert_user_error(proc, "train_tokenizer.py: error:", f"config file not found: {missing}")
    for debug_args, env in (([str(missing), "--debug"], None), ([str(missing)], {"UNIMM_DEBUG": "1"})):
        proc = run_program(["scripts/train_tokenizer.py", *debug_args], env=env)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_missing_data_is_named(toy, tmp_path):
    missing = tmp_path / "no_such_folder"
    assert_user_error(run_program(pretokenize_args(missing, toy["tokenizer"], tmp_path / "cache")),
                      f"data={missing}: no such file or folder")
    assert_user_error(run_program(["scripts/train_tokenizer.py", "--preset", "vqrae-tiny", "--dataset", str(missing),
                                   "--output_dir", str(tmp_path / "run")]),
                      f"dataset={missing}: no such file or folder")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preset: vqrae-tiny\nmax_steps: [1, 2\nbatch_size: 4\n")
    proc = run_program(["scripts/train_tokenizer.py", str(recipe)])
    line = assert_user_error(proc, f"{recipe}:", "invalid YAML")
    assert f"{recipe}:3:" in line or f"{recipe}:2:" in line, line


def test_bad_config_key_and_bad_type(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preset: vqrae-tiny\nmax_stepz: 3\n")
    assert_user_error(run_program(["scripts/train_tokenizer.py", str(recipe)]), str(recipe),
                      "unknown config key(s) ['max_stepz']")
    assert_user_error(run_program(["scripts/train_tokenizer.py", "--preset", "vqrae-tiny", "--max_steps", "abc"]),
                      "argument --max_steps", "invalid int value: 'abc'")
    typed = tmp_path / "typed.yaml"
    typed.write_text("preset: vqrae-tiny\nmax_steps: abc\n")
    assert_user_error(run_program(["scripts/train_tokenizer.py", str(typed)]), "argument --max_steps",
                      "invalid int value: 'abc'", f"(set in {typed})")
    assert_user_error(run_program(["scripts/pretokenize.py", "--data", "x"]), "pretokenize needs --visual_tokenizer_path")


def test_llava_json_syntax_error_names_the_file(toy, tmp_path):
    llava = tmp_path / "llava.json"
    llava.write_text('[{"id": "a", "image": "red_0.png", "conversations": []},\n {"id": "b", "image": }]')
    proc = run_program(pretokenize_args(llava, toy["tokenizer"], tmp_path / "cache", "--data_format", "llava"))
    assert_user_error(proc, f"{llava}:2:", "invalid JSON")


def test_jsonl_syntax_error_names_file_line_and_column(toy, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    image = toy["images"] / "red_0.png"
    pairs.write_text(json.dumps({"image": str(image), "text": "a"}) + '\n{"image": "b.png", "text": \n')
    proc = run_program(pretokenize_args(pairs, toy["tokenizer"], tmp_path / "cache", "--allow_outside_image_folder",
                                        "true"), env={"HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert_user_error(proc, f"{pairs}:2:", "invalid JSON Lines record")


def test_wrong_model_folder(toy, tmp_path):
    proc = run_program(pretokenize_args(toy["images"], toy["llm"], tmp_path / "cache"))
    assert_user_error(proc, f"tokenizer_path={toy['llm']}", "cannot load a UniMM visual tokenizer")
    proc = run_program(pretokenize_args(toy["images"], tmp_path / "empty", tmp_path / "cache"))
    assert_user_error(proc, str(tmp_path / "empty"), "config.json missing")


def test_inference_programs_name_missing_inputs(tiny_unimm, toy, tmp_path):
    common = ["--model_path", str(tiny_unimm), "--tokenizer_path", str(toy["tokenizer"])]
    missing = tmp_path / "missing.png"
    proc = run_program(["scripts/chat.py", *common, "--images", str(missing), "--questions", "what?"])
    assert_user_error(proc, "chat.py: error:", str(missing))
    proc = run_program(["scripts/chat.py", *common, "--images", str(missing), str(missing), "--questions", "a", "b",
                        "c"])
    assert_user_error(proc, "2 images for 3 questions")
    proc = run_program(["scripts/generate_t2i.py", *common, "--output_dir", str(tmp_path / "out")])
    assert_user_error(proc, "generate_t2i.py: error:", "no prompts")
    proc = run_program(["scripts/generate_t2i.py", "--model_path", str(toy["tokenizer"]), "--tokenizer_path",
                        str(toy["tokenizer"]), "--prompts", "x", "--output_dir", str(tmp_path / "out")])
    assert_user_error(proc, f"model_path={toy['tokenizer']}")


def test_cache_from_tokenizer_with_other_weights_is_refused_naming_both_hashes(toy, tmp_path):
    from unimm.tokenizer import load_tokenizer
    from unimm.tokenizer.identity import tokenizer_weights_hash

    tokenizer = load_tokenizer(toy["tokenizer"])
    expected = tokenizer_weights_hash(tokenizer)
    with torch.no_grad():
        next(tokenizer.parameters()).add_(1e-3)  # same config, other weights (as after more training steps)
    tokenizer.save_pretrained(tmp_path / "retrained")
    proc = run_program(pretrain_args(toy, toy["cache"], tmp_path / "retrained", tmp_path / "run"))
    assert_user_error(proc, str(toy["cache"]), expected, tokenizer_weights_hash(tokenizer), "weights hash")
    assert json.loads((toy["cache"] / "cache_info.json").read_text())["tokenizer_weights_hash"] == expected
    assert "--allow_tokenizer_weights_mismatch true" in proc.stderr
    allowed = run_program(pretrain_args(toy, toy["cache"], tmp_path / "retrained", tmp_path / "run_allowed")
                          + ["--allow_tokenizer_weights_mismatch", "true"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "using it anyway" in allowed.stderr and (tmp_path / "run_allowed" / "config.json").is_file()


def test_damaged_shard_names_the_file_and_the_rebuild_command(toy, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(toy["cache"], cache)
    shard = cache / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_program(pretrain_args(toy, cache, toy["tokenizer"], tmp_path / "run"))
    assert_user_error(proc, f"code cache shard {shard}", "checksum", "scripts/pretokenize.py",
                      f"--output_dir {cache}")
    shard.write_bytes(bytes(data[: len(data) // 3]))
    proc = run_program(pretrain_args(toy, cache, toy["tokenizer"], tmp_path / "run"))
    assert_user_error(proc, f"code cache shard {shard}", "truncated")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to switch to an unprivileged user with setpriv")
def test_unwritable_output_directory_as_a_non_root_user(toy):
    nobody = 65534
    # pytest's tmp_path is private to root; this test's files must be readable by the unprivileged user.
    root = Path(tempfile.mkdtemp(prefix="unimm_cli_"))
    try:
        root.chmod(0o755)
        shutil.copytree(toy["tokenizer"], root / "tokenizer")
        shutil.copytree(toy["images"], root / "images")
        locked = root / "locked"
        locked.mkdir(mode=0o755)  # owned by root: the unprivileged user may read it, not write into it
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        home = root / "home"
        home.mkdir()
        os.chown(home, nobody, nobody)
        env = {"HOME": str(home), "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / "cache"),
               "TRITON_CACHE_DIR": str(home / "triton")}
        out = locked / "cache"
        proc = run_program(pretokenize_args(root / "images", root / "tokenizer", out), env=env, user=nobody)
        assert_user_error(proc, "Permission denied", str(out))
        secret = root / "secret.yaml"
        secret.write_text("preset: vqrae-tiny\n")
        secret.chmod(0o600)  # root's: unreadable for the unprivileged user
        proc = run_program(["scripts/train_tokenizer.py", str(secret)], env=env, user=nobody)
        assert_user_error(proc, "Permission denied", str(secret))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_stale_deepspeed_build_lock_is_named_instead_of_hanging(toy, tmp_path):
    """A DeepSpeed op build killed mid-way leaves torch's build lock; a CPU launch would wait on it forever."""
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    one_rank = {"TORCH_EXTENSIONS_DIR": str(extensions), "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run_program([*pretrain_args(toy, toy["cache"], toy["tokenizer"], tmp_path / "out"), "--deepspeed",
                        str(REPO / "configs/deepspeed/zero2.json")], env=one_rank, timeout=120)
    assert_user_error(proc, "pretrain.py: error:", f"{lock} has been there for 60 minutes",
                      "a build of the deepspeed_shm_comm op was killed")


def test_run_main_in_process(capsys):
    from unimm.cli import run_main
    from unimm.data.code_cache import CodeCacheMismatchError

    def user_mistake(argv):
        raise CodeCacheMismatchError(f"cache mismatch\n  spread over lines {argv}")

    with pytest.raises(SystemExit) as exit_:
        run_main(user_mistake, ["--flag", "--debug"][:1], prog="prog.py")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "prog.py: error: cache mismatch spread over lines ['--flag']\n"
    with pytest.raises(CodeCacheMismatchError):
        run_main(user_mistake, ["--debug"], prog="prog.py")

    def bug(argv):
        raise RuntimeError("an internal bug keeps its traceback")

    with pytest.raises(RuntimeError):
        run_main(bug, [], prog="prog.py")
    assert run_main(lambda argv: argv, ["a", "--debug", "b"]) == ["a", "b"]
