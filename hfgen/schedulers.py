"""DDPM and DDIM schedulers: pure tensor math over a precomputed noise schedule.

Paper symbols (t is an integer training timestep in [0, T-1], T = ``num_train_timesteps``):

    beta_t          noise added at training step t                        ``betas[t]``
    alpha_t         1 - beta_t                                            ``alphas[t]``
    alpha_bar_t     prod_{s<=t} alpha_s, the signal fraction of x_t       ``alphas_cumprod[t]``
    x_t             sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps     (DDPM eq. 4, ``add_noise``)
    v_t             sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0     (Imagen Video 2.4, ``get_velocity``)
    x_0 hat         the model's estimate of the clean sample               ``pred_original_sample``
    t'              the next (lower) timestep of the sampling schedule    ``previous_timestep(t)``
    sigma_t(eta)    DDIM noise scale, eta = 0 deterministic, 1 = DDPM     (DDIM eq. 16)

DDPM: Ho et al. 2020, https://arxiv.org/abs/2006.11239 (Algorithm 2, eqs. 6-7 and 15).
DDIM: Song et al. 2021, https://arxiv.org/abs/2010.02502 (eqs. 12 and 16).

Both schedulers take the same constructor arguments as diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` so configs
load both ways with ``from_config``. They differ from diffusers where diffusers is wrong:

- DDIM steps to the actual next entry of ``self.timesteps`` (diffusers uses ``t - T // num_inference_steps``, which is
  wrong for ``trailing`` / ``linspace`` spacing with an uneven stride and for custom timesteps). A ``step`` at a t in
  [0, T-1] that is not in ``self.timesteps`` follows diffusers' stride rule t' = t - T // n (both schedulers).
- DDIM with ``eta > 0`` at zero terminal SNR gives no NaN (the direction coefficient
  ``sqrt(1 - alpha_bar_t' - sigma_t^2)`` is clamped at 0 where rounding makes its argument negative).
- DDPM ``fixed_large_log`` uses log variance log(beta_t), i.e. std sqrt(beta_t) (diffusers takes sqrt of a log: NaN).
- DDPM adds no noise on the last step of the schedule (Algorithm 2, z = 0 at the final step), also when that step is
  not t = 0 (``steps_offset``, custom timesteps).
- Every schedule has exactly ``num_inference_steps`` unique, strictly decreasing timesteps in [0, T-1]
  (see ``_repair_schedule``).
- An epsilon-prediction step from alpha_bar_t = 0 (t = T-1 at zero terminal SNR, where x_0 is not recoverable; e.g.
  the first step of ``trailing`` or ``linspace`` spacing), betas outside [0, 1), more inference steps than training
  steps and out-of-range timesteps are refused with a ValueError. Zero terminal SNR itself is accepted, as in
  diffusers: schedules that do not step from t = T-1 (``leading``) sample with epsilon prediction.

Step outputs are diffusers ``BaseOutput`` dataclasses (``out.prev_sample``, ``out["prev_sample"]``, ``out[0]``,
``out.to_tuple()``, ``out.keys()``), and ``previous_timestep`` returns a 0-d int64 tensor, as in diffusers.

``step()`` is lean: ``set_timesteps`` precomputes every per-step coefficient as a Python float, so a step is a
dictionary lookup plus a handful of fused tensor ops on the sample.
"""

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import objectives

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "sigmoid_alpha_bar")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


class _StepOutput(BaseOutput):
    """diffusers' ``BaseOutput`` (an ordered dict of the non-None fields: ``out["prev_sample"]``, ``out[0]``,
    ``out.keys()``, ``out.to_tuple()``) with a cheaper ``__post_init__``: the field names are read once per class,
    not by ``dataclasses.fields`` on every step. Same result as ``BaseOutput.__post_init__`` for tensor fields."""

    def __post_init__(self) -> None:
        cls = type(self)
        names = cls.__dict__.get("_field_names")  # per class, so a subclass with more fields reads its own
        if names is None:
            names = cls._field_names = tuple(f.name for f in fields(self))
        values = self.__dict__
        if isinstance(values[names[0]], dict):  # BaseOutput's dict-as-first-field form
            super().__post_init__()
            return
        for name in names:
            value = values[name]
            if value is not None:
                OrderedDict.__setitem__(self, name, value)


