"""The one seam between UniMM and the internals of its upstream libraries (transformers, accelerate, deepspeed, peft).

Everything here is something upstream does not offer as public API, or has renamed between the releases UniMM
supports. Each entry names the versions that need it, and `tests/utils/test_hf_compat.py` checks every entry
against the installed release: when upstream changes one, that test fails naming the dependency and its version,
instead of a `TypeError` deep inside a training step. Code elsewhere in `unimm/` imports these names and never
reaches into an upstream private attribute itself.

Supported: transformers 5.23 (`past_key_values`) and 5.24+ (`cache`); the exact tested set is `requirements/lock.txt`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from unimm.utils.errors import UserError

__all__ = [
    "CACHE_NAME",
    "DEEPSPEED_SHM_OP",
    "CausalLMOutputWithCache",
    "StaleBuildLockError",
    "SubConfigSpec",
    "TrainSamplerOverride",
    "attn_implementation_of",
    "cache_kwargs",
    "check_extension_build_lock",
    "cpu_has_native_bf16",
    "deepspeed_shm_buffer",
    "extension_build_lock",
    "mark_weights_initialized",
    "output_cache",
    "pop_cache",
    "release_deepspeed_shm_buffer_at_exit",
    "upstream_error",
]

_CACHE_NAMES = ("cache", "past_key_values")


def upstream_error(package: str, what: str) -> RuntimeError:
    """The error raised when an installed dependency no longer matches what this module expects."""
    import importlib.metadata

    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    return RuntimeError(f"{package} {version}: {what}. UniMM was tested with the versions in requirements/lock.txt; "
                        f"install them (`bash scripts/test.sh` does by default) or update unimm/utils/hf_compat.py.")


# -- KV cache name -----------------------------------------------------------------------------------------------
# transformers <= 5.23 calls the KV cache `past_key_values` in model forwards and model outputs; 5.24 renamed both
# to `cache` (the old keyword is deprecated, to be removed in 5.40). UniMM accepts either keyword and passes the
# cache to the wrapped model under the installed release's name.
def _installed_cache_name() -> str:
    fields = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    for name in _CACHE_NAMES:
        if name in fields:
            return name
    raise upstream_error("transformers", f"BaseModelOutputWithPast has neither of the KV-cache fields {_CACHE_NAMES} "
                                         f"(fields: {sorted(fields)})")


CACHE_NAME: str = _installed_cache_name()


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the KV cache from a forward's `kwargs`, whichever name the caller used (`cache` or
    `past_key_values`), and return it (None when absent)."""
    given = {name: kwargs.pop(name) for name in _CACHE_NAMES if name in kwargs}
    present = {name: value for name, value in given.items() if value is not None}
    if len(present) > 1:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not both")
    return next(iter(present.values()), None)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the name the installed transformers' model forwards take."""
    return {CACHE_NAME: cache}


def output_cache(outputs: Any) -> Any:
    """The KV cache carried by a transformers model output (None when it has none)."""
    return getattr(outputs, CACHE_NAME, None)


# The public causal-LM output class, whose KV-cache field carries the installed release's name: UniMM's output
# subclasses it, so HF generation finds the cache where it looks (`outputs["cache"]` in 5.24,
# `outputs.past_key_values` in 5.23).
CausalLMOutputWithCache = CausalLMOutputWithPast


# -- composite configs -----------------------------------------------------------------------------------------
# transformers 5.x declares nested configs with `sub_configs_defaults = {name: SubConfigSpec(...)}`; the class lives
# in `transformers.configuration_utils` and is not exported at the top level (checked 5.23, 5.24).
try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError as error:  # pragma: no cover - exercised only by a breaking upstream release
    raise upstream_error("transformers", "transformers.configuration_utils.SubConfigSpec is gone") from error


# -- attention implementation ----------------------------------------------------------------------------------
# A loaded model's attention implementation is only exposed as the private `config._attn_implementation`
# (transformers 4.36 through 5.24).
def attn_implementation_of(config: transformers.PretrainedConfig) -> str | None:
    if not hasattr(config, "_attn_implementation"):
        raise upstream_error("transformers", f"{type(config).__name__} has no `_attn_implementation`")
    return config._attn_implementation


# -- weight initialisation -------------------------------------------------------------------------------------
# `PreTrainedModel.post_init()` initialises every module not flagged `_is_hf_initialized` (transformers 4.46 through
# 5.24: `_initialize_weights` skips flagged modules). A wrapper that adopts an already loaded model must flag it,
# or its own `post_init()` would re-initialise the loaded weights. There is no public switch for this.
def mark_weights_initialized(module: nn.Module) -> None:
    """Protect every weight of `module` (a loaded checkpoint) from the enclosing model's `post_init()`."""
    for sub in module.modules():
        sub._is_hf_initialized = True
    for tensor in list(module.parameters()) + list(module.buffers()):
        if isinstance(tensor, torch.Tensor):
            tensor._is_hf_initialized = True


