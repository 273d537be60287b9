"""
Denoiser speed and memory: hfgen ``UNetModel`` vs diffusers ``UNet2DModel``, hfgen ``DiTModel`` vs diffusers
``DiTTransformer2DModel`` and hfgen ``RINModel`` alone (diffusers has no RIN), at matched configurations, eager and
``torch.compile``'d, in one process.

    .venv/bin/python benchmarks/bench_speed.py --results benchmarks/RESULTS.md           # CPU, float32, 2 threads
    .venv/bin/python benchmarks/bench_speed.py --variants eager,compiled --models dit     # a shorter run
    .venv/bin/python benchmarks/bench_speed.py --device cuda --dtype bfloat16            # see gpu.sh
    .venv/bin/python benchmarks/bench_speed.py --quick                                   # tiny, eager, 1 thread

Every model runs in each of ``--variants``, all timed side by side in the same A/B/A/B-interleaved rounds:
``eager``; ``channels_last`` (weights and input in ``torch.channels_last``: the U-Nets only, the convolutional
models); ``compiled`` (``torch.compile``, inductor, default mode); ``compiled_channels_last`` (both); ``compiled_frozen``
(sampling only: ``torch.compile(model, options={"freezing": True})``, which folds the weights of a no-grad graph into
it as constants, so it suits a sampling pipeline whose weights no longer change); ``autocast_bf16``,
``channels_last_autocast_bf16`` and ``compiled_autocast_bf16`` (the forward under ``torch.autocast(bfloat16)`` over
float32 weights, loss and backward outside it: what ``train_diffusion.py --mixed_precision bf16`` runs; it pays on a
CPU whose bf16 matmuls are faster than its float32 ones, as on AVX-512-bf16 EPYCs, and costs elsewhere). The compile
time of a compiled variant is the wall time its first training and first sampling call took beyond a steady one (the
inductor cache in /tmp makes a rerun compile faster; a full run compiles 7 models, about a minute each on 2 CPU
cores with a cold cache). The summary gives the speed ratios the goals are stated in:
hfgen compiled vs diffusers eager, and each hfgen variant vs the same diffusers variant.

For each model and variant it reports (medians over the interleaved rounds; on a CPU of process CPU time, which other
jobs on a shared machine disturb far less than wall time, with the wall-time ratios beside them):
- training step = zero_grad + forward + MSE + backward (the model in train mode), and sampling step = no_grad
  forward of an eval-mode copy (as in a pipeline), as images per second;
- FLOPs of each step counted by ``torch.utils.flop_counter.FlopCounterMode`` and the achieved GFLOP/s as a fraction of
  this machine's matmul peak, measured in the same run (best of a few large square matmuls in ``--dtype``; in
  bfloat16 for the autocast variants);
- the top operators of one training step by self time (torch.profiler), with ``--profile``;
- peak resident memory of one training step at batch 64, one fresh subprocess per model, with ``--memory``
  (CPU/Linux only: the peak-RSS mark VmHWM, reset just before the step, minus the RSS before it).

Matched configurations (parameter counts printed, within 5%):
- U-Net: 3 levels (C, 2C, 2C), one ResBlock per level (two per level in the decoder, as both libraries do),
  attention at the two lower levels and in the middle, 32 channels per head, GroupNorm(8), scale-shift time
  modulation (diffusers: ``resnet_time_scale_shift="scale_shift"``), 1 -> 1 channels at 32x32.
- DiT: depth, width, heads and patch size of hfgen's "DiT-mini/2" (6 x 192, 3 heads, p=2; ``--dit_patch_size``) on 4 x 32 x 32 latents,
  class-conditional on 10 classes (diffusers' DiT is class-conditional only).
- RIN: the "RIN-small" preset, unconditional on 1 x 32 x 32 like the U-Nets; one forward per training step (the
  self-conditioning pass of ``train_diffusion.py`` is a second, no-grad forward on top).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import header, interleaved_medians, synchronize, time_call, write_results
from diffusers import DiTTransformer2DModel, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

import hfgen

# ----------------------------------------------------------------------------------------------------------------------
# Matched models and their inputs
# ----------------------------------------------------------------------------------------------------------------------

UNET_SIZES = {"quick": 16, "small": 32, "base": 64}  # C of the (C, 2C, 2C) U-Net
DIT_SIZES = {"quick": (2, 64, 2), "small": (6, 192, 3), "base": (12, 384, 6)}  # depth, width, heads
RIN_SIZES = {"quick": "RIN-tiny", "small": "RIN-small", "base": "RIN-cifar"}
FAMILIES = {"unet": ("hfgen", "diffusers"), "dit": ("hfgen", "diffusers"), "rin": ("hfgen",)}
CONVOLUTIONAL = ("unet",)  # the families that channels_last applies to
VARIANTS = (
    "eager",
    "channels_last",
    "compiled",
    "compiled_channels_last",
    "compiled_frozen",
    "autocast_bf16",
    "channels_last_autocast_bf16",
    "compiled_autocast_bf16",
)
# the forward under torch.autocast(bfloat16) over float32 weights, as ``--mixed_precision bf16`` trains; a full run
# leaves out the compiled one (one more compile per model): name it in --variants
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "compiled_autocast_bf16")
AUTOCAST = "autocast_bf16"
# sampling only: inductor's freezing folds the weights into a no-grad graph as constants (prepacked oneDNN linear
# and convolution weights, fused epilogues); a training graph is not frozen, so these have no training step
SAMPLING_ONLY = ("compiled_frozen",)


class AutocastForward(torch.nn.Module):
    """``model``'s forward under ``torch.autocast(bfloat16)``, its weights float32: what Accelerate's
    ``--mixed_precision bf16`` runs (on a CPU too); the loss and the backward stay outside, as there."""

    def __init__(self, model: torch.nn.Module, device_type: str):
        super().__init__()
        self.model, self.device_type = model, device_type
        self.train(model.training)

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(*args, **kwargs)


def build(name: str, size: str, dit_patch_size: int = 2) -> tuple[torch.nn.Module, dict]:
    """One of "unet_hfgen", "unet_diffusers", "dit_hfgen", "dit_diffusers", "rin_hfgen" and the shape of its input."""
    if name == "rin_hfgen":
        model = hfgen.RINModel(**hfgen.RIN_PRESETS[RIN_SIZES[size]], sample_size=32, in_channels=1)
        return model, {"channels": 1, "labels": False}
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
            sample_size=32,
            in_channels=4,
            patch_size=dit_patch_size,
            hidden_size=width,
            depth=depth,
            num_heads=heads,
            num_classes=10,
        )
    else:
        model = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=4,
            out_channels=4,
            num_layers=depth,
            sample_size=32,
            patch_size=dit_patch_size,
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
    """All five take (sample, timestep, class_labels=...) in this order, torch.compile'd or not."""
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


