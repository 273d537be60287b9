"""GANGenerator / GANDiscriminator, the GAN losses and R1, HFGenGANPipeline, train_gan.py."""

import math
import os

import pytest
import torch

from hfgen import GAN_PRESETS, GANDiscriminator, GANGenerator, HFGenGANPipeline
from hfgen.training.train_gan import discriminator_loss, generator_loss, r1_penalty

G_TINY, D_TINY = GAN_PRESETS["dcgan-tiny"]  # latent_dim 16


def tiny_g(num_classes=None, conditioning="concat", seed=0):
    torch.manual_seed(seed)
    return GANGenerator(**G_TINY, sample_size=16, num_classes=num_classes, class_conditioning=conditioning).eval()


def tiny_d(num_classes=None, spectral_norm=False, seed=0):
    torch.manual_seed(seed)
    return GANDiscriminator(**D_TINY, sample_size=16, num_classes=num_classes, spectral_norm=spectral_norm)


# ----------------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes,conditioning", [(None, "concat"), (5, "concat"), (5, "multiply")])
def test_shapes_and_conditioning(num_classes, conditioning):
    g, d = tiny_g(num_classes, conditioning), tiny_d(num_classes, spectral_norm=True)
    z = torch.randn(3, 16)
    y = torch.tensor([0, 1, 4]) if num_classes else None
    with torch.no_grad():
        x = g(z, y).sample
        (x_tuple,) = g(z, y, return_dict=False)
        logits = d(x, y).logits
    assert x.shape == (3, 3, 16, 16) and torch.equal(x, x_tuple)
    assert x.abs().max() <= 1
    assert logits.shape == (3,)
    if num_classes:  # the label changes the image and the logit
        with torch.no_grad():
            y2 = torch.tensor([1, 2, 3])
            assert not torch.allclose(g(z, y2).sample, x)
            assert not torch.allclose(d(x, y2).logits, logits)


def test_minibatch_std_mixes_only_within_a_group():
    d = tiny_d()  # minibatch_std_group_size=4 by default
    x = torch.randn(8, 3, 16, 16)
    x2 = x.clone()
    x2[4] = 0  # groups of 4 consecutive images: {0, 1, 2, 3} and {4, 5, 6, 7}
    with torch.no_grad():
        changed = (d(x).logits - d(x2).logits).abs() > 0
    assert changed.tolist() == [False] * 4 + [True] * 4
    torch.manual_seed(0)
    off = GANDiscriminator(**D_TINY, sample_size=16, minibatch_std_group_size=0)
    with torch.no_grad():
        changed = (off(x).logits - off(x2).logits).abs() > 0
    assert changed.tolist() == [False] * 4 + [True] + [False] * 3
    assert off.mbstd_conv is None and d(x[:3]).logits.shape == (3,)  # 3 images: one group


