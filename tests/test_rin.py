"""RINModel: shapes, latent self-conditioning, conditioning tokens, errors, round trips, DDPMPipeline, checkpointing."""

import diffusers
import numpy as np
import pytest
import torch

from hfgen import RIN_PRESETS, RINModel


def tiny_rin(**kwargs) -> RINModel:
    torch.manual_seed(0)
    return RINModel(**{**RIN_PRESETS["RIN-tiny"], "sample_size": 8, "in_channels": 3, **kwargs})


def randomize_zero_init(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter that is all zeros (self-conditioning gain, text read output) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_presets():
    assert RIN_PRESETS["RIN-cifar"]["num_latents"] == 128 and RIN_PRESETS["RIN-cifar"]["latent_dim"] == 512
    for name in ("RIN-small", "RIN-cifar"):
        with torch.device("meta"):  # shapes and config checks only, no memory or init time
            model = RINModel(**RIN_PRESETS[name], sample_size=32)
        assert model.downsample_factor == 2 and model.config.out_channels == 3
    assert RINModel.self_conditioning is True


def test_forward_without_and_with_previous_latents():
    model = tiny_rin()
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([3, 9]))
    assert out.sample.shape == (2, 3, 8, 8)
    assert out.latents.shape == (2, 8, 32)
    again = model(x, torch.tensor([3, 9]), prev_latents=out.latents)
    assert again.sample.shape == (2, 3, 8, 8) and again.latents.shape == (2, 8, 32)
    assert torch.isfinite(again.sample).all()


def test_self_conditioning_has_no_effect_at_init_and_does_once_gain_is_nonzero():
    model = tiny_rin()
    x = torch.randn(2, 3, 8, 8)
    prev = torch.randn(2, 8, 32)
    cold = model(x, 4).sample
    assert torch.equal(cold, model(x, 4, prev_latents=prev).sample)
    with torch.no_grad():
        torch.nn.init.normal_(model.self_cond_gain[-1].weight, std=0.1)
    assert not torch.allclose(model(x, 4).sample, model(x, 4, prev_latents=prev).sample)
    # None means "no previous estimate" = zeros
    assert torch.equal(model(x, 4).sample, model(x, 4, prev_latents=torch.zeros_like(prev)).sample)


