"""Each entry of the upstream seam (`unimm/utils/hf_compat.py`) checked against the installed releases.

When an upstream release changes one of these internals, the test fails with the dependency and its version in the
message, long before a training step would die on it."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from unimm.utils import hf_compat, parallel


def _installed(package: str) -> str:
    return f"{package} {importlib.metadata.version(package)}"


def _tiny_qwen2_config(**kwargs) -> Qwen2Config:
    return Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kwargs)


def test_cache_name_is_the_one_model_forwards_and_outputs_use():
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    name = hf_compat.CACHE_NAME
    where = f"{_installed('transformers')} (hf_compat.CACHE_NAME={name!r})"
    assert name in inspect.signature(Qwen2Model.forward).parameters, f"{where}: Qwen2Model.forward takes no {name}"
    for cls in (BaseModelOutputWithPast, CausalLMOutputWithPast):
        assert name in {f.name for f in dataclasses.fields(cls)}, f"{where}: {cls.__name__} has no field {name}"


def test_pop_cache_takes_either_name_once():
    cache = object()
    for name in ("cache", "past_key_values"):
        kwargs = {name: cache, "other": 1}
        assert hf_compat.pop_cache(kwargs) is cache and kwargs == {"other": 1}
    assert hf_compat.pop_cache({"cache": None, "past_key_values": None}) is None
    with pytest.raises(ValueError, match="not both"):
        hf_compat.pop_cache({"cache": cache, "past_key_values": object()})


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_unimm_forward_continues_from_its_returned_cache_under_either_keyword(keyword):
    """A prefix forward returns the cache as `kv_cache`; feeding it back (under either keyword) and the next token
    gives the logits of the full forward. This is the path HF generation takes, on the installed release."""
    from unimm.llm import UniMMForCausalLM

    torch.manual_seed(0)
    model = UniMMForCausalLM.from_llm(Qwen2ForCausalLM(_tiny_qwen2_config()), {"pixel": (16, 2)}).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        assert prefix.kv_cache is not None, f"{_installed('transformers')}: no KV cache in the output"
        assert prefix[hf_compat.CACHE_NAME] is prefix.kv_cache  # where HF generation reads it
        step = model(input_ids=ids[:, -1:], use_cache=True, **{keyword: prefix.kv_cache})
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_hf_generate_runs_on_a_unimm_model():
    """`GenerationMixin.generate` passes the cache to UniMM's forward and reads it back from UniMM's output."""
    from unimm.llm import UniMMForCausalLM

    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(_tiny_qwen2_config()).eval()
    model = UniMMForCausalLM.from_llm(llm, {"pixel": (16, 2)}).eval()
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        ours = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        theirs = llm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs), _installed("transformers")


def test_sub_config_spec_is_what_transformers_composite_configs_use():
    from transformers import LlavaConfig

    specs = LlavaConfig.sub_configs_defaults
    assert all(isinstance(spec, hf_compat.SubConfigSpec) for spec in specs.values()), _installed("transformers")
    from unimm.llm import UniMMConfig

    assert UniMMConfig().text_config.model_type == "qwen2", _installed("transformers")


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_of_a_loaded_model(tmp_path, implementation):
    Qwen2ForCausalLM(_tiny_qwen2_config()).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation)
    assert hf_compat.attn_implementation_of(model.config) == implementation, _installed("transformers")


def test_marked_weights_survive_post_init_and_unmarked_ones_do_not():
    """The control half (unmarked weights are re-initialised) proves the check can fail: if upstream stops
    honouring the flag, the marked half fails; if it stops initialising at all, the control half does."""

    def loaded_model() -> Qwen2ForCausalLM:
        model = Qwen2ForCausalLM(_tiny_qwen2_config())
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)  # stands for loaded checkpoint values, which no initialiser produces
        for obj in list(model.modules()) + list(model.parameters()) + list(model.buffers()):
            if hasattr(obj, "_is_hf_initialized"):
                del obj._is_hf_initialized
        return model

    control = loaded_model()
    control.init_weights()
    assert not all(bool((p == 0.5).all()) for p in control.parameters()), (
        f"{_installed('transformers')}: init_weights() no longer initialises unflagged weights")
    marked = loaded_model()
    hf_compat.mark_weights_initialized(marked)
    marked.init_weights()
    changed = [n for n, p in marked.named_parameters() if not bool((p == 0.5).all())]
    assert not changed, f"{_installed('transformers')}: post_init re-initialised flagged weights {changed[:3]}"


def test_from_llm_keeps_the_loaded_weights():
    from unimm.llm import UniMMForCausalLM

    llm = Qwen2ForCausalLM(_tiny_qwen2_config())
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    model = UniMMForCausalLM.from_llm(llm, {"pixel": (16, 2)})
    after = dict(model.language_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), _installed("transformers")


def test_accelerate_partial_state_is_configured_once_per_process():
    """`_configure_cpu_distributed_state` relies on `PartialState(...)` being a no-op once configured."""
    code = (
        "from accelerate import PartialState\n"
        "first = PartialState(cpu=True)\n"
        "again = PartialState(backend='gloo', cpu=False)\n"
        "assert again.distributed_type == first.distributed_type and again.device == first.device\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, f"{_installed('accelerate')}: {result.stderr[-2000:]}"


def test_parse_config_refuses_fields_without_default():
    from unimm.utils.config import parse_config

    @dataclasses.dataclass
    class Args:
        path: str

    with pytest.raises(TypeError, match="Args.path"):
        parse_config((Args,), [])


def test_upstream_error_names_package_and_version():
    error = hf_compat.upstream_error("transformers", "something moved")
    assert _installed("transformers") in str(error) and "requirements/lock.txt" in str(error)


class _ListDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.tensor([index])}


def test_train_sampler_override_reaches_the_trainers_dataloader(tmp_path):
    """The Trainer still builds its training dataloader from `_get_train_sampler(train_dataset)`: a sampler
    returned by `TrainSamplerOverride.train_sampler` is the one the dataloader draws from, and None keeps the
    stock sampler."""
    from transformers import Trainer, TrainingArguments

    where = f"{_installed('transformers')}: Trainer._get_train_sampler"
    assert "train_dataset" in inspect.signature(Trainer._get_train_sampler).parameters, f"{where} signature changed"
    order = [7, 6, 5, 4, 3, 2, 1, 0]

    class Fixed(hf_compat.TrainSamplerOverride, Trainer):
        use_fixed = True

        def train_sampler(self, dataset):
            return order if self.use_fixed else None

    model = Qwen2ForCausalLM(_tiny_qwen2_config())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True)
    trainer = Fixed(model=model, args=args, train_dataset=_ListDataset(), data_collator=lambda rows: rows)
    drawn = [row["input_ids"].item() for batch in trainer.get_train_dataloader() for row in batch]
    assert drawn == order, f"{where} no longer feeds the training dataloader"
    trainer.use_fixed = False
    stock = [row["input_ids"].item() for batch in trainer.get_train_dataloader() for row in batch]
    assert sorted(stock) == list(range(8))


def test_zero3_init_disabled_turns_off_zero3_loading_and_restores_it():
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    where = _installed("transformers")
    with parallel.zero3_init_disabled():  # no config: nothing to do
        assert not is_deepspeed_zero3_enabled()
    config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        assert is_deepspeed_zero3_enabled(), f"{where}: a live HfDeepSpeedConfig no longer enables ZeRO-3 loading"
        with parallel.zero3_init_disabled():
            assert not is_deepspeed_zero3_enabled(), f"{where}: unset_hf_deepspeed_config no longer disables it"
        assert is_deepspeed_zero3_enabled(), f"{where}: set_hf_deepspeed_config did not restore the config"
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del config


def test_extension_build_lock_is_where_torch_builds(tmp_path, monkeypatch):
    from torch.utils.file_baton import FileBaton

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = hf_compat.extension_build_lock("some_op")
    assert lock == tmp_path / "some_op" / "lock"
    hf_compat.check_extension_build_lock("some_op")  # no lock: nothing to say
    baton = FileBaton(str(lock))  # what torch's extension builder holds while it builds
    assert baton.try_acquire()
    hf_compat.check_extension_build_lock("some_op")  # a build in progress is not stale
    old = time.time() - 2 * hf_compat.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with pytest.raises(hf_compat.StaleBuildLockError, match=f"{lock} has been there for 30 minutes"):
        hf_compat.check_extension_build_lock("some_op")
    baton.release()
    hf_compat.check_extension_build_lock("some_op")


def test_deepspeed_shm_buffer_name_is_the_one_deepspeed_creates(monkeypatch):
    pytest.importorskip("deepspeed")
    import deepspeed

    source = (Path(deepspeed.__file__).parent / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp").read_text()
    # shm.cpp: prefix "<SHM_BUFFER_NAME>_<uid>_<MASTER_ADDR>_<MASTER_PORT>", then "<prefix>_<rank>" per rank
    assert '#define SHM_BUFFER_NAME "deepspeed_allreduce_buffer"' in source
    assert re.search(r'"%s_%d_%s_%s",\s*SHM_BUFFER_NAME,\s*getuid\(\),\s*addr_string,\s*port_string\)', source)
    assert 'snprintf(shm_name, NAME_BUF_SIZE, "%s_%d", shm_name_prefix, rank);' in source
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert hf_compat.deepspeed_shm_buffer() is None
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.setenv("RANK", "1")
    assert hf_compat.deepspeed_shm_buffer() == Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29512_1")



def test_dynamo_recompile_limit_patches_the_installed_torch():
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    with hf_compat.dynamo_recompile_limit(before + 37):
        assert getattr(config, name) == before + 37, _installed("torch")
    assert getattr(config, name) == before


def test_cpu_has_native_bf16_asks_the_installed_torch(monkeypatch):
    import torch

    assert hf_compat.cpu_has_native_bf16() == (torch.cpu._is_amx_tile_supported()
                                               or torch.cpu._is_avx512_bf16_supported())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert hf_compat.cpu_has_native_bf16() is False
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    with pytest.raises(RuntimeError, match="torch .*_is_avx512_bf16_supported"):
        hf_compat.cpu_has_native_bf16()
