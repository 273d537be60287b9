"""hfgen.DDPMScheduler / hfgen.DDIMScheduler: parity with diffusers where diffusers is right, fixes where it is not,
schedule properties, device/dtype handling, DDIM inversion."""

import itertools
import math

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import FLOAT32_EPS

import hfgen
from hfgen.schedulers import DDIMInversionOutput, DDIMScheduler, DDPMScheduler

T = 1000
NUM_STEPS = 10  # divides T: diffusers' DDIM stride T // n is right for leading and trailing spacing
CLIP_MODES = {"none": {"clip_sample": False}, "clip": {"clip_sample": True, "clip_sample_range": 1.5}}
CLIP_MODES["threshold"] = {"clip_sample": False, "thresholding": True, "sample_max_value": 1.2}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def linear_model(channels: int, variance_type: str | None = None, seed: int = 0):
    """A fixed random "denoiser": out = W x + b (t / T - 1/2), (B, C, H, W) -> (B, C, H, W).

    For learned variance types a second half of C channels is appended: a positive variance (``learned``) or a value in
    [-1, 1] (``learned_range``).
    """
    g = torch.Generator().manual_seed(seed)
    weight = 0.9 * torch.eye(channels) + 0.1 * torch.randn(channels, channels, generator=g) / math.sqrt(channels)
    bias = torch.randn(channels, generator=g)

    def model(x: torch.Tensor, t) -> torch.Tensor:
        out = torch.einsum("oc,bchw->bohw", weight, x) + bias[None, :, None, None] * (float(t) / T - 0.5)
        if variance_type == "learned":
            return torch.cat([out, 1e-3 * (1.5 + torch.tanh(x))], dim=1)
        if variance_type == "learned_range":
            return torch.cat([out, torch.tanh(x)], dim=1)
        return out

    return model


def sample_loop(scheduler, model, x: torch.Tensor, seed: int = 0, **step_kwargs) -> list:
    """Run a full sampling loop; returns [(prev_sample, pred_original_sample)] for every step."""
    generator = torch.Generator().manual_seed(seed)
    outs = []
    for t in scheduler.timesteps:
        out = scheduler.step(model(x, t), t, x, generator=generator, **step_kwargs)
        outs.append((out.prev_sample, out.pred_original_sample))
        x = out.prev_sample
    return outs


# hfgen and diffusers round the same float32 equations in another order; an eps model's x_0 hat divides by
# sqrt(alpha_bar_t) (>= 0.0064 at T = 1000), so the roundings of x_t grow to ~70 eps of the sample (measured): 256 eps
PARITY_TOL = 256 * FLOAT32_EPS  # ~3.1e-5


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float = PARITY_TOL, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|): float32 agreement, scaled for large-valued samples."""
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= tol * scale, f"{what}: max abs error {error:.3g} > {tol:g} * {scale:.3g}"


def assert_same_loops(ours: list, theirs: list, last_is_mean: bool = False) -> None:
    """Every (prev_sample, x_0 hat) within PARITY_TOL (scaled). ``last_is_mean``: the schedule ends at t > 0, where diffusers'
    DDPM still adds noise; hfgen's last step is the noise-free posterior mean, for alpha_bar_prev = 1 that is x_0 hat."""
    assert len(ours) == len(theirs)
    for i, ((prev, x0), (prev_ref, x0_ref)) in enumerate(zip(ours, theirs, strict=True)):
        assert_close_scaled(x0, x0_ref, what=f"step {i} pred_original_sample")
        if last_is_mean and i == len(ours) - 1:
            assert_close_scaled(prev, x0, what=f"step {i} prev_sample vs x_0 hat")
        else:
            assert_close_scaled(prev, prev_ref, what=f"step {i} prev_sample")


def both(name: str, num_steps: int | None = NUM_STEPS, **config):
    ours, theirs = getattr(hfgen, name)(**config), getattr(diffusers, name)(**config)
    if num_steps is not None:
        ours.set_timesteps(num_steps)
        theirs.set_timesteps(num_steps)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    return ours, theirs


