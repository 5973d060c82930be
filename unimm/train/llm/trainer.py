"""`UniMMTrainer`: the Hugging Face `Trainer` for UniMM models, adding what the generic one does not log.

At every logging step it reports, averaged over the steps since the last log and over all ranks:
`text_loss` and `visual_loss/<group>` (the parts of the UniMM loss), `tokens_per_second` (non-padding
tokens processed by all ranks, wall clock) and `mfu` (model FLOPs utilisation of the LLM, see
`unimm.train.llm.mfu`). Checkpoints follow the project's completeness rule (`unimm.train.checkpoint`): the stock
`Trainer` writes `checkpoint-<step>`, then `CompleteCheckpointCallback` (once every rank has finished) adds its
`COMPLETE` marker and only then prunes old checkpoints; auto-resume takes the newest complete one. With
`group_by_modality_length` every device batch holds one task of similar lengths (`GroupedBatchSampler`, through
the sampler seam of `unimm.utils.hf_compat`). Everything else (DeepSpeed, resume itself, gradient accumulation) is
the stock `Trainer`.
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from unimm.train.checkpoint import (
    is_complete,
    latest_checkpoint,
    mark_complete,
    prune_checkpoints,
    resolve_resume,
    verify_checkpoint_files,
)
from unimm.train.guards import (
    DivergenceError,
    RunLock,
    StopOnSignal,
    check_resume_fingerprint,
    check_weights_before_save,
    holds_on_every_rank,
    rank0_decides,
    run_fingerprint,
    write_fingerprint,
)
from unimm.train.llm.mfu import LLMShape, flops_per_token, mfu, resolve_peak_flops
from unimm.train.llm.streaming import SaveDataStateCallback, StreamingTrainerMixin
from unimm.utils.distributed import all_reduce_sum, get_rank, get_world_size, is_main_process
from unimm.utils.hf_compat import TrainSamplerOverride
from unimm.utils.parallel import enable_fsdp_on_cpu, engine, full_state_dict, prepare_fsdp_arguments
from unimm.utils.runtime import cpu_matmul_precision, resolve_dtype

logger = logging.getLogger(__name__)


class CompleteCheckpointCallback(TrainerCallback):
    """Marks each checkpoint `COMPLETE` once every rank has written its part, then prunes to `keep_last`.

    The stock rotation (`save_total_limit`) must be off (`run_training` moves it here): it runs inside the save,
    before the marker could exist, and could delete the last complete checkpoint while the new one is still
    incomplete. A kill at any point of a save therefore leaves the previous complete checkpoint in place."""

    def __init__(self, keep_last: int | None = None, fingerprint: dict | None = None) -> None:
        self.keep_last = keep_last
        self.fingerprint = fingerprint

    def on_step_end(self, args, state, control, **kwargs):
        """Before a save (the Trainer saves right after this hook), clear a leftover folder of the same step, left
        incomplete by a save that was interrupted before the resume, so that no stale file survives in it."""
        from unimm.utils.distributed import barrier

        if not control.should_save:
            return control
        model = kwargs.get("model")
        if model is not None:  # never a checkpoint of non-finite weights (it would prune the last finite one)
            check_weights_before_save(model, state.global_step, f"checkpoint-{state.global_step}")
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and path.exists() and not is_complete(path):
            logger.warning("removing %s, left incomplete by an interrupted save, before writing it again", path)
            shutil.rmtree(path)
        barrier()
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        if args.save_total_limit is not None:
            raise ValueError("CompleteCheckpointCallback prunes checkpoints itself: pass save_total_limit as "
                             "keep_last and set TrainingArguments.save_total_limit to None")
        return control

    def on_save(self, args, state, control, **kwargs):
        from unimm.utils.distributed import barrier

        barrier()  # every rank's model, optimizer shards and RNG state are on disk
        # Marked and pruned by the first process of every node: without a shared filesystem each node holds its own
        # ranks' shards, and judges completeness from its own marker (on a shared one the nodes write the same file).
        if args.should_save or args.local_process_index == 0:
            run_dir = Path(args.output_dir)
            if self.fingerprint is not None:
                write_fingerprint(run_dir / f"checkpoint-{state.global_step}", self.fingerprint)
            mark_complete(run_dir / f"checkpoint-{state.global_step}", state.global_step)
            best = state.best_model_checkpoint
            prune_checkpoints(run_dir, self.keep_last, protect=(best,) if best else ())
        barrier()
        return control


class UniMMTrainer(StreamingTrainerMixin, TrainSamplerOverride, Trainer):
    """`Trainer` that logs the loss parts, tokens/s and MFU, and groups batches by modality on request.

    `no_decay_param_names`: parameters excluded from weight decay in addition to the stock exclusions (the
    embedding tables whose original rows are frozen by a gradient mask must not decay either).
    `llm_shape`: the LLM's shape for the FLOPs estimate; read from `model.config` when omitted.
    `visual_tokenizer`: frozen tokenizer that turns batch `pixel_values` (images read on the fly) into
    `image_features` for the model's feature projector; batches from a code cache never need it.
    """

    def __init__(self, *args: Any, no_decay_param_names: set[str] | None = None, llm_shape: LLMShape | None = None,
                 visual_tokenizer: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.visual_tokenizer = visual_tokenizer
        self.no_decay_param_names = set(no_decay_param_names or ())
        self.llm_shape = llm_shape
        self._peak_flops: float | None = None
        self._reset_window()

    def create_accelerator_and_postprocess(self) -> None:
        """The stock accelerator; with `--fsdp` on CPU (gloo) ranks, made an FSDP2 one (accelerate enables FSDP on
        accelerator devices only; `unimm.utils.parallel.enable_fsdp_on_cpu`)."""
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    # ------------------------------------------------------------------ loss
    def _reset_window(self) -> None:
        self._part_sums: dict[str, float] = {}
        self._part_counts: dict[str, int] = {}
        self._window_tokens = 0
        self._window_rows = 0
        self._window_start: float | None = None

    def _record_parts(self, outputs: Any) -> None:
        parts: dict[str, torch.Tensor | None] = {"text_loss": getattr(outputs, "text_loss", None)}
        for group, value in (getattr(outputs, "visual_losses", None) or {}).items():
            parts[f"visual_loss/{group}"] = value
        for name, value in parts.items():
            if value is None:
                continue
            value = float(value.detach().float())  # a non-finite part stays: the log shows nan / inf, never 0
            self._part_sums[name] = self._part_sums.get(name, 0.0) + value
            self._part_counts[name] = self._part_counts.get(name, 0) + 1

    def _record_tokens(self, inputs: dict[str, Any]) -> None:
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self._window_tokens += int(mask.sum()) if mask is not None else input_ids.numel()
        self._window_rows += input_ids.shape[0] if mask is not None else _count_packed_samples(inputs)
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        if model.training:
            self._record_tokens(inputs)
        if "pixel_values" in inputs:
            inputs = self._encode_pixels(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._record_parts(outputs)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The stock step; a non-finite loss on any rank stops every rank before the optimizer applies it."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not holds_on_every_rank(bool(torch.isfinite(loss.detach()).all())):
            raise DivergenceError(f"training diverged at step {self.state.global_step + 1}: the loss is "
                                  f"{float(loss.detach().float())} on rank {get_rank()} (or another rank); no "
                                  f"checkpoint is written from it, the last complete one is kept (lower the learning "
                                  f"rate or resume from it)")
        return loss

    def _encode_pixels(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = dict(inputs)
        pixel_values = inputs.pop("pixel_values")
        if self.visual_tokenizer is None:
            raise ValueError(f"the batch has pixel_values (images read on the fly) but the trainer has no visual "
                             f"tokenizer to encode them; sample ids: {inputs.get('sample_ids')}")
        visual = self.visual_tokenizer
        param = next(visual.parameters())
        if param.device != pixel_values.device:
            visual.to(pixel_values.device)
        with torch.no_grad():
            features = visual.encode_features(pixel_values.to(param.dtype))  # [num_images, N, C]
        if inputs.get("image_features") is not None:
            raise ValueError("a batch cannot hold both pixel_values and image_features")
        inputs["image_features"] = features
        return inputs

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The Trainer calls `log` on every rank at the same step, so the all-reduces below are matched.
        if "loss" in logs and "eval_loss" not in logs:
            logs.update(self._window_metrics())
        super().log(logs, start_time)

    def _window_metrics(self) -> dict[str, float]:
        names = sorted(self._part_sums)
        device = self.args.device
        # Ranks may have seen different parts (a batch without images), so reduce a fixed, agreed key set.
        all_names = _gather_names(names, device)
        sums = torch.tensor([self._part_sums.get(n, 0.0) for n in all_names] + [0.0], dtype=torch.float64,
                            device=device)
        counts = torch.tensor([self._part_counts.get(n, 0) for n in all_names] + [0], dtype=torch.float64,
                              device=device)
        sums[-1] = self._window_tokens
        counts[-1] = self._window_rows
        all_reduce_sum(sums)
        all_reduce_sum(counts)
        metrics: dict[str, float] = {}
        for i, name in enumerate(all_names):
            if counts[i] > 0:
                metrics[name] = float(sums[i] / counts[i])
        tokens, rows = float(sums[-1]), float(counts[-1])
        if self._window_start is not None and tokens > 0:
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            tokens_per_second = tokens / elapsed
            metrics["tokens_per_second"] = tokens_per_second
            shape = self._get_llm_shape()
            if shape is not None:
                fpt = flops_per_token(shape, seq_len=max(int(tokens / max(rows, 1.0)), 1))
                metrics["mfu"] = mfu(tokens_per_second, fpt, self._get_peak_flops() * get_world_size())
        self._reset_window()
        return metrics

    def _get_llm_shape(self) -> LLMShape | None:
        if self.llm_shape is None:
            try:
                self.llm_shape = LLMShape.from_config(self.accelerator.unwrap_model(self.model).config)
            except AttributeError:
                logger.warning("cannot read the LLM shape from the model config; MFU is not logged")
                return None
        return self.llm_shape

    def _get_peak_flops(self) -> float:
        if self._peak_flops is None:
            dtype = resolve_dtype(self.args.bf16, self.args.fp16)
            self._peak_flops = resolve_peak_flops(self.args.peak_tflops if hasattr(self.args, "peak_tflops")
                                                  else None, self.args.device, dtype)
        return self._peak_flops

    # ------------------------------------------------------------------ sampling
    def train_sampler(self, dataset: Any) -> torch.utils.data.Sampler | None:
        if not getattr(self.args, "group_by_modality_length", False):
            return None
        return modality_length_sampler(dataset, self.args.per_device_train_batch_size, self.args.seed)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The stock optimizer; with `projector_learning_rate` the feature projector's parameters move into their
        own groups at that rate (LLaVA's `--mm_projector_lr`), before the scheduler records the groups' rates."""
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "projector_learning_rate", None)
        if lr is not None:
            opt_model = self.model if model is None else model
            names = {id(p): n for n, p in opt_model.named_parameters()}
            moved = split_param_groups(optimizer, lambda p: "feature_projector" in names.get(id(p), ""), lr=lr)
            if moved == 0:
                raise ValueError("projector_learning_rate is set but no trainable parameter belongs to the feature "
                                 "projector (train_projector false, or the model has none)")
            logger.info("feature projector: %d tensors at learning rate %g", moved, lr)
        return optimizer

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if not self.no_decay_param_names:
            return names
        return [n for n in names if not any(n == skip or n.endswith("." + skip) for skip in self.no_decay_param_names)]


