"""
Convolutional autoencoder and VAE (Kingma & Welling 2014) with the interface of diffusers' ``AutoencoderKL``.

Reading order: ResBlock, Encoder, Decoder, AutoencoderModel, VAEModel, presets.

    sample (B, in, H, W) -> conv_in -> [level: layers_per_block x ResBlock, downsample] x L -> ResBlock
                         -> GroupNorm, SiLU, conv_out -> moments (B, 2 * latent, H/f, W/f)   f = 2 ** (L - 1)
    moments -> DiagonalGaussianDistribution -> z (B, latent, H/f, W/f)
    z -> conv_in -> ResBlock -> [level: layers_per_block x ResBlock, upsample] x L -> GroupNorm, SiLU, conv_out
      -> (B, out, H, W), images in [-1, 1] (no output squashing, as in AutoencoderKL)

``encode(x)`` returns ``AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)`` and ``decode(z)`` returns
``DecoderOutput(sample)``, both from diffusers, so an hfgen VAE stands wherever a diffusers pipeline expects a VAE.
The plain ``AutoencoderModel`` returns a zero-variance distribution (``deterministic=True``: ``std`` is 0,
``sample()`` is the mean and ``kl()`` is 0), so the same code path serves both.

``config.scaling_factor`` is 1/std of the latents over the training data (set by ``training/train_autoencoder.py``):
latent diffusion multiplies ``encode(x).latent_dist.sample()`` by it so latents have unit variance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn

from .layers import GroupNorm
from .loading import SafeLoadingMixin
from .unet import Downsample, Upsample  # the same strided-conv / nearest+conv resampling as the U-Net

# logvar that DiagonalGaussianDistribution clamps to: the "zero variance" of the plain autoencoder's posterior
_MIN_LOGVAR = -30.0

# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """
    GroupNorm, SiLU, conv 3x3, GroupNorm, SiLU, conv 3x3; plus a (1x1 conv) skip.

    :param in_channels: channels of the input [N x in_channels x H x W].
    :param out_channels: channels of the output [N x out_channels x H x W].
    :param norm_num_groups: GroupNorm groups; both channel counts must divide by it.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.norm1 = GroupNorm(norm_num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(norm_num_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: (B, C_in, H, W). :return: (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        return self.skip(x) + h


# ----------------------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """
    Image (B, in_channels, H, W) -> (B, out_channels, H/f, W/f) with f = 2 ** (len(block_out_channels) - 1).

    :param block_out_channels: channels per level; every level but the last ends with a downsample.
    :param layers_per_block: ResBlocks per level.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        ch = block_out_channels[0]
        for i, level_ch in enumerate(block_out_channels):
            blocks = nn.ModuleList()
            for _ in range(layers_per_block):
                blocks.append(ResBlock(ch, level_ch, norm_num_groups))
                ch = level_ch
            down = Downsample(ch) if i < len(block_out_channels) - 1 else nn.Identity()
            self.levels.append(nn.ModuleDict({"blocks": blocks, "down": down}))
        self.mid = ResBlock(ch, ch, norm_num_groups)
        self.norm_out = GroupNorm(norm_num_groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for level in self.levels:
            for block in level["blocks"]:
                h = block(h)  # (B, C_i, H_i, W_i)
            h = level["down"](h)  # (B, C_i, H_i / 2, W_i / 2), except at the last level
        h = self.mid(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, H/f, W/f)


class Decoder(nn.Module):
    """
    Latent (B, in_channels, h, w) -> image (B, out_channels, h * f, w * f): the encoder's levels in reverse.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
    ):
        super().__init__()
        reversed_channels = tuple(reversed(block_out_channels))
        ch = reversed_channels[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.mid = ResBlock(ch, ch, norm_num_groups)
        self.levels = nn.ModuleList()
        for i, level_ch in enumerate(reversed_channels):
            blocks = nn.ModuleList()
            for _ in range(layers_per_block):
                blocks.append(ResBlock(ch, level_ch, norm_num_groups))
                ch = level_ch
            up = Upsample(ch) if i < len(reversed_channels) - 1 else nn.Identity()
            self.levels.append(nn.ModuleDict({"blocks": blocks, "up": up}))
        self.norm_out = GroupNorm(norm_num_groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_last, h, w)
        for level in self.levels:
            for block in level["blocks"]:
                h = block(h)  # (B, C_i, h_i, w_i)
            h = level["up"](h)  # (B, C_i, 2 h_i, 2 w_i), except at the last level
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, h * f, w * f)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


class AutoencoderModel(SafeLoadingMixin, ModelMixin, ConfigMixin):
    """
    Deterministic convolutional autoencoder with the ``AutoencoderKL`` interface (its posterior has zero variance).

    :param in_channels: image channels in.
    :param out_channels: image channels out (normally = in_channels).
    :param sample_size: image side the model was trained at (informational, used by pipelines for defaults).
    :param block_out_channels: channels per level; downsampling factor f = 2 ** (len - 1).
    :param layers_per_block: ResBlocks per level in the encoder and decoder.
    :param latent_channels: channels of the latent z (B, latent_channels, H/f, W/f).
    :param norm_num_groups: GroupNorm groups; every entry of block_out_channels must divide by it.
    :param scaling_factor: 1/std of the latents over the training data; multiply latents by it for diffusion.
    """

    variational = False  # VAEModel: the encoder predicts a log-variance too

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 8,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        if not block_out_channels:
            raise ValueError("block_out_channels must have at least one level, got ()")
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {block_out_channels} must all divide by norm_num_groups ({norm_num_groups})"
            )
        moments = 2 * latent_channels if self.variational else latent_channels
        self.encoder = Encoder(in_channels, moments, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 2 ** (len(block_out_channels) - 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # -- input checks --------------------------------------------------------------------------------------------------

    def _check_images(self, x: torch.Tensor, name: str = "sample") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"{name} has {x.shape[1]} channels, but config.in_channels is {self.config.in_channels}")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"{name} height and width must be divisible by {f}, got {x.shape[2]}x{x.shape[3]}")

    # -- AutoencoderKL interface ---------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """
        :param x: images (B, in_channels, H, W) in [-1, 1]; H and W divisible by ``downsample_factor``.
        :return: ``AutoencoderKLOutput(latent_dist)`` (or ``(latent_dist,)``), a ``DiagonalGaussianDistribution``
            over latents (B, latent_channels, H/f, W/f).
        """
        self._check_images(x)
        # 1. encode to the moments: (B, 2 * latent, h, w) = [mean | logvar] for the VAE, (B, latent, h, w) for the AE
        moments = self.encoder(x)
        # 2. the plain AE is a point mass: logvar at the clamp floor and deterministic=True (std = 0, kl() = 0)
        if self.variational:
            posterior = DiagonalGaussianDistribution(moments)
        else:
            logvar = torch.full_like(moments, _MIN_LOGVAR)
            posterior = DiagonalGaussianDistribution(torch.cat([moments, logvar], dim=1), deterministic=True)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """
        :param z: latents (B, latent_channels, h, w) (unscaled: divide diffusion latents by scaling_factor first).
        :return: ``DecoderOutput(sample)`` (or ``(sample,)``), images (B, out_channels, h * f, w * f) in ~[-1, 1].
        """
        if not isinstance(z, torch.Tensor) or z.ndim != 4:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a tensor of shape (B, {self.config.latent_channels}, h, w), got {shape}")
        if z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"z has {z.shape[1]} channels, but config.latent_channels is {self.config.latent_channels}"
            )
        dec = self.decoder(z)
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DecoderOutput | tuple:
        """Reconstruct ``sample``: decode a posterior sample (``sample_posterior``) or its mode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    # -- anomaly scoring -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor, kind: str = "mse") -> torch.Tensor:
        """
        Per-sample reconstruction error of the posterior mode, for anomaly scoring (higher = less like the data).

        :param x: images (B, in_channels, H, W) in [-1, 1].
        :param kind: "mse": mean squared error over C, H, W; "l1": mean absolute error; "bce": mean binary
            cross-entropy of the pixels mapped to [0, 1] (targets (x + 1) / 2, predictions clamped into (0, 1)).
        :return: (B,) float tensor.
        """
        if kind not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"kind must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}")
        recon = self(x).sample  # (B, C, H, W)
        return reconstruction_loss(recon, x, kind).flatten(1).mean(dim=1)  # (B,)


class VAEModel(AutoencoderModel):
    """
    Variational autoencoder: the encoder predicts the mean and log-variance of a diagonal Gaussian posterior,
    trained with a KL term to the prior N(0, I). Same constructor and config keys as ``AutoencoderModel``.
    """

    variational = True


# ----------------------------------------------------------------------------------------------------------------------
# Losses shared by training and scoring
# ----------------------------------------------------------------------------------------------------------------------

RECONSTRUCTION_LOSSES = ("mse", "l1", "bce")


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """
    Element-wise reconstruction loss (B, C, H, W) between images in [-1, 1].

    "mse" / "l1" compare the images directly; "bce" is the Bernoulli negative log-likelihood of the pixels mapped
    to [0, 1], with the prediction clamped into [1e-4, 1 - 1e-4].
    """
    if kind == "mse":
        return (recon - target) ** 2
    if kind == "l1":
        return (recon - target).abs()
    if kind == "bce":
        p = ((recon.float() + 1) / 2).clamp(1e-4, 1 - 1e-4)
        t = ((target.float() + 1) / 2).clamp(0, 1)
        return F.binary_cross_entropy(p, t, reduction="none")
    raise ValueError(f"kind must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------------

AUTOENCODER_PRESETS = {
    # f = 4: 32x32 -> 8x8 latents
    "ae-tiny": {"block_out_channels": (8, 16, 16), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4},
    "ae-small": {"block_out_channels": (32, 64, 128), "layers_per_block": 1, "latent_channels": 4},
    # f = 8: 32x32 -> 4x4 latents
    "ae-f8": {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "latent_channels": 4},
}