# ----------------------------------------------------------------------------------------------------------------
# Parity grid: the same samples as diffusers, given the same generator
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", list(CLIP_MODES))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_ddpm_parity_grid(beta_schedule, prediction_type, variance_type, spacing, clip):
    config = {"beta_schedule": beta_schedule, "prediction_type": prediction_type, "variance_type": variance_type}
    ours, theirs = both("DDPMScheduler", timestep_spacing=spacing, **config, **CLIP_MODES[clip])
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    model = linear_model(3, variance_type)
    last_is_mean = int(ours.timesteps[-1]) > 0  # trailing ends at t = 99
    assert_same_loops(sample_loop(ours, model, x), sample_loop(theirs, model, x), last_is_mean)


@pytest.mark.parametrize("clip", list(CLIP_MODES))
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta,use_clipped", [(0.0, False), (1.0, False), (0.5, True)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_parity_grid(beta_schedule, prediction_type, eta, use_clipped, spacing, clip):
    config = {"beta_schedule": beta_schedule, "prediction_type": prediction_type, "timestep_spacing": spacing}
    ours, theirs = both("DDIMScheduler", **config, **CLIP_MODES[clip])
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    model = linear_model(3)
    kwargs = {"eta": eta, "use_clipped_model_output": use_clipped}
    assert_same_loops(sample_loop(ours, model, x, **kwargs), sample_loop(theirs, model, x, **kwargs))


@pytest.mark.parametrize(
    "name,config,num_steps,step_kwargs",
    [
        ("DDIMScheduler", {"steps_offset": 1, "set_alpha_to_one": False}, 7, {"eta": 0.3}),
        ("DDIMScheduler", {"steps_offset": 1, "clip_sample": False, "beta_schedule": "scaled_linear"}, 50, {}),
        ("DDIMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 10, {"eta": 0.5}),
        (
            "DDIMScheduler",
            {"rescale_betas_zero_snr": True, "prediction_type": "sample", "timestep_spacing": "trailing"},
            4,
            {},
        ),
        (
            "DDIMScheduler",
            {"trained_betas": torch.linspace(1e-3, 0.05, 100).tolist(), "num_train_timesteps": 100},
            9,
            {},
        ),
        ("DDPMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 10, {}),
        (
            "DDPMScheduler",
            {"trained_betas": torch.linspace(1e-3, 0.05, 100).tolist(), "num_train_timesteps": 100},
            9,
            {},
        ),
        ("DDPMScheduler", {"beta_schedule": "laplace", "clip_sample": False}, 10, {}),
        ("DDPMScheduler", {"variance_type": "fixed_large", "timestep_spacing": "trailing"}, 7, {}),
    ],
)
def test_parity_other_configs(name, config, num_steps, step_kwargs):
    ours, theirs = both(name, num_steps, **config)
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    model = linear_model(4)
    ours_loop, theirs_loop = sample_loop(ours, model, x, **step_kwargs), sample_loop(theirs, model, x, **step_kwargs)
    assert_same_loops(ours_loop, theirs_loop, last_is_mean=name == "DDPMScheduler" and int(ours.timesteps[-1]) > 0)


def test_ddpm_parity_custom_timesteps_and_full_schedule():
    ours, theirs = both("DDPMScheduler", None)
    custom = [900, 700, 420, 300, 111, 37, 0]
    ours.set_timesteps(timesteps=custom)
    theirs.set_timesteps(timesteps=custom)
    model, x = linear_model(3), torch.randn(1, 3, 4, 4)
    assert_same_loops(sample_loop(ours, model, x), sample_loop(theirs, model, x))
    # before set_timesteps: the full T-step chain
    ours, theirs = both("DDPMScheduler", None, num_train_timesteps=30)
    assert_same_loops(sample_loop(ours, model, x), sample_loop(theirs, model, x))


def test_add_noise_and_velocity_parity():
    ours, theirs = both("DDPMScheduler", None, beta_schedule="squaredcos_cap_v2")
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), atol=1e-6, rtol=1e-6)
    # the same tables in both libraries, for every beta schedule
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"):
        ours, theirs = both("DDPMScheduler", None, beta_schedule=schedule, rescale_betas_zero_snr=False)
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod), schedule
    sigmoid = diffusers.DDPMScheduler(beta_schedule="sigmoid").alphas_cumprod  # diffusers' DDIM lacks sigmoid
    assert torch.equal(DDIMScheduler(beta_schedule="sigmoid").alphas_cumprod, sigmoid)