def test_class_and_text_conditioning():
    x = torch.randn(2, 3, 8, 8)
    model = tiny_rin(num_classes=4)
    a = model(x, 5, class_labels=torch.tensor([0, 1])).sample
    assert not torch.allclose(a, model(x, 5, class_labels=torch.tensor([2, 3])).sample)
    assert torch.equal(model(x, 5).sample, model(x, 5, class_labels=torch.tensor([4, 4])).sample)  # null label

    text = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    swapped = text.clone()  # same masked mean, different tokens: only the text read can tell them apart
    swapped[:, 0], swapped[:, 1] = text[:, 1] + 0.5, text[:, 0] - 0.5
    model = tiny_rin(cross_attention_dim=8)
    out = model(x, 5, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    # at init the text read is zero: only the pooled token matters
    same_mean = model(x, 5, encoder_hidden_states=swapped, encoder_attention_mask=mask).sample
    assert torch.allclose(out, same_mean, atol=1e-5)
    assert not torch.allclose(out, model(x, 5, encoder_hidden_states=2 * text, encoder_attention_mask=mask).sample)
    randomize_zero_init(model)
    out = model(x, 5, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    assert not torch.allclose(out, model(x, 5, encoder_hidden_states=swapped, encoder_attention_mask=mask).sample)
    padded = text.clone()
    padded[1, 3] = 100.0  # a padding position: masked out everywhere
    assert torch.allclose(out, model(x, 5, encoder_hidden_states=padded, encoder_attention_mask=mask).sample, atol=1e-6)


def test_interface_conv_mixes_neighbouring_patches_only():
    x = torch.randn(1, 3, 8, 8)
    changed = x.clone()
    changed[..., :2, :2] += 1.0  # patch (0, 0) of the 4x4 grid of 2x2 patches

    def touched(model):
        """Which output patches move when only patch (0, 0) of the input changes, without the latents' route."""
        model.eval()
        for block in model.blocks:  # cut the route through the latents: the write adds nothing
            torch.nn.init.zeros_(block.write_attn.to_out.weight)
            torch.nn.init.zeros_(block.write_attn.to_out.bias)
        diff = (model(changed, 5).sample - model(x, 5).sample).abs().sum(1)  # (1, 8, 8)
        return diff.view(4, 2, 4, 2).sum((1, 3)) > 1e-6  # (4, 4) patches

    plain = touched(tiny_rin(interface_conv=False))
    assert plain.sum() == 1 and plain[0, 0]  # no latents, no conv: each patch only sees itself
    mixed = touched(tiny_rin())  # 2 blocks of 3x3 depthwise conv: patches up to 2 steps away
    assert mixed[:3, :3].all() and not mixed[3].any() and not mixed[:, 3].any()


def test_interface_modulation_starts_at_zero_and_carries_the_class():
    x = torch.randn(2, 3, 8, 8)
    model = tiny_rin(num_classes=4)
    unmodulated = tiny_rin(num_classes=4, interface_modulation=False)
    unmodulated.load_state_dict(model.state_dict(), strict=False)  # the same weights apart from the modulations
    assert torch.allclose(model(x, 5).sample, unmodulated(x, 5).sample, atol=1e-6)  # zero-initialised
    # cut the latents' route: with modulation the label still reaches every patch, without it nothing does
    for net in (model, unmodulated):
        randomize_zero_init(net)
        for block in net.blocks:
            torch.nn.init.zeros_(block.write_attn.to_out.weight)
            torch.nn.init.zeros_(block.write_attn.to_out.bias)
    a, b = torch.tensor([0, 1]), torch.tensor([2, 3])
    assert not torch.allclose(model(x, 5, class_labels=a).sample, model(x, 5, class_labels=b).sample)
    assert torch.equal(unmodulated(x, 5, class_labels=a).sample, unmodulated(x, 5, class_labels=b).sample)
    assert RIN_PRESETS["RIN-cifar"]["interface_conv"] is False  # the paper's model stays the paper's


def test_bad_inputs_are_clear_errors():
    model = tiny_rin(num_classes=4)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\]"):
        model(x, 1, class_labels=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"prev_latents must have shape \(2, 8, 32\)"):
        model(x, 1, prev_latents=torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="sample must be 8x8"):
        model(torch.randn(2, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="divisible by the number of heads"):
        RINModel(latent_dim=30, num_heads=4)


def test_determinism_dict_and_tuple():
    model = tiny_rin()
    randomize_zero_init(model)
    x, prev = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 32)
    a = model(x, torch.tensor([1.0, 7.5]), prev_latents=prev)
    sample, latents = model(x, torch.tensor([1.0, 7.5]), prev_latents=prev, return_dict=False)
    assert torch.equal(a.sample, sample) and torch.equal(a.latents, latents)
    torch.testing.assert_close(tiny_rin().state_dict(), tiny_rin().state_dict(), rtol=0, atol=0)


def test_save_load_round_trip(tmp_path):
    model = tiny_rin(num_classes=4, cross_attention_dim=8)
    randomize_zero_init(model)
    model.save_pretrained(tmp_path)
    loaded = RINModel.from_pretrained(tmp_path)
    assert loaded.config.use_cross_attention and loaded.config.num_latents == 8
    x, prev, text = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 32), torch.randn(2, 3, 8)
    kw = {"class_labels": torch.tensor([1, 2]), "encoder_hidden_states": text, "prev_latents": prev}
    a, b = model(x, 4, **kw), loaded(x, 4, **kw)
    assert torch.equal(a.sample, b.sample) and torch.equal(a.latents, b.latents)


def test_inside_diffusers_ddpm_pipeline():
    model = tiny_rin()
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3)
    assert np.isfinite(images).all()


def test_gradient_checkpointing_same_grads():
    model = tiny_rin(num_classes=4, cross_attention_dim=8)
    randomize_zero_init(model)
    x, prev, text = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 32), torch.randn(2, 3, 8)

    def grads():
        model.zero_grad()
        out = model(x, 3, class_labels=torch.tensor([0, 1]), encoder_hidden_states=text, prev_latents=prev)
        (out.sample.square().mean() + out.latents.square().mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    for g0, g1 in zip(plain, grads()):
        torch.testing.assert_close(g0, g1)
