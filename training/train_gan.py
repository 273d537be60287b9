"""Train a DCGAN (hfgen ``GANGenerator`` + ``GANDiscriminator``) on images.

    accelerate launch training/train_gan.py --output_dir gan-shapes --max_train_steps 3000
    accelerate launch training/train_gan.py --mnist_npz ../shared/data/mnist10k.npz --loss hinge --spectral_norm \\
        --class_conditional --output_dir gan-mnist

Per step: one discriminator update, then one generator update, each with its own Adam (two-time-scale update rule:
``--g_lr``, ``--d_lr``; Heusel et al. 2017).

    non-saturating (``--loss ns``, Goodfellow et al. 2014):  L_D = softplus(-D(x)) + softplus(D(G(z)))
                                                            L_G = softplus(-D(G(z)))
    hinge (``--loss hinge``, Lim & Ye 2017; Miyato 2018):   L_D = relu(1 - D(x)) + relu(1 + D(G(z)))
                                                            L_G = -D(G(z))
    R1 (Mescheder et al. 2018), lazy as in StyleGAN2:       every ``--r1_every`` steps add
                                                            r1_every * r1_gamma / 2 * E ||grad_x D(x)||^2 to L_D

The generator's weights are averaged (``--use_ema``, diffusers ``EMAModel``); the saved generator's BatchNorm
statistics are re-estimated for the weights it is saved with. Output folder: an ``HFGenGANPipeline`` folder
(``generator/``), plus ``discriminator/`` (to continue training), ``samples/`` grids and tensorboard logs.

Many processes: the generator's BatchNorm normalises each process's batch with that batch's own statistics (as DDP
does), so 2 processes x b train differently from 1 process x 2b; ``--sync_batchnorm`` uses the statistics of the
global batch (torch's ``SyncBatchNorm`` on GPUs, ``hfgen.training_utils.GlobalBatchNorm2d`` elsewhere), and then both
layouts train the same weights (tested). The minibatch-std groups of the discriminator are consecutive images, so a
per-process batch that divides by the group size (4) forms the same groups.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel

from hfgen.gan import CLASS_CONDITIONINGS, GAN_PRESETS, GANDiscriminator, GANGenerator
from hfgen.pipelines import HFGenGANPipeline
from hfgen.training_utils import (
    GlobalBatchDraws,
    NonFiniteGuard,
    TrainingLength,
    UpdateLoop,
    add_image_data_args,
    add_run_args,
    attach_ema,
    check_resume_arg,
    checkpoint_if_due,
    checkpoint_weights,
    convert_sync_batchnorm,
    count_classes,
    fused_adam,
    guarded_update,
    image_train_set,
    load_checkpoint,
    log_image_grid,
    make_accelerator,
    plain_batchnorm,
    save_pipeline,
    start_trackers,
    to_pil_grid,
)

logger = get_logger(__name__)
GAN_LOSSES = ("ns", "hinge")

# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # model
    p.add_argument("--preset", default="dcgan", choices=sorted(GAN_PRESETS))
    p.add_argument("--latent_dim", type=int, default=None, help="overrides the preset's latent_dim")
    p.add_argument("--spectral_norm", action="store_true", help="spectral normalisation in the discriminator")
    p.add_argument("--class_conditional", action="store_true", help="condition both networks on the labels")
    p.add_argument("--class_conditioning", default="concat", choices=CLASS_CONDITIONINGS)
    # objective
    p.add_argument("--loss", default="ns", choices=GAN_LOSSES)
    p.add_argument("--r1_gamma", type=float, default=0.1, help="R1 weight; 0 turns it off")
    p.add_argument("--r1_every", type=int, default=16, help="lazy R1: apply (scaled up) every N steps")
    # data
    add_image_data_args(p, label_help="labels of a custom data set for --class_conditional")
    # optimisation
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--num_epochs", type=int, default=20)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides num_epochs")
    p.add_argument("--learning_rate", type=float, default=2e-4, help="both learning rates unless --g_lr / --d_lr")
    p.add_argument("--g_lr", type=float, default=None, help="generator learning rate (TTUR)")
    p.add_argument("--d_lr", type=float, default=None, help="discriminator learning rate (TTUR)")
    p.add_argument("--adam_beta1", type=float, default=0.5)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="must be 1 (alternating updates)")
    p.add_argument("--max_grad_norm", type=float, default=0.0, help="0: no clipping")
    p.add_argument("--use_ema", action="store_true", help="save an exponential moving average of the generator")
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument(
        "--sync_batchnorm",
        action="store_true",
        help="BatchNorm statistics over the global batch of all processes (torch's SyncBatchNorm on GPUs); by "
        "default each process normalises with its own batch's statistics, as DDP does",
    )
    p.add_argument("--bn_calibration_batches", type=int, default=16, help="batches to re-estimate BatchNorm stats")
    # samples
    p.add_argument("--sample_steps", type=int, default=500, help="write a sample grid every N steps")
    p.add_argument("--num_sample_images", type=int, default=64)
    add_run_args(p, output_dir="gan-model")
    args = p.parse_args(argv)

    if sum(x is not None for x in (args.mnist_npz, args.dataset_name, args.train_data_dir)) > 1:
        raise ValueError("give at most one of --mnist_npz, --dataset_name and --train_data_dir")
    for name in ("train_batch_size", "num_epochs", "resolution", "num_sample_images", "r1_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"--gradient_accumulation_steps must be 1 for alternating GAN updates, got "
            f"{args.gradient_accumulation_steps}"
        )
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.r1_gamma < 0:
        raise ValueError(f"--r1_gamma must be >= 0, got {args.r1_gamma}")
    if args.class_conditional and (args.dataset_name or args.train_data_dir) and args.label_column is None:
        raise ValueError("--class_conditional with --dataset_name / --train_data_dir needs --label_column")
    args.g_lr = args.learning_rate if args.g_lr is None else args.g_lr
    args.d_lr = args.learning_rate if args.d_lr is None else args.d_lr
    if args.channels is None:
        args.channels = 1 if args.mnist_npz else 3
    check_resume_arg(args.resume_from_checkpoint)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """L_D from logits (B,) of real and generated images: "ns" (softplus form of the log loss) or "hinge"."""
    if kind == "ns":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    raise ValueError(f"kind must be one of {GAN_LOSSES}, got {kind!r}")


def generator_loss(fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """L_G from the logits (B,) of generated images: "ns" (non-saturating -log D) or "hinge" (-D)."""
    if kind == "ns":
        return F.softplus(-fake_logits).mean()
    if kind == "hinge":
        return -fake_logits.mean()
    raise ValueError(f"kind must be one of {GAN_LOSSES}, got {kind!r}")


def r1_penalty(discriminator, real: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """R1 = E_x ||grad_x D(x)||^2 over real images (B, C, H, W), differentiable w.r.t. D's weights."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real, class_labels).logits  # (B,)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)  # (B, C, H, W)
    return grad.pow(2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_batchnorm(
    generator: GANGenerator, num_batches: int, batch_size: int, num_classes: int | None, seed: int = 0
):
    """Re-estimate the BatchNorm running statistics of ``generator`` as plain averages over samples drawn from their
    own generator seeded by ``seed`` (the training's random state is left alone)."""
    bns = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    generator.train()
    device, rng = generator.device, torch.Generator().manual_seed(seed)
    for _ in range(num_batches):
        z = torch.randn(batch_size, generator.config.latent_dim, generator=rng).to(device, generator.dtype)
        y = torch.randint(0, num_classes, (batch_size,), generator=rng).to(device) if num_classes else None
        generator(z, y)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    generator.eval()
    return generator


def sampling_generator(generator: GANGenerator, ema: EMAModel | None, args, num_processes: int) -> GANGenerator:
    """An eval-mode copy of the generator with the EMA weights (if any) and BatchNorm stats re-estimated for them, in
    batches of the global training batch (``train_batch_size x num_processes``, the same for any process layout)."""
    g = plain_batchnorm(copy.deepcopy(generator))  # sampled by one process: no cross-process statistics
    if ema is not None:
        ema.copy_to(g.parameters())
    batch = args.train_batch_size * num_processes
    return recalibrate_batchnorm(g, args.bn_calibration_batches, batch, g.config.num_classes, seed=args.seed)


@torch.no_grad()
def log_samples(generator, fixed_z, fixed_labels, args, accelerator: Accelerator, step: int) -> None:
    """A grid of samples of the fixed z: png in ``samples/`` and tensorboard."""
    grid = to_pil_grid(generator(fixed_z, fixed_labels).sample, cols=int(math.sqrt(len(fixed_z))) or 1)
    folder = Path(args.output_dir, "samples")
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"samples-{step:06d}.png")
    log_image_grid(accelerator, "samples", grid, step)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def make_loader(args, dataset, transform) -> torch.utils.data.DataLoader:
    """Batches of (images (B, C, H, W) in [-1, 1], labels (B,)); label 0 where the data set has none."""
    has_labels = "label" in dataset.column_names
    dataset.set_transform(
        lambda ex: {
            "pixel_values": [transform(im) for im in ex["image"]],
            "label": ex["label"] if has_labels else [0] * len(ex["image"]),
        }
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= args.train_batch_size,
        collate_fn=lambda rows: (
            torch.stack([r["pixel_values"] for r in rows]),
            torch.tensor([r["label"] for r in rows], dtype=torch.long),
        ),
        num_workers=args.dataloader_num_workers,
    )


