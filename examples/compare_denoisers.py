"""
The course's "U-Net vs DiT" slide, measured: a U-Net, a DiT and a RIN trained on the same data for the same budget,
their samples side by side, each one's size, training time and score underneath.

    python examples/compare_denoisers.py          # 1500 steps each on MNIST: ~20-25 min on 2 idle cores, mostly U-Net
    python examples/compare_denoisers.py --budget_steps 3000 --per_class 20
    python examples/compare_denoisers.py --quick               # tiny models, a few steps (seconds), as the tests do

1. train each family with ``training/train_diffusion.py`` (in this process) on the first 8000 digits of
   mnist10k.npz, class-conditional (label dropout 0.1 for guidance), flow matching (the script's default), the
   same batch size and the same number of optimiser steps for all three; each one's training is timed.
   train_diffusion has no wall-clock limit, so the budget is the number of steps (the same images seen by each
   model) and the time is what each family pays for them (``benchmarks/bench_class_conditional.py
   --train_minutes`` compares at equal wall-clock time instead, by timing steps first);
2. sample ``--per_class`` digits of each class from each saved pipeline, the same starting noise for all three,
   classifier-free guidance 3, 25 flow-matching Euler steps;
3. score: the share of the samples that the benchmarks' digit classifier (``benchmarks/artifacts/digit_classifier``,
   about 98% on held-out digits; trained and cached there first if missing) reads as the asked digit;
4. one figure ``compare_denoisers.png``: three panels (rows = asked digit 0..9), under each
   "N params · T s training / S% read as the asked digit"; ``report.json`` beside it.

Why MNIST and the digit classifier rather than the built-in shapes and their rule-based colour/shape judge: ten
handwritten classes ask more of a denoiser than one flat shape of one pure colour, the classifier is a learned judge
measured on held-out digits, and ``benchmarks/RESULTS_class_conditional.md`` holds the same three networks' scores
at other budgets to compare with. The networks and learning rates are those of
``benchmarks/bench_class_conditional.py``.
The pipelines stay in ``--output_dir/<model>/pipeline`` (``examples/dit_modulation.py --pipeline`` reads the DiT's).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import hfgen  # noqa: E402
from hfgen import HFGenPipeline  # noqa: E402
from hfgen.metrics import (  # noqa: E402
    DigitClassifier,
    asked_label_share,
    classifier_accuracy,
    fit_digit_classifier,
    load_digits,
)
from hfgen.training import train_diffusion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = ROOT.parent / "shared" / "data" / "mnist10k.npz"
DEFAULT_CLASSIFIER = ROOT / "benchmarks" / "artifacts" / "digit_classifier"
NUM_CLASSES = 10
GUIDANCE_SCALE = 3.0
NAMES = {"unet": "U-Net", "dit": "DiT", "rin": "RIN"}

# ----------------------------------------------------------------------------------------------------------------------
# The three networks: benchmarks/bench_class_conditional.py's RECIPES (0.72M, 1.28M, 1.52M parameters at 32x32)
# ----------------------------------------------------------------------------------------------------------------------

RECIPES: dict[str, dict] = {
    "unet": {
        "config": hfgen.UNET_PRESETS["unet-mnist"],  # 3 levels (32, 16, 8 px), attention at 8x8 only
        "learning_rate": train_diffusion.CONDITIONAL_UNET_LEARNING_RATE,
        "flags": [],
    },
    "dit": {
        "config": hfgen.DIT_PRESETS["DiT-mnist/4"],  # 64 tokens of 4x4 pixels
        "learning_rate": train_diffusion.SMALL_DATA_RECIPES["dit"]["learning_rate"],
        "flags": [],
    },
    "rin": {
        "config": hfgen.RIN_PRESETS["RIN-mnist"],  # 64 interface tokens (4x4 patches), 32 latents
        "learning_rate": train_diffusion.SMALL_DATA_RECIPES["rin"]["learning_rate"],
        "flags": ["--self_cond_prob", "0.5"],
    },
}
QUICK_PRESETS = {"unet": "unet-tiny", "dit": "DiT-tiny/2", "rin": "RIN-tiny"}


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def load_classifier(path: Path, mnist: Path, quick: bool) -> tuple[DigitClassifier, str]:
    """The benchmarks' digit classifier from ``path``; if missing, trained with benchmarks/train_digit_classifier.py's
    settings and cached there (quick: a throwaway one, 8 steps on 500 digits, enough to run the scoring)."""
    if (path / "config.json").exists():
        return DigitClassifier.from_pretrained(path).eval(), str(path)
    x, y = load_digits(mnist, "train")  # (8000, 1, 32, 32) in [-1, 1]
    if quick:
        model = DigitClassifier(channels=(8, 16, 16), feature_dim=32)
        fit_digit_classifier(model, x[:500], y[:500], num_steps=8, batch_size=64, learning_rate=1e-2, seed=0)
        return model.eval(), "throwaway (quick: 8 steps on 500 digits)"
    print(f"training the digit classifier (1500 steps), cached in {path}", flush=True)
    model = DigitClassifier()
    fit_digit_classifier(model, x, y, num_steps=1500, batch_size=128, learning_rate=2e-3, seed=0)
    test_x, test_y = load_digits(mnist, "test")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "accuracy.json").write_text(json.dumps({"held_out_accuracy": classifier_accuracy(model, test_x, test_y)}))
    return model.eval(), str(path)


def train_flags(model: str, config_path: Path, output_dir: Path, args: argparse.Namespace) -> list[str]:
    """train_diffusion's arguments: the recipe's network and learning rate, everything else the same for all."""
    recipe = RECIPES[model]
    warmup = min(50, max(1, args.budget_steps // 10))
    flags = [
        "--model", model, "--model_config", str(config_path), "--output_dir", str(output_dir),
        "--mnist_npz", str(args.mnist_npz), "--pad_images", "--resolution", "32", "--conditioning", "class",
        "--cond_dropout", "0.1", "--seed", str(args.seed),
        "--max_train_steps", str(args.budget_steps), "--train_batch_size", str(args.batch_size),
        "--learning_rate", str(recipe["learning_rate"]), "--lr_warmup_steps", str(warmup), "--adam_beta2", "0.99",
        "--use_ema", "--ema_max_decay", "0.999", "--report_to", "none", "--checkpointing_steps", "1000000",
        "--num_validation_images", "1", "--num_inference_steps", "1",
        *recipe["flags"],
    ]  # fmt: skip
    return flags


def class_grid(images: torch.Tensor, per_class: int, columns: int) -> torch.Tensor:
    """images (10 * per_class, 1, H, W), class-major -> (10 * H, columns * W): row c = the first samples of digit c."""
    _, _, h, w = images.shape
    shown = images.view(NUM_CLASSES, per_class, h, w)[:, :columns]  # (10, columns, H, W)
    return shown.permute(0, 2, 1, 3).reshape(NUM_CLASSES * h, columns * w)


def draw_figure(results: list[dict], grids: list[torch.Tensor], title: str, path: Path) -> None:
    """Three panels side by side, the numbers of each under it."""
    fig, axes = plt.subplots(1, len(results), figsize=(2.6 * len(results), 5.6), squeeze=False)
    for ax, result, grid in zip(axes[0], results, grids):
        h = grid.shape[0] // NUM_CLASSES
        ax.imshow(grid.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(result["name"], fontsize=13)
        ax.set_xticks([])
        ax.set_yticks([h * c + h / 2 - 0.5 for c in range(NUM_CLASSES)], [str(c) for c in range(NUM_CLASSES)])
        ax.tick_params(length=0)
        ax.set_xlabel(
            f"{result['parameters'] / 1e6:.2f}M params · {result['train_seconds']:.0f} s training\n"
            f"{100 * result['score']:.0f}% read as the asked digit",
            fontsize=9,
        )
    axes[0][0].set_ylabel("asked digit")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=Path("hfgen-output/compare_denoisers"))
    p.add_argument("--models", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    p.add_argument("--mnist_npz", type=Path, default=DEFAULT_MNIST, help="MNIST npz (first 8000 digits train)")
    p.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER, help="DigitClassifier folder")
    p.add_argument("--budget_steps", type=int, default=1500, help="optimiser steps, the same for every model")
    p.add_argument("--batch_size", type=int, default=32, help="the same for every model")
    p.add_argument("--per_class", type=int, default=10, help="samples per digit that are scored")
    p.add_argument("--show_per_class", type=int, default=4, help="samples per digit shown in the figure")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: leave torch's setting)")
    p.add_argument("--quick", action="store_true", help="tiny presets, 3 steps, 2 samples per digit, 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_steps, args.batch_size, args.per_class, args.num_inference_steps = 3, 8, 2, 2
        args.show_per_class = min(args.show_per_class, args.per_class)
    for name in ("budget_steps", "batch_size", "per_class", "show_per_class", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.show_per_class > args.per_class:
        raise ValueError(f"--show_per_class ({args.show_per_class}) must be <= --per_class ({args.per_class})")
    if not args.mnist_npz.is_file():
        raise FileNotFoundError(f"--mnist_npz {args.mnist_npz} not found (an npz of MNIST images and labels)")
    return args


def train_and_score(model: str, args: argparse.Namespace, classifier, labels, noise) -> tuple[dict, torch.Tensor]:
    """Train one family for ``--budget_steps`` (timed), sample every digit from the shared noise with guidance and
    score the samples; returns its row of the report and its grid of samples."""
    work = args.output_dir / model
    work.mkdir(parents=True, exist_ok=True)
    config = train_diffusion.load_model_config(model, QUICK_PRESETS[model]) if args.quick else RECIPES[model]["config"]
    config_path = work / "model_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    pipeline_dir = work / "pipeline"
    start = time.perf_counter()
    train_diffusion.main(train_diffusion.parse_args(train_flags(model, config_path, pipeline_dir, args)))
    train_seconds = time.perf_counter() - start

    pipe = HFGenPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    images = pipe(batch_size=len(labels), latents=noise, class_labels=labels, guidance_scale=GUIDANCE_SCALE,
                  num_inference_steps=args.num_inference_steps, output_type="pt").images  # fmt: skip
    sample_seconds = time.perf_counter() - start  # images: (N, 1, 32, 32) in [0, 1]

    score, per_class = asked_label_share(classifier, images, labels)
    result = {
        "model": model,
        "name": NAMES[model],
        "denoiser": type(pipe.denoiser).__name__,
        "parameters": sum(p.numel() for p in pipe.denoiser.parameters()),
        "train_steps": args.budget_steps,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 1),
        "sample_seconds": round(sample_seconds, 1),
        "score": score,
        "per_class_score": per_class,
        "pipeline": str(pipeline_dir),
    }
    print(f"[{model}] {json.dumps({k: result[k] for k in ('parameters', 'train_seconds', 'score')})}")
    return result, class_grid(images, args.per_class, args.show_per_class)


def main(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    classifier, classifier_source = load_classifier(args.classifier, args.mnist_npz, args.quick)
    stages = {"classifier": round(time.perf_counter() - t0, 1)}
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)  # (N,) class-major
    noise = torch.randn((len(labels), 1, 32, 32), generator=torch.Generator().manual_seed(args.seed + 1))

    results, grids = [], []
    for model in args.models:
        result, grid = train_and_score(model, args, classifier, labels, noise)
        results.append(result)
        grids.append(grid)
        stages[f"{model}_train"], stages[f"{model}_sample"] = result["train_seconds"], result["sample_seconds"]

    start = time.perf_counter()
    figure = out / "compare_denoisers.png"
    title = (
        f"class-conditional MNIST, each {args.budget_steps} steps x batch {args.batch_size} (flow matching); "
        f"guidance {GUIDANCE_SCALE:g}, {args.num_inference_steps} Euler steps; score of {len(labels)} samples"
    )
    draw_figure(results, grids, title, figure)
    stages["figure"] = round(time.perf_counter() - start, 1)
    report = {
        "quick": args.quick,
        "data": str(args.mnist_npz),
        "classifier": classifier_source,
        "guidance_scale": GUIDANCE_SCALE,
        "num_inference_steps": args.num_inference_steps,
        "per_class": args.per_class,
        "models": results,
        "stage_seconds": stages,
        "figure": str(figure),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    print(f"figure: {figure}\nreport: {out / 'report.json'}")
    print("pipelines: " + ", ".join(r["pipeline"] for r in results))
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(parse_args())
