"""The vision foundation model inside a tokenizer: building it from a nested config, loading it from a local
checkpoint, reading its image-processor settings, and reaching its intermediate layers.

Encoders are real `transformers` models (`SiglipVisionModel`, `Siglip2VisionModel`, `Dinov2Model`,
`Dinov2WithRegistersModel`). `EncoderAccess` calls their own submodules (embeddings, layer list, final norm,
pooling head) in order, so the tokenizers can tap or replace a hidden state without copying modeling code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from unimm.tokenizer.vit_decoder import patchify
from unimm.utils.attention import select_attn_implementation

SIGLIP_TYPES = ("siglip_vision_model", "siglip2_vision_model")
DINOV2_TYPES = ("dinov2", "dinov2_with_registers")
SUPPORTED_TYPES = SIGLIP_TYPES + DINOV2_TYPES

# Image-processor defaults per family, used when a checkpoint ships no preprocessor_config.json.
_FAMILY_NORMALISATION = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Keys of a saved config that say nothing about the architecture.
_VOLATILE_KEYS = (
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "_attn_implementation_autoset",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
)


def family_of(model_type: str) -> str:
    if model_type in SIGLIP_TYPES:
        return "siglip"
    if model_type in DINOV2_TYPES:
        return "dinov2"
    return "generic"


@dataclass(frozen=True)
class ImageProcessorSettings:
    """What preprocessing a vision encoder expects (from its Hugging Face image processor)."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


def clean_encoder_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop bookkeeping keys so the nested config is stable across save/load (it feeds `config_hash`)."""
    return {k: v for k, v in config_dict.items() if k not in _VOLATILE_KEYS and not k.startswith("_")}


def encoder_config_from_dict(encoder_config: dict[str, Any]):
    """A `PretrainedConfig` of the right vision class from the dict nested in a tokenizer config."""
    if "model_type" not in encoder_config:
        raise ValueError("encoder_config must contain 'model_type' (e.g. 'siglip_vision_model', 'dinov2')")
    kwargs = dict(encoder_config)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def build_encoder(encoder_config: dict[str, Any], attn_implementation: str | None = None) -> PreTrainedModel:
    """A randomly initialised encoder from its nested config (weights come from the tokenizer checkpoint)."""
    config = encoder_config_from_dict(encoder_config)
    return AutoModel.from_config(config, attn_implementation=select_attn_implementation(attn_implementation))


def _vision_subconfig(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Full SigLIP/SigLIP2 checkpoints (text + vision towers) keep the vision tower's config under vision_config."""
    if config_dict.get("model_type") in ("siglip", "siglip2"):
        vision = dict(config_dict.get("vision_config") or {})
        vision["model_type"] = config_dict["model_type"] + "_vision_model"
        return vision
    return config_dict


def load_encoder(path: str | Path, attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a pretrained vision encoder from a local Hugging Face checkpoint directory (never downloads)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"encoder_path={str(path)!r} has no config.json; expected a local Hugging Face "
            "checkpoint of a vision model (e.g. SigLIP, SigLIP2, DINOv2) saved with save_pretrained"
        )
    config_dict = json.loads(config_file.read_text())
    model_type = config_dict.get("model_type")
    attn = select_attn_implementation(attn_implementation)
    if model_type in ("siglip", "siglip2"):
        from transformers import Siglip2VisionModel, SiglipVisionModel

        cls = SiglipVisionModel if model_type == "siglip" else Siglip2VisionModel
        return cls.from_pretrained(path, attn_implementation=attn, local_files_only=True)
    return AutoModel.from_pretrained(path, attn_implementation=attn, local_files_only=True)


def encoder_config_to_dict(encoder: PreTrainedModel) -> dict[str, Any]:
    return clean_encoder_config(encoder.config.to_dict())