def split_param_groups(optimizer: torch.optim.Optimizer, selected: Any, **overrides: Any) -> int:
    """Move the parameters for which `selected(param)` holds out of each param group into a copy of that group
    with `overrides` (e.g. its own `lr`), before any step. Returns how many parameters moved."""
    moved = 0
    new_groups = []
    for group in optimizer.param_groups:
        picked = [p for p in group["params"] if selected(p)]
        if not picked:
            continue
        group["params"] = [p for p in group["params"] if not selected(p)]
        new_groups.append({**group, "params": picked, **overrides})
        moved += len(picked)
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for group in new_groups:
        optimizer.add_param_group(group)
    return moved


class SaveProjectorCallback(TrainerCallback):
    """Writes the feature projector in LLaVA's `mm_projector.bin` layout into each checkpoint (every rank calls
    it: under ZeRO-3 the projector is gathered; rank 0 writes)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def on_save(self, args, state, control, **kwargs):
        from unimm.llm.projector import LLAVA_PROJECTOR_FILE, save_mm_projector

        save_mm_projector(self.model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / LLAVA_PROJECTOR_FILE)
        return control


def _count_packed_samples(inputs: dict[str, Any]) -> int:
    """Samples in a packed batch: each starts where position_ids restart at 0."""
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        return inputs["input_ids"].shape[0]
    return int((position_ids == 0).sum())


def _gather_names(names: list[str], device: torch.device) -> list[str]:
    """The union of loss-part names over ranks, in a deterministic order."""
    import torch.distributed as dist

    if get_world_size() == 1:
        return names
    gathered: list[list[str] | None] = [None] * get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted({n for part in gathered for n in (part or [])})


def modality_length_sampler(dataset: Any, batch_size: int, seed: int) -> torch.utils.data.Sampler:
    """`GroupedBatchSampler` over a task mixture: each run of `batch_size` indices has one task (`dataset.tasks`)
    and similar lengths. Lengths are the mixture's `length_hints()`, estimates from metadata (cache shapes, caption
    and turn byte counts): no sample is built at start-up, and every rank computes the same order."""
    from unimm.data.collator import GroupedBatchSampler

    if not hasattr(dataset, "length_hints"):
        raise ValueError("group_by_modality_length needs a task mixture (a dataset with tasks and length_hints())")
    return GroupedBatchSampler(dataset.tasks, dataset.length_hints(), batch_size, seed=seed)


# ---------------------------------------------------------------------------------------------- program body


def run_training(model_args, modules, data_args, training_args, lora_args=None) -> UniMMTrainer:
    """What `unimm-pretrain` and `unimm-finetune` run, once `training_args` are prepared
    (`unimm.utils.runtime.prepare_training_arguments`): build model + data, train (resuming from the given or
    latest checkpoint), save the final model (HF format; ZeRO-3 weights gathered; a LoRA run saves its adapter,
    merge it with unimm-merge-lora) and, with `save_mm_projector`, the projector alone in LLaVA's layout."""
    from transformers import set_seed

    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    lock = RunLock(output_dir)
    # One run per folder: taken before anything is read or written there (rank 0; every rank learns the outcome).
    rank0_decides(lambda: lock.acquire().path.name)
    try:
        with cpu_matmul_precision(training_args.cpu_matmul_precision) as precision:
            if precision != "ieee":
                logger.info("float32 matrix products on CPU from %s inputs (cpu_matmul_precision)", precision)
            return _train_locked(model_args, modules, data_args, training_args, lora_args, output_dir)
    finally:
        lock.release()


