"""DiTModel: adaLN-Zero at init, conditioning paths, learned sigma, errors, round trips, DDPMPipeline, checkpointing."""

import diffusers
import numpy as np
import pytest
import torch
from torch import nn

from hfgen import DIT_PRESETS, DiTModel
from hfgen.layers import sincos_pos_embed_2d


def tiny_dit(**kwargs) -> DiTModel:
    torch.manual_seed(0)
    return DiTModel(**{**DIT_PRESETS["DiT-tiny/2"], "sample_size": 8, "in_channels": 3, **kwargs})


def randomize_zero_init(model: nn.Module, seed: int = 1) -> None:
    """Give every parameter that is all zeros (adaLN-Zero, zero output projections) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_presets_match_paper_sizes():
    assert DIT_PRESETS["DiT-XL/2"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}
    assert DIT_PRESETS["DiT-S/8"] == {"depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 8}
    assert {"DiT-B/4", "DiT-L/2", "DiT-tiny/2", "DiT-mini/2", "DiT-mini/4"} <= set(DIT_PRESETS)


def test_pos_embed_distinct_and_bounded():
    pe = sincos_pos_embed_2d(16, 3, 5)
    assert pe.shape == (15, 16)
    assert pe.abs().max() <= 1.0
    assert torch.unique(pe, dim=0).shape[0] == 15  # every position gets its own code


def test_fresh_model_outputs_zero_and_blocks_are_identity():
    model = tiny_dit(num_classes=4, cross_attention_dim=8)
    x = torch.randn(2, 3, 8, 8)
    text = torch.randn(2, 5, 8)
    out = model(x, torch.tensor([3, 7]), class_labels=torch.tensor([1, 4]), encoder_hidden_states=text).sample
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(tokens, c, text), tokens)


def test_adam_steps_move_output_then_blocks_away_from_zero_init():
    model = tiny_dit()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)

    def adam_step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x, 10).sample, target).backward()
        opt.step()

    adam_step()
    assert model(x, 10).sample.abs().max() > 0
    # the blocks got no gradient through the zero output layer yet; the second step reaches their adaLN
    assert torch.equal(model.blocks[0](tokens, c), tokens)
    adam_step()
    assert not torch.allclose(model.blocks[0](tokens, c), tokens)


def test_learn_sigma_doubles_channels_and_config_is_consistent():
    model = tiny_dit(learn_sigma=True)
    assert model.config.out_channels == 6
    assert model(torch.randn(1, 3, 8, 8), 0).sample.shape == (1, 6, 8, 8)
    with pytest.raises(ValueError, match="out_channels must be 6"):
        tiny_dit(learn_sigma=True, out_channels=3)


def test_class_labels_out_of_range_and_other_bad_inputs():
    model = tiny_dit(num_classes=4)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\]"):
        model(x, 1, class_labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 3, 7, 8), 1)
    with pytest.raises(ValueError, match="no text conditioning"):
        model(x, 1, encoder_hidden_states=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTModel(hidden_size=36, num_heads=5, depth=1)


def test_class_labels_change_output_and_none_is_null_label():
    model = tiny_dit(num_classes=4)
    randomize_zero_init(model)
    x = torch.randn(2, 3, 8, 8)
    a = model(x, 5, class_labels=torch.tensor([0, 0])).sample
    b = model(x, 5, class_labels=torch.tensor([1, 1])).sample
    null = model(x, 5, class_labels=torch.tensor([4, 4])).sample
    assert not torch.allclose(a, b)
    assert torch.equal(model(x, 5).sample, null)


def test_text_conditioning_through_pooled_adaln_and_cross_attention():
    x = torch.randn(2, 3, 8, 8)
    text = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    swapped = text.clone()  # same masked mean, different tokens: only cross-attention can tell them apart
    swapped[:, 0], swapped[:, 1] = text[:, 1] + 0.5, text[:, 0] - 0.5

    pooled_only = tiny_dit(cross_attention_dim=8, use_cross_attention=False)
    assert all(b.cross_attn is None for b in pooled_only.blocks)
    randomize_zero_init(pooled_only)
    out = pooled_only(x, 3, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    assert not torch.allclose(
        out, pooled_only(x, 3, encoder_hidden_states=2 * text, encoder_attention_mask=mask).sample
    )
    same_mean = pooled_only(x, 3, encoder_hidden_states=swapped, encoder_attention_mask=mask).sample
    assert torch.allclose(out, same_mean, atol=1e-5)
    padded = text.clone()
    padded[1, 3] = 100.0  # a padding position: masked out everywhere
    assert torch.allclose(
        out, pooled_only(x, 3, encoder_hidden_states=padded, encoder_attention_mask=mask).sample, atol=1e-6
    )

    cross = tiny_dit(cross_attention_dim=8)
    assert cross.config.use_cross_attention
    randomize_zero_init(cross)
    out = cross(x, 3, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    assert not torch.allclose(out, cross(x, 3, encoder_hidden_states=swapped, encoder_attention_mask=mask).sample)
    assert torch.allclose(out, cross(x, 3, encoder_hidden_states=padded, encoder_attention_mask=mask).sample, atol=1e-6)


def test_determinism_dict_and_tuple():
    model = tiny_dit(num_classes=4)
    randomize_zero_init(model)
    x = torch.randn(2, 3, 8, 8)
    a = model(x, torch.tensor([1.0, 2.5]), class_labels=torch.tensor([0, 3])).sample
    (b,) = model(x, torch.tensor([1.0, 2.5]), class_labels=torch.tensor([0, 3]), return_dict=False)
    assert torch.equal(a, b)
    torch.testing.assert_close(
        tiny_dit(num_classes=4).state_dict(), tiny_dit(num_classes=4).state_dict(), rtol=0, atol=0
    )


def test_non_square_input_uses_computed_pos_embed():
    model = tiny_dit()
    randomize_zero_init(model)
    assert model(torch.randn(1, 3, 4, 12), 2).sample.shape == (1, 3, 4, 12)


def test_save_load_round_trip(tmp_path):
    model = tiny_dit(num_classes=4, cross_attention_dim=8, learn_sigma=True)
    randomize_zero_init(model)
    model.save_pretrained(tmp_path)
    loaded = DiTModel.from_pretrained(tmp_path)
    assert loaded.config.out_channels == 6 and loaded.config.use_cross_attention
    x, text = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8)
    kw = {"class_labels": torch.tensor([1, 2]), "encoder_hidden_states": text}
    assert torch.equal(model(x, 4, **kw).sample, loaded(x, 4, **kw).sample)


def test_inside_diffusers_ddpm_pipeline():
    model = tiny_dit()
    randomize_zero_init(model)
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3)
    assert np.isfinite(images).all()


def test_gradient_checkpointing_same_grads():
    model = tiny_dit(num_classes=4, cross_attention_dim=8)
    randomize_zero_init(model)
    x, text = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8)

    def grads():
        model.zero_grad()
        model(x, 3, class_labels=torch.tensor([0, 1]), encoder_hidden_states=text).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    for g0, g1 in zip(plain, grads()):
        torch.testing.assert_close(g0, g1)
