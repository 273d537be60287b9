"""HFGenPipeline with tiny real components: output types, determinism, CFG, learned sigma, RIN, VAE, callbacks,
inversion and input errors."""

import functools

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIMScheduler
from diffusers import PNDMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from tolerances import assert_close_float32

from hfgen import UNET_PRESETS, HFGenPipeline, UNetModel
from hfgen.autoencoder import AUTOENCODER_PRESETS, AutoencoderModel
from hfgen.dit import DIT_PRESETS, DiTModel
from hfgen.guidance import CLASS_GUIDANCE_SCALE
from hfgen.rin import RIN_PRESETS, RINModel
from hfgen.schedulers import DDIMScheduler, DDPMScheduler

STEPS = 3


def randomize_zero_params(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised layers (output convs, adaLN) small random weights, so an untrained model's output
    depends on its input the way a trained one's does (a zero output would make every test trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_unet(num_classes=None, sample_size=8, seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=sample_size, num_classes=num_classes)
    return randomize_zero_params(unet, seed)


def make_pipe(denoiser=None, scheduler=None, vae=None):
    pipe = HFGenPipeline(denoiser or tiny_unet(), scheduler or DDPMScheduler(), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def count_calls(model):
    """Forward hook recording the batch size of each call."""
    sizes = []
    model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    return sizes


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@pytest.fixture(scope="module")
def cond_pipe():
    return make_pipe(tiny_unet(num_classes=3))


# ----------------------------------------------------------------------------------------------------------------------
# Outputs and determinism
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output_type, check",
    [
        ("pil", lambda im: len(im) == 2 and isinstance(im[0], PIL.Image.Image) and im[0].size == (8, 8)),
        ("np", lambda im: isinstance(im, np.ndarray) and im.shape == (2, 8, 8, 3) and im.min() >= 0 and im.max() <= 1),
        ("pt", lambda im: isinstance(im, torch.Tensor) and im.shape == (2, 3, 8, 8) and im.min() >= 0),
        ("latent", lambda im: isinstance(im, torch.Tensor) and im.shape == (2, 3, 8, 8)),
    ],
)
def test_output_types(pipe, output_type, check):
    images = pipe(batch_size=2, num_inference_steps=STEPS, generator=gen(), output_type=output_type).images
    assert check(images)


def test_determinism_and_return_dict_false(pipe):
    a = pipe(num_inference_steps=STEPS, generator=gen(1), output_type="np").images
    (b,) = pipe(num_inference_steps=STEPS, generator=gen(1), output_type="np", return_dict=False)
    c = pipe(num_inference_steps=STEPS, generator=gen(2), output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_generator_list_image_i_depends_on_generator_i_only(pipe):
    """DDPM draws noise at every step too: image i of a batch equals image i sampled alone, up to float32 rounding.

    A batch of 3 and a batch of 1 run the denoiser's convs and matmuls with other blockings (and other kernels on
    another CPU), so its output differs by ~10-20 float32 eps per call; x_0 hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    amplifies that by 1 / sqrt(abar_666) ~ 9.5 and each step passes it on (measured: 56-135 eps on an EPYC across
    kernel settings, 277 eps = 3.3e-5 on a 2-core Xeon). Image i drawing on another generator would move it by ~0.1."""
    batch = pipe(batch_size=3, num_inference_steps=STEPS, generator=[gen(s) for s in (5, 6, 7)], output_type="pt")
    alone = pipe(batch_size=1, num_inference_steps=STEPS, generator=[gen(6)], output_type="pt")
    # 512 float32 eps of the images' magnitude (1) per sampling step: 1.8e-4 for 3 steps, ~5x the worst measured
    assert_close_float32(batch.images[1:2], alone.images, num_eps=512 * STEPS, floor=1.0)


def test_properties(cond_pipe):
    cond_pipe(batch_size=2, num_inference_steps=STEPS, class_labels=[0, 2], generator=gen(), output_type="pt")
    assert cond_pipe.guidance_scale == CLASS_GUIDANCE_SCALE == 3.0 and cond_pipe.do_classifier_free_guidance
    assert cond_pipe.num_timesteps == STEPS


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance and learned sigma
# ----------------------------------------------------------------------------------------------------------------------


def test_cfg_doubles_the_batch_and_guidance_one_is_a_single_pass():
    unet = tiny_unet(num_classes=3)
    sizes = count_calls(unet)
    pipe = make_pipe(unet)
    pipe(batch_size=2, num_inference_steps=STEPS, class_labels=[0, 1], guidance_scale=3.0, output_type="pt")
    assert sizes == [4] * STEPS
    sizes.clear()
    pipe(batch_size=2, num_inference_steps=STEPS, class_labels=1, guidance_scale=1.0, output_type="pt")
    assert sizes == [2] * STEPS
    sizes.clear()
    pipe(batch_size=2, num_inference_steps=STEPS, output_type="pt")  # unconditional sampling: null label, one pass
    assert sizes == [2] * STEPS


@pytest.mark.parametrize("channels", [3, 1, 4])  # RGB, grey digits, VAE latents: no slice may assume 3 channels
def test_cfg_formula_over_all_channels(channels):
    """With one DDIM step from alpha_bar_t to 1, x_0 hat is a linear function of the guided eps: check it exactly."""
    torch.manual_seed(0)
    config = {**UNET_PRESETS["unet-tiny"], "in_channels": channels, "out_channels": channels}
    unet = randomize_zero_params(UNetModel(**config, sample_size=8, num_classes=3))
    sched = DDIMScheduler(clip_sample=False)
    pipe = make_pipe(unet, sched)
    s = 2.5
    noise = torch.randn(2, channels, 8, 8, generator=gen(3))
    out = pipe(
        batch_size=2, num_inference_steps=1, latents=noise, class_labels=[0, 1], guidance_scale=s, output_type="latent"
    ).images
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    with torch.no_grad():
        cond = unet(noise, t, class_labels=torch.tensor([0, 1])).sample
        uncond = unet(noise, t, class_labels=torch.tensor([3, 3])).sample
    eps = uncond + s * (cond - uncond)
    a = sched.alphas_cumprod[t]
    # the pipeline's CFG batch of 4 and these batches of 2 round differently (~20 eps of the model output, x6 by the
    # guidance sum); x_0 hat scales eps by sqrt(1 - a) / sqrt(a) = 0.01 at t = 0: 64 eps of the samples (~2 measured)
    assert_close_float32(out, (noise - (1 - a).sqrt() * eps) / a.sqrt(), num_eps=64)


@pytest.mark.parametrize("variance_type, expected_channels", [("learned_range", 6), ("fixed_small", 3)])
def test_learned_sigma_passes_or_drops_the_variance_half(variance_type, expected_channels):
    torch.manual_seed(0)
    dit = randomize_zero_params(DiTModel(**DIT_PRESETS["DiT-tiny/2"], sample_size=8, num_classes=3, learn_sigma=True))
    pipe = make_pipe(dit, DDPMScheduler(variance_type=variance_type))
    seen = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda model_output, *a, **k: (
        seen.append(model_output.shape[1]) or step(model_output, *a, **k)
    )
    images = pipe(batch_size=2, num_inference_steps=STEPS, class_labels=[0, 1], generator=gen(), output_type="pt")
    assert images.images.shape == (2, 3, 8, 8) and torch.isfinite(images.images).all()
    assert seen == [expected_channels] * STEPS


def test_rin_self_conditioning_carries_latents_through_the_steps():
    torch.manual_seed(0)
    rin = randomize_zero_params(RINModel(**RIN_PRESETS["RIN-tiny"], sample_size=8, num_classes=3))
    prev, returned = [], []

    def hook(module, args, kwargs, out):
        prev.append(kwargs.get("prev_latents"))
        returned.append(out.latents)

    rin.register_forward_hook(hook, with_kwargs=True)
    pipe = make_pipe(rin)
    pipe(batch_size=2, num_inference_steps=STEPS, class_labels=[0, 1], guidance_scale=2.0, output_type="pt")
    assert len(prev) == STEPS and prev[0] is None
    num_latents, latent_dim = RIN_PRESETS["RIN-tiny"]["num_latents"], RIN_PRESETS["RIN-tiny"]["latent_dim"]
    assert returned[0].shape == (4, num_latents, latent_dim)  # doubled with CFG
    for i in range(1, STEPS):  # each step starts from exactly the latents the previous step returned
        assert torch.equal(prev[i], returned[i - 1]), i


@pytest.mark.parametrize("family", ["dit", "rin"])
def test_transformer_pipelines_save_and_load_to_identical_images(tmp_path, family):
    torch.manual_seed(0)
    if family == "dit":
        denoiser = DiTModel(**DIT_PRESETS["DiT-tiny/2"], sample_size=8, num_classes=3, learn_sigma=True)
        scheduler = DDPMScheduler(variance_type="learned_range")
    else:
        denoiser = RINModel(**RIN_PRESETS["RIN-tiny"], sample_size=8, num_classes=3)
        scheduler = DDIMScheduler()
    pipe = make_pipe(randomize_zero_params(denoiser), scheduler)
    pipe.save_pretrained(tmp_path)
    loaded = HFGenPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.denoiser) is type(denoiser) and type(loaded.scheduler) is type(scheduler)
    kwargs = {"batch_size": 2, "num_inference_steps": STEPS, "class_labels": [0, 2], "guidance_scale": 2.0}
    before = pipe(**kwargs, generator=gen(5), output_type="pt").images
    after = loaded(**kwargs, generator=gen(5), output_type="pt").images
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_latent_diffusion_with_vae():
    torch.manual_seed(0)
    vae = AutoencoderModel(**AUTOENCODER_PRESETS["ae-tiny"], sample_size=16, scaling_factor=0.5).eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = randomize_zero_params(UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=4, in_channels=4, out_channels=4))
    pipe = make_pipe(unet, vae=vae)
    latents = pipe(batch_size=2, num_inference_steps=STEPS, generator=gen(), output_type="latent").images
    images = pipe(batch_size=2, num_inference_steps=STEPS, generator=gen(), output_type="pt").images
    assert latents.shape == (2, 4, 4, 4) and images.shape == (2, 3, 4 * f, 4 * f) == (2, 3, pipe.image_size, 16)
    with torch.no_grad():
        decoded = (vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, decoded)


