"""The one parallelism seam: everything that depends on how training spreads a model over ranks lives here.

UniMM trains with one of these engines (`engine(args)` names it):

    none             one process;
    ddp              `torchrun` without an engine config: every rank holds the whole model (DistributedDataParallel);
    deepspeed-zero2  `--deepspeed configs/deepspeed/zero2.json`: optimizer state and gradients sharded;
    deepspeed-zero3  `--deepspeed configs/deepspeed/zero3.json`: parameters sharded too (`deepspeed.zero.Init`);
    fsdp2            `--fsdp --fsdp_config configs/fsdp/fsdp2.json`: torch's `fully_shard`, parameters are DTensors.

Under ZeRO-3 and FSDP2 a parameter may hold only this rank's shard. Code outside this module never looks at
DeepSpeed's or FSDP's internals; it asks here:

    is_partitioned(tensor) -> bool            this rank holds only a shard of it (ZeRO-3 `ds_id`, or a DTensor)
    full_shape(tensor) -> tuple               the whole tensor's shape (ZeRO-3 keeps it in `ds_shape`)
    gathered(params, modifier_rank=None)      context in which ZeRO-3 parameters are whole (a no-op otherwise);
                                              with `modifier_rank` that rank's writes are kept on exit
    full_state_dict(module) -> dict | None    `module.state_dict()` whole, on CPU, gathered one tensor at a time;
                                              every rank calls it, rank 0 gets the dict (others None); tied
                                              weights stay one tensor
    zero3_enabled() -> bool                   a ZeRO-3 config is live (`from_pretrained` then partitions)
    zero3_init_disabled()                     context: `from_pretrained` loads whole even under a ZeRO-3 config
    engine(args=None) -> str                  one of ENGINES, from `TrainingArguments` (or the live state);
                                              PARTITIONING_ENGINES shard the parameters (ZeRO-3, FSDP2)
    prepare_fsdp_arguments(args, model)       fill the FSDP2 plugin arguments from `fsdp_config` and the model
    enable_fsdp_on_cpu(accelerator, args)     let accelerate run FSDP2 on CPU (gloo) ranks; see below

`unimm/tokenizer/` and `unimm/llm/` reach DeepSpeed and FSDP only through this module, never importing `deepspeed`
or `torch.distributed.fsdp` themselves (tests/train/test_fsdp2_seam.py scans their source); both are imported lazily
here, when a tensor or a config asks for them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINES",
    "PARTITIONING_ENGINES",
    "enable_fsdp_on_cpu",
    "engine",
    "full_shape",
    "full_state_dict",
    "gathered",
    "is_partitioned",
    "prepare_fsdp_arguments",
    "zero3_enabled",
    "zero3_init_disabled",
]

ENGINES = ("none", "ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp2")
# The engines that shard the parameters themselves: a rank sees only a shard of each table, so per-row gradient hooks
# and in-place edits of a wrapped model do not apply there.
PARTITIONING_ENGINES = ("deepspeed-zero3", "fsdp2")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# -- partitioned tensors ------------------------------------------------------------------------------------------
def _is_zero3(tensor: Any) -> bool:
    return hasattr(tensor, "ds_id")


def _is_dtensor(tensor: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(tensor, DTensor)


def is_partitioned(tensor: Any) -> bool:
    """Whether this rank holds only a shard of `tensor` (a ZeRO-3 parameter, or an FSDP2 DTensor)."""
    return _is_zero3(tensor) or _is_dtensor(tensor)


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor (a ZeRO-3 parameter is empty on every rank outside a gather)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    """A context in which the ZeRO-3 partitioned `params` are whole on every rank (`deepspeed.zero.
    GatheredParameters`); with `modifier_rank`, that rank's in-place writes are re-partitioned on exit. Plain
    parameters need nothing. FSDP2 parameters cannot be gathered in place (they are DTensors): read them with
    `full_state_dict`, and edit a model before `fully_shard` wraps it (the Trainer does so in `train()`)."""
    params = list(params)
    if any(_is_dtensor(p) for p in params):
        raise ValueError("FSDP2 parameters (DTensors) cannot be gathered in place; read them with "
                         "unimm.utils.parallel.full_state_dict, or edit the model before it is wrapped")
    if any(_is_zero3(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def _whole(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """`tensor` whole on CPU (collective for partitioned tensors: every rank calls it); None where not `keep`."""
    if _is_dtensor(tensor):
        full = tensor.full_tensor()
        return full.detach().cpu().clone() if keep else None
    with gathered([tensor]):
        return tensor.detach().cpu().clone() if keep else None


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """`module.state_dict()` with every partitioned tensor gathered one at a time (the whole model never sits
    gathered on a device), copied to CPU. Every rank must call it; global rank 0 gets the tensors, the others None.
    Tied weights stay one tensor, so `save_pretrained` recognises them."""
    from unimm.utils.distributed import is_main_process

    main = is_main_process()
    state: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor | None] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in copies:
            copies[id(tensor)] = _whole(tensor, main)
        if main:
            state[name] = copies[id(tensor)]
    return state if main else None


# -- ZeRO-3 loading ----------------------------------------------------------------------------------------------
def zero3_enabled() -> bool:
    """A ZeRO-3 DeepSpeed config is live (the Trainer's, from `--deepspeed` with stage 3): `from_pretrained` then
    builds models under `deepspeed.zero.Init`, partitioned."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


# While a ZeRO-3 `HfDeepSpeedConfig` is alive, `from_pretrained` builds every model under `deepspeed.zero.Init`,
# partitioning its weights across ranks. A frozen encoder that runs outside the DeepSpeed engine (a vision tower, the
# visual tokenizer) must be loaded whole. transformers offers `unset_hf_deepspeed_config` but no way to read the
# config object back, only the private weak reference `_hf_deepspeed_config_weak_ref` (transformers 4.28 through
# 5.25; checked by tests/utils/test_hf_compat.py).
@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Inside, `from_pretrained` loads models whole even when a ZeRO-3 config is active; restored on exit."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from unimm.utils.hf_compat import upstream_error

    if not hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref") or not hasattr(hf_deepspeed,
                                                                                "set_hf_deepspeed_config"):
        raise upstream_error("transformers", "transformers.integrations.deepspeed has no _hf_deepspeed_config_weak_ref "
                                             "/ set_hf_deepspeed_config")
    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