def build_gan(args, num_classes: int | None, device) -> tuple[GANGenerator, GANDiscriminator]:
    """Generator and discriminator of ``--preset``, with the flags' overrides (latent size, conditioning, spectral
    norm, SyncBatchNorm in G)."""
    g_kwargs, d_kwargs = (dict(kw) for kw in GAN_PRESETS[args.preset])
    if args.latent_dim is not None:
        g_kwargs["latent_dim"] = args.latent_dim
    common = {"sample_size": args.resolution, "num_classes": num_classes}
    G = GANGenerator(**g_kwargs, **common, out_channels=args.channels, class_conditioning=args.class_conditioning)
    D = GANDiscriminator(**d_kwargs, **common, in_channels=args.channels, spectral_norm=args.spectral_norm)
    if args.sync_batchnorm:
        G = convert_sync_batchnorm(G, device)
    return G, D


@dataclasses.dataclass
class Trainer:
    """What the loop updates, prepared by Accelerate (``G``, ``D`` wrapped; ``generator`` the unwrapped G)."""

    G: torch.nn.Module
    D: torch.nn.Module
    generator: GANGenerator
    g_opt: torch.optim.Optimizer
    d_opt: torch.optim.Optimizer
    g_sched: object
    d_sched: object
    loader: torch.utils.data.DataLoader
    length: TrainingLength
    ema: EMAModel | None
    num_classes: int | None

    def weights(self) -> list[torch.Tensor]:
        return checkpoint_weights(self.generator, self.D, ema=self.ema)


