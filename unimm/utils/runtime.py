"""The one place that decides where a program runs: device, dtype, mixed precision and the process group.

Nothing here runs at import or while a config is parsed; programs call it once their configs are parsed.

    init_distributed(backend=None, deepspeed=False) -> PartialState
        Configure `accelerate`'s process state for this process (idempotent: it is a borg). Under a launcher
        (`deepspeed`, `torchrun`, `accelerate launch`) on a machine without CUDA the ranks join one gloo group;
        accelerate alone would treat every rank as its own single-process job there. With CUDA accelerate picks
        its usual backend (NCCL) unless `backend` names one. `deepspeed=True` makes it a DeepSpeed state (also
        initialises DeepSpeed's communication layer), as the Trainer needs for `--deepspeed` runs. On CPU it first
        refuses a torch build lock left by a killed DeepSpeed op build (the launch would wait on it forever) and
        arranges for this rank's shared-memory all-reduce buffer to be removed at exit.
    make_accelerator(mixed_precision="no") -> Accelerator
        `init_distributed()` then an `Accelerator` on the same state (CPU-only machines: gloo ranks).
    prepare_training_arguments(args) -> args
        Finish an LLM program's `TrainingArguments` (`unimm.train.args.UniMMTrainingArguments` defers the device
        setup that transformers does in `__post_init__`, which starts the process group): CPU launches get their
        gloo state first and the Trainer reuses it (`use_configured_state`).
    resolve_device(name="auto") -> torch.device       cuda when available for "auto", else the named device.
    resolve_dtype(bf16=False, fp16=False, name="auto") -> torch.dtype
        Weight dtype: "auto" follows the mixed-precision switches (bf16 > fp16 > float32); else the named dtype.
    inference_dtype(name, device) -> torch.dtype      "auto": bfloat16 on GPU, float32 on CPU.
    resolve_mixed_precision(choice) -> "no" | "fp16" | "bf16"
        accelerate's mixed-precision name; "auto" is bf16 where CUDA supports it, else "no".
    set_cpu_matmul_precision(precision) -> "ieee" | "bf16"
        How float32 matrix products run on CPU (oneDNN): "ieee" exactly, or "bf16" (inputs rounded to bfloat16,
        products summed in float32: the CPU counterpart of TF32 on GPUs, several times faster on CPUs with AMX or
        AVX512-BF16). Returns what was set: a CPU without native bfloat16 keeps "ieee", with a warning.
    cpu_matmul_precision(precision)                   context manager: that precision inside, the previous after
        (the LLM trainers run a training run inside it).
    is_launched() -> bool                             started by a multi-process launcher (LOCAL_RANK is set).
    is_main_process() -> bool                         rank 0, or no process group (`unimm.utils.distributed`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from unimm.utils.distributed import is_main_process

__all__ = [
    "DTYPES",
    "inference_dtype",
    "init_distributed",
    "is_launched",
    "is_main_process",
    "make_accelerator",
    "prepare_training_arguments",
    "resolve_device",
    "resolve_dtype",
    "resolve_mixed_precision",
    "check_cpu_matmul_precision",
    "cpu_matmul_precision",
    "set_cpu_matmul_precision",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED_PRECISION = ("no", "fp16", "bf16")
CPU_MATMUL_PRECISIONS = ("ieee", "bf16")


def is_launched() -> bool:
    return int(os.environ.get("LOCAL_RANK", -1)) != -1


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(bf16: bool = False, fp16: bool = False, name: str = "auto") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    return resolve_dtype(bf16=device.type == "cuda", name=name)


def resolve_mixed_precision(choice: str) -> str:
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if choice not in MIXED_PRECISION:
        raise ValueError(f"mixed precision must be 'auto' or one of {list(MIXED_PRECISION)}, got {choice!r}")
    return choice


@contextlib.contextmanager
def _deepspeed_env(deepspeed: bool) -> Iterator[None]:
    """accelerate reads ACCELERATE_USE_DEEPSPEED when its state is first built; set only for that moment."""
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


def init_distributed(backend: str | None = None, deepspeed: bool = False) -> Any:
    """accelerate's `PartialState` for this process, configured once (see the module docstring)."""
    from accelerate import PartialState

    if torch.cuda.is_available():
        kwargs: dict[str, Any] = {"backend": backend} if backend else {}
    else:
        # cpu=True is what makes accelerate treat plain (non-DeepSpeed) gloo ranks as one MULTI_CPU job. A backend is
        # named only for a launch: with one plain process accelerate would otherwise expect a process group.
        kwargs = {"cpu": not deepspeed}
        if backend or is_launched():
            kwargs["backend"] = backend or "gloo"
        if deepspeed:
            _prepare_deepspeed_cpu_comm()
    with _deepspeed_env(deepspeed):
        return PartialState(**kwargs)


def _prepare_deepspeed_cpu_comm() -> None:
    """DeepSpeed builds and maps its shared-memory all-reduce on CPU launches (`unimm.utils.hf_compat`): fail with
    the file's name where a killed build left its lock (the launch would hang), and unlink this rank's 66 MB buffer
    at exit (deepspeed leaves it in /dev/shm)."""
    from unimm.utils.hf_compat import check_extension_build_lock, release_deepspeed_shm_buffer_at_exit

    check_extension_build_lock()
    release_deepspeed_shm_buffer_at_exit()


def make_accelerator(mixed_precision: str = "no", **kwargs: Any) -> Any:
    from accelerate import Accelerator

    init_distributed()
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=not torch.cuda.is_available(),
                       **kwargs)


def prepare_training_arguments(args: Any) -> Any:
    """Set up the process state an LLM program's parsed `UniMMTrainingArguments` need, then let transformers
    finish them (`args.finalize()`: its device setup). Returns `args`."""
    if not torch.cuda.is_available() and is_launched():
        init_distributed(deepspeed=bool(args.deepspeed))
        config = args.accelerator_config
        if config is None:
            args.accelerator_config = {"use_configured_state": True}
        elif isinstance(config, dict):
            args.accelerator_config = {**config, "use_configured_state": True}
    args.finalize()
    return args


def check_cpu_matmul_precision(precision: str) -> None:
    """Refuse a `cpu_matmul_precision` other than ieee or bf16, naming the key (parse time and run time alike)."""
    if precision not in CPU_MATMUL_PRECISIONS:
        raise ValueError(f"cpu_matmul_precision must be one of {CPU_MATMUL_PRECISIONS}, got {precision!r}")


def set_cpu_matmul_precision(precision: str) -> str:
    """Make float32 matrix products on CPU exact ("ieee") or take bfloat16 inputs with float32 sums ("bf16");
    returns the precision set. It applies to every CPU matmul of this process (linear layers, bmm, and the
    attention kernels that call them), not to CUDA (`--tf32` is its GPU counterpart)."""
    check_cpu_matmul_precision(precision)
    from unimm.utils.hf_compat import cpu_has_native_bf16

    if precision == "bf16" and not cpu_has_native_bf16():
        import warnings

        warnings.warn("cpu_matmul_precision bf16: this CPU has neither AMX nor AVX512-BF16, so bfloat16 products "
                      "would be emulated (slower than float32); keeping ieee", stacklevel=2)
        precision = "ieee"
    torch.backends.mkldnn.matmul.fp32_precision = precision
    return precision


@contextlib.contextmanager
def cpu_matmul_precision(precision: str) -> Iterator[str]:
    """`set_cpu_matmul_precision` for the block (yields the precision set); the process's previous one after."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        yield set_cpu_matmul_precision(precision)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