def _train_locked(model_args, modules, data_args, training_args, lora_args, output_dir: Path) -> UniMMTrainer:
    from unimm.llm.projector import LLAVA_PROJECTOR_FILE, save_mm_projector
    from unimm.train.llm.build import build_collator, build_model, build_train_dataset
    from unimm.utils.config import config_to_dict, save_resolved_config
    from unimm.utils.distributed import is_main_process

    # Decided first, so a bad resume_from_checkpoint or another run's checkpoint fails before any model or data work.
    resume = find_resume_checkpoint(training_args.resume_from_checkpoint, output_dir,
                                    getattr(training_args, "auto_resume", False))
    fingerprint = run_fingerprint(config_to_dict(model_args, modules, data_args, lora_args, training_args),
                                  get_world_size(), training_args.deepspeed)
    if resume is not None:
        allow = getattr(training_args, "allow_resume_config_change", False)
        rank0_decides(lambda: check_resume_fingerprint(resume, fingerprint, allow))
    if is_main_process():  # after the checks: a refused launch leaves the run's record alone
        save_resolved_config(output_dir, model_args, modules, data_args, lora_args, training_args)
        save_resolved_config(output_dir / "launches", model_args, modules, data_args, lora_args, training_args,
                             name=time.strftime("launch-%Y%m%d-%H%M%S.yaml", time.gmtime()))
    keep_last, training_args.save_total_limit = training_args.save_total_limit, None
    dtype = master_weight_dtype(training_args, model_args.dtype)
    check_engine_supports(engine(training_args), model_args, lora_args)
    built = build_model(model_args, modules, dtype=dtype, use_image_features=data_args.new_model_needs_projector,
                        seed=training_args.seed)
    model = built.model
    no_decay = set(built.row_masked_params)
    if lora_args is not None and lora_args.use_lora:
        from unimm.train.llm.lora import token_delta_names

        model = _wrap_lora(built, model_args, lora_args, output_dir, engine(training_args))
        no_decay = token_delta_names(model)  # the new rows: peft's parameters replace the row-masked tables
    _non_reentrant_checkpointing(training_args)
    train_dataset = build_train_dataset(data_args, built, seed=training_args.seed)
    logger.info("training on %s", f"{len(train_dataset)} samples per epoch" if hasattr(train_dataset, "__len__")
                else "a stream of samples")
    image_encoder = built.image_encoder if built.reads_pixels else None
    if image_encoder is None and built.visual_tokenizer is not None:
        # Every image comes from a code cache: the tokenizer has done its checks (codebook spec, identity, the
        # caches' hashes) and is not needed to train. Freed here, it costs no rank its copy (3.4 GB in float32 for
        # the paper DualToken, per process).
        built.visual_tokenizer = None
        gc.collect()
    check_master_weights(model, training_args, model_args.dtype)
    stop_on_signal = StopOnSignal(save=getattr(training_args, "save_on_signal", True))
    callbacks: list[TrainerCallback] = [stop_on_signal, SaveDataStateCallback(),  # data state before COMPLETE
                                        CompleteCheckpointCallback(keep_last, fingerprint)]
    if engine(training_args) == "fsdp2":
        callbacks.insert(0, SaveGatheredModelCallback())  # written before the checkpoint is marked complete
    if model_args.save_mm_projector:
        callbacks.insert(0, SaveProjectorCallback(built.model))  # written before the checkpoint is marked complete
    prepare_fsdp_arguments(training_args, model)
    trainer = UniMMTrainer(
        model=model, args=training_args, train_dataset=train_dataset,
        data_collator=build_collator(data_args, built.text_tokenizer), processing_class=built.text_tokenizer,
        no_decay_param_names=no_decay, visual_tokenizer=image_encoder,
        llm_shape=LLMShape.from_config(built.model.config), callbacks=callbacks,
    )
    stop_on_signal.install()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        stop_on_signal.uninstall()
    if getattr(training_args, "save_final_model", True):
        check_weights_before_save(trainer.model, trainer.state.global_step, "the final model")
        save_final_model(trainer, output_dir)
        trainer.save_state()
    if model_args.save_mm_projector:
        save_mm_projector(built.model, output_dir / LLAVA_PROJECTOR_FILE)
    return trainer