def test_rins_sigmoid_schedule_is_on_alpha_bar_and_loads_in_diffusers(tmp_path):
    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    ours = DDPMScheduler(beta_schedule="sigmoid_alpha_bar", prediction_type="v_prediction")
    ab = (
        ours.alphas_cumprod
    )  # alpha_bar_t = gamma((t + 1) / T), gamma(s) = (sig(3) - sig(6 s - 3)) / (sig(3) - sig(-3))
    for t in (0, 499, 899, 998):
        s = (t + 1) / 1000
        expected = (sigmoid(3) - sigmoid(6 * s - 3)) / (sigmoid(3) - sigmoid(-3))
        assert abs(ab[t].item() - expected) < 1e-5, t
    assert abs(ab[499].item() - 0.5) < 1e-6  # symmetric: half the signal at mid-schedule
    assert ab[-1] < 1e-3 and bool((ab[1:] < ab[:-1]).all())
    # it is not diffusers' "sigmoid" (GeoDiff's sigmoid on beta), whose alpha_bar is 0.30 at mid-schedule
    assert abs(DDPMScheduler(beta_schedule="sigmoid").alphas_cumprod[499].item() - 0.30) < 0.01
    # diffusers has no such schedule: the config carries the betas, so diffusers' schedulers load the same tables
    ours.save_pretrained(tmp_path)
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        assert torch.equal(cls.from_pretrained(tmp_path).alphas_cumprod, ab), cls.__name__
    assert torch.equal(DDIMScheduler.from_config(ours.config).alphas_cumprod, ab)


