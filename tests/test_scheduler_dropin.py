"""hfgen's schedulers as a drop-in for diffusers' where diffusers' users rely on it (issue 13, 1b): ``step`` at a
timestep off the schedule, zero terminal SNR with epsilon prediction, ``BaseOutput`` step outputs and a tensor
``previous_timestep``; each compared with diffusers' DDPMScheduler / DDIMScheduler built from the same config."""

import math

import diffusers
import pytest
import torch
from diffusers.utils import BaseOutput

import hfgen

T = 1000
N = 10  # divides T: diffusers' stride T // n and hfgen's next schedule entry agree on the schedule (leading spacing)


def both(name: str, num_inference_steps: int | None = N, **config):
    """hfgen's and diffusers' scheduler ``name`` from the same config, schedules set alike."""
    ours = getattr(hfgen, name)(**config)
    theirs = getattr(diffusers, name).from_config(ours.config)
    if num_inference_steps is not None:
        ours.set_timesteps(num_inference_steps)
        theirs.set_timesteps(num_inference_steps)
    return ours, theirs


def data(seed: int = 0, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def assert_f32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same formula, different float32 operation order (hfgen folds Python-float coefficients, diffusers multiplies
    0-d float32 tensors): a few ulps, so rtol 1e-5 (~100 ulp) and atol 1e-6 per unit of the sample's scale."""
    assert torch.isfinite(actual).all()
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale)


def step_both(ours, theirs, model_output, t, sample, seed: int = 0, **kwargs):
    """One step of each from the same input; the same generator seed unless ``variance_noise`` is given."""
    if kwargs.get("variance_noise") is None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    a = ours.step(model_output, t, sample, **kwargs)
    if "generator" in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    b = theirs.step(model_output, t, sample, **kwargs)
    return a, b