# ----------------------------------------------------------------------------------------------------------------------
# Callback: x_t and predicted x_0 at every step
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, PNDMScheduler])  # PNDM returns no x_0 hat
def test_callback_sees_latents_and_pred_original_sample(pipe, scheduler_cls):
    pipe = make_pipe(
        pipe.denoiser, scheduler_cls(skip_prk_steps=True) if scheduler_cls is PNDMScheduler else scheduler_cls()
    )
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape, kwargs["pred_original_sample"].shape))
        return {}

    pipe(
        batch_size=2,
        num_inference_steps=STEPS,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
        output_type="pt",
    )
    assert [s[0] for s in seen] == list(range(pipe.num_timesteps))
    assert all(s[1] == s[2] == (2, 3, 8, 8) for s in seen)


def test_fallback_pred_original_sample_matches_the_scheduler(pipe):
    """The x_0 hat computed from alphas_cumprod equals what DDIM's step returns (clipping off)."""
    pipe = make_pipe(pipe.denoiser, DDIMScheduler(clip_sample=False))
    x0s = []
    pipe(
        num_inference_steps=STEPS,
        generator=gen(),
        output_type="pt",
        callback_on_step_end=lambda p, i, t, k: x0s.append((t, k["pred_original_sample"])) or {},
        callback_on_step_end_tensor_inputs=["pred_original_sample"],
    )
    latents = torch.randn(1, 3, 8, 8, generator=gen(9))
    with torch.no_grad():
        out = pipe.denoiser(latents, x0s[0][0]).sample
    expected = pipe.scheduler.step(out, x0s[0][0], latents).pred_original_sample
    torch.testing.assert_close(pipe._pred_original_sample(out, x0s[0][0], latents), expected, atol=1e-4, rtol=1e-4)


