"""
U-Net denoiser (Ho et al. 2020; Nichol & Dhariwal 2021 "improved-diffusion"), laid out like diffusers' ``UNet2DModel``.

Reading order: time features, ResBlock, AttentionBlock, Downsample / Upsample, the levels, UNetModel, conversion
from diffusers, presets.

    sample (B, in, H, W) -> conv_in -> [down level: layers_per_block x (ResBlock [+ attention]), downsample] x L
                        -> middle: ResBlock, attention, ResBlock
                        -> [up level: (layers_per_block + 1) x (concat skip, ResBlock [+ attention]), upsample] x L
                        -> GroupNorm, SiLU, conv_out -> (B, out, H, W)

The time embedding (plus an optional class embedding) modulates every ResBlock as a scale and shift after its second
GroupNorm (improved-diffusion), or with ``time_scale_shift=False`` is added before it (DDPM). Text tokens, when the
model has ``cross_attention_dim``, enter by cross-attention after the self-attention of each attention level. The
structure mirrors a diffusers ``UNet2DModel`` with the same ``block_out_channels``, ``layers_per_block`` and
attention placement: with the default ``time_scale_shift=True`` parameter counts agree to 0.01% with
``resnet_time_scale_shift="scale_shift"``; against diffusers' default additive time embedding (a half-width
projection) hfgen has 4% (unet-base) to 8% (unet-tiny) more, unless ``time_scale_shift=False``.

``UNetModel.from_diffusers`` converts a ``UNet2DModel`` in the layout of the ``google/ddpm-*`` checkpoints (DDPM
options: additive time embedding, [sin | cos] features with frequency shift 1, right/bottom padding before the
stride-2 conv, GroupNorm eps 1e-6, one attention head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .cards import HubCardMixin
from .layers import Attention, DenoiserOutput, GroupNorm, TimestepEmbedder, check_denoiser_inputs
from .loading import SafeLoadingMixin

# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """
    GroupNorm, SiLU, conv 3x3, GroupNorm * (1 + scale) + shift, SiLU, dropout, conv 3x3; plus a (1x1 conv) skip.
    With ``scale_shift=False`` (DDPM) the time embedding is added instead: GroupNorm(h + Linear(emb)).

    :param in_channels: channels of the input [N x in_channels x H x W].
    :param out_channels: channels of the output [N x out_channels x H x W].
    :param time_embed_dim: width of the (already SiLU-activated) time embedding that gives scale and shift (or the
        added bias).
    :param norm_num_groups: GroupNorm groups; both channel counts must divide by it.
    :param dropout: dropout probability before the last conv.
    :param eps: epsilon of both GroupNorms.
    :param scale_shift: True: the time embedding gives scale and shift after norm2 (AdaGN, improved-diffusion);
        False: it is added before norm2 (DDPM).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int,
        norm_num_groups: int,
        dropout: float,
        eps: float = 1e-5,
        scale_shift: bool = True,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = GroupNorm(norm_num_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_embed_dim, (2 if scale_shift else 1) * out_channels)
        self.norm2 = GroupNorm(norm_num_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)  # zero-initialised in initialize_weights
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """:param x: (B, C_in, H, W). :param emb: SiLU(time embedding) (B, E). :return: (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.scale_shift:
            scale, shift = self.time_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C_out, 1, 1)
            h = self.norm2(h) * (1 + scale) + shift  # (B, C_out, H, W)
        else:
            h = self.norm2(h + self.time_proj(emb)[:, :, None, None])  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, C_out, H, W)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """
    Self-attention over the H*W positions, then (if ``cross_attention_dim``) cross-attention to text tokens.

    :param channels: channels C of the feature map, the token width.
    :param num_heads: attention heads.
    :param norm_num_groups: GroupNorm groups of the pre-attention norm.
    :param cross_attention_dim: width of the text tokens; None: self-attention only.
    :param eps: epsilon of the pre-attention GroupNorm.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        norm_num_groups: int,
        cross_attention_dim: int | None = None,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm = GroupNorm(norm_num_groups, channels, eps=eps)
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
        h = self.attn(h)  # (B, N, C), contiguous
        # the residual sums put the attention output first, so they keep its layout: tokens contiguous (B, N, C),
        # the map in channels-last strides, where the convolutions that follow run faster on a CPU (the layout
        # diffusers' U-Net ends up in; on an Intel Xeon hfgen's eager U-Net trained at 0.93-0.95x of diffusers' with
        # the NCHW sum and at 1.05x with this one, benchmarks/RESULTS.md "stop 27")
        if self.cross_attn is None or context is None:
            return h.transpose(1, 2).reshape(B, C, H, W) + x  # (B, C, H, W)
        tokens = h + x.flatten(2).transpose(1, 2)  # (B, N, C)
        context = context.to(tokens.dtype)
        tokens = tokens + self.cross_attn(self.norm_cross(tokens), context, context_mask)  # (B, N, C)
        return tokens.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class Downsample(nn.Module):
    """
    Halve H and W with a strided 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2).

    :param padding: 1: one zero row/column on every side; 0: one on the right and bottom only (the DDPM code's
        TensorFlow "SAME" padding for stride 2).
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"padding must be 0 or 1, got {padding}")
        self.pad_right_bottom = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_right_bottom:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H + 1, W + 1)
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
        attention_head_dim: int | None = 32,  # channels per head (heads = channels // it); None: one head (DDPM)
        norm_num_groups: int = 32,  # GroupNorm groups; every entry of block_out_channels must divide by it
        dropout: float = 0.0,  # dropout inside each ResBlock
        num_classes: int | None = None,  # class-conditional with this many classes (+1 null label); None: off
        cross_attention_dim: int | None = None,  # width of text tokens for cross-attention; None: no text
        time_sin_first: bool = False,  # time features [sin | cos] (DDPM) instead of [cos | sin] (improved-diffusion)
        time_freq_shift: float = 0.0,  # frequencies 10000 ** (-k / (half - shift)), k < half: 1 in DDPM, 0 here
        time_scale_shift: bool = True,  # ResBlocks: time as scale and shift after norm2 (AdaGN); False: added (DDPM)
        downsample_padding: int = 1,  # stride-2 conv: 1 pads every side; 0 pads right and bottom by one (DDPM)
        norm_eps: float = 1e-5,  # epsilon of every GroupNorm (DDPM: 1e-6)
        up_attention_levels: tuple[bool, ...] | None = None,  # decoder self-attention per level; None: attention_levels
    ):
        super().__init__()
        # @register_to_config has stored every argument in self.config before this body runs; the helpers below
        # read their hyperparameters from there
        block_out_channels, attention_levels, up_attention = self._check_levels()
        self._check_options()
        ch0 = block_out_channels[0]
        time_embed_dim = 4 * ch0

        # submodules are created in the order of the forward pass: that order is the state_dict order (converted
        # checkpoints are laid out in it) and the order in which the initialisation draws random numbers
        # embeddings: t -> sinusoid (ch0) -> MLP (4 * ch0); labels -> table of num_classes + 1 rows (last = null)
        self.time_embed = TimestepEmbedder(time_embed_dim, ch0, freq_shift=time_freq_shift, sin_first=time_sin_first)
        self.class_embed = nn.Embedding(num_classes + 1, time_embed_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)
        self.down_levels, skip_channels = self._build_encoder(block_out_channels, attention_levels)
        # middle, at the lowest resolution
        ch = block_out_channels[-1]
        self.mid_res1 = self._res_block(ch, ch)
        self.mid_attn = self._attn_block(ch)
        self.mid_res2 = self._res_block(ch, ch)
        self.up_levels = self._build_decoder(block_out_channels, up_attention, skip_channels)
        self.norm_out = GroupNorm(norm_num_groups, ch0, eps=norm_eps)
        self.conv_out = nn.Conv2d(ch0, out_channels, 3, padding=1)

        self.gradient_checkpointing = False
        self.initialize_weights()

    def _check_levels(self) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[bool, ...]]:
        """Validate the level layout of the config; :return: (block_out_channels, attention_levels, up_attention)."""
        cfg = self.config
        block_out_channels = tuple(cfg.block_out_channels)
        attention_levels = tuple(bool(a) for a in cfg.attention_levels)
        L, head_dim = len(block_out_channels), cfg.attention_head_dim
        if not block_out_channels:
            raise ValueError("block_out_channels must name at least one level, got ()")
        if len(attention_levels) != L:
            raise ValueError(f"attention_levels must have one entry per level ({L}), got {attention_levels}")
        # the decoder attends where the encoder does, unless told otherwise (diffusers' google/ddpm-cifar10-32
        # attends at 16x16 going down and at 8x8 going up)
        up_levels = cfg.up_attention_levels
        up_attention = attention_levels if up_levels is None else tuple(bool(a) for a in up_levels)
        if len(up_attention) != L:
            raise ValueError(f"up_attention_levels must be None or have one entry per level ({L}), got {up_levels}")
        if cfg.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {cfg.layers_per_block}")
        if any(ch % cfg.norm_num_groups for ch in block_out_channels):
            raise ValueError(
                f"block_out_channels entries must be divisible by norm_num_groups ({cfg.norm_num_groups}), "
                f"got {block_out_channels}"
            )
        for i, ch in enumerate(block_out_channels):
            # the middle block (at the last level) always has attention
            attends = attention_levels[i] or up_attention[i] or i == L - 1
            if head_dim is not None and attends and (head_dim < 1 or ch % head_dim):
                raise ValueError(
                    f"channels of attention levels and of the last level must be divisible by attention_head_dim "
                    f"({head_dim}), got {ch} at level {i}"
                )
        if cfg.sample_size % 2 ** (L - 1):
            raise ValueError(
                f"sample_size must be divisible by {2 ** (L - 1)} (2 ** (levels - 1)), got {cfg.sample_size}"
            )
        return block_out_channels, attention_levels, up_attention

    def _check_options(self) -> None:
        """Validate the rest of the config: conditioning, dropout, time features, downsampling, norms."""
        cfg = self.config
        if cfg.num_classes is not None and cfg.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {cfg.num_classes}")
        if cfg.cross_attention_dim is not None and cfg.cross_attention_dim < 1:
            raise ValueError(f"cross_attention_dim must be None or >= 1, got {cfg.cross_attention_dim}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
        half = cfg.block_out_channels[0] // 2  # the time features have block_out_channels[0] entries
        if not 0.0 <= cfg.time_freq_shift < half:
            raise ValueError(
                f"time_freq_shift must be in [0, block_out_channels[0] // 2 = {half}), got {cfg.time_freq_shift}"
            )
        if cfg.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {cfg.downsample_padding}")
        if not cfg.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {cfg.norm_eps}")

    def _res_block(self, cin: int, cout: int) -> ResBlock:
        """A ResBlock cin -> cout channels, modulated by the time embedding of width 4 * block_out_channels[0]."""
        cfg = self.config
        time_embed_dim = 4 * cfg.block_out_channels[0]
        return ResBlock(cin, cout, time_embed_dim, cfg.norm_num_groups, cfg.dropout, cfg.norm_eps, cfg.time_scale_shift)

    def _attn_block(self, ch: int) -> AttentionBlock:
        """An AttentionBlock on ch channels: ch // attention_head_dim heads (one if attention_head_dim is None)."""
        cfg = self.config
        heads = 1 if cfg.attention_head_dim is None else ch // cfg.attention_head_dim
        return AttentionBlock(ch, heads, cfg.norm_num_groups, cfg.cross_attention_dim, cfg.norm_eps)

    def _build_encoder(
        self, block_out_channels: tuple[int, ...], attention_levels: tuple[bool, ...]
    ) -> tuple[nn.ModuleList, list[int]]:
        """
        The down levels, full resolution first: layers_per_block x (ResBlock [+ attention]), then a Downsample
        (none at the last level).

        :return: the levels and ``skip_channels``, the channels of every tensor the forward pushes on the skip stack
            (conv_in's output first), which the decoder's ResBlocks take back in reverse.
        """
        ch = block_out_channels[0]
        skip_channels = [ch]
        levels = nn.ModuleList()
        for i, (out_ch, has_attn) in enumerate(zip(block_out_channels, attention_levels)):
            resnets, attentions = [], []
            for _ in range(self.config.layers_per_block):
                resnets.append(self._res_block(ch, out_ch))
                if has_attn:
                    attentions.append(self._attn_block(out_ch))
                ch = out_ch
                skip_channels.append(ch)
            is_last = i == len(block_out_channels) - 1
            down = None if is_last else Downsample(ch, self.config.downsample_padding)
            levels.append(Level(resnets, attentions, down))
            if not is_last:
                skip_channels.append(ch)
        return levels, skip_channels

    def _build_decoder(
        self, block_out_channels: tuple[int, ...], up_attention: tuple[bool, ...], skip_channels: list[int]
    ) -> nn.ModuleList:
        """
        The up levels, lowest resolution first: (layers_per_block + 1) x (ResBlock [+ attention]), then an Upsample
        (none at full resolution). Each ResBlock takes one skip, popped from ``skip_channels``.
        """
        ch = block_out_channels[-1]
        levels = nn.ModuleList()
        for i in reversed(range(len(block_out_channels))):
            out_ch, has_attn = block_out_channels[i], up_attention[i]
            resnets, attentions = [], []
            for _ in range(self.config.layers_per_block + 1):
                resnets.append(self._res_block(ch + skip_channels.pop(), out_ch))
                if has_attn:
                    attentions.append(self._attn_block(out_ch))
                ch = out_ch
            levels.append(Level(resnets, attentions, Upsample(ch) if i > 0 else None))
        return levels

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

    @classmethod
    def from_diffusers(cls, unet: nn.Module) -> UNetModel:
        """
        Convert a diffusers ``UNet2DModel`` (e.g. from ``google/ddpm-cifar10-32``) into a ``UNetModel`` that computes
        the same function: the config is translated, every weight copied by name, dtype, device and train/eval mode
        kept. Supported: down blocks ``DownBlock2D`` / ``AttnDownBlock2D``, up blocks ``UpBlock2D`` /
        ``AttnUpBlock2D`` (at any levels), ``UNetMidBlock2D``, positional time embedding, no class embedding.

        :param unet: a ``diffusers.UNet2DModel``.
        :raises ValueError: naming the config value that hfgen cannot represent, or a weight that does not map.
        """
        model = cls(**_config_from_diffusers(unet.config))
        state = _state_dict_from_diffusers(unet.state_dict(), model.state_dict())
        # assign: the parameters become copies of diffusers' tensors, in their dtype and on their device
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        return model.train(unet.training)


