"""
The main job (``make demo``): the whole story on the built-in shapes data, on a CPU, in a few minutes.

1. train a small CLIP on the shapes captions ("a red circle", ...)          -> hfgen-output/demo/clip
2. train a text-conditioned U-Net on that frozen text encoder (flow matching),
   with two (colour, shape) pairs left out of training                      -> hfgen-output/demo/pipeline
3. sample every one of the 18 colour x shape prompts with classifier-free guidance, judge the colour and shape of
   every image (``hfgen.metrics.shape_color_accuracy``), write the grid      -> hfgen-output/demo/grid.png
   and the report (accuracy for seen and left-out pairs, seconds per stage)  -> hfgen-output/demo/demo_report.json

Everything runs at 16x16 pixels, where the judge reads every real shape correctly, so that the demo fits in about
five minutes on two cores. ``--quick`` runs the same steps with tiny settings (seconds), as the test suite does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from hfgen import HFGenTextToImagePipeline
from hfgen.data import SHAPE_PAIRS
from hfgen.guidance import TEXT_GUIDANCE_SCALE
from hfgen.metrics import shape_color_accuracy
from hfgen.training import train_clip, train_diffusion

LEFT_OUT = ("green triangle", "magenta square")
PROMPTS = tuple(f"a {color} {shape}" for color, shape in SHAPE_PAIRS)  # all 18, the two left-out pairs included
# a U-Net sized for a CPU: 3 levels (16, 8, 4 px), self- and cross-attention at 8x8 and 4x4, ~1M parameters
DEMO_UNET = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_levels": [False, True, True],
    "attention_head_dim": 32,
    "norm_num_groups": 8,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="hfgen-output/demo")
    p.add_argument("--resolution", type=int, default=16, help="image side of both models")
    p.add_argument("--clip_steps", type=int, default=500, help="CLIP training steps")
    p.add_argument("--diffusion_steps", type=int, default=1400, help="denoiser training steps")
    p.add_argument(
        "--diffusion_learning_rate",
        type=float,
        default=train_diffusion.CONDITIONAL_UNET_LEARNING_RATE,
        help="the denoiser's; the demo's figures were measured at the default",
    )
    p.add_argument("--model_config", default=None, help="a UNET_PRESETS name or a JSON config (default: DEMO_UNET)")
    p.add_argument("--images_per_prompt", type=int, default=8, help="samples of each of the 18 prompts")
    p.add_argument("--guidance_scale", type=float, default=TEXT_GUIDANCE_SCALE, help="the pipeline's default")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="tiny settings, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.clip_steps, args.diffusion_steps, args.images_per_prompt, args.num_inference_steps = 4, 4, 1, 3
        args.model_config = "unet-tiny"
    return args


@contextmanager
def stage(number: int, title: str, seconds: dict, key: str):
    """Print the stage's title, run it, print and record how long it took."""
    print(f"\n[{number}/3] {title}", flush=True)
    start = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - start, 1)
    print(f"[{number}/3] done in {seconds[key]} s", flush=True)


def train_text_encoder(args: argparse.Namespace, clip_dir: Path) -> dict:
    """CLIP on the shapes captions at ``--resolution``; its frozen text encoder conditions the denoiser."""
    width, layers, batch = ("32", "1", "16") if args.quick else ("64", "3", "64")
    argv = ["--output_dir", str(clip_dir), "--max_train_steps", str(args.clip_steps), "--report_to", "none",
            "--resolution", str(args.resolution), "--patch_size", "4", "--learning_rate", "2e-3",
            "--lr_warmup_steps", "50", "--vision_width", width, "--vision_layers", layers, "--text_width", width,
            "--text_layers", layers, "--num_heads", "2", "--projection_dim", width, "--train_batch_size", batch]  # fmt: skip
    if args.quick:
        argv += ["--num_shapes", "64", "--num_eval_images", "32"]
    return train_clip.main(train_clip.parse_args(argv))


