"""
``HFGenVAEPipeline(vae)``: sample images from a VAE's prior N(0, I), reconstruct images, interpolate between two
images in latent space. Works with hfgen's ``VAEModel`` / ``AutoencoderModel`` and with diffusers' ``AutoencoderKL``
(anything with ``encode(x).latent_dist``, ``decode(z).sample`` and config ``latent_channels``, ``block_out_channels``,
``in_channels``, ``sample_size``).

Images are in [-1, 1] inside the pipeline. ``output_type`` "pil" / "np" / "pt" post-processes to [0, 1];
"latent" returns the VAE's own (unscaled) latents z (B, latent_channels, H/f, W/f) without decoding.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from .denoising import (
    ImageInput,
    check_generator_list,
    check_output_type,
    check_positive_int,
    draw_noise,
    image_output,
    images_to_tensor,
    vae_scale_factor,
)
from .hub import HFGenHubMixin

INTERPOLATION_METHODS = ("linear", "slerp")


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """
    Spherical interpolation between a and b (1, ...) at weights t (T,) -> (T, ...); falls back to linear
    interpolation when a and b are (nearly) parallel.
    """
    a_flat, b_flat = a.flatten(1).float(), b.flatten(1).float()  # (1, N)
    cos = (a_flat * b_flat).sum(1) / (a_flat.norm(dim=1) * b_flat.norm(dim=1)).clamp(min=1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))  # (1,)
    t = t.float()[:, None]  # (T, 1)
    if omega.item() < 1e-4:
        out = (1 - t) * a_flat + t * b_flat
    else:
        out = (torch.sin((1 - t) * omega) * a_flat + torch.sin(t * omega) * b_flat) / torch.sin(omega)  # (T, N)
    return out.view(-1, *a.shape[1:]).to(a.dtype)


class HFGenVAEPipeline(HFGenHubMixin, DiffusionPipeline):
    """
    Sample, reconstruct and interpolate with an autoencoder.

    :param vae: an hfgen ``VAEModel`` / ``AutoencoderModel`` or a diffusers ``AutoencoderKL``.
    """

    model_cpu_offload_seq = "vae"

    def __init__(self, vae):
        super().__init__()
        self.register_modules(vae=vae)
        f = vae_scale_factor(self.vae)
        self.vae_scale_factor = f
        self.image_processor = VaeImageProcessor(vae_scale_factor=f, do_resize=False)

    def _card_tags(self) -> tuple[list[str], str | None]:
        return ["vae", "autoencoder", "unconditional-image-generation"], "unconditional-image-generation"

    def _postprocess(self, z: torch.Tensor, output_type: str, return_dict: bool):
        if output_type == "latent":
            images = z
        else:
            images = self.vae.decode(z).sample.clamp(-1, 1)  # (B, C, H, W)
            images = self.image_processor.postprocess(images, output_type=output_type)
        return image_output(images, return_dict)

    def _encode(self, images: ImageInput, generator: torch.Generator | None, sample_posterior: bool) -> torch.Tensor:
        x = images_to_tensor(images, self.vae.config.in_channels)
        x = x.to(device=self._execution_device, dtype=self.vae.dtype)  # (B, C, H, W)
        posterior = self.vae.encode(x).latent_dist
        return posterior.sample(generator=generator) if sample_posterior else posterior.mode()  # (B, c, h, w)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """
        Decode latents drawn from the prior N(0, I).

        :param batch_size: number of images (ignored when ``latents`` are given).
        :param generator: torch generator(s) for the prior draw: one, or one per image (image i then depends on
            generator i only).
        :param latents: z (B, latent_channels, H/f, W/f) to decode instead of drawing them.
        :param output_type: "pil", "np", "pt" (images in [0, 1]) or "latent" (z itself).
        :return: ``ImagePipelineOutput(images)`` or ``(images,)``.
        """
        # 1. check inputs
        check_output_type(output_type)
        cfg = self.vae.config
        side = cfg.sample_size // self.vae_scale_factor
        shape = (batch_size, cfg.latent_channels, side, side)
        if latents is None:
            check_positive_int("batch_size", batch_size)
            check_generator_list(generator, batch_size)
            # 2. draw from the prior on the generator's device (CPU by default) in float32, one draw per generator
            latents = draw_noise(shape, generator, dtype=torch.float32)
        elif latents.ndim != 4 or latents.shape[1] != cfg.latent_channels:
            raise ValueError(f"latents must have shape (B, {cfg.latent_channels}, h, w), got {tuple(latents.shape)}")
        latents = latents.to(device=self._execution_device, dtype=self.vae.dtype)
        # 3. decode and post-process
        return self._postprocess(latents, output_type, return_dict)

    @torch.no_grad()
    def reconstruct(
        self,
        images: ImageInput,
        generator: torch.Generator | None = None,
        sample_posterior: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """
        Encode and decode images.

        :param images: PIL image(s), uint8 numpy array(s), or a tensor (B, C, H, W) in [-1, 1]; H, W divisible by f.
        :param sample_posterior: decode a posterior sample (with ``generator``) instead of the posterior mode.
        :param output_type: "pil", "np", "pt" or "latent" (the encoded z).
        """
        check_output_type(output_type)
        z = self._encode(images, generator, sample_posterior)  # (B, c, h, w)
        return self._postprocess(z, output_type, return_dict)

    @torch.no_grad()
    def interpolate(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        num_steps: int = 8,
        method: str = "linear",
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """
        Decode ``num_steps`` latents on the path from the posterior mode of ``image_a`` to that of ``image_b``
        (both ends included).

        :param image_a: one image (PIL, uint8 numpy, or a tensor (1, C, H, W) / (C, H, W) in [-1, 1]).
        :param image_b: one image of the same size.
        :param num_steps: number of images on the path, >= 2.
        :param method: "linear" (lerp) or "slerp" (spherical, keeps the latent norm of Gaussian samples).
        :return: ``ImagePipelineOutput`` with ``num_steps`` images, from a to b.
        """
        check_output_type(output_type)
        if method not in INTERPOLATION_METHODS:
            raise ValueError(f"method must be one of {INTERPOLATION_METHODS}, got {method!r}")
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {num_steps}")
        z_a = self._encode(image_a, None, False)  # (1, c, h, w)
        z_b = self._encode(image_b, None, False)
        if z_a.shape[0] != 1 or z_b.shape != z_a.shape:
            raise ValueError(
                f"image_a and image_b must be one image each of the same size, got latents {tuple(z_a.shape)} "
                f"and {tuple(z_b.shape)}"
            )
        t = torch.linspace(0, 1, num_steps, device=z_a.device)  # (T,)
        if method == "slerp":
            z = slerp(z_a, z_b, t)  # (T, c, h, w)
        else:
            z = torch.lerp(z_a, z_b, t.to(z_a.dtype)[:, None, None, None])  # (T, c, h, w)
        return self._postprocess(z, output_type, return_dict)
