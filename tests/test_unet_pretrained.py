"""UNetModel.from_diffusers: a diffusers UNet2DModel in the google/ddpm-* layout becomes a UNetModel computing the same
function. Tiny random models built here (nothing is downloaded); each test well under a second on CPU."""

import diffusers
import pytest
import torch
from tolerances import assert_close_float32

from hfgen.unet import UNetModel, _hfgen_key, _state_dict_from_diffusers

# the google/ddpm-cifar10-32 config, scaled down: 3 levels instead of 4, 8 GroupNorm groups, 16x16
DDPM_LAYOUT = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "norm_eps": 1e-6,
    "attention_head_dim": None,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "resnet_time_scale_shift": "default",
    "act_fn": "silu",
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_scale_factor": 1,
}

# google/ddpm-cifar10-32's four levels, scaled down: attention at level 1 (16x16 there) going down, but diffusers'
# up_block_types put it at level 2 (8x8) going up
CIFAR10_LAYOUT = {
    **DDPM_LAYOUT,
    "block_out_channels": (32, 64, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
}

# one ResBlock per level, attention at two levels with two heads each
TWO_ATTENTION_LEVELS = {
    **DDPM_LAYOUT,
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,
}

# hfgen's own defaults in diffusers' words: scale-shift time modulation, [cos | sin], symmetric padding, eps 1e-5
HFGEN_LAYOUT = {
    **DDPM_LAYOUT,
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "norm_eps": 1e-5,
}

# two levels, for the checks that need no depth
SMALL = {
    **DDPM_LAYOUT,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}

TIMESTEPS = torch.tensor([0, 1, 500, 999])


def random_unet(layout: dict, seed: int = 0, **overrides) -> diffusers.UNet2DModel:
    """A UNet2DModel with every parameter random and non-zero: matrices ~ N(0, 1/fan_in), so activations stay O(1)
    through the depth, norm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{**layout, **overrides}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * noise)
    assert all(torch.count_nonzero(p) == p.numel() for p in unet.parameters())
    return unet


def noisy_sample(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "layout",
    [DDPM_LAYOUT, CIFAR10_LAYOUT, TWO_ATTENTION_LEVELS, HFGEN_LAYOUT],
    ids=["ddpm", "cifar10", "2attn", "hfgen"],
)
def test_converted_model_computes_the_same_function(layout):
    unet = random_unet(layout)
    model = UNetModel.from_diffusers(unet)
    assert isinstance(model, UNetModel) and not model.training
    x = noisy_sample()
    with torch.no_grad():
        expected = unet(x, TIMESTEPS).sample
        actual = model(x, TIMESTEPS).sample
        # one timestep for the whole batch, as a Python number and as a 0-d tensor
        expected_999 = unet(x, 999).sample
        actual_999 = model(x, torch.tensor(999)).sample
    assert expected.abs().max() > 0.1 and expected.std() > 0.1
    # the same layers in the same order on the same kernels; what differs is the association of a few sums (the
    # additive time embedding, SDPA on (B, N, C) vs diffusers' views): 6-8 eps of max |expected| measured. 256 eps
    # leaves room for other CPUs' blockings, while a wrong convention (sin/cos order, frequency shift, padding side,
    # heads, swapped weights) moves the output by ~10^6 eps (~0.1 relative, measured); eps is checked structurally
    assert_close_float32(actual, expected, num_eps=256, msg=f"timesteps {TIMESTEPS.tolist()}")
    assert_close_float32(actual_999, expected_999, num_eps=256, msg="timestep 999")


def test_ddpm_config_translation():
    unet = random_unet(DDPM_LAYOUT)
    model = UNetModel.from_diffusers(unet)
    config = model.config
    assert tuple(config.attention_levels) == (False, True, False) and config.up_attention_levels is None
    assert config.layers_per_block == 2 and tuple(config.block_out_channels) == (32, 64, 64)
    assert config.attention_head_dim is None and config.norm_eps == 1e-6 and config.downsample_padding == 0
    assert config.time_sin_first is True and config.time_freq_shift == 1.0 and config.time_scale_shift is False
    assert config.num_classes is None and config.cross_attention_dim is None and config.sample_size == 16
    # eps 1e-6 reaches every GroupNorm (ResBlocks, attention, output): with O(1) activations a wrong eps moves the
    # output by less than the float32 tolerance above, so it is checked here
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
    assert {m.eps for m in norms} == {1e-6}


def test_cifar10_attention_levels_differ_between_encoder_and_decoder():
    config = UNetModel.from_diffusers(random_unet(CIFAR10_LAYOUT)).config
    assert tuple(config.attention_levels) == (False, True, False, False)
    assert tuple(config.up_attention_levels) == (False, False, True, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversion_keeps_dtype_and_every_weight(dtype):
    unet = random_unet(DDPM_LAYOUT).to(dtype)
    model = UNetModel.from_diffusers(unet)
    assert model.dtype == dtype and model.device == unet.device
    ours, theirs = model.state_dict(), unet.state_dict()
    assert len(ours) == len(theirs)
    # every diffusers tensor arrives bit for bit, in its dtype
    for key, value in theirs.items():
        assert ours[_hfgen_key(key)].dtype == dtype and torch.equal(ours[_hfgen_key(key)], value), key


def test_train_mode_kept_and_weights_are_trainable_copies():
    unet = random_unet(SMALL).train()
    model = UNetModel.from_diffusers(unet)
    assert model.training and all(p.requires_grad for p in model.parameters())
    # copies, not views: fine-tuning the converted model leaves the diffusers one as it was
    assert not {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in unet.parameters()}


def test_converted_model_save_load_round_trip(tmp_path):
    model = UNetModel.from_diffusers(random_unet(DDPM_LAYOUT))
    model.save_pretrained(tmp_path)
    loaded = UNetModel.from_pretrained(tmp_path).eval()
    x = noisy_sample(batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(x, TIMESTEPS[:2]).sample, model(x, TIMESTEPS[:2]).sample)


# ----------------------------------------------------------------------------------------------------------------------
# What UNetModel cannot represent: a ValueError naming it
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"resnet_time_scale_shift": "scale_shift"}, "attn_norm_num_groups"),
        ({"attn_norm_num_groups": 4}, "attn_norm_num_groups"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"num_class_embeds": 10}, "num_class_embeds"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"add_attention": False}, "add_attention"),
        ({"center_input_sample": True}, "center_input_sample"),
        ({"mid_block_scale_factor": 2.0}, "mid_block_scale_factor"),
        ({"downsample_type": "resnet"}, "downsample_type"),
        ({"act_fn": "mish"}, "act_fn"),
        ({"time_embedding_dim": 32}, "time_embedding_dim"),
        ({"down_block_types": ("DownBlock2D", "AttnSkipDownBlock2D")}, "AttnSkipDownBlock2D"),
        ({"up_block_types": ("AttnUpBlock2D", "SkipUpBlock2D")}, "SkipUpBlock2D"),
    ],
)
def test_unsupported_diffusers_config_raises(overrides, match):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{**SMALL, **overrides})
    with pytest.raises(ValueError, match=match):
        UNetModel.from_diffusers(unet)


def test_weights_that_do_not_map_raise():
    unet = random_unet(SMALL)
    ours = UNetModel.from_diffusers(unet).state_dict()
    theirs = unet.state_dict()
    with pytest.raises(ValueError, match=r"missing \['conv_out.bias'\]"):
        _state_dict_from_diffusers({k: v for k, v in theirs.items() if k != "conv_out.bias"}, ours)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        _state_dict_from_diffusers({**theirs, "extra.weight": torch.zeros(1)}, ours)
    with pytest.raises(ValueError, match="conv_in.weight has shape"):
        _state_dict_from_diffusers({**theirs, "conv_in.weight": torch.zeros(16, 3, 1, 1)}, ours)
