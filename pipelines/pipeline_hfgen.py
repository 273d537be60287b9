"""``HFGenPipeline``: sample images from any hfgen denoiser (UNetModel, DiTModel, RINModel) with any hfgen or
diffusers scheduler, optionally in the latent space of a VAE, with classifier-free guidance for class labels; and the
reverse, DDIM inversion of images to the noise that regenerates them.

Paper symbols: x_t = ``latents`` (B, C, H, W), x_0 hat = ``pred_original_sample``, s = ``guidance_scale``,
alpha_bar_t = ``scheduler.alphas_cumprod[t]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput

from hfgen.guidance import (
    CLASS_GUIDANCE_SCALE,
    check_guidance_scale,
    guidance_enabled,
    null_class_labels,
    stack_conditions,
)
from hfgen.schedulers import DDIMScheduler as HFGenDDIMScheduler

from .denoising import (
    ImageInput,
    SamplingProperties,
    callback_tensor_inputs,
    check_callback_tensor_inputs,
    check_generator_list,
    check_num_inference_steps,
    check_output_type,
    check_positive_int,
    decode_latents,
    denoising_loop,
    draw_noise,
    guided_model_output,
    image_output,
    images_to_tensor,
    is_flow_matching,
    postprocess_images,
    pred_original_sample,
    set_timesteps,
    vae_scale_factor,
)
from .hub import HFGenHubMixin


class HFGenPipeline(SamplingProperties, HFGenHubMixin, DiffusionPipeline):
    """
    :param denoiser: an hfgen denoiser; reads ``config.in_channels``, ``sample_size``, ``num_classes``.
        Its output has ``in_channels`` channels, or ``2 * in_channels`` (DiT ``learn_sigma``: prediction, variance).
    :param scheduler: an hfgen or diffusers scheduler (``set_timesteps``, ``step``, and ``scale_model_input`` where
        it has one): DDPM / DDIM / any diffusers diffusion scheduler for a diffusion denoiser,
        ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` for a flow-matching one.
    :param vae: optional autoencoder; then the denoiser works on latents z = vae latents * ``scaling_factor``.
    """

    default_guidance_scale = CLASS_GUIDANCE_SCALE  # with class_labels (hfgen.guidance); 1 without
    model_cpu_offload_seq = "denoiser->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self, denoiser, scheduler, vae=None):
        super().__init__()
        if vae is not None and vae.config.latent_channels != denoiser.config.in_channels:
            raise ValueError(
                f"vae.config.latent_channels ({vae.config.latent_channels}) must equal the denoiser's "
                f"config.in_channels ({denoiser.config.in_channels})"
            )
        self.register_modules(denoiser=denoiser, scheduler=scheduler, vae=vae)

    # --- properties (guidance_scale, num_timesteps, interrupt: SamplingProperties, as in diffusers) ------------------

    @property
    def image_channels(self) -> int:
        """Channels of the images the pipeline returns and ``invert`` takes: the VAE's, else the denoiser's."""
        return (self.vae if self.vae is not None else self.denoiser).config.in_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x_t, from the denoiser's config."""
        cfg = self.denoiser.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def image_size(self) -> int:
        """Side of the output images: the denoiser's sample_size, times the VAE's downsampling 2**(levels - 1)."""
        return self.denoiser.config.sample_size * vae_scale_factor(self.vae)

    # --- helpers shared by __call__ and invert --------------------------------------------------------------------

    def check_inputs(
        self,
        batch_size: int,
        num_inference_steps: int,
        generator,
        latents: torch.Tensor | None,
        class_labels,
        guidance_scale: float | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> tuple[torch.Tensor | None, float]:
        """Raise on bad arguments; return (labels (B,) long or None, guidance scale with its default filled in)."""
        check_positive_int("batch_size", batch_size)
        check_num_inference_steps(num_inference_steps)
        check_generator_list(generator, batch_size)
        check_output_type(output_type)
        check_callback_tensor_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        expected = (batch_size, *self.latent_shape)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"latents must have shape {expected} (batch_size, C, H, W), got {tuple(latents.shape)}")

        labels = self._check_class_labels(class_labels, batch_size)
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale if labels is not None else 1.0
        check_guidance_scale(guidance_scale)
        if guidance_enabled(guidance_scale) and labels is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs class_labels and a class-conditional denoiser "
                f"(config.num_classes={self.denoiser.config.num_classes}); use guidance_scale=1 without labels"
            )
        return labels, float(guidance_scale)

    @staticmethod
    def _default_batch_size(class_labels, generator, latents) -> int:
        """The batch a call implies when ``batch_size`` is not given: one image per label, per generator or per row
        of ``latents``, else 1."""
        num_labels = 0 if class_labels is None else torch.as_tensor(class_labels).numel()
        if num_labels > 1:
            return num_labels
        if isinstance(generator, list):
            return len(generator)
        return 1 if latents is None else len(latents)

    def _check_class_labels(self, class_labels, batch_size: int) -> torch.Tensor | None:
        """int, list or tensor -> (B,) long in [0, num_classes), or None."""
        if class_labels is None:
            return None
        num_classes = self.denoiser.config.num_classes
        if num_classes is None:
            raise ValueError(
                f"class_labels were given ({class_labels!r}) but the denoiser is unconditional (config.num_classes is None)"
            )
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be integers, got dtype {labels.dtype}")
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(
                f"class_labels must be one int or {batch_size} labels (batch_size), got {labels.numel()} labels"
            )
        if (labels < 0).any() or (labels >= num_classes).any():
            raise ValueError(
                f"class_labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), got {labels}"
            )
        return labels.long()

    def _conditioning(self, labels: torch.Tensor | None, batch_size: int, guidance_scale: float, device) -> dict:
        """The denoiser's label input for one pass: [cond; null] (2B,) under guidance, the labels alone without it,
        nothing without labels (a class-conditional denoiser then takes the null label itself, as in training)."""
        if labels is None:  # check_inputs refuses guidance without labels
            return {}
        num_classes = self.denoiser.config.num_classes
        cond = {"class_labels": labels.to(device)}
        if guidance_enabled(guidance_scale):
            cond = stack_conditions(cond, {"class_labels": null_class_labels(batch_size, num_classes, device)})
        return cond

    def _pred_original_sample(self, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x_0 hat from the model output at x_t for schedulers whose step does not return it."""
        return pred_original_sample(self.scheduler, model_output, t, sample)

    # --- sampling -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        mu: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """
        Sample ``batch_size`` images.

        :param batch_size: the number of images; default: as many as ``class_labels`` (as diffusers' DiTPipeline),
            else as ``generator`` or ``latents`` give, else 1.
        :param generator: one generator, or one per image (image i then depends on generator i only).
        :param latents: the starting noise x_T (B, C, H, W), unscaled; drawn from ``generator`` when None.
        :param class_labels: one int or one per image, for a class-conditional denoiser.
        :param guidance_scale: classifier-free guidance s >= 1; 1 = one conditional pass. Default:
            ``default_guidance_scale`` (3.0, ``hfgen.guidance.CLASS_GUIDANCE_SCALE``) when ``class_labels`` are given,
            else 1.0.
        :param eta: DDIM noise (passed only to schedulers whose ``step`` takes it).
        :param output_type: "pil", "np" ((B, H, W, C) in [0, 1]), "pt" ((B, C, H, W) in [0, 1]) or "latent" (x_0 as
            the denoiser sees it: VAE latents times scaling_factor, or the [-1, 1] image without a VAE).
        :param callback_on_step_end: ``fn(pipe, i, t, callback_kwargs)`` after each step; ``callback_kwargs`` holds the
            names of ``callback_on_step_end_tensor_inputs``: "latents" (x_{t'} after the step) and
            "pred_original_sample" (x_0 hat). A returned dict with "latents" replaces x_{t'}. A diffusers
            ``PipelineCallback`` brings its own ``tensor_inputs``; setting ``pipe._interrupt = True`` skips the
            remaining steps.
        :param mu: the exponent of a scheduler with ``use_dynamic_shifting`` (as in diffusers' SD3 pipeline);
            default: diffusers' ``calculate_shift`` of the image's token count (``denoising.set_timesteps``).
        """
        # 1. check inputs
        callback_on_step_end_tensor_inputs = callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        if batch_size is None:
            batch_size = self._default_batch_size(class_labels, generator, latents)
        labels, guidance_scale = self.check_inputs(
            batch_size,
            num_inference_steps,
            generator,
            latents,
            class_labels,
            guidance_scale,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        device = self._execution_device

        # 2. noise x_T: drawn on the generator's device (CPU by default) in float32, one draw per generator
        if latents is None:
            latents = draw_noise((batch_size, *self.latent_shape), generator)
        latents = latents.to(device=device, dtype=torch.float32)

        # 3. the label input of each step, then the denoising loop (model, guidance, scheduler.step, callback)
        latents = denoising_loop(
            self,
            latents,
            num_inference_steps,
            lambda _: self._conditioning(labels, batch_size, self.guidance_scale, device),
            generator,
            eta,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            mu=mu,
        )

        # 4. decode latents to images in [-1, 1], post-process to [0, 1] and the requested type
        images = latents
        if output_type != "latent":
            images = postprocess_images(decode_latents(self.vae, latents), output_type)

        self.maybe_free_model_hooks()
        return image_output(images, return_dict)

    # --- inversion ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def invert(
        self,
        images: ImageInput,
        num_inference_steps: int = 50,
        class_labels: int | list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        mu: float | None = None,
    ) -> torch.Tensor:
        """
        DDIM inversion: the noise x_T (B, C, H, W) that ``self(latents=x_T, num_inference_steps=...)`` with a DDIM
        scheduler (eta = 0, clip_sample off), or with a flow-matching Euler scheduler, maps back to ``images``.

        Diffusion: the pipeline's scheduler when it is hfgen's DDIMScheduler, else an hfgen DDIMScheduler built from
        its config. Flow matching (a ``FlowMatch*`` scheduler): the Euler ODE run backwards on the sigmas of a
        ``FlowMatchEulerDiscreteScheduler`` with the scheduler's config. Inversion is exact only up to the change of
        the model output between neighbouring steps: more steps, smaller error.

        :param images: (B, C, H, W) tensor in [-1, 1] (or uint8 in [0, 255]), PIL image(s), or a (B, H, W, C)
            array in [0, 1] (or uint8); see ``hfgen.pipelines.denoising.images_to_tensor``.
        :param mu: as in ``__call__``, for a flow-matching scheduler with ``use_dynamic_shifting``; pass the same
            value to both (the default is the same for both).
        """
        images = images_to_tensor(images, self.image_channels)
        batch_size = images.shape[0]
        labels, guidance_scale = self.check_inputs(
            batch_size, num_inference_steps, None, None, class_labels, guidance_scale, "pt", []
        )
        device = self._execution_device

        # 1. images -> x_0 as the denoiser sees it
        x = images.to(device)
        if self.vae is not None:
            x = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode().float() * self.vae.config.scaling_factor
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"images must encode to {self.latent_shape} (C, H, W) for this denoiser, got {tuple(x.shape[1:])}; "
                f"images are {self.image_size}x{self.image_size}"
            )

        # 2. the sampler's schedule walked from data to noise: DDIM's invert_step, or the flow ODE's Euler steps
        cond = self._conditioning(labels, batch_size, guidance_scale, device)
        invert = self._invert_flow if is_flow_matching(self.scheduler) else self._invert_ddim
        x = invert(x, num_inference_steps, guidance_scale, cond, mu)
        self.maybe_free_model_hooks()
        return x

    def _invert_ddim(self, x: torch.Tensor, num_inference_steps: int, guidance_scale: float, cond: dict, mu=None):
        """x_0 -> x_T along DDIM's schedule (``DDIMScheduler.invert_step``)."""
        scheduler = self.scheduler
        if not isinstance(scheduler, HFGenDDIMScheduler):
            scheduler = HFGenDDIMScheduler.from_config(scheduler.config)
        set_timesteps(scheduler, num_inference_steps, x, self.denoiser, mu)
        prev_latents = None
        for t in self.progress_bar(scheduler.inversion_timesteps):
            model_output, prev_latents = guided_model_output(
                self.denoiser, scheduler, x, t, guidance_scale, False, prev_latents, **cond
            )  # invert_step takes the prediction only
            x = scheduler.invert_step(model_output, t, x).next_sample
        return x

    def _invert_flow(self, x: torch.Tensor, num_inference_steps: int, guidance_scale: float, cond: dict, mu=None):
        """x_0 -> x_1 along the flow ODE dx/dsigma = u, Euler steps up the sampler's sigmas (0 -> sigma_max), the
        velocity read at the level each step goes to (as DDIM inversion reads eps), so that the Euler sampler with
        the same steps maps the result back to x_0 up to the change of u between neighbouring steps."""
        scheduler = self.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        set_timesteps(scheduler, num_inference_steps, x, self.denoiser, mu)
        sigmas = scheduler.sigmas.flip(0).tolist()  # increasing: 0 (data), ..., sigma_max
        T = scheduler.config.num_train_timesteps
        prev_latents = None
        for sigma, sigma_next in self.progress_bar(list(zip(sigmas[:-1], sigmas[1:]))):
            t = torch.tensor(sigma_next * T, device=x.device)
            u, prev_latents = guided_model_output(
                self.denoiser, scheduler, x, t, guidance_scale, False, prev_latents, **cond
            )
            x = x + (sigma_next - sigma) * u
        return x

    # --- model card -------------------------------------------------------------------------------------------------

    def _card_tags(self) -> tuple[list[str], str | None]:
        tags = [type(self.denoiser).__name__.lower()]
        if self.vae is not None:
            tags.append("latent-diffusion")
        if self.denoiser.config.num_classes is not None:
            return ["class-conditional-image-generation", *tags], None
        return ["unconditional-image-generation", *tags], "unconditional-image-generation"

    def _card_usage(self, repo_id: str) -> str:
        call = "pipe(batch_size=4, num_inference_steps=50"
        if self.denoiser.config.num_classes is not None:
            call += f", class_labels=[0, 1, 2, 3], guidance_scale={self.default_guidance_scale}"
        return (
            "from hfgen import HFGenPipeline\n\n"
            f'pipe = HFGenPipeline.from_pretrained("{repo_id}")\n'
            f"images = {call}).images"
        )

    def _card_samples(self, num_images: int) -> list[PIL.Image.Image]:
        generator = torch.Generator().manual_seed(0)
        num_classes = self.denoiser.config.num_classes
        labels = None if num_classes is None else [i % num_classes for i in range(num_images)]
        return self(batch_size=num_images, generator=generator, class_labels=labels, output_type="pil").images
