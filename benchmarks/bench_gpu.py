"""
Training throughput on a GPU: hfgen vs diffusers at matched configurations, bf16 autocast, eager and torch.compile'd.

    .venv/bin/python benchmarks/bench_gpu.py --device cuda --results benchmarks/RESULTS.md   # see gpu.sh
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --dry_run --compile_backend eager   # tiny, on a CPU

Pairs (``--dry_run``: the tiny preset named second, for a CPU in well under a minute):
- unet: hfgen ``UNetModel`` vs diffusers ``UNet2DModel``, bench_speed.py's matched pair at its size "base" ("quick"):
  channels (64, 128, 128), attention at the two lower levels, on 1 x 32 x 32 images;
- dit-b2, dit-xl2: ``DiTModel`` vs ``DiTTransformer2DModel``, the paper's DiT-B/2 (12 x 768, 12 heads) and DiT-XL/2
  (28 x 1152, 16 heads) ("DiT-tiny/2") on 4 x 32 x 32 latents (256 x 256 images through the SD VAE), class-conditional
  on 1000 classes; the diffusers model is ``to_diffusers()`` of the hfgen one, so the two hold the same weights;
- rin: hfgen ``RINModel`` "RIN-cifar" ("RIN-tiny") on 3 x 32 x 32 images alone (diffusers has no RIN), without
  self-conditioning (its extra no-grad forward is the training script's, not the model's).

For each model and mode (eager, ``torch.compile`` of the model) it times the full training step: forward under
``torch.autocast`` (``--autocast bfloat16``, float32 weights), MSE loss, backward, AdamW step; ``--warmup`` steps, then
the mean wall time of ``--steps`` steps between two device synchronisations. It reports:
- images per second and ms per step; compile time = first step - steady step (compiled mode);
- peak memory, ``torch.cuda.max_memory_allocated`` (weights, gradients, AdamW state, activations; n/a on a CPU);
- FLOPs of one training step (forward + backward; AdamW's elementwise work is not counted) by
  ``torch.utils.flop_counter.FlopCounterMode``, counted once in eager, and MFU = achieved FLOP/s / the device's dense
  bf16 peak (``--peak_tflops``; by default from ``PEAK_BF16_TFLOPS`` by device name, else n/a).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
import time
from pathlib import Path

import bench_speed
import torch
import torch.nn.functional as F
from common import header, synchronize, time_call, write_results
from torch.nn.attention import SDPBackend, sdpa_kernel

import hfgen

# ----------------------------------------------------------------------------------------------------------------------
# Matched models and their inputs
# ----------------------------------------------------------------------------------------------------------------------

SIZES = {  # pair: (preset of the full run, preset of the dry run)
    "unet": ("base", "quick"),  # bench_speed.build sizes
    "dit-b2": ("DiT-B/2", "DiT-tiny/2"),
    "dit-xl2": ("DiT-XL/2", "DiT-tiny/2"),
    "rin": ("RIN-cifar", "RIN-tiny"),
}
LIBRARIES = {  # pair: the libraries that have it
    "unet": ("hfgen", "diffusers"),
    "dit-b2": ("hfgen", "diffusers"),
    "dit-xl2": ("hfgen", "diffusers"),
    "rin": ("hfgen",),  # diffusers has no RIN
}
MODES = ("eager", "compiled")
PEAK_BF16_TFLOPS = (  # (pattern of torch.cuda.get_device_name, dense bf16 tensor-core TFLOP/s); first match wins
    (r"H200", 989.0),
    (r"H100 PCIe", 756.0),
    (r"H100.*(SXM|HBM3)", 989.0),  # the SXM card is "NVIDIA H100 80GB HBM3"
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
)


def build(pair: str, library: str, dry_run: bool) -> tuple[torch.nn.Module, dict]:
    """The ``library`` model of ``pair`` and its input: ``{"channels": C, "num_classes": n or None}``."""
    if library not in LIBRARIES[pair]:
        raise ValueError(f"{pair} has no {library} model, only {LIBRARIES[pair]}")
    preset = SIZES[pair][dry_run]
    if pair == "unet":
        model, spec = bench_speed.build(f"unet_{library}", preset)
        return model, {"channels": spec["channels"], "num_classes": None}
    if pair == "rin":
        model = hfgen.RINModel(**hfgen.RIN_PRESETS[preset], sample_size=32, in_channels=3)
        return model, {"channels": 3, "num_classes": None}
    # the settings diffusers' DiT has (hfgen.convert_dit): timestep frequencies shifted by 1, [column | row] positions
    model = hfgen.DiTModel(
        **hfgen.DIT_PRESETS[preset],
        sample_size=32,
        in_channels=4,
        num_classes=1000,
        freq_shift=1.0,
        pos_embed_columns_first=True,
    )
    return model if library == "hfgen" else model.to_diffusers(), {"channels": 4, "num_classes": 1000}


def make_inputs(spec: dict, batch: int, device: torch.device) -> tuple:
    """``(x, t, y, target)``: noisy input and regression target (B, C, 32, 32), timesteps (B,), labels (B,) or None."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec["channels"], 32, 32, generator=g)  # (B, C, H, W)
    target = torch.randn(x.shape, generator=g)  # (B, C, H, W), the noise of an eps objective, say
    t = torch.randint(0, 1000, (batch,), generator=g)  # (B,)
    y = torch.randint(0, spec["num_classes"], (batch,), generator=g) if spec["num_classes"] else None  # (B,)
    return x.to(device), t.to(device), y.to(device) if y is not None else None, target.to(device)


