"""Flow matching (issue 13, part 3), and the parameterisation it shares with diffusion (``hfgen.objectives``):

- the exact velocity field of Gaussian data, sampled through ``HFGenPipeline`` with diffusers'
  ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler``, reaches the data distribution; x_0 hat
  in the callbacks is E[x_0 | x_t]; ``invert`` runs the ODE backwards to the noise that regenerates the images;
- ``train_diffusion.py --objective flow_matching``: the loss falls on the shapes, every denoiser and conditioning
  trains and samples, the timesteps are sigma * T from the logit-normal density, resume equals an uninterrupted run,
  and the saved pipeline round-trips through save/load and the Hub cache.
"""

import math
import shutil

import pytest
import torch
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.training_utils import compute_loss_weighting_for_sd3
from test_train_diffusion import TINY
from tolerances import assert_close_float32

from hfgen import UNetModel, objectives
from hfgen.layers import DenoiserOutput
from hfgen.pipelines import HFGenPipeline
from hfgen.schedulers import DDPMScheduler
from hfgen.training import train_diffusion

T = 1000  # num_train_timesteps; conftest.py runs the suite on one torch thread


# ----------------------------------------------------------------------------------------------------------------------
# hfgen.objectives
# ----------------------------------------------------------------------------------------------------------------------


# v = alpha eps - sigma x0 needs alpha^2 + sigma^2 = 1: every prediction on the diffusion process, all but v on flow
COMBINATIONS = [("diffusion", p) for p in objectives.PREDICTION_TYPES if p != "flow_prediction"] + [
    ("flow", p) for p in objectives.PREDICTION_TYPES if p != "v_prediction"
]