def memory_worker(name: str, size: str, batch: int, dit_patch_size: int = 2) -> dict:
    """
    Peak resident memory one training step adds: VmHWM (the kernel's peak-RSS mark, reset just before the step by
    writing 5 to /proc/self/clear_refs) minus VmRSS before the step. ``ru_maxrss`` cannot be reset, and importing
    torch and diffusers already sets it higher than a small model's step.
    """
    model, spec = build(name, size, dit_patch_size)
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


def measure_memory(names: list[str], size: str, batch: int, threads: int, dit_patch_size: int) -> dict[str, dict]:
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
            "--dit_patch_size",
            str(dit_patch_size),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[name] = json.loads(out)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Variants: eager, channels_last, compiled
# ----------------------------------------------------------------------------------------------------------------------


def autocasts(variants: list[str]) -> bool:
    return any(AUTOCAST in v for v in variants)


def variant_names(family: str, variants: list[str]) -> list[str]:
    """The variants that apply to ``family``: channels_last only to the convolutional ones."""
    return [v for v in variants if "channels_last" not in v or family in CONVOLUTIONAL]


def prepare_variant(model, inputs, variant: str, backend: str):
    """The model and inputs of one variant; ``model`` itself stays eager and contiguous (variants share weights)."""
    x, t, y = inputs
    if "channels_last" in variant:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if AUTOCAST in variant:
        model = AutocastForward(model, x.device.type)
    if variant.startswith("compiled"):
        frozen = "frozen" in variant and backend == "inductor"  # options are inductor's (--quick traces only)
        model = torch.compile(model, backend=backend, **({"options": {"freezing": True}} if frozen else {}))
    return model, (x, t, y)


def first_calls(fns: dict, device) -> dict[str, float]:
    """Wall seconds of the first call of each function (the compile, for a compiled one)."""
    return {name: time_call(fn, device)[0] for name, fn in fns.items()}


