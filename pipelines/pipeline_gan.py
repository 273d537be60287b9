"""
``HFGenGANPipeline(generator)``: sample images from an hfgen ``GANGenerator`` in one forward pass.

Truncation trick, by scaling: z ~ N(0, I) is multiplied by ``truncation`` (psi, as StyleGAN's truncation towards the
mean of the prior, which is 0 here). ``truncation=1.0`` is the untruncated prior; values below 1 trade diversity for
fidelity; it applies to given ``latents`` too.

Note: the component is called ``generator`` (the network), the ``generator`` argument of ``__call__`` is the torch
random generator, as in every diffusers pipeline.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from .denoising import (
    check_generator_list,
    check_output_type,
    check_positive_int,
    draw_noise,
    first_generator,
    generator_device,
    image_output,
)
from .hub import HFGenHubMixin


class HFGenGANPipeline(HFGenHubMixin, DiffusionPipeline):
    """
    :param generator: an hfgen ``GANGenerator``.
    """

    model_cpu_offload_seq = "generator"

    def __init__(self, generator):
        super().__init__()
        self.register_modules(generator=generator)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)

    def _card_tags(self) -> tuple[list[str], str | None]:
        return ["gan", "dcgan", "unconditional-image-generation"], "unconditional-image-generation"

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        truncation: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """
        :param batch_size: number of images (ignored when ``latents`` are given).
        :param generator: torch generator(s) for z (and for the labels a conditional model draws when none are given):
            one, or one per image (image i then depends on generator i only).
        :param latents: z (B, latent_dim) instead of drawing them.
        :param class_labels: conditional models: one label or one per image, in [0, num_classes); None draws them
            uniformly. Unconditional models: must be None.
        :param truncation: z is scaled by it; > 0, 1.0 = no truncation.
        :param output_type: "pil", "np", "pt" (images in [0, 1]) or "latent" (the truncated z (B, latent_dim)).
        :return: ``ImagePipelineOutput(images)`` or ``(images,)``.
        """
        # 1. check inputs
        check_output_type(output_type)
        if not truncation > 0:
            raise ValueError(f"truncation must be > 0, got {truncation}")
        cfg = self.generator.config
        device, dtype = self._execution_device, self.generator.dtype
        if latents is None:
            check_positive_int("batch_size", batch_size)
            check_generator_list(generator, batch_size)
        elif latents.ndim != 2 or latents.shape[1] != cfg.latent_dim:
            raise ValueError(f"latents must have shape (B, {cfg.latent_dim}), got {tuple(latents.shape)}")
        else:
            batch_size = latents.shape[0]
        num_classes = cfg.num_classes
        if class_labels is not None:
            if not num_classes:
                raise ValueError("class_labels were given but the generator is unconditional (num_classes is None)")
            class_labels = torch.as_tensor(class_labels, device=device).reshape(-1)
            if class_labels.is_floating_point():
                raise TypeError(f"class_labels must be integers, got dtype {class_labels.dtype}")
            if (class_labels < 0).any() or (class_labels >= num_classes).any():
                raise ValueError(f"class_labels must be in [0, {num_classes - 1}], got {class_labels.tolist()}")
            if class_labels.numel() == 1:
                class_labels = class_labels.expand(batch_size)
            if class_labels.numel() != batch_size:
                raise ValueError(
                    f"class_labels must be one label or one per image ({batch_size}), got {len(class_labels)}"
                )

        # 2. draw z (B, latent_dim) on the generator's device (CPU by default) in float32 and, for a conditional
        #    model without labels, uniform labels; with a generator list, image i uses generator i only
        if latents is None:
            latents = draw_noise((batch_size, cfg.latent_dim), generator)
        latents = truncation * latents.to(device=device, dtype=dtype)  # (B, D)
        if num_classes and class_labels is None:
            if isinstance(generator, list) and len(generator) == batch_size:
                class_labels = torch.cat(
                    [torch.randint(0, num_classes, (1,), generator=g, device=g.device) for g in generator]
                )  # (B,)
            else:
                gen, noise_device = first_generator(generator), generator_device(generator)
                class_labels = torch.randint(0, num_classes, (batch_size,), generator=gen, device=noise_device)
            class_labels = class_labels.to(device)

        # 3. generate and post-process
        if output_type == "latent":
            images = latents
        else:
            images = self.generator(latents, class_labels).sample  # (B, C, H, W) in [-1, 1]
            images = self.image_processor.postprocess(images, output_type=output_type)
        return image_output(images, return_dict)