def check_engine_supports(run_engine: str, model_args, lora_args) -> None:
    """Refuse, before any model is built, what the engine cannot train: under FSDP2 the parameters are replaced by
    sharded DTensors when the model is wrapped, so the gradient hook that trains only the new token rows
    (train_llm=false with train_new_embeddings=true, no LoRA) would be dropped silently."""
    if run_engine != "fsdp2" or (lora_args is not None and lora_args.use_lora):
        return
    if model_args.train_new_embeddings and not model_args.train_llm:
        from unimm.utils.errors import UserError

        raise UserError("train_llm=false with train_new_embeddings=true (train only the new token rows) is not "
                        "supported under FSDP2; use DDP or configs/deepspeed/zero2.json, train_llm=true, or LoRA")


def master_weight_dtype(training_args, torch_dtype: str) -> torch.dtype:
    """The dtype the model is loaded in. DeepSpeed keeps float32 master weights of half-precision parameters in its
    optimizer, so there `auto` follows `--bf16`/`--fp16`. Without DeepSpeed (one process, DDP, FSDP2) the optimizer
    updates the parameters themselves (FSDP2: their float32 shards): `auto` loads float32 and `--bf16` computes under
    autocast (FSDP2: in bfloat16 copies of the gathered weights), so updates smaller than a bfloat16 step (2^-8 of
    the weight) are not rounded away."""
    dtype = resolve_dtype(training_args.bf16, training_args.fp16, torch_dtype)
    if torch_dtype == "auto" and not training_args.deepspeed and dtype != torch.float32:
        logger.info("%s without DeepSpeed: weights stay float32 (master weights), compute runs under %s autocast",
                    "--bf16" if training_args.bf16 else "--fp16", dtype)
        return torch.float32
    return dtype


