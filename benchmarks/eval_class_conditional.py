"""
Re-score saved class-conditional pipelines (from ``bench_class_conditional.py``) without training again:
10 x ``--per_class`` samples with 25 steps at each guidance scale, read by the digit classifier: DDIM ("trailing")
for a diffusion model, the saved FlowMatchEulerDiscreteScheduler for a flow-matching one.

    python benchmarks/eval_class_conditional.py benchmarks/artifacts/class_conditional_unet_b32/unet/pipeline ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_class_conditional import CLASSIFIER, NUM_CLASSES, evaluation_scheduler, grid_image, score  # noqa: E402

from hfgen import HFGenPipeline  # noqa: E402
from hfgen.metrics import DigitClassifier  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipelines", nargs="+", type=Path)
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--per_class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    classifier = DigitClassifier.from_pretrained(CLASSIFIER).eval()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    for folder in args.pipelines:
        pipe = HFGenPipeline.from_pretrained(str(folder))
        pipe.scheduler = evaluation_scheduler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn((len(labels), 1, 32, 32), generator=torch.Generator().manual_seed(args.seed + 1))
        row = {"pipeline": str(folder), "denoiser": type(pipe.denoiser).__name__, "accuracy": {}}
        row["sampler"] = type(pipe.scheduler).__name__
        for s in args.guidance_scales:
            images = pipe(batch_size=len(labels), latents=noise, class_labels=labels, guidance_scale=s,
                          num_inference_steps=25, output_type="pt").images  # fmt: skip
            row["accuracy"][s] = round(score(classifier, images, labels)[0], 3)
            grid_image(images, args.per_class).save(folder.parent / f"grid_rescored_g{s:g}.png")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