@dataclass
class DDPMSchedulerOutput(_StepOutput):
    """``prev_sample``: x_{t'} (B, C, H, W), the next model input; ``pred_original_sample``: x_0 hat (B, C, H, W)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class DDIMSchedulerOutput(_StepOutput):
    """``prev_sample``: x_{t'} (B, C, H, W), the next model input; ``pred_original_sample``: x_0 hat (B, C, H, W)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class DDIMInversionOutput(_StepOutput):
    """``next_sample``: the sample at the noisier level t (B, C, H, W); ``pred_original_sample``: x_0 hat."""

    next_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_timesteps: int, alpha_bar_fn, max_beta: float = 0.999) -> torch.Tensor:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into betas: beta_t = 1 - alpha_bar(t+1/T) / alpha_bar(t/T)."""
    betas = [
        min(1 - alpha_bar_fn((i + 1) / num_timesteps) / alpha_bar_fn(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(s: float) -> float:
    """Improved DDPM (Nichol & Dhariwal 2021) cosine schedule, offset 0.008."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(s: float) -> float:
    """Laplace schedule over log-SNR (Hang et al. 2024), as in diffusers."""
    log_snr = -0.5 * math.copysign(1, 0.5 - s) * math.log(1 - 2 * math.fabs(0.5 - s) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def _sigmoid_alpha_bar(s: float, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> float:
    """Sigmoid schedule on alpha_bar (Chen 2023, "On the Importance of Noise Scheduling"), the one RIN trains with:
    alpha_bar(s) falls from 1 at s = 0 to 0 at s = 1 along a sigmoid of (start + s (end - start)) / tau."""
    v_start, v_end = 1 / (1 + math.exp(-start / tau)), 1 / (1 + math.exp(-end / tau))
    v = 1 / (1 + math.exp(-(start + s * (end - start)) / tau))
    return (v_end - v) / (v_end - v_start)


def make_betas(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas
) -> torch.Tensor:
    """The (T,) float32 beta schedule; the same float32 arithmetic as diffusers, so the tables match bit for bit."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps, _cosine_alpha_bar)
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(num_train_timesteps, _laplace_alpha_bar)
    if beta_schedule == "sigmoid":  # GeoDiff's sigmoid on beta, as diffusers' "sigmoid"
        return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    if beta_schedule == "sigmoid_alpha_bar":  # RIN's sigmoid on alpha_bar (not in diffusers)
        return betas_for_alpha_bar(num_train_timesteps, _sigmoid_alpha_bar)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so alpha_bar_{T-1} = 0 and alpha_bar_0 is unchanged (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def _repair_schedule(candidates: np.ndarray, num_train_timesteps: int) -> list[int]:
    """Make n rounded candidate timesteps exactly n unique, strictly decreasing values in [0, T-1] (needs n <= T).

    Two deterministic passes: from the top, each entry is capped at (previous entry - 1) and at T-1; from the bottom,
    each entry is raised to at least (next entry + 1) and 0. After the first pass t_i <= T-1-i, and the second pass
    keeps that bound while forcing t_i >= n-1-i, so the result is strictly decreasing and in range. Candidates that
    are already strictly decreasing and in range are returned unchanged (so valid diffusers schedules are kept).
    """
    out = [int(c) for c in candidates]
    ceiling = num_train_timesteps
    for i, c in enumerate(out):
        out[i] = ceiling = min(c, ceiling - 1)
    floor = -1
    for i in range(len(out) - 1, -1, -1):
        out[i] = floor = max(out[i], floor + 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Shared machinery: schedule tables, set_timesteps, add_noise, get_velocity, thresholding
# ----------------------------------------------------------------------------------------------------------------


class _DiscreteScheduler(SchedulerMixin, ConfigMixin):
    """What DDPM and DDIM share. Subclasses build the per-step coefficient lists in ``_build_step_tables``."""

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    init_noise_sigma = 1.0

    def _init_schedule(self, final_alpha_is_one: bool) -> None:
        cfg = self.config
        for name, value, accepted in (
            ("beta_schedule", cfg.beta_schedule, BETA_SCHEDULES),
            ("prediction_type", cfg.prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS),
        ):
            if value not in accepted and not (name == "beta_schedule" and cfg.trained_betas is not None):
                raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
        self.betas = make_betas(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas
        )
        if self.betas.ndim != 1 or len(self.betas) != cfg.num_train_timesteps:
            raise ValueError(
                f"trained_betas must have num_train_timesteps={cfg.num_train_timesteps} entries, "
                f"got shape {tuple(self.betas.shape)}"
            )
        if cfg.beta_schedule == "sigmoid_alpha_bar" and cfg.trained_betas is None:
            # diffusers has no such schedule: the saved config carries the betas, so its schedulers load them
            self.register_to_config(trained_betas=self.betas.tolist())
        if cfg.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # beta_t in [0, 1] and alpha_bar_t > 0 before the last step; alpha_bar_{T-1} = 0 (zero terminal SNR) is
        # allowed: only an epsilon step at t = T-1 is undefined, and ``step`` refuses that one
        if bool(((self.betas < 0) | (self.betas > 1)).any()) or bool((self.alphas_cumprod[:-1] <= 0).any()):
            source = (
                "trained_betas"
                if cfg.trained_betas is not None
                else f"beta_start={cfg.beta_start}, beta_end={cfg.beta_end}, beta_schedule={cfg.beta_schedule!r}"
            )
            raise ValueError(
                f"betas must lie in [0, 1) (beta = 1 only at the last step, zero terminal SNR), got betas in "
                f"[{float(self.betas.min()):.4g}, {float(self.betas.max()):.4g}] from {source}"
            )
        # alpha_bar after the last step of a schedule: 1 (clean) for DDPM, alpha_bar_0 for DDIM's set_alpha_to_one=False
        self._final_alpha_bar = 1.0 if final_alpha_is_one else float(self.alphas_cumprod[0])
        self._noise_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_schedule(list(range(cfg.num_train_timesteps - 1, -1, -1)), device=None)

    # --- timesteps ----------------------------------------------------------------------------------------------

    def _spaced_timesteps(self, n: int) -> list[int]:
        """n timesteps by ``timestep_spacing`` (Table 2 of Lin et al. 2023), repaired to n unique in-range values."""
        T, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if spacing == "linspace":
            candidates = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "leading":
            candidates = (np.arange(n) * (T // n)).round()[::-1] + self.config.steps_offset  # offset: leading only
        elif spacing == "trailing":
            candidates = np.round(np.arange(T, 0, -T / n))[:n] - 1  # arange may give n + 1 entries
        else:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
        return _repair_schedule(candidates, T)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Set the sampling schedule: ``num_inference_steps`` spaced steps, or custom strictly decreasing ``timesteps``.

        Every schedule has exactly ``num_inference_steps`` unique, strictly decreasing timesteps in [0, T-1]: the spaced
        values are rounded like diffusers' and then repaired deterministically (``_repair_schedule``).
        """
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps needs exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            schedule = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
            if not schedule:
                raise ValueError("timesteps must not be empty")
            if any(a <= b for a, b in itertools.pairwise(schedule)):
                raise ValueError(f"timesteps must be strictly decreasing, got {schedule}")
            if schedule[0] >= T or schedule[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {T - 1}] (num_train_timesteps={T}), got {schedule}")
            self.custom_timesteps = True
        else:
            if not 1 <= num_inference_steps <= T:
                raise ValueError(
                    f"num_inference_steps must be in [1, num_train_timesteps={T}], got {num_inference_steps}"
                )
            schedule = self._spaced_timesteps(int(num_inference_steps))
            self.custom_timesteps = False
        self.num_inference_steps = len(schedule)
        self._set_schedule(schedule, device)

    def _alpha_bar_prev(self, prev: list[int]) -> torch.Tensor:
        """alpha_bar at each t' of ``prev`` (float32), the final level (``_final_alpha_bar``) where t' = -1."""
        prev_t = torch.tensor(prev, dtype=torch.int64)
        final = torch.tensor(self._final_alpha_bar, dtype=torch.float32)
        return torch.where(prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)], final)

    def _set_schedule(self, schedule: list[int], device) -> None:
        self.timesteps = torch.tensor(schedule, dtype=torch.int64, device=device)
        self._schedule = schedule
        self._index_of = {t: i for i, t in enumerate(schedule)}  # grows by the off-schedule timesteps step meets
        self._prev = schedule[1:] + [-1]  # t' per index: the next schedule entry, -1 (clean level) after the last
        # float32 like diffusers' 0-d tensors, so both libraries round the coefficients the same way
        tables = self._build_step_tables(self.alphas_cumprod[schedule], self._alpha_bar_prev(self._prev))
        for name, values in tables.items():
            setattr(self, name, values)

    def _step_index(self, timestep) -> int:
        """Index of ``timestep`` (an int or a 0-d / 1-element tensor of any int dtype/device) in the step tables."""
        i = self._index_of.get(int(timestep))
        return self._add_off_schedule_step(int(timestep)) if i is None else i

    def _add_off_schedule_step(self, t: int) -> int:
        """Tables for a t in [0, T-1] that is not in ``self.timesteps``: diffusers' stride rule t' = t - T // n
        (-1, the clean level, where that is negative), appended after the schedule's entries; returns their index."""
        T = self.config.num_train_timesteps
        if not 0 <= t < T:
            raise ValueError(f"timestep must be in [0, {T - 1}] (num_train_timesteps={T}), got {t}")
        prev = t - T // len(self._schedule)
        prev = prev if prev >= 0 else -1
        tables = self._build_step_tables(self.alphas_cumprod[[t]], self._alpha_bar_prev([prev]))
        for name, values in tables.items():
            getattr(self, name).extend(values)
        self._prev.append(prev)
        self._index_of[t] = i = len(self._prev) - 1
        return i

    def _raise_zero_snr_epsilon(self, t: int):
        raise ValueError(
            f"timestep {t} has alpha_bar_t = 0 (zero terminal SNR, from rescale_betas_zero_snr=True or trained_betas): "
            "x_0 is not recoverable from eps there, so prediction_type='epsilon' cannot step from it; use "
            "prediction_type='v_prediction' or 'sample', or a schedule that does not start at t = T-1 "
            "(timestep_spacing='leading')"
        )

    @staticmethod
    def _raise_bad_shape(model_output: torch.Tensor, sample: torch.Tensor, accepted: str = ""):
        raise ValueError(
            f"model_output must have the shape of sample {tuple(sample.shape)}{accepted}, "
            f"got {tuple(model_output.shape)}"
        )

    def previous_timestep(self, timestep) -> torch.Tensor:
        """t' as a 0-d int64 tensor on the device of ``self.timesteps`` (like diffusers' ``DDPMScheduler``): the entry
        after ``timestep`` in ``self.timesteps``, -1 after the last one; t - T // n for a t not in the schedule."""
        return torch.tensor(self._prev[self._step_index(timestep)], device=self.timesteps.device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: DDPM/DDIM feed x_t to the model unscaled (kept for interchangeability with other schedulers)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- forward process ----------------------------------------------------------------------------------------

    def noise_coefficients(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) of x_t = alpha_t x_0 + sigma_t eps, for int
        ``timesteps`` () or (B,), shaped (B, 1, ..., 1) in the dtype and on the device of ``like``."""
        t = torch.as_tensor(timesteps)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        device = like.device
        tables = self._noise_tables.get(device)
        if tables is None:  # one float32 copy of the table per device, indexed there
            sqrt_ab = self.alphas_cumprod.sqrt()
            tables = (sqrt_ab.to(device), (1 - self.alphas_cumprod).sqrt().to(device))
            self._noise_tables[device] = tables
        t = t.to(device=device, dtype=torch.int64)
        T = self.config.num_train_timesteps
        if bool(((t < 0) | (t >= T)).any()):
            raise ValueError(
                f"timestep must be in [0, {T - 1}] (num_train_timesteps={T}), got {t.min().item()}..{t.max().item()}"
            )
        shape = (-1,) + (1,) * (like.ndim - 1)
        return tables[0][t].reshape(shape).to(like.dtype), tables[1][t].reshape(shape).to(like.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4); ``timesteps`` int () or (B,)."""
        sqrt_ab, sqrt_1m_ab = self.noise_coefficients(timesteps, original_samples)
        return objectives.noisy_sample(original_samples, noise, sqrt_ab, sqrt_1m_ab)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v_t = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, the v-prediction target (``sample`` is x_0)."""
        sqrt_ab, sqrt_1m_ab = self.noise_coefficients(timesteps, sample)
        return objectives.v_target(sample, noise, sqrt_ab, sqrt_1m_ab)

    # --- x_0 clipping -------------------------------------------------------------------------------------------

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen, Saharia et al. 2022): s = clamp(quantile(|x_0|, ratio), 1, max); x_0 -> clip(x_0, -s, s) / s."""
        dtype, (B, *rest) = sample.dtype, sample.shape
        flat = sample.reshape(B, -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32 / float64
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)  # (B, 1)
        return (torch.clamp(flat, -s, s) / s).reshape(B, *rest).to(dtype)

    def _clip_x0(self, pred_original_sample: torch.Tensor, cfg) -> torch.Tensor:
        if cfg.thresholding:
            return self._threshold_sample(pred_original_sample)
        if cfg.clip_sample:
            return pred_original_sample.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return pred_original_sample


# ----------------------------------------------------------------------------------------------------------------
# DDPM
# ----------------------------------------------------------------------------------------------------------------


class DDPMScheduler(_DiscreteScheduler):
    """Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2) on any strided schedule.

    Constructor arguments and defaults are those of ``diffusers.DDPMScheduler``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,  # T
        beta_start: float = 0.0001,  # beta_0 for linear / scaled_linear / sigmoid
        beta_end: float = 0.02,  # beta_{T-1}
        beta_schedule: str = "linear",  # one of BETA_SCHEDULES
        trained_betas: np.ndarray | list[float] | None = None,  # explicit (T,) betas, overrides beta_schedule
        variance_type: str = "fixed_small",  # one of VARIANCE_TYPES
        clip_sample: bool = True,  # clip x_0 hat to [-clip_sample_range, clip_sample_range]
        prediction_type: str = "epsilon",  # what the model predicts: epsilon, v_prediction or sample
        thresholding: bool = False,  # dynamic thresholding of x_0 hat (replaces clip_sample)
        dynamic_thresholding_ratio: float = 0.995,  # quantile of |x_0 hat| used as threshold
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,  # largest dynamic threshold
        timestep_spacing: str = "leading",  # leading, trailing or linspace
        steps_offset: int = 0,  # added to leading timesteps
        rescale_betas_zero_snr: bool = False,  # make alpha_bar_{T-1} = 0 (epsilon cannot step from t = T-1)
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        self.variance_type = variance_type
        self._init_schedule(final_alpha_is_one=True)

    def _build_step_tables(self, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor) -> dict[str, list[float]]:
        """Per step i (alpha_bar at t and t'): the constants of eqs. 6-7 and 15 as Python floats, by attribute name.

        Each entry depends on its own step only, so alpha_bar_t = 0 (t = T-1 at zero terminal SNR) reaches that step
        alone (``step`` refuses epsilon there, where x_0 = x_t / 0) and puts NaN/inf in no other step."""
        one_m_ab, one_m_ab_prev = 1 - alpha_bar_t, 1 - alpha_bar_prev
        alpha = alpha_bar_t / alpha_bar_prev  # alpha_t and beta_t of the strided chain t -> t'
        beta = 1 - alpha
        sqrt_ab = alpha_bar_t.sqrt().tolist()
        # standard deviations: beta tilde of eq. 7 (clamped, it enters a log) and beta_t; their logs for learned_range
        posterior = (one_m_ab_prev / one_m_ab * beta).clamp(min=1e-20)
        return {
            "_sqrt_ab": sqrt_ab,
            "_sqrt_1m_ab": one_m_ab.sqrt().tolist(),
            # posterior mean coefficients of eq. 7: mu = c_x0 x_0 + c_xt x_t
            "_c_x0": (alpha_bar_prev.sqrt() * beta / one_m_ab).tolist(),
            "_c_xt": (alpha.sqrt() * one_m_ab_prev / one_m_ab).tolist(),
            "_std_small": posterior.sqrt().tolist(),
            "_std_large": beta.sqrt().tolist(),
            "_log_small": posterior.log().tolist(),
            "_log_large": beta.log().tolist(),
        }

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One ancestral step x_t -> x_{t'} of DDPM Algorithm 2 (t' = ``previous_timestep(t)``: the next entry of
        ``self.timesteps``, or t - T // n for a t not in it).

        Legend (variable -> paper):
            sample -> x_t; model_output -> eps_theta(x_t, t), v or x_0 (by ``prediction_type``), with the
            predicted variance v in its second channel half for learned variance types;
            sqrt_ab -> sqrt(alpha_bar_t); sqrt_1m_ab -> sqrt(1 - alpha_bar_t);
            pred_original_sample -> x_0 hat; pred_prev_mean -> mu tilde_t(x_t, x_0 hat); std -> sigma_t;
            prev_sample -> x_{t'}.

        :param model_output: (B, C, H, W), or (B, 2C, H, W) for ``learned`` / ``learned_range``.
        :param timestep: t in [0, T-1] (int or 0-d int tensor on any device), usually an entry of ``self.timesteps``.
        :param sample: x_t, (B, C, H, W).
        """
        cfg = self.config
        i = self._step_index(timestep)
        C = sample.shape[1]
        if self.variance_type in ("learned", "learned_range"):
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"variance_type={self.variance_type!r} needs model_output with 2 * {C} channels (prediction, "
                    f"variance), got {model_output.shape[1]}"
                )
            if model_output.shape[:1] + model_output.shape[2:] != sample.shape[:1] + sample.shape[2:]:
                self._raise_bad_shape(model_output, sample, f" with 2 * {C} channels")
            model_output, predicted_variance = model_output.split(C, dim=1)
        elif model_output.shape != sample.shape:
            if model_output.ndim == sample.ndim and model_output.shape[1] != C:
                raise ValueError(f"model_output must have {C} channels like sample, got {model_output.shape[1]}")
            self._raise_bad_shape(model_output, sample)

        # 1. x_0 hat from the model output (eq. 15 for epsilon), alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - ...)
        sqrt_ab, sqrt_1m_ab = self._sqrt_ab[i], self._sqrt_1m_ab[i]
        if cfg.prediction_type == "epsilon" and sqrt_ab == 0.0:  # alpha_bar_t = 0: t = T-1 at zero terminal SNR
            self._raise_zero_snr_epsilon(int(timestep))
        pred_original_sample = objectives.predicted_x0(model_output, sample, sqrt_ab, sqrt_1m_ab, cfg.prediction_type)

        # 2. clip or threshold x_0 hat
        pred_original_sample = self._clip_x0(pred_original_sample, cfg)

        # 3. posterior mean of eq. 7: mu = sqrt(alpha_bar_t') beta_t / (1 - alpha_bar_t) x_0
        #                                  + sqrt(alpha_t) (1 - alpha_bar_t') / (1 - alpha_bar_t) x_t
        prev_sample = torch.add(pred_original_sample * self._c_x0[i], sample, alpha=self._c_xt[i])

        # 4. x_{t'} = mu + sigma_t z, z ~ N(0, I), except into the clean level t' = -1 (Algorithm 2: z = 0 on the last
        #    step); sigma_t^2 from eq. 6: beta tilde (fixed_small), beta_t (fixed_large) or learned (Improved DDPM
        #    interpolates their logs)
        if self._prev[i] >= 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=sample.device, dtype=model_output.dtype
            )
            vt = self.variance_type
            if vt in ("fixed_small", "fixed_small_log"):
                prev_sample = prev_sample.add_(noise, alpha=self._std_small[i])
            elif vt in ("fixed_large", "fixed_large_log"):
                prev_sample = prev_sample.add_(noise, alpha=self._std_large[i])
            elif vt == "learned":  # the model predicts sigma_t^2 itself
                prev_sample = prev_sample + predicted_variance.sqrt() * noise
            else:  # learned_range: frac in [-1, 1] interpolates log beta tilde .. log beta_t
                frac = (predicted_variance + 1) / 2
                log_variance = frac * self._log_large[i] + (1 - frac) * self._log_small[i]
                prev_sample = prev_sample + torch.exp(0.5 * log_variance) * noise
        if prev_sample.dtype != sample.dtype:
            prev_sample = prev_sample.to(sample.dtype)

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# ----------------------------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------------------------