# -- training sampler --------------------------------------------------------------------------------------------
# `Trainer` builds its training sampler in the private `_get_train_sampler(train_dataset=None)`, handed to its
# dataloader builder by `get_train_dataloader` (transformers 4.52 through 5.24); the public alternative,
# overriding `get_train_dataloader`, would mean rebuilding the DataLoader (workers, seeding, accelerate sharding).
# The sampler is per device: accelerate splits consecutive device batches over the ranks.
class TrainSamplerOverride:
    """Mixin for a `transformers.Trainer` subclass: `train_sampler(dataset)` returns the sampler to train with, or
    None for the stock one (random, or the Trainer's own `train_sampling_strategy`)."""

    def train_sampler(self, dataset: Any) -> torch.utils.data.Sampler | None:
        return None

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = self.train_sampler(dataset) if dataset is not None else None
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)


# torch.compile gives up on a function after `recompile_limit` graphs (torch 2.6+; `cache_size_limit` before) and
# runs it eagerly from then on. The static-cache decode step compiles one graph per cache length bucket and batch
# shape, more than the default 8 in one process; the limit lives in the private `torch._dynamo.config`.
def dynamo_recompile_limit(limit: int) -> contextlib.AbstractContextManager:
    """A context raising torch.compile's per-function graph limit to `limit`."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if not hasattr(config, name):
        raise upstream_error("torch", "torch._dynamo.config has neither recompile_limit nor cache_size_limit")
    return config.patch(**{name: limit})


# bfloat16 products in hardware on this CPU (AMX tiles or AVX512-BF16; oneDNN emulates them elsewhere, slower than
# float32): torch asks cpuinfo through the private `torch.cpu._is_amx_tile_supported` / `_is_avx512_bf16_supported`
# (torch 2.3 through 2.13); `cpu_matmul_precision bf16` only applies where they say yes.
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if not all(callable(probe) for probe in probes):
        raise upstream_error("torch", "torch.cpu has no _is_amx_tile_supported / _is_avx512_bf16_supported")
    return any(probe() for probe in probes)


# -- DeepSpeed's CPU communication op ------------------------------------------------------------------------------
# On a CPU launch every rank of deepspeed (0.14 through 0.19) builds its shared-memory all-reduce op
# (`deepspeed_shm_comm`) with torch's extension builder, then maps a shared buffer. Two leftovers of that which
# neither library cleans up:
# - torch guards a build with a bare lock file, `<build directory>/lock`, removed when the build ends. A rank killed
#   while it holds the lock (a launcher tearing its ranks down, a `kill -9` during the first build) leaves the file,
#   and every later launch on the machine then waits on it forever without a word. torch computes the build
#   directory in a private helper, `torch.utils.cpp_extension._get_build_directory` (torch 1.x through 2.13).
# - each rank creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` (66 MB of RAM,
#   named in deepspeed's csrc/cpu/comm/shm.cpp) and never unlinks it: launch after launch, memory fills up.
DEEPSPEED_SHM_OP = "deepspeed_shm_comm"
# The op builds in well under two minutes on two cores; a lock this old belongs to no running build.
STALE_LOCK_SECONDS = 15 * 60


class StaleBuildLockError(UserError, RuntimeError):
    """A torch extension build lock left by a killed process (see `check_extension_build_lock`)."""


def extension_build_lock(name: str = DEEPSPEED_SHM_OP) -> Path:
    """The lock file torch's extension builder holds while it builds the extension `name`."""
    from torch.utils import cpp_extension

    if not hasattr(cpp_extension, "_get_build_directory"):
        raise upstream_error("torch", "torch.utils.cpp_extension has no _get_build_directory")
    return Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"


def check_extension_build_lock(name: str = DEEPSPEED_SHM_OP, stale_after: float = STALE_LOCK_SECONDS) -> None:
    """Raise `StaleBuildLockError` naming the file when the build lock of `name` is older than `stale_after`
    seconds: the launch would otherwise wait on it forever."""
    lock = extension_build_lock(name)
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > stale_after:
        raise StaleBuildLockError(f"{lock} has been there for {age / 60:.0f} minutes: a build of the {name} op was killed "
                     f"before it finished, and every launch would wait on this lock forever. Remove the file (and, "
                     f"to rebuild from scratch, its folder) when no other build is running.")


def deepspeed_shm_buffer(rank: int | None = None) -> Path | None:
    """The shared-memory file deepspeed's CPU all-reduce creates for `rank` (default: this process's `RANK`) under
    the current launch's `MASTER_ADDR` / `MASTER_PORT`; None outside a launch."""
    if "MASTER_PORT" not in os.environ:
        return None
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    addr = os.environ.get("MASTER_ADDR", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{os.environ['MASTER_PORT']}_{rank}"


def release_deepspeed_shm_buffer_at_exit() -> None:
    """Unlink this rank's all-reduce buffer when the process exits (the other ranks have mapped it long before)."""
    import atexit

    buffer = deepspeed_shm_buffer()
    if buffer is not None:
        atexit.register(lambda: buffer.unlink(missing_ok=True))
