"""A plain vision tower for understanding (LLaVA-1.5's `--vision_tower`): a local CLIP or SigLIP vision encoder,
wrapped (never copied), whose patch features from one hidden layer feed the model's feature projector.

The tower sits beside the UniMM model, as a visual tokenizer does: frozen by default, it turns a batch's
`pixel_values [B, 3, H, W]` into `image_features [B, N, D]` for `UniMMForCausalLM(image_features=...)`. It has the
attributes that `ImageTransform.for_tokenizer`, `PixelImages` and the LLM trainer read from a visual tokenizer
(`image_size`, `image_mean`, `image_std`, `image_aspect`, `num_positions`, `encode_features`), so the paths that
encode pixels on the fly take it unchanged. Its weights are not saved with the model (LLaVA does not save a frozen
tower either); `UniMMConfig.vision_tower` records where it came from (`to_dict`) and `VisionTower.from_dict`
rebuilds it.

LLaVA's semantics: `select_layer` indexes the encoder's `hidden_states` (the embeddings, then one entry per layer;
-2 = the input of the last layer, LLaVA-1.5's default); `select_feature="patch"` drops CLIP's CLS token,
`"cls_patch"` keeps it. SigLIP has no CLS token. The image processor's size, mean and std come from the folder's
`preprocessor_config.json`; LLaVA's `image_aspect_ratio pad` pads to a square filled with the mean colour exactly
as LLaVA computes it (`int(mean * 255)`), `square` uses the processor's own resizing (CLIP: short side + centre
crop; SigLIP: resize to the square).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel, SiglipVisionModel

from unimm.tokenizer.transform import ImageTransform
from unimm.utils.errors import ModelFolderError, invalid_json, model_folder
from unimm.utils.parallel import zero3_init_disabled

__all__ = ["IMAGE_ASPECT_RATIOS", "SELECT_FEATURES", "VisionTower", "vision_tower_family"]

SELECT_FEATURES = ("patch", "cls_patch")
IMAGE_ASPECT_RATIOS = ("square", "pad")  # LLaVA's `--image_aspect_ratio` values
# config.json `model_type` -> (family, encoder class, has a CLS token). A full CLIPModel / SiglipModel checkpoint
# (what LLaVA's `openai/clip-vit-large-patch14-336` is) loads its vision half.
_FAMILIES: dict[str, tuple[str, type[PreTrainedModel], bool]] = {
    "clip": ("clip", CLIPVisionModel, True),
    "clip_vision_model": ("clip", CLIPVisionModel, True),
    "siglip": ("siglip", SiglipVisionModel, False),
    "siglip_vision_model": ("siglip", SiglipVisionModel, False),
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise invalid_json(path, err) from None


def _processor_geometry(processor: dict, source: Path) -> tuple[int, str]:
    """(image side, the processor's own aspect handling: "crop" or "squash") from a preprocessor_config.json."""

    def side(value: Any, key: str) -> int:
        if isinstance(value, int):
            return value
        if isinstance(value, dict) and "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise ModelFolderError(f"{source}: {key}={value} is not square; UniMM's vision towers take square "
                                       f"images")
            return int(value["height"])
        if isinstance(value, dict) and "shortest_edge" in value:
            return int(value["shortest_edge"])
        raise ModelFolderError(f"{source}: cannot read an image size from {key}={value!r}")

    if processor.get("do_center_crop", "crop_size" in processor) and "crop_size" in processor:
        return side(processor["crop_size"], "crop_size"), "crop"
    if "size" not in processor:
        raise ModelFolderError(f"{source}: has neither size nor crop_size")
    size = processor["size"]
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"]), "crop"  # resized short side, then the encoder's square input
    return side(size, "size"), "squash"


def _model_type(folder: Path) -> str | None:
    if not folder.is_dir():
        raise ModelFolderError(
            f"vision_tower={os.fspath(folder)}: no such local folder. UniMM never downloads weights; fetch the "
            f"checkpoint first (e.g. `hf download openai/clip-vit-large-patch14-336 --local-dir DIR`) and pass DIR")
    config_file = folder / "config.json"
    return _read_json(config_file).get("model_type") if config_file.is_file() else None


