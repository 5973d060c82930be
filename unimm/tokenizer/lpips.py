"""LPIPS perceptual distance (v0.1, VGG16 backbone) without torchvision or the `lpips` package.

The VGG16 convolution stack is built here with `torch.nn` using the same module indices as torchvision's
`vgg16().features`, so a torchvision-format state dict (`features.0.weight`, ..., optionally with the
`classifier.*` keys, which are ignored) loads by key. The five linear heads take the LPIPS v0.1 file format
(`lin0.model.1.weight` ... `lin4.model.1.weight`, each `[1, C, 1, 1]`).

Without weight files the module warns once and runs on random features with uniform positive heads: the
distance is still zero for identical images and grows with distortion, which is what unit tests need, but it
is not a perceptual metric. Training recipes set `require_pretrained_lpips` so they refuse to start that way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from unimm.utils.logging import warn_once

logger = logging.getLogger(__name__)

# torchvision's VGG16 configuration "D": output channels per conv, "M" = 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)
# Indices in `features` of the ReLUs LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
LPIPS_TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# Input scaling LPIPS applies to images in [-1, 1] (ImageNet mean/std re-expressed in that range).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _build_vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=False))
            in_channels = int(item)
    return nn.Sequential(*layers)  # indices 0..29, ending at relu5_3 (torchvision's last pool, 30, is not needed)


def _load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (mapping of names to tensors), got {type(state).__name__}")
    return state


def _normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Perceptual distance between images in [-1, 1]; returns one value per image (`[B]`).

    vgg_weights:   torchvision-format VGG16 state dict (`.pth` / `.safetensors`), keys `features.N.*`.
    lpips_weights: LPIPS v0.1 linear-head file (`lin{i}.model.1.weight`, as shipped by the lpips package).
    The module is always frozen (no parameter requires grad); gradients flow to the inputs.
    """

    def __init__(self, vgg_weights: str | Path | None = None, lpips_weights: str | Path | None = None) -> None:
        super().__init__()
        self.features = _build_vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        for lin, channels in zip(self.lins, LPIPS_CHANNELS):
            nn.init.constant_(lin.weight, 1.0 / channels)
        self.pretrained_vgg = vgg_weights is not None
        self.pretrained_heads = lpips_weights is not None
        if vgg_weights is not None:
            self.load_vgg_state_dict(_load_state_dict_file(vgg_weights), source=str(vgg_weights))
        if lpips_weights is not None:
            self.load_lpips_heads(_load_state_dict_file(lpips_weights), source=str(lpips_weights))
        if not self.is_pretrained:
            warn_once(
                logger,
                "LPIPS is running without pretrained weights (random VGG16 features and/or uniform heads): "
                "fine for tests, meaningless as a perceptual loss. Set lpips_vgg_path and lpips_lin_path.",
            )
        self.requires_grad_(False)
        self.eval()

    @property
    def is_pretrained(self) -> bool:
        return self.pretrained_vgg and self.pretrained_heads

    def train(self, mode: bool = True) -> LPIPS:
        # Frozen feature extractor: stays in eval mode whatever the parent module does.
        return super().train(False)

    def load_vgg_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load `features.N.weight/bias` from a torchvision VGG16 state dict (other keys are ignored)."""
        wanted = self.features.state_dict()
        found: dict[str, torch.Tensor] = {}
        for key in wanted:
            full = f"features.{key}"
            if full not in state:
                raise KeyError(f"{source}: VGG16 weight {full!r} is missing (expected a torchvision vgg16 state dict)")
            if state[full].shape != wanted[key].shape:
                raise ValueError(
                    f"{source}: {full!r} has shape {tuple(state[full].shape)}, expected {tuple(wanted[key].shape)}"
                )
            found[key] = state[full]
        self.features.load_state_dict(found)
        self.pretrained_vgg = True

    def load_lpips_heads(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the five 1x1 heads from LPIPS v0.1 keys (`lin{i}.model.1.weight`) or this module's own
        (`lins.{i}.weight`)."""
        for i, lin in enumerate(self.lins):
            key = next((k for k in (f"lin{i}.model.1.weight", f"lins.{i}.weight") if k in state), None)
            if key is None:
                raise KeyError(f"{source}: LPIPS head weight 'lin{i}.model.1.weight' is missing")
            if state[key].shape != lin.weight.shape:
                raise ValueError(
                    f"{source}: {key!r} has shape {tuple(state[key].shape)}, expected {tuple(lin.weight.shape)}"
                )
            lin.weight.data.copy_(state[key])
        self.pretrained_heads = True

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        x = (x - self.shift) / self.scale
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in LPIPS_TAP_INDICES:
                taps.append(x)
        return taps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Distance per image, `[B]`; `input`/`target` are `[B, 3, H, W]` in [-1, 1] (H, W >= 16)."""
        if input.shape != target.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(input.shape)} vs {tuple(target.shape)}")
        if input.shape[-1] < 16 or input.shape[-2] < 16:
            raise ValueError(f"LPIPS needs images of at least 16x16 pixels, got {tuple(input.shape[-2:])}")
        batch = input.shape[0]
        # One pass over both images: halves the number of kernel launches.
        taps = self._taps(torch.cat([input, target], dim=0).float())
        total = input.new_zeros(batch, dtype=torch.float32)
        for feats, lin in zip(taps, self.lins):
            a, b = feats[:batch], feats[batch:]
            diff = (_normalize_channels(a) - _normalize_channels(b)).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total
