"""
Denoiser speed and memory: hfgen ``UNetModel`` vs diffusers ``UNet2DModel`` and hfgen ``DiTModel`` vs diffusers
``DiTTransformer2DModel``, at matched configurations, in one process.

    .venv/bin/python benchmarks/bench_speed.py --results benchmarks/RESULTS.md           # CPU, float32
    .venv/bin/python benchmarks/bench_speed.py --device cuda --dtype bfloat16 --compile  # see gpu.sh
    .venv/bin/python benchmarks/bench_speed.py --quick

For each pair it reports (medians over A/B/A/B-interleaved repetitions; on a CPU of process CPU time, which other
jobs on a shared machine disturb far less than wall time, with the wall-time ratios beside them):
- training step = zero_grad + forward + MSE + backward, and sampling step = no_grad forward, as images per second;
- FLOPs of each step counted by ``torch.utils.flop_counter.FlopCounterMode`` and the achieved GFLOP/s as a fraction of
  this machine's matmul peak, measured in the same run (best of a few large square matmuls in ``--dtype``);
- the top operators of one training step by self time (torch.profiler), with ``--profile``;
- peak resident memory of one training step at batch 64, one fresh subprocess per model, with ``--memory``
  (CPU/Linux only: the peak-RSS mark VmHWM, reset just before the step, minus the RSS before it).

Matched configurations (parameter counts printed, within 5%):
- U-Net: 3 levels (C, 2C, 2C), one ResBlock per level (two per level in the decoder, as both libraries do),
  attention at the two lower levels and in the middle, 32 channels per head, GroupNorm(8), scale-shift time
  modulation (diffusers: ``resnet_time_scale_shift="scale_shift"``), 1 -> 1 channels at 32x32.
- DiT: depth, width, heads and patch size of hfgen's "DiT-mini/2" (6 x 192, 3 heads, p=2) on 4 x 32 x 32 latents,
  class-conditional on 10 classes (diffusers' DiT is class-conditional only).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import header, interleaved_medians, synchronize, write_results
from diffusers import DiTTransformer2DModel, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

import hfgen

# ----------------------------------------------------------------------------------------------------------------------
# Matched models and their inputs
# ----------------------------------------------------------------------------------------------------------------------

UNET_SIZES = {"quick": 16, "small": 32, "base": 64}  # C of the (C, 2C, 2C) U-Net
DIT_SIZES = {"quick": (2, 64, 2), "small": (6, 192, 3), "base": (12, 384, 6)}  # depth, width, heads


def build(name: str, size: str) -> tuple[torch.nn.Module, dict]:
    """One of "unet_hfgen", "unet_diffusers", "dit_hfgen", "dit_diffusers" and the shape of its input."""
    if name.startswith("unet"):
        c = UNET_SIZES[size]
        channels, head_dim, groups = (c, 2 * c, 2 * c), min(32, 2 * c), 8
        if name == "unet_hfgen":
            model = hfgen.UNetModel(
                sample_size=32,
                in_channels=1,
                out_channels=1,
                block_out_channels=channels,
                layers_per_block=1,
                attention_levels=(False, True, True),
                attention_head_dim=head_dim,
                norm_num_groups=groups,
            )
        else:
            model = UNet2DModel(
                sample_size=32,
                in_channels=1,
                out_channels=1,
                block_out_channels=channels,
                layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=head_dim,
                norm_num_groups=groups,
                resnet_time_scale_shift="scale_shift",
            )
        return model, {"channels": 1, "labels": False}
    depth, width, heads = DIT_SIZES[size]
    if name == "dit_hfgen":
        model = hfgen.DiTModel(
            sample_size=32, in_channels=4, patch_size=2, hidden_size=width, depth=depth, num_heads=heads, num_classes=10
        )
    else:
        model = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=4,
            out_channels=4,
            num_layers=depth,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=10,
        )
    return model, {"channels": 4, "labels": True}


def make_inputs(spec: dict, batch: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec["channels"], 32, 32, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device) if spec["labels"] else None
    return x, t, y


def forward(model, x, t, y) -> torch.Tensor:
    if isinstance(model, DiTTransformer2DModel):
        return model(x, timestep=t, class_labels=y).sample
    if y is None:
        return model(x, t).sample
    return model(x, t, class_labels=y).sample


def train_step(model, x, t, y) -> None:
    model.zero_grad(set_to_none=True)
    out = forward(model, x, t, y)
    F.mse_loss(out.float(), x.float()).backward()


def sample_step(model, x, t, y) -> None:
    with torch.no_grad():
        forward(model, x, t, y)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_gflops(device, dtype, n: int, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul in ``dtype``: the machine's practical peak (CPU time on a CPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    clock = time.process_time if torch.device(device).type == "cpu" else time.perf_counter
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        a @ b
        synchronize(device)
        best = min(best, clock() - start)
    return 2 * n**3 / best / 1e9


def top_ops(model, x, t, y, k: int = 8) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    train_step(model, x, t, y)
    with profile(activities=activities) as prof:
        train_step(model, x, t, y)
    key = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    return [f"{e.key} {100 * getattr(e, key) / total:.0f}% ({e.count}x)" for e in events[:k]]


# ----------------------------------------------------------------------------------------------------------------------
# Memory: one fresh process per model
# ----------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(name: str, size: str, batch: int) -> dict:
    """
    Peak resident memory one training step adds: VmHWM (the kernel's peak-RSS mark, reset just before the step by
    writing 5 to /proc/self/clear_refs) minus VmRSS before the step. ``ru_maxrss`` cannot be reset, and importing
    torch and diffusers already sets it higher than a small model's step.
    """
    model, spec = build(name, size)
    x, t, y = make_inputs(spec, batch, "cpu", torch.float32)
    train_step(model, x[:2], t[:2], y[:2] if y is not None else None)  # lazy init, gradient buffers exist from here
    model.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    train_step(model, x, t, y)
    peak = _status_kib("VmHWM")
    return {
        "model": name,
        "peak_step_mb": (peak - before) / 1024,
        "peak_total_mb": peak / 1024,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure_memory(names: list[str], size: str, batch: int, threads: int) -> dict[str, dict]:
    results = {}
    for name in names:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory_worker",
            name,
            "--size",
            size,
            "--memory_batch_size",
            str(batch),
            "--threads",
            str(threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[name] = json.loads(out)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Denoiser speed: hfgen vs diffusers at matched configurations.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--compile", action="store_true", help="torch.compile both models of each pair")
    p.add_argument("--size", default="small", choices=tuple(UNET_SIZES), help="model size of both pairs")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="A/B rounds; medians are reported")
    p.add_argument("--models", default="unet,dit", help="comma list of pairs: unet, dit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--matmul_size", type=int, default=2048)
    p.add_argument("--profile", action="store_true", help="list the top ops of a training step")
    p.add_argument("--memory", action="store_true", help="peak RSS of a training step, one subprocess per model (CPU)")
    p.add_argument("--memory_batch_size", type=int, default=64)
    p.add_argument("--memory_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, default=None, help="append a markdown block to this file")
    p.add_argument("--quick", action="store_true", help="tiny models, batch 4, 2 rounds")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.size, args.memory_batch_size)))
        return {}
    if args.quick:
        args.size, args.batch_size, args.repeats, args.matmul_size = "quick", 4, 2, 256
        args.memory_batch_size = 8
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = "cpu" if device.type == "cpu" else "wall"  # process CPU time is steadier on a shared CPU
    peak = matmul_peak_gflops(device, dtype, args.matmul_size)
    results: dict = {"matmul_peak_gflops": peak, "pairs": {}}
    lines = [header(f"Denoiser speed (bench_speed.py){' [quick]' if args.quick else ''}")]
    lines.append(
        f"- device {device}, dtype {args.dtype}, compile {args.compile}, size {args.size}, batch {args.batch_size}, "
        f"{args.repeats} A/B rounds (medians of {clock} time); {args.dtype} matmul peak ({args.matmul_size}^3): "
        f"{peak:.1f} GFLOP/s\n"
    )
    lines.append(
        "| model | params | train img/s | sample img/s | train GFLOP/step | train GFLOP/s (% peak) | "
        "sample GFLOP/s (% peak) |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    profiles = []
    for pair in args.models.split(","):
        names = [f"{pair}_hfgen", f"{pair}_diffusers"]
        models, inputs, flops, params = {}, {}, {}, {}
        for name in names:
            torch.manual_seed(0)
            model, spec = build(name, args.size)
            model = model.to(device, dtype).train()
            params[name] = sum(p.numel() for p in model.parameters())
            inputs[name] = make_inputs(spec, args.batch_size, device, dtype)
            flops[name] = {
                "train": count_flops(lambda m=model, i=inputs[name]: train_step(m, *i)),
                "sample": count_flops(lambda m=model, i=inputs[name]: sample_step(m, *i)),
            }
            if args.profile:
                profiles.append(f"- {name}: " + "; ".join(top_ops(model, *inputs[name])))
            models[name] = torch.compile(model) if args.compile else model
        fns = {}
        for name in names:
            fns[f"{name}/train"] = lambda m=models[name], i=inputs[name]: train_step(m, *i)
            fns[f"{name}/sample"] = lambda m=models[name], i=inputs[name]: sample_step(m, *i)
        med = interleaved_medians(fns, args.repeats, device, warmup=2 if args.compile else 1)
        for name in names:
            tr, sa = med[f"{name}/train"][clock], med[f"{name}/sample"][clock]
            gf_tr, gf_sa = flops[name]["train"] / tr / 1e9, flops[name]["sample"] / sa / 1e9
            results["pairs"][name] = {
                "params": params[name],
                "train_s": tr,
                "sample_s": sa,
                "train_img_s": args.batch_size / tr,
                "sample_img_s": args.batch_size / sa,
                "train_gflop": flops[name]["train"] / 1e9,
                "sample_gflop": flops[name]["sample"] / 1e9,
                "train_gflops": gf_tr,
                "sample_gflops": gf_sa,
                "train_wall_s": med[f"{name}/train"]["wall"],
                "sample_wall_s": med[f"{name}/sample"]["wall"],
            }
            lines.append(
                f"| {name} | {params[name] / 1e6:.3f}M | {args.batch_size / tr:.1f} | {args.batch_size / sa:.1f} | "
                f"{flops[name]['train'] / 1e9:.2f} | {gf_tr:.1f} ({100 * gf_tr / peak:.0f}%) | "
                f"{gf_sa:.1f} ({100 * gf_sa / peak:.0f}%) |"
            )
        h, d = results["pairs"][names[0]], results["pairs"][names[1]]
        results["pairs"][pair] = {
            "param_ratio": h["params"] / d["params"],
            "train_speed_ratio": d["train_s"] / h["train_s"],
            "sample_speed_ratio": d["sample_s"] / h["sample_s"],
            "train_wall_ratio": d["train_wall_s"] / h["train_wall_s"],
            "sample_wall_ratio": d["sample_wall_s"] / h["sample_wall_s"],
        }
    lines.append("")
    for pair in args.models.split(","):
        r = results["pairs"][pair]
        lines.append(
            f"- {pair}: hfgen/diffusers speed ratio by {clock} time (>1 = hfgen faster): training "
            f"{r['train_speed_ratio']:.2f}x, sampling {r['sample_speed_ratio']:.2f}x (by wall time: "
            f"{r['train_wall_ratio']:.2f}x, {r['sample_wall_ratio']:.2f}x); parameter ratio {r['param_ratio']:.3f}"
        )
    if profiles:
        lines.append("\nTop ops of one training step (self time):\n")
        lines.extend(profiles)
    if args.memory and device.type == "cpu":
        names = [f"{pair}_{lib}" for pair in args.models.split(",") for lib in ("hfgen", "diffusers")]
        mem = measure_memory(names, args.size, args.memory_batch_size, args.threads)
        results["memory"] = mem
        lines.append(
            f"\nPeak resident memory of one training step at batch {args.memory_batch_size} (fresh process each):\n"
        )
        for pair in args.models.split(","):
            h, d = mem[f"{pair}_hfgen"], mem[f"{pair}_diffusers"]
            lines.append(
                f"- {pair}: hfgen {h['peak_step_mb']:.0f} MB, diffusers {d['peak_step_mb']:.0f} MB "
                f"(ratio hfgen/diffusers {h['peak_step_mb'] / max(d['peak_step_mb'], 1e-9):.2f}); "
                f"process totals {h['peak_total_mb']:.0f} / {d['peak_total_mb']:.0f} MB"
            )
    write_results("\n".join(lines) + "\n", args.results)
    return results


if __name__ == "__main__":
    main(parse_args())
