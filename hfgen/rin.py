"""RIN: Recurrent Interface Network (Jabri, Fleet & Chen, "Scalable Adaptive Computation for Iterative Generation").

Two sets of tokens:
- the interface X: one token per p x p patch of the image (with a learned position embedding), local to the data;
- the latents Z: a small learned set (``num_latents`` x ``latent_dim``) where most of the computation happens.

Each ``RINBlock`` reads (Z attends to X, and to the text tokens if any), computes (K self-attention layers on Z) and
writes (X attends to Z). X never attends to itself. Time, class and pooled text enter as extra latent tokens
appended to Z. The output head reads X back into patches.

Two additions on the interface side, both on by default, make small RINs learn far faster. On class-conditional
MNIST a RIN of 1.4M parameters without them drew patchy speckle and only 15% of the asked digit after 2900 steps;
with them, it draws strokes that follow the label after 5800 steps and the asked digit in every sample at guidance 3
after 21000 (see benchmarks/RESULTS_class_conditional.md).
- ``interface_conv``: a depthwise 3x3 convolution over the patch grid at the start of every block, so each patch
  sees its neighbours (the position-encoding generator of the public PyTorch RIN);
- ``interface_modulation``: the LayerNorms of the write, of X's MLP and of the output head are modulated by
  c = time + class + pooled text (scale and shift from a zero-initialised linear layer, as in DiT's adaLN), so the
  patch path knows the noise level and the class and not only what it reads from the latents.
The interface position embedding is learned but starts from the fixed 2-D sin-cos table.

Latent self-conditioning: ``forward`` takes the previous step's latents and returns the new ones; the warm start
enters through ``self_cond_gain``, whose last layer starts at zero. How the previous latents are produced (the
no-grad first pass during training, the carry-over during sampling) is the training and sampling code's business.

Reading order: helpers (``FeedForward``, ``LatentLayer``), ``RINBlock``, ``RINModel``, presets ``RIN_PRESETS``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .cards import HubCardMixin
from .layers import (
    Attention,
    DenoiserOutput,
    TimestepEmbedder,
    check_denoiser_inputs,
    masked_mean,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)
from .loading import SafeLoadingMixin

# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """Pre-norm token-wise MLP: LayerNorm -> Linear -> GELU -> Linear, (B, N, D) -> (B, N, D); the norm's output
    optionally modulated by a per-sample (shift, scale), each (B, D)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shift_scale: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.norm(x)
        if shift_scale is not None:
            h = modulate(h, *shift_scale)
        return self.fc2(F.gelu(self.fc1(h)))