def test_callback_can_replace_latents(pipe):
    def zero_at_last_step(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == p.num_timesteps - 1 else {}

    images = pipe(num_inference_steps=STEPS, callback_on_step_end=zero_at_last_step, output_type="pt").images
    torch.testing.assert_close(images, torch.full_like(images, 0.5))


class RecordTensors(PipelineCallback):
    """A diffusers-style callback object: it declares the tensors it reads (``tensor_inputs``) itself."""

    tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self):
        super().__init__()
        self.seen = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen.append(sorted(callback_kwargs))
        return callback_kwargs


@pytest.mark.parametrize("multi", [False, True])
def test_pipeline_callback_objects_get_the_tensors_they_declare(pipe, multi):
    """As in diffusers, a PipelineCallback / MultiPipelineCallbacks brings its own tensor_inputs in place of the
    default ["latents"] of callback_on_step_end_tensor_inputs."""
    record = RecordTensors()
    callback = MultiPipelineCallbacks([record]) if multi else record
    pipe(num_inference_steps=STEPS, generator=gen(), output_type="pt", callback_on_step_end=callback)
    assert record.seen == [["latents", "pred_original_sample"]] * STEPS


def test_interrupt_skips_the_remaining_steps_and_the_next_call_runs_them_all():
    """diffusers' early stop: a callback sets pipe._interrupt; the loop skips the rest and the images come from the
    latents reached so far. The flag is reset by the next call."""
    pipe = make_pipe(tiny_unet(seed=1), DDIMScheduler(clip_sample=False))
    sizes = count_calls(pipe.denoiser)

    def stop_after_first(p, i, t, kwargs):
        p._interrupt = True
        return {}

    early = pipe(
        num_inference_steps=STEPS, generator=gen(), output_type="latent", callback_on_step_end=stop_after_first
    )
    assert len(sizes) == 1 and pipe.interrupt
    one_step = make_pipe(pipe.denoiser, DDIMScheduler(clip_sample=False))
    one_step.scheduler.set_timesteps(STEPS)
    latents = torch.randn(1, 3, 8, 8, generator=gen())
    with torch.no_grad():
        t = one_step.scheduler.timesteps[0]
        expected = one_step.scheduler.step(pipe.denoiser(latents, t).sample, t, latents).prev_sample
    assert_close_float32(early.images, expected, num_eps=64)
    sizes.clear()
    pipe(num_inference_steps=STEPS, generator=gen(), output_type="latent")
    assert len(sizes) == STEPS and not pipe.interrupt