def train_denoiser(args: argparse.Namespace, clip_dir: Path, pipe_dir: Path) -> None:
    """The text-conditioned U-Net with ``train_diffusion.py``'s defaults (flow matching, the U-Net's small-data
    learning rate 2e-3 and batch 32), EMA on, the pairs of ``LEFT_OUT`` left out."""
    model_config = args.model_config
    if model_config is None:
        pipe_dir.parent.mkdir(parents=True, exist_ok=True)
        model_config = str(pipe_dir.parent / "demo_unet.json")
        Path(model_config).write_text(json.dumps(DEMO_UNET))
    argv = [
        "--output_dir", str(pipe_dir), "--model", "unet", "--model_config", model_config,
        "--conditioning", "text", "--text_encoder", str(clip_dir), "--shapes_exclude", *LEFT_OUT,
        "--resolution", str(args.resolution), "--max_train_steps", str(args.diffusion_steps),
        "--learning_rate", str(args.diffusion_learning_rate), "--channels_last", "--use_ema", "--ema_max_decay", "0.999", "--checkpointing_steps", "1000000", "--report_to", "none",
        "--num_inference_steps", str(args.num_inference_steps), "--guidance_scale", str(args.guidance_scale),
        "--num_validation_images", "4", "--validation_prompts", PROMPTS[0],
    ]  # fmt: skip
    if args.quick:
        argv += ["--shapes_num_images", "64", "--train_batch_size", "8"]
    train_diffusion.main(train_diffusion.parse_args(argv))


def sample_and_judge(args: argparse.Namespace, pipe_dir: Path, out: Path) -> dict:
    """Sample ``--images_per_prompt`` images of every prompt, judge them, save the grid (one row per prompt)."""
    pipe = HFGenTextToImagePipeline.from_pretrained(str(pipe_dir))
    n = args.images_per_prompt
    generators = [torch.Generator().manual_seed(i) for i in range(n * len(PROMPTS))]
    images = pipe(
        prompt=list(PROMPTS),
        num_images_per_prompt=n,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        generator=generators,
        output_type="pt",
    ).images  # (P * n, 3, H, W) in [0, 1]
    asked = [p.split()[1:] for p in PROMPTS for _ in range(n)]  # [colour, shape] per image
    left_out = torch.tensor([" ".join(a) in LEFT_OUT for a in asked])
    judged = {}
    for name, keep in (("seen", ~left_out), ("left_out", left_out)):
        subset = [a for a, k in zip(asked, keep) if k]
        judged[name] = shape_color_accuracy(images[keep], *zip(*subset), value_range=(0.0, 1.0))
        judged[name]["num_images"] = len(subset)
    pil = pipe.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
    big = [im.resize((48, 48), resample=0) for im in pil]
    make_image_grid(big, rows=len(PROMPTS), cols=n).save(out / "grid.png")
    return judged


def main(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    clip_dir, pipe_dir = out / "clip", out / "pipeline"
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with stage(1, f"CLIP on the shapes captions ({args.clip_steps} steps)", seconds, "clip"):
        clip_report = train_text_encoder(args, clip_dir)
    with stage(2, f"text-conditioned U-Net, {' and '.join(LEFT_OUT)} left out", seconds, "denoiser"):
        train_denoiser(args, clip_dir, pipe_dir)
    with stage(3, f"{args.images_per_prompt} samples of each of the {len(PROMPTS)} prompts", seconds, "sampling"):
        judged = sample_and_judge(args, pipe_dir, out)
    seconds["total"] = round(time.perf_counter() - start, 1)

    report = {
        "prompts": list(PROMPTS),
        "left_out_pairs": list(LEFT_OUT),
        "clip_zero_shot_accuracy": clip_report.get("zero_shot_accuracy"),
        "shape_color_accuracy": judged,
        "seconds": seconds,
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=float))
    print_summary(report, out, pipe_dir)
    return report


def print_summary(report: dict, out: Path, pipe_dir: Path) -> None:
    s, judged = report["seconds"], report["shape_color_accuracy"]
    print(f"\nTime: CLIP {s['clip']} s, U-Net {s['denoiser']} s, sampling {s['sampling']} s, total {s['total']} s")
    for name, j in judged.items():
        print(f"Colour and shape right, {name} pairs: {j['accuracy']:.1%} of {j['num_images']} images")
    print(f"\nSample grid (one row per prompt, {' and '.join(LEFT_OUT)} never seen): {out / 'grid.png'}")
    print(f"Report: {out / 'demo_report.json'}")
    print("Load the pipeline:")
    print(
        f'  from hfgen import HFGenTextToImagePipeline; pipe = HFGenTextToImagePipeline.from_pretrained("{pipe_dir}")'
    )
    print('  pipe("a blue circle").images[0].save("blue_circle.png")  # guidance_scale: the pipeline default')


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(parse_args())