# ----------------------------------------------------------------------------------------------------------------------
# Conversion from diffusers' UNet2DModel
# ----------------------------------------------------------------------------------------------------------------------

_DOWN_BLOCK_ATTENDS = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_BLOCK_ATTENDS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# diffusers config keys with a restricted range -> the values UNetModel can represent
_DIFFUSERS_FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "downsample_padding": (0, 1),
}

# diffusers parameter name pieces -> hfgen's, applied in this order
_DIFFUSERS_RENAMES = (
    ("time_embedding.linear_1.", "time_embed.mlp.0."),
    ("time_embedding.linear_2.", "time_embed.mlp.2."),
    ("conv_norm_out.", "norm_out."),
    ("mid_block.resnets.0.", "mid_res1."),
    ("mid_block.resnets.1.", "mid_res2."),
    ("mid_block.attentions.0.", "mid_attn."),
    ("down_blocks.", "down_levels."),
    ("up_blocks.", "up_levels."),
    (".downsamplers.0.", ".resample."),
    (".upsamplers.0.", ".resample."),
    (".time_emb_proj.", ".time_proj."),
    (".conv_shortcut.", ".skip."),
    (".group_norm.", ".norm."),
    (".to_q.", ".attn.to_q."),
    (".to_k.", ".attn.to_k."),
    (".to_v.", ".attn.to_v."),
    (".to_out.0.", ".attn.to_out."),
)


