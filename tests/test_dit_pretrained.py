"""Public DiT weights: the paper's models.py format (from_single_file / save_single_file) and diffusers' DiT
(from_diffusers / to_diffusers), against independent computations; old hfgen DiT / RIN models keep their outputs.

Tolerance: max |actual - expected| <= 64 float32 eps of max |expected| (tests/tolerances.py) where two different
float32 computations meet (SDPA vs softmax(q k^T) v, addcmul vs x * (1 + scale) + shift, fused qkv vs three matmuls).
A wrong convention (position layout, chunk order, frequency shift, LayerNorm eps) moves the outputs by 1e-3 or more.
"""

import json
import math

import diffusers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_rin import randomize_zero_init
from tolerances import assert_close_float32

from hfgen import DIT_PRESETS, RIN_PRESETS, DiTModel, RINModel
from hfgen.layers import sincos_pos_embed_2d, timestep_embedding

NUM_EPS = 64

# ----------------------------------------------------------------------------------------------------------------------
# The paper's code, transcribed (facebookresearch/DiT models.py): position table, forward on a state dict
# ----------------------------------------------------------------------------------------------------------------------


def paper_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """get_2d_sincos_pos_embed of the paper's models.py (from MAE), in numpy as there: (1, grid * grid, dim)."""
    coords = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, 1, grid, grid)  # w goes first

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(dim // 2, g[0]), one_axis(dim // 2, g[1])], axis=1)
    return torch.from_numpy(table).float()[None]


def paper_state_dict(depth=2, width=32, patch=2, size=8, channels=4, num_classes=5, learn_sigma=True, seed=0):
    """Random weights (none zero) in the exact names and shapes of the paper's DiT.state_dict()."""
    g = torch.Generator().manual_seed(seed)
    D, p, out = width, patch, channels * (2 if learn_sigma else 1)

    def rnd(*shape):
        return 0.1 * torch.randn(shape, generator=g)

    sd = {
        "pos_embed": paper_pos_embed(D, size // p),
        "x_embedder.proj.weight": rnd(D, channels, p, p),
        "x_embedder.proj.bias": rnd(D),
        "t_embedder.mlp.0.weight": rnd(D, 256),
        "t_embedder.mlp.0.bias": rnd(D),
        "t_embedder.mlp.2.weight": rnd(D, D),
        "t_embedder.mlp.2.bias": rnd(D),
        "y_embedder.embedding_table.weight": rnd(num_classes + 1, D),
    }
    for i in range(depth):
        for name, rows, cols in [("attn.qkv", 3 * D, D), ("attn.proj", D, D), ("mlp.fc1", 4 * D, D)]:
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = rnd(rows, cols), rnd(rows)
        for name, rows, cols in [("mlp.fc2", D, 4 * D), ("adaLN_modulation.1", 6 * D, D)]:
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = rnd(rows, cols), rnd(rows)
    sd["final_layer.linear.weight"], sd["final_layer.linear.bias"] = rnd(p * p * out, D), rnd(p * p * out)
    sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"] = rnd(2 * D, D), rnd(2 * D)
    return sd


def paper_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, num_heads: int) -> torch.Tensor:
    """DiT.forward(x, t, y) of the paper's models.py (eval mode, timm Attention / Mlp) written on the state dict."""

    def linear(name, h):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    p = sd["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    B, N, D = h.shape
    freqs = torch.exp(-math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(h.dtype)
    c = linear("t_embedder.mlp.2", F.silu(linear("t_embedder.mlp.0", t_freq)))
    c = c + sd["y_embedder.embedding_table.weight"][y]
    depth = len([k for k in sd if k.endswith("attn.qkv.weight")])
    for i in range(depth):
        b = f"blocks.{i}."
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(
            b + "adaLN_modulation.1", F.silu(c)
        ).chunk(6, dim=1)
        a = modulate(norm(h), shift_msa, scale_msa)
        q, k, v = linear(b + "attn.qkv", a).reshape(B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (D // num_heads) ** -0.5).softmax(dim=-1)
        a = linear(b + "attn.proj", (attn @ v).transpose(1, 2).reshape(B, N, D))
        h = h + gate_msa.unsqueeze(1) * a
        m = modulate(norm(h), shift_mlp, scale_mlp)
        m = linear(b + "mlp.fc2", F.gelu(linear(b + "mlp.fc1", m), approximate="tanh"))
        h = h + gate_mlp.unsqueeze(1) * m
    shift, scale = linear("final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    h = linear("final_layer.linear", modulate(norm(h), shift, scale))
    C, g = h.shape[-1] // (p * p), math.isqrt(N)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(B, g, g, p, p, C))
    return h.reshape(B, C, g * p, g * p)


def inputs(batch=3, channels=4, size=8, num_classes=5, seed=3):
    """Noisy input, timesteps (integer, fractional, large) and labels with the null label num_classes last."""
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([0.0, 37.5, 999.0])[:batch]
    y = torch.tensor([0, 2, num_classes])[:batch]
    return x, t, y


# ----------------------------------------------------------------------------------------------------------------------
# Old hfgen models keep their outputs (slices stored before pos_embed_columns_first / freq_shift / mlp_norm_eps)
# ----------------------------------------------------------------------------------------------------------------------

DIT_SLICE = [0.95948559, -1.2408516, 0.42507315, 0.1198922, 0.58023119, -0.64625853, 0.58036506, -0.82922381]
DIT_NON_SQUARE_SLICE = [
    0.4262234,
    -0.71873736,
    0.1976693,
    -0.77320784,
    0.55731386,
    -0.96550709,
    0.86083144,
    -0.26389664,
]
RIN_SLICE = [-0.31579262, -0.16120274, -0.2079398, -0.12471246, -0.38344055, -0.1062895, -0.42198247, -0.11971432]


def old_inputs(h, w):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2))
    return x, torch.tensor([3.0, 7.5]), torch.tensor([1, 4])


def stored_slices_dit(model):
    with torch.no_grad():
        square = model(*old_inputs(8, 8)[:2], class_labels=old_inputs(8, 8)[2]).sample[:, 1, 3, 2:6].flatten()
        x, t, y = old_inputs(4, 8)
        non_square = model(x, t, class_labels=y).sample[:, 4, 1, 2:6].flatten()
    return square, non_square


def test_old_dit_and_rin_keep_their_outputs(tmp_path):
    torch.manual_seed(0)
    dit = DiTModel(**DIT_PRESETS["DiT-tiny/2"], sample_size=8, in_channels=3, num_classes=4, learn_sigma=True)
    randomize_zero_init(dit)
    assert not dit.config.pos_embed_columns_first and dit.config.freq_shift == 0 and dit.config.mlp_norm_eps == 1e-6
    # a folder saved before these options existed: its config.json has none of them
    dit.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("pos_embed_columns_first", "freq_shift", "mlp_norm_eps"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    for model in (dit, DiTModel.from_pretrained(tmp_path)):
        square, non_square = stored_slices_dit(model)
        assert_close_float32(square, torch.tensor(DIT_SLICE), NUM_EPS, msg="DiT 8x8")
        assert_close_float32(non_square, torch.tensor(DIT_NON_SQUARE_SLICE), NUM_EPS, msg="DiT 4x8")

    torch.manual_seed(0)
    rin = RINModel(**RIN_PRESETS["RIN-tiny"], sample_size=8, in_channels=3, num_classes=4)
    randomize_zero_init(rin)
    x, t, y = old_inputs(8, 8)
    with torch.no_grad():
        out = rin(x, t, class_labels=y).sample[:, 1, 3, 2:6].flatten()
    assert_close_float32(out, torch.tensor(RIN_SLICE), NUM_EPS, msg="RIN")


def test_pos_embed_layouts_and_timestep_frequencies():
    for grid in (1, 4):
        ours = sincos_pos_embed_2d(32, grid, grid, columns_first=True)
        assert_close_float32(ours, paper_pos_embed(32, grid)[0], 4, msg=f"paper table {grid}x{grid}")
        default = sincos_pos_embed_2d(32, grid, grid).view(grid, grid, 32)
        assert torch.equal(default, ours.view(grid, grid, 32).transpose(0, 1))  # the transpose
    rows = sincos_pos_embed_2d(16, 3, 5, columns_first=True).view(3, 5, 16)
    assert torch.equal(rows[:, :, 8:], sincos_pos_embed_2d(16, 3, 5).view(3, 5, 16)[:, :, :8])

    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    expected = diffusers.models.embeddings.get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert_close_float32(timestep_embedding(t, 256, freq_shift=1), expected, 4, msg="diffusers' Timesteps")
    freqs = torch.exp(-math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128)  # the paper's, exactly
    args = t[:, None] * freqs[None]
    assert torch.equal(timestep_embedding(t, 256), torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


# ----------------------------------------------------------------------------------------------------------------------
# The paper's format
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["dict", "pt", "safetensors"])
def test_from_single_file_matches_paper_forward(tmp_path, source):
    sd = paper_state_dict()
    if source == "dict":
        arg = sd
    else:
        arg = tmp_path / f"DiT-tiny.{source}"
        if source == "pt":
            torch.save(sd, arg)
        else:
            from safetensors.torch import save_file

            save_file(sd, arg)
    model = DiTModel.from_single_file(arg, num_attention_heads=2)
    cfg = model.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels, cfg.patch_size) == (8, 4, 8, 2)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_classes) == (32, 2, 2, 5)
    assert cfg.learn_sigma and cfg.pos_embed_columns_first and cfg.freq_shift == 0 and cfg.mlp_norm_eps == 1e-6
    assert not model.training
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, class_labels=y).sample
    assert_close_float32(out, paper_forward(sd, x, t, y, num_heads=2), NUM_EPS, msg="from_single_file vs paper")


def test_from_single_file_heads_from_paper_table_and_errors():
    sd = paper_state_dict(depth=1, width=384, size=4, num_classes=3)
    model = DiTModel.from_single_file(sd)
    assert model.config.num_heads == 6  # DiT-S width
    x, t, y = inputs(num_classes=3, size=4)
    with torch.no_grad():
        out = model(x, t, class_labels=y).sample
    assert_close_float32(out, paper_forward(sd, x, t, y, num_heads=6), NUM_EPS, msg="DiT-S width")

    tiny = paper_state_dict()
    with pytest.raises(ValueError, match="num_attention_heads="):
        DiTModel.from_single_file(tiny)
    assert DiTModel.from_single_file(tiny, num_heads=4).config.num_heads == 4
    with pytest.raises(ValueError, match="disagree"):
        DiTModel.from_single_file(tiny, num_heads=4, num_attention_heads=2)
    with pytest.raises(ValueError, match="patch_size=4 contradicts"):
        DiTModel.from_single_file(tiny, num_heads=2, patch_size=4)
    with pytest.raises(ValueError, match="unknown override 'heads'"):
        DiTModel.from_single_file(tiny, num_heads=2, heads=2)
    broken = dict(tiny, pos_embed=torch.zeros_like(tiny["pos_embed"]))
    with pytest.raises(ValueError, match="not the fixed 2-D sin-cos table"):
        DiTModel.from_single_file(broken, num_heads=2)
    partial = {k: v for k, v in tiny.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.fc2.bias'\]"):
        DiTModel.from_single_file(partial, num_heads=2)


@pytest.mark.parametrize("columns_first", [False, True])
@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_save_single_file_runs_in_paper_code_and_round_trips(tmp_path, columns_first, suffix):
    torch.manual_seed(0)
    model = DiTModel(
        **DIT_PRESETS["DiT-tiny/2"], sample_size=8, in_channels=4, num_classes=5, learn_sigma=True,
        pos_embed_columns_first=columns_first,
    )  # fmt: skip
    randomize_zero_init(model)
    path = tmp_path / f"trained.{suffix}"
    model.save_single_file(path)
    if suffix == "pt":
        sd = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(path)
    assert set(sd) == set(paper_state_dict())  # the paper's DiT.load_state_dict(strict=True) accepts it
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, class_labels=y).sample
        assert_close_float32(out, paper_forward(sd, x, t, y, num_heads=2), NUM_EPS, msg="saved file in paper code")
        loaded = DiTModel.from_single_file(path, num_heads=2)
        assert loaded.config.pos_embed_columns_first == columns_first
        assert torch.equal(loaded(x, t, class_labels=y).sample, out)

    with pytest.raises(ValueError, match="cross_attention_dim=8"):
        DiTModel(**DIT_PRESETS["DiT-tiny/2"], num_classes=5, cross_attention_dim=8).save_single_file(path)
    with pytest.raises(ValueError, match="freq_shift=1.0"):
        DiTModel(**DIT_PRESETS["DiT-tiny/2"], num_classes=5, freq_shift=1.0).save_single_file(path)


# ----------------------------------------------------------------------------------------------------------------------
# diffusers' DiT
# ----------------------------------------------------------------------------------------------------------------------


def diffusers_dit(legacy: bool = False, norm_eps: float = 1e-5, attention_bias: bool = True, seed: int = 0):
    """A tiny random diffusers DiT (nothing zero) whose blocks share one embedder, as converted checkpoints do."""
    torch.manual_seed(seed)
    kwargs = {
        "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 5, "norm_eps": norm_eps,
        "attention_bias": attention_bias,
    }  # fmt: skip
    if legacy:
        kwargs.update(norm_type="ada_norm_zero", activation_fn="gelu-approximate", norm_elementwise_affine=False)
        transformer = diffusers.Transformer2DModel(**kwargs)
    else:
        transformer = diffusers.DiTTransformer2DModel(**kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in transformer.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for block in transformer.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    return transformer.eval()


@pytest.mark.parametrize(
    "legacy, norm_eps, attention_bias",
    [(False, 1e-5, True), (False, 0.5, True), (True, 1e-5, True), (True, 0.5, False)],
)
def test_from_diffusers_matches_diffusers_forward(legacy, norm_eps, attention_bias):
    transformer = diffusers_dit(legacy, norm_eps, attention_bias)
    model = DiTModel.from_diffusers(transformer)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.num_classes, cfg.out_channels) == (16, 2, 2, 5, 8)
    assert cfg.pos_embed_columns_first and cfg.freq_shift == 1 and cfg.mlp_norm_eps == norm_eps and cfg.learn_sigma
    x, t, y = inputs()
    with torch.no_grad():
        expected = transformer(x, timestep=t, class_labels=y).sample
        out = model(x, t, class_labels=y).sample
    assert_close_float32(out, expected, NUM_EPS, msg=f"from_diffusers({type(transformer).__name__})")


def test_from_diffusers_refuses_differing_embedder_copies():
    transformer = diffusers_dit()
    with torch.no_grad():
        transformer.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[2, 0] += 1e-3
    with pytest.raises(ValueError, match=r"transformer_blocks.1.norm1.emb.class_embedder.* differs"):
        DiTModel.from_diffusers(transformer)


def test_from_diffusers_keeps_dtype_and_mode_and_converts_back():
    transformer = diffusers_dit().to(torch.float64).train()
    model = DiTModel.from_diffusers(transformer)
    assert model.dtype == torch.float64 and model.training
    back = model.to_diffusers()
    assert type(back) is diffusers.DiTTransformer2DModel and back.dtype == torch.float64
    torch.testing.assert_close(back.state_dict(), transformer.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="freq_shift=0.0"):
        DiTModel(**DIT_PRESETS["DiT-tiny/2"], num_classes=5, pos_embed_columns_first=True).to_diffusers()