@pytest.mark.parametrize("family", ["unet", "rin"])
def test_a_callback_can_cut_guidance_off(family):
    """A callback that lowers pipe._guidance_scale to 1 (diffusers' CFG-cutoff callbacks do this) turns the
    remaining steps into single conditional passes; the RIN then carries the conditional half of its latents."""
    if family == "unet":
        denoiser = tiny_unet(num_classes=3)
    else:
        torch.manual_seed(0)
        denoiser = randomize_zero_params(RINModel(**RIN_PRESETS["RIN-tiny"], sample_size=8, num_classes=3))
    pipe = make_pipe(denoiser, DDIMScheduler())
    sizes = count_calls(denoiser)

    def cutoff(p, i, t, kwargs):
        if i == 0:
            p._guidance_scale = 1.0
        return {}

    out = pipe(
        batch_size=2, num_inference_steps=STEPS, class_labels=[0, 1], guidance_scale=3.0, callback_on_step_end=cutoff
    )
    assert sizes == [4] + [2] * (STEPS - 1) and not pipe.do_classifier_free_guidance
    assert len(out.images) == 2


# ----------------------------------------------------------------------------------------------------------------------
# DDIM inversion
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling_scheduler", ["hfgen", "diffusers"])
def test_invert_then_sample_reconstructs_the_image(pipe, sampling_scheduler):
    """x_0 -> invert -> x_T -> DDIM sampling with the same steps -> x_0 again, up to the first-order error of DDIM
    inversion (the model is evaluated at the neighbouring level), which shrinks with the number of steps. A diffusers
    DDIM is replaced by an hfgen DDIM built from its config for the inversion. The untrained model is no denoiser, so
    at alpha_bar_T ~ 0 (beta_end = 0.02) any error would be amplified by 1 / sqrt(alpha_bar_T) ~ 150: keep
    alpha_bar_T ~ 0.35 (beta_end = 0.002)."""
    cls = DDIMScheduler if sampling_scheduler == "hfgen" else DiffusersDDIMScheduler
    pipe = make_pipe(pipe.denoiser, cls(clip_sample=False, beta_end=0.002, timestep_spacing="trailing"))
    images = torch.rand(2, 3, 8, 8, generator=gen(1)) * 2 - 1

    def relative_error(steps, noise=None):
        noise = pipe.invert(images, num_inference_steps=steps) if noise is None else noise
        recon = pipe(batch_size=2, num_inference_steps=steps, latents=noise, output_type="latent").images
        return float((recon - images).norm() / images.norm())

    noise = pipe.invert(images, num_inference_steps=10)
    assert noise.shape == (2, 3, 8, 8) and noise.std() > 0.5  # really noise, not the image
    torch.testing.assert_close(noise, pipe.invert(images, num_inference_steps=10))  # deterministic
    coarse, fine = relative_error(10), relative_error(40)
    wrong_noise = relative_error(40, torch.randn(2, 3, 8, 8, generator=gen(2)))
    assert fine < 0.45 and fine < coarse / 2.5 and fine < wrong_noise / 10, (coarse, fine, wrong_noise)


def test_invert_accepts_pil(pipe):
    pil = pipe(batch_size=2, num_inference_steps=STEPS, generator=gen(), output_type="pil").images
    noise = make_pipe(pipe.denoiser, DDIMScheduler()).invert(pil, num_inference_steps=STEPS)
    assert noise.shape == (2, 3, 8, 8) and torch.isfinite(noise).all()