# -- engine detection --------------------------------------------------------------------------------------------
def _deepspeed_stage(config: Any) -> int:
    import json
    from pathlib import Path

    if isinstance(config, str):
        config = json.loads(Path(config).read_text())
    stage = (config or {}).get("zero_optimization", {}).get("stage", 0)
    return int(stage)


def engine(args: Any = None) -> str:
    """The engine a run trains with (one of `ENGINES`): read from the `TrainingArguments` `args` (`deepspeed`,
    `fsdp`), else from the live state (a ZeRO-3 config, accelerate's distributed type, the process group)."""
    from unimm.utils.distributed import get_world_size

    if args is not None:
        if getattr(args, "deepspeed", None):
            return "deepspeed-zero3" if _deepspeed_stage(args.deepspeed) == 3 else "deepspeed-zero2"
        if getattr(args, "fsdp", None):
            version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2)) if isinstance(
                getattr(args, "fsdp_config", None), dict) else 2
            if version != 2:
                raise ValueError(f"fsdp_config asks for FSDP version {version}; UniMM trains with FSDP2 "
                                 f"(\"fsdp_version\": 2, configs/fsdp/fsdp2.json)")
            return "fsdp2"
    else:
        if zero3_enabled():
            return "deepspeed-zero3"
        state = _accelerate_state()
        if state is not None:
            kind = str(getattr(state, "distributed_type", ""))
            if kind.endswith("DEEPSPEED"):
                return "deepspeed-zero3" if state.deepspeed_plugin.zero_stage == 3 else "deepspeed-zero2"
            if kind.endswith("FSDP"):
                return "fsdp2"
    return "ddp" if get_world_size() > 1 else "none"


