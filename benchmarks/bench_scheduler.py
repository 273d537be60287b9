"""
Scheduler overhead: ``step()`` calls per second of hfgen's DDPMScheduler / DDIMScheduler vs diffusers', on small
tensors where the per-call Python and dispatch cost dominates.

    .venv/bin/python benchmarks/bench_scheduler.py --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_scheduler.py --device cuda --dtype bfloat16   # see gpu.sh
    .venv/bin/python benchmarks/bench_scheduler.py --quick

Each measurement runs one full sampling loop of ``--num_inference_steps`` steps: ``step`` at every timestep, with a
fixed model output so that only the scheduler is timed (``set_timesteps`` is called once, outside the timing); hfgen
and diffusers alternate A/B/A/B and the medians are compared. Both use the same constructor arguments (diffusers' defaults:
1000 linear betas, epsilon prediction, sample clipping). There is no ``--compile``: a step is a handful of
elementwise ops whose cost is Python and dispatch overhead, which is what this measures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import header, interleaved_medians, write_results
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM

import hfgen

SHAPES = ((1, 3, 8, 8), (4, 3, 32, 32))


def make_loop(scheduler, shape, steps: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(shape, generator=g, device=device, dtype=dtype)
    model_output = torch.randn(shape, generator=g, device=device, dtype=dtype)

    scheduler.set_timesteps(steps, device=device)

    def loop():
        x = sample
        for t in scheduler.timesteps:
            x = scheduler.step(model_output, t, x, generator=g).prev_sample
        return x

    return loop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Scheduler step() overhead: hfgen vs diffusers.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=25, help="A/B rounds of one full loop each; medians are reported")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=None, help="append a markdown block to this file")
    p.add_argument("--quick", action="store_true", help="10 steps, 3 rounds")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.quick:
        args.num_inference_steps, args.repeats = 10, 3
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = "cpu" if device.type == "cpu" else "wall"  # process CPU time is steadier on a shared CPU
    kinds = {"DDPM": (hfgen.DDPMScheduler, DiffusersDDPM), "DDIM": (hfgen.DDIMScheduler, DiffusersDDIM)}
    results = {}
    lines = [header(f"Scheduler step overhead (bench_scheduler.py){' [quick]' if args.quick else ''}")]
    lines.append(
        f"- device {device}, dtype {args.dtype}, {args.num_inference_steps} steps per loop, {args.repeats} A/B "
        f"rounds (medians of {clock} time)\n"
    )
    lines.append("| scheduler | shape | hfgen steps/s | diffusers steps/s | hfgen time / diffusers time |")
    lines.append("|---|---|---|---|---|")
    for kind, (ours, theirs) in kinds.items():
        for shape in SHAPES:
            loops = {
                "hfgen": make_loop(ours(), shape, args.num_inference_steps, device, dtype),
                "diffusers": make_loop(theirs(), shape, args.num_inference_steps, device, dtype),
            }
            med = interleaved_medians(loops, args.repeats, device, warmup=2)
            h, d = args.num_inference_steps / med["hfgen"][clock], args.num_inference_steps / med["diffusers"][clock]
            results[f"{kind} {shape}"] = {"hfgen_steps_s": h, "diffusers_steps_s": d, "time_ratio": d / h}
            lines.append(f"| {kind} | {tuple(shape)} | {h:.0f} | {d:.0f} | {d / h:.2f} |")
    lines.append("\nGoal: hfgen time / diffusers time <= 0.5.\n")
    write_results("\n".join(lines), args.results)
    return results


if __name__ == "__main__":
    main(parse_args())
