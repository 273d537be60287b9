"""
Text-to-image faithfulness on the shapes data: how often a trained ``HFGenTextToImagePipeline`` draws the asked
colour and shape, across guidance scales, for (colour, shape) pairs seen in training and pairs left out of it.

    .venv/bin/python benchmarks/bench_text_to_image.py --pipeline outputs/t2i-shapes \
        --left_out "red triangle" "blue circle" --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_text_to_image.py --quick     # an untrained tiny pipeline, smoke test only

Prompts are "a {color} {shape}" (the shapes data's captions), ``--images_per_pair`` images each; the judge is
``hfgen.metrics.shape_color_accuracy`` (pure colour of the ink, shape from the fill ratio of its bounding box), which
scores ~100% on real shapes images. ``--left_out`` must name the pairs the pipeline was trained without (as passed to
``training/train_diffusion.py --shapes_exclude``); every other pair counts as seen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import header, write_results

from hfgen.data import COLORS, SHAPE_PAIRS, SHAPES
from hfgen.metrics import shape_color_accuracy
from hfgen.pipelines import HFGenTextToImagePipeline


def parse_pair(text: str) -> tuple[str, str]:
    color, _, shape = text.partition(" ")
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f'--left_out {text!r} must be "color shape" with color in {COLORS} and shape in {SHAPES}')
    return color, shape


def tiny_untrained_pipeline() -> HFGenTextToImagePipeline:
    """A random tiny pipeline (CLIP text encoder, U-Net with cross-attention, DDIM) for --quick."""
    from transformers import CLIPTextModel

    from hfgen import UNET_PRESETS, DDIMScheduler, UNetModel
    from hfgen.clip import small_clip_config, train_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer([f"a {c} {s}" for c, s in SHAPE_PAIRS] + [""], model_max_length=8)
    config = small_clip_config(tokenizer, text_width=32, text_layers=1, num_heads=2, projection_dim=32)
    text_encoder = CLIPTextModel(config.text_config).eval()
    denoiser = UNetModel(
        **UNET_PRESETS["unet-tiny"], sample_size=32, in_channels=3, out_channels=3, cross_attention_dim=32
    )
    return HFGenTextToImagePipeline(denoiser, DDIMScheduler(), text_encoder, tokenizer)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Shapes text-to-image: asked colour and shape, seen vs left-out pairs.")
    p.add_argument("--pipeline", type=Path, default=None, help="a saved HFGenTextToImagePipeline folder")
    p.add_argument("--left_out", nargs="*", default=[], help='pairs left out of training, e.g. "red triangle"')
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 7.5])
    p.add_argument("--images_per_pair", type=int, default=8)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--batch_size", type=int, default=72, help="prompts per pipeline call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="image j draws its noise from seed + j")
    p.add_argument("--results", type=Path, default=None, help="append a markdown block to this file")
    p.add_argument("--quick", action="store_true", help="untrained tiny pipeline if --pipeline is absent, 2 scales")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    left_out = {parse_pair(p) for p in args.left_out}
    if args.quick:
        args.guidance_scales, args.images_per_pair, args.num_inference_steps = args.guidance_scales[:2], 1, 3
    if args.pipeline is not None:
        pipe = HFGenTextToImagePipeline.from_pretrained(args.pipeline)
    elif args.quick:
        pipe = tiny_untrained_pipeline()
    else:
        raise ValueError("--pipeline is required (a saved HFGenTextToImagePipeline folder) unless --quick is given")
    pipe.set_progress_bar_config(disable=True)

    pairs = [pair for pair in SHAPE_PAIRS for _ in range(args.images_per_pair)]
    results = {}
    for scale in args.guidance_scales:
        images = []  # image j from its own generator, seed + j: the same images at every --batch_size
        for i in range(0, len(pairs), args.batch_size):
            chunk = pairs[i : i + args.batch_size]
            out = pipe(
                prompt=[f"a {c} {s}" for c, s in chunk],
                guidance_scale=scale,
                num_inference_steps=args.num_inference_steps,
                generator=[torch.Generator().manual_seed(args.seed + i + k) for k in range(len(chunk))],
                output_type="pt",
            )
            images.append(out.images.float())
        images = torch.cat(images)  # (N, 3, H, W) in [0, 1]
        row = {}
        for group, members in (
            ("seen", [p not in left_out for p in pairs]),
            ("left_out", [p in left_out for p in pairs]),
        ):
            idx = [i for i, keep in enumerate(members) if keep]
            if idx:
                row[group] = shape_color_accuracy(
                    images[idx], [pairs[i][0] for i in idx], [pairs[i][1] for i in idx], value_range=(0, 1)
                )
        results[scale] = row

    lines = [header(f"Text-to-image faithfulness on shapes (bench_text_to_image.py){' [quick]' if args.quick else ''}")]
    lines.append(
        f"- pipeline {args.pipeline or 'untrained tiny (--quick)'}; left-out pairs: {sorted(left_out) or 'none'}; "
        f"{args.images_per_pair} images per pair, {args.num_inference_steps} steps\n"
    )
    lines.append(
        "| guidance | seen: both right | seen: colour | seen: shape | left out: both | left out: colour | left out: shape |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for scale, row in results.items():
        cells = []
        for group in ("seen", "left_out"):
            r = row.get(group)
            cells += [f"{r[k]:.2f}" for k in ("accuracy", "color_accuracy", "shape_accuracy")] if r else ["-"] * 3
        lines.append(f"| {scale} | " + " | ".join(cells) + " |")
    write_results("\n".join(lines) + "\n", args.results)
    print(json.dumps({str(k): v for k, v in results.items()}))
    return results


if __name__ == "__main__":
    main(parse_args())
