"""AutoencoderModel / VAEModel against diffusers' AutoencoderKL contract, HFGenVAEPipeline, train_autoencoder.py."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from tolerances import assert_close_float32

from hfgen import AUTOENCODER_PRESETS, AutoencoderModel, HFGenVAEPipeline, VAEModel
from hfgen.data import image_transform, make_shapes_dataset

TINY = AUTOENCODER_PRESETS["ae-tiny"]  # f = 4, 4 latent channels


def tiny(cls=VAEModel, channels=3, seed=0):
    torch.manual_seed(seed)
    return cls(**TINY, in_channels=channels, out_channels=channels, sample_size=16).eval()


def shapes_batch(n=32, seed=0, size=16):
    t = image_transform(size, 3)
    return torch.stack([t(im) for im in make_shapes_dataset(n, size, seed=seed)["image"]])


# ----------------------------------------------------------------------------------------------------------------------
# Model interface
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kl_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


@pytest.mark.parametrize("cls", [AutoencoderModel, VAEModel])
def test_interface_matches_autoencoderkl(cls, kl_vae):
    ours = tiny(cls)
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    with torch.no_grad():
        ref_enc, enc = kl_vae.encode(x), ours.encode(x)
        assert isinstance(enc, AutoencoderKLOutput)
        assert type(enc.latent_dist) is type(ref_enc.latent_dist) is DiagonalGaussianDistribution
        for method in ("sample", "mode"):
            assert getattr(enc.latent_dist, method)().shape == getattr(ref_enc.latent_dist, method)().shape
        z = enc.latent_dist.sample()
        dec, ref_dec = ours.decode(z), kl_vae.decode(z)
        assert isinstance(dec, DecoderOutput) and dec.sample.shape == ref_dec.sample.shape == x.shape
        assert ours(x).sample.shape == kl_vae(x).sample.shape
        assert ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample.shape == x.shape
        (posterior,) = ours.encode(x, return_dict=False)
        (image,) = ours.decode(z, return_dict=False)
    assert isinstance(posterior, DiagonalGaussianDistribution) and image.shape == x.shape
    for key in (
        "in_channels",
        "out_channels",
        "latent_channels",
        "block_out_channels",
        "sample_size",
        "scaling_factor",
    ):
        assert key in ours.config and key in kl_vae.config
    assert ours.downsample_factor == 2 ** (len(kl_vae.config.block_out_channels) - 1) == 4


def test_plain_autoencoder_posterior_is_a_point_mass():
    ae = tiny(AutoencoderModel)
    with torch.no_grad():
        posterior = ae.encode(torch.rand(3, 3, 16, 16) * 2 - 1).latent_dist
    assert posterior.deterministic
    assert torch.all(posterior.std == 0)
    assert torch.all(posterior.kl() == 0)
    assert torch.equal(posterior.sample(torch.Generator().manual_seed(1)), posterior.mode())


def test_vae_kl_positive_and_sampling_deterministic_with_generator():
    vae = tiny(VAEModel)
    with torch.no_grad():
        posterior = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist
    assert posterior.kl().shape == (2,) and torch.all(posterior.kl() > 0)
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    c = posterior.sample(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decode_latent_to_the_right_size():
    vae = tiny(VAEModel)
    with torch.no_grad():
        out = vae.decode(torch.randn(2, 4, 3, 5)).sample
    assert out.shape == (2, 3, 12, 20)


def test_bad_inputs_raise_clear_errors():
    vae = tiny(VAEModel)
    with pytest.raises(ValueError, match="1 channels.*in_channels is 3"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4, got 18x16"):
        vae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="z has 3 channels.*latent_channels is 4"):
        vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="shape \\(B, C, H, W\\)"):
        vae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="kind must be one of"):
        vae.reconstruction_error(torch.zeros(1, 3, 16, 16), kind="ssim")
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEModel(block_out_channels=(8, 12), norm_num_groups=8)


def test_hfgen_vae_stands_in_a_diffusers_pipeline():
    """DiTPipeline decodes its latents with vae.config.scaling_factor and vae.decode(z).sample."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=3,
        norm_num_groups=4,
    )
    vae = tiny(VAEModel)
    vae.register_to_config(scaling_factor=0.5)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    images = pipe(class_labels=[0, 2], num_inference_steps=2, output_type="np", guidance_scale=1.0).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_reconstruction_error_higher_for_noise_after_a_few_steps():
    torch.manual_seed(0)
    ae = AutoencoderModel(**TINY, sample_size=8)
    data = shapes_batch(64, seed=0, size=8)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for step in range(20):
        x = data[(step % 4) * 16 : (step % 4 + 1) * 16]
        loss = ((ae(x).sample - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae.eval()
    held_out = shapes_batch(16, seed=1, size=8)
    noise = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for kind in ("mse", "bce"):
        err_data, err_noise = ae.reconstruction_error(held_out, kind), ae.reconstruction_error(noise, kind)
        assert err_data.shape == (16,)
        assert err_noise.mean() > 1.5 * err_data.mean(), kind


# ----------------------------------------------------------------------------------------------------------------------
# Save / load and the pipeline
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AutoencoderModel, VAEModel])
def test_model_save_load_round_trip(cls, tmp_path):
    model = tiny(cls)
    model.register_to_config(scaling_factor=0.7)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls and loaded.config.scaling_factor == 0.7
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x).sample, loaded(x).sample)