def test_v_prediction_recovers_x0_and_eps():
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False)
    scheduler.set_timesteps(10)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = scheduler.timesteps[3]
    x_t = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    out = scheduler.step(v, t, x_t)
    torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-5, rtol=1e-5)
    expected = scheduler.add_noise(x0, noise, scheduler.timesteps[4])  # deterministic DDIM keeps eps
    torch.testing.assert_close(out.prev_sample, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Where diffusers is wrong
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,num_steps", [("trailing", 3), ("linspace", 4), ("trailing", 7)])
def test_ddim_steps_to_next_schedule_entry_when_stride_uneven(spacing, num_steps):
    ours, theirs = both("DDIMScheduler", num_steps, timestep_spacing=spacing, clip_sample=False)
    schedule = ours.timesteps.tolist()
    assert [ours.previous_timestep(t) for t in schedule] == schedule[1:] + [-1]
    model, x = linear_model(3), torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours_loop, theirs_loop = sample_loop(ours, model, x), sample_loop(theirs, model, x)
    assert not torch.allclose(ours_loop[-1][0], theirs_loop[-1][0], atol=1e-3)  # diffusers used t - T // n
    # each hfgen step is eq. 12 (eta = 0) towards alpha_bar of the schedule's next entry
    ab = ours.alphas_cumprod.double()
    for i, t in enumerate(schedule):
        x_t = x if i == 0 else ours_loop[i - 1][0]
        eps = model(x_t, t).double()
        a_t, a_prev = ab[t], (ab[schedule[i + 1]] if i + 1 < len(schedule) else torch.tensor(1.0, dtype=torch.float64))
        x0 = (x_t.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        torch.testing.assert_close(ours_loop[i][0].double(), expected, atol=1e-5, rtol=1e-5)


def test_ddim_custom_timesteps_step_to_next_entry():
    scheduler = DDIMScheduler(clip_sample=False)
    custom = [999, 800, 333, 50, 7]
    scheduler.set_timesteps(timesteps=custom)
    assert scheduler.timesteps.tolist() == custom and scheduler.num_inference_steps == 5
    x0, noise = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    # with the exact eps of a known (x0, noise) pair, deterministic DDIM lands on add_noise at each next entry
    x = scheduler.add_noise(x0, noise, torch.tensor(custom[0]))
    for t, t_next in itertools.pairwise(custom):
        x = scheduler.step(noise, t, x).prev_sample
        assert_close_scaled(x, scheduler.add_noise(x0, noise, torch.tensor(t_next)), tol=1e-4)
    torch.testing.assert_close(scheduler.step(noise, custom[-1], x).prev_sample, x0, atol=1e-4, rtol=1e-4)


ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}  # the first step is t = T-1, alpha_bar 0


def ddim_step_float64(scheduler, model_output, i, sample, eta, noise) -> torch.Tensor:
    """Step i of DDIM (eq. 12, sigma_t(eta) of eq. 16) in float64, from the scheduler's own alpha_bar table and config."""
    cfg, schedule = scheduler.config, scheduler.timesteps.tolist()
    ab = scheduler.alphas_cumprod.double()
    a = ab[schedule[i]]
    a_prev = ab[schedule[i + 1]] if i + 1 < len(schedule) else scheduler.final_alpha_cumprod.double()
    out, x = model_output.double(), sample.double()
    if cfg.prediction_type == "v_prediction":
        x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    else:  # "sample"
        x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    argument = 1 - a_prev - eta**2 * variance  # 0 exactly at alpha_bar_t = 0, eta = 1 (variance = 1 - alpha_bar_prev)
    assert argument >= -1e-12, argument  # the equation itself takes no square root of a negative number
    return a_prev.sqrt() * x0 + argument.clamp(min=0).sqrt() * eps + eta * variance.sqrt() * noise.double()


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_no_nan_at_zero_terminal_snr_with_eta(prediction_type):
    """eta = 1 at zero terminal SNR: every step is finite and is eq. 12 computed in float64 from the same inputs."""
    scheduler = DDIMScheduler(prediction_type=prediction_type, **ZERO_SNR)
    scheduler.set_timesteps(10)
    assert scheduler.alphas_cumprod[-1] == 0 and scheduler.timesteps[0] == T - 1
    model = linear_model(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 4, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        noise = torch.randn(x.shape, generator=g)
        out = scheduler.step(model(x, t), t, x, eta=1.0, variance_noise=noise)
        assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.pred_original_sample).all(), i
        expected = ddim_step_float64(scheduler, model(x, t), i, x, 1.0, noise)
        # a handful of float32 roundings of terms of the samples' size (|x| < 5), no division by a small number
        assert_close_scaled(out.prev_sample, expected, tol=64 * FLOAT32_EPS, what=f"step {i}")
        x = out.prev_sample


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_diffusers_ddim_nan_at_zero_terminal_snr_with_eta(prediction_type):
    """What hfgen fixes, shown where it reproduces: at t = T-1 (alpha_bar_t = 0) sigma_t^2 = 1 - alpha_bar_t', so
    diffusers' sqrt(1 - alpha_bar_t' - sigma_t^2) takes the root of a float32 rounding of 0, which is negative on some
    CPUs (NaN on an AMD EPYC) and not on others (finite on an Intel Xeon)."""
    theirs = diffusers.DDIMScheduler(prediction_type=prediction_type, **ZERO_SNR)
    theirs.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    loop = sample_loop(theirs, linear_model(3), x, eta=1.0)
    finite = [bool(torch.isfinite(prev).all()) for prev, _ in loop]
    if all(finite):
        pytest.skip("diffusers' DDIM rounds sqrt(1 - alpha_bar_prev - sigma^2) to a root of >= 0 on this CPU")
    assert not finite[0] and torch.isfinite(loop[0][1]).all()  # the first step's direction term, not its x_0 hat


def test_ddpm_fixed_large_log_is_fixed_large():
    """``fixed_large_log``: log variance log(beta_t), i.e. std sqrt(beta_t), the same samples as ``fixed_large``."""
    ours = DDPMScheduler(variance_type="fixed_large_log")
    ours.set_timesteps(10)
    model, x = linear_model(3), torch.randn(1, 3, 4, 4)
    reference = diffusers.DDPMScheduler(variance_type="fixed_large")  # log variance log(beta_t): std sqrt(beta_t)
    reference.set_timesteps(10)
    assert_same_loops(sample_loop(ours, model, x), sample_loop(reference, model, x))


def test_diffusers_ddpm_fixed_large_log_is_nan():
    """What hfgen fixes, shown where it reproduces: diffusers' std is sqrt(log beta_t), the root of a negative."""
    theirs = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    theirs.set_timesteps(10)
    first = sample_loop(theirs, linear_model(3), torch.randn(1, 3, 4, 4))[0][0]
    if torch.isfinite(first).all():
        pytest.skip(f"diffusers {diffusers.__version__} gives a finite fixed_large_log step")
    assert first.isnan().all()


def test_ddpm_last_step_adds_no_noise():
    scheduler = DDPMScheduler(steps_offset=1, variance_type="fixed_large", clip_sample=False)
    scheduler.set_timesteps(10)
    last = scheduler.timesteps[-1]
    assert last == 1
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    first, second = (
        scheduler.step(eps, last, x, generator=torch.Generator().manual_seed(seed)).prev_sample for seed in (0, 1)
    )
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    ab = scheduler.alphas_cumprod[1]
    torch.testing.assert_close(first, (x - (1 - ab).sqrt() * eps) / ab.sqrt())  # alpha_bar_prev = 1: mean is x_0 hat


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_set_timesteps_errors(name):
    scheduler = getattr(hfgen, name)(num_train_timesteps=50)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, num_train_timesteps=50\], got 51"):
        scheduler.set_timesteps(51)
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="exactly one of"):
        scheduler.set_timesteps(5, timesteps=[3, 2])
    with pytest.raises(ValueError, match="strictly decreasing"):
        scheduler.set_timesteps(timesteps=[10, 10, 3])
    with pytest.raises(ValueError, match=r"\[0, 49\]"):
        scheduler.set_timesteps(timesteps=[50, 3])
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        getattr(hfgen, name)(beta_schedule="cosine")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        getattr(hfgen, name)(timestep_spacing="even")


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_out_of_range_timesteps_are_refused(name):
    scheduler = getattr(hfgen, name)(num_train_timesteps=100)
    scheduler.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4)
    for bad in (100, -1, torch.tensor(250)):
        with pytest.raises(ValueError, match=r"timestep must be in \[0, 99\]"):
            scheduler.step(x, bad, x)
        with pytest.raises(ValueError, match=r"timestep must be in \[0, 99\]"):
            scheduler.add_noise(x, x, torch.as_tensor(bad).reshape(1))
        with pytest.raises(ValueError, match=r"timestep must be in \[0, 99\]"):
            scheduler.get_velocity(x, x, bad)
    with pytest.raises(TypeError, match="timesteps must be integers"):
        scheduler.add_noise(x, x, torch.tensor([3.0]))


