"""
Sampler steps versus quality, on a model that ``bench_quality.py`` saved: for the better DDPM-trained one, FID/KID
at 10, 25, 50 and 100 DDIM steps and 250 DDPM steps (the model's own library's schedulers), and with diffusers'
``DPMSolverMultistepScheduler`` swapped in; for the flow-matching one (``--model hfgen-flow``), diffusers'
``FlowMatchEulerDiscreteScheduler`` at 10, 25, 50 and 100 steps and its second-order
``FlowMatchHeunDiscreteScheduler`` (two denoiser calls a step but the last) at 13 and 25 steps.

    .venv/bin/python benchmarks/bench_sampler_steps.py --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_sampler_steps.py --model hfgen-flow --num_samples 500 --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_sampler_steps.py --quality_dir /tmp/q --quick

Each row draws ``--num_samples`` digits from the same seeds; the real-versus-real floor uses the same number of
training digits against the 2000 held-out ones (FID is biased upwards at small sample counts; compare within a
column only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import ARTIFACTS, CLASSIFIER, MNIST, header, write_results
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import (
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers import DDPMScheduler as DiffusersDDPM

import hfgen
from hfgen.metrics import DigitClassifier, class_balance, fid_kid, load_digits, pad_digits
from hfgen.pipelines import HFGenPipeline


def load_model(quality_dir: Path, which: str):
    """The pipeline ``which`` ("hfgen", "hfgen-flow", "diffusers" or "best": the DDPM-trained one of lower FID in
    results.json) and its DDIM and DDPM schedulers (None for the flow-matching model)."""
    best = json.loads((quality_dir / "results.json").read_text())["best"] if which == "best" else which
    if best == "hfgen-flow":
        return best, HFGenPipeline.from_pretrained(quality_dir / best), None, None
    if best == "hfgen":
        pipe = HFGenPipeline.from_pretrained(quality_dir / best)
        ddim, ddpm = hfgen.DDIMScheduler, hfgen.DDPMScheduler
    else:
        pipe = DDPMPipeline.from_pretrained(quality_dir / best)
        ddim, ddpm = DiffusersDDIM, DiffusersDDPM
    return best, pipe, ddim, ddpm


def sample(pipe, n: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """(n, C, 32, 32) in [0, 1], from either library's pipeline (hfgen's 28x28 digits framed as the data are)."""
    chunks = []
    for i in range(0, n, batch):
        g = torch.Generator().manual_seed(seed + i)
        if isinstance(pipe, HFGenPipeline):
            chunks.append(
                pipe(batch_size=min(batch, n - i), num_inference_steps=steps, generator=g, output_type="pt").images
            )
        else:
            out = pipe(batch_size=min(batch, n - i), num_inference_steps=steps, generator=g, output_type="np").images
            chunks.append(torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2))
    return pad_digits(torch.cat(chunks).float(), background=0.0)


def sampler_runs(args, ddim_cls, ddpm_cls) -> list[tuple[str, type, int]]:
    """(row name, scheduler class, steps) of every row: flow-matching samplers for a flow model (no DDIM class)."""
    if ddim_cls is None:
        runs = [("diffusers FlowMatchEuler", FlowMatchEulerDiscreteScheduler, s) for s in args.euler_steps]
        return runs + [("diffusers FlowMatchHeun", FlowMatchHeunDiscreteScheduler, s) for s in args.heun_steps]
    runs = [(f"{ddim_cls.__module__.split('.')[0]} DDIM", ddim_cls, s) for s in args.ddim_steps]
    runs += [(f"{ddpm_cls.__module__.split('.')[0]} DDPM", ddpm_cls, s) for s in args.ddpm_steps]
    return runs + [("diffusers DPMSolverMultistep", DPMSolverMultistepScheduler, s) for s in args.dpm_steps]


def denoiser_calls(scheduler, steps: int) -> int:
    """How many times a sampler of ``steps`` steps calls the denoiser (Heun: twice a step but the last)."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FID versus number of sampling steps and sampler.")
    p.add_argument("--quality_dir", type=Path, default=ARTIFACTS / "quality", help="bench_quality.py's output_dir")
    p.add_argument(
        "--model", default="best", choices=("best", "hfgen", "hfgen-flow", "diffusers"), help="which saved recipe"
    )
    p.add_argument("--classifier", type=Path, default=CLASSIFIER)
    p.add_argument("--mnist", type=Path, default=MNIST)
    p.add_argument("--ddim_steps", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--ddpm_steps", type=int, nargs="+", default=[250])
    p.add_argument("--dpm_steps", type=int, nargs="+", default=[10, 25])
    p.add_argument("--euler_steps", type=int, nargs="+", default=[10, 25, 50, 100], help="flow matching")
    p.add_argument("--heun_steps", type=int, nargs="+", default=[13, 25], help="flow matching")
    p.add_argument("--num_samples", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=None, help="append a markdown block to this file")
    p.add_argument("--quick", action="store_true", help="20 samples, 2 and 3 steps, 500 held-out digits")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.quick:
        args.num_samples, args.ddim_steps, args.ddpm_steps, args.dpm_steps = min(args.num_samples, 20), [2], [3], [2]
        args.euler_steps, args.heun_steps = [2], [2]
    best, pipe, ddim_cls, ddpm_cls = load_model(args.quality_dir, args.model)
    pipe.set_progress_bar_config(disable=True)
    train_config = pipe.scheduler.config
    classifier = DigitClassifier.from_pretrained(args.classifier).eval()
    train_x, _ = load_digits(args.mnist, "train")
    test_x, _ = load_digits(args.mnist, "test")
    if args.quick:
        test_x = test_x[:500]
    subset = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))[: args.num_samples]]
    rows = [("real vs real (floor)", None, fid_kid(test_x, subset, classifier), None)]

    for name, cls, steps in sampler_runs(args, ddim_cls, ddpm_cls):
        pipe.scheduler = cls.from_config(train_config)
        calls = denoiser_calls(pipe.scheduler, steps)
        start = time.perf_counter()
        images = sample(pipe, args.num_samples, steps, args.batch_size, args.seed)
        seconds = time.perf_counter() - start
        scores = fid_kid(test_x, images, classifier, value_range=(0, 1))
        balance = class_balance(images, classifier, value_range=(0, 1))
        extra = {"calls": calls, "seconds": round(seconds, 1), "entropy": balance.normalized_entropy}
        rows.append((name, steps, scores, extra))
        print(name, steps, scores, flush=True)

    lines = [header(f"Sampler steps (bench_sampler_steps.py){' [quick]' if args.quick else ''}")]
    lines.append(
        f"- model: the {best} recipe from {args.quality_dir} (--model {args.model}), scheduler config "
        f"from its training (prediction_type {train_config.get('prediction_type', 'flow')}, beta_schedule "
        f"{train_config.get('beta_schedule', '-')}); {args.num_samples} samples per row vs the 2000 held-out digits\n"
    )
    lines.append("| sampler | steps | denoiser calls | FID | KID | class entropy | sampling s |")
    lines.append("|---|---|---|---|---|---|---|")
    results = []
    for name, steps, s, extra in rows:
        results.append({"sampler": name, "steps": steps, **s, **(extra or {})})
        ent = f"{extra['entropy']:.3f}" if extra else ""
        lines.append(
            f"| {name} | {steps or ''} | {extra['calls'] if extra else ''} | {s['fid']:.2f} | {s['kid_mean']:.2f} ± {s['kid_std']:.2f} | {ent} | "
            f"{extra['seconds'] if extra else ''} |"
        )
    write_results("\n".join(lines) + "\n", args.results)
    return {"best": best, "rows": results}


if __name__ == "__main__":
    main(parse_args())