def vision_tower_family(path: str | os.PathLike) -> str | None:
    """"clip" or "siglip" when the local folder `path` holds a checkpoint `VisionTower.from_path` takes, None when it
    holds something else (a UniMM visual tokenizer, for `--vision_tower` given one). Reads only config.json; a path
    that is no local folder (a hub id) raises."""
    family = _FAMILIES.get(_model_type(Path(path)) or "")
    return family[0] if family else None


class VisionTower(nn.Module):
    """A CLIP or SigLIP vision encoder returning LLaVA-style patch features `[B, N, D]`.

    Build it with `VisionTower.from_path(folder, select_layer, select_feature, image_aspect_ratio)`; call it (or
    `encode_features`) on normalised `pixel_values` from `image_transform` / `preprocess`."""

    def __init__(self, encoder: PreTrainedModel, family: str, has_cls_token: bool, image_mean: tuple[float, ...],
                 image_std: tuple[float, ...], processor_aspect: str, select_layer: int = -2,
                 select_feature: str = "patch", image_aspect_ratio: str = "square", path: str | None = None,
                 freeze: bool = True):
        super().__init__()
        config = encoder.config
        num_hidden_states = config.num_hidden_layers + 1  # the embeddings, then one per layer
        if not -num_hidden_states <= select_layer < num_hidden_states:
            raise ValueError(f"vision tower {path}: mm_vision_select_layer={select_layer} is outside the "
                             f"{num_hidden_states} hidden states of a {config.num_hidden_layers}-layer encoder "
                             f"(valid: {-num_hidden_states} .. {num_hidden_states - 1})")
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"mm_vision_select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        if select_feature == "cls_patch" and not has_cls_token:
            raise ValueError(f"vision tower {path}: mm_vision_select_feature='cls_patch' needs a CLS token, and a "
                             f"{family} encoder has none; use 'patch'")
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}")
        self.encoder = encoder
        self.family = family
        self.has_cls_token = has_cls_token
        self.select_layer = int(select_layer)
        self.select_feature = select_feature
        self.image_aspect_ratio = image_aspect_ratio
        self.image_size = int(config.image_size)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        # what ImageTransform.for_tokenizer reads
        self.image_aspect = "pad" if image_aspect_ratio == "pad" else processor_aspect
        self.image_pad_fill = tuple(int(m * 255) for m in self.image_mean)  # LLaVA's expand2square colour
        self.path = path
        if freeze:
            self.freeze()

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | os.PathLike, select_layer: int = -2, select_feature: str = "patch",
                  image_aspect_ratio: str = "square", dtype: torch.dtype | None = None,
                  freeze: bool = True) -> VisionTower:
        """Load the vision encoder in the local folder `path` (a `CLIPVisionModel` / `SiglipVisionModel`, or a full
        CLIP / SigLIP checkpoint, whose vision half is taken) and its `preprocessor_config.json`. Nothing is
        downloaded: a hub id is an error."""
        folder = Path(path)
        model_type = _model_type(folder)
        if model_type not in _FAMILIES:
            held = f"holds a {model_type!r} model" if model_type else "has no config.json"
            raise ModelFolderError(f"vision_tower={folder}: {held}; a vision tower is a CLIP or SigLIP vision "
                                   f"encoder (model_type one of {sorted(_FAMILIES)}). A UniMM visual tokenizer folder "
                                   f"is loaded with unimm.tokenizer.load_tokenizer instead")
        processor_file = folder / "preprocessor_config.json"
        if not processor_file.is_file():
            raise ModelFolderError(f"vision_tower={folder}: preprocessor_config.json missing (the encoder's image "
                                   f"processor, which gives the image size, mean and std); save it beside the "
                                   f"weights (`CLIPImageProcessor.save_pretrained`)")
        family, encoder_class, has_cls = _FAMILIES[model_type]
        processor = _read_json(processor_file)
        missing = [key for key in ("image_mean", "image_std") if key not in processor]
        if missing:
            raise ModelFolderError(f"{processor_file}: lacks {missing}")
        side, processor_aspect = _processor_geometry(processor, processor_file)
        # whole on every rank even under ZeRO-3: the tower runs outside the training engine, which would otherwise
        # own (and gather) its partitioned weights
        with model_folder("vision_tower", folder, f"a {family} vision encoder"), zero3_init_disabled():
            encoder, loading = encoder_class.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                             output_loading_info=True)
        if loading["missing_keys"]:
            # transformers only warns and leaves these randomly initialised: a silently random tower
            missing = sorted(loading["missing_keys"])
            raise ModelFolderError(f"vision_tower={folder}: the checkpoint lacks {len(missing)} weights of the {family} "
                                   f"vision encoder (e.g. {missing[:3]}); it would run with random weights there")
        if side != encoder.config.image_size:
            raise ModelFolderError(f"vision_tower={folder}: the image processor makes {side}px images but the "
                                   f"encoder takes {encoder.config.image_size}px")
        return cls(encoder, family, has_cls, processor["image_mean"], processor["image_std"], processor_aspect,
                   select_layer=select_layer, select_feature=select_feature, image_aspect_ratio=image_aspect_ratio,
                   path=str(folder.resolve()), freeze=freeze)

    def to_dict(self) -> dict[str, Any]:
        """What `UniMMConfig.vision_tower` records, and `from_dict` takes back."""
        return {"path": self.path, "family": self.family, "select_layer": self.select_layer,
                "select_feature": self.select_feature, "image_aspect_ratio": self.image_aspect_ratio}

    @classmethod
    def from_dict(cls, entry: dict[str, Any], path: str | os.PathLike | None = None, **kwargs: Any) -> VisionTower:
        """Rebuild the tower `to_dict` described; `path` replaces the recorded folder (a model moved machines)."""
        tower = cls.from_path(path or entry["path"], select_layer=entry["select_layer"],
                              select_feature=entry["select_feature"],
                              image_aspect_ratio=entry.get("image_aspect_ratio", "square"), **kwargs)
        if tower.family != entry.get("family", tower.family):
            raise ModelFolderError(f"vision_tower={tower.path}: holds a {tower.family} encoder but the model was "
                                   f"trained on a {entry['family']} one")
        return tower

    def model_config_kwargs(self, projector_type: str = "mlp2x_gelu") -> dict[str, Any]:
        """`UniMMForCausalLM.from_llm(..., **tower.model_config_kwargs())`: a projector from this tower's width."""
        return {"feature_dim": self.feature_dim, "feature_projector_type": projector_type,
                "vision_tower": self.to_dict()}

    # -- shapes and preprocessing --------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def num_patches(self) -> int:
        return (self.image_size // int(self.encoder.config.patch_size)) ** 2

    @property
    def num_positions(self) -> int:
        """N: features per image, i.e. image positions per image span."""
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def image_transform(self) -> ImageTransform:
        """PIL image -> the normalised `pixel_values [3, S, S]` this tower takes (a property, as on tokenizers)."""
        return ImageTransform.for_tokenizer(self)

    def preprocess(self, images: list[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL images -> `pixel_values [B, 3, S, S]` through `image_transform` (the tokenizers' `preprocess`)."""
        return self.image_transform.batch([images] if isinstance(images, Image.Image) else images)

    # -- training state -----------------------------------------------------------------------------------------
    def freeze(self) -> VisionTower:
        """No gradients and eval mode (no dropout), kept through `train()`; LLaVA-1.5 never trains its tower."""
        self.encoder.requires_grad_(False)
        return self.train(self.training)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    # -- features ---------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values [B, 3, S, S]` -> `features [B, N, D]` (N = `num_positions`, D = `feature_dim`)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"vision tower {self.path} takes pixel_values [B, 3, {self.image_size}, "
                             f"{self.image_size}], got {list(pixel_values.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            outputs = self.encoder(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.select_layer]  # [B, (1 +) num_patches, D]
        if self.has_cls_token and self.select_feature == "patch":
            features = features[:, 1:]
        return features

    encode_features = forward  # the name the trainer calls on a visual tokenizer
