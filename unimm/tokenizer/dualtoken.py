"""DualToken (docs/DESIGN.md §2.3): one SigLIP encoder, two residual-VQ vocabularies.

- Pixel branch: hidden state `pixel_layer` (+ `shortcut_weight` x hidden state `shortcut_layer`) -> projection to a
  low dim -> ResidualVQ -> pixel decoder (ViT, or the reference's VQGAN-style CNN with `decoder_type="cnn"`) -> image.
  `per_tap_projection` projects each tapped layer on its own and sums the low-dim outputs, as the reference does.
- Semantic branch: hidden state `semantic_layer` -> projection to a low dim -> ResidualVQ -> projection back to
  the encoder width, which *replaces* that hidden state; the encoder's remaining layers, final norm and pooling
  head (the HF modules themselves, called in order) run on top. A frozen teacher (the initial encoder) supplies
  the targets of the semantic loss, MSE + (1 - cos), at that layer (`semantic_weight`) and on the pooled output
  (`semantic_pooled_weight`).

Projections are `nn.Linear` (`projection_block="linear"`, cheap, for tiny runs) or the reference's LayerNorm-first
attention blocks (`"attention"`, unimm.tokenizer.projections).

Training stages (`set_stage`, the reference's `--stage` of songweii/DualToken main.py / train.py): 1 (default) trains
every part the config leaves trainable. With `train_encoder`, stage 0 freezes the embeddings and encoder layers
1..`semantic_layer` (only the layers above it, the final norm and the head train, reached through the pooled
loss), and stage 2 freezes the embeddings and the layers up to the shallowest pixel tap plus the whole pixel branch
(its projections, codebook EMA, decoder) and drops the pixel commitment loss, so only the semantic path trains. The
loss mix of each stage is the recipe's (configs/tokenizer/dualtoken-siglip-so400m-384-stage*.yaml).

Hidden-state numbering is `output_hidden_states`': 0 = embeddings, i = output of layer i (1-based), so the
paper's "layer 26 of 27" is `semantic_layer=26` and exactly one encoder layer runs on the quantised features.
"""

from __future__ import annotations

import torch
from torch import nn

from unimm.tokenizer.base import TokenizerOutput, VisualTokenizer, eval_mode
from unimm.tokenizer.cnn_decoder import CNNDecoder
from unimm.tokenizer.configuration import DenoisingConfig, DualTokenConfig
from unimm.tokenizer.denoising import LatentDenoiser
from unimm.tokenizer.encoders import EncoderAccess
from unimm.tokenizer.losses import cosine_distance, semantic_loss
from unimm.tokenizer.projections import build_projection
from unimm.tokenizer.quantizers import ResidualVQ
from unimm.tokenizer.types import CodebookGroupSpec, CodebookSpec, VisualCodes
from unimm.utils.logging import get_logger, warn_once

logger = get_logger(__name__)

DUALTOKEN_STAGES = (0, 1, 2)

# The reference decoder's levels (finest first): 128 x [1, 1, 4, 4, 8] channels, 16x upsampling.
REFERENCE_CNN_CHANNEL_MULT = (1, 1, 4, 4, 8)


