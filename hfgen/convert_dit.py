"""Conversion between hfgen's ``DiTModel`` and the two public DiT formats; ``DiTModel`` calls these functions.

1. The paper's code (facebookresearch/DiT ``models.py``, checkpoints ``DiT-XL-2-256x256.pt``): a plain state dict.
   Its names are hfgen's but two (``x_embedder.proj.*``, ``y_embedder.embedding_table.*``), and it stores the fixed
   position table ``pos_embed`` (1, N, D), [column | row] per token (hfgen's ``pos_embed_columns_first=True``).
2. diffusers' ``DiTTransformer2DModel`` (and ``Transformer2DModel(norm_type="ada_norm_zero")``): separate q, k, v;
   one copy of the timestep and label embedder in every block's ``norm1.emb``; timestep frequencies with
   ``downscale_freq_shift=1`` (hfgen's ``freq_shift=1``); the LayerNorm before each MLP with eps = its ``norm_eps``.

Everything else is the same in all three: adaLN chunks (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
gate_mlp), final layer (shift, scale), LayerNorm eps 1e-6 without affine in adaLN, tanh GELU, timestep features
[cos | sin] of 256 channels, a label table of num_classes + 1 rows (the last one the null label) and the unpatchify.
"""

from __future__ import annotations

import math
import os
import pickle
import re

import safetensors.torch
import torch

from .layers import sincos_pos_embed_2d
from .loading import check_safetensors_file