# ----------------------------------------------------------------------------------------------------------------------
# Training step, its FLOPs and its time
# ----------------------------------------------------------------------------------------------------------------------


def loss_of(model: torch.nn.Module, inputs: tuple, autocast: torch.dtype | None) -> torch.Tensor:
    """MSE of the model's output (forward under ``torch.autocast`` to ``autocast``; None: off) to the target."""
    x, t, y, target = inputs
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        out = bench_speed.forward(model, x, t, y)  # (B, C, H, W)
    return F.mse_loss(out.float(), target)


def train_step(model: torch.nn.Module, optimizer, inputs: tuple, autocast: torch.dtype | None) -> None:
    loss = loss_of(model, inputs, autocast)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def count_train_flops(model: torch.nn.Module, inputs: tuple, autocast: torch.dtype | None) -> int:
    """
    FLOPs of one forward + backward (``FlopCounterMode``: matmuls, convolutions, attention). The CPU's fused attention
    kernel has no FLOP formula there, so on a CPU attention runs as plain matmuls (``SDPBackend.MATH``) while counting.
    """
    cpu = inputs[0].device.type == "cpu"
    with sdpa_kernel(SDPBackend.MATH) if cpu else contextlib.nullcontext():
        flops = bench_speed.count_flops(lambda: loss_of(model, inputs, autocast).backward())
    model.zero_grad(set_to_none=True)
    return flops


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, mean seconds per call of ``steps`` calls after ``warmup`` calls in all)."""
    first, _ = time_call(step, device)
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return first, (time.perf_counter() - start) / steps


def run_mode(
    model: torch.nn.Module, inputs: tuple, mode: str, autocast: torch.dtype | None, args: argparse.Namespace
) -> dict:
    """Time the training step of ``model`` in ``mode`` ("eager" or "compiled"); peak memory in GiB (None on a CPU)."""
    device = inputs[0].device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model, backend=args.compile_backend) if mode == "compiled" else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        train_step(net, optimizer, inputs, autocast)

    first_s, step_s = time_steps(step, args.warmup, args.steps, device)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.zero_grad(set_to_none=True)
    if mode == "compiled":
        torch._dynamo.reset()  # the next model compiles from scratch, and its compile time says so
    return {"step_s": step_s, "compile_s": first_s - step_s if mode == "compiled" else None, "peak_gib": peak_gib}


def device_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known CUDA device from ``PEAK_BF16_TFLOPS``, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for pattern, tflops in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def comma_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = text.split(",")
    for name in names:
        if name not in allowed:
            raise ValueError(f"unknown {what} {name!r}, choose from {allowed}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Training throughput on a GPU: hfgen vs diffusers at matched configs.")
    p.add_argument("--device", default="cuda")
    p.add_argument("--pairs", default=",".join(SIZES), help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of eager, compiled")
    p.add_argument("--autocast", default="bfloat16", choices=("bfloat16", "none"), help="forward dtype; weights fp32")
    p.add_argument(
        "--compile_backend", default="inductor", help="torch.compile backend (eager, aot_eager: no code generation)"
    )
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, the first one included")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak; default: from the device name")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=None, help="append a markdown block to this file")
    p.add_argument("--dry_run", action="store_true", help="tiny models, batch 2, 1 warmup and 2 timed steps")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.dry_run:
        args.batch_size, args.warmup, args.steps = 2, 1, 2
    if args.warmup < 1 or args.steps < 1:
        raise ValueError(f"warmup and steps must be >= 1, got {args.warmup} and {args.steps}")
    pairs, modes = comma_list(args.pairs, tuple(SIZES), "pair"), comma_list(args.modes, MODES, "mode")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA device: torch.cuda.is_available() is False")
    autocast = None if args.autocast == "none" else getattr(torch, args.autocast)
    peak_tflops = args.peak_tflops or device_peak_tflops(device)

    results: dict = {}
    lines = [header(f"Training throughput (bench_gpu.py){' [dry run]' if args.dry_run else ''}")]
    peak_text = f"{peak_tflops:g} TFLOP/s dense bf16" if peak_tflops else "n/a (pass --peak_tflops)"
    lines.append(
        f"- device {device}, autocast {args.autocast} (float32 weights), AdamW, batch {args.batch_size}, "
        f"{args.warmup} warmup + {args.steps} timed steps (mean wall time), compile backend {args.compile_backend}; "
        f"FLOPs of forward + backward (FlopCounterMode, eager); MFU against {peak_text}\n"
    )
    lines.append(
        "| pair | library | mode | params | img/s | ms/step | compile s | peak GiB | GFLOP/step | TFLOP/s | MFU |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        for library in LIBRARIES[pair]:
            torch.manual_seed(0)
            model, spec = build(pair, library, args.dry_run)
            model = model.to(device).train()
            params = sum(p.numel() for p in model.parameters())
            inputs = make_inputs(spec, args.batch_size, device)
            flops = count_train_flops(model, inputs, autocast)
            for mode in modes:
                r = run_mode(model, inputs, mode, autocast, args)
                r.update(params=params, flops=flops, img_s=args.batch_size / r["step_s"])
                r["tflop_s"] = flops / r["step_s"] / 1e12
                r["mfu"] = r["tflop_s"] / peak_tflops if peak_tflops else None
                results[pair, library, mode] = r
                compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
                peak_gib = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                lines.append(
                    f"| {pair} | {library} | {mode} | {params / 1e6:.2f}M | {r['img_s']:.4g} | "
                    f"{1e3 * r['step_s']:.4g} | {compile_s} | {peak_gib} | {flops / 1e9:.4g} | {r['tflop_s']:.4g} | "
                    f"{mfu} |"
                )
            del model, inputs
            free_memory(device)
    lines.append("")
    for pair in pairs:
        for mode in modes:
            if (pair, "diffusers", mode) in results:
                h, d = results[pair, "hfgen", mode], results[pair, "diffusers", mode]
                lines.append(
                    f"- {pair} {mode}: hfgen/diffusers images/s {h['img_s'] / d['img_s']:.2f}x, peak memory "
                    + (f"{h['peak_gib'] / d['peak_gib']:.2f}x" if h["peak_gib"] else "n/a")
                    + f", FLOPs per step {h['flops'] / d['flops']:.3f}x, parameters {h['params'] / d['params']:.3f}x"
                )
    write_results("\n".join(lines) + "\n", args.results)
    return results


if __name__ == "__main__":
    main(parse_args())