class DDIMScheduler(_DiscreteScheduler):
    """DDIM sampling (Song et al. 2021, eq. 12) with eta-controlled noise (eq. 16), and DDIM inversion.

    Constructor arguments and defaults are those of ``diffusers.DDIMScheduler``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,  # T
        beta_start: float = 0.0001,  # beta_0 for linear / scaled_linear / sigmoid
        beta_end: float = 0.02,  # beta_{T-1}
        beta_schedule: str = "linear",  # one of BETA_SCHEDULES
        trained_betas: np.ndarray | list[float] | None = None,  # explicit (T,) betas, overrides beta_schedule
        clip_sample: bool = True,  # clip x_0 hat to [-clip_sample_range, clip_sample_range]
        set_alpha_to_one: bool = True,  # alpha_bar after the last step: 1, or alpha_bar_0 when False
        steps_offset: int = 0,  # added to leading timesteps
        prediction_type: str = "epsilon",  # what the model predicts: epsilon, v_prediction or sample
        thresholding: bool = False,  # dynamic thresholding of x_0 hat (replaces clip_sample)
        dynamic_thresholding_ratio: float = 0.995,  # quantile of |x_0 hat| used as threshold
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,  # largest dynamic threshold
        timestep_spacing: str = "leading",  # leading, trailing or linspace
        rescale_betas_zero_snr: bool = False,  # make alpha_bar_{T-1} = 0 (epsilon cannot step from t = T-1)
    ):
        self._init_schedule(final_alpha_is_one=set_alpha_to_one)
        self.final_alpha_cumprod = torch.tensor(self._final_alpha_bar, dtype=torch.float32)

    def _build_step_tables(self, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor) -> dict[str, list[float]]:
        """Per step i (alpha_bar at t and t'): the constants of eqs. 12 and 16 as Python floats, by attribute name.

        Each entry depends on its own step only, so alpha_bar_t = 0 (t = T-1 at zero terminal SNR) reaches that step
        alone (``step`` refuses epsilon there, where x_0 = x_t / 0) and puts NaN/inf in no other step."""
        one_m_ab, one_m_ab_prev = 1 - alpha_bar_t, 1 - alpha_bar_prev
        sqrt_ab, sqrt_1m_ab = alpha_bar_t.sqrt().tolist(), one_m_ab.sqrt().tolist()
        return {
            "_sqrt_ab": sqrt_ab,
            "_sqrt_1m_ab": sqrt_1m_ab,
            "_sqrt_ab_prev": alpha_bar_prev.sqrt().tolist(),
            "_sqrt_1m_ab_prev": one_m_ab_prev.sqrt().tolist(),
            "_1m_ab_prev": one_m_ab_prev.tolist(),
            # sigma_t(1)^2 of eq. 16: (1 - alpha_bar_t') / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_t')
            "_variance": (one_m_ab_prev / one_m_ab * (1 - alpha_bar_t / alpha_bar_prev)).tolist(),
        }

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t'} of eq. 12, t' = the next entry of ``self.timesteps`` (not t - T // n); for a t
        not in ``self.timesteps``, t' = t - T // n as in diffusers.

        Legend (variable -> paper):
            sample -> x_t; model_output -> eps_theta(x_t, t), v or x_0 (by ``prediction_type``);
            pred_epsilon -> eps_theta(x_t, t); pred_original_sample -> f_theta(x_t) = "predicted x_0";
            sqrt_ab -> sqrt(alpha_t) (DDIM's alpha_t is DDPM's alpha_bar_t); sqrt_ab_prev -> sqrt(alpha_{t-1});
            std -> sigma_t(eta); eta -> eta; direction -> "direction pointing to x_t" coefficient;
            prev_sample -> x_{t-1}, the sample at t'.

        :param model_output: (B, C, H, W).
        :param timestep: t in [0, T-1] (int or 0-d int tensor on any device), usually an entry of ``self.timesteps``.
        :param sample: x_t, (B, C, H, W).
        :param eta: 0 = deterministic DDIM, 1 = DDPM-like noise.
        :param use_clipped_model_output: re-derive eps from the clipped x_0 hat (as GLIDE does).
        :param variance_noise: z (B, C, H, W) to use instead of drawing it from ``generator``.
        """
        cfg = self.config
        i = self._step_index(timestep)
        if model_output.shape != sample.shape:
            self._raise_bad_shape(model_output, sample)
        sqrt_ab, sqrt_1m_ab = self._sqrt_ab[i], self._sqrt_1m_ab[i]

        # 1. "predicted x_0" and eps of eq. 12 (x_0 = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t) for epsilon)
        pt = cfg.prediction_type
        if pt == "epsilon" and sqrt_ab == 0.0:  # alpha_bar_t = 0: t = T-1 at zero terminal SNR
            self._raise_zero_snr_epsilon(int(timestep))
        pred_original_sample = objectives.predicted_x0(model_output, sample, sqrt_ab, sqrt_1m_ab, pt)
        pred_epsilon = objectives.predicted_eps(model_output, sample, sqrt_ab, sqrt_1m_ab, pt)

        # 2. clip or threshold x_0 hat; optionally re-derive eps from it
        if cfg.thresholding or cfg.clip_sample:
            pred_original_sample = self._clip_x0(pred_original_sample, cfg)
            if use_clipped_model_output:
                pred_epsilon = objectives.eps_from_x0(sample, pred_original_sample, sqrt_ab, sqrt_1m_ab)

        # 3. sigma_t(eta) of eq. 16: eta sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_{t-1})
        std = eta * math.sqrt(self._variance[i])
        # 4. eq. 12: x_{t-1} = sqrt(alpha_{t-1}) x_0 + sqrt(1 - alpha_{t-1} - sigma_t^2) eps + sigma_t z
        #    (clamped at 0: at zero terminal SNR with eta = 1 the argument is 0 up to rounding)
        direction = math.sqrt(max(self._1m_ab_prev[i] - std * std, 0.0))
        prev_sample = torch.add(pred_original_sample * self._sqrt_ab_prev[i], pred_epsilon, alpha=direction)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise to step, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample.add_(variance_noise, alpha=std)
        if prev_sample.dtype != sample.dtype:
            prev_sample = prev_sample.to(sample.dtype)

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # --- inversion ----------------------------------------------------------------------------------------------

    @property
    def inversion_timesteps(self) -> torch.Tensor:
        """``self.timesteps`` in increasing order: the loop of ``invert_step`` from data towards noise."""
        return self.timesteps.flip(0)

    def invert_step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> DDIMInversionOutput | tuple:
        """Deterministic DDIM step run backwards (eta = 0, no clipping): from the level t' up to t.

        ``timestep`` is t, an entry of ``self.timesteps``; ``sample`` is x_{t'} at the entry after t (or at the clean
        level alpha_bar = ``final_alpha_cumprod`` after the last one); ``model_output`` is the model at (``sample``, t),
        the usual approximation eps(x_t', t) ~ eps(x_t, t) that makes the step explicit. The loop
        ``for t in inversion_timesteps: x = invert_step(model(x, t), t, x).next_sample`` turns data into the latent
        that ``step`` with the same schedule and eta = 0 maps back to the data.

        Legend (variable -> paper): sample -> x_{t-1} (at t'); pred_epsilon -> eps_theta, read from the model output
        at the level t the model was given; pred_original_sample -> x_0 = (x_{t-1} - sqrt(1 - alpha_{t-1}) eps) /
        sqrt(alpha_{t-1}) (eq. 12 at t'); next_sample -> x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps (eq. 12 with
        sigma = 0 from t' to t).
        """
        pt = self.config.prediction_type
        i = self._step_index(timestep)
        if model_output.shape != sample.shape:
            self._raise_bad_shape(model_output, sample)
        sqrt_ab, sqrt_1m_ab = self._sqrt_ab[i], self._sqrt_1m_ab[i]
        # 1. eps from the model output at level t
        pred_epsilon = objectives.predicted_eps(model_output, sample, sqrt_ab, sqrt_1m_ab, pt)
        # 2. x_0 consistent with x_{t'} and eps (eq. 12 at t')
        pred_original_sample = objectives.x0_from_eps(
            sample, pred_epsilon, self._sqrt_ab_prev[i], self._sqrt_1m_ab_prev[i]
        )
        # 3. eq. 12 with sigma = 0, towards the noisier level t
        next_sample = objectives.noisy_sample(pred_original_sample, pred_epsilon, sqrt_ab, sqrt_1m_ab)
        if next_sample.dtype != sample.dtype:
            next_sample = next_sample.to(sample.dtype)
        if not return_dict:
            return next_sample, pred_original_sample
        return DDIMInversionOutput(next_sample=next_sample, pred_original_sample=pred_original_sample)