PAPER_NUM_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # width D: heads, DiT-S / B / L / XL (paper, Table 1)
FREE_KEYS = ("num_heads", "freq_shift", "mlp_norm_eps")  # config keys the original tensors do not fix
_ORIGINAL_RENAMES = (("x_embedder.proj.", "x_embedder."), ("y_embedder.embedding_table.", "y_embedder."))
_DIFFUSERS_NAMES = (  # (hfgen, diffusers) module names; each has a .weight and a .bias
    ("x_embedder", "pos_embed.proj"),
    ("t_embedder.mlp.0", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
)
_DIFFUSERS_BLOCK_NAMES = (  # (hfgen, diffusers) inside block i; attn.qkv is to_q, to_k, to_v stacked
    ("adaLN_modulation.1", "norm1.linear"),
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
)
_DIFFUSERS_LABELS = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"

# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a ``torch.save``d state dict read with ``torch.load(weights_only=True)``."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        check_safetensors_file(path)
        return safetensors.torch.load_file(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, TypeError, ValueError) as error:
        raise ValueError(
            f"refusing to load {path}: not a plain tensor pickle (torch.load with weights_only=True failed: "
            f"{str(error).splitlines()[0]})"
        ) from error
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{path} must hold a state dict (names to tensors), got {type(state_dict).__name__}")
    return state_dict


def write_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``.safetensors`` by extension, else ``torch.save`` (``.pt``, ``.pth``), as the paper's ``sample.py`` reads."""
    path = os.fspath(path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        safetensors.torch.save_file(state_dict, path)
    else:
        torch.save(state_dict, path)


# ----------------------------------------------------------------------------------------------------------------------
# The paper's models.py format
# ----------------------------------------------------------------------------------------------------------------------


def _require(state_dict: dict, key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"{source} has no tensor {key!r}")
    return state_dict[key]


def pos_embed_columns_first(pos_embed: torch.Tensor, grid: int) -> bool:
    """Which layout a stored (1, grid * grid, D) table has: True [column | row] (the paper), False [row | column]."""
    stored = pos_embed.detach().reshape(grid * grid, -1).float().cpu()
    atol = max(1e-6, 2 * torch.finfo(pos_embed.dtype).eps)  # the table is computed in float64 and rounded
    for columns_first in (True, False):
        if torch.allclose(stored, sincos_pos_embed_2d(stored.shape[1], grid, grid, columns_first), atol=atol):
            return columns_first
    raise ValueError(f"pos_embed is not the fixed 2-D sin-cos table of a {grid}x{grid} grid in either layout")


def _num_heads(hidden_size: int, overrides: dict) -> int:
    """Heads from ``num_heads`` / ``num_attention_heads`` in ``overrides`` or from the paper's table by width."""
    alias = overrides.pop("num_attention_heads", None)
    if alias is not None and overrides.get("num_heads", alias) != alias:
        raise ValueError(f"num_heads ({overrides['num_heads']}) and num_attention_heads ({alias}) disagree")
    heads = overrides.pop("num_heads", alias)
    if heads is None:
        heads = PAPER_NUM_HEADS.get(hidden_size)
    if heads is None:
        raise ValueError(
            f"the checkpoint's width {hidden_size} is none of the paper's sizes {sorted(PAPER_NUM_HEADS)}, and the "
            "tensors do not hold the number of heads: pass num_attention_heads="
        )
    return heads


def config_from_original(state_dict: dict[str, torch.Tensor], overrides: dict) -> dict:
    """``DiTModel`` config read from a state dict of the paper's ``DiT``; ``overrides`` as in ``from_single_file``."""
    src = "the DiT checkpoint"
    overrides = dict(overrides)
    D, C, p, _ = _require(state_dict, "x_embedder.proj.weight", src).shape
    N = _require(state_dict, "pos_embed", src).shape[1]
    grid = math.isqrt(N)
    if grid * grid != N:
        raise ValueError(f"pos_embed holds {N} positions, not a square grid")
    out_channels = _require(state_dict, "final_layer.linear.weight", src).shape[0] // (p * p)
    mlp_width = _require(state_dict, "blocks.0.mlp.fc1.weight", src).shape[0]
    depth = len([k for k in state_dict if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k)])
    config = {
        "sample_size": grid * p,
        "in_channels": C,
        "out_channels": out_channels,
        "patch_size": p,
        "hidden_size": D,
        "depth": depth,
        "num_heads": _num_heads(D, overrides),
        "mlp_ratio": mlp_width / D,
        "num_classes": _require(state_dict, "y_embedder.embedding_table.weight", src).shape[0] - 1,
        "learn_sigma": out_channels == 2 * C,
        "pos_embed_columns_first": pos_embed_columns_first(state_dict["pos_embed"], grid),
    }
    for key, value in overrides.items():
        if key in FREE_KEYS:
            config[key] = value
        elif key in config and config[key] != value:
            raise ValueError(f"{key}={value!r} contradicts the checkpoint's tensors, which give {config[key]!r}")
        elif key not in config:
            raise ValueError(f"unknown override {key!r}; the tensors fix {sorted(config)}, free: {list(FREE_KEYS)}")
    return config


def hfgen_from_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's names -> hfgen's; ``pos_embed`` is dropped (hfgen computes the table, see ``config_from_original``)."""
    out = {}
    for key, value in state_dict.items():
        for original, ours in _ORIGINAL_RENAMES:
            if key.startswith(original):
                key = ours + key[len(original) :]
        if key != "pos_embed":
            out[key] = value
    return out


def original_from_hfgen(state_dict: dict[str, torch.Tensor], pos_embed: torch.Tensor, config) -> dict:
    """hfgen's names -> the paper's, with the model's own table as ``pos_embed``; refuses what the paper cannot run."""
    unsupported = {
        "num_classes": (config.num_classes is None, "the paper's DiT is class-conditional"),
        "cross_attention_dim": (config.cross_attention_dim is not None, "the paper's DiT has no text conditioning"),
        "freq_shift": (config.freq_shift != 0, "the paper's timestep features use 0"),
        "mlp_norm_eps": (config.mlp_norm_eps != 1e-6, "the paper's LayerNorms use 1e-6"),
    }
    for key, (bad, why) in unsupported.items():
        if bad:
            raise ValueError(f"cannot write the paper's format with {key}={getattr(config, key)!r}: {why}")
    out = {"pos_embed": pos_embed.detach().clone()}
    for key, value in state_dict.items():
        for original, ours in _ORIGINAL_RENAMES:
            if key.startswith(ours):
                key = original + key[len(ours) :]
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------------
# diffusers' DiTTransformer2DModel / Transformer2DModel(norm_type="ada_norm_zero")
# ----------------------------------------------------------------------------------------------------------------------


def config_from_diffusers(transformer) -> dict:
    """``DiTModel`` config of a diffusers DiT; ``ValueError`` naming the setting hfgen's DiT cannot express."""
    cfg = transformer.config
    name = type(transformer).__name__
    checks = {
        "norm_type": (cfg.get("norm_type"), "ada_norm_zero"),
        "activation_fn": (cfg.get("activation_fn"), "gelu-approximate"),
        "norm_elementwise_affine": (cfg.get("norm_elementwise_affine"), False),
        "cross_attention_dim": (cfg.get("cross_attention_dim"), None),
    }
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise ValueError(f"{name} with {key}={value!r} cannot be converted to a DiTModel (needs {wanted!r})")
    if cfg.get("patch_size") is None or cfg.get("num_embeds_ada_norm") is None:
        raise ValueError(f"{name} must have patch_size and num_embeds_ada_norm set (a patched class-conditional DiT)")
    time_proj = transformer.transformer_blocks[0].norm1.emb.time_proj
    if not time_proj.flip_sin_to_cos or time_proj.num_channels != 256 or time_proj.scale != 1:
        raise ValueError(f"{name}'s Timesteps must be 256 channels [cos | sin] with scale 1 to match hfgen's")
    D = cfg.num_attention_heads * cfg.attention_head_dim
    C, p = cfg.in_channels, cfg.patch_size
    out_channels = cfg.out_channels or C
    grid = cfg.sample_size // p
    if not pos_embed_columns_first(transformer.pos_embed.pos_embed, grid):
        raise ValueError(f"{name}'s pos_embed is not the sin-cos table of hfgen's pos_embed_columns_first=True")
    mlp_width = transformer.transformer_blocks[0].ff.net[0].proj.out_features
    return {
        "sample_size": cfg.sample_size,
        "in_channels": C,
        "out_channels": out_channels,
        "patch_size": p,
        "hidden_size": D,
        "depth": cfg.num_layers,
        "num_heads": cfg.num_attention_heads,
        "mlp_ratio": mlp_width / D,
        "num_classes": cfg.num_embeds_ada_norm,
        "learn_sigma": out_channels == 2 * C,
        "pos_embed_columns_first": True,
        "freq_shift": float(time_proj.downscale_freq_shift),
        "mlp_norm_eps": cfg.norm_eps,
    }


def check_shared_embedders(state_dict: dict[str, torch.Tensor], depth: int) -> None:
    """``ValueError`` unless every block's ``norm1.emb`` holds exactly block 0's timestep and label embedder."""
    first = "transformer_blocks.0.norm1.emb."
    names = [k[len(first) :] for k in state_dict if k.startswith(first)]
    for i in range(1, depth):
        for name in names:
            key = f"transformer_blocks.{i}.norm1.emb.{name}"
            if key not in state_dict or not torch.equal(state_dict[key], state_dict[first + name]):
                raise ValueError(
                    f"{key} differs from transformer_blocks.0's copy: hfgen's DiT has one timestep and label "
                    "embedder, so every block's norm1.emb must hold the same weights"
                )


def hfgen_from_diffusers(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A diffusers DiT state dict -> hfgen's (block 0's embedder copies; missing q/k/v biases become zeros)."""
    check_shared_embedders(state_dict, depth)
    src = "the diffusers DiT"
    out = {"y_embedder.weight": _require(state_dict, _DIFFUSERS_LABELS, src)}
    pairs = list(_DIFFUSERS_NAMES)
    for i in range(depth):
        pairs += [(f"blocks.{i}.{ours}", f"transformer_blocks.{i}.{theirs}") for ours, theirs in _DIFFUSERS_BLOCK_NAMES]
        qkv = [f"transformer_blocks.{i}.attn1.to_{n}." for n in "qkv"]
        weights = [_require(state_dict, k + "weight", src) for k in qkv]
        biases = [state_dict.get(k + "bias", weights[0].new_zeros(weights[0].shape[0])) for k in qkv]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(weights)  # (3 D, D): q, k, v rows as SelfAttention splits
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(biases)
    for ours, theirs in pairs:
        for suffix in (".weight", ".bias"):
            out[ours + suffix] = _require(state_dict, theirs + suffix, src)
    return out


def diffusers_config_from_hfgen(config) -> dict:
    """``DiTTransformer2DModel`` config of an hfgen DiT; refuses settings diffusers' DiT cannot express."""
    wanted = {
        "pos_embed_columns_first": True,
        "freq_shift": 1.0,
        "mlp_ratio": 4.0,
        "cross_attention_dim": None,
    }
    for key, value in wanted.items():
        if getattr(config, key) != value:
            raise ValueError(f"cannot convert to diffusers' DiT with {key}={getattr(config, key)!r} (needs {value!r})")
    if config.num_classes is None:
        raise ValueError("cannot convert to diffusers' DiT with num_classes=None: it is class-conditional")
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes,
        "norm_eps": config.mlp_norm_eps,
    }


def diffusers_from_hfgen(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """hfgen's DiT state dict -> diffusers' (the embedders copied into every block; qkv split into q, k, v)."""
    out = {}
    pairs = list(_DIFFUSERS_NAMES)
    for i in range(depth):
        pairs += [(f"blocks.{i}.{ours}", f"transformer_blocks.{i}.{theirs}") for ours, theirs in _DIFFUSERS_BLOCK_NAMES]
        for suffix in ("weight", "bias"):
            q, k, v = state_dict[f"blocks.{i}.attn.qkv.{suffix}"].chunk(3)
            out.update({f"transformer_blocks.{i}.attn1.to_{n}.{suffix}": t for n, t in zip("qkv", (q, k, v))})
    for ours, theirs in pairs:
        for suffix in (".weight", ".bias"):
            out[theirs + suffix] = state_dict[ours + suffix]
    out[_DIFFUSERS_LABELS] = state_dict["y_embedder.weight"]
    first = "transformer_blocks.0.norm1.emb."
    for key in [k for k in out if k.startswith(first)]:
        for i in range(1, depth):
            out[f"transformer_blocks.{i}.norm1.emb.{key[len(first) :]}"] = out[key]
    return out