def check_master_weights(model: nn.Module, training_args, torch_dtype: str) -> None:
    """Refuse to train half-precision parameters without a float32 master copy (no DeepSpeed): AdamW would round
    every small update away. A frozen half-precision base (LoRA) is fine; its trained adapters are float32."""
    if training_args.deepspeed:
        return
    half = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if half:
        from unimm.utils.errors import UserError

        raise UserError(f"dtype={torch_dtype} without DeepSpeed trains {'/'.join(half)} parameters with no "
                        f"float32 master copy (small updates round away): use --dtype auto or float32 (--bf16 "
                        f"then computes under autocast), or train with --deepspeed")


def _wrap_lora(built, model_args, lora_args, output_dir: Path, run_engine: str):
    from unimm.train.llm.lora import wrap_lora
    from unimm.utils.distributed import barrier, is_main_process

    model = built.model
    if model_args.model_path is None:
        # Adapter checkpoints must name a base model on disk: write the freshly extended one once.
        base_dir = output_dir / "base_model"
        if not (base_dir / "config.json").is_file():
            state_dict = full_state_dict(model)  # every rank: ZeRO-3 gathers collectively
            if is_main_process():
                model.save_pretrained(base_dir, state_dict=state_dict)
                built.text_tokenizer.save_pretrained(base_dir)
        barrier()
        model.name_or_path = str(base_dir.resolve())
    return wrap_lora(model, lora_args, model_args, engine=run_engine)