def prepare_trainer(args, accelerator: Accelerator, G, D, loader, num_classes: int | None) -> Trainer:
    """The two Adams (TTUR), their LR schedules over the sharded run, one ``accelerator.prepare`` of all of them with
    the loader, and G's EMA."""
    ema = EMAModel(G.parameters(), decay=args.ema_decay) if args.use_ema else None
    betas = (args.adam_beta1, args.adam_beta2)
    g_opt = fused_adam(G.parameters(), decoupled_weight_decay=False, lr=args.g_lr, betas=betas)
    d_opt = fused_adam(D.parameters(), decoupled_weight_decay=False, lr=args.d_lr, betas=betas)
    length = TrainingLength.of(accelerator, loader, args)
    g_sched, d_sched = (length.lr_scheduler(args, opt, accelerator.num_processes) for opt in (g_opt, d_opt))
    G, D, g_opt, d_opt, loader, g_sched, d_sched = accelerator.prepare(G, D, g_opt, d_opt, loader, g_sched, d_sched)
    if ema is not None:
        attach_ema(accelerator, ema)  # on the device, saved in the checkpoints as safetensors
    generator = accelerator.unwrap_model(G)
    return Trainer(G, D, generator, g_opt, d_opt, g_sched, d_sched, loader, length, ema, num_classes)


