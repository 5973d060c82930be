"""VQRAE (docs/DESIGN.md §2.2): a pretrained vision foundation model as encoder, a linear map to a wide code space,
SimVQ, and a convolution-free ViT decoder symmetric to the encoder.

Stage 1 trains quantizer + decoder with the encoder frozen. Stage 2 unfreezes the encoder (at its own, lower
learning rate: see `parameter_groups`) and adds self-distillation `lambda_d * ||E(x) - E0(x)||^2` against a
frozen copy E0 of the encoder taken when stage 2 starts. Understanding uses the continuous encoder features
(`encode_features`); generation uses the codes.
"""

from __future__ import annotations

import torch
from torch import nn

from unimm.tokenizer.base import TokenizerOutput, VisualTokenizer, eval_mode
from unimm.tokenizer.configuration import DenoisingConfig, VQRAEConfig
from unimm.tokenizer.encoders import EncoderAccess
from unimm.tokenizer.losses import self_distillation_loss
from unimm.tokenizer.quantizers import SimVQ
from unimm.tokenizer.types import CodebookGroupSpec, CodebookSpec, VisualCodes


class VQRAE(VisualTokenizer):
    config_class = VQRAEConfig

    def __init__(self, config: VQRAEConfig):
        super().__init__(config)
        if config.code_dim < 1 or config.num_codes < 2:
            raise ValueError(
                f"VQRAE needs code_dim >= 1 and num_codes >= 2, got code_dim={config.code_dim}, "
                f"num_codes={config.num_codes}"
            )
        self.proj_in = nn.Linear(self.encoder_hidden_size, config.code_dim)
        self.quantizer = SimVQ(
            config.num_codes, config.code_dim, beta=config.quantizer_beta, beta_on=config.quantizer_beta_on
        )
        self._build_decoder_path(config.code_dim)
        self.stage = 1
        self.post_init()
        self.set_stage(1)

    # ----------------------------------------------------------------- stages
    def set_stage(self, stage: int, teacher_encoder: nn.Module | None = None) -> None:
        """1: encoder frozen, no teacher. 2: encoder trainable, frozen teacher copy, distillation loss.
        `teacher_encoder` (stage 2) sets the teacher explicitly, e.g. the stage-1 encoder when resuming."""
        if stage not in (1, 2):
            raise ValueError(f"VQRAE stage must be 1 or 2, got {stage}")
        self.stage = stage
        if stage == 1:
            self.drop_teacher()
        elif teacher_encoder is not None or self.teacher is None:
            self.init_teacher(teacher_encoder)
        if not self._decoder_only:
            self._apply_stage_freezing()
        self.train(self.training)

    def _apply_stage_freezing(self) -> None:
        self._set_encoder_requires_grad(self.stage == 2)

    def _unused_parameters(self) -> list[nn.Parameter]:
        # VQRAE uses patch features only; SigLIP's attention-pooling head gets no gradient.
        return super()._unused_parameters() + self._encoder_head_parameters()

    # ----------------------------------------------------------------- contract
    @property
    def codebook_spec(self) -> CodebookSpec:
        return {"semantic": CodebookGroupSpec(self.config.num_codes, 1, self.config.code_dim)}

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Continuous encoder features (patch tokens, post-norm) [B, N, C]: the understanding path."""
        self._check_pixels(pixel_values)
        return self._encoder_access.patch_features(pixel_values)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> VisualCodes:
        with eval_mode(self.quantizer):
            out = self.quantizer(self.proj_in(self.encode_features(pixel_values)))
        return {"semantic": out.indices.unsqueeze(-1)}  # [B, N, 1]

    def decode(self, codes: VisualCodes | torch.Tensor) -> torch.Tensor:
        """Codes {"semantic": [B, N, 1]} (or the bare tensor) -> pixel_values [B, 3, H, W]."""
        if isinstance(codes, torch.Tensor):
            codes = {"semantic": codes}
        self.check_codes(codes, ("semantic",))
        latent = self.quantizer.lookup(codes["semantic"][..., 0]).to(self.decoder.head.weight.dtype)
        with eval_mode(self.denoiser):
            return self._decode_latent(latent)

    def _check_denoising(self, denoising: DenoisingConfig) -> None:
        model_type = self._encoder_access.model_type
        if denoising.encoder_drop_masked and model_type not in (
            "siglip_vision_model",
            "dinov2",
            "dinov2_with_registers",
        ):
            raise ValueError(
                "denoising.encoder_drop_masked needs a SigLIP or DINOv2 encoder with fixed-size inputs; "
                f"encoder_config.model_type is {model_type!r}"
            )

    def _drops_masked_patches(self) -> bool:
        """l-DeTok's MAE-style masking: only when asked for, while corrupting, and with a trainable encoder."""
        cfg = self.denoiser.config
        return cfg.encoder_drop_masked and cfg.mask_ratio_max > 0 and self.denoiser.corrupting and self.stage == 2

    @staticmethod
    def _visible_patch_features(access: EncoderAccess, pixel_values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder features of the kept patches only ([B, Nv] positions): the others never enter the encoder."""
        hidden = access.embed(pixel_values)  # [B, prefix + N, C], position embeddings already added
        prefix = access.num_prefix_tokens
        patches = hidden[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        hidden = access.run_layers(torch.cat([hidden[:, :prefix], patches], dim=1), 0, access.num_layers)
        return access.finalize(hidden)[0]  # [B, Nv, C]

    def forward(self, pixel_values: torch.Tensor) -> TokenizerOutput:
        self._check_pixels(pixel_values)
        batch, positions = pixel_values.shape[0], self.num_positions
        mask = keep = None
        if self._drops_masked_patches():
            mask = self.denoiser.sample_mask(batch, positions, pixel_values.device)
            num_kept = positions - int(mask[0].sum())
            keep = (~mask).to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :num_kept]  # ascending
        with self._encoder_context():
            if keep is None:
                features = self.encode_features(pixel_values)
            else:
                features = self._visible_patch_features(self._encoder_access, pixel_values, keep)
        out = self.quantizer(self.proj_in(features))
        out = self._maybe_replace_codes(self.quantizer, out)
        indices = out.indices
        if keep is None:
            reconstruction = self._decode_latent(out.quantized)
        else:
            # Kept positions carry their codes, dropped ones the mask token; -1 marks dropped codes.
            latent = self.latent_norm(out.quantized)
            full = latent.new_zeros(batch, positions, latent.shape[-1])
            full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, latent.shape[-1]), latent)
            reconstruction = self.decoder(self.denoiser(full, mask=mask))
            indices = indices.new_full((batch, positions), -1).scatter(1, keep, indices)
        losses = {"quantizer": out.loss}
        if self.stage == 2 and self.training and self.config.distill_weight > 0 and not self._decoder_only:
            with torch.no_grad():
                teacher = EncoderAccess(self.teacher)
                if keep is None:
                    teacher_features = teacher.patch_features(pixel_values)
                else:
                    teacher_features = self._visible_patch_features(teacher, pixel_values, keep)
            losses["distill"] = self.config.distill_weight * self_distillation_loss(features, teacher_features)
        return TokenizerOutput(
            reconstruction=reconstruction,
            codes={"semantic": indices.unsqueeze(-1)},
            losses=losses,
            stats=self._group_stats("semantic", out),
            features=features,
        )
