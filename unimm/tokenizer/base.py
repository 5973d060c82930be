"""What VQRAE and DualToken share: the wrapped encoder, the frozen teacher, training-stage switches,
image pre/post-processing with the encoder's image-processor settings, and the training-forward output type."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from unimm.tokenizer.configuration import DenoisingConfig, _TokenizerConfigBase
from unimm.tokenizer.denoising import LatentDenoiser, replace_codes
from unimm.tokenizer.encoders import EncoderAccess, build_encoder, image_processor_settings, patch_size_of
from unimm.tokenizer.quantizers import Quantizer, ResidualVQ, UsageWindow
from unimm.tokenizer.transform import ImageTransform
from unimm.tokenizer.types import CodebookSpec, QuantizerOutput, VisualCodes
from unimm.tokenizer.vit_decoder import ViTDecoder


@dataclass
class TokenizerOutput:
    """Training forward of a tokenizer.

    reconstruction: [B, 3, H, W], normalised like the input.
    codes:          group -> LongTensor [B, N, D].
    losses:         model-internal losses, already weighted ("quantizer"; "distill" for VQRAE stage 2;
                    "semantic" for DualToken). Reconstruction/perceptual/GAN losses are the trainer's.
    stats:          detached scalars for logging, e.g. "semantic/utilisation".
    features:       continuous encoder features [B, N, C] (what `encode_features` returns).
    """

    reconstruction: torch.Tensor
    codes: VisualCodes
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        """Sum of the model-internal losses."""
        return torch.stack([v.float() for v in self.losses.values()]).sum()


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Temporarily put modules in eval mode (e.g. so `encode` never updates EMA codebooks)."""
    states = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)