def test_ddpm_learned_variance_needs_two_channel_halves():
    scheduler = DDPMScheduler(variance_type="learned_range")
    scheduler.set_timesteps(5)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="2 \\* 3 channels"):
        scheduler.step(x, scheduler.timesteps[0], x)


# ----------------------------------------------------------------------------------------------------------------
# Schedule property: exactly n unique, strictly decreasing, in-range timesteps
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    num_train_timesteps=st.sampled_from([1, 2, 3, 7, 10, 33, 100, 128, 999, 1000]),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    steps_offset=st.sampled_from([0, 1, 3]),
)
def test_schedule_has_exactly_n_unique_decreasing_in_range(data, num_train_timesteps, spacing, steps_offset):
    n = data.draw(st.integers(1, num_train_timesteps))
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps, timestep_spacing=spacing, steps_offset=steps_offset
    )
    scheduler.set_timesteps(n)
    ts = scheduler.timesteps.tolist()
    assert len(ts) == n == len(set(ts))
    assert all(a > b for a, b in itertools.pairwise(ts))
    assert 0 <= ts[-1] and ts[0] <= num_train_timesteps - 1
    # where diffusers' own schedule is already valid, it is the same schedule
    reference = diffusers.DDIMScheduler(
        num_train_timesteps=num_train_timesteps, timestep_spacing=spacing, steps_offset=steps_offset
    )
    reference.set_timesteps(n)
    ref = reference.timesteps.tolist()
    if len(ref) == n == len(set(ref)) and ref[0] < num_train_timesteps and ref[-1] >= 0:
        assert ts == ref


def test_every_count_is_exact():
    num_train_timesteps = 250
    for spacing in ("leading", "trailing", "linspace"):
        scheduler = DDPMScheduler(num_train_timesteps, timestep_spacing=spacing, steps_offset=1)
        for n in range(1, num_train_timesteps + 1):
            scheduler.set_timesteps(n)
            ts = scheduler.timesteps
            assert len(ts) == n and bool((ts[:-1] > ts[1:]).all())
            assert 0 <= int(ts[-1]) and int(ts[0]) < num_train_timesteps


