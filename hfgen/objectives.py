"""The parameterisation of diffusion and flow matching, in one place: what the network predicts, how x_0 hat and
eps hat follow from it, what it is trained to match, and how the loss is weighted over noise levels.

Every noising process here is x_t = alpha_t x_0 + sigma_t eps, eps ~ N(0, I):

    DDPM / DDIM (variance preserving)   alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)
    flow matching (rectified flow)      alpha_t = 1 - sigma,         sigma_t = sigma in [0, 1]

and the network predicts one of (``prediction_type``, the names diffusers uses):

    "epsilon"          eps                                   (Ho et al. 2020)
    "v_prediction"     v = alpha_t eps - sigma_t x_0          (Salimans & Ho 2022, Imagen Video 2.4)
    "sample"           x_0
    "flow_prediction"  u = eps - x_0, the velocity dx_t/dsigma (Lipman et al. 2023; Liu et al. 2023; SD3)

The coefficients ``alpha`` and ``sigma`` are Python floats (a scheduler step) or tensors that broadcast against the
sample, e.g. (B, 1, 1, 1) (a training batch). Shapes of x_t, x_0, eps and the predictions: (B, C, H, W).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")  # diffusers' SD3 script's choices


# ----------------------------------------------------------------------------------------------------------------------
# The forward process
# ----------------------------------------------------------------------------------------------------------------------


def noisy_sample(x0, eps, alpha, sigma):
    """x_t = alpha_t x_0 + sigma_t eps (DDPM eq. 4; rectified flow with alpha_t = 1 - sigma)."""
    return alpha * x0 + sigma * eps


def diffusion_coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, ndim: int):
    """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer ``timesteps`` (B,), as (B, 1, ...)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float().reshape(-1, *(1,) * (ndim - 1))
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def flow_coefficients(sigmas: torch.Tensor, ndim: int):
    """(alpha_t, sigma_t) = (1 - sigma, sigma) of rectified flow for ``sigmas`` (B,) in [0, 1], as (B, 1, ...)."""
    sigma = sigmas.float().reshape(-1, *(1,) * (ndim - 1))
    return 1 - sigma, sigma


def flow_timesteps(sigmas: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The denoiser's timestep input for noise level sigma: sigma * T, as diffusers' flow-matching schedulers feed it."""
    return sigmas * num_train_timesteps


def snr(alpha, sigma):
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 (Kingma et al. 2021); inf at sigma = 0, 0 at alpha = 0."""
    return alpha**2 / sigma**2


# ----------------------------------------------------------------------------------------------------------------------
# From a prediction to x_0 hat and eps hat
# ----------------------------------------------------------------------------------------------------------------------


def x0_from_eps(x_t, eps, alpha, sigma):
    """x_0 = (x_t - sigma_t eps) / alpha_t (DDPM eq. 15); undefined at alpha_t = 0 (zero terminal SNR)."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, alpha, sigma):
    """eps = (x_t - alpha_t x_0) / sigma_t."""
    return (x_t - alpha * x0) / sigma


def x0_from_v(x_t, v, alpha, sigma):
    """x_0 = alpha_t x_t - sigma_t v (needs alpha_t^2 + sigma_t^2 = 1)."""
    return alpha * x_t - sigma * v


def eps_from_v(x_t, v, alpha, sigma):
    """eps = sigma_t x_t + alpha_t v (needs alpha_t^2 + sigma_t^2 = 1)."""
    return sigma * x_t + alpha * v


def x0_from_velocity(x_t, u, sigma):
    """x_0 = x_t - sigma u (rectified flow, u = eps - x_0)."""
    return x_t - sigma * u


def eps_from_velocity(x_t, u, sigma):
    """eps = x_t + (1 - sigma) u (rectified flow, u = eps - x_0)."""
    return x_t + (1 - sigma) * u


def predicted_x0(model_output, x_t, alpha, sigma, prediction_type: str):
    """x_0 hat from the network's output at x_t, for any ``prediction_type``."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, alpha, sigma)
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, model_output, alpha, sigma)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "flow_prediction":
        return x0_from_velocity(x_t, model_output, sigma)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predicted_eps(model_output, x_t, alpha, sigma, prediction_type: str):
    """eps hat from the network's output at x_t, for any ``prediction_type``."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return eps_from_v(x_t, model_output, alpha, sigma)
    if prediction_type == "sample":
        return eps_from_x0(x_t, model_output, alpha, sigma)
    if prediction_type == "flow_prediction":
        return eps_from_velocity(x_t, model_output, sigma)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Training: targets and loss weights
# ----------------------------------------------------------------------------------------------------------------------


def v_target(x0, eps, alpha, sigma):
    """v = alpha_t eps - sigma_t x_0, the v-prediction target."""
    return alpha * eps - sigma * x0


def training_target(x0, eps, alpha, sigma, prediction_type: str):
    """What the network's output is regressed onto: eps, v, x_0 or the velocity u = eps - x_0."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return v_target(x0, eps, alpha, sigma)
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow_prediction":
        return eps - x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023) of the loss on each prediction type, so that every type weights the
    x_0 error by min(SNR, gamma): eps-loss min(1, gamma / SNR) (1 at SNR = 0, its limit), v-loss
    min(SNR, gamma) / (SNR + 1), x_0-loss min(SNR, gamma), velocity-loss min(SNR, gamma) / (1 + sqrt(SNR))^2."""
    clipped = snr_t.clamp(max=gamma)
    if prediction_type == "epsilon":
        return (gamma / snr_t).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 (not 0 / 0) at SNR = 0
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "flow_prediction":  # |x_0 error| = sigma |u error|, sigma = 1 / (1 + sqrt(SNR))
        return clipped / (1 + snr_t.sqrt()) ** 2
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def flow_matching_weight(sigmas: torch.Tensor, weighting_scheme: str) -> torch.Tensor:
    """Loss weight per noise level of SD3's flow-matching recipe (Esser et al. 2024): 1 for the density schemes
    (logit_normal, mode: the density does the weighting), 1 / sigma^2 (sigma_sqrt) or the cosmap weight; diffusers'
    ``compute_loss_weighting_for_sd3``."""
    if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {FLOW_WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