def _config_from_diffusers(cfg) -> dict:
    """UNet2DModel config -> UNetModel keyword arguments; ValueError naming any value hfgen cannot represent."""
    for key, allowed in _DIFFUSERS_FIXED.items():
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"UNet2DModel {key}={value!r} is not supported by UNetModel (supported: {allowed})")
    channels = tuple(cfg["block_out_channels"])
    if cfg.get("time_embedding_dim") not in (None, 4 * channels[0]):
        raise ValueError(
            f"UNet2DModel time_embedding_dim={cfg['time_embedding_dim']} is not supported by UNetModel "
            f"(supported: None or 4 * block_out_channels[0] = {4 * channels[0]})"
        )
    groups = cfg["norm_num_groups"]
    # with scale_shift, diffusers' middle attention has a GroupNorm only if attn_norm_num_groups asks; hfgen's has one
    attn_groups = cfg.get("attn_norm_num_groups")
    needed = (None, groups) if cfg.get("resnet_time_scale_shift", "default") == "default" else (groups,)
    if attn_groups not in needed:
        raise ValueError(
            f"UNet2DModel attn_norm_num_groups={attn_groups!r} with resnet_time_scale_shift="
            f"{cfg.get('resnet_time_scale_shift')!r} is not supported by UNetModel (supported: {needed})"
        )
    return {
        "sample_size": _square_sample_size(cfg["sample_size"]),
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "block_out_channels": channels,
        "layers_per_block": cfg["layers_per_block"],
        **_attention_levels(cfg["down_block_types"], cfg["up_block_types"]),
        "attention_head_dim": cfg["attention_head_dim"],  # None in both: one head over all channels
        "norm_num_groups": groups,
        "dropout": cfg.get("dropout", 0.0),
        "time_sin_first": not cfg["flip_sin_to_cos"],
        "time_freq_shift": float(cfg["freq_shift"]),
        "time_scale_shift": cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
        "downsample_padding": cfg["downsample_padding"],
        "norm_eps": cfg["norm_eps"],
    }


