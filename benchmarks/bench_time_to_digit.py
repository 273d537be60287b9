"""
How long each denoiser trains before it draws the asked digit: class-conditional training on mnist10k in chunks of
``--eval_every_minutes``, the EMA weights scored after every chunk, stop at ``--target`` or after ``--max_minutes``.

    .venv/bin/python benchmarks/bench_time_to_digit.py --models dit rin --threads 2 --results benchmarks/RESULTS_class_conditional.md
    .venv/bin/python benchmarks/bench_time_to_digit.py --models rin --set learning_rate=2e-3 --set num_latents=64
    .venv/bin/python benchmarks/bench_time_to_digit.py --quick    # tiny presets, two 2-step chunks, seconds

The recipe is ``bench_class_conditional.py``'s (network, batch, AdamW, v-prediction with min-SNR-5 or flow matching,
EMA) with one change: the learning rate stays constant after its warm-up, so that a run can stop after any chunk (a
cosine decay needs the run's length in advance). Each chunk is ``train_diffusion.main`` resuming from the previous
chunk's checkpoint, so the chunks train exactly what one uninterrupted run would. The score is the share of
``--per_class`` samples of every digit that the digit classifier reads as the asked digit, at ``--guidance_scale``
(25 trailing DDIM steps, the same noise every time). Training minutes are the wall time of the chunks, each with its
few seconds of start-up (data, model, checkpoint) and final save; scoring is not counted.

``--set key=value`` changes the recipe for an ablation: ``learning_rate``, ``batch_size``, ``self_cond_prob``,
``optimizer`` (``adamw`` / ``lamb``) and ``adam_weight_decay`` are the optimiser's and the training script's, any
other key goes into the network's config (e.g. ``num_latents=64``).
Next to the share, every evaluation records the held-out x0 error (256 test digits noised to t = 300 and 700, right
label): it moves long before the samples become readable, so short ablations can be compared by it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_class_conditional as bcc  # noqa: E402
from common import ARTIFACTS, CLASSIFIER, MNIST, header, write_results  # noqa: E402

from hfgen import objectives  # noqa: E402
from hfgen.metrics import load_digits  # noqa: E402
from hfgen.pipelines import HFGenPipeline  # noqa: E402
from hfgen.training import train_diffusion  # noqa: E402

RECIPE_KEYS = ("learning_rate", "batch_size", "self_cond_prob", "optimizer", "adam_weight_decay")
X0_TIMESTEPS = (300, 700)  # noise levels of the held-out x0 error
X0_DIGITS = 256  # held-out digits it is measured on


def parse_overrides(pairs: list[str]) -> dict:
    """``["learning_rate=2e-3", "num_latents=64"]`` -> {"learning_rate": 0.002, "num_latents": 64} (JSON values)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def recipe(model: str, args) -> tuple[dict, dict]:
    """(optimiser settings, network config) of ``model`` with the ``--set`` overrides applied."""
    settings = {k: v for k, v in bcc.RECIPES[model].items() if k in RECIPE_KEYS}
    config = bcc.model_config(model, args.quick)
    for key, value in args.overrides.items():
        (settings if key in RECIPE_KEYS else config)[key] = value
    if args.quick:
        settings["batch_size"] = 16
    return settings, config


def chunk_flags(model: str, settings: dict, config_path: Path, work: Path, total_steps: int, chunk: int, args):
    """bench_class_conditional's training flags with ``settings``, then what makes a run of chunks: a constant rate
    after a warm-up that does not depend on the run's length, a checkpoint at the end of every chunk, resumed."""
    return [
        *bcc.train_flags(model, config_path, work, total_steps, args, recipe=settings),
        "--lr_warmup_steps", str(min(50, chunk)),
        "--lr_scheduler", "constant_with_warmup",
        "--checkpointing_steps", str(chunk),
        "--checkpoints_total_limit", "1",
        "--resume_from_checkpoint", "latest",
    ]  # fmt: skip


