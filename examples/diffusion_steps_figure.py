"""The picture of diffusion sampling: at chosen steps, the current noisy sample x_t (top row) and the model's
prediction of the clean image x_0 hat (bottom row), read through ``callback_on_step_end``.

    python examples/diffusion_steps_figure.py                          # untrained tiny U-Net: shows the mechanics
    python examples/diffusion_steps_figure.py path/or/user-repo --steps 0 10 25 49 --output steps.png

Only PIL draws the figure.
"""

import argparse

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from hfgen import UNET_PRESETS, HFGenPipeline, UNetModel
from hfgen.schedulers import DDIMScheduler


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", nargs="?", default=None, help="pipeline folder or Hub repo id (default: untrained)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="step indices to show (default: 6 spread)")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--class_label", type=int, default=None, help="class for a class-conditional denoiser")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of each tile")
    parser.add_argument("--output", default="diffusion_steps.png")
    return parser.parse_args(argv)


def to_pil(x: torch.Tensor, scale: int) -> PIL.Image.Image:
    """(C, H, W) in [-1, 1] -> RGB tile upscaled by ``scale`` (x_t is clipped to [-1, 1] for display)."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    img = PIL.Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]).convert("RGB")
    return img.resize((img.width * scale, img.height * scale), PIL.Image.NEAREST)


def decode(pipe: HFGenPipeline, z: torch.Tensor) -> torch.Tensor:
    """Diffusion latent (C, h, w) -> image (3, H, W) in [-1, 1] through the pipeline's VAE."""
    return pipe.vae.decode(z[None].to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample[0]


def figure(tiles: list[tuple[int, int, PIL.Image.Image, PIL.Image.Image]], pad: int = 4, label_h: int = 14):
    """Columns (step i, timestep t, x_t, x_0 hat) -> one image: labels, then x_t row, then x_0 hat row."""
    w, h = tiles[0][2].size
    left = 40
    fig = PIL.Image.new("RGB", (left + len(tiles) * (w + pad), label_h + 2 * (h + pad)), "white")
    draw = PIL.ImageDraw.Draw(fig)
    draw.text((2, label_h + h // 2 - 5), "x_t", fill="black")
    draw.text((2, label_h + h + pad + h // 2 - 5), "x_0^", fill="black")
    for col, (_, t, xt, x0) in enumerate(tiles):
        x = left + col * (w + pad)
        draw.text((x, 1), f"t={t}", fill="black")
        fig.paste(xt, (x, label_h))
        fig.paste(x0, (x, label_h + h + pad))
    return fig


def main(args):
    if args.pipeline is None:
        torch.manual_seed(args.seed)
        denoiser = UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=16)
        pipe = HFGenPipeline(denoiser, DDIMScheduler())
    else:
        pipe = HFGenPipeline.from_pretrained(args.pipeline)
    n = args.num_inference_steps
    steps = args.steps if args.steps is not None else sorted({round(k) for k in np.linspace(0, n - 1, 6)})
    bad = [s for s in steps if not 0 <= s < n]
    if bad:
        raise ValueError(f"--steps must be in [0, {n - 1}] (num_inference_steps={n}), got {bad}")

    tiles = []

    def keep(p, i, t, kwargs):
        if i in steps:
            latents, x0 = kwargs["latents"][0], kwargs["pred_original_sample"][0]
            if p.vae is not None:  # show images, not latents
                latents, x0 = decode(p, latents), decode(p, x0)
            tiles.append((i, int(t), to_pil(latents, args.scale), to_pil(x0, args.scale)))
        return {}

    pipe(
        num_inference_steps=n,
        generator=torch.Generator().manual_seed(args.seed),
        class_labels=args.class_label,
        output_type="latent",
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    )
    fig = figure(tiles)
    fig.save(args.output)
    print(f"wrote {args.output} ({len(tiles)} steps: {[s for s, *_ in tiles]})")
    return fig


if __name__ == "__main__":
    main(parse_args())
