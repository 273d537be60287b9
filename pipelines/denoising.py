"""
What hfgen's pipelines share (installed as ``hfgen.pipelines.denoising``): argument checks, noise drawing, the one
denoising loop (``denoising_loop``: guided model output, ``scheduler.step``, callback), x_0 hat for callbacks, VAE
decoding and output post-processing.

Each pipeline's ``__call__`` reads top to bottom: check inputs, prepare its conditioning, draw noise,
``denoising_loop``, decode, post-process. Guidance itself is ``hfgen.guidance``; the parameterisation (x_0 hat from
eps / v / velocity) is ``hfgen.objectives``.

Paper symbols: x_t = ``latents`` / ``sample`` (B, C, H, W), x_0 hat = ``pred_original_sample``,
s = ``guidance_scale``, alpha_bar_t = ``scheduler.alphas_cumprod[t]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from hfgen import objectives
from hfgen.guidance import guidance_enabled, guided_prediction

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------------


def check_output_type(output_type: str) -> None:
    """Raise unless ``output_type`` is one of ``OUTPUT_TYPES``."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def check_positive_int(name: str, value: int) -> None:
    """Raise unless ``value`` is an int >= 1 (bools and floats such as 64.0 refused), naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_num_inference_steps(num_inference_steps: int) -> None:
    """Raise unless ``num_inference_steps`` is an int >= 1 (bools refused)."""
    check_positive_int("num_inference_steps", num_inference_steps)


def check_generator_list(generator, batch_size: int) -> None:
    """Raise when ``generator`` is a list whose length is not ``batch_size`` (one generator per image)."""
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"generator is a list of {len(generator)} generators, but batch_size is {batch_size}: "
            "pass one generator per image or a single generator"
        )


def callback_tensor_inputs(callback, names: list[str] | None) -> list[str] | None:
    """The tensors a step-end callback receives: a diffusers ``PipelineCallback`` / ``MultiPipelineCallbacks``
    declares its own (``callback.tensor_inputs``, as diffusers' pipelines read them), a plain function gets
    ``callback_on_step_end_tensor_inputs``."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        return list(callback.tensor_inputs)
    return names


def check_callback_tensor_inputs(names: list[str] | None, accepted: list[str]) -> None:
    """Raise when ``callback_on_step_end_tensor_inputs`` names a tensor the pipeline does not pass."""
    unknown = [k for k in names or [] if k not in accepted]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs has unknown names {unknown}; accepted: {accepted}")


# ----------------------------------------------------------------------------------------------------------------------
# What a callback reads of a sampling pipeline (the properties of diffusers' pipelines)
# ----------------------------------------------------------------------------------------------------------------------


class SamplingProperties:
    """``guidance_scale``, ``do_classifier_free_guidance``, ``num_timesteps`` and ``interrupt`` of the sampling call
    in progress, as diffusers' pipelines expose them to ``callback_on_step_end``. A callback that sets
    ``pipe._interrupt = True`` skips the remaining steps (diffusers' way to stop early); the images are then decoded
    from the latents reached so far."""

    _guidance_scale: float = 1.0
    _num_timesteps: int = 0
    _interrupt: bool = False

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return guidance_enabled(self._guidance_scale)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt


# ----------------------------------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------------------------------


def first_generator(generator: torch.Generator | list[torch.Generator] | None) -> torch.Generator | None:
    """The generator itself, or the first of a list (for draws that take a single generator)."""
    return generator[0] if isinstance(generator, list) else generator


def generator_device(generator: torch.Generator | list[torch.Generator] | None) -> torch.device:
    """The device random draws happen on: the (first) generator's, CPU without one."""
    gen = first_generator(generator)
    return gen.device if gen is not None else torch.device("cpu")


def draw_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """
    N(0, I) noise of ``shape`` (torch's default dtype, float32, unless ``dtype``), drawn on the generator's device
    (CPU by default) so that results do not depend on the execution device; with a generator list, row i is drawn
    from generator i only.
    """
    return randn_tensor(shape, generator=generator, device=generator_device(generator), dtype=dtype)


def vae_scale_factor(vae) -> int:
    """Image pixels per latent pixel: 2**(levels - 1) of the VAE (``config.block_out_channels``), 1 without one."""
    if vae is None:
        return 1
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------------------------------
# One denoising step: model output with guidance, scheduler.step arguments, x_0 hat
# ----------------------------------------------------------------------------------------------------------------------


def keeps_variance(scheduler) -> bool:
    """Whether ``scheduler.step`` takes the learned variance half of a learned-sigma output (variance_type learned)."""
    return scheduler.config.get("variance_type", None) in ("learned", "learned_range")


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` integrates a flow velocity u = eps - x_0 (diffusers' ``FlowMatch*`` schedulers, or any
    with ``prediction_type="flow_prediction"``), fed to the denoiser at timestep sigma * num_train_timesteps."""
    return type(scheduler).__name__.startswith("FlowMatch") or (
        scheduler.config.get("prediction_type", None) == "flow_prediction"
    )


def image_seq_len(denoiser, latents: torch.Tensor) -> int:
    """The number of image tokens the denoiser sees in ``latents`` (B, C, H, W): (H / p) (W / p), p its
    ``config.patch_size`` (a DiT's or RIN's patches), 1 for a U-Net (one token per pixel)."""
    p = denoiser.config.get("patch_size", None) or 1
    return (latents.shape[-2] // p) * (latents.shape[-1] // p)


def dynamic_shift_mu(config, seq_len: int) -> float:
    """diffusers' ``calculate_shift``: the ``mu`` of resolution-dependent shifting, linear in the image's token count
    from ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len`` (the scheduler
    config's values; diffusers' defaults 0.5 at 256 and 1.15 at 4096)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (seq_len - base_len)


def set_timesteps(scheduler, num_inference_steps: int, latents: torch.Tensor, denoiser, mu: float | None = None):
    """
    ``scheduler.set_timesteps`` on ``latents``' device, with ``mu`` where the scheduler takes one, as diffusers'
    SD3 and Flux pipelines pass it: ``mu`` when given, else, for a scheduler with ``use_dynamic_shifting`` (e.g. a
    Flux-style ``FlowMatchEulerDiscreteScheduler`` config), ``dynamic_shift_mu`` of the image's token count
    (``image_seq_len``). Without dynamic shifting a given ``mu`` is ignored, as diffusers' scheduler ignores it.
    """
    kwargs = {}
    if mu is not None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float)):
            raise ValueError(f"mu must be a number (the dynamic-shifting exponent), got {mu!r}")
        if "mu" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(
                f"mu is for schedulers with use_dynamic_shifting (diffusers' FlowMatchEulerDiscreteScheduler); "
                f"{type(scheduler).__name__}.set_timesteps takes no mu"
            )
        kwargs["mu"] = float(mu)
    elif scheduler.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = dynamic_shift_mu(scheduler.config, image_seq_len(denoiser, latents))
    scheduler.set_timesteps(num_inference_steps, device=latents.device, **kwargs)


def step_kwargs(scheduler, generator, eta: float) -> dict[str, Any]:
    """
    ``eta`` and ``generator`` for schedulers whose ``step`` accepts them (as diffusers does), and
    ``use_clipped_model_output=True`` for DDIM: when x0 hat is clipped (``clip_sample`` / thresholding), the noise
    direction is then re-derived from the clipped x0, so x_{t-1} stays consistent with it. diffusers' pipelines keep
    the unclipped direction, which under classifier-free guidance (x0 hat far outside [-1, 1]) drives the sample to
    the opposite colours; with the flag, guidance helps instead (measured in ``tests/test_pipeline.py``).
    """
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "use_clipped_model_output" in params:
        kwargs["use_clipped_model_output"] = True
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def guided_model_output(
    denoiser,
    scheduler,
    latents: torch.Tensor,
    t: torch.Tensor,
    guidance_scale: float,
    keep_variance: bool,
    prev_latents: torch.Tensor | None,
    **conditioning,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    One denoiser evaluation at x_t with classifier-free guidance: (model output for ``scheduler.step``, RIN latents).

    Under guidance (``hfgen.guidance.guidance_enabled``) the denoiser sees [x_t; x_t] with ``conditioning`` already
    stacked as [cond; uncond] (``hfgen.guidance.stack_conditions``) and the output is combined by
    ``hfgen.guidance.guided_prediction``. The input goes through ``scheduler.scale_model_input`` where the scheduler
    has one (the flow-matching schedulers do not).

    :param latents: x_t (B, C, H, W).
    :param guidance_scale: s >= 1; 1 = one pass on the conditional inputs.
    :param keep_variance: pass the variance half of a learned-sigma output on (see ``keeps_variance``).
    :param prev_latents: RIN's latents of the previous step ((2B, N, D) under guidance), or None; denoisers without
        ``self_conditioning`` never get them and return None in their place.
    :param conditioning: keyword inputs of the denoiser ((2B or B) rows: ``class_labels`` or
        ``encoder_hidden_states`` and ``encoder_attention_mask``).
    :return: model output (B, C or 2C, H, W) and the latents to carry to the next step.
    """
    C = latents.shape[1]
    do_cfg = guidance_enabled(guidance_scale)

    # 1. one forward pass (RIN carries its latents from step to step)
    model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B or B, C, H, W)
    scale_model_input = getattr(scheduler, "scale_model_input", None)
    if scale_model_input is not None:
        model_input = scale_model_input(model_input, t)
    self_conditioning = getattr(denoiser, "self_conditioning", False)
    if prev_latents is not None and prev_latents.shape[0] > model_input.shape[0]:
        prev_latents = prev_latents[: model_input.shape[0]]  # guidance cut off: keep the conditional half's latents
    kwargs = {"prev_latents": prev_latents} if self_conditioning else {}
    out = denoiser(model_input.to(denoiser.dtype), t, **conditioning, **kwargs)
    new_prev_latents = out.latents if self_conditioning else None
    model_output = out.sample.to(latents.dtype)  # (2B or B, C or 2C, H, W)
    if model_output.shape[1] not in (C, 2 * C):
        raise ValueError(
            f"the denoiser returned {model_output.shape[1]} channels; expected {C} or {2 * C} (learned sigma)"
        )
    if keep_variance and model_output.shape[1] == C:
        raise ValueError(
            f"scheduler.config.variance_type={scheduler.config.variance_type!r} reads a learned variance, but the "
            f"denoiser returns {C} channels (no learned sigma); use variance_type 'fixed_small' or a learned-sigma "
            "denoiser"
        )

    # 2. guidance over all channels of the prediction; the variance half only where the scheduler reads it
    if do_cfg:
        model_output = guided_prediction(model_output, C, guidance_scale)  # (B, C or 2C, H, W)
    return (model_output if keep_variance else model_output[:, :C]), new_prev_latents


def pred_original_sample(scheduler, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """
    x_0 hat from the model output at x_t (B, C, H, W), for schedulers whose step does not return it: from the flow
    velocity at sigma = t / num_train_timesteps, or from ``scheduler.alphas_cumprod`` and ``config.prediction_type``
    (``hfgen.objectives.predicted_x0``).
    """
    pred = model_output[:, : sample.shape[1]]
    if is_flow_matching(scheduler):
        sigma = float(t) / scheduler.config.num_train_timesteps
        return objectives.x0_from_velocity(sample, pred, sigma)
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"{type(scheduler).__name__} returns no pred_original_sample and has no alphas_cumprod; "
            "drop 'pred_original_sample' from callback_on_step_end_tensor_inputs"
        )
    timestep = torch.tensor([int(t)])
    alpha, sigma = objectives.diffusion_coefficients(alphas_cumprod, timestep, sample.ndim)  # (1, 1, 1, 1) each
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    x0 = objectives.predicted_x0(pred, sample, alpha.to(sample.device), sigma.to(sample.device), prediction_type)
    return x0.to(sample.dtype)


def step_pred_original_sample(
    scheduler, step_output, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """x_0 hat of one step: the scheduler's ``step_output.pred_original_sample``, else ``pred_original_sample``."""
    x0 = getattr(step_output, "pred_original_sample", None)
    return x0 if x0 is not None else pred_original_sample(scheduler, model_output, t, sample)


# ----------------------------------------------------------------------------------------------------------------------
# The denoising loop of every pipeline
# ----------------------------------------------------------------------------------------------------------------------


def denoising_loop(
    pipe,
    latents: torch.Tensor,
    num_inference_steps: int,
    conditioning: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    generator=None,
    eta: float = 0.0,
    callback_on_step_end: Callable | None = None,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """
    Sample x_0 from the noise x_T with ``pipe.denoiser`` and ``pipe.scheduler``: set the schedule, then per step one
    guided model output (``guided_model_output``), ``scheduler.step`` and the callback. Returns x_0 (B, C, H, W).

    The guidance scale is ``pipe.guidance_scale``, read at every step as diffusers' loops read it, so a callback
    may lower it (e.g. set ``pipe._guidance_scale = 1.0``: guidance cut off for the remaining steps, one pass each);
    a callback that sets ``pipe._interrupt = True`` skips the remaining steps.

    :param latents: x_T (B, C, H, W), unscaled (multiplied by the scheduler's ``init_noise_sigma`` here).
    :param conditioning: ``tensors`` -> the denoiser's keyword inputs for one pass ([cond; uncond] under guidance,
        following ``pipe.do_classifier_free_guidance``), called every step, so a callback that replaces a tensor
        (e.g. "prompt_embeds") or the guidance scale changes the next step.
    :param tensors: the pipeline's tensors a callback may read and replace, besides "latents" and
        "pred_original_sample" (x_0 hat of the step); a returned dict replaces those of its keys that are known.
    :param mu: for a scheduler with dynamic shifting; default: from the image's token count (``set_timesteps``).
    """
    scheduler, names = pipe.scheduler, callback_on_step_end_tensor_inputs or []
    set_timesteps(scheduler, num_inference_steps, latents, pipe.denoiser, mu)
    timesteps = scheduler.timesteps
    pipe._num_timesteps = len(timesteps)
    pipe._interrupt = False
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # sigma_max for Euler-type schedulers
    extra_step_kwargs = step_kwargs(scheduler, generator, eta)
    keep_variance = keeps_variance(scheduler)
    tensors = dict(tensors or {})

    prev_latents = None
    for i, t in enumerate(pipe.progress_bar(timesteps)):
        if pipe._interrupt:  # set by a callback: skip the remaining steps, as diffusers does
            continue
        model_output, prev_latents = guided_model_output(
            pipe.denoiser,
            scheduler,
            latents,
            t,
            pipe.guidance_scale,
            keep_variance,
            prev_latents,
            **conditioning(tensors),
        )
        step = scheduler.step(model_output, t, latents, **extra_step_kwargs)
        if callback_on_step_end is not None:
            tensors["latents"] = step.prev_sample
            if "pred_original_sample" in names:
                tensors["pred_original_sample"] = step_pred_original_sample(scheduler, step, model_output, t, latents)
            outputs = callback_on_step_end(pipe, i, t, {k: tensors[k] for k in names}) or {}
            tensors.update({k: v for k, v in outputs.items() if k in tensors})
            latents = tensors["latents"]
        else:
            latents = step.prev_sample
    return latents


# ----------------------------------------------------------------------------------------------------------------------
# Images in (inversion, reconstruction), decode and post-process
# ----------------------------------------------------------------------------------------------------------------------

ImageInput = PIL.Image.Image | list | np.ndarray | torch.Tensor


def images_to_tensor(images: ImageInput, channels: int) -> torch.Tensor:
    """
    Images as diffusers users hold them -> float tensor (B, ``channels``, H, W) in [-1, 1]:

    - PIL image(s), converted to "L" or "RGB" by ``channels``;
    - a numpy array (B, H, W[, C]) or (H, W[, C]): uint8 in [0, 255], or float in [0, 1] (``output_type="np"``);
    - a tensor (B, C, H, W) or (C, H, W): uint8 in [0, 255] (``torchvision.io.read_image``), or float in [-1, 1]
      (not range-checked: latents from ``output_type="latent"`` pass through here too).
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, list):
        if not images or not all(isinstance(im, PIL.Image.Image) for im in images):
            raise ValueError("images given as a list must be a non-empty list of PIL images")
        mode = "L" if channels == 1 else "RGB"
        images = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in images])
    if isinstance(images, np.ndarray):
        x = numpy_images_to_tensor(images, channels)
    elif isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4:
            raise ValueError(f"image tensors must have shape (B, C, H, W) or (C, H, W), got {tuple(images.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        elif not x.is_floating_point():
            raise ValueError(f"image tensors must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")
    else:
        raise TypeError(f"images must be PIL images, a numpy array or a tensor, got {type(images).__name__}")
    if x.shape[1] != channels:
        raise ValueError(
            f"images must have {channels} channels (the model's in_channels), got shape {tuple(x.shape)} read as "
            "(B, C, H, W)"
        )
    return x.float()


def numpy_images_to_tensor(images: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] array (B, H, W[, C]) / (H, W[, C]) -> float tensor (B, C, H, W) in [-1, 1]."""
    if images.dtype == np.uint8:
        x = torch.from_numpy(images.copy()).float() / 127.5 - 1.0
    elif np.issubdtype(images.dtype, np.floating):
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float numpy images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        x = torch.from_numpy(images.astype(np.float32)) * 2 - 1
    else:
        raise ValueError(f"numpy images must be uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}")
    if x.ndim == 2 or (x.ndim == 3 and channels == 1 and x.shape[-1] != 1):
        x = x[..., None]  # (..., H, W, 1)
    x = x[None] if x.ndim == 3 else x  # (B, H, W, C)
    if x.ndim != 4:
        raise ValueError(f"numpy images must have shape (B, H, W[, C]) or (H, W[, C]), got {images.shape}")
    return x.permute(0, 3, 1, 2)  # (B, C, H, W)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """x_0 as the denoiser sees it -> float images (B, C', H', W') in [-1, 1]: VAE decode of z / scaling_factor."""
    if vae is None:
        return latents
    scaling = vae.config.scaling_factor
    return vae.decode((latents / scaling).to(vae.dtype)).sample.float()  # (B, 3, H', W')


def postprocess_images(images: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
    """
    Images (B, C, H, W) in [-1, 1] -> [0, 1] as "pt" (B, C, H, W), "np" (B, H, W, C) or "pil" (a list of images).
    """
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    images = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    if output_type == "pil":
        return DiffusionPipeline.numpy_to_pil(images)
    return images


def image_output(images, return_dict: bool) -> ImagePipelineOutput | tuple:
    """``ImagePipelineOutput(images)``, or ``(images,)`` when not ``return_dict`` (as every diffusers pipeline)."""
    if not return_dict:
        return (images,)
    return ImagePipelineOutput(images=images)