def _square_sample_size(sample_size) -> int:
    """diffusers' sample_size (an int or (H, W)) -> hfgen's int H = W."""
    if isinstance(sample_size, int):
        return sample_size
    if len(sample_size) == 2 and sample_size[0] == sample_size[1]:
        return int(sample_size[0])
    raise ValueError(f"UNet2DModel sample_size={sample_size!r} is not supported by UNetModel (it needs H = W)")


def _attention_levels(down_block_types, up_block_types) -> dict:
    """Block class names -> which levels attend: ``attention_levels`` and, where the up blocks do not mirror the down
    blocks, ``up_attention_levels`` (level 0 = full resolution; diffusers lists the up blocks from the lowest)."""
    for key, types, known in (
        ("down_block_types", down_block_types, _DOWN_BLOCK_ATTENDS),
        ("up_block_types", up_block_types, _UP_BLOCK_ATTENDS),
    ):
        for name in types:
            if name not in known:
                raise ValueError(f"UNet2DModel {key} entry {name!r} is not supported by UNetModel (supported: {known})")
    down = tuple(_DOWN_BLOCK_ATTENDS[name] for name in down_block_types)
    up = tuple(_UP_BLOCK_ATTENDS[name] for name in reversed(up_block_types))
    return {"attention_levels": down, "up_attention_levels": None if up == down else up}


def _hfgen_key(diffusers_key: str) -> str:
    """A UNet2DModel parameter name -> the UNetModel parameter it fills."""
    key = diffusers_key
    for old, new in _DIFFUSERS_RENAMES:
        key = key.replace(old, new)
    return key


def _state_dict_from_diffusers(theirs: dict, ours: dict) -> dict:
    """Rename a UNet2DModel state dict for UNetModel; ValueError on a missing or unexpected key or a shape mismatch."""
    state = {_hfgen_key(k): v for k, v in theirs.items()}
    unexpected = sorted(k for k in theirs if _hfgen_key(k) not in ours)
    missing = sorted(set(ours) - set(state))
    if unexpected or missing:
        raise ValueError(
            f"UNet2DModel weights do not map onto UNetModel: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    for key, value in state.items():
        if value.shape != ours[key].shape:
            raise ValueError(
                f"UNet2DModel weight for {key} has shape {tuple(value.shape)}, UNetModel expects "
                f"{tuple(ours[key].shape)}"
            )
    return state


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
    # class-conditional MNIST at 32x32 on a CPU (benchmarks/bench_class_conditional.py): attention at 8x8 only, 0.72M
    "unet-mnist": {
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "attention_levels": (False, False, True),
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