def test_pipeline_outputs_and_round_trip(tmp_path):
    pipe = HFGenVAEPipeline(vae=tiny(VAEModel, channels=1))
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "L"
    pt = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert pt.shape == (2, 1, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    np_images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    latents = pipe(batch_size=3, output_type="latent").images
    assert latents.shape == (3, 4, 4, 4)

    # reconstruct from PIL images; interpolation ends are the reconstructions, for both methods
    recon = pipe.reconstruct(images, output_type="pt").images
    assert recon.shape == (2, 1, 16, 16)
    for method in ("linear", "slerp"):
        path = pipe.interpolate(images[0], images[1], num_steps=5, method=method, output_type="pt").images
        assert path.shape == (5, 1, 16, 16)
        # encoder batch 1 vs 2, decoder batch 5 vs 2: other conv blockings (other kernels on another CPU), and slerp's
        # sin((1 - t) theta) / sin(theta) is 1 at t = 0 only up to rounding: 256 float32 eps of [0, 1] (17 measured)
        assert_close_float32(path[[0, -1]], recon, num_eps=256, floor=1.0, msg=method)

    pipe.save_pretrained(tmp_path)
    loaded = HFGenVAEPipeline.from_pretrained(tmp_path)
    again = loaded(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert isinstance(loaded.vae, VAEModel) and torch.allclose(pt, again)


def test_pipeline_bad_inputs():
    pipe = HFGenVAEPipeline(vae=tiny(VAEModel))
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(output_type="tensor")
    with pytest.raises(ValueError, match="latents must have shape \\(B, 4, h, w\\)"):
        pipe(latents=torch.zeros(1, 3, 4, 4))
    image = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="method must be one of"):
        pipe.interpolate(image, image, method="cubic")
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        pipe.interpolate(image, image, num_steps=1)
    with pytest.raises(ValueError, match="divisible by 4"):
        pipe.reconstruct(torch.zeros(1, 3, 10, 16))
    with pytest.raises(ValueError, match=r"images must have 3 channels .*got shape \(1, 1, 16, 16\)"):
        pipe.reconstruct(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="image tensors must be uint8 in \\[0, 255\\] or float .*torch.int64"):
        pipe.reconstruct(torch.zeros(1, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"float numpy images must be in \[0, 1\], got values in \[200, 200\]"):
        pipe.reconstruct(np.full((1, 16, 16, 3), 200.0, np.float32))


def test_pipeline_reads_every_image_form_alike():
    """uint8 arrays and tensors are [0, 255] (np.asarray(pil), torchvision's read_image), float arrays [0, 1]
    (output_type="np"), float tensors [-1, 1]: the same pixels give the same reconstruction whichever form holds them."""
    pipe = HFGenVAEPipeline(vae=tiny(VAEModel))
    u8 = torch.randint(0, 256, (2, 16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    expected = pipe.reconstruct(u8.permute(0, 3, 1, 2).float() / 127.5 - 1, output_type="pt").images
    forms = {
        "uint8 array": u8.numpy(),
        "uint8 tensor": u8.permute(0, 3, 1, 2).contiguous(),
        "float array": u8.numpy().astype(np.float32) / 255,
        "PIL": [PIL.Image.fromarray(im) for im in u8.numpy()],
    }
    for name, images in forms.items():
        got = pipe.reconstruct(images, output_type="pt").images
        assert_close_float32(got, expected, num_eps=256, floor=1.0, msg=name)  # /255 vs /127.5 rounding, 1 ulp


# ----------------------------------------------------------------------------------------------------------------------
# Training script
# ----------------------------------------------------------------------------------------------------------------------


def test_train_autoencoder_output_and_resume(tmp_path):
    from hfgen.training.train_autoencoder import main, parse_args

    out = str(tmp_path / "vae")
    argv = [
        "--model",
        "vae",
        "--preset",
        "ae-tiny",
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
        "--num_scaling_images",
        "8",
        "--report_to",
        "none",
        "--output_dir",
        out,
        "--use_ema",
        "--kl_warmup_steps",
        "4",
    ]
    report = main(parse_args(argv + ["--max_train_steps", "2"]))
    assert report["steps"] == 2 and os.path.isdir(os.path.join(out, "checkpoint-2"))
    first_ckpt_time = os.path.getmtime(os.path.join(out, "checkpoint-1"))

    report = main(parse_args(argv + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]))
    assert report["steps"] == 3 and report["beta"] == pytest.approx(1e-3 * 2 / 4)  # step 3 ran with beta(step=2)
    assert os.path.getmtime(os.path.join(out, "checkpoint-1")) == first_ckpt_time  # steps 1-2 were not redone
    assert os.path.isdir(os.path.join(out, "checkpoint-3"))

    vae = VAEModel.from_pretrained(out, subfolder="vae")
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"]) and vae.config.scaling_factor != 1.0
    assert HFGenVAEPipeline.from_pretrained(out)(output_type="pt").images.shape == (1, 3, 16, 16)
    assert any(f.startswith("prior-") for f in os.listdir(os.path.join(out, "samples")))
