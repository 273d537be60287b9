"""UNetModel: tiny real models, each test a fraction of a second to a few seconds on CPU."""

import json

import diffusers
import pytest
import torch
from tolerances import assert_close_float32

import hfgen
from hfgen.unet import UNET_PRESETS, AttentionBlock, ResBlock, UNetModel

TINY = UNET_PRESETS["unet-tiny"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny convs gain nothing from threads, and on a shared, busy CPU two threads spin-wait each other (~100x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_unet(**kwargs) -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(**{**TINY, "sample_size": 16, **kwargs}).eval()


def randomize(model: torch.nn.Module, seed: int = 0, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Give every parameter (except names containing a string of ``skip``) small random values, so that the
    zero-initialised branches carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def inputs(batch: int = 2, size: int = 16, channels: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.tensor([3, 7][:batch] + [5] * (batch - 2))


# ----------------------------------------------------------------------------------------------------------------------
# Shapes, determinism, call conventions
# ----------------------------------------------------------------------------------------------------------------------


def test_exports_and_presets():
    assert hfgen.UNetModel is UNetModel and hfgen.UNET_PRESETS is UNET_PRESETS
    for name, preset in UNET_PRESETS.items():
        assert "sample_size" not in preset, name
    assert UNetModel(**UNET_PRESETS["unet-small"], sample_size=32).downsample_factor == 4


def test_output_shape_dtype_and_fresh_model_is_zero():
    model = make_unet(out_channels=5)
    x, t = inputs()
    out = model(x, t).sample
    assert out.shape == (2, 5, 16, 16) and out.dtype == torch.float32
    # zero-initialised output conv: the fresh network predicts 0; every residual branch ends in zeros
    assert torch.count_nonzero(out) == 0
    resblocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    attentions = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(resblocks) == 8 and len(attentions) == 4
    for zeroed in [b.conv2 for b in resblocks] + [a.attn.to_out for a in attentions] + [model.conv_out]:
        assert all(torch.count_nonzero(p) == 0 for p in zeroed.parameters())
    randomize(model)
    out = model(x, t).sample
    assert out.shape == (2, 5, 16, 16) and torch.isfinite(out).all() and out.abs().mean() > 0
    assert model.downsample_factor == 2


def test_determinism_and_dict_tuple_equivalence():
    model = randomize(make_unet())
    x, t = inputs()
    with torch.no_grad():
        a = model(x, t).sample
        b = model(x, t).sample
        (c,) = model(x, t, return_dict=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    other = randomize(make_unet())
    with torch.no_grad():
        assert torch.equal(other(x, t).sample, a)


def test_timestep_forms_agree():
    model = randomize(make_unet())
    x, _ = inputs()
    with torch.no_grad():
        as_int = model(x, 4).sample
        as_float = model(x, 4.0).sample
        as_0d = model(x, torch.tensor(4)).sample
        per_sample = model(x, torch.tensor([4, 4])).sample
        different = model(x, torch.tensor([4, 9])).sample
    assert torch.equal(as_int, as_0d) and torch.equal(as_int, per_sample) and torch.equal(as_int, as_float)
    assert torch.allclose(different[0], as_int[0]) and not torch.allclose(different[1], as_int[1])


def test_dropout_only_in_train_mode():
    model = randomize(make_unet(dropout=0.5))
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, model(x, t).sample)
        model.train()
        assert not torch.equal(model(x, t).sample, model(x, t).sample)


def test_per_sample_independence_of_batch():
    model = randomize(make_unet())
    x, t = inputs()
    with torch.no_grad():
        both = model(x, t).sample
        first = model(x[:1], t[:1]).sample
    # batch 2 and batch 1 run the convs and matmuls with other blockings (other kernels on another CPU): sums of up to
    # 9 x 64 products in another order, a few tens of float32 eps of the output's magnitude at most (5 measured)
    assert_close_float32(both[:1], first, num_eps=256)


# ----------------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------------


def test_class_conditioning():
    model = make_unet(num_classes=4)
    assert model.class_embed.num_embeddings == 5  # 4 classes + the null label 4
    x, t = inputs()
    with torch.no_grad():
        # fresh: zero output conv, labels cannot show
        assert torch.equal(model(x, t, class_labels=torch.tensor([0, 1])).sample, model(x, t).sample)
        randomize(model)
        a = model(x, t, class_labels=torch.tensor([0, 1])).sample
        b = model(x, t, class_labels=torch.tensor([2, 1])).sample
        null = model(x, t, class_labels=torch.tensor([4, 4])).sample
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert torch.isfinite(null).all() and not torch.allclose(null, a)


def test_cross_attention_zero_init_ignores_text():
    model = make_unet(cross_attention_dim=12)
    # every weight non-zero except the zero-initialised cross-attention output projections
    randomize(model, skip=("cross_attn.to_out",))
    x, t = inputs()
    text = torch.randn(2, 5, 12)
    with torch.no_grad():
        no_text = model(x, t).sample
        with_text = model(x, t, encoder_hidden_states=text).sample
        other_text = model(x, t, encoder_hidden_states=torch.randn(2, 5, 12)).sample
        assert torch.equal(no_text, with_text) and torch.equal(with_text, other_text)
        randomize(model, seed=1)  # now the cross-attention branch is live
        assert not torch.allclose(model(x, t, encoder_hidden_states=text).sample, model(x, t).sample)


def test_encoder_attention_mask_respected():
    model = randomize(make_unet(cross_attention_dim=12))
    x, t = inputs()
    text = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    changed_masked = text.clone()
    changed_masked[0, 3:] = torch.randn(3, 12)
    changed_masked[1, 5:] = torch.randn(1, 12)
    changed_kept = text.clone()
    changed_kept[0, 0] = torch.randn(12)
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
        same = model(x, t, encoder_hidden_states=changed_masked, encoder_attention_mask=mask).sample
        diff = model(x, t, encoder_hidden_states=changed_kept, encoder_attention_mask=mask).sample
        # a mask of booleans means the same; truncating to the kept tokens means the same
        as_bool = model(x, t, encoder_hidden_states=text, encoder_attention_mask=mask.bool()).sample
        short = model(x[:1], t[:1], encoder_hidden_states=text[:1, :3]).sample
    # masked tokens get weight exp(-inf) = 0: the same kernels and shapes give the same sums (0 eps measured)
    assert_close_float32(same, ref, num_eps=16)
    assert not torch.allclose(diff[0], ref[0]) and torch.allclose(diff[1], ref[1])
    assert torch.equal(as_bool, ref)
    # batch 1 with 3 tokens vs batch 2 with 6 (3 masked): other kernel blockings, as in the test above (7 measured)
    assert_close_float32(short, ref[:1], num_eps=256)
    # a sample whose tokens are all masked still gives a finite output
    with torch.no_grad():
        none_kept = model(x, t, encoder_hidden_states=text, encoder_attention_mask=torch.zeros(2, 6)).sample
    assert torch.isfinite(none_kept).all()


# ----------------------------------------------------------------------------------------------------------------------
# Serialisation and dtypes
# ----------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = randomize(make_unet(num_classes=3, cross_attention_dim=8))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = UNetModel.from_pretrained(tmp_path).eval()
    assert tuple(loaded.config.attention_levels) == tuple(model.config.attention_levels)
    assert loaded.config.num_classes == 3 and loaded.config.cross_attention_dim == 8
    x, t = inputs()
    kw = {"class_labels": torch.tensor([0, 3]), "encoder_hidden_states": torch.randn(2, 4, 8)}
    with torch.no_grad():
        assert torch.equal(loaded(x, t, **kw).sample, model(x, t, **kw).sample)


def test_fp16_variant_round_trip(tmp_path):
    model = randomize(make_unet())
    model.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    loaded = UNetModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16
    ref = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float16 and torch.equal(value, ref[name]), name


def test_torch_dtype_bfloat16_load(tmp_path):
    model = randomize(make_unet(num_classes=2))
    model.save_pretrained(tmp_path)
    loaded = UNetModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16
    x, t = inputs()
    with torch.no_grad():
        out = loaded(x.bfloat16(), t, class_labels=torch.tensor([0, 2])).sample
        ref = model(x, t, class_labels=torch.tensor([0, 2])).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


# ----------------------------------------------------------------------------------------------------------------------
# Training support
# ----------------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_same_grads():
    calls = []

    def checkpoint(block, *args):
        calls.append(type(block).__name__)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    def grads(checkpointing: bool):
        model = randomize(make_unet(num_classes=2, cross_attention_dim=8)).train()
        if checkpointing:
            model.enable_gradient_checkpointing(checkpoint)
            assert model.is_gradient_checkpointing
        x, t = inputs()
        text = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3))
        out = model(x, t, class_labels=torch.tensor([0, 1]), encoder_hidden_states=text).sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, g_plain = grads(False)
    assert calls == []
    out_ckpt, g_ckpt = grads(True)
    # tiny: 1 + 2 ResBlocks per level, attention at level 1 (3 blocks), middle ResBlock, attention, ResBlock
    assert calls.count("ResBlock") == 8 and calls.count("AttentionBlock") == 4
    torch.testing.assert_close(out_ckpt, out_plain)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in g_plain.values())


def test_zero_init_does_not_block_learning():
    """Zero-init must not block learning: by the third SGD step every parameter receives a gradient
    (step 1 wakes the output conv, step 2 the zeroed residual branches, step 3 everything behind them)."""
    model = make_unet(num_classes=2).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = inputs()
    for _ in range(3):
        opt.zero_grad()
        model(x, t, class_labels=torch.tensor([0, 1])).sample.sub(x).square().mean().backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


# ----------------------------------------------------------------------------------------------------------------------
# diffusers interoperability
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline_cls", [diffusers.DDPMPipeline, diffusers.DDIMPipeline])
def test_diffusers_pipelines_run_hfgen_unet(pipeline_cls, tmp_path):
    unet = randomize(make_unet())
    scheduler_cls = diffusers.DDPMScheduler if pipeline_cls is diffusers.DDPMPipeline else diffusers.DDIMScheduler
    pipe = pipeline_cls(unet=unet, scheduler=scheduler_cls(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3)
    assert (images >= 0).all() and (images <= 1).all() and images.std() > 0
    # the saved pipeline names hfgen.unet.UNetModel in model_index.json and diffusers loads it back
    pipe.save_pretrained(tmp_path)
    reloaded = pipeline_cls.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.unet, UNetModel)
    again = reloaded(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.manual_seed(0)).images
    assert (again == images).all()


def _diffusers_unet(preset: dict, **kwargs) -> diffusers.UNet2DModel:
    attn = preset["attention_levels"]
    return diffusers.UNet2DModel(
        sample_size=32,
        block_out_channels=preset["block_out_channels"],
        layers_per_block=preset["layers_per_block"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=preset["norm_num_groups"],
        attention_head_dim=preset["attention_head_dim"],
        **kwargs,
    )


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["unet-tiny", "unet-small", "unet-base"])
def test_parameter_count_matches_diffusers(name):
    preset = UNET_PRESETS[name]
    ours = _count(UNetModel(**preset, sample_size=32))
    # same ResBlock kind (time embedding as scale and shift): the structures coincide
    theirs = _count(_diffusers_unet(preset, resnet_time_scale_shift="scale_shift"))
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
    if name == "unet-base":
        # diffusers' default additive time embedding has a half-width projection: still within 5% at this size
        theirs_default = _count(_diffusers_unet(preset))
        assert abs(ours - theirs_default) / theirs_default < 0.05, (ours, theirs_default)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"attention_levels": (False, True, True)}, "attention_levels"),
        ({"block_out_channels": (16, 36)}, "norm_num_groups"),
        ({"attention_head_dim": 12}, "attention_head_dim"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"sample_size": 15}, "sample_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"time_freq_shift": 8}, "time_freq_shift"),
        ({"downsample_padding": 2}, "downsample_padding"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"up_attention_levels": (True,)}, "up_attention_levels"),
        ({"attention_head_dim": 32, "up_attention_levels": (True, False)}, "attention_head_dim"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_unet(**kwargs)


def test_bad_forward_inputs():
    model = make_unet()
    x, t = inputs()
    with pytest.raises(ValueError, match="shape"):
        model(x[0], t)
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.randn(2, 4, 16, 16), t)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 3, 15, 16), t)
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, encoder_hidden_states=torch.randn(2, 3, 8))

    conditional = make_unet(num_classes=3, cross_attention_dim=8)
    with pytest.raises(ValueError, match="class_labels"):
        conditional(x, t, class_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        conditional(x, t, encoder_hidden_states=torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        conditional(x, t, encoder_hidden_states=torch.randn(2, 3, 8), encoder_attention_mask=torch.ones(2, 4))


# ----------------------------------------------------------------------------------------------------------------------
# Regression: the default configuration computes what it computed before the DDPM options were added
# ----------------------------------------------------------------------------------------------------------------------

# out[:, :, 5, 3:7] of the model below, recorded with hfgen/unet.py before the DDPM layout options existed
_REFERENCE_SLICE = [
    [
        [0.52311385, 0.54351687, 0.55262065, 0.13478954],
        [-0.13657127, -0.25639415, 0.16919906, 0.065245941],
        [-0.33357015, -0.45181596, -0.2658762, -0.25195435],
    ],
    [
        [0.38178408, 0.48154944, 0.52566326, 0.69554651],
        [0.2338617, 0.19213414, -0.29414976, -0.0033027977],
        [-0.23721892, -0.15621415, -0.28573558, -0.42550981],
    ],
]


def _reference_model_and_output(model: UNetModel | None = None) -> tuple[UNetModel, torch.Tensor]:
    model = model or randomize(make_unet(layers_per_block=2, num_classes=3, cross_attention_dim=8), seed=5)
    x, t = inputs()
    text = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, t, class_labels=torch.tensor([0, 3]), encoder_hidden_states=text).sample
    return model, out


def test_default_config_output_unchanged():
    _, out = _reference_model_and_output()
    # recorded on one CPU; another CPU's conv/matmul blockings move float32 sums by a few tens of eps of the output's
    # magnitude (~1), while any change of the computation (sin/cos order, eps, time modulation) moves it by far more
    assert_close_float32(out[:, :, 5, 3:7], torch.tensor(_REFERENCE_SLICE), num_eps=512)


def test_default_layout_is_improved_diffusion():
    """The defaults the stored slice above is too coarse to see: GroupNorm eps 1e-5 and 32 channels per head."""
    model = UNetModel(block_out_channels=(32, 64), attention_levels=(False, True), norm_num_groups=8)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-5}
    assert [m.attn.num_heads for m in model.modules() if isinstance(m, AttentionBlock)] == [2] * 6


NEW_KEYS = (
    "time_sin_first",
    "time_freq_shift",
    "time_scale_shift",
    "downsample_padding",
    "norm_eps",
    "up_attention_levels",
)


def test_config_saved_before_the_ddpm_options_loads_unchanged(tmp_path):
    model, out = _reference_model_and_output()
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    assert all(key in config for key in NEW_KEYS)
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k not in NEW_KEYS}))
    loaded = UNetModel.from_pretrained(tmp_path).eval()
    assert [loaded.config[key] for key in NEW_KEYS] == [False, 0.0, True, 1, 1e-5, None]
    _, again = _reference_model_and_output(loaded)
    assert torch.equal(again, out)


@pytest.mark.parametrize("with_text", [False, True])
def test_attention_block_output_keeps_the_attention_layout(with_text):
    """The residual sum keeps the attention output's layout (channels-last strides), which the convolutions after it
    run faster in on a CPU; the values are those of the plain sum, whatever the layout of the input."""
    from hfgen.unet import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=2, norm_num_groups=4, cross_attention_dim=8 if with_text else None)
    x = torch.randn(2, 16, 4, 4)
    context = torch.randn(2, 3, 8) if with_text else None
    out = block(x, context)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last), context), out)