# ----------------------------------------------------------------------------------------------------------------
# Devices and dtypes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_timestep_types_give_the_same_step(name):
    scheduler = getattr(hfgen, name)()
    scheduler.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = int(scheduler.timesteps[4])
    results = [
        scheduler.step(eps, timestep, x, generator=torch.Generator().manual_seed(0)).prev_sample
        for timestep in (
            t,
            torch.tensor(t),
            torch.tensor(t, dtype=torch.int32),
            torch.tensor([t]),
            scheduler.timesteps[4],
        )
    ]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=0, rtol=0)
    noisy = [scheduler.add_noise(x, eps, ts) for ts in (torch.tensor(t), torch.tensor([t], dtype=torch.int32), t)]
    for r in noisy[1:]:
        torch.testing.assert_close(r, noisy[0], atol=0, rtol=0)


def test_add_noise_indexes_a_table_per_device():
    scheduler = DDPMScheduler()
    x, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([[1], [500], [999]], dtype=torch.int32)  # any int dtype and shape with B entries
    out = scheduler.add_noise(x, noise, t)
    ab = scheduler.alphas_cumprod[t.flatten().long()].reshape(3, 1, 1, 1)
    torch.testing.assert_close(out, ab.sqrt() * x + (1 - ab).sqrt() * noise)
    assert list(scheduler._noise_tables) == [x.device]  # one table copy per sample device, indexed there
    assert scheduler.alphas_cumprod.device.type == "cpu"
    if torch.cuda.is_available():
        gpu = scheduler.add_noise(x.cuda(), noise.cuda(), t)  # CPU timesteps, GPU samples
        torch.testing.assert_close(gpu.cpu(), out)
        assert scheduler.alphas_cumprod.device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_half_precision_samples_keep_their_dtype(name, dtype):
    scheduler = getattr(hfgen, name)(prediction_type="v_prediction", thresholding=True)
    scheduler.set_timesteps(5)
    x, eps = torch.randn(2, 3, 4, 4, dtype=dtype), torch.randn(2, 3, 4, 4, dtype=dtype)
    t = scheduler.timesteps[1]
    extra = {"eta": 1.0} if name == "DDIMScheduler" else {}
    out = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(0), **extra)
    assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    assert torch.isfinite(out.prev_sample).all()
    assert scheduler.add_noise(x, eps, t.reshape(1)).dtype == dtype
    assert scheduler.get_velocity(x, eps, torch.tensor([3, 7])).dtype == dtype
    reference = getattr(hfgen, name)(prediction_type="v_prediction", thresholding=True)
    reference.set_timesteps(5)
    ref = reference.step(eps.float(), t, x.float(), generator=torch.Generator().manual_seed(0), **extra).prev_sample
    if name == "DDIMScheduler":  # noise is drawn in the sample dtype, as diffusers does: compare the eta = 0 part
        ref = reference.step(eps.float(), t, x.float()).prev_sample
        out = scheduler.step(eps, t, x)
    torch.testing.assert_close(out.prev_sample.float(), ref, atol=0.05, rtol=0.05)


def _tensors(obj) -> dict:
    found = {}
    for key, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                for j, item in enumerate(v if isinstance(v, tuple) else (v,)):
                    if isinstance(item, torch.Tensor):
                        found[f"{key}[{k}][{j}]"] = item
    return found


@pytest.mark.parametrize(
    "config",
    [{}, {"beta_schedule": "squaredcos_cap_v2"}, {"trained_betas": [0.01] * 1000}, {"beta_schedule": "sigmoid"}],
)
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_no_float64_tensor_in_the_schedule(name, config):
    scheduler = getattr(hfgen, name)(**config)
    scheduler.set_timesteps(7)
    scheduler.add_noise(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), torch.tensor([5]))
    tensors = _tensors(scheduler)
    assert {"betas", "alphas", "alphas_cumprod", "timesteps"} <= set(tensors)
    for key, value in tensors.items():
        assert value.dtype != torch.float64, key
    assert scheduler.alphas_cumprod.dtype == torch.float32 and scheduler.timesteps.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------------------
# DDIM inversion
# ----------------------------------------------------------------------------------------------------------------


def point_mass_eps(x0_star: torch.Tensor, scheduler):
    """Exact eps(x_t, t) for data = the single point x0*: (x_t - sqrt(alpha_bar_t) x0*) / sqrt(1 - alpha_bar_t)."""

    def eps(x, t):
        ab = scheduler.alphas_cumprod[int(t)]
        return (x - ab.sqrt() * x0_star) / (1 - ab).sqrt()

    return eps