@torch.no_grad()
def heldout_x0_error(denoiser, scheduler, digits: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
    """MSE of the predicted clean digit on held-out digits (B, 1, 32, 32) noised to each of ``X0_TIMESTEPS``, with
    the right label (key "t") and with a wrong one (the next digit, key "t_wrong"): a low-noise sign of learning
    that moves long before the samples become readable, and the gap between the two shows how much the label is
    used. A self-conditioning denoiser gets its own first-pass latents, as in training."""
    eps = torch.randn(digits.shape, generator=torch.Generator().manual_seed(seed))
    errors = {}
    for t in X0_TIMESTEPS:
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):  # sigma = t / 1000, x_t = (1 - sigma) x0 + sigma eps
            sigma, kind = torch.tensor(t / 1000.0), "flow_prediction"
            alpha = 1 - sigma
        else:
            alpha_bar = scheduler.alphas_cumprod[t]
            alpha, sigma, kind = alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), scheduler.config.prediction_type
        x_t = alpha * digits + sigma * eps
        timesteps = torch.full((len(digits),), t)
        for key, y in ((str(t), labels), (f"{t}_wrong", (labels + 1) % bcc.NUM_CLASSES)):
            kwargs = {"class_labels": y}
            if getattr(denoiser, "self_conditioning", False):
                kwargs["prev_latents"] = denoiser(x_t, timesteps, **kwargs).latents
            x0 = objectives.predicted_x0(denoiser(x_t, timesteps, **kwargs).sample, x_t, alpha, sigma, kind)
            errors[key] = round(F.mse_loss(x0, digits).item(), 5)
    return errors


def evaluate(work: Path, args, classifier) -> tuple[float, dict[str, float], torch.Tensor]:
    """Score the pipeline the last chunk saved (EMA weights): the share read as the asked digit, the held-out x0
    errors, and the sampled images."""
    pipe = HFGenPipeline.from_pretrained(work)
    pipe.scheduler = bcc.evaluation_scheduler(pipe.scheduler)
    digits, digit_labels = (v[:X0_DIGITS] for v in load_digits(args.mnist, "test"))
    x0_error = heldout_x0_error(pipe.denoiser.eval(), pipe.scheduler, digits, digit_labels, args.seed)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(bcc.NUM_CLASSES).repeat_interleave(args.per_class)  # (N,) class-major
    noise = torch.randn((len(labels), 1, 32, 32), generator=torch.Generator().manual_seed(args.seed + 1))
    images = pipe(
        batch_size=len(labels),
        latents=noise,
        class_labels=labels,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        output_type="pt",
    ).images  # (N, 1, 32, 32) in [0, 1]
    share, _ = bcc.score(classifier, images, labels)
    return share, x0_error, images


def run_model(model: str, args, classifier) -> dict:
    work = args.output_dir / model
    if work.exists() and any(work.iterdir()):
        raise FileExistsError(f"{work} is not empty: a run resumes from its checkpoints; pick a new --output_dir")
    work.mkdir(parents=True, exist_ok=True)
    settings, config = recipe(model, args)
    config_path = work.parent / f"{model}_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    if args.quick:
        chunk = 2
    else:
        step_seconds = bcc.seconds_per_step(
            model, config, settings["batch_size"], settings["self_cond_prob"] is not None
        )
        chunk = max(10, round(args.eval_every_minutes * 60 / step_seconds))
    result = {
        "model": model,
        **settings,
        "config": config,
        "chunk_steps": chunk,
        "curve": [],
        "minutes_to_target": None,
    }
    train_seconds, steps = 0.0, 0
    while train_seconds < args.max_minutes * 60 and len(result["curve"]) < (args.max_chunks or float("inf")):
        steps += chunk
        start = time.perf_counter()
        train_diffusion.main(
            train_diffusion.parse_args(chunk_flags(model, settings, config_path, work, steps, chunk, args))
        )
        train_seconds += time.perf_counter() - start
        share, x0_error, images = evaluate(work, args, classifier)
        point = {"steps": steps, "minutes": round(train_seconds / 60, 2), "share": share, "x0_error": x0_error}
        result["curve"].append(point)
        print(f"[{model}] {json.dumps(point)}", flush=True)
        if share >= args.target:
            result["minutes_to_target"] = point["minutes"]
            break
    grid = args.output_dir / f"grid_{model}_g{args.guidance_scale:g}.png"
    bcc.grid_image(images, args.per_class).save(grid)
    result["grid"] = str(grid)
    return result


