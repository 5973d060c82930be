"""Tokenizer training losses: reconstruction (L2 + LPIPS + adversarial), hinge GAN losses, the adaptive GAN
weight, self-distillation and the semantic (MSE + 1 - cos) loss.

`ReconstructionLoss` composes the generator side and owns the discriminator; the training loop calls
`generator_loss` and `discriminator_loss` with its own optimisers (docs/DESIGN.md §2.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unimm.tokenizer.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from unimm.tokenizer.lpips import LPIPS


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, leaky: bool = False) -> torch.Tensor:
    """`0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))`; `leaky` uses leaky_relu (slope 0.01) as the
    DualToken reference's `hinge_d_loss` does (vqgan/gan_loss.py)."""
    act = F.leaky_relu if leaky else F.relu
    return 0.5 * (act(1.0 - logits_real).mean() + act(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """`-mean(D(x_hat))`."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    reconstruction_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    last_layer: torch.Tensor,
    eps: float = 1e-4,
    max_weight: float = 1e4,
    min_weight: float = 0.0,
) -> torch.Tensor:
    """Balance the adversarial gradient against the reconstruction gradient at the decoder's last layer:
    `||grad(L_rec)|| / (||grad(L_G)|| + eps)`, clamped to `[min_weight, max_weight]` and detached (VQGAN:
    [0, 1e4]; the DualToken reference: [0.3, 10])."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gen_grad.norm() + eps)
    return weight.clamp(min_weight, max_weight).detach()


def self_distillation_loss(features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """`||E(x) - E0(x)||^2` (mean over elements) against a frozen teacher's features (VQRAE stage 2)."""
    return F.mse_loss(features.float(), teacher_features.detach().float())


def semantic_loss(features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """MSE + (1 - cosine similarity along the channel dim) against a frozen teacher (DualToken)."""
    features, teacher_features = features.float(), teacher_features.detach().float()
    cosine = F.cosine_similarity(features, teacher_features, dim=-1).mean()
    return F.mse_loss(features, teacher_features) + (1.0 - cosine)


def cosine_distance(features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity along the channel dim (mean), against a frozen teacher (DualToken's stage-2 layer term)."""
    return 1.0 - F.cosine_similarity(features.float(), teacher_features.detach().float(), dim=-1).mean()


def to_lpips_range(pixel_values: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo the encoder's image-processor normalisation and map to [-1, 1], the range LPIPS expects."""
    mean_t = torch.tensor(mean, device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    return (pixel_values * std_t + mean_t) * 2.0 - 1.0


@dataclass
class ReconstructionLossConfig:
    l2_weight: float = field(default=1.0, metadata={"help": "Weight of the pixel L2 (MSE) loss."})
    perceptual_weight: float = field(default=1.0, metadata={"help": "Weight of the LPIPS loss (0 disables LPIPS)."})
    lpips_vgg_path: str | None = field(
        default=None, metadata={"help": "torchvision-format VGG16 state dict for LPIPS (.pth/.safetensors)."}
    )
    lpips_lin_path: str | None = field(default=None, metadata={"help": "LPIPS v0.1 linear-head weights (vgg.pth)."})
    require_pretrained_lpips: bool = field(
        default=False, metadata={"help": "Refuse to start when LPIPS weights are not given (real training recipes)."}
    )
    gan_weight: float = field(
        default=0.0, metadata={"help": "lambda_G, weight of the adversarial loss (0 disables the GAN)."}
    )
    gan_start_step: int = field(default=0, metadata={"help": "Step from which the adversarial loss is active."})
    adaptive_gan_weight: bool = field(
        default=True, metadata={"help": "Scale the GAN loss by the grad-norm ratio at the decoder's last layer."}
    )
    adaptive_weight_min: float = field(
        default=0.0, metadata={"help": "Lower clamp of the adaptive GAN weight (VQGAN 0; DualToken reference 0.3)."}
    )
    adaptive_weight_max: float = field(
        default=1e4, metadata={"help": "Upper clamp of the adaptive GAN weight (VQGAN 1e4; DualToken reference 10)."}
    )
    adaptive_weight_l2_weight: float | None = field(
        default=None,
        metadata={"help": "L2 weight inside the reconstruction loss whose gradient the adaptive weight measures; "
                          "None = l2_weight (the loss as trained). DualToken's reference measures MSE + LPIPS (1) "
                          "while training on 5 x MSE + LPIPS."},
    )
    disc_loss_weight: float = field(
        default=1.0, metadata={"help": "Factor on the discriminator's hinge loss (DualToken reference 0.75)."}
    )
    disc_loss_weight_from_step: int = field(
        default=0,
        metadata={"help": "Step from which disc_loss_weight applies; the factor is 1 before it (the DualToken "
                          "reference: 1 in the GAN's first epoch, 0.75 after)."},
    )
    disc_leaky_hinge: bool = field(
        default=False, metadata={"help": "Discriminator hinge with leaky_relu (DualToken reference) instead of relu."}
    )
    disc_base_channels: int = field(default=64, metadata={"help": "PatchGAN width of the first layer."})
    disc_num_layers: int = field(default=3, metadata={"help": "PatchGAN number of downsampling layers."})
    disc_norm: str = field(default="group", metadata={"help": "PatchGAN normalisation: group | batch | none."})
    disc_arch: str = field(
        default="conv",
        metadata={"help": "PatchGAN form: 'conv' (pix2pix stack) or 'residual' (the DualToken reference's pre-norm "
                          "GroupNorm residual blocks; disc_norm does not apply)."},
    )


def check_lpips_weights(config: ReconstructionLossConfig) -> None:
    """Raise when a recipe requires pretrained LPIPS but its weight files are not configured."""
    if config.perceptual_weight <= 0 or not config.require_pretrained_lpips:
        return
    missing = [k for k in ("lpips_vgg_path", "lpips_lin_path") if getattr(config, k) is None]
    if missing:
        raise ValueError(
            f"require_pretrained_lpips is set but {' and '.join(missing)} is not given: this recipe needs "
            "real LPIPS weights (a torchvision-format VGG16 state dict and the LPIPS v0.1 vgg.pth heads)."
        )


class ReconstructionLoss(nn.Module):
    """L2 + LPIPS + hinge-GAN reconstruction objective with its PatchGAN discriminator.

    Inputs are tokenizer-normalised pixel values; `mean`/`std` (the encoder's image-processor settings) map
    them back for LPIPS. The discriminator sees the normalised pixels directly.
    """

    def __init__(self, config: ReconstructionLossConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.config = config
        self.mean, self.std = tuple(mean), tuple(std)
        self.lpips: LPIPS | None = None
        if config.perceptual_weight > 0:
            check_lpips_weights(config)
            self.lpips = LPIPS(config.lpips_vgg_path, config.lpips_lin_path)
        self.discriminator: PatchDiscriminator | None = None
        if config.gan_weight > 0:
            self.discriminator = PatchDiscriminator(
                PatchDiscriminatorConfig(
                    base_channels=config.disc_base_channels, num_layers=config.disc_num_layers, norm=config.disc_norm,
                    arch=config.disc_arch,
                )
            )

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.gan_start_step

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted reconstruction loss for the tokenizer's update, and its detached parts for logging."""
        cfg = self.config
        inputs, reconstructions = inputs.float(), reconstructions.float()
        l2 = F.mse_loss(reconstructions, inputs)
        total = cfg.l2_weight * l2
        logs: dict[str, torch.Tensor] = {"l2": l2.detach()}
        if self.lpips is not None:
            perceptual = self.lpips(
                to_lpips_range(reconstructions, self.mean, self.std), to_lpips_range(inputs, self.mean, self.std)
            ).mean()
            total = total + cfg.perceptual_weight * perceptual
            logs["lpips"] = perceptual.detach()
        if self.gan_active(step):
            assert self.discriminator is not None
            # The discriminator is not updated by the generator's loss; freezing avoids wasted grads.
            self.discriminator.requires_grad_(False)
            generator = hinge_generator_loss(self.discriminator(reconstructions))
            self.discriminator.requires_grad_(True)
            weight = torch.ones((), device=inputs.device)
            if cfg.adaptive_gan_weight and last_layer is not None and torch.is_grad_enabled():
                measured = total
                if cfg.adaptive_weight_l2_weight is not None:
                    measured = cfg.adaptive_weight_l2_weight * l2
                    if "lpips" in logs:
                        measured = measured + cfg.perceptual_weight * perceptual
                weight = adaptive_gan_weight(measured, generator, last_layer, max_weight=cfg.adaptive_weight_max,
                                             min_weight=cfg.adaptive_weight_min)
            total = total + cfg.gan_weight * weight * generator
            logs["gan_g"] = generator.detach()
            logs["gan_adaptive_weight"] = weight.detach()
        return total, logs

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, discriminator: nn.Module | None = None,
        step: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss for the discriminator's update (reconstructions are detached here), times `disc_loss_weight`
        from `disc_loss_weight_from_step` on (`step` None: the weight applies).

        `discriminator` may be a distributed wrapper of `self.discriminator` so its gradients are synchronised.
        """
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss called but gan_weight is 0 (no discriminator was built)")
        discriminator = discriminator if discriminator is not None else self.discriminator
        logits_real = discriminator(inputs.detach().float())
        logits_fake = discriminator(reconstructions.detach().float())
        cfg = self.config
        weighted = step is None or step >= cfg.disc_loss_weight_from_step
        loss = (cfg.disc_loss_weight if weighted else 1.0) * hinge_discriminator_loss(
            logits_real, logits_fake, leaky=cfg.disc_leaky_hinge
        )
        logs = {
            "gan_d": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs
