"""
Class-conditional digits from every denoiser: train U-Net, DiT and RIN on the 8000 training digits, then ask each
for every digit with and without classifier-free guidance.

    .venv/bin/python benchmarks/bench_class_conditional.py --train_minutes 9 --results benchmarks/RESULTS_class_conditional.md
    .venv/bin/python benchmarks/bench_class_conditional.py --quick    # tiny models, a few steps, ~1 min
    .venv/bin/python benchmarks/bench_class_conditional.py --objective flow_matching --results ...

For each of ``--models``, one after the other:

1. calibrate: time a few training steps (forward + backward + AdamW, plus RIN's no-grad self-conditioning pass) of
   the model at the recipe's batch size, and set ``--max_train_steps`` = train budget / seconds per step, so that
   each model gets about the same wall-clock budget on whatever load the shared machine carries;
2. train with ``training/train_diffusion.py`` in this process (``main(parse_args([...]))``), class-conditional on
   mnist10k.npz (28x28 padded to 32x32, 1 channel), label dropout 0.1 to the null label ``num_classes``;
3. load the saved folder with ``HFGenPipeline.from_pretrained``, swap in a DDIM scheduler with "trailing" spacing
   (``--objective diffusion``; flow matching samples with the saved FlowMatchEulerDiscreteScheduler) and
   draw ``--per_class`` digits of each class with ``--num_inference_steps`` steps at each ``--guidance_scales``
   (the same starting noise for every scale; guidance 1 = one conditional pass);
4. score: the fraction the digit classifier (benchmarks/artifacts/digit_classifier, ~98% on held-out digits) reads
   as the asked class, overall and per class; sampling speed in images/s; a grid per guidance scale (row = asked
   digit 0..9) in ``--output_dir``.

Recipe (all three; see ``RECIPES`` for the networks): ``--objective diffusion`` (default): cosine
("squaredcos_cap_v2") noise schedule, v-prediction, min-SNR-5 loss weights; ``--objective flow_matching``:
train_diffusion's rectified flow (sigma logit-normal(0, 1), velocity target eps - x0, unweighted MSE). Both: AdamW
(beta2 0.99), linear warmup then cosine decay to 0 over the run, gradient clipping at 1, EMA (warmup power 3/4, max
decay 0.999) whose weights are the ones saved and sampled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ARTIFACTS, CLASSIFIER, MNIST, header, write_results  # noqa: E402

import hfgen  # noqa: E402
from hfgen.metrics import DigitClassifier, asked_label_share, fit_digit_classifier, load_digits  # noqa: E402
from hfgen.pipelines import HFGenPipeline  # noqa: E402
from hfgen.schedulers import DDIMScheduler  # noqa: E402
from hfgen.training import train_diffusion  # noqa: E402

NUM_CLASSES = 10

# ----------------------------------------------------------------------------------------------------------------------
# Recipes: the network (a --model_config JSON) and the optimiser settings per denoiser
# ----------------------------------------------------------------------------------------------------------------------

# sized for a 2-core CPU (0.15-1.5 s per step). The U-Net draws the asked digit after ~9 minutes, the DiT after ~13-22,
# the RIN after ~33 at lr 3e-3 (~80 at 1e-3; RESULTS.md "stop 21" and RESULTS_class_conditional.md)
SMALL_DATA = train_diffusion.SMALL_DATA_RECIPES  # learning rate and batch: train_diffusion's small-data defaults
RECIPES: dict[str, dict] = {
    "unet": {
        "config": hfgen.UNET_PRESETS["unet-mnist"],  # attention at 8x8 only; 0.72M parameters
        "learning_rate": train_diffusion.CONDITIONAL_UNET_LEARNING_RATE,
        # batch 64 gave half the updates in the same time and no digits yet (RESULTS, run 1)
        "batch_size": SMALL_DATA["unet"]["train_batch_size"],
        "self_cond_prob": None,
    },
    "dit": {
        "config": hfgen.DIT_PRESETS["DiT-mnist/4"],  # 64 tokens; 1.28M parameters
        "learning_rate": SMALL_DATA["dit"]["learning_rate"],
        "batch_size": SMALL_DATA["dit"]["train_batch_size"],
        "self_cond_prob": None,
    },
    "rin": {
        "config": hfgen.RIN_PRESETS["RIN-mnist"],  # 64 interface tokens, 32 latents; 1.52M parameters
        "learning_rate": SMALL_DATA["rin"]["learning_rate"],
        # batch 64 gave 38% of the asked digit after 34.5 min; 32 gave 40% after 15.9 and 100% after 83
        "batch_size": SMALL_DATA["rin"]["train_batch_size"],
        "self_cond_prob": 0.5,
    },
}
QUICK_PRESETS = {"unet": "unet-tiny", "dit": "DiT-tiny/2", "rin": "RIN-tiny"}
OBJECTIVES = train_diffusion.OBJECTIVES  # ("diffusion", "flow_matching")
OBJECTIVE_FLAGS = {
    # the noise schedule, prediction type and loss weights of diffusion; train_diffusion refuses the last two with
    # flow matching, which draws sigma logit-normal(0, 1) and regresses the velocity eps - x0 unweighted (its defaults)
    "diffusion": [
        "--objective",
        "diffusion",
        "--beta_schedule",
        "squaredcos_cap_v2",
        "--prediction_type",
        "v_prediction",
        "--snr_gamma",
        "5",
    ],  # fmt: skip
    "flow_matching": ["--objective", "flow_matching"],
}
COMMON_FLAGS = [
    "--conditioning", "class",
    "--pad_images",
    "--resolution", "32",
    "--lr_scheduler", "cosine",
    "--adam_beta2", "0.99",
    "--max_grad_norm", "1.0",
    "--cond_dropout", "0.1",
    "--use_ema",
    "--ema_max_decay", "0.999",
    "--ema_power", "0.75",
    "--report_to", "none",
    "--checkpointing_steps", "1000000",
    "--num_validation_images", "1",
    "--num_inference_steps", "1",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def model_config(model: str, quick: bool) -> dict:
    """Constructor kwargs of the denoiser the recipe trains (sample size and conditioning are set by the script)."""
    if quick:
        return train_diffusion.load_model_config(model, QUICK_PRESETS[model])
    return dict(RECIPES[model]["config"])


def seconds_per_step(model: str, config: dict, batch_size: int, self_cond: bool, repeats: int = 3) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of a fresh model on random digits."""
    cls, _ = train_diffusion.model_family(model)
    net = cls(**config, sample_size=32, in_channels=1, out_channels=1, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 1, 32, 32)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch_size,))
    y = torch.randint(0, NUM_CLASSES + 1, (batch_size,))
    times = []
    for i in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        kwargs = {}
        if self_cond:
            with torch.no_grad():
                kwargs["prev_latents"] = net(x, t, class_labels=y).latents
        loss = F.mse_loss(net(x, t, class_labels=y, **kwargs).sample, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def batch_size(model: str, args) -> int:
    return 16 if args.quick else args.batch_size or RECIPES[model]["batch_size"]


def train_flags(model: str, config_path: Path, output_dir: Path, steps: int, args, recipe: dict | None = None):
    """train_diffusion's flags for ``model``: the recipe's (or ``recipe``'s: learning_rate, batch_size,
    self_cond_prob, optionally optimizer and adam_weight_decay) optimiser settings, the common and the objective's
    flags."""
    recipe = recipe or {**RECIPES[model], "batch_size": batch_size(model, args)}
    flags = [
        "--model", model,
        "--model_config", str(config_path),
        "--mnist_npz", str(args.mnist),
        "--output_dir", str(output_dir),
        "--seed", str(args.seed),
        "--max_train_steps", str(steps),
        "--train_batch_size", str(recipe["batch_size"]),
        "--learning_rate", str(recipe["learning_rate"]),
        "--lr_warmup_steps", str(min(50, max(1, steps // 10))),
        *COMMON_FLAGS,
        *OBJECTIVE_FLAGS[args.objective],
    ]  # fmt: skip
    if recipe["self_cond_prob"] is not None:
        flags += ["--self_cond_prob", str(recipe["self_cond_prob"])]
    for key in ("optimizer", "adam_weight_decay"):  # train_diffusion's defaults (AdamW, no decay) unless given
        if key in recipe:
            flags += [f"--{key}", str(recipe[key])]
    return flags


def load_classifier(args) -> tuple[DigitClassifier, str]:
    """The benchmarks' digit classifier; trained first if missing; in quick mode a throwaway one if missing."""
    if (args.classifier / "config.json").exists():
        return DigitClassifier.from_pretrained(args.classifier).eval(), str(args.classifier)
    if args.quick:  # 1 epoch on 500 digits: enough to exercise the scoring, not to trust it
        x, y = load_digits(args.mnist, "train")
        torch.manual_seed(args.seed)
        small = DigitClassifier(channels=(8, 16, 16), feature_dim=32)
        fit_digit_classifier(small, x[:500], y[:500], num_steps=8, batch_size=64, learning_rate=1e-2, seed=args.seed)
        return small, "throwaway (quick: 8 steps on 500 digits)"
    import train_digit_classifier

    train_digit_classifier.main(
        train_digit_classifier.parse_args(["--mnist", str(args.mnist), "--output_dir", str(args.classifier)])
    )
    return DigitClassifier.from_pretrained(args.classifier).eval(), str(args.classifier)


def evaluation_scheduler(scheduler):
    """The sampler of a saved pipeline's evaluation: a flow-matching model's own FlowMatchEulerDiscreteScheduler; for a
    diffusion model, DDIM with "trailing" spacing from its saved scheduler's config."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")


def grid_image(images: torch.Tensor, per_class: int, scale: int = 2) -> PIL.Image.Image:
    """images (10 * per_class, 1, H, W) in [0, 1], class-major -> a grid with one row per class, upscaled."""
    n, _, h, w = images.shape
    rows = images.view(NUM_CLASSES, per_class, h, w).permute(0, 2, 1, 3).reshape(NUM_CLASSES * h, per_class * w)
    array = (rows.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return PIL.Image.fromarray(array, mode="L").resize(
        (per_class * w * scale, NUM_CLASSES * h * scale), PIL.Image.NEAREST
    )


score = asked_label_share  # eval_class_conditional.py and eval_ae_gan.py import it from here


# ----------------------------------------------------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------------------------------------------------


def budget_steps(model: str, config: dict, args) -> tuple[int, float | None]:
    """``--max_train_steps``, or the steps that fit ``--train_minutes`` at the calibrated seconds per step."""
    if args.max_train_steps:
        return args.max_train_steps, None
    self_cond = RECIPES[model]["self_cond_prob"] is not None
    repeats = 1 if args.quick else 3
    step_seconds = seconds_per_step(model, config, batch_size(model, args), self_cond, repeats=repeats)
    return max(args.min_steps, int(args.train_minutes * 60 / step_seconds)), step_seconds


def score_guidance_scales(model: str, pipe, args, classifier: DigitClassifier, result: dict) -> None:
    """Sample every class at every guidance scale from the same noise; record accuracy, speed and the grid."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)  # (N,) class-major
    noise = torch.randn((len(labels), 1, 32, 32), generator=torch.Generator().manual_seed(args.seed + 1))
    for scale in args.guidance_scales:
        start = time.perf_counter()
        images = pipe(batch_size=len(labels), latents=noise, class_labels=labels, guidance_scale=scale,
                      num_inference_steps=args.num_inference_steps, output_type="pt").images  # fmt: skip
        seconds = time.perf_counter() - start  # images: (N, 1, 32, 32) in [0, 1]
        key = f"{scale:g}"
        result["accuracy"][key], result["per_class_accuracy"][key] = score(classifier, images, labels)
        result["samples_per_second"][key] = round(len(labels) / seconds, 2)
        grid_path = args.output_dir / f"grid_{model}_g{key}.png"
        grid_image(images, args.per_class).save(grid_path)
        result["grids"][key] = str(grid_path)


def run_model(model: str, args, classifier: DigitClassifier) -> dict:
    """Calibrate the steps to the budget, train with the repository's script in this process, then score."""
    work = args.output_dir / model
    work.mkdir(parents=True, exist_ok=True)
    config = model_config(model, args.quick)
    config_path = work / "model_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    steps, step_seconds = budget_steps(model, config, args)
    print(f"[{model}] {steps} steps (calibrated {step_seconds} s/step)", flush=True)

    pipeline_dir = work / "pipeline"
    flags = train_flags(model, config_path, pipeline_dir, steps, args)
    start = time.perf_counter()
    train_diffusion.main(train_diffusion.parse_args(flags))
    train_seconds = time.perf_counter() - start

    pipe = HFGenPipeline.from_pretrained(pipeline_dir)
    if pipe.denoiser.config.num_classes != NUM_CLASSES:
        raise RuntimeError(
            f"{model}: trained with num_classes={pipe.denoiser.config.num_classes}, expected {NUM_CLASSES}"
        )
    pipe.scheduler = evaluation_scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    result = {
        "model": model,
        "objective": args.objective,
        "denoiser": type(pipe.denoiser).__name__,
        "sampler": type(pipe.scheduler).__name__,
        "config": config,
        "parameters": sum(p.numel() for p in pipe.denoiser.parameters()),
        "batch_size": batch_size(model, args),
        "learning_rate": RECIPES[model]["learning_rate"],
        "self_cond_prob": RECIPES[model]["self_cond_prob"],
        "train_steps": steps,
        "calibrated_seconds_per_step": step_seconds,
        "train_seconds": round(train_seconds, 1),
        "num_inference_steps": args.num_inference_steps,
        "accuracy": {},
        "per_class_accuracy": {},
        "samples_per_second": {},
        "grids": {},
    }
    score_guidance_scales(model, pipe, args, classifier, result)
    print(
        f"[{model}] " + json.dumps({k: result[k] for k in ("train_seconds", "accuracy", "samples_per_second")}),
        flush=True,
    )
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    p.add_argument("--objective", choices=OBJECTIVES, default="diffusion", help="what the denoisers learn")
    p.add_argument("--mnist", type=Path, default=MNIST, help="path to mnist10k.npz")
    p.add_argument("--classifier", type=Path, default=CLASSIFIER, help="DigitClassifier folder (trained if missing)")
    p.add_argument(
        "--output_dir", type=Path, default=None, help="default benchmarks/artifacts/class_conditional[_quick]"
    )
    p.add_argument("--train_minutes", type=float, default=9.0, help="wall-clock training budget per model")
    p.add_argument("--max_train_steps", type=int, default=None, help="fixed steps per model instead of the budget")
    p.add_argument("--batch_size", type=int, default=None, help="batch size for every model instead of the recipe's")
    p.add_argument("--min_steps", type=int, default=50, help="floor on the calibrated number of steps")
    p.add_argument("--per_class", type=int, default=10, help="samples per digit")
    p.add_argument("--num_inference_steps", type=int, default=25, help="sampling steps (DDIM or flow Euler)")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is faster on the loaded 2-core box)")
    p.add_argument("--results", type=Path, default=None, help="append the markdown block to this file")
    p.add_argument("--quick", action="store_true", help="tiny presets, 3 steps, 2 samples per class, 2 DDIM steps")
    args = p.parse_args(argv)
    if args.quick:
        args.max_train_steps, args.per_class, args.num_inference_steps = 3, 2, 2
    if args.output_dir is None:
        args.output_dir = ARTIFACTS / ("class_conditional_quick" if args.quick else "class_conditional")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    for name in ("train_minutes", "per_class", "num_inference_steps", "min_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if any(s < 1 for s in args.guidance_scales):
        raise ValueError(f"--guidance_scales must all be >= 1 (1 = no guidance), got {args.guidance_scales}")
    if not args.mnist.is_file():
        raise FileNotFoundError(f"--mnist {args.mnist} not found")
    return args


def short_path(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    root = ARTIFACTS.parents[1]
    return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path


def markdown(report: dict) -> str:
    scales = list(report["models"][0]["accuracy"]) if report["models"] else []
    lines = [
        "| model | network | params | batch / lr | steps | train time | "
        + " | ".join(f"asked digit, g={s}" for s in scales)
        + " | "
        + " | ".join(f"samples/s, g={s}" for s in scales)
        + " | grids |",
        "|" + " --- |" * (6 + 2 * len(scales) + 1),
    ]
    for r in report["models"]:
        lines.append(
            f"| {r['denoiser']} | `{json.dumps(r['config'])}` | {r['parameters'] / 1e6:.2f}M | "
            f"{r['batch_size']} / {r['learning_rate']:g} | {r['train_steps']} | {r['train_seconds'] / 60:.1f} min | "
            + " | ".join(f"{100 * r['accuracy'][s]:.0f}%" for s in scales)
            + " | "
            + " | ".join(f"{r['samples_per_second'][s]:.1f}" for s in scales)
            + " | "
            + ", ".join(f"`{short_path(p)}`" for p in r["grids"].values())
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    classifier, classifier_source = load_classifier(args)
    report = {
        "quick": args.quick,
        "objective": args.objective,
        "classifier": classifier_source,
        "per_class": args.per_class,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scales": args.guidance_scales,
        "train_minutes_per_model": None if args.max_train_steps else args.train_minutes,
        "models": [],
    }
    for model in args.models:
        report["models"].append(run_model(model, args, classifier))
        (args.output_dir / "results.json").write_text(json.dumps(report, indent=2))  # after each model
    block = header("Class-conditional digits: U-Net, DiT, RIN" + (" (quick)" if args.quick else ""))
    sampler = "DDIM steps (trailing)" if args.objective == "diffusion" else "flow-matching Euler steps"
    block += (
        f"- objective: {args.objective}; {args.per_class} samples per digit, {args.num_inference_steps} {sampler}, "
        f"same noise for each guidance scale; 'asked digit' = fraction the digit classifier ({classifier_source}) "
        "reads as the asked class\n\n"
    )
    block += markdown(report)
    write_results(block, args.results)
    return report


if __name__ == "__main__":
    main(parse_args())
