"""
The main job (``make demo``): the whole story on the built-in shapes data, on a CPU.

1. train a small CLIP on the shapes captions ("a red circle", ...)          -> hfgen-output/demo/clip
2. train a text-conditioned U-Net with that frozen text encoder,
   with some (colour, shape) pairs left out of training                     -> hfgen-output/demo/pipeline
3. sample a grid for a few prompts (one of them a left-out pair) with classifier-free guidance,
   judge colour and shape of every image, and print how to load the pipeline -> hfgen-output/demo/grid.png

``--quick`` runs the same steps with tiny settings (seconds), as the test suite does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from hfgen import HFGenTextToImagePipeline
from hfgen.guidance import TEXT_GUIDANCE_SCALE
from hfgen.metrics import shape_color_accuracy
from hfgen.training import train_clip, train_diffusion

LEFT_OUT = ("green triangle", "magenta square")
# a U-Net sized for a CPU: 3 levels (32, 16, 8 px), self- and cross-attention at 8x8 only, ~1M parameters
DEMO_UNET = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_levels": [False, False, True],
    "attention_head_dim": 32,
    "norm_num_groups": 8,
}
PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a cyan circle", "a green triangle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="hfgen-output/demo")
    p.add_argument("--clip_steps", type=int, default=200, help="CLIP training steps")
    p.add_argument("--diffusion_steps", type=int, default=1200, help="denoiser training steps")
    p.add_argument("--model_config", default=None, help="a UNET_PRESETS name or a JSON config (default: DEMO_UNET)")
    p.add_argument("--images_per_prompt", type=int, default=6)
    p.add_argument("--guidance_scale", type=float, default=TEXT_GUIDANCE_SCALE, help="the pipeline's default")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="tiny settings, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.clip_steps, args.diffusion_steps, args.images_per_prompt, args.num_inference_steps = 4, 4, 2, 3
        args.model_config = "unet-tiny"
    return args


def main(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    clip_dir, pipe_dir = out / "clip", out / "pipeline"
    exclude = ["--shapes_exclude", *LEFT_OUT]
    t0 = time.perf_counter()

    # 1. CLIP on the shapes captions
    width, layers, batch = ("32", "1", "16") if args.quick else ("64", "3", "64")
    clip_argv = ["--output_dir", str(clip_dir), "--max_train_steps", str(args.clip_steps), "--report_to", "none",
                 "--vision_width", width, "--vision_layers", layers, "--text_width", width, "--text_layers", layers,
                 "--num_heads", "2", "--projection_dim", width, "--train_batch_size", batch]  # fmt: skip
    if args.quick:
        clip_argv += ["--num_shapes", "64", "--num_eval_images", "32"]
    clip_report = train_clip.main(train_clip.parse_args(clip_argv))
    t_clip = time.perf_counter() - t0

    # 2. a text-conditioned denoiser on the frozen CLIP text encoder, some pairs left out
    model_config = args.model_config
    if model_config is None:
        out.mkdir(parents=True, exist_ok=True)
        model_config = str(out / "demo_unet.json")
        Path(model_config).write_text(json.dumps(DEMO_UNET))
    diff_argv = [
        "--output_dir", str(pipe_dir), "--model", "unet", "--model_config", model_config,
        "--conditioning", "text", "--text_encoder", str(clip_dir), *exclude,
        "--max_train_steps", str(args.diffusion_steps), "--learning_rate", "2e-3", "--lr_warmup_steps", "100",
        "--train_batch_size", "32", "--adam_beta2", "0.99",
        "--use_ema", "--ema_max_decay", "0.999", "--checkpointing_steps", "1000000", "--report_to", "none",
        "--num_inference_steps", str(args.num_inference_steps), "--num_validation_images", "8",
        "--guidance_scale", str(args.guidance_scale), "--validation_prompts", *PROMPTS[:4],
    ]  # fmt: skip
    if args.quick:
        diff_argv += ["--resolution", "16", "--shapes_num_images", "64", "--train_batch_size", "8"]  # last one wins
    train_diffusion.main(train_diffusion.parse_args(diff_argv))
    t_diffusion = time.perf_counter() - t0 - t_clip

    # 3. sample every prompt, judge colour and shape, write the grid (one row per prompt)
    pipe = HFGenTextToImagePipeline.from_pretrained(str(pipe_dir))
    n = args.images_per_prompt
    generators = [torch.Generator().manual_seed(i) for i in range(n * len(PROMPTS))]
    result = pipe(
        prompt=list(PROMPTS),
        num_images_per_prompt=n,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        generator=generators,
        output_type="pt",
    )
    images = result.images  # (P * n, 3, H, W) in [0, 1]
    asked = [p.split()[1:] for p in PROMPTS for _ in range(n)]  # [colour, shape] per image
    left_out = torch.tensor([" ".join(a) in LEFT_OUT for a in asked])
    judged = {}
    for name, keep in (("seen", ~left_out), ("left_out", left_out)):
        subset = [a for a, k in zip(asked, keep) if k]
        if subset:
            judged[name] = shape_color_accuracy(images[keep], *zip(*subset), value_range=(0.0, 1.0))
    pil = pipe.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
    big = [im.resize((64, 64), resample=0) for im in pil]
    make_image_grid(big, rows=len(PROMPTS), cols=n).save(out / "grid.png")

    report = {
        "prompts": list(PROMPTS),
        "left_out_pairs": list(LEFT_OUT),
        "clip_zero_shot_accuracy": clip_report.get("zero_shot_accuracy"),
        "shape_color_accuracy": judged,
        "seconds": {"clip": round(t_clip, 1), "diffusion": round(t_diffusion, 1)},
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report, indent=2, default=float))
    print(f"\nSample grid (one row per prompt; the last prompt's pair was never seen): {out / 'grid.png'}")
    print("Load the pipeline:")
    print(
        f'  from hfgen import HFGenTextToImagePipeline; pipe = HFGenTextToImagePipeline.from_pretrained("{pipe_dir}")'
    )
    print('  pipe("a blue circle").images[0].save("blue_circle.png")  # guidance_scale: the pipeline default')
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(parse_args())