# ----------------------------------------------------------------------------------------------------------------
# 1. step at a timestep that is not in the schedule: diffusers' stride rule t' = t - T // n
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_off_schedule_matches_diffusers(prediction_type, eta):
    ours, theirs = both("DDIMScheduler", prediction_type=prediction_type, clip_sample=False)
    model_output, x = data()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for t in (1, 5, 99, 101, 455, 999, torch.tensor(317)):  # none is in 900, 800, ..., 0; t' < 0 for 1, 5 and 99
        assert int(t) not in ours.timesteps.tolist()
        a, b = step_both(ours, theirs, model_output, t, x, eta=eta, variance_noise=noise if eta else None)
        assert_f32_close(a.prev_sample, b.prev_sample)
        assert_f32_close(a.pred_original_sample, b.pred_original_sample)
        prev = ours.previous_timestep(t)
        assert int(prev) == max(int(t) - T // N, -1)


def test_off_schedule_steps_leave_the_schedule_steps_unchanged():
    ours, theirs = both("DDIMScheduler", clip_sample=False)
    model_output, x = data()
    for t in ours.timesteps:
        ours.step(model_output, int(t) + 3, x)  # off-schedule entries are added to the step tables
        a, b = step_both(ours, theirs, model_output, t, x)
        assert_f32_close(a.prev_sample, b.prev_sample)
        assert int(ours.previous_timestep(t)) == max(int(t) - T // N, -1)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_off_schedule_follows_the_stride_rule(variance_type):
    """diffusers' DDPMScheduler raises IndexError off its schedule; hfgen follows DDIM's stride rule, i.e. the step
    t -> t - T // n that diffusers' DDPM takes on the custom schedule [t, t - T // n]."""
    ours = hfgen.DDPMScheduler(variance_type=variance_type, clip_sample=False)
    ours.set_timesteps(N)
    theirs = diffusers.DDPMScheduler.from_config(ours.config)
    model_output, x = data()
    for t in (150, 455, 999, torch.tensor(317)):
        theirs.set_timesteps(timesteps=[int(t), int(t) - T // N])
        a, b = step_both(ours, theirs, model_output, t, x, seed=3)
        assert_f32_close(a.prev_sample, b.prev_sample)
        assert_f32_close(a.pred_original_sample, b.pred_original_sample)
    # t' < 0: the clean level with no noise (Algorithm 2, z = 0 on the last step); diffusers' mean on [t]
    theirs.set_timesteps(timesteps=[7])
    a = ours.step(model_output, 7, x, generator=torch.Generator().manual_seed(3))
    b = theirs.step(model_output, 7, x, generator=torch.Generator().manual_seed(3))
    assert int(ours.previous_timestep(7)) == -1
    assert_f32_close(a.pred_original_sample, b.pred_original_sample)
    torch.testing.assert_close(a.prev_sample, a.pred_original_sample, rtol=1e-5, atol=1e-6)  # mu = x_0 hat


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_step_outside_training_range_is_still_refused(name):
    ours, _ = both(name)
    model_output, x = data()
    for bad in (T, -1, torch.tensor(T + 5)):
        with pytest.raises(ValueError, match=r"timestep must be in \[0, 999\] \(num_train_timesteps=1000\)"):
            ours.step(model_output, bad, x)


# ----------------------------------------------------------------------------------------------------------------
# 2. zero terminal SNR with epsilon prediction: constructed and sampled; refused only at a step from alpha_bar = 0
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_zero_snr_epsilon_leading_samples_like_diffusers(name):
    ours, theirs = both(name, rescale_betas_zero_snr=True, clip_sample=False)  # epsilon by default
    assert float(ours.alphas_cumprod[-1]) == 0.0
    assert T - 1 not in ours.timesteps.tolist()
    model_output, x_ours = data()
    x_theirs = x_ours.clone()
    for t in ours.timesteps:
        a = ours.step(model_output, t, x_ours, generator=torch.Generator().manual_seed(int(t)))
        b = theirs.step(model_output, t, x_theirs, generator=torch.Generator().manual_seed(int(t)))
        assert_f32_close(a.prev_sample, b.prev_sample)
        assert_f32_close(a.pred_original_sample, b.pred_original_sample)
        x_ours, x_theirs = a.prev_sample, b.prev_sample


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_zero_snr_epsilon_refused_at_the_step_from_t_max_only(name, spacing):
    ours, theirs = both(name, rescale_betas_zero_snr=True, clip_sample=False, timestep_spacing=spacing)
    assert int(ours.timesteps[0]) == T - 1  # both spacings start at t = T-1, where alpha_bar = 0
    model_output, x = data()
    with pytest.raises(ValueError, match=r"timestep 999 has alpha_bar_t = 0 .*prediction_type='epsilon'"):
        ours.step(model_output, ours.timesteps[0], x)
    assert not torch.isfinite(theirs.step(model_output, theirs.timesteps[0], x).pred_original_sample).all()
    for t in ours.timesteps[1:]:  # no NaN / inf from the t = T-1 entry of the tables in any other step
        a, b = step_both(ours, theirs, model_output, t, x)
        assert_f32_close(a.pred_original_sample, b.pred_original_sample)
        if name == "DDIMScheduler" and spacing == "linspace":  # uneven stride: diffusers' t - T // n is off the
            assert torch.isfinite(a.prev_sample).all()  # schedule (see test_schedulers.py); only finiteness here
        else:
            assert_f32_close(a.prev_sample, b.prev_sample)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_zero_snr_epsilon_before_set_timesteps(name):
    """The default schedule holds every t; the step next to T-1 is finite and matches diffusers' (t' = t - 1)."""
    ours, theirs = both(name, None, rescale_betas_zero_snr=True, clip_sample=False)
    model_output, x = data()
    if name == "DDIMScheduler":  # diffusers' DDIM needs set_timesteps; T steps give its stride 1
        theirs.set_timesteps(T)
    a, b = step_both(ours, theirs, model_output, T - 2, x)
    assert_f32_close(a.prev_sample, b.prev_sample)
    with pytest.raises(ValueError, match="alpha_bar_t = 0"):
        ours.step(model_output, T - 1, x)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_betas_reaching_one_are_refused_in_the_constructor(name):
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\).*beta_end=2"):
        getattr(hfgen, name)(beta_end=2.0)
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\).*trained_betas"):
        getattr(hfgen, name)(num_train_timesteps=4, trained_betas=[0.1, 1.0, 0.2, 0.3])  # alpha_bar = 0 at t = 1
    getattr(hfgen, name)(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 1.0])  # zero terminal SNR: accepted


# ----------------------------------------------------------------------------------------------------------------
# 3. step outputs are diffusers BaseOutputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_step_output_behaves_like_diffusers_base_output(name):
    ours, theirs = both(name, clip_sample=False)
    model_output, x = data()
    t = ours.timesteps[3]
    a, b = step_both(ours, theirs, model_output, t, x)
    assert isinstance(a, BaseOutput) and type(a).__name__ == type(b).__name__
    assert list(a.keys()) == list(b.keys()) == ["prev_sample", "pred_original_sample"]
    assert a["prev_sample"] is a.prev_sample and a[0] is a.prev_sample and a[1] is a.pred_original_sample
    assert a[:1] == (a.prev_sample,)
    assert [v is w for v, w in zip(a.values(), a.to_tuple(), strict=True)] == [True, True]
    assert dict(a).keys() == dict(b).keys()
    for k in b:
        assert_f32_close(a[k], b[k])
    prev_sample, pred_original_sample = a.to_tuple()
    as_tuple = ours.step(model_output, t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(a)
    for from_tuple, from_dict in zip(as_tuple, (prev_sample, pred_original_sample), strict=True):
        torch.testing.assert_close(from_tuple, from_dict, rtol=0, atol=0)  # the same code path: equal
    a.prev_sample = x  # attribute and item stay one value, as in BaseOutput
    assert a["prev_sample"] is x
    # None fields are left out of the dict and the tuple, as in BaseOutput
    only = type(a)(prev_sample=x)
    assert list(only.keys()) == ["prev_sample"] and only.to_tuple() == (x,)


def test_inversion_output_is_a_base_output():
    scheduler = hfgen.DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(N)
    model_output, x = data()
    out = scheduler.invert_step(model_output, scheduler.timesteps[-1], x)
    assert isinstance(out, BaseOutput) and list(out.keys()) == ["next_sample", "pred_original_sample"]
    assert out["next_sample"] is out.next_sample is out[0]


# ----------------------------------------------------------------------------------------------------------------
# 4. previous_timestep returns a tensor, as diffusers' DDPMScheduler
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_previous_timestep_is_a_tensor_like_diffusers(spacing):
    ours, theirs = both("DDPMScheduler", timestep_spacing=spacing)
    for t in ours.timesteps:
        for query in (t, int(t)):
            mine, ref = ours.previous_timestep(query), theirs.previous_timestep(query)
            assert isinstance(mine, torch.Tensor) and mine.dtype == ref.dtype == torch.int64
            assert mine.shape == ref.shape == ()
            assert int(mine) == int(ref)
    # usable as an index into the tables, as diffusers' (same float32 table: rel_tol 1e-6 leaves room for rounding)
    prev_ours, prev_theirs = ours.previous_timestep(ours.timesteps[0]), theirs.previous_timestep(theirs.timesteps[0])
    assert math.isclose(float(ours.alphas_cumprod[prev_ours]), float(theirs.alphas_cumprod[prev_theirs]), rel_tol=1e-6)


def test_previous_timestep_before_set_timesteps_is_t_minus_one():
    ours, theirs = both("DDPMScheduler", None)
    for t in (0, 1, 500, T - 1):
        mine = ours.previous_timestep(torch.tensor(t))
        assert isinstance(mine, torch.Tensor) and mine.dtype == torch.int64 and mine.shape == ()
        assert int(mine) == int(theirs.previous_timestep(torch.tensor(t))) == t - 1