def save_final_model(trainer: UniMMTrainer, output_dir: Path) -> None:
    """The final model as an ordinary HF folder (loadable in one process by `from_pretrained`): the stock
    `save_model` (which gathers ZeRO-3 weights), except under FSDP2, whose stock save writes the sharded state
    (`pytorch_model_fsdp_0/`) with SHARDED_STATE_DICT: there `save_full_model` writes it."""
    if engine(trainer.args) != "fsdp2":
        trainer.save_model(str(output_dir))
        return
    save_full_model(trainer.model, output_dir, trainer.processing_class)
    if is_main_process():
        torch.save(trainer.args, output_dir / "training_args.bin")


def save_full_model(model: nn.Module, folder: Path, processing_class: Any = None) -> None:
    """`model` (FSDP2-sharded, or whole) as an HF folder: the weights gathered one tensor at a time, written by rank 0
    with `save_pretrained` (a LoRA model: its adapter and trained modules), beside the text tokenizer. Every rank
    calls it (the gather is collective)."""
    from unimm.utils.distributed import barrier

    model = getattr(model, "module", model)  # a wrapper's model (DDP); FSDP2 shards the module in place
    state_dict = full_state_dict(model)
    if is_main_process():
        model.save_pretrained(str(folder), state_dict=state_dict)
        if processing_class is not None:
            processing_class.save_pretrained(str(folder))
    barrier()


class SaveGatheredModelCallback(TrainerCallback):
    """Under FSDP2: writes the gathered model (HF format, as `save_final_model` does) into each checkpoint beside its
    shards, so that every checkpoint loads in one process (`from_pretrained`, a LoRA one with `unimm-merge-lora`)
    as DeepSpeed's and DDP's do; resuming reads the shards."""

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        save_full_model(model, Path(args.output_dir) / f"checkpoint-{state.global_step}", processing_class)
        return control


def _non_reentrant_checkpointing(training_args) -> None:
    """Non-reentrant activation checkpointing works with frozen embeddings and LoRA (no inputs that require grad
    needed). Newer transformers name the option activation_checkpointing (gradient_checkpointing is its alias)."""
    name = "activation_checkpointing" if hasattr(training_args, "activation_checkpointing") else "gradient_checkpointing"
    if getattr(training_args, name) and getattr(training_args, f"{name}_kwargs") is None:
        setattr(training_args, f"{name}_kwargs", {"use_reentrant": False})


def find_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path,
                           auto_resume: bool) -> str | None:
    """The checkpoint a run starts from: the given one (which must be complete), else with `auto_resume` the
    newest complete `checkpoint-*` in `output_dir` (warning about newer incomplete ones), else None.

    Global rank 0 decides, from its view of the filesystem, and every rank takes its decision: nodes without a shared
    filesystem (each writes checkpoints to its own disk) resume the same step. Each rank then finds that checkpoint
    under its own `output_dir` (the folder name rank 0 chose) and checks it is complete there, or stops with one line
    naming its missing copy."""
    from unimm.utils.distributed import is_main_process

    chosen = rank0_decides(lambda: _local_resume_choice(resume_from_checkpoint, output_dir, auto_resume))
    if chosen is None or is_main_process():
        return chosen
    given = Path(chosen)
    local = given if resume_from_checkpoint and given.is_absolute() and given.exists() else (
        Path(output_dir) / given.name)
    if not is_complete(local):
        from unimm.utils.errors import UserError

        raise UserError(f"rank {get_rank()}: rank 0 resumes from {given.name}, but this node's copy {local} is "
                        f"{'incomplete' if local.exists() else 'missing'}; without a shared filesystem every node "
                        f"must keep its own checkpoints under output_dir")
    return str(local)


def _local_resume_choice(resume_from_checkpoint: str | None, output_dir: str | Path,
                         auto_resume: bool) -> str | None:
    if resume_from_checkpoint:
        path = resolve_resume(resume_from_checkpoint, output_dir)
        return str(path) if path is not None else None
    if not auto_resume:
        return None
    latest = latest_checkpoint(output_dir)
    if latest is not None:
        verify_checkpoint_files(latest)
        logger.info("resuming from the latest complete checkpoint %s", latest)
    return str(latest) if latest is not None else None
