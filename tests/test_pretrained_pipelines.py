"""diffusers' own pipeline folders through ``HFGenPipeline.from_pretrained`` (issue 14, parts 2 and 3): a
``DiTPipeline`` (the layout of ``facebook/DiT-XL-2-256``) and a ``DDPMPipeline`` (``google/ddpm-cifar10-32``), built
here from tiny random diffusers models, load from a folder and from an offline Hub-cache snapshot with the transformer
or U-Net converted to hfgen's denoiser, and give diffusers' own pipelines' images for the same seed.

Tolerance: the converted denoiser computes the same function with other op orders, so its outputs differ from
diffusers' by float32 rounding (tens of eps); each sampling step passes that on, amplified by up to
1 / sqrt(alpha_bar_t) in x_0 hat and by the guidance scale, so images (magnitude 1) are compared to 256 float32 eps
(3e-5) per step, 1.2e-4 for the 4 steps (measured here: 3-4e-7, a few eps); a wrong table, label or time embedding
moves them by > 1e-2."""

import shutil

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DModel,
)
from tolerances import assert_close_float32

from hfgen import DiTModel, HFGenPipeline, UNetModel

STEPS = 4
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and non-zero (zero-initialised output layers would hide a wrong conversion)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def hub_snapshot(folder, cache_dir, repo_id: str) -> None:
    """Lay ``folder`` out as the Hub cache does: models--user--repo/snapshots/<commit> + refs/main."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return torch.from_numpy(out.images)


# ----------------------------------------------------------------------------------------------------------------------
# DiTPipeline (facebook/DiT-XL-2-256)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A DiTPipeline with a learned-sigma DiT (1000 classes: DiTPipeline's null label is 1000), a 2-level
    AutoencoderKL and a DDIM scheduler without clipping (the two pipelines' clipping conventions differ)."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)  # fmt: skip
    randomise(transformer, 1)
    for block in transformer.transformer_blocks[1:]:  # official checkpoints share one embedder across the blocks
        block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    pipe = DiTPipeline(transformer, vae.eval(), DDIMScheduler(clip_sample=False),
                       id2label={i: f"class {i}" for i in range(1000)})  # fmt: skip
    folder = tmp_path_factory.mktemp("dit") / "pipe"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_a_dit_pipeline_folder_gives_diffusers_images(dit_folder, guidance_scale):
    ours = HFGenPipeline.from_pretrained(dit_folder)
    assert isinstance(ours.denoiser, DiTModel) and isinstance(ours.vae, AutoencoderKL)
    assert isinstance(ours.scheduler, DDIMScheduler)  # the scheduler stays as saved
    theirs = DiTPipeline.from_pretrained(dit_folder)
    expected = images(theirs, class_labels=[1, 999], guidance_scale=guidance_scale)
    got = images(ours, class_labels=[1, 999], guidance_scale=guidance_scale)
    assert got.shape == expected.shape == (2, 16, 16, 3)
    assert_close_float32(got, expected, num_eps=256 * STEPS, floor=1.0, msg=f"guidance {guidance_scale}")


def test_a_dit_repo_id_loads_offline_and_saves_as_an_hfgen_pipeline(dit_folder, tmp_path):
    hub_snapshot(dit_folder, tmp_path / "hub", "facebook/DiT-tiny")
    pipe = HFGenPipeline.from_pretrained("facebook/DiT-tiny", cache_dir=tmp_path / "hub")
    expected = images(pipe, class_labels=[5, 6], guidance_scale=2.0)
    pipe.save_pretrained(tmp_path / "hfgen")
    index = (tmp_path / "hfgen" / "model_index.json").read_text()
    assert '"hfgen.dit"' in index and "transformer" not in index
    again = HFGenPipeline.from_pretrained(tmp_path / "hfgen")
    torch.testing.assert_close(images(again, class_labels=[5, 6], guidance_scale=2.0), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# DDPMPipeline (google/ddpm-cifar10-32)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A DDPMPipeline with a U-Net in google/ddpm-cifar10-32's layout at a tenth of its width (sin first, freq_shift
    1, padding-0 downsampling, eps 1e-6, one attention head; the encoder attends at 8x8 of 16, the decoder one level
    lower, as that config's block lists say) and the DDPMScheduler of its config."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), layers_per_block=2,
                       norm_num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                       attention_head_dim=None, act_fn="silu")  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, variance_type="fixed_large"
    )
    folder = tmp_path_factory.mktemp("ddpm") / "pipe"
    DDPMPipeline(randomise(unet, 2), scheduler).save_pretrained(folder)
    return folder


def test_a_ddpm_pipeline_folder_gives_the_images_of_diffusers_ddim_pipeline(ddpm_folder):
    ours = HFGenPipeline.from_pretrained(ddpm_folder)
    assert isinstance(ours.denoiser, UNetModel) and isinstance(ours.scheduler, DDPMScheduler)
    unet = UNet2DModel.from_pretrained(ddpm_folder / "unet")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for t in (0, 500, 999):
        expected = unet(x, t).sample
        assert_close_float32(ours.denoiser(x, t).sample, expected, num_eps=256, msg=f"t={t}")

    # hfgen's convention re-derives eps from the clipped x_0 hat (use_clipped_model_output=True), which
    # DDIMPipeline takes as an argument: with it, the same images for the same seed
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    theirs = DDIMPipeline(unet, DDIMScheduler.from_config(ours.scheduler.config))
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                      use_clipped_model_output=True, output_type="np").images  # fmt: skip
    got = images(ours, batch_size=2)
    assert_close_float32(got, torch.from_numpy(expected), num_eps=256 * STEPS, floor=1.0)


def test_a_ddpm_repo_id_loads_offline(ddpm_folder, tmp_path):
    hub_snapshot(ddpm_folder, tmp_path / "hub", "google/ddpm-tiny")
    pipe = HFGenPipeline.from_pretrained("google/ddpm-tiny", cache_dir=tmp_path / "hub", dtype=torch.float32)
    assert isinstance(pipe.denoiser, UNetModel)
    assert images(pipe, batch_size=1).shape == (1, 16, 16, 3)


def test_an_unsupported_diffusers_denoiser_is_named():
    from hfgen.pipelines.hub import convert_denoiser

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4)
    with pytest.raises(ValueError, match="cannot use a diffusers AutoencoderKL as an hfgen denoiser"):
        convert_denoiser(vae)