@pytest.mark.parametrize("kind,prediction_type", COMBINATIONS)
def test_each_prediction_recovers_x0_and_eps(kind, prediction_type):
    """The training target of each prediction type, read back at x_t, gives x_0 and eps (float64: exact up to
    rounding)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 2, 4, 4, generator=g).double()
    if kind == "diffusion":
        alpha_bar = torch.tensor([0.999, 0.9, 0.5, 0.2, 0.05, 0.001], dtype=torch.float64)
        alpha, sigma = objectives.diffusion_coefficients(alpha_bar, torch.arange(6), 4)
    else:
        alpha, sigma = objectives.flow_coefficients(torch.tensor([0.001, 0.1, 0.5, 0.8, 0.95, 0.999]).double(), 4)
    x_t = objectives.noisy_sample(x0, eps, alpha, sigma)
    target = objectives.training_target(x0, eps, alpha, sigma, prediction_type)
    torch.testing.assert_close(objectives.predicted_x0(target, x_t, alpha, sigma, prediction_type), x0)
    torch.testing.assert_close(objectives.predicted_eps(target, x_t, alpha, sigma, prediction_type), eps)


def test_min_snr_weights_are_defined_at_zero_snr_and_weight_the_x0_error_alike():
    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 100.0, math.inf])
    eps_w = objectives.min_snr_weight(snr, 5.0, "epsilon")
    assert torch.isfinite(eps_w).all() and eps_w[0] == 1.0  # the limit of min(SNR, 5) / SNR at SNR -> 0
    torch.testing.assert_close(eps_w[1:5], snr[1:5].clamp(max=5) / snr[1:5])
    for prediction_type in ("v_prediction", "sample", "flow_prediction"):
        w = objectives.min_snr_weight(snr[:5], 5.0, prediction_type)
        assert torch.isfinite(w).all() and w[0] == 0.0, prediction_type
    # every type weights the x_0 error by min(SNR, gamma): |x0 err|^2 = |eps err|^2 / SNR = sigma^2 |u err|^2
    s = snr[1:5]
    sigma_flow = 1 / (1 + s.sqrt())  # rectified flow: alpha / sigma = sqrt(SNR), alpha + sigma = 1
    torch.testing.assert_close(objectives.min_snr_weight(s, 5.0, "epsilon") / s, s.clamp(max=5) / s**2)
    torch.testing.assert_close(objectives.min_snr_weight(s, 5.0, "flow_prediction") / sigma_flow**2, s.clamp(max=5))


def test_flow_weights_are_diffusers_and_bad_names_are_refused():
    sigmas = torch.linspace(0.05, 0.95, 7)
    for scheme in objectives.FLOW_WEIGHTING_SCHEMES:
        torch.testing.assert_close(
            objectives.flow_matching_weight(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas)
        )
    with pytest.raises(ValueError, match="weighting_scheme"):
        objectives.flow_matching_weight(sigmas, "uniform")
    with pytest.raises(ValueError, match="prediction_type"):
        objectives.predicted_x0(sigmas, sigmas, 1.0, 0.0, "velocity")


# ----------------------------------------------------------------------------------------------------------------------
# Sampling the exact velocity of Gaussian data
# ----------------------------------------------------------------------------------------------------------------------


class GaussianVelocity(ModelMixin, ConfigMixin):
    """The exact flow velocity of data x_0 ~ N(mean, std^2) per pixel: u*(x, sigma) = E[eps - x_0 | x_t = x] with
    x_t = (1 - sigma) x_0 + sigma eps and sigma = timestep / T, a test "denoiser" in HFGenPipeline's interface."""

    @register_to_config
    def __init__(self, in_channels=1, sample_size=4, num_classes=None, mean=0.5, std=0.2):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, for ModelMixin's device and dtype

    def posterior_mean_x0(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t = x] = mean + a std^2 / v (x - a mean), a = 1 - sigma, v = a^2 std^2 + sigma^2."""
        a, m, s2 = 1 - sigma, self.config.mean, self.config.std**2
        return m + a * s2 / (a**2 * s2 + sigma**2) * (x - a * m)

    def forward(self, sample, timestep, **kwargs):
        sigma = (torch.as_tensor(timestep).float() / T).reshape(-1, 1, 1, 1).expand(len(sample), 1, 1, 1)
        a, m, s2 = 1 - sigma, self.config.mean, self.config.std**2
        u = (sigma - a * s2) / (a**2 * s2 + sigma**2) * (sample - a * m) - m
        return DenoiserOutput(sample=u)


def gaussian_pipe(scheduler_cls=FlowMatchEulerDiscreteScheduler):
    pipe = HFGenPipeline(GaussianVelocity(), scheduler_cls(num_train_timesteps=T, shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_std_error(scheduler_cls, num_inference_steps: int) -> float:
    """|std / 0.2 - 1| of 4096 x 16 pixels sampled from the exact velocity (mean checked on the way)."""
    x = gaussian_pipe(scheduler_cls)(batch_size=4096, num_inference_steps=num_inference_steps,
                                     generator=torch.Generator().manual_seed(0), output_type="latent").images  # fmt: skip
    assert x.shape == (4096, 1, 4, 4)
    assert abs(x.mean().item() - 0.5) < 0.005, x.mean()  # standard error 0.2 / 256 < 0.001
    return abs(x.std().item() / 0.2 - 1)


def test_exact_velocity_sampled_through_the_pipeline_reaches_the_data_distribution():
    """From N(0, 1) noise to data N(0.5, 0.2^2): the sample mean and std are the data's. Heun (second order) is within
    1% of the std at 25 steps; Euler (first order) shrinks the std by ~2% / (steps / 25), so it is within 6% at 50
    steps and its error halves with twice the steps. A sampler that reads the velocity as eps, feeds the wrong
    timestep or skips the last step is off by far more (the std of an unfinished sample is > 0.25)."""
    assert sample_std_error(FlowMatchHeunDiscreteScheduler, 25) < 0.01
    euler_50, euler_100 = (
        sample_std_error(FlowMatchEulerDiscreteScheduler, 50),
        sample_std_error(FlowMatchEulerDiscreteScheduler, 100),
    )
    assert euler_50 < 0.06 and 0.35 < euler_100 / euler_50 < 0.65, (euler_50, euler_100)


def test_callback_x0_hat_is_the_posterior_mean_from_the_velocity():
    """``pred_original_sample`` in the callback is x_t - sigma u, which for the exact velocity is E[x_0 | x_t]."""
    pipe = gaussian_pipe()
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((t, kwargs["pred_original_sample"], kwargs["latents"]))
        return {}

    pipe(batch_size=8, num_inference_steps=10, latents=noise, output_type="latent", callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"])  # fmt: skip
    assert len(seen) == 10
    x_t = noise
    for t, x0_hat, x_next in seen:
        expected = pipe.denoiser.posterior_mean_x0(x_t, torch.as_tensor(t).float() / T)
        assert_close_float32(x0_hat, expected, num_eps=64, floor=1.0, msg=f"t={float(t)}")
        x_t = x_next


def round_trip_error(pipe, num_inference_steps: int) -> tuple[float, torch.Tensor]:
    """Mean |x_0 - sample(invert(x_0))| over 64 sampled images, and the inverted noise."""
    images = pipe(batch_size=64, num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(2),
                  output_type="latent").images  # fmt: skip
    noise = pipe.invert(images, num_inference_steps=num_inference_steps)
    again = pipe(batch_size=64, num_inference_steps=num_inference_steps, latents=noise, output_type="latent").images
    return (again - images).abs().mean().item(), noise


def test_invert_runs_the_flow_backwards_to_the_noise_that_regenerates_the_images():
    """invert then sample gives the images back up to the explicit Euler step's error, which halves with twice the
    steps (0.011 of the data's 0.2 std at 50 steps); the inverted latents are noise-like (std near 1, not 0.2)."""
    pipe = gaussian_pipe()
    err_50, noise = round_trip_error(pipe, 50)
    err_100, _ = round_trip_error(pipe, 100)
    assert err_50 < 0.015 and 0.35 < err_100 / err_50 < 0.65, (err_50, err_100)
    assert abs(noise.std().item() - 1) < 0.15
    # the Heun scheduler's pipeline inverts along the same Euler sigmas
    images = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 0.2 + 0.5
    heun = gaussian_pipe(FlowMatchHeunDiscreteScheduler)
    torch.testing.assert_close(heun.invert(images, num_inference_steps=20), pipe.invert(images, num_inference_steps=20))


# ----------------------------------------------------------------------------------------------------------------------
# Resolution-dependent shifting: Flux / SD3-style scheduler configs (use_dynamic_shifting) need mu
# ----------------------------------------------------------------------------------------------------------------------


def shifting_pipe() -> HFGenPipeline:
    """The Gaussian-velocity pipeline (4 x 4 pixels: 16 tokens) with a dynamic-shifting scheduler whose shift runs
    from 0.5 at 4 tokens to 1.15 at 64."""
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=T, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64
    )
    pipe = HFGenPipeline(GaussianVelocity(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_sigmas(num_inference_steps: int, mu: float) -> torch.Tensor:
    reference = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=T, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64
    )
    reference.set_timesteps(num_inference_steps, mu=mu)
    return reference.sigmas


def test_dynamic_shifting_takes_mu_from_the_token_count_as_diffusers_pipelines_do():
    """Without ``mu`` the pipeline passes diffusers' ``calculate_shift`` of the image's token count (as the SD3 and
    Flux pipelines do; before, such a scheduler raised "mu must be passed"); a given ``mu`` is used as it is."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    pipe = shifting_pipe()
    images = pipe(batch_size=256, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                  output_type="latent").images  # fmt: skip
    expected_mu = calculate_shift(16, 4, 64, 0.5, 1.15)
    torch.testing.assert_close(pipe.scheduler.sigmas, reference_sigmas(50, expected_mu))
    assert abs(images.mean().item() - 0.5) < 0.01 and abs(images.std().item() / 0.2 - 1) < 0.1  # still the data
    pipe(batch_size=1, num_inference_steps=10, mu=0.3, output_type="latent")
    torch.testing.assert_close(pipe.scheduler.sigmas, reference_sigmas(10, 0.3))


def test_image_seq_len_counts_patches():
    from hfgen.dit import DiTModel
    from hfgen.pipelines.denoising import image_seq_len

    latents = torch.zeros(1, 4, 8, 12)
    dit = DiTModel(sample_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    assert image_seq_len(dit, latents) == 4 * 6
    assert image_seq_len(GaussianVelocity(), latents) == 8 * 12  # no patches: one token per pixel, as a U-Net


def test_invert_with_dynamic_shifting_regenerates_the_images():
    err, noise = round_trip_error(shifting_pipe(), 50)
    assert err < 0.02 and abs(noise.std().item() - 1) < 0.15, (err, noise.std())


@pytest.mark.parametrize(
    "make, mu, match",
    [
        (shifting_pipe, "0.5", "mu must be a number"),
        (lambda: HFGenPipeline(GaussianVelocity(), DDPMScheduler()), 0.5, "mu is for schedulers with"),
    ],
)
def test_bad_mu(make, mu, match):
    with pytest.raises(ValueError, match=match):
        make()(batch_size=1, num_inference_steps=2, mu=mu, output_type="latent")


# ----------------------------------------------------------------------------------------------------------------------
# train_diffusion.py --objective flow_matching
# ----------------------------------------------------------------------------------------------------------------------

FLOW = [*TINY, "--objective", "flow_matching"]  # TINY asks for diffusion; flow matching is the script's default


def run(out, *extra):
    train_diffusion.main(train_diffusion.parse_args([*FLOW, "--output_dir", str(out), *extra]))


def test_flow_matching_loss_falls_on_the_shapes(tmp_path, monkeypatch):
    losses = []
    loss_fn = train_diffusion.objective_loss
    monkeypatch.setattr(train_diffusion, "objective_loss", lambda *a: losses.append(loss_fn(*a).item()) or loss_fn(*a))
    run(tmp_path, "--max_train_steps", "80", "--train_batch_size", "16", "--shapes_num_images", "256",
        "--learning_rate", "2e-3", "--num_validation_images", "1")  # fmt: skip
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)  # E|eps - x0|^2 ~ 1.3 at the start; the field is learnt


def test_timesteps_are_sigma_times_T_from_the_logit_normal_density(tmp_path, monkeypatch):
    seen = []
    forward = UNetModel.forward

    def recording_forward(self, sample, timestep, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(timestep.detach().clone())
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", recording_forward)
    run(tmp_path, "--max_train_steps", "16", "--train_batch_size", "8", "--num_validation_images", "1")
    t = torch.cat(seen)
    assert t.is_floating_point() and ((t > 0) & (t < T)).all()
    assert (t != t.round()).any()  # continuous sigma, not integer timesteps
    sigma = t / T
    logit = torch.log(sigma / (1 - sigma))  # N(0, 1) under the default logit_normal(0, 1)
    assert abs(logit.mean().item()) < 0.3 and abs(logit.std().item() - 1) < 0.25, (logit.mean(), logit.std())
    pipe = HFGenPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 1.0


@pytest.mark.parametrize(
    "name,extra",
    [
        ("dit-class-ema", ["--model", "dit", "--model_config", "DiT-tiny/2", "--resolution", "8",
                           "--conditioning", "class", "--use_ema"]),
        ("rin-self-cond", ["--model", "rin", "--model_config", "RIN-tiny", "--self_cond_prob", "0.5"]),
    ],
)  # fmt: skip
def test_every_denoiser_trains_and_samples_with_both_flow_schedulers(tmp_path, name, extra):
    run(tmp_path, "--max_train_steps", "2", *extra)
    pipe = HFGenPipeline.from_pretrained(tmp_path)
    labels = [0, 5] if "class" in name else None
    for scheduler in (pipe.scheduler, FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)):
        pipe.scheduler = scheduler
        out = pipe(batch_size=2, class_labels=labels, num_inference_steps=2, output_type="np").images
        assert out.shape[0] == 2 and out.min() >= 0 and out.max() <= 1


def test_text_and_vae_conditioning_train_with_flow_matching(tmp_path):
    from transformers import CLIPTextModel

    from hfgen import VAEModel
    from hfgen.autoencoder import AUTOENCODER_PRESETS
    from hfgen.clip import small_clip_config, train_clip_tokenizer
    from hfgen.data import SHAPE_PAIRS
    from hfgen.pipelines import HFGenTextToImagePipeline

    tokenizer = train_clip_tokenizer([f"a {c} {s}" for c, s in SHAPE_PAIRS], vocab_size=300, model_max_length=8)
    config = small_clip_config(tokenizer, text_width=32, text_layers=1, num_heads=2, vision_width=32, vision_layers=1,
                               projection_dim=32)  # fmt: skip
    CLIPTextModel(config.text_config).save_pretrained(tmp_path / "clip" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "clip" / "tokenizer")
    VAEModel(**AUTOENCODER_PRESETS["ae-tiny"], sample_size=16).save_pretrained(tmp_path / "vae")
    run(tmp_path / "out", "--conditioning", "text", "--text_encoder", str(tmp_path / "clip"), "--vae",
        str(tmp_path / "vae"), "--max_train_steps", "2", "--num_validation_images", "1")  # fmt: skip
    pipe = HFGenTextToImagePipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.vae is not None
    seen = []
    images = pipe(["a red circle"], num_inference_steps=3, output_type="np",
                  callback_on_step_end=lambda p, i, t, kw: seen.append(kw["pred_original_sample"]) or {},
                  callback_on_step_end_tensor_inputs=["pred_original_sample"]).images  # fmt: skip
    assert images.shape == (1, 16, 16, 3) and len(seen) == 3 and seen[0].shape == (1, 4, 4, 4)


def test_resume_equals_uninterrupted_and_the_pipeline_round_trips_through_the_hub_cache(tmp_path):
    common = ["--use_ema", "--ema_max_decay", "0.9", "--checkpointing_steps", "3", "--conditioning", "class"]
    run(tmp_path / "straight", *common, "--max_train_steps", "6")
    run(tmp_path / "split", *common, "--max_train_steps", "3")
    run(tmp_path / "split", *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    a = HFGenPipeline.from_pretrained(tmp_path / "straight").denoiser.state_dict()
    b = HFGenPipeline.from_pretrained(tmp_path / "split").denoiser.state_dict()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=1e-6, msg=k)

    # save/load and a repo id served from the Hub cache give the same images as the trained pipeline
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--user--flow"
    shutil.copytree(tmp_path / "straight", repo / "snapshots" / commit, ignore=shutil.ignore_patterns("checkpoint-*"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    local = HFGenPipeline.from_pretrained(tmp_path / "straight")
    hub = HFGenPipeline.from_pretrained("user/flow", cache_dir=tmp_path / "hub")
    assert isinstance(hub.scheduler, FlowMatchEulerDiscreteScheduler)

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, class_labels=[1, 2], num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    torch.testing.assert_close(sample(hub), sample(local), rtol=0, atol=0)


def test_flow_matching_refuses_the_diffusion_only_arguments(tmp_path):
    for flag, value in (("--prediction_type", "v_prediction"), ("--snr_gamma", "5")):
        with pytest.raises(ValueError, match=rf"{flag} applies to --objective diffusion"):
            train_diffusion.parse_args([*FLOW, "--output_dir", str(tmp_path), flag, value])
    with pytest.raises(ValueError, match="--logit_std must be > 0"):
        train_diffusion.parse_args([*FLOW, "--output_dir", str(tmp_path), "--logit_std", "0"])