class VisualTokenizer(PreTrainedModel):
    """Base class: subclasses build their quantizers/decoder and implement `encode`, `decode`,
    `encode_features`, `forward` and `codebook_spec`.

    Training and evaluation reach every tokenizer through the same switches, which have neutral defaults here, so a
    new tokenizer overrides only what it has (no code elsewhere asks which class it is):
    - `set_stage(stage)`: the training stage (which parts train); here one stage, 1 = what the config trains;
    - `train_encoder` / `set_train_encoder(flag, teacher_encoder)`: train the encoder against a frozen teacher
      copy; here never (`set_train_encoder(True)` raises);
    - `semantic_layer`, `semantic_features(...)`, `quantizes_semantic_features`, `initial_encoder`: what semantic
      evaluation compares with the initial encoder; here the encoder's last layer and output, unquantised."""

    config_class = _TokenizerConfigBase
    base_model_prefix = "tokenizer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: _TokenizerConfigBase):
        super().__init__(config)
        if not config.encoder_config:
            raise ValueError(
                f"{type(config).__name__}.encoder_config is empty; build tokenizers with "
                "unimm.tokenizer.build_tokenizer(...) or load them with load_tokenizer(path)"
            )
        settings = image_processor_settings(config.encoder_config, image_size=config.image_size)
        config.image_size = settings.image_size
        if config.image_mean is None:
            config.image_mean = list(settings.image_mean)
        if config.image_std is None:
            config.image_std = list(settings.image_std)
        patch = patch_size_of(config.encoder_config)
        if config.image_size < patch:
            raise ValueError(f"image_size={config.image_size} is smaller than the encoder patch_size={patch}")
        # A size that is not a multiple of the patch (SigLIP so400m: 384 px, patch 14) is handled as the encoder's
        # patch convolution does: floor(384 / 14) = 27 x 27 patches, the last 6 pixel rows/columns unseen. The
        # decoder emits that 378 px grid and `_decode_latent` resizes it to image_size, so images round-trip at
        # the input size and the reconstruction losses compare like with like.
        self.encoder = build_encoder(config.encoder_config, config.encoder_attn_implementation)
        if not getattr(config, "encoder_position_embedding", True):
            self._drop_encoder_position_embedding()
        self._encoder_access = EncoderAccess(self.encoder)
        # The teacher (a frozen copy of the initial encoder) is deliberately not a registered submodule:
        # it must stay out of state_dict/save_pretrained and out of optimizers.
        self._teacher_holder: list[nn.Module] = []
        self._decoder_only = False

    # ----------------------------------------------------------------- building blocks for subclasses
    @property
    def encoder_hidden_size(self) -> int:
        return int(self.config.encoder_config["hidden_size"])

    @property
    def encoder_num_layers(self) -> int:
        return int(self.config.encoder_config["num_hidden_layers"])

    def _build_decoder_path(self, latent_dim: int) -> None:
        """latent norm -> l-DeTok denoiser -> ViT decoder, all on `latent_dim`-wide code vectors."""
        sizes = self.config.decoder_sizes()
        # Normalise (possibly partial) denoising overrides, e.g. from `from_pretrained(path, denoising={...})`.
        self.config.denoising = self.config.denoising_config.to_dict()
        self.latent_norm = (
            nn.LayerNorm(latent_dim, elementwise_affine=False) if self.config.latent_norm else nn.Identity()
        )
        self._check_denoising(self.config.denoising_config)
        self.denoiser = LatentDenoiser(latent_dim, self.config.denoising_config)
        self.decoder = ViTDecoder(
            latent_dim=latent_dim,
            hidden_size=sizes["hidden_size"],
            num_layers=sizes["num_layers"],
            num_heads=sizes["num_heads"],
            intermediate_size=sizes["intermediate_size"],
            num_positions=self.num_positions,
            patch_size=self.patch_size,
        )

    def _decode_latent(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decoder input = normalised (de)quantised latent, corrupted by l-DeTok in training only. The decoder's
        grid (grid_size * patch_size pixels) is resized to image_size when the two differ (bicubic)."""
        pixels = self.decoder(self.denoiser(self.latent_norm(quantized)))
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False)
        return pixels

    def _maybe_replace_codes(self, quantizer: Quantizer, out: QuantizerOutput) -> QuantizerOutput:
        """l-DeTok's discrete analogue: swap a fraction of codes for random ones before decoding. The value
        becomes the lookup of the corrupted codes; gradients still reach the encoder straight-through. The
        returned indices stay the clean ones (they are the codes the tokenizer produced).

        Both lookups use `out.codebook`, the codebook the search ran on: the same training forward has since moved
        the live one (EMA update, restarts), whose vectors the clean codes never stood for."""
        prob = self.denoiser.config.code_replace_prob
        if not (self.training and self.denoiser.active and prob > 0):
            return out
        corrupted, _ = replace_codes(out.indices, quantizer.num_codes, prob)
        searched = out.codebook
        delta = quantizer.lookup(corrupted, codebook=searched) - quantizer.lookup(out.indices, codebook=searched)
        return QuantizerOutput(out.quantized + delta.to(out.quantized.dtype).detach(), out.indices, out.loss,
                               out.stats, searched)

    @staticmethod
    def _group_stats(group: str, out: QuantizerOutput) -> dict[str, torch.Tensor]:
        return {f"{group}/{name}": value.detach() for name, value in out.stats.items()}

    def _encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def _encoder_context(self) -> contextlib.AbstractContextManager:
        """No autograd graph through a frozen encoder (saves its activations' memory)."""
        return contextlib.nullcontext() if self._encoder_trainable() else torch.no_grad()

    # ----------------------------------------------------------------- teacher
    @property
    def teacher(self) -> nn.Module | None:
        """The frozen copy of the initial encoder (stage 2 / trainable encoder), or None."""
        if not self._teacher_holder:
            return None
        teacher = self._teacher_holder[0]
        reference = next(self.encoder.parameters())
        first = next(teacher.parameters())
        if first.device != reference.device or first.dtype != reference.dtype:
            teacher.to(device=reference.device, dtype=reference.dtype)
        return teacher

    def init_teacher(self, source: nn.Module | None = None) -> nn.Module:
        """Freeze a copy of `source` (default: the current encoder) as the distillation teacher. To resume a
        run, pass the *initial* encoder (e.g. `load_tokenizer(stage1_dir).encoder`), not the trained one."""
        teacher = copy.deepcopy(source if source is not None else self.encoder)
        teacher.requires_grad_(False)
        teacher.eval()
        self._teacher_holder[:] = [teacher]
        return teacher

    def drop_teacher(self) -> None:
        self._teacher_holder.clear()

    # ----------------------------------------------------------------- training switches
    def _drop_encoder_position_embedding(self) -> None:
        """Zero the encoder's learned position table and freeze it (`encoder_position_embedding=False`)."""
        table = getattr(getattr(self.encoder, "embeddings", None), "position_embedding", None)
        weight = getattr(table, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            raise ValueError("encoder_position_embedding=False needs an encoder with a learned position table "
                             f"(embeddings.position_embedding), not {type(self.encoder).__name__}")
        with torch.no_grad():
            weight.zero_()
        weight.requires_grad_(False)

    def _set_encoder_requires_grad(self, trainable: bool) -> None:
        self.encoder.requires_grad_(trainable)
        # Encoder parameters our losses never reach stay frozen: a trainable parameter without gradients
        # would trip DDP's unused-parameter check (and waste optimizer state).
        for param in self._unused_parameters():
            param.requires_grad_(False)
        if not getattr(self.config, "encoder_position_embedding", True):
            self._drop_encoder_position_embedding()

    def _unused_parameters(self) -> list[nn.Parameter]:
        """DINOv2's MAE-style mask token is never used; subclasses add e.g. a pooling head they do not use."""
        mask_token = getattr(getattr(self.encoder, "embeddings", None), "mask_token", None)
        return [mask_token] if isinstance(mask_token, nn.Parameter) else []

    def _encoder_head_parameters(self) -> list[nn.Parameter]:
        head = getattr(self.encoder, "head", None) if getattr(self.encoder, "use_head", False) else None
        return list(head.parameters()) if isinstance(head, nn.Module) else []

    # ----------------------------------------------------------------- stages and encoder training (neutral defaults)
    stage: int = 1

    def set_stage(self, stage: int) -> None:
        """Put the tokenizer in training stage `stage`. A tokenizer without stages has one, 1 (train what the config
        trains); VQRAE (1, 2) and DualToken (0, 1, 2) define theirs."""
        if stage != 1:
            raise ValueError(f"stage={stage}: {type(self).__name__} has no training stages (only stage 1)")
        self.stage = 1

    @property
    def train_encoder(self) -> bool:
        """Whether the config asks to train the encoder against a frozen teacher copy of it, taken before training
        (`set_train_encoder(True, ...)` sets one up). Off unless the tokenizer's config has `train_encoder`."""
        return bool(getattr(self.config, "train_encoder", False))

    def set_train_encoder(self, train_encoder: bool, teacher_encoder: nn.Module | None = None) -> None:
        """Train the encoder, keeping a frozen teacher copy (taken now unless `teacher_encoder` is given), or freeze
        it. A tokenizer that never trains its encoder this way accepts only `False`."""
        if train_encoder or teacher_encoder is not None:
            raise ValueError(f"{type(self).__name__} does not train its encoder against a teacher "
                             "(train_encoder is a DualToken option; VQRAE trains its encoder in stage 2)")

    # ----------------------------------------------------------------- semantics (what semantic evaluation compares)
    quantizes_semantic_features = False  # True: `semantic_features(quantize=True)` passes through the codes

    @property
    def semantic_layer(self) -> int:
        """The encoder layer whose hidden state carries the semantics the codes keep (1-based; the last layer by
        default: the features a continuous understanding path reads)."""
        return self.encoder_num_layers

    @property
    def initial_encoder(self) -> nn.Module | None:
        """The encoder as it was before tokenizer training, when known: the frozen teacher copy, else the
        tokenizer's own encoder when its config never trains it; None when a saved tokenizer may have trained it."""
        return self.teacher

    def semantic_features(
        self, pixel_values: torch.Tensor, encoder: nn.Module | None = None, quantize: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(hidden state `semantic_layer` [B, N, C] or None, encoder output [B, N, C], pooled [B, C] or None) by
        `encoder` (default: this tokenizer's). Here the understanding path is the encoder's continuous output, so
        `quantize` changes nothing and the layer is not reported apart from the output."""
        self._check_pixels(pixel_values)
        access = self._encoder_access if encoder is None else EncoderAccess(encoder)
        hidden = access.run_layers(access.embed(pixel_values), 0, access.num_layers)
        output, pooled = access.finalize(hidden)
        return None, output, pooled

    def set_denoising(self, denoising: DenoisingConfig | dict | None) -> None:
        """Replace the l-DeTok options (stored in the config, so a saved model records them)."""
        cfg = DenoisingConfig.from_value(denoising)
        self._check_denoising(cfg)
        self.config.denoising = cfg.to_dict()
        self.denoiser.config = cfg

    def _check_denoising(self, denoising: DenoisingConfig) -> None:
        """Subclasses reject denoising options they cannot honour."""

    def set_decoder_only(self, decoder_only: bool = True) -> None:
        """Clean decoder-only finetune: everything but the decoder is frozen (and kept in eval mode, so the
        codebooks do not move) and denoising is off (gamma = 0, m = 0)."""
        self._decoder_only = decoder_only
        if decoder_only:
            self.requires_grad_(False)
            self.decoder.requires_grad_(True)
        else:
            self.requires_grad_(True)
            self._apply_stage_freezing()
        self.denoiser.active = not decoder_only
        self.train(self.training)

    def _apply_stage_freezing(self) -> None:
        """Subclasses re-apply their encoder freezing after `set_decoder_only(False)`."""

    def _frozen_submodules(self) -> list[nn.Module]:
        if self._decoder_only:
            return [m for name, m in self.named_children() if name != "decoder"]
        return [] if self._encoder_trainable() else [self.encoder]

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self._frozen_submodules():
                module.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split so the encoder can get its own learning rate: {"encoder", "other"}."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        other = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        return {"encoder": encoder, "other": other}

    def decoder_last_layer(self) -> torch.Tensor:
        """The pixel head weight (for the adaptive GAN weight)."""
        return self.decoder.last_layer

    # ----------------------------------------------------------------- properties of the contract
    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def patch_size(self) -> int:
        return patch_size_of(self.config.encoder_config)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.config.image_mean)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.config.image_std)

    @property
    def codebook_spec(self) -> CodebookSpec:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def config_hash(self) -> str:
        """Stable sha256 of the architecture config (tags code caches; ignores training-only options)."""
        return self.config.config_hash()

    def check_codes(self, codes: VisualCodes, groups: tuple[str, ...]) -> None:
        spec = self.codebook_spec
        for group in groups:
            if group not in codes:
                raise KeyError(f"codes are missing group {group!r}; got groups {sorted(codes)}")
            value = codes[group]
            if value.dim() != 3 or value.shape[1] != self.num_positions or value.shape[2] != spec[group].depth:
                raise ValueError(
                    f"codes[{group!r}] must be [B, {self.num_positions}, {spec[group].depth}], got {tuple(value.shape)}"
                )

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} but this tokenizer takes "
                f"{self.image_size}x{self.image_size} images (config image_size); use model.preprocess"
            )

    # ----------------------------------------------------------------- images <-> tensors
    @property
    def image_aspect(self) -> str:
        return str(getattr(self.config, "image_aspect", "crop"))

    @property
    def image_transform(self) -> ImageTransform:
        """The one image transform (unimm.tokenizer.transform) that every path feeding this tokenizer uses."""
        return ImageTransform.for_tokenizer(self)

    def preprocess(self, images: list[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL images -> normalised pixel_values [B, 3, S, S] through `image_transform`: the short side resized to
        image_size and centre-cropped (or padded to a square, `image_aspect="pad"`), then (x/255 - mean)/std with
        the encoder's image-processor settings. Training and code caches see exactly these pixels."""
        if isinstance(images, Image.Image):
            images = [images]
        return self.image_transform.batch(images)

    def denormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixel_values -> [0, 1] floats (clamped)."""
        mean = torch.tensor(self.image_mean, device=pixel_values.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixel_values.device, dtype=torch.float32).view(1, 3, 1, 1)
        return (pixel_values.float() * std + mean).clamp(0, 1)

    def postprocess(self, pixel_values: torch.Tensor) -> list[Image.Image]:
        """Normalised pixel_values [B, 3, H, W] -> uint8 RGB PIL images."""
        images = (self.denormalize(pixel_values.detach()) * 255.0).round().to(torch.uint8)
        return [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]

    # ----------------------------------------------------------------- HF weight init
    def _init_weights(self, module: nn.Module) -> None:
        # Our modules are initialised in their constructors; this runs again when `from_pretrained` builds the
        # model on the meta device, where non-persistent buffers (usage statistics) must be re-created.
        if isinstance(module, (ViTDecoder, LatentDenoiser)):
            module.reset_parameters()
        elif isinstance(module, UsageWindow):
            module.reset()
        elif isinstance(module, ResidualVQ):
            module.restarts_total.zero_()

