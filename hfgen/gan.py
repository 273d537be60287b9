"""
DCGAN generator and discriminator (Radford et al. 2016), with optional class conditioning: the generator embeds the
label and concatenates it to (or multiplies it into) z; the discriminator adds Miyato & Koyama's (2018) projection
term <embed(y), phi(x)> to its logit. Spectral normalisation (Miyato et al. 2018) is optional in the discriminator.

Reading order: output dataclasses, UpBlock, DownBlock, GANGenerator, GANDiscriminator, presets.

    generator:     z (B, latent_dim) [+ label] -> Linear -> (B, C0, s0, s0), s0 = sample_size / 2 ** L
                   -> [ConvTranspose 4x4 /2, BatchNorm, ReLU] x (L - 1) -> ConvTranspose 4x4 /2 -> tanh
                   -> (B, out_channels, sample_size, sample_size) in [-1, 1]
    discriminator: x (B, in, S, S) -> [conv 4x4 stride 2, LeakyReLU(0.2)] x L -> (B, C_last, s0, s0)
                   [-> + minibatch std channel -> conv 3x3, LeakyReLU] -> phi (B, C_last * s0 * s0)
                   -> logit = w . phi + b (+ <embed(y), phi>) -> (B,)

The minibatch standard deviation channel (Karras et al. 2018, ProGAN) lets the discriminator see how varied a group
of images is, which keeps an unnormalised DCGAN discriminator from letting the generator collapse to one image.

Both networks output raw values; the losses (non-saturating, hinge, R1) live in ``training/train_gan.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm

from .layers import labels_per_sample
from .loading import SafeLoadingMixin

CLASS_CONDITIONINGS = ("concat", "multiply")

# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class GANGeneratorOutput(BaseOutput):
    """:param sample: generated images [N x out_channels x H x W] in [-1, 1]."""

    sample: torch.Tensor


@dataclass
class GANDiscriminatorOutput(BaseOutput):
    """:param logits: one real-vs-fake logit per image [N] (higher = more real)."""

    logits: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class UpBlock(nn.Module):
    """ConvTranspose 4x4 stride 2, BatchNorm, ReLU: (B, C_in, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class DownBlock(nn.Module):
    """Conv 4x4 stride 2 (optionally spectrally normalised), LeakyReLU(0.2): (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, spectral_norm: bool):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
        self.conv = apply_spectral_norm(conv) if spectral_norm else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.2)


def minibatch_stddev(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """
    Append one channel holding, for each group of ``group_size`` images, the mean over (C, H, W) of the standard
    deviation across the group: (B, C, H, W) -> (B, C + 1, H, W). A batch that does not divide by ``group_size``
    forms one group. Groups are consecutive images (image b is in group b // G), so a batch split over processes in
    multiples of ``group_size`` forms the same groups as the whole batch on one process.
    """
    B, C, H, W = h.shape
    G = group_size if B % group_size == 0 else B
    groups = h.float().view(B // G, G, C, H, W)  # image b is in group b // G
    std = (groups.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B // G,)
    feature = std.repeat_interleave(G).view(B, 1, 1, 1).expand(B, 1, H, W).to(h.dtype)  # (B, 1, H, W)
    return torch.cat([h, feature], dim=1)


def _check_size(sample_size: int, num_levels: int) -> int:
    """Side s0 of the smallest feature map: sample_size / 2 ** num_levels, which must be a whole number >= 1."""
    s0, rest = divmod(sample_size, 2**num_levels)
    if rest or s0 < 1:
        raise ValueError(
            f"sample_size ({sample_size}) must be a multiple of 2 ** len(block_out_channels) = {2**num_levels}"
        )
    return s0


def _check_labels(
    class_labels: torch.Tensor | None, num_classes: int | None, batch: int, device
) -> torch.Tensor | None:
    """Labels as a long tensor (B,) in [0, num_classes), or None for an unconditional model."""
    if class_labels is None:
        if num_classes:
            raise ValueError(f"class_labels are required: the model is class-conditional (num_classes={num_classes})")
        return None
    class_labels = labels_per_sample(class_labels, num_classes, batch, device)
    if (class_labels < 0).any() or (class_labels >= num_classes).any():
        raise ValueError(f"class_labels must be in [0, {num_classes - 1}], got {class_labels.tolist()}")
    return class_labels.long()


# ----------------------------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------------------------


class GANGenerator(SafeLoadingMixin, ModelMixin, ConfigMixin):
    """
    DCGAN generator: z (B, latent_dim) -> images (B, out_channels, sample_size, sample_size) in [-1, 1].

    :param sample_size: image side; must be a multiple of 2 ** len(block_out_channels).
    :param out_channels: image channels.
    :param latent_dim: width of z ~ N(0, I).
    :param block_out_channels: channels of the feature maps from the smallest (s0 x s0) up; each level doubles H, W.
    :param num_classes: None: unconditional; else labels in [0, num_classes) are embedded in latent_dim.
    :param class_conditioning: "concat": [z, embed(y)] (B, 2 * latent_dim); "multiply": z * embed(y).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        out_channels: int = 3,
        latent_dim: int = 128,
        block_out_channels: tuple[int, ...] = (256, 128, 64),
        num_classes: int | None = None,
        class_conditioning: str = "concat",
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        if class_conditioning not in CLASS_CONDITIONINGS:
            raise ValueError(f"class_conditioning must be one of {CLASS_CONDITIONINGS}, got {class_conditioning!r}")
        self.s0 = _check_size(sample_size, len(block_out_channels))
        self.class_embedding = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = 2 * latent_dim if num_classes and class_conditioning == "concat" else latent_dim
        self.proj = nn.Linear(in_dim, block_out_channels[0] * self.s0 * self.s0, bias=False)
        self.proj_norm = nn.BatchNorm2d(block_out_channels[0])
        self.blocks = nn.ModuleList(UpBlock(c_in, c_out) for c_in, c_out in pairwise(block_out_channels))
        self.conv_out = nn.ConvTranspose2d(block_out_channels[-1], out_channels, 4, stride=2, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DCGAN init: conv weights N(0, 0.02), BatchNorm gains N(1, 0.02), biases 0; label embeddings N(0, 1)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, 0.0, 1.0)

    def forward(
        self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True
    ) -> GANGeneratorOutput | tuple:
        """
        :param latents: z (B, latent_dim), normally N(0, I).
        :param class_labels: (B,) integers in [0, num_classes) for a conditional model, else None.
        :return: ``GANGeneratorOutput(sample)`` or ``(sample,)``: (B, out_channels, sample_size, sample_size).
        """
        cfg = self.config
        if not isinstance(latents, torch.Tensor) or latents.ndim != 2 or latents.shape[1] != cfg.latent_dim:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape (B, {cfg.latent_dim}) (config.latent_dim), got {shape}")
        B = latents.shape[0]
        class_labels = _check_labels(class_labels, cfg.num_classes, B, latents.device)

        # 1. condition z on the label
        z = latents.to(self.proj.weight.dtype)  # (B, D)
        if self.class_embedding is not None:
            emb = self.class_embedding(class_labels)  # (B, D)
            z = torch.cat([z, emb], dim=1) if cfg.class_conditioning == "concat" else z * emb  # (B, 2D) or (B, D)
        # 2. project to the smallest feature map
        h = self.proj(z).view(B, -1, self.s0, self.s0)  # (B, C0, s0, s0)
        h = F.relu(self.proj_norm(h))
        # 3. upsample: each block doubles H and W
        for block in self.blocks:
            h = block(h)  # (B, C_i, 2 H_i, 2 W_i)
        # 4. to pixels
        sample = torch.tanh(self.conv_out(h))  # (B, out, S, S)
        if not return_dict:
            return (sample,)
        return GANGeneratorOutput(sample=sample)


# ----------------------------------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------------------------------


class GANDiscriminator(SafeLoadingMixin, ModelMixin, ConfigMixin):
    """
    DCGAN discriminator without normalisation layers, optionally spectrally normalised, with an optional minibatch
    standard deviation channel and an optional projection term for class conditioning.

    :param sample_size: image side; must be a multiple of 2 ** len(block_out_channels).
    :param in_channels: image channels.
    :param block_out_channels: channels after each stride-2 conv, from the full resolution down.
    :param num_classes: None: unconditional; else a projection embedding of num_classes rows.
    :param spectral_norm: spectrally normalise every conv and linear layer.
    :param minibatch_std_group_size: group size of the minibatch standard deviation channel; 0 turns it off.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64, 128, 256),
        num_classes: int | None = None,
        spectral_norm: bool = False,
        minibatch_std_group_size: int = 4,
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        if minibatch_std_group_size < 0:
            raise ValueError(f"minibatch_std_group_size must be >= 0, got {minibatch_std_group_size}")
        s0 = _check_size(sample_size, len(block_out_channels))
        channels = (in_channels,) + block_out_channels
        self.blocks = nn.ModuleList(DownBlock(c_in, c_out, spectral_norm) for c_in, c_out in pairwise(channels))
        self.mbstd_conv = None
        if minibatch_std_group_size:
            conv = nn.Conv2d(block_out_channels[-1] + 1, block_out_channels[-1], 3, padding=1)
            self.mbstd_conv = apply_spectral_norm(conv) if spectral_norm else conv
        feature_dim = block_out_channels[-1] * s0 * s0
        linear = nn.Linear(feature_dim, 1)
        self.linear = apply_spectral_norm(linear) if spectral_norm else linear
        self.class_embedding = None
        if num_classes:
            embedding = nn.Embedding(num_classes, feature_dim)
            self.class_embedding = apply_spectral_norm(embedding) if spectral_norm else embedding
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DCGAN init: weights N(0, 0.02), biases 0 (spectral norm rescales them anyway)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
                nn.init.normal_(weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self, sample: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True
    ) -> GANDiscriminatorOutput | tuple:
        """
        :param sample: images (B, in_channels, sample_size, sample_size) in [-1, 1].
        :param class_labels: (B,) integers in [0, num_classes) for a conditional model, else None.
        :return: ``GANDiscriminatorOutput(logits)`` or ``(logits,)``, logits (B,).
        """
        cfg = self.config
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"sample must have shape (B, C, H, W), got {shape}")
        B, C, H, W = sample.shape
        if C != cfg.in_channels:
            raise ValueError(f"sample has {C} channels, but config.in_channels is {cfg.in_channels}")
        if H != cfg.sample_size or W != cfg.sample_size:
            raise ValueError(f"sample must be {cfg.sample_size}x{cfg.sample_size} (config.sample_size), got {H}x{W}")
        class_labels = _check_labels(class_labels, cfg.num_classes, B, sample.device)

        # 1. features: strided convs halve H and W each
        h = sample
        for block in self.blocks:
            h = block(h)  # (B, C_i, H_i / 2, W_i / 2)
        if self.mbstd_conv is not None:
            h = minibatch_stddev(h, cfg.minibatch_std_group_size)  # (B, C_last + 1, s0, s0)
            h = F.leaky_relu(self.mbstd_conv(h), 0.2)  # (B, C_last, s0, s0)
        phi = h.flatten(1)  # (B, C_last * s0 * s0)
        # 2. unconditional logit, plus the projection <embed(y), phi>
        logits = self.linear(phi).squeeze(1)  # (B,)
        if self.class_embedding is not None:
            logits = logits + (self.class_embedding(class_labels) * phi).sum(dim=1)  # (B,)
        if not return_dict:
            return (logits,)
        return GANDiscriminatorOutput(logits=logits)


# ----------------------------------------------------------------------------------------------------------------------
# Presets (generator kwargs, discriminator kwargs)
# ----------------------------------------------------------------------------------------------------------------------

GAN_PRESETS = {
    "dcgan-tiny": (
        {"latent_dim": 16, "block_out_channels": (32, 16, 8)},
        {"block_out_channels": (8, 16, 32)},
    ),
    "dcgan-small": (
        {"latent_dim": 64, "block_out_channels": (128, 64, 32)},
        {"block_out_channels": (32, 64, 128)},
    ),
    "dcgan": (
        {"latent_dim": 128, "block_out_channels": (256, 128, 64)},
        {"block_out_channels": (64, 128, 256)},
    ),
}
