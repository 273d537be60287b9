"""
U-Net denoiser (Ho et al. 2020; Nichol & Dhariwal 2021 "improved-diffusion"), laid out like diffusers' ``UNet2DModel``.

Reading order: ResBlock, AttentionBlock, Downsample / Upsample, the levels, UNetModel, presets.

    sample (B, in, H, W) -> conv_in -> [down level: layers_per_block x (ResBlock [+ attention]), downsample] x L
                        -> middle: ResBlock, attention, ResBlock
                        -> [up level: (layers_per_block + 1) x (concat skip, ResBlock [+ attention]), upsample] x L
                        -> GroupNorm, SiLU, conv_out -> (B, out, H, W)

The time embedding (plus an optional class embedding) modulates every ResBlock as a scale and shift after its second
GroupNorm. Text tokens, when the model has ``cross_attention_dim``, enter by cross-attention after the self-attention
of each attention level. The structure mirrors a diffusers ``UNet2DModel`` with the same ``block_out_channels``,
``layers_per_block`` and attention placement: parameter counts agree to 0.01% with
``resnet_time_scale_shift="scale_shift"``; against diffusers' default additive time embedding (a half-width projection)
hfgen has 4% (unet-base) to 8% (unet-tiny) more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .cards import HubCardMixin
from .layers import Attention, DenoiserOutput, TimestepEmbedder, check_denoiser_inputs
from .loading import SafeLoadingMixin

# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """
    GroupNorm, SiLU, conv 3x3, GroupNorm * (1 + scale) + shift, SiLU, dropout, conv 3x3; plus a (1x1 conv) skip.

    :param in_channels: channels of the input [N x in_channels x H x W].
    :param out_channels: channels of the output [N x out_channels x H x W].
    :param time_embed_dim: width of the (already SiLU-activated) time embedding that gives scale and shift.
    :param norm_num_groups: GroupNorm groups; both channel counts must divide by it.
    :param dropout: dropout probability before the last conv.
    """

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, norm_num_groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_embed_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)  # zero-initialised in initialize_weights
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """:param x: (B, C_in, H, W). :param emb: SiLU(time embedding) (B, E). :return: (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.time_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C_out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, C_out, H, W)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """
    Self-attention over the H*W positions, then (if ``cross_attention_dim``) cross-attention to text tokens.

    :param channels: channels C of the feature map, the token width.
    :param num_heads: attention heads.
    :param norm_num_groups: GroupNorm groups of the pre-attention norm.
    :param cross_attention_dim: width of the text tokens; None: self-attention only.
    """

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int, cross_attention_dim: int | None = None):
        super().__init__()
        self.norm = nn.GroupNorm(norm_num_groups, channels)
        self.attn = Attention(channels, num_heads)
        self.norm_cross = None
        self.cross_attn = None
        if cross_attention_dim is not None:
            self.norm_cross = nn.LayerNorm(channels)
            self.cross_attn = Attention(channels, num_heads, context_dim=cross_attention_dim)  # to_out zeroed later

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        :param x: feature map (B, C, H, W).
        :param context: text tokens (B, L, cross_attention_dim) or None (then cross-attention is skipped).
        :param context_mask: (B, L), 1 = attend to the token.
        :return: (B, C, H, W).
        """
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C), N = H * W
        h = self.attn(h)  # (B, N, C)
        if self.cross_attn is None or context is None:
            return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        tokens = x.flatten(2).transpose(1, 2) + h  # (B, N, C)
        context = context.to(tokens.dtype)
        tokens = tokens + self.cross_attn(self.norm_cross(tokens), context, context_mask)  # (B, N, C)
        return tokens.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repeat and a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """
    One resolution of the encoder or the decoder: ResBlocks, each followed by an AttentionBlock when the level has
    attention, then an optional resampler (Downsample in the encoder, Upsample in the decoder).
    The model's ``forward`` walks these lists itself, so that skips and gradient checkpointing stay visible there.
    """

    def __init__(self, resnets: list[ResBlock], attentions: list[AttentionBlock] | None, resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resample = resample


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


class UNetModel(SafeLoadingMixin, HubCardMixin, ModelMixin, ConfigMixin):
    """
    U-Net denoiser with optional class and text conditioning. The output is whatever the training objective asks
    for (eps, v or x0); the network does not know which.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,  # training resolution H = W (pipelines read it); must divide by downsample_factor
        in_channels: int = 3,  # channels of the input image or latent
        out_channels: int = 3,  # channels of the prediction
        block_out_channels: tuple[int, ...] = (64, 128, 256),  # channels per level, level 0 = full resolution
        layers_per_block: int = 2,  # ResBlocks per encoder level (the decoder has one more per level)
        attention_levels: tuple[bool, ...] = (False, True, True),  # self-attention at each level, same length as above
        attention_head_dim: int = 32,  # channels per attention head (heads = channels // attention_head_dim)
        norm_num_groups: int = 32,  # GroupNorm groups; every entry of block_out_channels must divide by it
        dropout: float = 0.0,  # dropout inside each ResBlock
        num_classes: int | None = None,  # class-conditional with this many classes (+1 null label); None: off
        cross_attention_dim: int | None = None,  # width of text tokens for cross-attention; None: no text
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        if not block_out_channels:
            raise ValueError("block_out_channels must name at least one level, got ()")
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels must have one entry per level ({len(block_out_channels)}), got {attention_levels}"
            )
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
        for ch in block_out_channels:
            if ch % norm_num_groups:
                raise ValueError(
                    f"block_out_channels entries must be divisible by norm_num_groups ({norm_num_groups}), "
                    f"got {block_out_channels}"
                )
        for i, ch in enumerate(block_out_channels):
            # the middle block (at the last level) always has attention
            if (attention_levels[i] or i == len(block_out_channels) - 1) and ch % attention_head_dim:
                raise ValueError(
                    f"channels of attention levels and of the last level must be divisible by attention_head_dim "
                    f"({attention_head_dim}), got {ch} at level {i}"
                )
        if sample_size % 2 ** (len(block_out_channels) - 1):
            raise ValueError(
                f"sample_size must be divisible by {2 ** (len(block_out_channels) - 1)} "
                f"(2 ** (levels - 1)), got {sample_size}"
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        if cross_attention_dim is not None and cross_attention_dim < 1:
            raise ValueError(f"cross_attention_dim must be None or >= 1, got {cross_attention_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        ch0 = block_out_channels[0]
        time_embed_dim = 4 * ch0
        groups = norm_num_groups

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, time_embed_dim, groups, dropout)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, ch // attention_head_dim, groups, cross_attention_dim)

        # embeddings: t -> sinusoid (ch0) -> MLP (4 * ch0); labels -> table of num_classes + 1 rows (last = null)
        self.time_embed = TimestepEmbedder(time_embed_dim, frequency_dim=ch0)
        self.class_embed = nn.Embedding(num_classes + 1, time_embed_dim) if num_classes is not None else None

        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)

        # encoder; skip_channels records the channels of every tensor pushed on the skip stack
        skip_channels = [ch0]
        ch = ch0
        self.down_levels = nn.ModuleList()
        for i, (out_ch, has_attn) in enumerate(zip(block_out_channels, attention_levels)):
            resnets, attentions = [], []
            for _ in range(layers_per_block):
                resnets.append(res(ch, out_ch))
                if has_attn:
                    attentions.append(attn(out_ch))
                ch = out_ch
                skip_channels.append(ch)
            is_last = i == len(block_out_channels) - 1
            self.down_levels.append(Level(resnets, attentions, None if is_last else Downsample(ch)))
            if not is_last:
                skip_channels.append(ch)

        # middle
        self.mid_res1 = res(ch, ch)
        self.mid_attn = attn(ch)
        self.mid_res2 = res(ch, ch)

        # decoder: each ResBlock consumes one skip
        self.up_levels = nn.ModuleList()
        for i in reversed(range(len(block_out_channels))):
            out_ch, has_attn = block_out_channels[i], attention_levels[i]
            resnets, attentions = [], []
            for _ in range(layers_per_block + 1):
                resnets.append(res(ch + skip_channels.pop(), out_ch))
                if has_attn:
                    attentions.append(attn(out_ch))
                ch = out_ch
            self.up_levels.append(Level(resnets, attentions, Upsample(ch) if i > 0 else None))

        self.norm_out = nn.GroupNorm(groups, ch0)
        self.conv_out = nn.Conv2d(ch0, out_channels, 3, padding=1)

        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero every residual branch's last layer, so each block starts as the identity (improved-diffusion)."""
        for m in self.modules():
            # ResBlock: the conv after the time modulation -> the block returns its skip path
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            # AttentionBlock: self-attention and cross-attention output projections -> x passes through unchanged,
            # in particular a fresh text-conditioned model ignores the text
            if isinstance(m, AttentionBlock):
                for proj in (m.attn.to_out, m.cross_attn.to_out if m.cross_attn is not None else None):
                    if proj is not None:
                        nn.init.zeros_(proj.weight)
                        nn.init.zeros_(proj.bias)
        # output conv -> the fresh model predicts 0 everywhere
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be divisible by this: 2 ** (levels - 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """
        :param sample: noisy input [B x in_channels x H x W]; H and W divisible by ``downsample_factor``.
        :param timestep: a number, a 0-d tensor or one value per sample (B,), in the scheduler's units (0..T-1).
        :param class_labels: (B,) ints in [0, num_classes]; ``num_classes`` (or None) is the null label.
        :param encoder_hidden_states: text tokens (B, L, cross_attention_dim). Needs ``cross_attention_dim``;
            when omitted, cross-attention is skipped.
        :param encoder_attention_mask: (B, L), 1 = keep the token, 0 = ignore it.
        :return: ``DenoiserOutput(sample=(B, out_channels, H, W))``, or ``(sample,)`` if ``return_dict`` is False.
        """
        timesteps, class_labels = check_denoiser_inputs(
            self, sample, timestep, class_labels, encoder_hidden_states, encoder_attention_mask
        )
        context, mask = encoder_hidden_states, encoder_attention_mask

        # 1. embed time (and class): (B,) -> (B, E), activated once for every ResBlock
        emb = self.time_embed(timesteps)  # (B, E)
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)  # (B, E)
        emb = F.silu(emb)

        # 2. encoder: keep every intermediate map as a skip
        h = self.conv_in(sample)  # (B, C0, H, W)
        skips = [h]
        for level in self.down_levels:
            for j, resnet in enumerate(level.resnets):
                h = self._run(resnet, h, emb)  # (B, C_i, H_i, W_i)
                if level.attentions is not None:
                    h = self._run(level.attentions[j], h, context, mask)  # (B, C_i, H_i, W_i)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C_i, H_i / 2, W_i / 2)
                skips.append(h)

        # 3. middle
        h = self._run(self.mid_res1, h, emb)  # (B, C_last, H_last, W_last)
        h = self._run(self.mid_attn, h, context, mask)
        h = self._run(self.mid_res2, h, emb)

        # 4. decoder: every ResBlock eats the most recent skip
        for level in self.up_levels:
            for j, resnet in enumerate(level.resnets):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H_i, W_i)
                h = self._run(resnet, h, emb)  # (B, C_i, H_i, W_i)
                if level.attentions is not None:
                    h = self._run(level.attentions[j], h, context, mask)
            if level.resample is not None:
                h = level.resample(h)  # (B, C_i, 2 H_i, 2 W_i)

        # 5. output
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)
        if not return_dict:
            return (out,)
        return DenoiserOutput(sample=out)


# ----------------------------------------------------------------------------------------------------------------------
# Presets (pass sample_size and conditioning separately: UNetModel(**UNET_PRESETS["unet-small"], sample_size=32))
# ----------------------------------------------------------------------------------------------------------------------

UNET_PRESETS: dict[str, dict] = {
    # tests: ~0.2M parameters
    "unet-tiny": {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "attention_levels": (False, True),
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    # trains on a CPU in minutes at 32x32
    "unet-small": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "attention_levels": (False, True, True),
        "attention_head_dim": 32,
        "norm_num_groups": 8,
    },
    # the DDPM CIFAR-10 shape at 32x32, scaled down
    "unet-base": {
        "block_out_channels": (64, 128, 256),
        "layers_per_block": 2,
        "attention_levels": (False, True, True),
        "attention_head_dim": 32,
        "norm_num_groups": 32,
    },
}