def test_bad_inputs_raise_clear_errors():
    g, d = tiny_g(5), tiny_d(5)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\], got \[0, 5\]"):
        g(torch.randn(2, 16), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\]"):
        d(torch.zeros(1, 3, 16, 16), torch.tensor([-1]))
    with pytest.raises(ValueError, match="class_labels are required"):
        g(torch.randn(2, 16))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_g()(torch.randn(2, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 16\)"):
        g(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1 channels, but config.in_channels is 3"):
        d(torch.zeros(1, 1, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="must be 16x16"):
        d(torch.zeros(1, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"sample_size \(20\) must be a multiple of 2 \*\* len"):
        GANGenerator(**G_TINY, sample_size=20)
    with pytest.raises(ValueError, match="minibatch_std_group_size must be >= 0, got -1"):
        GANDiscriminator(**D_TINY, sample_size=16, minibatch_std_group_size=-1)
    with pytest.raises(ValueError, match="class_conditioning must be one of"):
        GANGenerator(**G_TINY, sample_size=16, num_classes=3, class_conditioning="add")


# ----------------------------------------------------------------------------------------------------------------------
# Losses and R1
# ----------------------------------------------------------------------------------------------------------------------


def test_losses_for_known_logits():
    zero = torch.zeros(4)
    assert discriminator_loss(zero, zero, "ns").item() == pytest.approx(2 * math.log(2))
    assert generator_loss(zero, "ns").item() == pytest.approx(math.log(2))
    # confident and right: ns D loss ~ 2 * softplus(-10), hinge D loss exactly 0 beyond the margin
    assert discriminator_loss(torch.full((4,), 10.0), torch.full((4,), -10.0), "ns").item() == pytest.approx(
        2 * math.log1p(math.exp(-10)), rel=1e-4
    )
    assert discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0), "hinge").item() == 0.0
    assert discriminator_loss(zero, zero, "hinge").item() == pytest.approx(2.0)
    assert discriminator_loss(torch.tensor([0.5]), torch.tensor([0.5]), "hinge").item() == pytest.approx(0.5 + 1.5)
    assert generator_loss(torch.tensor([0.5, 1.5]), "hinge").item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        generator_loss(zero, "wgan")


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_r1_penalty_positive_and_differentiable(spectral_norm):
    d = tiny_d(3, spectral_norm=spectral_norm)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    r1 = r1_penalty(d, real, torch.tensor([0, 1, 2, 0]))
    assert r1.ndim == 0 and r1.item() > 0
    r1.backward()
    grads = [p.grad for p in d.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # R1 of a D that ignores its input is 0
    flat = tiny_d()
    for p in flat.parameters():
        torch.nn.init.zeros_(p)
    assert r1_penalty(flat, real).item() == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Save / load and the pipeline
# ----------------------------------------------------------------------------------------------------------------------


def test_models_save_load_round_trip(tmp_path):
    g, d = tiny_g(5), tiny_d(5, spectral_norm=True)
    g.save_pretrained(tmp_path / "g")
    d.save_pretrained(tmp_path / "d")
    g2, d2 = GANGenerator.from_pretrained(tmp_path / "g").eval(), GANDiscriminator.from_pretrained(tmp_path / "d")
    assert g2.config.num_classes == 5 and d2.config.spectral_norm
    z, y = torch.randn(2, 16), torch.tensor([1, 3])
    d.eval()
    d2.eval()
    with torch.no_grad():
        x = g(z, y).sample
        assert torch.allclose(x, g2(z, y).sample)
        assert torch.allclose(d(x, y).logits, d2(x, y).logits, atol=1e-6)


def test_pipeline_outputs_truncation_and_round_trip(tmp_path):
    g = tiny_g(5)
    pipe = HFGenGANPipeline(generator=g)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 3 and images[0].size == (16, 16)
    a = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), class_labels=2, output_type="pt").images
    b = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), class_labels=2, output_type="pt").images
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1

    # truncation scales z (documented choice), also for given latents
    z = torch.randn(2, 16)
    out = pipe(latents=z, class_labels=[0, 1], truncation=0.5, output_type="pt").images
    with torch.no_grad():
        expected = (g(0.5 * z, torch.tensor([0, 1])).sample + 1) / 2
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(pipe(latents=z, truncation=0.5, output_type="latent").images, 0.5 * z)

    pipe.save_pretrained(tmp_path)
    loaded = HFGenGANPipeline.from_pretrained(tmp_path)
    c = loaded(batch_size=3, generator=torch.Generator().manual_seed(0), class_labels=2, output_type="pt").images
    assert isinstance(loaded.generator, GANGenerator) and torch.allclose(a, c)


def test_pipeline_bad_inputs():
    pipe = HFGenGANPipeline(generator=tiny_g(5))
    with pytest.raises(ValueError, match="truncation must be > 0, got 0"):
        pipe(truncation=0)
    with pytest.raises(ValueError, match="truncation must be > 0"):
        pipe(truncation=-1.0)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\], got \[7\]"):
        pipe(class_labels=7)
    with pytest.raises(ValueError, match="one label or one per image"):
        pipe(batch_size=3, class_labels=[0, 1])
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(output_type="jpg")
    with pytest.raises(ValueError, match="unconditional"):
        HFGenGANPipeline(generator=tiny_g())(class_labels=[0])


# ----------------------------------------------------------------------------------------------------------------------
# Training script
# ----------------------------------------------------------------------------------------------------------------------


def test_train_gan_output_and_resume(tmp_path):
    from hfgen.training.train_gan import main, parse_args

    out = str(tmp_path / "gan")
    argv = [
        "--preset",
        "dcgan-tiny",
        "--num_shapes",
        "16",
        "--resolution",
        "16",
        "--train_batch_size",
        "8",
        "--checkpointing_steps",
        "1",
        "--sample_steps",
        "0",
        "--report_to",
        "none",
        "--output_dir",
        out,
        "--use_ema",
        "--class_conditional",
        "--spectral_norm",
        "--loss",
        "hinge",
        "--r1_every",
        "3",
        "--g_lr",
        "1e-4",
        "--d_lr",
        "4e-4",
        "--bn_calibration_batches",
        "1",
        "--num_sample_images",
        "4",
    ]
    report = main(parse_args(argv + ["--max_train_steps", "2"]))
    assert report["steps"] == 2 and os.path.isdir(os.path.join(out, "checkpoint-2"))
    first_ckpt_time = os.path.getmtime(os.path.join(out, "checkpoint-1"))

    report = main(parse_args(argv + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]))
    assert report["steps"] == 4 and "r1" in report  # step index 3 is an R1 step
    assert os.path.getmtime(os.path.join(out, "checkpoint-1")) == first_ckpt_time  # steps 1-2 were not redone
    assert all(math.isfinite(report[k]) for k in ("d_loss", "g_loss"))

    pipe = HFGenGANPipeline.from_pretrained(out)
    assert pipe.generator.config.num_classes == 18  # the shapes (color, shape) pairs
    assert pipe(batch_size=2, class_labels=[0, 17], output_type="pt").images.shape == (2, 3, 16, 16)
    assert GANDiscriminator.from_pretrained(os.path.join(out, "discriminator")).config.spectral_norm
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        parse_args(argv + ["--gradient_accumulation_steps", "2"])