def fixed_sample_inputs(args, trainer: Trainer, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The z (and labels, cycling through the classes) of every sample grid, seeded apart from the training."""
    latent_dim = trainer.generator.config.latent_dim
    fixed_z = torch.randn(args.num_sample_images, latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
    if not trainer.num_classes:
        return fixed_z, None
    return fixed_z, (torch.arange(args.num_sample_images) % trainer.num_classes).to(device)


def gan_update(args, accelerator, trainer: Trainer, guard: NonFiniteGuard, real, labels, step: int) -> dict:
    """One discriminator update, then one generator update against the just-updated D; z of the global batch keyed
    by ``step``. Returns the losses (tensors) for the logs."""
    y = labels if trainer.num_classes else None
    latent_dim = trainer.generator.config.latent_dim
    draws = GlobalBatchDraws(accelerator, real.shape[0], args.seed, step)

    # a. discriminator: real vs detached fakes, plus the lazy R1 penalty
    with torch.no_grad():
        fake = trainer.G(draws.randn(latent_dim), y).sample  # (B, C, H, W)
    d_loss = discriminator_loss(trainer.D(real, y).logits, trainer.D(fake, y).logits, args.loss)
    losses = {"d_loss": d_loss}
    if args.r1_gamma > 0 and step % args.r1_every == 0:
        losses["r1"] = r1_penalty(trainer.D, real, y)
        d_loss = d_loss + args.r1_every * args.r1_gamma / 2 * losses["r1"]
    guarded_update(accelerator, guard, d_loss, trainer.d_opt, trainer.D.parameters(), args.max_grad_norm)

    # b. generator: fool the (just updated) discriminator
    g_loss = generator_loss(trainer.D(trainer.G(draws.randn(latent_dim), y).sample, y).logits, args.loss)
    guarded_update(accelerator, guard, g_loss, trainer.g_opt, trainer.G.parameters(), args.max_grad_norm)
    trainer.d_opt.zero_grad(set_to_none=True)  # drop the grads g_loss left in D
    return {**losses, "g_loss": g_loss}


def train_loop(args, accelerator: Accelerator, trainer: Trainer, fixed: tuple) -> tuple[int, dict, int]:
    """Train from the resumed step to ``max_train_steps``; returns (last step, last logs, skipped updates)."""
    global_step, script_state = load_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir)
    guard = NonFiniteGuard(accelerator, args.max_nonfinite_steps, script_state)  # the count survives a resume
    loop = UpdateLoop(accelerator, trainer.loader, trainer.length, global_step)
    logs = {}
    trainer.G.train()
    trainer.D.train()
    for _, _, (real, labels) in loop:
        losses = gan_update(args, accelerator, trainer, guard, real, labels, loop.global_step)
        loop.updated()  # no accumulation: every batch is an update
        guard.end_update(loop.global_step, trainer.ema, trainer.generator)
        trainer.g_sched.step()
        trainer.d_sched.step()
        logs = {**{k: v.item() for k, v in losses.items()}, "g_lr": trainer.g_sched.get_last_lr()[0]}
        loop.show(logs)
        checkpoint_if_due(accelerator, args, loop.global_step, guard, trainer.weights)
        if accelerator.is_main_process and args.sample_steps and loop.global_step % args.sample_steps == 0:
            g_sample = sampling_generator(trainer.generator, trainer.ema, args, accelerator.num_processes)
            log_samples(g_sample, *fixed, args, accelerator, loop.global_step)
    return loop.global_step, logs, guard.skipped


def save_outputs(args, accelerator: Accelerator, trainer: Trainer, fixed: tuple, report: dict) -> None:
    """The saved generator (EMA weights, BatchNorm stats re-estimated for them), its last grid, ``discriminator/``,
    the report and the Hub upload (main process)."""
    g_final = sampling_generator(trainer.generator, trainer.ema, args, accelerator.num_processes)
    log_samples(g_final, *fixed, args, accelerator, report["steps"])
    accelerator.unwrap_model(trainer.D).save_pretrained(os.path.join(args.output_dir, "discriminator"))
    save_pipeline(args, HFGenGANPipeline(generator=g_final), report)


def main(args: argparse.Namespace) -> dict:
    """Train, save an ``HFGenGANPipeline`` folder (and ``discriminator/``) in ``args.output_dir``; return a report."""
    accelerator = make_accelerator(args)  # data order = f(seed, epoch)
    dataset, transform = image_train_set(args, label_column=args.label_column)
    num_classes = count_classes(dataset, needed_by="--class_conditional") if args.class_conditional else None
    loader = make_loader(args, dataset, transform)  # (B, C, H, W) in [-1, 1] and labels (B,)
    G, D = build_gan(args, num_classes, accelerator.device)
    trainer = prepare_trainer(args, accelerator, G, D, loader, num_classes)
    start_trackers(accelerator, args, "train_gan")
    logger.info(f"{len(dataset)} images, {trainer.length.max_train_steps} steps of batch {args.train_batch_size}")

    fixed = fixed_sample_inputs(args, trainer, accelerator.device)
    global_step, logs, skipped = train_loop(args, accelerator, trainer, fixed)

    accelerator.wait_for_everyone()
    report = {"steps": global_step, "skipped_steps": skipped, **logs}
    if accelerator.is_main_process:
        save_outputs(args, accelerator, trainer, fixed, report)
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main(parse_args())