def _accelerate_state() -> Any:
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    return AcceleratorState() if state else None


# -- FSDP2 through the HF Trainer / accelerate ----------------------------------------------------------------------
def prepare_fsdp_arguments(args: Any, model: nn.Module) -> None:
    """Complete `args.fsdp_plugin_args` (what the Trainer hands accelerate's `FullyShardedDataParallelPlugin`) for
    `model`, before the Trainer is built:

    - `transformer_layer_cls_to_wrap` absent from `fsdp_config`: every class in the model's `_no_split_modules`
      (UniMM's depth-head blocks and the wrapped LLM's decoder layers, e.g. `Qwen2DecoderLayer`) becomes its own
      FSDP unit, so one config file fits every LLM family;
    - `mixed_precision_policy` in `fsdp_config` (`{"param_dtype": "bfloat16", "reduce_dtype": "float32"}`): the
      parameters are all-gathered and computed in `param_dtype`, gradients reduced in `reduce_dtype`, and the
      optimizer updates the sharded float32 master weights. Without it `--bf16` (`--fp16`) computes in bfloat16
      (float16) and reduces in float32 (accelerate alone would reduce in the compute dtype)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args is None:
        return
    config = args.fsdp_config or {}
    if plugin_args.get("auto_wrap_policy") == "TRANSFORMER_BASED_WRAP" and not config.get(
            "transformer_layer_cls_to_wrap"):
        names = _no_split_modules(model)
        if names:
            plugin_args["transformer_cls_names_to_wrap"] = ",".join(names)
            logger.info("FSDP2 wraps each %s in its own unit", ", ".join(names))
    policy = config.get("mixed_precision_policy")
    if policy is None and (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
        policy = {"param_dtype": "bfloat16" if args.bf16 else "float16", "reduce_dtype": "float32"}
    if policy is not None:
        if not isinstance(policy, dict) or set(policy) != {"param_dtype", "reduce_dtype"}:
            raise ValueError(f"fsdp_config mixed_precision_policy must be {{\"param_dtype\": ..., \"reduce_dtype\": "
                             f"...}}, got {policy!r}")
        unknown = [v for v in policy.values() if v not in _DTYPES]
        if unknown:
            raise ValueError(f"fsdp_config mixed_precision_policy: unknown dtype(s) {unknown}; use one of "
                             f"{sorted(_DTYPES)}")
        plugin_args["mixed_precision_policy"] = {k: _DTYPES[v] for k, v in policy.items()}


def _no_split_modules(model: nn.Module) -> list[str]:
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    present = {type(m).__name__ for m in model.modules()}
    return [name for name in names if name in present]


# accelerate (1.16) enables FSDP only for accelerator device ranks: `AcceleratorState.__init__` switches
# `distributed_type` to FSDP inside its MULTI_GPU / MULTI_XPU / ... branch, and a MULTI_CPU state (gloo ranks) keeps
# the plugin out, so the Trainer would train plain DDP. torch's `fully_shard` itself runs on CPU with gloo. On a CPU
# launch this puts the plugin into the (shared) state once the Trainer's Accelerator exists, as accelerate would
# have on GPUs; everything after (wrapping, sharded checkpoints, resume) is accelerate's own FSDP2 path.
def enable_fsdp_on_cpu(accelerator: Any, args: Any) -> bool:
    """On a multi-process CPU launch with `--fsdp`: make `accelerator`'s state an FSDP2 one (see the comment
    above). Returns whether it did; a no-op where accelerate already chose FSDP or no FSDP was asked for."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = getattr(args, "fsdp_plugin_args", None)
    state = accelerator.state
    if plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    if not hasattr(state, "_shared_state") or "distributed_type" not in state._shared_state:
        from unimm.utils.hf_compat import upstream_error

        raise upstream_error("accelerate", "AcceleratorState keeps no shared distributed_type")
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no" and plugin.mixed_precision_policy is None:
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    from accelerate.state import PartialState

    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True