class DualToken(VisualTokenizer):
    config_class = DualTokenConfig

    def __init__(self, config: DualTokenConfig):
        super().__init__(config)
        self._validate(config)
        width = self.encoder_hidden_size
        self.stage = 1
        rvq_kwargs = dict(
            decay=config.ema_decay,
            eps=config.ema_eps,
            restart_threshold=config.restart_threshold,
            shared_codebook=config.shared_codebook,
            beta=config.quantizer_beta,
        )
        block = config.projection_block
        self.pixel_proj_in = build_projection(block, width, config.pixel_code_dim)
        # Per-tap form: the shortcut layer gets its own projection (only when it contributes, so no parameter
        # goes without gradient).
        self.shortcut_proj_in = (
            build_projection(block, width, config.pixel_code_dim) if self._projects_shortcut_apart else None
        )
        self.pixel_quantizer = ResidualVQ(
            config.pixel_num_codes, config.pixel_code_dim, config.pixel_depth,
            ema_per_depth=config.pixel_ema_per_depth, **rvq_kwargs,
        )
        self.semantic_proj_in = build_projection(block, width, config.semantic_code_dim)
        self.semantic_quantizer = ResidualVQ(
            config.semantic_num_codes, config.semantic_code_dim, config.semantic_depth,
            ema_per_depth=config.semantic_ema_per_depth, **rvq_kwargs,
        )
        # The reference's post-quantisation blocks attend causally (raster order) at HEAD, bidirectionally at 41be90e.
        self.semantic_proj_out = build_projection(
            block, config.semantic_code_dim, width, is_causal=config.up_projection_causal
        )
        self._build_decoder_path(config.pixel_code_dim)
        self.post_init()
        self._apply_stage_freezing()

    def _validate(self, config: DualTokenConfig) -> None:
        access = self._encoder_access
        if access.family != "siglip":
            raise ValueError(
                f"DualToken needs a SigLIP/SigLIP2 vision encoder; encoder_config.model_type is {access.model_type!r}"
            )
        num_layers = access.num_layers
        for key, lowest in (("pixel_layer", 1), ("semantic_layer", 1), ("shortcut_layer", 0)):
            value = getattr(config, key)
            if value is None and key == "shortcut_layer":
                continue
            if not lowest <= value <= num_layers:
                raise ValueError(
                    f"{key}={value} but the encoder has {num_layers} layers "
                    f"(valid hidden-state indices: {lowest}..{num_layers})"
                )
        for key in ("pixel_layer", "shortcut_layer"):
            value = getattr(config, key)
            if value is not None and value > config.semantic_layer:
                raise ValueError(f"{key}={value} must not be deeper than semantic_layer={config.semantic_layer}")
        for key in ("pixel_code_dim", "semantic_code_dim", "pixel_depth", "semantic_depth"):
            if getattr(config, key) < 1:
                raise ValueError(f"{key}={getattr(config, key)} must be >= 1")
        for key in ("pixel_num_codes", "semantic_num_codes"):
            if getattr(config, key) < 2:
                raise ValueError(f"{key}={getattr(config, key)} must be >= 2")

    @property
    def _projects_shortcut_apart(self) -> bool:
        cfg = self.config
        return bool(cfg.per_tap_projection) and cfg.shortcut_layer is not None and cfg.shortcut_weight != 0

    def _build_decoder_path(self, latent_dim: int) -> None:
        """The ViT path of VisualTokenizer, or the same latent norm and l-DeTok denoiser in front of a CNN decoder."""
        cfg = self.config
        if cfg.decoder_type == "vit":
            super()._build_decoder_path(latent_dim)
            return
        cfg.denoising = cfg.denoising_config.to_dict()
        self.latent_norm = nn.LayerNorm(latent_dim, elementwise_affine=False) if cfg.latent_norm else nn.Identity()
        self._check_denoising(cfg.denoising_config)
        self.denoiser = LatentDenoiser(latent_dim, cfg.denoising_config)
        channel_mult = list(cfg.cnn_decoder_channel_mult or REFERENCE_CNN_CHANNEL_MULT)
        base_grid = self.image_size // 2 ** (len(channel_mult) - 1)
        attn_resolutions = cfg.cnn_decoder_attn_resolutions
        self.decoder = CNNDecoder(
            latent_dim=latent_dim,
            image_size=self.image_size,
            input_width=cfg.cnn_decoder_input_width or self.encoder_hidden_size,
            in_channels=cfg.cnn_decoder_in_channels,
            channels=cfg.cnn_decoder_channels,
            channel_mult=channel_mult,
            num_res_blocks=cfg.cnn_decoder_num_res_blocks,
            attn_resolutions=[base_grid] if attn_resolutions is None else list(attn_resolutions),
            input_block=cfg.projection_block,
            input_causal=cfg.up_projection_causal,
        )

    def _check_denoising(self, denoising: DenoisingConfig) -> None:
        if denoising.encoder_drop_masked:
            raise ValueError(
                "denoising.encoder_drop_masked is a VQRAE option; DualToken's semantic branch needs every patch"
            )

    # ----------------------------------------------------------------- encoder training switch
    def set_train_encoder(self, train_encoder: bool, teacher_encoder: nn.Module | None = None) -> None:
        """Train the encoder (keeping a frozen teacher copy of it, taken now unless given) or freeze it."""
        self.config.train_encoder = train_encoder
        if teacher_encoder is not None:
            mine, theirs = self.encoder.config, teacher_encoder.config
            keys = ("model_type", "hidden_size", "num_hidden_layers")
            if any(getattr(mine, k, None) != getattr(theirs, k, None) for k in keys):
                raise ValueError(
                    "the teacher encoder does not match the tokenizer's encoder: "
                    + ", ".join(f"{k} {getattr(theirs, k, None)} vs {getattr(mine, k, None)}" for k in keys)
                )
        if train_encoder:
            self.init_teacher(teacher_encoder)
        else:
            self.drop_teacher()
        if not self._decoder_only:
            self._apply_stage_freezing()
        self.train(self.training)

    quantizes_semantic_features = True

    @property
    def semantic_layer(self) -> int:
        return int(self.config.semantic_layer)

    @property
    def initial_encoder(self) -> nn.Module | None:
        return self.teacher if self.config.train_encoder else self.encoder  # never trained: the initial encoder

    def set_stage(self, stage: int) -> None:
        """The reference's training stage (module docstring): 0, 1 (everything the config trains) or 2."""
        if stage not in DUALTOKEN_STAGES:
            raise ValueError(f"DualToken stage must be one of {DUALTOKEN_STAGES}, got {stage}")
        self.stage = stage
        if not self._decoder_only:
            self._apply_stage_freezing()
        self.train(self.training)

    def _pixel_modules(self) -> list[nn.Module]:
        """The pixel branch after the encoder: tap projections, quantizer, decoder path."""
        modules = [self.pixel_proj_in, self.pixel_quantizer, self.latent_norm, self.denoiser, self.decoder]
        return modules + ([self.shortcut_proj_in] if self.shortcut_proj_in is not None else [])

    @property
    def _shallowest_pixel_tap(self) -> int:
        cfg = self.config
        return min(cfg.pixel_layer, cfg.shortcut_layer) if cfg.shortcut_layer is not None else cfg.pixel_layer

    def _apply_stage_freezing(self) -> None:
        for module in self._pixel_modules():
            module.requires_grad_(self.stage != 2)
        for module in (self.semantic_proj_in, self.semantic_proj_out):
            module.requires_grad_(True)
        self._set_encoder_requires_grad(bool(self.config.train_encoder))
        if self.config.train_encoder and self.stage in (0, 2):
            # Reference main.py: stage 0 freezes layers [0, layer_sem), stage 2 layers [0, layer_shortcut).
            frozen = self.config.semantic_layer if self.stage == 0 else self._shallowest_pixel_tap
            for module in (self.encoder.embeddings, *self._encoder_access.layers[:frozen]):
                module.requires_grad_(False)

    def _frozen_submodules(self) -> list[nn.Module]:
        """Stage 2 also keeps the pixel branch in eval mode: its codebook EMA stands still (reference train.py)."""
        frozen = super()._frozen_submodules()
        return frozen + self._pixel_modules() if self.stage == 2 and not self._decoder_only else frozen

    @property
    def _semantic_pooled_weight(self) -> float:
        cfg = self.config
        if not cfg.semantic_pooled_loss:
            return 0.0
        return cfg.semantic_weight if cfg.semantic_pooled_weight is None else cfg.semantic_pooled_weight

    def _unused_parameters(self) -> list[nn.Parameter]:
        """What no training loss reaches: without the pooled-output loss, the encoder layers above
        `semantic_layer`, its final norm and head; when nothing compares the quantised path with the teacher,
        also the projection back."""
        cfg = self.config
        unused = super()._unused_parameters()
        pooled_used = self._semantic_pooled_weight > 0
        if not pooled_used:
            top = [*self._encoder_access.layers[cfg.semantic_layer :], self.encoder.post_layernorm]
            unused += [p for module in top for p in module.parameters()] + self._encoder_head_parameters()
        if not (pooled_used or (cfg.semantic_weight > 0 and cfg.semantic_layer_target == "quantized")):
            unused += list(self.semantic_proj_out.parameters())
        return unused

    # ----------------------------------------------------------------- encoder passes
    def _run_to_semantic(
        self, pixel_values: torch.Tensor, access: EncoderAccess
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """(hidden states of the pixel taps by layer, hidden state `semantic_layer`), all [B, N, C]."""
        cfg = self.config
        hidden = access.embed(pixel_values)
        taps = {0: hidden}
        current = 0
        for index in sorted({cfg.pixel_layer} | ({cfg.shortcut_layer} if cfg.shortcut_layer is not None else set())):
            hidden = access.run_layers(hidden, current, index)
            taps[index] = hidden
            current = index
        hidden = access.run_layers(hidden, current, cfg.semantic_layer)
        return taps, hidden

    def _pixel_latent(self, taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """Pixel-branch quantizer input [B, N, pixel_code_dim] from the tapped hidden states."""
        cfg = self.config
        if self.shortcut_proj_in is not None:  # per tap: project each layer, then sum
            return self.pixel_proj_in(taps[cfg.pixel_layer]) + cfg.shortcut_weight * self.shortcut_proj_in(
                taps[cfg.shortcut_layer]
            )
        features = taps[cfg.pixel_layer]
        if cfg.shortcut_layer is not None and cfg.shortcut_weight != 0:
            features = features + cfg.shortcut_weight * taps[cfg.shortcut_layer]
        return self.pixel_proj_in(features)

    def _run_top(self, hidden: torch.Tensor, access: EncoderAccess) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Remaining layers + final norm + pooling head on hidden state `semantic_layer`."""
        hidden = access.run_layers(hidden, self.config.semantic_layer, access.num_layers)
        return access.finalize(hidden)

    def _dequantize_semantic(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.semantic_proj_out(quantized.to(next(self.semantic_proj_out.parameters()).dtype))

    # ----------------------------------------------------------------- contract
    @property
    def codebook_spec(self) -> CodebookSpec:
        cfg = self.config
        return {
            "pixel": CodebookGroupSpec(cfg.pixel_num_codes, cfg.pixel_depth, cfg.pixel_code_dim),
            "semantic": CodebookGroupSpec(cfg.semantic_num_codes, cfg.semantic_depth, cfg.semantic_code_dim),
        }

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> VisualCodes:
        self._check_pixels(pixel_values)
        with eval_mode(self.pixel_quantizer, self.semantic_quantizer):
            taps, semantic_hidden = self._run_to_semantic(pixel_values, self._encoder_access)
            pixel = self.pixel_quantizer(self._pixel_latent(taps)).indices
            semantic = self.semantic_quantizer(self.semantic_proj_in(semantic_hidden)).indices
        return {"pixel": pixel, "semantic": semantic}  # [B, N, Dp], [B, N, Ds]

    def decode(self, codes: VisualCodes) -> torch.Tensor:
        """Pixel codes {"pixel": [B, N, Dp], ...} -> pixel_values; other groups are ignored."""
        self.check_codes(codes, ("pixel",))
        latent = self.pixel_quantizer.lookup(codes["pixel"]).to(self.decoder.last_layer.dtype)
        with eval_mode(self.denoiser):
            return self._decode_latent(latent)

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Semantic-tower output [B, N, C]: the encoder's final hidden states computed on top of the quantised
        semantic features (what the codes carry), for understanding."""
        self._check_pixels(pixel_values)
        with eval_mode(self.semantic_quantizer):
            _, semantic_hidden = self._run_to_semantic(pixel_values, self._encoder_access)
            quantized = self.semantic_quantizer(self.semantic_proj_in(semantic_hidden)).quantized
        return self._run_top(self._dequantize_semantic(quantized), self._encoder_access)[0]

    def semantic_features(
        self, pixel_values: torch.Tensor, encoder: nn.Module | None = None, quantize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden state `semantic_layer` [B, N, C], encoder output [B, N, C], pooled [B, C] or None) computed by
        `encoder` (default: this tokenizer's). `quantize=True` sends the hidden state through the semantic codes
        (projection, ResidualVQ in eval mode, projection back) before the remaining layers, as `encode_features`
        does; `quantize=False` gives the encoder's own features (with a frozen initial encoder: the targets)."""
        self._check_pixels(pixel_values)
        access = self._encoder_access if encoder is None else EncoderAccess(encoder)
        _, hidden = self._run_to_semantic(pixel_values, access)
        if quantize:
            with eval_mode(self.semantic_quantizer):
                hidden = self._dequantize_semantic(self.semantic_quantizer(self.semantic_proj_in(hidden)).quantized)
        output, pooled = self._run_top(hidden, access)
        return hidden, output, pooled

    def features_from_codes(self, codes: VisualCodes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Semantic codes [B, N, Ds] -> (encoder output [B, N, C], pooled [B, C] or None)."""
        self.check_codes(codes, ("semantic",))
        hidden = self._dequantize_semantic(self.semantic_quantizer.lookup(codes["semantic"]))
        return self._run_top(hidden, self._encoder_access)

    def forward(self, pixel_values: torch.Tensor) -> TokenizerOutput:
        self._check_pixels(pixel_values)
        access = self._encoder_access
        with self._encoder_context():
            taps, semantic_hidden = self._run_to_semantic(pixel_values, access)
        pixel_out = self.pixel_quantizer(self._pixel_latent(taps))
        pixel_out = self._maybe_replace_codes(self.pixel_quantizer, pixel_out)
        reconstruction = self._decode_latent(pixel_out.quantized)

        semantic_out = self.semantic_quantizer(self.semantic_proj_in(semantic_hidden))
        replaced = self._dequantize_semantic(semantic_out.quantized)
        features, pooled = self._run_top(replaced, access)

        # Stage 2 trains the semantic path alone: the frozen pixel branch's commitment loss would still pull the
        # encoder layers under its taps (reference train.py stage 2: 5 x quant_loss_semantic only).
        losses = {"quantizer": semantic_out.loss if self.stage == 2 else pixel_out.loss + semantic_out.loss}
        semantic = self._semantic_loss(pixel_values, semantic_hidden, replaced, pooled)
        if semantic is not None:
            losses["semantic"] = semantic
        stats = {**self._group_stats("pixel", pixel_out), **self._group_stats("semantic", semantic_out)}
        return TokenizerOutput(
            reconstruction=reconstruction,
            codes={"pixel": pixel_out.indices, "semantic": semantic_out.indices},
            losses=losses,
            stats=stats,
            features=features,
        )

    def _semantic_loss(
        self, pixel_values: torch.Tensor, semantic_hidden: torch.Tensor, replaced: torch.Tensor,
        pooled: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """semantic_weight x (layer term) + pooled weight x (MSE + 1 - cos on the pooled output), or None when
        neither is on. The layer term compares the teacher's hidden state at `semantic_layer` with the quantised
        path's (`semantic_layer_target="quantized"`) or the encoder's own (`"encoder"`), by MSE + 1 - cos or 1 - cos
        (`semantic_layer_loss`)."""
        cfg = self.config
        pooled_weight = self._semantic_pooled_weight if pooled is not None else 0.0
        if self._decoder_only or (cfg.semantic_weight <= 0 and pooled_weight <= 0):
            return None
        target_hidden, target_pooled = self._semantic_targets(pixel_values, semantic_hidden)
        total = torch.zeros((), device=pixel_values.device)
        if cfg.semantic_weight > 0:
            prediction = replaced if cfg.semantic_layer_target == "quantized" else semantic_hidden
            term = semantic_loss if cfg.semantic_layer_loss == "mse_cos" else cosine_distance
            total = total + cfg.semantic_weight * term(prediction, target_hidden)
        if pooled_weight > 0 and target_pooled is not None:
            total = total + pooled_weight * semantic_loss(pooled, target_pooled)
        return total

    @torch.no_grad()
    def _semantic_targets(
        self, pixel_values: torch.Tensor, semantic_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher hidden state at `semantic_layer` and its pooled output. A frozen encoder is its own teacher."""
        if self.config.train_encoder:
            if self.teacher is None:
                warn_once(
                    logger,
                    "DualToken.train_encoder is set but no teacher exists; copying the current "
                    "encoder as the teacher (call set_train_encoder(True) right after loading the "
                    "initial weights to make this explicit)",
                )
                self.init_teacher()
            teacher_access = EncoderAccess(self.teacher)
            _, target_hidden = self._run_to_semantic(pixel_values, teacher_access)
        else:
            teacher_access, target_hidden = self._encoder_access, semantic_hidden.detach()
        target_pooled = None
        if self.config.semantic_pooled_loss:
            target_pooled = self._run_top(target_hidden, teacher_access)[1]
        return target_hidden, target_pooled
