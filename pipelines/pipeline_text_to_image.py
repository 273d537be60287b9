"""``HFGenTextToImagePipeline``: text-to-image sampling with any hfgen denoiser that reads text tokens (UNetModel with
cross-attention, DiTModel with pooled-text adaLN and optional cross-attention, RINModel), a CLIP text encoder from
transformers (pretrained from the Hub, trained by ``training/train_clip.py``, or random for tests) and its tokenizer,
with classifier-free guidance against the empty-prompt embedding, optionally in the latent space of a VAE.

Paper symbols: x_t = ``latents`` (B, C, H, W), c = ``prompt_embeds`` (B, L, D) with mask (B, L),
c_null = the embedding of "" (or of ``negative_prompt``), s = ``guidance_scale``,
eps_hat = eps(x_t, c_null) + s (eps(x_t, c) - eps(x_t, c_null)) (Ho & Salimans 2022, eq. 6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from hfgen.clip import tokenize
from hfgen.guidance import NULL_CAPTION, TEXT_GUIDANCE_SCALE, check_guidance_scale, stack_conditions

from .denoising import (
    SamplingProperties,
    callback_tensor_inputs,
    check_callback_tensor_inputs,
    check_num_inference_steps,
    check_output_type,
    check_positive_int,
    decode_latents,
    denoising_loop,
    draw_noise,
    image_output,
    postprocess_images,
    vae_scale_factor,
)
from .hub import HFGenHubMixin


def check_attention_masks(
    prompt_embeds: torch.Tensor | None,
    prompt_attention_mask: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    negative_prompt_attention_mask: torch.Tensor | None,
) -> None:
    """Given embeddings (B, L, D) come with their masks (B, L), as PixArt requires: the prompt path masks padding."""
    for name, embeds, mask in (
        ("prompt", prompt_embeds, prompt_attention_mask),
        ("negative_prompt", negative_prompt_embeds, negative_prompt_attention_mask),
    ):
        if embeds is not None and mask is None:
            raise ValueError(f"{name}_embeds need {name}_attention_mask (B, L), as returned by encode_prompt")
        if mask is not None and (embeds is None or tuple(mask.shape) != tuple(embeds.shape[:2])):
            raise ValueError(f"{name}_attention_mask needs {name}_embeds and must have their shape (B, L)")


class HFGenTextToImagePipeline(SamplingProperties, HFGenHubMixin, DiffusionPipeline):
    """
    :param denoiser: an hfgen denoiser with ``config.cross_attention_dim`` equal to the text encoder's hidden size
        (or None, with ``scheduler=None``, for a pipeline that only runs ``encode_prompt``, as in diffusers);
        reads ``config.in_channels``, ``sample_size`` and ``downsample_factor``. Its output has ``in_channels``
        channels, or ``2 * in_channels`` (DiT ``learn_sigma``: prediction, variance).
    :param scheduler: an hfgen or diffusers scheduler (``set_timesteps``, ``step``, and ``scale_model_input`` where
        it has one), diffusion or flow matching (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``).
    :param text_encoder: a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection``; its
        ``last_hidden_state`` (B, L, D) is the denoiser's ``encoder_hidden_states``.
    :param tokenizer: the text encoder's ``CLIPTokenizer``; its attention mask is the ``encoder_attention_mask``.
    :param vae: optional autoencoder; then the denoiser works on latents z = vae latents * ``scaling_factor``.
    """

    default_guidance_scale = TEXT_GUIDANCE_SCALE  # hfgen.guidance
    model_cpu_offload_seq = "text_encoder->denoiser->vae"
    _optional_components: ClassVar[list[str]] = ["vae"]
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents",
        "pred_original_sample",
        "prompt_embeds",
        "negative_prompt_embeds",
    ]

    def __init__(self, denoiser, scheduler, text_encoder, tokenizer, vae=None):
        super().__init__()
        text_dim = text_encoder.config.hidden_size
        if denoiser is not None and denoiser.config.cross_attention_dim != text_dim:
            raise ValueError(
                f"denoiser.config.cross_attention_dim ({denoiser.config.cross_attention_dim}) must equal the text "
                f"encoder's hidden_size ({text_dim})"
            )
        if vae is not None and denoiser is not None and vae.config.latent_channels != denoiser.config.in_channels:
            raise ValueError(
                f"vae.config.latent_channels ({vae.config.latent_channels}) must equal the denoiser's "
                f"config.in_channels ({denoiser.config.in_channels})"
            )
        self.register_modules(
            denoiser=denoiser, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae
        )

    # --- properties (guidance_scale, num_timesteps, interrupt: SamplingProperties, as in diffusers) ------------------

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2**(levels - 1) of the VAE, 1 without one."""
        return vae_scale_factor(self.vae)

    @property
    def max_text_length(self) -> int:
        """Tokens per prompt: the tokenizer's model_max_length, at most the text encoder's positions."""
        return min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)

    # --- text ---------------------------------------------------------------------------------------------------

    def _encode_text(self, texts: list[str], device, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize (padded to ``max_length``) and encode: (last_hidden_state (B, L, D), attention mask (B, L))."""
        batch = tokenize(self.tokenizer, texts, max_length)
        input_ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        return hidden, mask

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """
        Text embeddings for the denoiser and their masks, repeated ``num_images_per_prompt`` times, as in diffusers'
        PixArt: ``(prompt_embeds (B * n, L, D), prompt_attention_mask (B * n, L), negative_prompt_embeds
        (B * n, L, D), negative_prompt_attention_mask (B * n, L))``, mask 1 = real token, 0 = padding; the negative
        pair is None without guidance. Given embeddings need their masks (B, L).

        The unconditional input is the embedding of "" (or of ``negative_prompt``), padded like the prompt, as in
        training with condition dropout.
        """
        check_attention_masks(
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask
        )

        # 1. the prompt
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode_text(prompts, device, self.max_text_length)
        B, L = prompt_embeds.shape[:2]

        # 2. the unconditional / negative prompt, padded to the prompt's length
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = [NULL_CAPTION] * B if negative_prompt is None else negative_prompt
            negatives = [negatives] * B if isinstance(negatives, str) else list(negatives)
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(negatives, device, L)
        if not do_classifier_free_guidance:
            negative_prompt_embeds, negative_prompt_attention_mask = None, None

        # 3. one copy per image: (B, ...) -> (B * n, ...), grouped by prompt
        def repeat(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        return (
            repeat(prompt_embeds),
            repeat(prompt_attention_mask),
            repeat(negative_prompt_embeds),
            repeat(negative_prompt_attention_mask),
        )

    # --- checks ---------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        num_images_per_prompt: int,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        generator=None,
        output_type: str = "pil",
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> int:
        """Raise a short, specific error on a bad argument; return the number of prompts B."""
        batch_size = self._check_prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        check_attention_masks(
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask
        )
        check_num_inference_steps(num_inference_steps)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_guidance_scale(guidance_scale)
        self._check_size(height, width)
        num_images = batch_size * num_images_per_prompt
        expected = (num_images, self.denoiser.config.in_channels, *self._latent_size(height, width))
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(
                f"latents must have shape {expected} (B * num_images_per_prompt, C, H, W), got {tuple(latents.shape)}"
            )
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"generator is a list of {len(generator)} generators, but {num_images} images are asked for "
                f"({batch_size} prompts x {num_images_per_prompt}): pass one per image or a single generator"
            )
        check_output_type(output_type)
        check_callback_tensor_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        return batch_size

    def _check_prompts(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds) -> int:
        """Prompts xor embeddings, and a negative prompt that matches them; returns the number of prompts B."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass prompt (a string or a list of strings) or prompt_embeds (B, L, D); got neither")
        if prompt is not None:
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
                raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
            if isinstance(prompt, list) and len(prompt) == 0:
                raise ValueError("prompt must not be an empty list")
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            D = self.text_encoder.config.hidden_size
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != D:
                raise ValueError(f"prompt_embeds must have shape (B, L, {D}), got {tuple(prompt_embeds.shape)}")
            batch_size = prompt_embeds.shape[0]

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but there are {batch_size} prompts: "
                "pass one string or one per prompt"
            )
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise TypeError(
                f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}"
            )
        if negative_prompt_embeds is not None and (
            prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape
        ):
            raise ValueError(
                "negative_prompt_embeds need prompt_embeds of the same shape, got "
                f"{tuple(negative_prompt_embeds.shape)} and "
                f"{None if prompt_embeds is None else tuple(prompt_embeds.shape)}"
            )
        return batch_size

    def _check_size(self, height: int, width: int) -> None:
        """Positive multiples of the denoiser's downsample factor times the VAE's."""
        check_positive_int("height", height)
        check_positive_int("width", width)
        f = self.denoiser.downsample_factor * self.vae_scale_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(
                f"height and width must be positive multiples of {f} (the denoiser's downsample_factor "
                f"{self.denoiser.downsample_factor} x the VAE's {self.vae_scale_factor}), got {height}x{width}"
            )

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def _text_conditioning(self, prompt_attention_mask, negative_prompt_attention_mask) -> Callable[[dict], dict]:
        """The denoiser's text input for one pass, rebuilt each step from the embeddings in ``tensors`` (which a
        callback may replace): c (B*n, L, D) with its mask, or [c; c_null] (2B*n, ...) under guidance."""

        def conditioning(tensors: dict) -> dict:
            cond = {"encoder_hidden_states": tensors["prompt_embeds"], "encoder_attention_mask": prompt_attention_mask}
            if self.do_classifier_free_guidance:
                uncond = {
                    "encoder_hidden_states": tensors["negative_prompt_embeds"],
                    "encoder_attention_mask": negative_prompt_attention_mask,
                }
                cond = stack_conditions(cond, uncond)
            cond["encoder_hidden_states"] = cond["encoder_hidden_states"].to(self.denoiser.dtype)
            return cond

        return conditioning

    # --- sampling -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        mu: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """
        Sample ``num_images_per_prompt`` images for each prompt.

        :param prompt: a string or a list of strings; or pass ``prompt_embeds`` (B, L, D) instead.
        :param negative_prompt: one string or one per prompt; replaces "" as the unconditional input of guidance.
        :param prompt_embeds: text embeddings (B, L, D) from ``encode_prompt``, in place of ``prompt``; needs
            ``prompt_attention_mask`` (B, L) (1 = real token, 0 = padding), so that they give the prompt's images.
        :param negative_prompt_embeds: (B, L, D) in place of ``negative_prompt``, with
            ``negative_prompt_attention_mask`` (B, L); without them the unconditional input is "" padded to L.
        :param height: image height in pixels; default: the denoiser's sample_size times the VAE factor. Must be a
            multiple of the denoiser's downsample_factor times the VAE factor (RIN: exactly its sample_size).
        :param guidance_scale: classifier-free guidance s >= 1; 1 = one conditional pass per step. Default:
            ``default_guidance_scale`` (3.0, ``hfgen.guidance.TEXT_GUIDANCE_SCALE``).
        :param generator: one generator, or one per image (image i then depends on generator i only).
        :param latents: the starting noise x_T (B * num_images_per_prompt, C, H, W), unscaled.
        :param eta: DDIM noise (passed only to schedulers whose ``step`` takes it).
        :param output_type: "pil", "np" ((B, H, W, C) in [0, 1]), "pt" ((B, C, H, W) in [0, 1]) or "latent".
        :param callback_on_step_end: ``fn(pipe, i, t, callback_kwargs)`` after each step with the tensors named in
            ``callback_on_step_end_tensor_inputs`` ("latents", "pred_original_sample" (x_0 hat, from
            ``alphas_cumprod`` for schedulers whose step does not return it), "prompt_embeds",
            "negative_prompt_embeds"); a returned dict with "latents" / "prompt_embeds" /
            "negative_prompt_embeds" replaces them. A diffusers ``PipelineCallback`` brings its own
            ``tensor_inputs``; setting ``pipe._interrupt = True`` skips the remaining steps.
        :param mu: the exponent of a scheduler with ``use_dynamic_shifting`` (as in diffusers' SD3 pipeline);
            default: diffusers' ``calculate_shift`` of the image's token count (``denoising.set_timesteps``).
        """
        # 1. check inputs
        if self.denoiser is None or self.scheduler is None:
            raise ValueError(
                "this HFGenTextToImagePipeline has no denoiser or scheduler (built for encode_prompt only); "
                "pass both to sample"
            )
        callback_on_step_end_tensor_inputs = callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        default_size = self.denoiser.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        batch_size = self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            latents,
            generator,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = float(guidance_scale)
        device = self._execution_device
        num_images = batch_size * num_images_per_prompt

        # 2. text: c (B*n, L, D) and, under guidance, c_null (B*n, L, D), with their masks (B*n, L)
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
                prompt_attention_mask,
                negative_prompt_attention_mask,
            )
        )

        # 3. noise x_T: drawn on the generator's device (CPU by default) in float32, one draw per generator
        shape = (num_images, self.denoiser.config.in_channels, *self._latent_size(height, width))
        if latents is None:
            latents = draw_noise(shape, generator)
        latents = latents.to(device=device, dtype=torch.float32)

        # 4. the denoising loop (model, guidance, scheduler.step, callback)
        latents = denoising_loop(
            self,
            latents,
            num_inference_steps,
            self._text_conditioning(prompt_attention_mask, negative_prompt_attention_mask),
            generator,
            eta,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            tensors={"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds},
            mu=mu,
        )

        # 5. decode latents to images in [-1, 1], post-process to [0, 1] and the requested type
        images = latents
        if output_type != "latent":
            images = postprocess_images(decode_latents(self.vae, latents), output_type)

        self.maybe_free_model_hooks()
        return image_output(images, return_dict)

    # --- model card -------------------------------------------------------------------------------------------------

    def _card_tags(self) -> tuple[list[str], str | None]:
        tags = ["text-to-image", type(self.denoiser).__name__.lower(), type(self.text_encoder).__name__.lower()]
        if self.vae is not None:
            tags.append("latent-diffusion")
        return tags, "text-to-image"

    def _card_usage(self, repo_id: str) -> str:
        return (
            "from hfgen import HFGenTextToImagePipeline\n\n"
            f'pipe = HFGenTextToImagePipeline.from_pretrained("{repo_id}")\n'
            f'images = pipe(["a red circle", "a blue square"], num_inference_steps=50, '
            f"guidance_scale={self.default_guidance_scale}).images"
        )

    def _card_samples(self, num_images: int) -> list[PIL.Image.Image]:
        from hfgen.data import SHAPE_PAIRS

        pairs = [SHAPE_PAIRS[5 * i % len(SHAPE_PAIRS)] for i in range(num_images)]  # varied colours and shapes
        prompts = [f"a {color} {shape}" for color, shape in pairs]
        generator = torch.Generator().manual_seed(0)
        return self(prompts, generator=generator, output_type="pil").images
