"""Pieces that every hfgen denoiser shares, because they truly are the same.

- ``DenoiserOutput``: what ``forward`` returns (``.sample``, plus ``.latents`` for RIN).
- ``timestep_embedding`` / ``TimestepEmbedder``: sinusoidal features of t followed by an MLP.
- ``Attention``: multi-head self- or cross-attention on ``attention`` (``F.scaled_dot_product_attention``).
- ``attention`` / ``GroupNorm``: SDPA and ``nn.GroupNorm`` that run in float32 under a CPU autocast, where torch's
  bfloat16 CPU kernels of these two are slower than its float32 ones.
- ``zero_module``: zero a layer's parameters so a residual branch starts as the identity.
- ``unpatchify``: patch tokens back to an image (DiT and RIN).
- ``check_denoiser_inputs``: one place that turns bad ``forward`` arguments into short, specific errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn

from .guidance import null_class_labels

# ----------------------------------------------------------------------------------------------------------------------
# Mixed precision on a CPU
# ----------------------------------------------------------------------------------------------------------------------


def _in_cpu_autocast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """
    ``F.scaled_dot_product_attention`` of heads (B, h, N, d). When it is trained under a CPU autocast
    (``--mixed_precision bf16`` on a CPU) it runs in float32 and returns float32: the backward of torch's CPU
    flash-attention kernel is slower on bfloat16 than on float32 at a small model's token counts (forward + backward
    at batch 32, 2 heads: 5.8 vs 2.6 ms at 64 tokens, 2.5 vs 0.7 ms at 16; equal at 256), while the projections
    around it keep autocast's bfloat16. Its forward is as fast in bfloat16, so sampling (no grad) stays in autocast;
    on CUDA, and without autocast, it is SDPA as it is.
    """
    if _in_cpu_autocast(q) and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class GroupNorm(nn.GroupNorm):
    """
    ``nn.GroupNorm`` (the same parameters, state_dict and numbers) that, under a CPU autocast, normalises a bfloat16
    input in float32 and returns float32: torch's CPU GroupNorm is ~4x slower on bfloat16 (0.94 vs 0.25 ms forward
    at the demo U-Net's 32 x 64 x 16 x 16), and the SiLU after it ~2x (the demo U-Net's training step: 127 ms with
    bfloat16 norms and attention, 98 ms with float32 ones, 122 ms without autocast). Weights in a low precision (a
    model cast with ``.to(torch.bfloat16)``) stay as they are.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_cpu_autocast(x) and x.dtype != torch.float32 and self.weight.dtype == torch.float32:
            x = x.float()
        return super().forward(x)


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DenoiserOutput(BaseOutput):
    """
    :param sample: the model output, an [N x out_channels x H x W] tensor (eps, v or x0 by the training objective).
    :param latents: RIN only: the latent state Z [N x num_latents x D] to feed back at the next step.
    """

    sample: torch.Tensor
    latents: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------------------------------------------------


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0, sin_first: bool = False
) -> torch.Tensor:
    """
    Sinusoidal features of a 1-D tensor of (possibly fractional) timesteps: (B,) -> (B, dim), [cos | sin], or
    [sin | cos] with ``sin_first`` (the DDPM code's order), zero-padded when dim is odd.

    Frequencies omega_k = max_period ** (-k / (dim / 2 - freq_shift)), k = 0 .. dim / 2 - 1: ``freq_shift`` = 0 as
    in GLIDE and the DiT paper's code, 1 as in diffusers' ``Timesteps(downscale_freq_shift=1)`` of its DiT and DDPM.
    """
    half = dim // 2
    arange = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * arange / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    first, second = (torch.sin(args), torch.cos(args)) if sin_first else (torch.cos(args), torch.sin(args))
    emb = torch.cat([first, second], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> sinusoidal features (B, frequency_dim) -> MLP -> (B, dim); ``freq_shift`` and ``sin_first`` as in
    timestep_embedding."""

    def __init__(self, dim: int, frequency_dim: int = 256, freq_shift: float = 0.0, sin_first: bool = False):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.freq_shift, self.sin_first = freq_shift, sin_first
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_dim, freq_shift=self.freq_shift, sin_first=self.sin_first)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """
    Multi-head attention of tokens x (B, N, D) to themselves or to a context (B, L, context_dim).

    :param dim: token width D.
    :param num_heads: number of heads; D must divide by it.
    :param context_dim: width of the context tokens; None means self-attention.
    :param zero_init_out: zero the output projection so the residual branch starts as the identity.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, zero_init_out: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.Linear(dim, dim)
        if zero_init_out:
            zero_module(self.to_out)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        :param x: queries (B, N, D).
        :param context: keys/values (B, L, C); None attends x to itself.
        :param context_mask: (B, L), 1/True where a context token may be attended to.
        """
        context = x if context is None else context
        B, N, D = x.shape
        L = context.shape[1]
        h = self.num_heads
        q = self.to_q(x).view(B, N, h, D // h).transpose(1, 2)  # (B, h, N, D/h)
        k = self.to_k(context).view(B, L, h, D // h).transpose(1, 2)  # (B, h, L, D/h)
        v = self.to_v(context).view(B, L, h, D // h).transpose(1, 2)  # (B, h, L, D/h)
        attn_mask = None
        if context_mask is not None:
            attn_mask = context_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, L)
        out = attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, D/h)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.to_out(out)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, columns_first: bool = False) -> torch.Tensor:
    """
    Fixed 2-D sin-cos position embedding of a grid_h x grid_w token grid, row-major: (grid_h * grid_w, dim).

    Token n = i * grid_w + j (row i, column j) gets [E(i) | E(j)], or [E(j) | E(i)] with ``columns_first`` (the
    layout of the DiT paper's code, MAE and diffusers' ``get_2d_sincos_pos_embed``: on a square grid, the transpose
    of the default). E(p) = [sin(p omega) | cos(p omega)], omega_k = 10000 ** (-k / (dim / 4)), k = 0 .. dim / 4 - 1.
    """
    if dim % 4:
        raise ValueError(f"the token width must be divisible by 4 for the 2-D sin-cos position embedding, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None] * omega[None]  # (h, D/4)
    cols = torch.arange(grid_w, dtype=torch.float64)[:, None] * omega[None]  # (w, D/4)
    emb_rows = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(grid_h, grid_w, dim // 2)  # (h, w, D/2)
    emb_cols = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(grid_h, grid_w, dim // 2)  # (h, w, D/2)
    halves = [emb_cols, emb_rows] if columns_first else [emb_rows, emb_cols]
    return torch.cat(halves, dim=-1).reshape(grid_h * grid_w, dim).float()  # (h * w, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x (B, N, D) by per-sample shift and scale (B, D): x * (1 + scale) + shift."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# Input checks shared by UNetModel, DiTModel and RINModel
# ----------------------------------------------------------------------------------------------------------------------


def check_denoiser_inputs(
    model: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    class_labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Validate the shared ``forward`` arguments against ``model.config`` and return ``(timesteps, class_labels)``:
    timesteps as a float tensor of shape (B,) on the sample's device, labels as a long tensor (B,) (the null label
    ``num_classes`` when a class-conditional model gets none; ``hfgen.guidance``) or None for an unconditional model.

    The model must have ``config.in_channels``, ``config.num_classes`` (None: unconditional),
    ``config.cross_attention_dim`` (None: no text) and a ``downsample_factor`` attribute. Value checks (timesteps
    >= 0, labels in range) read tensors on the host, so they are skipped while ``torch.compile`` traces the graph.
    """
    check_sample(model, sample)
    checking_values = not torch.compiler.is_compiling()
    timestep = batch_timesteps(timestep, sample, checking_values)
    class_labels = batch_class_labels(model.config.num_classes, class_labels, sample, checking_values)
    check_text_inputs(model.config.cross_attention_dim, encoder_hidden_states, encoder_attention_mask, len(sample))
    return timestep, class_labels


def check_sample(model: nn.Module, sample: torch.Tensor) -> None:
    """x_t must be a (B, in_channels, H, W) tensor with H and W divisible by the model's ``downsample_factor``."""
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.ndim != 4:
        raise ValueError(f"sample must have shape (B, C, H, W), got rank {sample.ndim} shape {tuple(sample.shape)}")
    _, C, H, W = sample.shape
    if C != model.config.in_channels:
        raise ValueError(f"sample has {C} channels, but the model's config.in_channels is {model.config.in_channels}")
    f = model.downsample_factor
    if H % f or W % f:
        raise ValueError(f"sample height and width must be divisible by {f} for this model, got {H}x{W}")


def batch_timesteps(timestep: torch.Tensor | float | int, sample: torch.Tensor, checking_values: bool) -> torch.Tensor:
    """A Python number, a 0-d tensor or one per sample -> float (B,) on the sample's device, finite and >= 0."""
    B = len(sample)
    if not torch.is_tensor(timestep):
        if not isinstance(timestep, (int, float)):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        timestep = torch.tensor([timestep], dtype=torch.float32)
    timestep = timestep.to(sample.device).float().reshape(-1)
    if timestep.numel() == 1:
        timestep = timestep.expand(B)
    if timestep.numel() != B:
        raise ValueError(f"timestep must be a scalar or have one value per sample ({B}), got {timestep.numel()}")
    if checking_values and (not torch.isfinite(timestep).all() or (timestep < 0).any()):
        raise ValueError(f"timestep must be finite and >= 0, got {timestep.tolist()}")
    return timestep


def batch_class_labels(
    num_classes: int | None, class_labels, sample: torch.Tensor, checking_values: bool
) -> torch.Tensor | None:
    """One label or one per sample -> long (B,) in [0, num_classes] (``num_classes`` is the null label); the null
    label for a class-conditional model given none, as in guidance training; None for an unconditional model."""
    B = len(sample)
    if class_labels is None:
        return null_class_labels(B, num_classes, sample.device) if num_classes else None
    class_labels = labels_per_sample(class_labels, num_classes, B, sample.device)
    if checking_values and ((class_labels < 0).any() or (class_labels > num_classes).any()):
        raise ValueError(
            f"class_labels must be in [0, {num_classes}] ({num_classes} is the null label), got {class_labels.tolist()}"
        )
    return class_labels.long()


def labels_per_sample(class_labels, num_classes: int | None, batch_size: int, device) -> torch.Tensor:
    """Given labels for a class-conditional model (``num_classes`` set): one int or one per sample -> (B,) integer
    tensor on ``device``; the range check is the caller's (a denoiser also takes the null label)."""
    if not num_classes:
        raise ValueError("class_labels were given but the model is unconditional (config.num_classes is None)")
    class_labels = torch.as_tensor(class_labels, device=device).reshape(-1)
    if class_labels.is_floating_point():
        raise TypeError(f"class_labels must be integers, got dtype {class_labels.dtype}")
    if class_labels.numel() == 1:
        class_labels = class_labels.expand(batch_size)
    if class_labels.numel() != batch_size:
        raise ValueError(f"class_labels must have one label per sample ({batch_size}), got {class_labels.numel()}")
    return class_labels


def check_text_inputs(
    cross_attention_dim: int | None,
    encoder_hidden_states: torch.Tensor | None,
    encoder_attention_mask: torch.Tensor | None,
    batch_size: int,
) -> None:
    """Text states (B, L, cross_attention_dim) only for a text-conditioned model, a mask (B, L) only with them."""
    if encoder_hidden_states is None:
        if encoder_attention_mask is not None:
            raise ValueError("encoder_attention_mask was given without encoder_hidden_states")
        return
    if cross_attention_dim is None:
        raise ValueError(
            "encoder_hidden_states were given but the model has no text conditioning "
            "(config.cross_attention_dim is None)"
        )
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cross_attention_dim:
        raise ValueError(
            f"encoder_hidden_states must have shape (B, L, {cross_attention_dim}), "
            f"got {tuple(encoder_hidden_states.shape)}"
        )
    if encoder_hidden_states.shape[0] != batch_size:
        raise ValueError(
            f"encoder_hidden_states batch ({encoder_hidden_states.shape[0]}) must match sample batch ({batch_size})"
        )
    states_shape = tuple(encoder_hidden_states.shape[:2])
    if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != states_shape:
        raise ValueError(
            f"encoder_attention_mask must have shape {states_shape}, got {tuple(encoder_attention_mask.shape)}"
        )


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of tokens (B, L, D) over the positions where mask (B, L) is set: (B, D)."""
    if mask is None:
        return tokens.mean(dim=1)
    w = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, patch_size: int, channels: int) -> torch.Tensor:
    """Patch tokens (B, h * w, p * p * C) -> image (B, C, h * p, w * p); the inverse of a stride-p patch embedding."""
    p, C = patch_size, channels
    B = tokens.shape[0]
    x = tokens.view(B, grid_h, grid_w, p, p, C)  # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, grid_h * p, grid_w * p)  # (B, C, H, W)