def markdown(report: dict) -> str:
    target = f"{100 * report['target']:.0f}%"
    lines = [
        f"| model | recipe | chunk (steps) | asked digit at g={report['guidance_scale']:g} after (min: share "
        "(held-out x0 error at t=700, right / wrong label)) | "
        f"minutes to {target} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["models"]:
        curve = ", ".join(
            f"{p['minutes']:.1f}: {100 * p['share']:.0f}% ({p['x0_error']['700']:.3f} / {p['x0_error']['700_wrong']:.3f})"
            for p in r["curve"]
        )
        reached = f"**{r['minutes_to_target']:.1f}**" if r["minutes_to_target"] is not None else "not reached"
        settings = f"batch {r['batch_size']}, lr {r['learning_rate']:g}, self-cond {r['self_cond_prob']}"
        settings += f", {r.get('optimizer', 'adamw')}" + (
            f" wd {r['adam_weight_decay']:g}" if "adam_weight_decay" in r else ""
        )
        lines.append(
            f"| {r['model']} | {settings}; `{json.dumps(r['config'])}` | {r['chunk_steps']} | {curve} | {reached} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=tuple(bcc.RECIPES), default=["dit", "rin"])
    p.add_argument("--objective", choices=bcc.OBJECTIVES, default="diffusion", help="what the denoisers learn")
    p.add_argument("--mnist", type=Path, default=MNIST, help="path to mnist10k.npz")
    p.add_argument("--classifier", type=Path, default=CLASSIFIER, help="DigitClassifier folder (trained if missing)")
    p.add_argument("--output_dir", type=Path, default=None, help="default benchmarks/artifacts/time_to_digit[_quick]")
    p.add_argument("--target", type=float, default=0.9, help="share of the asked digit that ends a model's run")
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--eval_every_minutes", type=float, default=2.0, help="training minutes per chunk")
    p.add_argument("--max_minutes", type=float, default=40.0, help="training minutes after which a model gives up")
    p.add_argument("--max_chunks", type=int, default=None, help="stop a model after this many chunks")
    p.add_argument("--per_class", type=int, default=10, help="samples per digit at each evaluation")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe change for an ablation (repeatable)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2 on a quiet 2-core machine)")
    p.add_argument("--results", type=Path, default=None, help="append the markdown block to this file")
    p.add_argument("--quick", action="store_true", help="tiny presets, two 2-step chunks, 2 samples per digit")
    args = p.parse_args(argv)
    args.overrides = parse_overrides(args.overrides)
    if args.quick:
        args.per_class, args.num_inference_steps, args.max_chunks, args.threads = 2, 2, 2, 1
    if args.output_dir is None:
        args.output_dir = ARTIFACTS / ("time_to_digit_quick" if args.quick else "time_to_digit")
    if not 0 < args.target <= 1:
        raise ValueError(f"--target must be in (0, 1], got {args.target}")
    if args.max_chunks is not None and args.max_chunks < 1:
        raise ValueError(f"--max_chunks must be >= 1, got {args.max_chunks}")
    for name in ("eval_every_minutes", "max_minutes", "per_class", "num_inference_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.guidance_scale < 1:
        raise ValueError(f"--guidance_scale must be >= 1 (1 = no guidance), got {args.guidance_scale}")
    if not args.mnist.is_file():
        raise FileNotFoundError(f"--mnist {args.mnist} not found")
    return args


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    classifier, classifier_source = bcc.load_classifier(args)
    report = {
        "quick": args.quick,
        "objective": args.objective,
        "classifier": classifier_source,
        "target": args.target,
        "guidance_scale": args.guidance_scale,
        "per_class": args.per_class,
        "threads": args.threads,
        "models": [],
    }
    for model in args.models:
        report["models"].append(run_model(model, args, classifier))
        (args.output_dir / "results.json").write_text(json.dumps(report, indent=2))  # after each model
    block = header("Time to the asked digit" + (" (quick)" if args.quick else ""))
    block += (
        f"- objective {args.objective}, constant learning rate after warm-up, EMA weights scored after every "
        f"~{args.eval_every_minutes:g} training minutes on {10 * args.per_class} samples ({args.num_inference_steps} "
        f"trailing DDIM steps); classifier: {classifier_source}; {args.threads} threads\n\n"
    )
    block += markdown(report)
    write_results(block, args.results)
    return report


if __name__ == "__main__":
    main(parse_args())
