"""DiT: a Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

The image (or VAE latent) is cut into p x p patches, each patch becomes a token, and a stack of ``DiTBlock``s
processes the tokens. The conditioning vector c = time embedding + label embedding (+ pooled text embedding)
steers every block through adaLN-Zero: a zero-initialised linear layer maps c to a shift, a scale and a gate for
each branch, so that every block starts as the identity and a fresh model outputs exactly zero.

Reading order: attention and MLP, ``DiTBlock``, ``FinalLayer``, ``DiTModel``, presets ``DIT_PRESETS``. The sin-cos
position embedding and ``modulate`` live in ``hfgen.layers`` (RIN uses them too).

Attention: ``SelfAttention`` below uses one fused qkv ``Linear`` (one matmul instead of three, as in the paper's
code) on ``F.scaled_dot_product_attention``; the optional cross-attention to text tokens uses the shared
``hfgen.layers.Attention`` since its keys and values come from a different input.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, DiTTransformer2DModel, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from . import convert_dit
from .cards import HubCardMixin
from .layers import (
    Attention,
    DenoiserOutput,
    TimestepEmbedder,
    attention,
    check_denoiser_inputs,
    masked_mean,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)
from .loading import SafeLoadingMixin

# ----------------------------------------------------------------------------------------------------------------------
# Attention and MLP
# ----------------------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention of tokens (B, N, D) with one fused qkv projection, on SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.num_heads
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients into one tensor, where three
        # index backwards would each zero-fill a (3, B, N, h, D/h) buffer (fwd + bwd of this layer 1.1-1.2x faster)
        q, k, v = self.qkv(x).view(B, N, 3, h, D // h).unbind(2)  # 3 x (B, N, h, D/h)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, N, D/h)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(out)


class Mlp(nn.Module):
    """Token-wise MLP: Linear -> GELU(tanh) -> Linear, (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """
    One DiT transformer block with adaLN-Zero conditioning and optional cross-attention to text tokens.

    :param hidden_size: token width D.
    :param num_heads: attention heads.
    :param mlp_ratio: MLP hidden width = mlp_ratio * D.
    :param context_dim: width of the text tokens for cross-attention; None: no cross-attention.
    :param mlp_norm_eps: eps of the LayerNorm before the MLP (1e-6 in the paper's code; diffusers' DiT: 1e-5).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # c -> (shift, scale, gate) for the attention branch and for the MLP branch
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        :param x: tokens (B, N, D).
        :param c: conditioning vector (B, D).
        :param context: text tokens (B, L, context_dim) or None (the cross-attention is skipped).
        :param context_mask: (B, L), 1 where a text token may be attended to.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # each (B, D)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)  # (B, N, D)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift and scale from c) then a linear map of each token to its p * p * out_channels patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        x = modulate(self.norm_final(x), shift, scale)  # (B, N, D)
        return self.linear(x)  # (B, N, p * p * C_out)


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def _to(model: ModelMixin, device: torch.device | str, dtype: torch.dtype) -> ModelMixin:
    """``model.to(device, dtype)``, skipped when nothing changes (diffusers warns on every dtype ``to``)."""
    if model.device != torch.device(device) or model.dtype != dtype:
        model = model.to(device=device, dtype=dtype)
    return model


class DiTModel(SafeLoadingMixin, HubCardMixin, ModelMixin, ConfigMixin):
    """
    Diffusion Transformer denoiser with the hfgen denoiser signature.

    Conditioning: c = TimestepEmbedder(t) + label embedding (when ``num_classes`` is set; label ``num_classes`` is
    the null label, also used when ``class_labels`` is None) + Linear(masked mean of the text tokens) (when
    ``cross_attention_dim`` is set and ``encoder_hidden_states`` are given). With ``use_cross_attention`` every block
    also cross-attends to the text tokens.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,  # height = width of the image or latent, in pixels
        in_channels: int = 3,  # channels of the image or latent
        out_channels: int | None = None,  # None: in_channels (x 2 with learn_sigma)
        patch_size: int = 2,  # p: each p x p patch becomes one token
        hidden_size: int = 384,  # token width D
        depth: int = 12,  # number of DiTBlocks
        num_heads: int = 6,  # attention heads
        mlp_ratio: float = 4.0,  # MLP hidden width = mlp_ratio * D
        num_classes: int | None = None,  # None: no class conditioning; else a table of num_classes + 1 rows
        cross_attention_dim: int | None = None,  # width of the text tokens; None: no text conditioning
        use_cross_attention: bool | None = None,  # cross-attention to the text tokens; None: on iff text is on
        learn_sigma: bool = False,  # also output the variance interpolation v (out_channels = 2 * in_channels)
        pos_embed_columns_first: bool = False,  # True: position channels [column | row] as in the paper's code
        freq_shift: float = 0.0,  # timestep frequencies 10000 ** (-k / (128 - freq_shift)); diffusers' DiT: 1
        mlp_norm_eps: float = 1e-6,  # eps of the LayerNorm before each MLP; diffusers' DiT: its norm_eps, 1e-5
    ):
        super().__init__()
        expected_out = in_channels * (2 if learn_sigma else 1)
        if out_channels is None:
            out_channels = expected_out
            self.register_to_config(out_channels=out_channels)
        elif out_channels != expected_out:
            raise ValueError(
                f"out_channels must be {expected_out} (in_channels={in_channels}, learn_sigma={learn_sigma}), "
                f"got {out_channels}"
            )
        if use_cross_attention is None:
            use_cross_attention = cross_attention_dim is not None
            self.register_to_config(use_cross_attention=use_cross_attention)
        elif use_cross_attention and cross_attention_dim is None:
            raise ValueError("use_cross_attention=True needs cross_attention_dim to be set, got None")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size})")

        self.patch_size = patch_size
        self.out_channels = out_channels
        self.gradient_checkpointing = False

        # embedders
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        grid = sample_size // patch_size
        pos_embed = sincos_pos_embed_2d(hidden_size, grid, grid, columns_first=pos_embed_columns_first)[None]
        self.register_buffer("pos_embed", pos_embed, persistent=False)  # (1, N, D)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=freq_shift)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes is not None else None
        self.text_pool_proj = nn.Linear(cross_attention_dim, hidden_size) if cross_attention_dim is not None else None

        # transformer
        context_dim = cross_attention_dim if use_cross_attention else None
        self.blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim=context_dim, mlp_norm_eps=mlp_norm_eps)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # 1. every Linear: Xavier-uniform weights, zero biases (as in the paper's code)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # 2. patch embedding: initialise like a Linear on the flattened patch
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        # 3. label table and timestep MLP: small normal weights
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # 4. the "Zero" of adaLN-Zero: each block's shift, scale and gate start at 0, so with gate = 0 every block is
        #    the identity; the cross-attention output projection starts at 0 for the same reason
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
        # 5. final layer: zero modulation and zero output projection, so a fresh model outputs exactly 0
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

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
        return_dict: bool = True,
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """
        :param sample: noisy image or latent (B, in_channels, H, W); H and W divisible by patch_size.
        :param timestep: diffusion step, a number or a tensor of shape () or (B,).
        :param class_labels: (B,) integers in [0, num_classes]; None (or num_classes) is the null label.
        :param encoder_hidden_states: text tokens (B, L, cross_attention_dim); None: no text conditioning.
        :param encoder_attention_mask: (B, L), 1 for real tokens, 0 for padding.
        :return: ``DenoiserOutput(sample=(B, out_channels, H, W))`` or the tuple ``(sample,)``.
        """
        timesteps, class_labels = check_denoiser_inputs(
            self, sample, timestep, class_labels, encoder_hidden_states, encoder_attention_mask
        )
        B, _, H, W = sample.shape
        p = self.patch_size
        grid_h, grid_w = H // p, W // p

        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(self.dtype)  # text encoders may run in another dtype

        # 1. conditioning vector c
        c = self.t_embedder(timesteps)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(class_labels)  # (B, D)
        if encoder_hidden_states is not None:
            pooled = masked_mean(encoder_hidden_states, encoder_attention_mask)  # (B, C_text)
            c = c + self.text_pool_proj(pooled.to(c.dtype))  # (B, D)

        # 2. patchify and add the fixed position embedding
        x = self.x_embedder(sample.to(self.x_embedder.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), N = (H/p) * (W/p)
        if self.pos_embed.shape[1] == grid_h * grid_w and grid_h == grid_w:
            pos = self.pos_embed  # (1, N, D)
        else:
            columns_first = self.config.pos_embed_columns_first
            pos = sincos_pos_embed_2d(x.shape[-1], grid_h, grid_w, columns_first).to(x.device)[None]  # (1, N, D)
        x = x + pos.to(x.dtype)  # (B, N, D)

        # 3. transformer blocks
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, c, encoder_hidden_states, encoder_attention_mask)
            else:
                x = block(x, c, encoder_hidden_states, encoder_attention_mask)  # (B, N, D)

        # 4. final layer and unpatchify
        x = self.final_layer(x, c)  # (B, N, p * p * C_out)
        out = unpatchify(x, grid_h, grid_w, self.patch_size, self.out_channels)  # (B, C_out, H, W)

        if not return_dict:
            return (out,)
        return DenoiserOutput(sample=out)

    # ------------------------------------------------------------------------------------------------------------------
    # Public DiT weights: the paper's models.py format and diffusers' DiT (the name mapping is in hfgen.convert_dit)
    # ------------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_single_file(cls, path_or_state_dict: str | os.PathLike | dict, **overrides) -> DiTModel:
        """
        Load a checkpoint of facebookresearch/DiT ``models.py`` (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``).

        The config comes from the tensors (depth, width, patch size, input size from ``pos_embed``, channels,
        learn_sigma, num_classes = rows of the label table - 1), the heads from the paper's table by width (S 384: 6,
        B 768: 12, L 1024: 16, XL 1152: 16). ``forward(x, t, class_labels=y)`` then equals the original
        ``DiT.forward(x, t, y)`` (the null label ``num_classes`` included) to float32 rounding.

        :param path_or_state_dict: a ``.pt`` / ``.pth`` file (read with ``torch.load(weights_only=True)``), a
            ``.safetensors`` file, or the state dict itself.
        :param overrides: ``num_heads`` (or ``num_attention_heads``), required for other widths; ``freq_shift`` and
            ``mlp_norm_eps``; any other config key must agree with the tensors.
        :return: the model in eval mode, in the checkpoint's dtype, on the CPU.
        """
        if isinstance(path_or_state_dict, dict):
            state_dict, source = path_or_state_dict, "the state dict"
        else:
            state_dict, source = convert_dit.read_state_dict(path_or_state_dict), os.fspath(path_or_state_dict)
        model = cls(**convert_dit.config_from_original(state_dict, overrides))
        model._load_converted(convert_dit.hfgen_from_original(state_dict), source)
        return _to(model, "cpu", state_dict["x_embedder.proj.weight"].dtype).eval()

    def save_single_file(self, path: str | os.PathLike) -> None:
        """
        Write the weights in the format of facebookresearch/DiT ``models.py``: ``.safetensors`` by extension, else
        ``torch.save`` of the state dict (``.pt``), which the paper's ``sample.py --ckpt`` loads. ``pos_embed`` is this
        model's own table, so a model with ``pos_embed_columns_first=False`` runs there unchanged too.
        """
        state_dict = convert_dit.original_from_hfgen(self.state_dict(), self.pos_embed, self.config)
        convert_dit.write_state_dict(state_dict, path)

    @classmethod
    def from_diffusers(cls, transformer: nn.Module) -> DiTModel:
        """
        Convert diffusers' ``DiTTransformer2DModel`` (or ``Transformer2DModel(norm_type="ada_norm_zero")``, e.g. the
        ``transformer`` of a ``DiTPipeline``) to a DiTModel whose forward equals the transformer's forward (same
        sample, timestep and class labels, the null label ``num_embeds_ada_norm`` included) to float32 rounding.

        diffusers' DiT differs from the paper's code in two settings, which the config records: ``freq_shift=1``
        (``Timesteps(downscale_freq_shift=1)``) and ``mlp_norm_eps`` = its ``norm_eps``.

        :param transformer: the diffusers model; every block's ``norm1.emb`` must hold the same timestep and label
            embedder (``ValueError`` otherwise), as in converted official checkpoints.
        :return: a DiTModel on the transformer's device, in its dtype and train/eval mode.
        """
        config = convert_dit.config_from_diffusers(transformer)
        model = cls(**config)
        state_dict = convert_dit.hfgen_from_diffusers(transformer.state_dict(), config["depth"])
        model._load_converted(state_dict, type(transformer).__name__)
        weight = transformer.pos_embed.proj.weight
        return _to(model, weight.device, weight.dtype).train(transformer.training)

    def to_diffusers(self) -> DiTTransformer2DModel:
        """The inverse of ``from_diffusers``: a ``diffusers.DiTTransformer2DModel`` (needs ``freq_shift=1``, the
        column-first table, ``mlp_ratio=4`` and class labels; ``ValueError`` naming the setting otherwise)."""
        transformer = DiTTransformer2DModel(**convert_dit.diffusers_config_from_hfgen(self.config))
        state_dict = convert_dit.diffusers_from_hfgen(self.state_dict(), self.config.depth)
        transformer.load_state_dict(state_dict, strict=True)
        return _to(transformer, self.device, self.dtype).train(self.training)

    def _load_converted(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load converted weights; ``ValueError`` naming ``source`` and the tensors on a missing or extra name."""
        result = self.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{source} does not match a DiT of config {dict(self.config)}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Presets: DiTModel(**DIT_PRESETS["DiT-S/2"], sample_size=32, in_channels=4)
# ----------------------------------------------------------------------------------------------------------------------

_DIT_SIZES = {  # name: (depth, hidden_size, num_heads), the paper's Table 1
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

DIT_PRESETS: dict[str, dict] = {
    f"DiT-{name}/{p}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": p}
    for name, (d, w, h) in _DIT_SIZES.items()
    for p in (2, 4, 8)
}
DIT_PRESETS.update(
    {
        "DiT-tiny/2": {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2},  # tests
        "DiT-mini/2": {"depth": 6, "hidden_size": 192, "num_heads": 3, "patch_size": 2},  # CPU training
        "DiT-mini/4": {"depth": 6, "hidden_size": 192, "num_heads": 3, "patch_size": 4},  # CPU training, faster
        "DiT-mnist/4": {"depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": 4},  # class-cond. MNIST, 1.28M
    }
)