def test_invert_reads_uint8_images_as_0_255(pipe):
    """np.asarray(pil) and torchvision's read_image hold [0, 255] uint8: inverted like the same pixels in [-1, 1]
    (uint8 arithmetic used to wrap around: 200 * 2 - 1 = 143)."""
    pipe = make_pipe(pipe.denoiser, DDIMScheduler(clip_sample=False))
    u8 = torch.randint(0, 256, (2, 8, 8, 3), generator=gen(3), dtype=torch.uint8)
    expected = pipe.invert(u8.permute(0, 3, 1, 2).float() / 127.5 - 1, num_inference_steps=STEPS)
    for images in (u8.numpy(), u8.permute(0, 3, 1, 2).contiguous()):
        got = pipe.invert(images, num_inference_steps=STEPS)
        assert_close_float32(got, expected, num_eps=256, floor=1.0)  # the same values; NCHW vs NHWC conv kernels


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: specific errors naming argument, value and what is accepted
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"output_type": "jpg"}, ValueError, r"output_type must be one of .*'pil'.*got 'jpg'"),
        ({"batch_size": 2, "generator": [torch.Generator()] * 3}, ValueError, "3 generators.*batch_size is 2"),
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be an int >= 1, got 0"),
        ({"latents": torch.zeros(1, 3, 4, 4)}, ValueError, r"latents must have shape \(1, 3, 8, 8\).*\(1, 3, 4, 4\)"),
        ({"guidance_scale": 2.0}, ValueError, "guidance_scale=2.0 needs class_labels"),
        ({"class_labels": 1}, ValueError, "denoiser is unconditional"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, r"unknown names \['noise'\]"),
    ],
)
def test_bad_inputs(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(num_inference_steps=kwargs.pop("num_inference_steps", 1), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 2, "class_labels": [0, 1, 2]}, ValueError, "one int or 2 labels.*got 3"),
        ({"class_labels": 3}, ValueError, r"class_labels must be in \[0, 2\]"),
        ({"class_labels": 0.5}, TypeError, "class_labels must be integers"),
        ({"class_labels": 0, "guidance_scale": 0.5}, ValueError, "guidance_scale must be >= 1.*got 0.5"),
    ],
)
def test_bad_class_inputs(cond_pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        cond_pipe(num_inference_steps=1, **kwargs)


def test_diffusion_steps_figure_example(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "diffusion_steps_figure.py"
    spec = importlib.util.spec_from_file_location("diffusion_steps_figure", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "steps.png"
    fig = example.main(example.parse_args(["--num_inference_steps", "4", "--steps", "0", "3", "--output", str(out)]))
    assert out.exists() and PIL.Image.open(out).size == fig.size
    tile = 16 * 4  # sample_size 16, --scale 4
    assert fig.size[0] > 2 * tile and fig.size[1] > 2 * tile
    with pytest.raises(ValueError, match=r"--steps must be in \[0, 3\]"):
        example.main(example.parse_args(["--num_inference_steps", "4", "--steps", "4"]))


def test_ddim_guidance_overshoot_keeps_the_clipped_direction():
    """Under guidance x0 hat overshoots [-1, 1]; the pipelines ask DDIM to re-derive the noise from the clipped x0,
    so x_{t-1} moves toward the clipped x0 instead of away from it (diffusers' default flips the colours)."""
    sched = DDIMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    sched.set_timesteps(25)
    t = sched.timesteps[2]
    abar = sched.alphas_cumprod[t]
    x_t = torch.full((1, 1, 2, 2), 0.2)
    x0_overshoot = 6.0  # what an extrapolated (guided) prediction can ask for
    v = (abar.sqrt() * x_t - x0_overshoot) / (1 - abar).sqrt()  # v such that x0 hat = x0_overshoot
    kept = sched.step(v, t, x_t, use_clipped_model_output=True).prev_sample
    flipped = sched.step(v, t, x_t).prev_sample
    assert (kept > x_t).all()  # toward the clipped x0 = +1
    assert (flipped < 0).all()  # diffusers' default: the unclipped noise direction overwhelms the clipped x0

    pipe = make_pipe(tiny_unet(num_classes=3), DDIMScheduler())
    seen = []
    original_step = pipe.scheduler.step

    @functools.wraps(original_step)  # keeps the signature the pipeline inspects
    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original_step(*args, **kwargs)

    pipe.scheduler.step = spy
    pipe(batch_size=1, class_labels=[1], guidance_scale=3.0, num_inference_steps=2, generator=gen(), output_type="pt")
    assert seen and all(k.get("use_clipped_model_output") is True for k in seen)
