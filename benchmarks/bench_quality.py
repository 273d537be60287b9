"""
Quality at a fixed CPU budget: diffusers' unconditional recipe versus hfgen's, with diffusion and with flow matching,
on the 8000 training digits.

    .venv/bin/python benchmarks/bench_quality.py --budget_minutes 15 --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_quality.py --quick
    .venv/bin/python benchmarks/bench_quality.py --recipes hfgen hfgen-flow   # the two hfgen objectives only

The ``--recipes`` (default all three) train in the same process for the same wall-clock budget each. Training
alternates between them in slices of ``--slice_seconds`` (A/B/C/A/B/C...), every step checking the clock, so that
load changes on the shared machine hit all alike. Then each draws ``--num_samples`` digits with 25 steps of its
sampler (its own library's DDIMScheduler; for (c) the flow-matching Heun scheduler at the same number of denoiser
calls, 13 steps), and all sets are scored
against the 2000 held-out digits: FID/KID in the digit classifier's feature space and the class balance of the
samples. The real-versus-real floor (training digits against held-out ones, with the same numbers of images) is
printed beside them.

(a) diffusers: ``examples/unconditional_image_generation/train_unconditional.py`` as shipped, with the network
    scaled down to CPU size: its block layout (layers_per_block=2, plain ResNet levels with attention only at the
    second-to-last level) at 3 levels of (32, 64, 64) channels, the widths of hfgen's "unet-small", instead of 6
    levels of (128, 128, 256, 256, 512, 512); DDPMScheduler with
    1000 linear betas, epsilon prediction, MSE; AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8;
    cosine schedule with 500 warmup steps (its length estimated from the measured step rate and the budget); EMA
    (``EMAModel``, inv_gamma 1, power 3/4, max decay 0.9999, EMA warmup); batch 16 (its default), no flips.
(b) hfgen: ``UNetModel`` preset "unet-mnist" (16, 32, 64; one ResBlock per level; attention at the lowest level
    only) at MNIST's own 28x28 (the data's 2-pixel background frame is cropped for training and put back around
    the samples, ``pad_digits``, so that they are scored as 32x32 digits like the data);
    DDPMScheduler with the cosine ("squaredcos_cap_v2") schedule and v-prediction, loss weighted by min-SNR-5
    (Hang et al. 2023); AdamW lr 5e-4, betas (0.9, 0.99), no weight decay, gradient clipping at 1, 100 linear
    warmup steps (few steps fit in a CPU budget) then cosine decay to 0 over the time budget; EMA with warmup,
    decay min(0.999, (1+n)/(10+n)) (below 0.999 until step 8990, so over a CPU budget it averages the last ~n/9
    steps); batch 32; weights and inputs channels-last (``train_diffusion.py --channels_last``). Sampling:
    DDIMScheduler with "trailing" timestep spacing.
(c) hfgen-flow: (b) with the flow-matching objective of ``train_diffusion.py --objective flow_matching``: the same
    network (and initial weights), optimizer, learning-rate schedule, EMA and batch; rectified flow
    x_t = (1 - sigma) x_0 + sigma eps with sigma drawn logit-normal(0, 1) (diffusers'
    ``compute_density_for_timestep_sampling``), target the velocity eps - x_0, unweighted MSE, denoiser timestep
    sigma * 1000 (``train_diffusion.forward_process``). Sampling: diffusers' FlowMatchHeunDiscreteScheduler
    (1000, shift 1) through HFGenPipeline, at (steps + 1) // 2 steps: a Heun step calls the denoiser twice (but
    the last), so 13 steps make the 25 calls of the others' 25 DDIM steps. On the same weights it scored FID 30.3
    against Euler's 32.3 at 25 steps (``bench_sampler_steps.py --model hfgen-flow``, RESULTS "stop 24").
    The results name the hfgen objective with the lower FID ("better hfgen objective").

The trained pipelines are saved to ``--output_dir`` (benchmarks/artifacts/quality/{diffusers,hfgen,hfgen-flow}) with
``results.json``; bench_sampler_steps.py reads the better of the two DDPM-trained ones ("best": diffusers or hfgen;
its DDIM/DDPM/DPM-Solver swaps do not apply to a flow model) from there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import ARTIFACTS, CLASSIFIER, MNIST, header, write_results
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMPipeline, FlowMatchHeunDiscreteScheduler, UNet2DModel
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling

import hfgen
from hfgen.metrics import DigitClassifier, class_balance, fid_kid, fit_digit_classifier, load_digits, pad_digits
from hfgen.pipelines import HFGenPipeline
from hfgen.training import train_diffusion

# ----------------------------------------------------------------------------------------------------------------------
# Recipes: each holds its model, noise scheduler, optimizer and EMA, and knows how to train one step and to sample
# ----------------------------------------------------------------------------------------------------------------------


class DiffusersRecipe:
    """train_unconditional.py's recipe (see the module docstring)."""

    name = "diffusers"
    batch_size = 16

    def __init__(self, quick: bool):
        channels = (16, 32) if quick else (32, 64, 64)
        down = ("AttnDownBlock2D", "DownBlock2D") if quick else ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "AttnUpBlock2D") if quick else ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
        self.model = UNet2DModel(
            sample_size=32,
            in_channels=1,
            out_channels=1,
            layers_per_block=1 if quick else 2,
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=8 if quick else 32,
        )
        self.noise_scheduler = DiffusersDDPM(num_train_timesteps=1000, beta_schedule="linear")
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
        )
        self.ema = EMAModel(
            self.model.parameters(),
            decay=0.9999,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=3 / 4,
            model_cls=UNet2DModel,
            model_config=self.model.config,
        )
        self.lr_scheduler = None  # built by start() once the step rate is known
        self.steps = 0

    def start(self, estimated_total_steps: int) -> None:
        self.lr_scheduler = get_scheduler(
            "cosine", optimizer=self.optimizer, num_warmup_steps=500, num_training_steps=max(estimated_total_steps, 501)
        )

    def train_step(self, clean: torch.Tensor, generator: torch.Generator, progress: float) -> float:
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, 1000, (clean.shape[0],), generator=generator)
        noisy = self.noise_scheduler.add_noise(clean, noise, t)
        loss = F.mse_loss(self.model(noisy, t).sample, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # accelerator.clip_grad_norm_(..., 1.0)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.ema.step(self.model.parameters())
        self.steps += 1
        return loss.item()

    def pipeline(self):
        unet = copy.deepcopy(self.model)
        self.ema.copy_to(unet.parameters())
        scheduler = DiffusersDDIM.from_config(self.noise_scheduler.config)
        return DDPMPipeline(unet=unet.eval(), scheduler=scheduler)

    @staticmethod
    def sample(pipe, n: int, steps: int, seed: int) -> torch.Tensor:
        """(n, 1, 32, 32) in [0, 1]."""
        out = pipe(
            batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np"
        )
        return torch.from_numpy(np.asarray(out.images)).permute(0, 3, 1, 2).float()


class HFGenRecipe:
    """hfgen's recipe (see the module docstring): the network, optimizer, EMA and schedule of both hfgen recipes, and
    the diffusion objective; ``HFGenFlowRecipe`` replaces only ``setup_objective``, ``loss`` and
    ``sampling_scheduler``."""

    name = "hfgen"
    # MNIST's own 28x28: load_digits' 2-pixel border is always background, so the model need not learn it, and a step
    # at 28x28 takes 0.67x the time of one at 32x32 (unet-small, batch 32, 2 threads); samples are framed to 32x32
    # (pad_digits) for the metric, exactly as the data are. The network, size and learning rate are the winners of
    # the equal-wall-time runs in RESULTS.md "Issue 16, stop 22" (FID 52.3 -> 41.8 -> 28.7 over three networks)
    image_size = 28
    batch_size = 32
    peak_lr = 5e-4
    warmup_steps = 100
    min_snr_gamma = 5.0
    objective_args = {"objective": "diffusion", "prediction_type": "v_prediction", "snr_gamma": min_snr_gamma}

    def __init__(self, quick: bool):
        preset = hfgen.UNET_PRESETS["unet-tiny" if quick else "unet-mnist"]
        # channels-last weights and inputs (train_diffusion.py --channels_last): 1.17x per step on 2 CPU threads
        self.model = hfgen.UNetModel(**preset, sample_size=self.image_size, in_channels=1, out_channels=1)
        self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.peak_lr, betas=(0.9, 0.99), weight_decay=0.0
        )
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        self.setup_objective()
        self.steps = 0

    def setup_objective(self) -> None:
        self.noise_scheduler = hfgen.DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
        )

    def start(self, estimated_total_steps: int) -> None:
        pass  # the learning rate follows the elapsed fraction of the time budget

    def loss(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """v-prediction MSE weighted by min-SNR-gamma, on clean digits (B, 1, 28, 28) (train_diffusion.py's)."""
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, 1000, (clean.shape[0],), generator=generator)
        return self.objective_loss(clean, noise, t)

    def objective_loss(self, clean: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """train_diffusion.py's objective for these noise levels: its forward process, target, weights and loss."""
        args = argparse.Namespace(**self.objective_args)
        noisy, timesteps, target, weights = train_diffusion.forward_process(
            args, self.noise_scheduler, clean, noise, levels
        )
        noisy = noisy.contiguous(memory_format=torch.channels_last)
        return train_diffusion.objective_loss(self.model(noisy, timesteps).sample, target, weights)

    def train_step(self, clean: torch.Tensor, generator: torch.Generator, progress: float) -> float:
        # learning rate: linear warmup, then cosine decay over the time budget
        lr = self.peak_lr * min(1.0, (self.steps + 1) / self.warmup_steps) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        border = (clean.shape[-1] - self.image_size) // 2  # the data come framed to 32x32
        loss = self.loss(clean[..., border : border + self.image_size, border : border + self.image_size], generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        # EMA with warmup
        decay = min(0.999, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema_model.parameters()), list(self.model.parameters()), 1 - decay)
        self.steps += 1
        return loss.item()

    def sampling_scheduler(self):
        return hfgen.DDIMScheduler.from_config(self.noise_scheduler.config, timestep_spacing="trailing")

    def pipeline(self):
        return HFGenPipeline(denoiser=copy.deepcopy(self.ema_model).eval(), scheduler=self.sampling_scheduler())

    @staticmethod
    def sample(pipe, n: int, steps: int, seed: int) -> torch.Tensor:
        """(n, 1, 32, 32) in [0, 1]: the model's 28x28 digits in the data's background frame."""
        out = pipe(
            batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt"
        )
        return pad_digits(out.images.float(), background=0.0)


class HFGenFlowRecipe(HFGenRecipe):
    """hfgen's recipe with the flow-matching objective of ``train_diffusion.py --objective flow_matching`` (see the
    module docstring): everything but the objective and the sampler is ``HFGenRecipe``'s."""

    name = "hfgen-flow"
    num_train_timesteps = 1000
    weighting_scheme = "logit_normal"
    logit_mean, logit_std = 0.0, 1.0
    objective_args = {
        "objective": "flow_matching",
        "num_train_timesteps": num_train_timesteps,
        "weighting_scheme": weighting_scheme,
    }

    def setup_objective(self) -> None:
        self.noise_scheduler = None  # rectified flow has no noise schedule to build: sigma is drawn per example

    def loss(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """MSE of the velocity eps - x0 at x_t = (1 - sigma) x0 + sigma eps, sigma ~ logit-normal(0, 1)."""
        noise = torch.randn(clean.shape, generator=generator)
        sigmas = compute_density_for_timestep_sampling(
            self.weighting_scheme, clean.shape[0], self.logit_mean, self.logit_std, generator=generator
        )  # (B,) in (0, 1)
        return self.objective_loss(clean, noise, sigmas)

    def sampling_scheduler(self):
        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0)

    @staticmethod
    def sample(pipe, n: int, steps: int, seed: int) -> torch.Tensor:
        """As ``HFGenRecipe.sample``, with as many denoiser calls as ``steps`` Euler / DDIM steps: 2k - 1 for k Heun
        steps."""
        return HFGenRecipe.sample(pipe, n, (steps + 1) // 2, seed)


RECIPES = {r.name: r for r in (DiffusersRecipe, HFGenRecipe, HFGenFlowRecipe)}


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------------


def load_classifier(quick: bool, train_x: torch.Tensor, train_y: torch.Tensor) -> DigitClassifier:
    if (CLASSIFIER / "config.json").exists():
        return DigitClassifier.from_pretrained(CLASSIFIER).eval()
    if not quick:
        raise FileNotFoundError(f"{CLASSIFIER} not found: run benchmarks/train_digit_classifier.py first")
    torch.manual_seed(0)
    small = DigitClassifier(channels=(8, 16, 16), feature_dim=32)
    return fit_digit_classifier(small, train_x, train_y, num_steps=30, batch_size=64, learning_rate=1e-2)


def sample_in_batches(recipe, pipe, n: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    return torch.cat([recipe.sample(pipe, min(batch, n - i), steps, seed + i) for i in range(0, n, batch)])


def train_interleaved(recipes, train_x, budget_s: float, slice_s: float, seed: int) -> dict[str, dict]:
    """Train every recipe for ``budget_s`` seconds of its own, alternating in slices of ``slice_s`` seconds."""
    gens = {r.name: torch.Generator().manual_seed(seed) for r in recipes}
    used = {r.name: 0.0 for r in recipes}
    losses = {r.name: [] for r in recipes}
    # calibrate: 10 steps each, to estimate the total number of steps (diffusers' cosine schedule needs a length)
    for r in recipes:
        start = time.perf_counter()
        for _ in range(3 if budget_s < 60 else 10):
            idx = torch.randint(0, len(train_x), (r.batch_size,), generator=gens[r.name])
            losses[r.name].append(r.train_step(train_x[idx], gens[r.name], 0.0))
        spent = time.perf_counter() - start
        used[r.name] += spent
        r.start(int(budget_s / (spent / r.steps)))
    while any(used[r.name] < budget_s for r in recipes):
        for r in recipes:
            slice_end = min(used[r.name] + slice_s, budget_s)
            start = time.perf_counter()
            while used[r.name] < slice_end:
                idx = torch.randint(0, len(train_x), (r.batch_size,), generator=gens[r.name])
                losses[r.name].append(r.train_step(train_x[idx], gens[r.name], min(1.0, used[r.name] / budget_s)))
                now = time.perf_counter()
                used[r.name] += now - start
                start = now
    return {
        r.name: {
            "train_seconds": round(used[r.name], 1),
            "steps": r.steps,
            "images_seen": r.steps * r.batch_size,
            "final_loss_mean_last_100": float(np.mean(losses[r.name][-100:])),
            "parameters": sum(p.numel() for p in r.model.parameters()),
        }
        for r in recipes
    }


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Quality at a fixed CPU budget: diffusers' recipe vs hfgen's.")
    p.add_argument("--mnist", type=Path, default=MNIST)
    p.add_argument("--budget_minutes", type=float, default=15.0, help="training wall-clock budget per recipe")
    p.add_argument("--slice_seconds", type=float, default=30.0, help="length of one interleaved training slice")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--eval_batch_size", type=int, default=250)
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads: 2 on a quiet 2-core machine (1 if it is shared)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=list(RECIPES), help="which to train")
    p.add_argument("--output_dir", type=Path, default=ARTIFACTS / "quality")
    p.add_argument("--results", type=Path, default=None, help="append a markdown block to this file")
    p.add_argument(
        "--quick", action="store_true", help="tiny models, 0.1-minute budget, 20 samples, 3 steps, 500 held-out digits"
    )
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1 if args.quick else args.threads)  # the test suite shares the cores: one thread there
    torch.manual_seed(args.seed)
    if args.quick:
        args.budget_minutes, args.slice_seconds = min(args.budget_minutes, 0.1), 2.0
        args.num_samples, args.num_inference_steps = min(args.num_samples, 20), min(args.num_inference_steps, 3)
    train_x, train_y = load_digits(args.mnist, "train")  # (8000, 1, 32, 32) in [-1, 1]
    test_x, _ = load_digits(args.mnist, "test")  # (2000, 1, 32, 32)
    if args.quick:
        test_x = test_x[:500]
    classifier = load_classifier(args.quick, train_x, train_y)

    recipes = []
    for name in dict.fromkeys(args.recipes):  # each from the same seed: hfgen and hfgen-flow start from one network
        torch.manual_seed(args.seed)
        recipes.append(RECIPES[name](args.quick))
    training = train_interleaved(recipes, train_x, args.budget_minutes * 60, args.slice_seconds, args.seed)

    # floor: real training digits vs held-out, with the same numbers of images as the model figures
    subset = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))[: args.num_samples]]
    results = {
        "floor_same_n": fid_kid(test_x, subset, classifier),
        "floor_all_8000": fid_kid(test_x, train_x[:1000] if args.quick else train_x, classifier),
        "floor_class_balance": vars(class_balance(subset, classifier)),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for r in recipes:
        pipe = r.pipeline()
        start = time.perf_counter()
        images = sample_in_batches(r, pipe, args.num_samples, args.num_inference_steps, args.eval_batch_size, args.seed)
        sample_s = time.perf_counter() - start
        results[r.name] = {
            **training[r.name],
            "sampling_seconds": round(sample_s, 1),
            **fid_kid(test_x, images, classifier, value_range=(0, 1)),
            "class_balance": vars(class_balance(images, classifier, value_range=(0, 1))),
        }
        pipe.save_pretrained(args.output_dir / r.name)
        torch.save(images[:64].clone(), args.output_dir / r.name / "samples.pt")
    results.update(comparisons(results))
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_results(report(results, args), args.results)
    return results


def comparisons(results: dict) -> dict:
    """The summary keys: "best", the lower FID of the DDPM-trained recipes (bench_sampler_steps.py re-samples it with
    DDIM/DDPM schedulers, which a flow model cannot take); the FID ratios over diffusers; the hfgen objective with the
    lower FID."""
    out = {}
    ddpm_family = [k for k in ("diffusers", "hfgen") if k in results]
    if ddpm_family:
        out["best"] = min(ddpm_family, key=lambda k: results[k]["fid"])
    for name in ("hfgen", "hfgen-flow"):
        if name in results and "diffusers" in results:
            key = f"fid_ratio_{name.replace('-', '_')}_over_diffusers"
            out[key] = results[name]["fid"] / results["diffusers"]["fid"]
    if "hfgen" in results and "hfgen-flow" in results:
        better = min(("hfgen", "hfgen-flow"), key=lambda k: results[k]["fid"])
        out["better_hfgen_objective"] = OBJECTIVE_NAMES[better]
    return out


OBJECTIVE_NAMES = {"hfgen": "diffusion (v-prediction, min-SNR-5)", "hfgen-flow": "flow matching (rectified flow)"}


def report(results: dict, args: argparse.Namespace) -> str:
    """The markdown block: one row per recipe, the real-versus-real floors, the FID ratios and the better objective."""
    lines = [header("Quality at a fixed CPU budget (bench_quality.py)" + (" [quick]" if args.quick else ""))]
    lines.append(
        f"- budget {args.budget_minutes} min of training per recipe, interleaved slices of {args.slice_seconds} s; "
        f"{args.num_samples} samples, {args.num_inference_steps} denoiser calls each (DDIM steps; for hfgen-flow "
        f"{(args.num_inference_steps + 1) // 2} flow-matching Heun steps); FID/KID vs the 2000 held-out digits\n"
    )
    lines.append("| | params | steps | images seen | FID | KID | class entropy | max class share | sampling s |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name in [r for r in RECIPES if r in results]:
        r = results[name]
        cb = r["class_balance"]
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {r['images_seen']} | {r['fid']:.2f} | "
            f"{r['kid_mean']:.2f} ± {r['kid_std']:.2f} | {cb['normalized_entropy']:.3f} | {cb['max_class_share']:.3f} | "
            f"{r['sampling_seconds']} |"
        )
    for key, label in (
        ("floor_same_n", f"real vs real ({args.num_samples} train)"),
        ("floor_all_8000", "real vs real (8000 train)"),
    ):
        f = results[key]
        lines.append(f"| {label} | | | | {f['fid']:.2f} | {f['kid_mean']:.2f} ± {f['kid_std']:.2f} | | | |")
    lines.append("")
    for name in ("hfgen", "hfgen-flow"):
        key = f"fid_ratio_{name.replace('-', '_')}_over_diffusers"
        if key in results:
            lines.append(f"FID ratio {name} / diffusers: {results[key]:.3f} (goal <= 0.1)")
    if "better_hfgen_objective" in results:
        fids = f"FID {results['hfgen']['fid']:.2f} diffusion vs {results['hfgen-flow']['fid']:.2f} flow matching"
        lines.append(f"better hfgen objective: {results['better_hfgen_objective']} ({fids})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(parse_args())