def measure_family(names: list[str], variants: list[str], args, backend: str, profiles: list[str]):
    """Time every (model, variant) of one family in the same interleaved rounds, after compiling the compiled ones.
    Returns the medians ``{"<name>/<variant>/<train|sample>": {"wall", "cpu"}}``, the wall seconds of each compiled
    function's first call, and each model's FLOPs per step and parameter count."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    flops, params, fns, compiled = {}, {}, {}, {}
    for name in names:
        torch.manual_seed(0)
        model, spec = build(name, args.size, args.dit_patch_size)
        model = model.to(device, dtype).train()
        params[name] = sum(p.numel() for p in model.parameters())
        inputs = make_inputs(spec, args.batch_size, device, dtype)
        # a pipeline samples with its model in eval mode (``from_pretrained`` returns it so): so do the sampling steps
        sampler = copy.deepcopy(model).eval()
        flops[name] = {
            "train": count_flops(lambda m=model, i=inputs: train_step(m, *i)),
            "sample": count_flops(lambda m=sampler, i=inputs: sample_step(m, *i)),
        }
        if args.profile:
            profiles.append(f"- {name}: " + "; ".join(top_ops(model, *inputs)))
        for variant in variants:
            key = f"{name}/{variant}"
            steps = ("sample",) if variant in SAMPLING_ONLY else ("train", "sample")
            for step in steps:
                m, i = prepare_variant(model if step == "train" else sampler, inputs, variant, backend)
                f = train_step if step == "train" else sample_step
                fns[f"{key}/{step}"] = lambda m=m, i=i, f=f: f(m, *i)
                if variant.startswith("compiled"):
                    compiled[f"{key}/{step}"] = fns[f"{key}/{step}"]
    first = first_calls(compiled, device)  # the compiles, one function at a time
    med = interleaved_medians(fns, args.repeats, device, warmup=2 if compiled else 1)
    return med, first, flops, params


def speed_ratio(med: dict, a: str, b: str, step: str, clock: str) -> float | None:
    """Speed of ``a`` relative to ``b`` (time of b / time of a: > 1 = a faster) for one step kind and clock; None
    where one of them has no such step (a sampling-only variant's training)."""
    if f"{a}/{step}" not in med or f"{b}/{step}" not in med:
        return None
    return med[f"{b}/{step}"][clock] / med[f"{a}/{step}"][clock]


def fmt(value: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def comparisons(variants: list[str]) -> list[tuple[str, str]]:
    """(hfgen variant, diffusers variant) pairs of the summary: the same variant, then hfgen's faster ones against
    diffusers eager (the issue's goal: hfgen compiled >= 1.3x diffusers eager, and >= 1x diffusers compiled)."""
    pairs = [(v, v) for v in variants]
    pairs += [(v, "eager") for v in variants if v != "eager" and "eager" in variants]
    return pairs


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Denoiser speed: hfgen vs diffusers at matched configurations.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma list of {VARIANTS}, timed side by side (default: all but compiled_autocast_bf16); "
        f"channels_last ones apply to {CONVOLUTIONAL} only",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the compiled variants too (default: yes, except with --quick); --no-compile keeps eager ones",
    )
    p.add_argument(
        "--compile_backend",
        default=None,
        help="torch.compile backend of the compiled variants (default inductor; with --quick: eager, which only "
        "traces, so that --quick --compile checks the compiled variants' code without inductor's C++ builds)",
    )
    p.add_argument("--size", default="small", choices=tuple(UNET_SIZES), help="model size of every family")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument(
        "--dit_patch_size",
        type=int,
        default=2,
        help="both DiTs' patch size p on the 32x32 latents (2: DiT-mini/2; 4: the patch of the MNIST DiT recipe)",
    )
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds; medians are reported")
    p.add_argument("--models", default="unet,dit,rin", help=f"comma list of {tuple(FAMILIES)}")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads; default 2 (this machine's cores: for a quiet machine), 1 with --quick (tiny ops on "
        "2 threads of a busy machine wait for each other)",
    )
    p.add_argument("--matmul_size", type=int, default=2048)
    p.add_argument("--profile", action="store_true", help="list the top ops of an eager training step")
    p.add_argument(
        "--memory", action="store_true", help="peak RSS of an eager training step, one subprocess per model (CPU)"
    )
    p.add_argument("--memory_batch_size", type=int, default=64)
    p.add_argument("--memory_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, default=None, help="append a markdown block to this file")
    p.add_argument("--quick", action="store_true", help="tiny models, batch 4, 2 rounds, eager variants, 1 thread")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants {unknown} are not among {VARIANTS}")
    families = args.models.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"--models {unknown} are not among {tuple(FAMILIES)}")
    return args


def variant_row(med: dict, first: dict, flops: dict, params: dict, name: str, variant: str, batch: int, clock: str):
    """One model's numbers at one variant: seconds, images/s, GFLOP/s and (compiled variants) the compile time, i.e.
    the first calls' wall time beyond a timed call's."""
    key = f"{name}/{variant}"
    has_train = f"{key}/train" in med
    steps = ("train", "sample") if has_train else ("sample",)
    tr, sa = med[f"{key}/train"][clock] if has_train else None, med[f"{key}/sample"][clock]
    compile_s = None
    if variant.startswith("compiled"):
        compile_s = sum(first[f"{key}/{step}"] - med[f"{key}/{step}"]["wall"] for step in steps)
    return {
        "params": params[name],
        "train_s": tr,
        "sample_s": sa,
        "train_img_s": batch / tr if has_train else None,
        "sample_img_s": batch / sa,
        "train_gflop": flops[name]["train"] / 1e9,
        "sample_gflop": flops[name]["sample"] / 1e9,
        "train_gflops": flops[name]["train"] / tr / 1e9 if has_train else None,
        "sample_gflops": flops[name]["sample"] / sa / 1e9,
        "train_wall_s": med[f"{key}/train"]["wall"] if has_train else None,
        "sample_wall_s": med[f"{key}/sample"]["wall"],
        "compile_s": compile_s,
    }


def variant_line(name: str, variant: str, row: dict, own: str, peak: float) -> str:
    gf_tr, gf_sa = row["train_gflops"], row["sample_gflops"]
    train_cells = "-" if gf_tr is None else f"{gf_tr:.1f} ({100 * gf_tr / peak:.0f}%)"
    return (
        f"| {name} | {variant} | {row['params'] / 1e6:.3f}M | {fmt(row['train_img_s'], '.1f', '')} | "
        f"{row['sample_img_s']:.1f} | {own} | {train_cells} | "
        f"{gf_sa:.1f} ({100 * gf_sa / peak:.0f}%) | {fmt(row['compile_s'], '.0f', '')} |"
    )


def own_eager_cell(med: dict, name: str, variant: str, variants: list[str], clock: str) -> str:
    """The "x own eager" cell: this variant's training and sampling speed over the same model's eager run."""
    if "eager" not in variants:
        return "-"
    key, eager = f"{name}/{variant}", f"{name}/eager"
    return f"{fmt(speed_ratio(med, key, eager, 'train', clock))}, {fmt(speed_ratio(med, key, eager, 'sample', clock))}"


def pair_ratios(med: dict, a: str, b: str, clock: str) -> dict:
    """Speed of ``a`` over ``b`` for both steps, by the benchmark's clock and by wall time."""
    return {
        "train": speed_ratio(med, a, b, "train", clock),
        "sample": speed_ratio(med, a, b, "sample", clock),
        "train_wall": speed_ratio(med, a, b, "train", "wall"),
        "sample_wall": speed_ratio(med, a, b, "sample", "wall"),
    }


def compare_libraries(med: dict, names: list[str], params: dict, variants: list[str], clock: str, family: str):
    """hfgen against diffusers for one family: the eager pair's summary (None without an eager run), the ratios of
    every compared variant pair, and their summary-table lines."""
    h, d = names
    pair = None
    if "eager" in variants:
        r = pair_ratios(med, f"{h}/eager", f"{d}/eager", clock)
        pair = {
            "param_ratio": params[h] / params[d],
            "train_speed_ratio": r["train"],
            "sample_speed_ratio": r["sample"],
            "train_wall_ratio": r["train_wall"],
            "sample_wall_ratio": r["sample_wall"],
        }
    ratios, lines = {}, []
    for hv, dv in comparisons(variants):
        r = pair_ratios(med, f"{h}/{hv}", f"{d}/{dv}", clock)
        ratios[f"{hv} / {dv}"] = r
        lines.append(
            f"| {family} | {hv} | {dv} | {fmt(r['train'])} | {fmt(r['sample'])} | "
            f"{fmt(r['train_wall'])}, {fmt(r['sample_wall'])} |"
        )
    return pair, ratios, lines


def memory_lines(mem: dict, families: list[str], batch: int) -> list[str]:
    lines = [f"\nPeak resident memory of one eager training step at batch {batch} (fresh process each):\n"]
    for family in families:
        h = mem[f"{family}_hfgen"]
        line = f"- {family}: hfgen {h['peak_step_mb']:.0f} MB"
        if f"{family}_diffusers" in mem:
            d = mem[f"{family}_diffusers"]
            line += (
                f", diffusers {d['peak_step_mb']:.0f} MB (ratio hfgen/diffusers "
                f"{h['peak_step_mb'] / max(d['peak_step_mb'], 1e-9):.2f}); process totals "
                f"{h['peak_total_mb']:.0f} / {d['peak_total_mb']:.0f} MB"
            )
        lines.append(line)
    return lines


def apply_quick(args: argparse.Namespace) -> None:
    """--quick and the thread default: tiny models, batch 4, 2 rounds, 1 thread."""
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.quick:
        args.size, args.batch_size, args.repeats, args.matmul_size = "quick", 4, 2, 256
        args.memory_batch_size = 8


def main(args: argparse.Namespace) -> dict:
    apply_quick(args)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.size, args.memory_batch_size, args.dit_patch_size)))
        return {}
    compile_on = not args.quick if args.compile is None else args.compile
    backend = args.compile_backend or ("eager" if args.quick else "inductor")
    variants = [v for v in args.variants.split(",") if compile_on or not v.startswith("compiled")]
    families = args.models.split(",")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = "cpu" if device.type == "cpu" else "wall"  # process CPU time is steadier on a shared CPU
    peak = matmul_peak_gflops(device, dtype, args.matmul_size)
    bf16_peak = matmul_peak_gflops(device, torch.bfloat16, args.matmul_size) if autocasts(variants) else None
    results: dict = {"matmul_peak_gflops": peak, "pairs": {}, "variants": {}, "ratios": {}}
    if bf16_peak is not None:
        results["matmul_peak_gflops_bf16"] = bf16_peak
    lines = [header(f"Denoiser speed (bench_speed.py){' [quick]' if args.quick else ''}")]
    lines.append(
        f"- device {device}, dtype {args.dtype}, size {args.size} (DiT patch {args.dit_patch_size}), batch {args.batch_size}, variants "
        f"{', '.join(variants)} (compile backend {backend}), {args.repeats} interleaved rounds (medians of {clock} "
        f"time); {args.dtype} matmul peak ({args.matmul_size}^3): {peak:.1f} GFLOP/s"
        + (f"; bfloat16 (the autocast variants' peak): {bf16_peak:.1f} GFLOP/s" if bf16_peak else "")
        + "\n"
    )
    if backend != "inductor" and any("frozen" in v for v in variants):
        lines.append(f"- freezing is inductor's: with backend {backend} the frozen variants are compiled, not frozen\n")
    lines.append(
        "| model | variant | params | train img/s | sample img/s | train, sample x own eager | "
        "train GFLOP/s (% peak) | sample GFLOP/s (% peak) | compile s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    summary, profiles = [], []
    for family in families:
        names = [f"{family}_{lib}" for lib in FAMILIES[family]]
        fam_variants = variant_names(family, variants)
        med, first, flops, params = measure_family(names, fam_variants, args, backend, profiles)
        for name in names:
            results["variants"][name] = {}
            for variant in fam_variants:
                row = variant_row(med, first, flops, params, name, variant, args.batch_size, clock)
                results["variants"][name][variant] = row
                if variant == "eager":
                    results["pairs"][name] = row
                own = own_eager_cell(med, name, variant, fam_variants, clock)
                lines.append(variant_line(name, variant, row, own, bf16_peak if AUTOCAST in variant else peak))
        if len(names) < 2:
            continue
        pair, results["ratios"][family], family_lines = compare_libraries(
            med, names, params, fam_variants, clock, family
        )
        if pair is not None:
            results["pairs"][family] = pair
        summary.extend(family_lines)
    lines.append("")
    if summary:
        ratios = ", ".join(f"{f} {results['pairs'][f]['param_ratio']:.3f}" for f in families if f in results["pairs"])
        lines.append(
            f"hfgen speed relative to diffusers by {clock} time (> 1 = hfgen faster), and by wall time; "
            f"parameter ratios hfgen/diffusers: {ratios}\n"
        )
        lines.append("| family | hfgen | diffusers | training | sampling | by wall time: training, sampling |")
        lines.append("|---|---|---|---|---|---|")
        lines.extend(summary)
    if profiles:
        lines.append("\nTop ops of one eager training step (self time):\n")
        lines.extend(profiles)
    if args.memory and device.type == "cpu":
        names = [f"{family}_{lib}" for family in families for lib in FAMILIES[family]]
        results["memory"] = measure_memory(names, args.size, args.memory_batch_size, args.threads, args.dit_patch_size)
        lines.extend(memory_lines(results["memory"], families, args.memory_batch_size))
    write_results("\n".join(lines) + "\n", args.results)
    return results


if __name__ == "__main__":
    main(parse_args())