def test_ddim_inversion_reconstructs_point_mass():
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    scheduler.set_timesteps(12)
    assert scheduler.inversion_timesteps.tolist() == sorted(scheduler.timesteps.tolist())
    x0_star = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = point_mass_eps(x0_star, scheduler)
    x = x0_star.clone()
    for t in scheduler.inversion_timesteps:
        out = scheduler.invert_step(eps(x, t), t, x)
        assert isinstance(out, DDIMInversionOutput)
        x = out.next_sample
    ab_top = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
    assert (x - ab_top.sqrt() * x0_star).abs().max() > 0.1  # a real latent, not the data
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t), t, x).prev_sample
    torch.testing.assert_close(x, x0_star, atol=1e-4, rtol=0)


def test_ddim_inversion_follows_the_ode_for_gaussian_data():
    """Data N(mu, s^2 I): the probability-flow ODE keeps z = (x_t - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab) fixed.

    DDIM inversion is a first-order solver of that ODE: its error against the exact latent halves with twice the steps.
    """
    mu, s = 0.3, 0.5
    x0 = mu + s * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    errors = []
    for num_steps in (50, 100):
        scheduler = DDIMScheduler(clip_sample=False)
        scheduler.set_timesteps(num_steps)

        def eps(x, t, scheduler=scheduler):
            ab = scheduler.alphas_cumprod[int(t)]
            return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

        x = x0.clone()
        for t in scheduler.inversion_timesteps:
            x = scheduler.invert_step(eps(x, t), t, x).next_sample
        ab = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
        exact = ab.sqrt() * mu + (ab * s**2 + 1 - ab).sqrt() * (x0 - mu) / s
        errors.append((x - exact).abs().max().item())
        for t in scheduler.timesteps:
            x = scheduler.step(eps(x, t), t, x).prev_sample
        assert (x - x0).abs().max() < 3 * errors[-1]
    assert errors[1] < 0.03 and errors[1] < 0.65 * errors[0]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_inversion_other_parameterisations(prediction_type):
    """Exact v / x_0 models of the point mass invert to the same latent as the exact eps model, and sample back."""
    schedulers = {pt: DDIMScheduler(clip_sample=False, prediction_type=pt) for pt in ("epsilon", prediction_type)}
    for scheduler in schedulers.values():
        scheduler.set_timesteps(8)
    x0_star = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    eps = point_mass_eps(x0_star, schedulers["epsilon"])

    def model(x, t):
        if prediction_type == "sample":
            return x0_star
        ab = schedulers["epsilon"].alphas_cumprod[int(t)]
        return ab.sqrt() * eps(x, t) - (1 - ab).sqrt() * x0_star

    latents = {}
    for pt, fn in (("epsilon", eps), (prediction_type, model)):
        x = x0_star.clone()
        for t in schedulers[pt].inversion_timesteps:
            x = schedulers[pt].invert_step(fn(x, t), t, x).next_sample
        latents[pt] = x
    torch.testing.assert_close(latents[prediction_type], latents["epsilon"], atol=1e-4, rtol=1e-4)
    x = latents[prediction_type]
    for t in schedulers[prediction_type].timesteps:
        x = schedulers[prediction_type].step(model(x, t), t, x).prev_sample
    torch.testing.assert_close(x, x0_star, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# API surface
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_api_surface_matches_diffusers(name, tmp_path):
    ours, theirs = getattr(hfgen, name)(), getattr(diffusers, name)()
    assert ours._compatibles == theirs._compatibles and all(isinstance(c, str) for c in ours._compatibles)
    assert dict(ours.config) == dict(theirs.config)  # same constructor arguments and defaults
    assert ours.order == 1 and ours.init_noise_sigma == 1.0 and len(ours) == T
    x = torch.randn(1, 3, 2, 2)
    assert ours.scale_model_input(x, 5) is x
    assert ours.timesteps.tolist() == list(range(T - 1, -1, -1)) and ours.num_inference_steps is None
    ours = getattr(hfgen, name)(beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1)
    ours.save_pretrained(tmp_path)
    loaded = getattr(hfgen, name).from_pretrained(tmp_path)

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert type(loaded) is type(ours) and public(loaded.config) == public(ours.config)
    assert torch.equal(loaded.alphas_cumprod, ours.alphas_cumprod)