class LatentLayer(nn.Module):
    """One compute layer on the latents: pre-norm self-attention then MLP, both residual. (B, M, D) -> (B, M, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.attn(self.norm(z))  # (B, M, D)
        return z + self.mlp(z)  # (B, M, D)


# ----------------------------------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------------------------------


class RINBlock(nn.Module):
    """
    Read -> compute -> write.

    :param interface_dim: width of the interface tokens X.
    :param latent_dim: width of the latent tokens Z.
    :param compute_depth: K, self-attention layers on Z per block.
    :param num_heads: heads of the latent self-attention.
    :param rw_num_heads: heads of the read and write cross-attentions.
    :param latent_mlp_ratio: MLP width factor on Z.
    :param interface_mlp_ratio: MLP width factor on X.
    :param context_dim: width of the text tokens Z may read; None: no text read.
    :param interface_conv: depthwise 3x3 convolution over the patch grid before the read.
    :param interface_modulation: scale and shift of X's write and MLP LayerNorms from the conditioning vector c.
    """

    def __init__(
        self,
        interface_dim: int,
        latent_dim: int,
        compute_depth: int,
        num_heads: int,
        rw_num_heads: int,
        latent_mlp_ratio: float = 4.0,
        interface_mlp_ratio: float = 2.0,
        context_dim: int | None = None,
        interface_conv: bool = True,
        interface_modulation: bool = True,
    ):
        super().__init__()
        # local mixing of neighbouring patches: X <- depthwise conv(X)
        self.conv = (
            nn.Conv2d(interface_dim, interface_dim, 3, padding=1, groups=interface_dim) if interface_conv else None
        )
        # read: Z <- X (and Z <- text)
        self.read_norm_z = nn.LayerNorm(latent_dim)
        self.read_norm_x = nn.LayerNorm(interface_dim)
        self.read_attn = Attention(latent_dim, rw_num_heads, context_dim=interface_dim)
        self.text_attn = None
        if context_dim is not None:
            self.text_norm_z = nn.LayerNorm(latent_dim)
            self.text_attn = Attention(latent_dim, rw_num_heads, context_dim=context_dim)
        self.read_mlp = FeedForward(latent_dim, latent_mlp_ratio)
        # compute: Z <- Z
        self.compute = nn.ModuleList(
            [LatentLayer(latent_dim, num_heads, latent_mlp_ratio) for _ in range(compute_depth)]
        )
        # write: X <- Z
        self.write_norm_x = nn.LayerNorm(interface_dim)
        self.write_norm_z = nn.LayerNorm(latent_dim)
        self.write_attn = Attention(interface_dim, rw_num_heads, context_dim=latent_dim)
        self.write_mlp = FeedForward(interface_dim, interface_mlp_ratio)
        # c -> (shift, scale) of the write norm and of the MLP norm; zero-initialised by RINModel
        self.modulation = nn.Linear(latent_dim, 4 * interface_dim) if interface_modulation else None

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        c: torch.Tensor,
        grid: tuple[int, int],
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :param x: interface tokens (B, N, Dx), row-major over the patch grid.
        :param z: latent tokens, conditioning tokens included (B, M', Dz).
        :param c: conditioning vector (B, Dz), already through SiLU.
        :param grid: (rows, columns) of the patch grid, rows * columns = N.
        :param context: text tokens (B, L, context_dim) or None (the text read is skipped).
        :param context_mask: (B, L), 1 where a text token may be read.
        :return: the updated (x, z).
        """
        B, N, Dx = x.shape
        # 0. neighbouring patches mix
        if self.conv is not None:
            x_grid = x.transpose(1, 2).reshape(B, Dx, *grid)  # (B, Dx, H/p, W/p)
            x = x + self.conv(x_grid).flatten(2).transpose(1, 2)  # (B, N, Dx)
        # 1. read
        z = z + self.read_attn(self.read_norm_z(z), self.read_norm_x(x))  # (B, M', Dz)
        if self.text_attn is not None and context is not None:
            z = z + self.text_attn(self.text_norm_z(z), context, context_mask)  # (B, M', Dz)
        z = z + self.read_mlp(z)  # (B, M', Dz)
        # 2. compute
        for layer in self.compute:
            z = layer(z)  # (B, M', Dz)
        # 3. write, the interface norms modulated by c
        h = self.write_norm_x(x)  # (B, N, Dx)
        mlp_shift_scale = None
        if self.modulation is not None:
            shift_w, scale_w, shift_m, scale_m = self.modulation(c).chunk(4, dim=-1)  # 4 x (B, Dx)
            h = modulate(h, shift_w, scale_w)
            mlp_shift_scale = (shift_m, scale_m)
        x = x + self.write_attn(h, self.write_norm_z(z))  # (B, N, Dx)
        x = x + self.write_mlp(x, mlp_shift_scale)  # (B, N, Dx)
        return x, z


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