def default_image_size(encoder_config: dict[str, Any]) -> int | None:
    size = encoder_config.get("image_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return size


def image_processor_settings(
    encoder_config: dict[str, Any], path: str | Path | None = None, image_size: int | None = None
) -> ImageProcessorSettings:
    """Mean/std/size from the checkpoint's preprocessor_config.json when present, else the family defaults
    (SigLIP: 0.5/0.5; DINOv2: ImageNet). `image_size` overrides the size."""
    family = family_of(encoder_config.get("model_type", ""))
    mean, std = _FAMILY_NORMALISATION.get(family, _FAMILY_NORMALISATION["siglip"])
    size = default_image_size(encoder_config)
    processor_file = Path(path) / "preprocessor_config.json" if path is not None else None
    if processor_file is not None and processor_file.is_file():
        data = json.loads(processor_file.read_text())
        mean = tuple(data.get("image_mean", mean))
        std = tuple(data.get("image_std", std))
        proc_size = data.get("crop_size") if data.get("do_center_crop") else data.get("size")
        if isinstance(proc_size, dict):
            proc_size = proc_size.get("height", proc_size.get("shortest_edge"))
        if isinstance(proc_size, int):
            size = proc_size
    if image_size is not None:
        size = image_size
    if size is None:
        raise ValueError(
            "image_size is not set and the encoder config has none (e.g. NaFlex SigLIP2): "
            "pass image_size to the tokenizer config"
        )
    return ImageProcessorSettings(
        image_size=int(size), image_mean=tuple(float(m) for m in mean), image_std=tuple(float(s) for s in std)
    )


def has_image_size(encoder_config: dict[str, Any], path: str | Path | None = None) -> bool:
    """Whether the checkpoint fixes an input size (in its image processor or config); NaFlex SigLIP2 does not."""
    try:
        image_processor_settings(encoder_config, path=path)
    except ValueError:
        return False
    return True


def patch_size_of(encoder_config: dict[str, Any]) -> int:
    patch = encoder_config.get("patch_size")
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if patch is None:
        raise ValueError(f"encoder config of type {encoder_config.get('model_type')!r} has no patch_size")
    return int(patch)


class EncoderAccess:
    """Runs a wrapped HF vision encoder either whole (`patch_features`) or layer by layer (`embed`,
    `run_layers`, `finalize`). Hidden-state numbering follows `output_hidden_states`: 0 = embeddings,
    i = output of layer i (1-based)."""

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self.model_type = encoder.config.model_type
        self.family = family_of(self.model_type)
        self.patch_size = patch_size_of(encoder.config.to_dict())
        registers = getattr(encoder.config, "num_register_tokens", 0) if self.family == "dinov2" else 0
        self.num_prefix_tokens = 1 + registers if self.family == "dinov2" else 0

    @property
    def layers(self) -> nn.ModuleList:
        if self.family == "siglip":
            return self.encoder.encoder.layers
        if self.family == "dinov2":
            return self.encoder.encoder.layer
        raise ValueError(
            f"layer-wise access is not supported for encoder model_type={self.model_type!r}; "
            f"supported: {SUPPORTED_TYPES}"
        )

    @property
    def num_layers(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    def _siglip2_inputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Siglip2 (NaFlex) takes pre-patchified pixels: [B, N, p*p*C] in (row, col, p, p, C) order."""
        b, _, h, w = pixel_values.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        # Like a stride-p patch convolution, a size that is not a multiple of p drops the last h % p rows/columns.
        patches = patchify(pixel_values[..., : gh * p, : gw * p], p)
        spatial_shapes = torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixel_values.device)
        mask = torch.ones(b, gh * gw, dtype=torch.long, device=pixel_values.device)
        return patches, spatial_shapes, mask

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's own forward; last_hidden_state without CLS/register tokens: [B, N, C]."""
        if self.model_type == "siglip2_vision_model":
            patches, spatial_shapes, mask = self._siglip2_inputs(pixel_values)
            out = self.encoder(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial_shapes)
        elif self.model_type == "siglip_vision_model":
            out = self.encoder(
                pixel_values=pixel_values, interpolate_pos_encoding=self._siglip_interpolate(pixel_values)
            )
        else:
            out = self.encoder(pixel_values=pixel_values)
        return out.last_hidden_state[:, self.num_prefix_tokens :]

    def _siglip_interpolate(self, pixel_values: torch.Tensor) -> bool:
        """SigLIP's learned position grid is resized only when asked (e.g. a 384-px encoder run at 256 px)."""
        return tuple(pixel_values.shape[-2:]) != (self.encoder.config.image_size,) * 2

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.model_type == "siglip2_vision_model":
            patches, spatial_shapes, _ = self._siglip2_inputs(pixel_values)
            return self.encoder.embeddings(patches, spatial_shapes)
        if self.model_type == "siglip_vision_model":
            return self.encoder.embeddings(
                pixel_values, interpolate_pos_encoding=self._siglip_interpolate(pixel_values)
            )
        if self.family in ("siglip", "dinov2"):
            return self.encoder.embeddings(pixel_values)
        raise ValueError(f"layer-wise access is not supported for encoder model_type={self.model_type!r}")

    def run_layers(self, hidden_states: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Apply layers start+1 .. end (1-based), i.e. hidden state `start` -> hidden state `end`."""
        for layer in self.layers[start:end]:
            out = layer(hidden_states, None)
            hidden_states = out[0] if isinstance(out, tuple) else out
        return hidden_states

    def finalize(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final norm (+ pooling head) on the last hidden state: (patch tokens [B, N, C], pooled [B, C] or None)."""
        if self.family == "siglip":
            last = self.encoder.post_layernorm(hidden_states)
            pooled = self.encoder.head(last) if getattr(self.encoder, "use_head", False) else None
            return last, pooled
        if self.family == "dinov2":
            last = self.encoder.layernorm(hidden_states)
            return last[:, self.num_prefix_tokens :], last[:, 0]
        raise ValueError(f"layer-wise access is not supported for encoder model_type={self.model_type!r}")
