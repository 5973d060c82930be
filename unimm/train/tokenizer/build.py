"""The tokenizer trainer's model, optimisers and schedules, built from its configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unimm.tokenizer.losses import ReconstructionLoss, ReconstructionLossConfig
from unimm.tokenizer.param_groups import split_weight_decay
from unimm.train.ema import EMA
from unimm.train.schedule import warmup_cosine_schedule
from unimm.train.tokenizer.args import TokenizerModelArguments, TokenizerTrainingArguments
from unimm.utils.errors import model_folder


def build_tokenizer_model(args: TokenizerModelArguments) -> nn.Module:
    """Build (preset) or load (model_path) the tokenizer and put it in the requested training stage."""
    from unimm.tokenizer import build_tokenizer, load_tokenizer

    overrides = dict(args.model_overrides or {})
    if args.model_path:
        with model_folder("model_path", args.model_path, "a UniMM visual tokenizer"):
            model = load_tokenizer(args.model_path, **overrides)
    elif args.preset:
        if args.encoder_path:
            overrides["encoder_path"] = args.encoder_path
        model = build_tokenizer(args.preset, **overrides)
    else:
        raise ValueError("set either preset (e.g. vqrae-tiny) or model_path (a saved tokenizer)")
    model.set_stage(args.stage)  # a tokenizer without stages accepts only 1
    if model.train_encoder:
        # Take the frozen teacher from the initial encoder now, before any update (or from teacher_path: a stage
        # that continues from a saved tokenizer keeps the pretrained encoder's targets).
        model.set_train_encoder(True, teacher_encoder=_load_teacher(args.teacher_path))
    elif args.teacher_path:
        raise ValueError("teacher_path is set but the tokenizer does not train its encoder with a teacher "
                         "(a DualToken with train_encoder: true)")
    if args.decoder_only:
        model.set_decoder_only(True)
    return model


def _load_teacher(path: str | None) -> nn.Module | None:
    if not path:
        return None
    from unimm.tokenizer.encoders import load_encoder

    # Building the encoder before its weights load draws random numbers: keep the training's RNG where it was.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())), model_folder(
        "teacher_path", path, "a Hugging Face vision encoder"
    ):
        return load_encoder(path)


def trainable_groups(model: nn.Module, args: TokenizerTrainingArguments) -> list[dict[str, Any]]:
    """AdamW groups: encoder at its own LR, the rest at the main LR; weight decay only where
    `unimm.tokenizer.param_groups` allows it (not on vectors, SimVQ's W or positional tables)."""
    named = model.parameter_groups()
    if args.encoder_learning_rate <= 0:
        for param in named["encoder"]:
            param.requires_grad_(False)
    groups = []
    for name, lr in (("encoder", args.encoder_learning_rate), ("other", args.learning_rate)):
        params = [p for p in named[name] if p.requires_grad]
        decay, no_decay = split_weight_decay(model, params)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": args.weight_decay, "name": f"{name}/decay"})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}/no_decay"})
    if not groups:
        raise ValueError("no trainable parameters: check stage / decoder_only / encoder_learning_rate")
    return groups


@dataclass
class Optimisation:
    """The generator's AdamW + schedule, its EMA, and the discriminator's AdamW + schedule (None without a GAN)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[nn.Parameter]
    ema: EMA | None
    disc_optimizer: torch.optim.Optimizer | None
    disc_scheduler: Any


def build_optimisation(
    model: nn.Module, loss_module: ReconstructionLoss, loss_args: ReconstructionLossConfig,
    args: TokenizerTrainingArguments,
) -> Optimisation:
    param_groups = trainable_groups(model, args)
    optimizer = torch.optim.AdamW(param_groups, betas=(args.adam_beta1, args.adam_beta2))
    scheduler = warmup_cosine_schedule(optimizer, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    trainable = [p for group in param_groups for p in group["params"]]
    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
    disc_optimizer = disc_scheduler = None
    if loss_module.discriminator is not None:
        disc_optimizer = torch.optim.AdamW(
            loss_module.discriminator.parameters(), lr=args.disc_learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), weight_decay=0.0,
        )
        disc_scheduler = warmup_cosine_schedule(
            disc_optimizer,
            args.warmup_steps if args.disc_warmup_steps is None else args.disc_warmup_steps,
            args.max_steps,
            args.min_lr_ratio if args.disc_min_lr_ratio is None else args.disc_min_lr_ratio,
            start_step=loss_args.gan_start_step,
        )
    return Optimisation(optimizer, scheduler, trainable, ema, disc_optimizer, disc_scheduler)