class RINModel(SafeLoadingMixin, HubCardMixin, ModelMixin, ConfigMixin):
    """
    Recurrent Interface Network denoiser with the hfgen denoiser signature plus latent self-conditioning.

    Conditioning tokens appended to the latents: a time token (always), a class token (when ``num_classes`` is set;
    label ``num_classes`` is the null label, also used when ``class_labels`` is None) and a pooled-text token (when
    ``encoder_hidden_states`` are given). With ``use_cross_attention`` the latents also read the text tokens.
    """

    _supports_gradient_checkpointing = True
    self_conditioning = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,  # height = width of the image; the interface has a learned position per patch
        in_channels: int = 3,  # image channels
        out_channels: int | None = None,  # None: in_channels
        patch_size: int = 2,  # p: each p x p patch becomes one interface token
        interface_dim: int = 256,  # width Dx of the interface tokens X
        num_latents: int = 128,  # M, number of learned latent tokens Z
        latent_dim: int = 512,  # width Dz of the latent tokens
        num_blocks: int = 3,  # RIN blocks (read -> compute -> write)
        compute_depth: int = 2,  # K, latent self-attention layers per block
        num_heads: int = 16,  # heads of the latent self-attention
        rw_num_heads: int = 8,  # heads of the read / write cross-attention
        latent_mlp_ratio: float = 4.0,  # MLP width factor on Z
        interface_mlp_ratio: float = 2.0,  # MLP width factor on X
        num_classes: int | None = None,  # None: no class token; else a table of num_classes + 1 rows
        cross_attention_dim: int | None = None,  # width of the text tokens; None: no text conditioning
        use_cross_attention: bool | None = None,  # latents read the text tokens; None: on iff text is on
        interface_conv: bool = True,  # depthwise 3x3 conv over the patch grid in every block
        interface_modulation: bool = True,  # the interface's LayerNorms scaled and shifted by time + class + text
    ):
        super().__init__()
        out_channels, use_cross_attention = self._resolve_config()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.num_latents = num_latents
        self.gradient_checkpointing = False
        grid = sample_size // patch_size

        # submodules are created in the order of the forward pass: that order is the state_dict order and the order
        # in which the initialisation draws random numbers
        # interface: patch embedding + learned position embedding
        self.x_embedder = nn.Conv2d(in_channels, interface_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, interface_dim))
        # latents: learned initial state + warm start from the previous step's latents
        self.latents = nn.Parameter(torch.zeros(num_latents, latent_dim))
        self.self_cond_norm = nn.LayerNorm(latent_dim)
        self.self_cond_gain = nn.Sequential(
            nn.Linear(latent_dim, int(latent_dim * latent_mlp_ratio)),
            nn.GELU(),
            nn.Linear(int(latent_dim * latent_mlp_ratio), latent_dim),
        )
        # conditioning tokens
        self.t_embedder = TimestepEmbedder(latent_dim)
        self.y_embedder = nn.Embedding(num_classes + 1, latent_dim) if num_classes is not None else None
        self.text_pool_proj = nn.Linear(cross_attention_dim, latent_dim) if cross_attention_dim is not None else None

        self.blocks = self._build_blocks(cross_attention_dim if use_cross_attention else None)
        # output head on the interface
        self.norm_out = nn.LayerNorm(interface_dim)
        self.modulation_out = nn.Linear(latent_dim, 2 * interface_dim) if interface_modulation else None
        self.proj_out = nn.Linear(interface_dim, patch_size * patch_size * out_channels)
        self.initialize_weights()

    def _resolve_config(self) -> tuple[int, bool]:
        """
        Fill in the config's None defaults (registered, so that saved configs hold the values used) and validate it.
        @register_to_config has stored every ``__init__`` argument in self.config before ``__init__``'s body runs.

        :return: (out_channels, use_cross_attention), resolved.
        """
        cfg = self.config
        out_channels, use_cross_attention = cfg.out_channels, cfg.use_cross_attention
        if out_channels is None:
            out_channels = cfg.in_channels
            self.register_to_config(out_channels=out_channels)
        if use_cross_attention is None:
            use_cross_attention = cfg.cross_attention_dim is not None
            self.register_to_config(use_cross_attention=use_cross_attention)
        elif use_cross_attention and cfg.cross_attention_dim is None:
            raise ValueError("use_cross_attention=True needs cross_attention_dim to be set, got None")
        if cfg.num_classes is not None and cfg.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {cfg.num_classes}")
        if cfg.sample_size % cfg.patch_size:
            raise ValueError(f"sample_size ({cfg.sample_size}) must be divisible by patch_size ({cfg.patch_size})")
        for name, dim, heads in (
            ("latent_dim", cfg.latent_dim, cfg.num_heads),
            ("latent_dim", cfg.latent_dim, cfg.rw_num_heads),
            ("interface_dim", cfg.interface_dim, cfg.rw_num_heads),
        ):
            if dim % heads:
                raise ValueError(f"{name} ({dim}) must be divisible by the number of heads ({heads})")
        return out_channels, use_cross_attention

    def _build_blocks(self, context_dim: int | None) -> nn.ModuleList:
        """The ``num_blocks`` RIN blocks; ``context_dim``: width of the text tokens the latents read, None: no read."""
        cfg = self.config
        return nn.ModuleList(
            [
                RINBlock(
                    cfg.interface_dim,
                    cfg.latent_dim,
                    cfg.compute_depth,
                    cfg.num_heads,
                    cfg.rw_num_heads,
                    cfg.latent_mlp_ratio,
                    cfg.interface_mlp_ratio,
                    context_dim=context_dim,
                    interface_conv=cfg.interface_conv,
                    interface_modulation=cfg.interface_modulation,
                )
                for _ in range(cfg.num_blocks)
            ]
        )

    def initialize_weights(self) -> None:
        # 1. every Linear: truncated normal (std 0.02), zero biases
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # 2. patch embedding like a Linear on the flattened patch; learned tokens small normal
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        grid = self.config.sample_size // self.config.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.config.interface_dim, grid, grid)[None])
        nn.init.trunc_normal_(self.latents, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        # 3. zero: the self-conditioning gain's last layer, so at init the previous latents have no effect
        nn.init.zeros_(self.self_cond_gain[-1].weight)
        nn.init.zeros_(self.self_cond_gain[-1].bias)
        # 4. zero: the interface modulations, so the norms start unmodulated
        for module in [block.modulation for block in self.blocks] + [self.modulation_out]:
            if module is not None:
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
        # 5. zero: the text read's output projection, so the text cross-attention starts as the identity
        for block in self.blocks:
            if block.text_attn is not None:
                nn.init.zeros_(block.text_attn.to_out.weight)
                nn.init.zeros_(block.text_attn.to_out.bias)

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be divisible by this (the patch size)."""
        return self.config.patch_size

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        prev_latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DenoiserOutput | tuple[torch.Tensor, torch.Tensor]:
        """
        :param sample: noisy image (B, in_channels, sample_size, sample_size).
        :param timestep: diffusion step, a number or a tensor of shape () or (B,).
        :param class_labels: (B,) integers in [0, num_classes]; None (or num_classes) is the null label.
        :param encoder_hidden_states: text tokens (B, L, cross_attention_dim); None: no text conditioning.
        :param encoder_attention_mask: (B, L), 1 for real tokens, 0 for padding.
        :param prev_latents: the latents (B, num_latents, latent_dim) returned at the previous step; None means
            zeros (no previous estimate).
        :return: ``DenoiserOutput(sample=(B, out_channels, H, W), latents=(B, num_latents, latent_dim))`` or the
            tuple ``(sample, latents)``.
        """
        timesteps, class_labels = check_denoiser_inputs(
            self, sample, timestep, class_labels, encoder_hidden_states, encoder_attention_mask
        )
        grid = self._check_grid(sample, prev_latents)  # (H/p, W/p)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(self.dtype)  # text encoders may run in another dtype

        # 1. conditioning tokens (B, n_cond, Dz) and c (B, Dz) for the interface modulations
        cond, c = self._conditioning(timesteps, class_labels, encoder_hidden_states, encoder_attention_mask)
        # 2. interface X (B, N, Dx) and latents Z (B, M + n_cond, Dz), the conditioning tokens appended to Z
        x, z = self._embed_inputs(sample, prev_latents, cond)

        # 3. RIN blocks: (mix patches,) read, compute, write
        for block in self.blocks:
            args = (x, z, c, grid, encoder_hidden_states, encoder_attention_mask)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, z = self._gradient_checkpointing_func(block, *args)
            else:
                x, z = block(*args)  # (B, N, Dx), (B, M + n_cond, Dz)

        # 4. output head on X, and the latents for the next step
        out = self._read_out(x, c, grid)  # (B, C_out, H, W)
        latents = z[:, : self.num_latents]  # (B, M, Dz), the conditioning tokens dropped

        if not return_dict:
            return (out, latents)
        return DenoiserOutput(sample=out, latents=latents)

    def _check_grid(self, sample: torch.Tensor, prev_latents: torch.Tensor | None) -> tuple[int, int]:
        """The sample must be sample_size x sample_size and prev_latents (B, M, Dz); :return: the patch grid."""
        B, _, H, W = sample.shape
        p, M, Dz = self.patch_size, self.num_latents, self.config.latent_dim
        grid_h, grid_w = H // p, W // p
        if grid_h * grid_w != self.pos_embed.shape[1] or H != W:
            size = self.config.sample_size
            raise ValueError(f"sample must be {size}x{size} (RINModel has a learned position per patch), got {H}x{W}")
        if prev_latents is not None and tuple(prev_latents.shape) != (B, M, Dz):
            raise ValueError(f"prev_latents must have shape {(B, M, Dz)}, got {tuple(prev_latents.shape)}")
        return grid_h, grid_w

    def _conditioning(
        self,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :return: the conditioning tokens (B, n_cond, Dz), time then class then pooled text (those the model has),
            and c = SiLU(their sum) (B, Dz), for the interface modulations.
        """
        cond = [self.t_embedder(timesteps)]  # [(B, Dz)]
        if self.y_embedder is not None:
            cond.append(self.y_embedder(class_labels))  # (B, Dz)
        if encoder_hidden_states is not None:
            pooled = masked_mean(encoder_hidden_states, encoder_attention_mask)  # (B, C_text)
            cond.append(self.text_pool_proj(pooled.to(self.latents.dtype)))  # (B, Dz)
        cond = torch.stack(cond, dim=1)  # (B, n_cond, Dz)
        return cond, F.silu(cond.sum(dim=1))

    def _embed_inputs(
        self, sample: torch.Tensor, prev_latents: torch.Tensor | None, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        :return: the interface X (B, N, Dx): patches + position; the latents Z (B, M + n_cond, Dz): learned state +
            self-conditioning warm start from ``prev_latents`` (None: zeros), then the conditioning tokens ``cond``.
        """
        x = self.x_embedder(sample.to(self.x_embedder.weight.dtype))  # (B, Dx, H/p, W/p)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, Dx)
        if prev_latents is None:
            shape = (len(sample), self.num_latents, self.config.latent_dim)
            prev_latents = torch.zeros(shape, device=sample.device, dtype=self.latents.dtype)
        z = self.latents[None] + self.self_cond_gain(self.self_cond_norm(prev_latents.to(self.latents.dtype)))
        # (B, M, Dz)
        z = torch.cat([z, cond], dim=1)  # (B, M + n_cond, Dz)
        return x, z

    def _read_out(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Output head: X (B, N, Dx) -> LayerNorm, modulated by c -> Linear -> unpatchify -> (B, C_out, H, W)."""
        h = self.norm_out(x)  # (B, N, Dx)
        if self.modulation_out is not None:
            h = modulate(h, *self.modulation_out(c).chunk(2, dim=-1))
        out = self.proj_out(h)  # (B, N, p * p * C_out)
        return unpatchify(out, *grid, self.patch_size, self.out_channels)  # (B, C_out, H, W)


# ----------------------------------------------------------------------------------------------------------------------
# Presets: RINModel(**RIN_PRESETS["RIN-small"], sample_size=32)
# ----------------------------------------------------------------------------------------------------------------------

RIN_PRESETS: dict[str, dict] = {
    "RIN-tiny": {  # tests
        "patch_size": 2,
        "interface_dim": 32,
        "num_latents": 8,
        "latent_dim": 32,
        "num_blocks": 2,
        "compute_depth": 1,
        "num_heads": 2,
        "rw_num_heads": 2,
    },
    "RIN-small": {  # trains on a CPU at 32x32
        "patch_size": 2,
        "interface_dim": 128,
        "num_latents": 64,
        "latent_dim": 256,
        "num_blocks": 4,
        "compute_depth": 2,
        "num_heads": 4,
        "rw_num_heads": 4,
    },
    "RIN-mnist": {  # class-conditional MNIST at 32x32 on a CPU: 64 interface tokens (4x4 patches), 32 latents, 1.52M
        "patch_size": 4,
        "interface_dim": 64,
        "num_latents": 32,
        "latent_dim": 128,
        "num_blocks": 2,
        "compute_depth": 2,
        "num_heads": 4,
        "rw_num_heads": 4,
    },
    "RIN-cifar": {  # the paper's CIFAR-10 model (official pix2seq config: 3 blocks x 2 layers, 128 x 512 latents),
        # without hfgen's interface additions
        "patch_size": 2,
        "interface_dim": 256,
        "num_latents": 128,
        "latent_dim": 512,
        "num_blocks": 3,
        "compute_depth": 2,
        "num_heads": 16,
        "rw_num_heads": 8,
        "latent_mlp_ratio": 4.0,
        "interface_mlp_ratio": 2.0,
        "interface_conv": False,
        "interface_modulation": False,
    },
}
