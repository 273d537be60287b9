"""Train an autoencoder (``--model ae``) or a VAE (``--model vae``) on images.

    accelerate launch training/train_autoencoder.py --model vae --output_dir vae-shapes --max_train_steps 2000
    accelerate launch training/train_autoencoder.py --model vae --mnist_npz ../shared/data/mnist10k.npz \\
        --resolution 32 --recon_loss bce --output_dir vae-mnist

Loss = reconstruction (``--recon_loss`` mse | l1 | bce, mean over pixels)
     + beta * KL(q(z|x) || N(0, I)) / (C * H * W)        (VAE only; beta = ``--kl_weight``, warmed up linearly over
                                                         ``--kl_warmup_steps``)
With ``--recon_loss bce`` and beta = 1 this is the negative ELBO per pixel of a Bernoulli decoder.

At the end ``config.scaling_factor`` is set to 1/std of the latents of ``--num_scaling_images`` training images, so that
latent diffusion sees unit-variance latents. Output folder: an ``HFGenVAEPipeline`` folder (``vae/`` loads with
``VAEModel.from_pretrained(path, subfolder="vae")``, as ``train_diffusion.py --vae PATH`` does), plus
``samples/`` grids of reconstructions and prior samples and the tensorboard logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel

from hfgen.autoencoder import (
    AUTOENCODER_PRESETS,
    RECONSTRUCTION_LOSSES,
    AutoencoderModel,
    VAEModel,
    reconstruction_loss,
)
from hfgen.pipelines import HFGenVAEPipeline
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
    fused_adam,
    guarded_update,
    image_train_set,
    load_checkpoint,
    log_image_grid,
    make_accelerator,
    save_pipeline,
    start_trackers,
    to_pil_grid,
)

logger = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # model
    p.add_argument("--model", default="vae", choices=["ae", "vae"])
    p.add_argument("--preset", default="ae-small", choices=sorted(AUTOENCODER_PRESETS))
    p.add_argument("--latent_channels", type=int, default=None, help="overrides the preset's latent_channels")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=None, help="overrides the preset's levels")
    # objective
    p.add_argument("--recon_loss", default="mse", choices=RECONSTRUCTION_LOSSES)
    p.add_argument("--kl_weight", type=float, default=1e-3, help="beta of the per-pixel KL term (VAE only)")
    p.add_argument("--kl_warmup_steps", type=int, default=0, help="beta grows linearly from 0 over these steps")
    p.add_argument("--num_scaling_images", type=int, default=1024, help="images for the scaling_factor estimate")
    # data
    add_image_data_args(p, label_help="unused (accepted for a common command line)")
    # optimisation
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--num_epochs", type=int, default=20)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides num_epochs")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--lr_scheduler", default="cosine")
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--use_ema", action="store_true", help="save an exponential moving average of the weights")
    p.add_argument("--ema_decay", type=float, default=0.999)
    # samples
    p.add_argument("--sample_steps", type=int, default=500, help="write reconstruction / prior grids every N steps")
    p.add_argument("--num_sample_images", type=int, default=16)
    add_run_args(p, output_dir="vae-model")
    args = p.parse_args(argv)

    if sum(x is not None for x in (args.mnist_npz, args.dataset_name, args.train_data_dir)) > 1:
        raise ValueError("give at most one of --mnist_npz, --dataset_name and --train_data_dir")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "resolution", "num_sample_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.kl_weight < 0 or args.kl_warmup_steps < 0:
        raise ValueError(
            f"--kl_weight and --kl_warmup_steps must be >= 0, got {args.kl_weight}, {args.kl_warmup_steps}"
        )
    f = 2 ** (len(args.block_out_channels or AUTOENCODER_PRESETS[args.preset]["block_out_channels"]) - 1)
    if args.resolution % f:
        raise ValueError(f"--resolution ({args.resolution}) must be divisible by the preset's downsampling factor {f}")
    if args.channels is None:
        args.channels = 1 if args.mnist_npz else 3
    check_resume_arg(args.resume_from_checkpoint)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def kl_beta(args, step: int) -> float:
    """beta at ``step``: ``kl_weight`` after a linear warm-up of ``kl_warmup_steps``."""
    if args.kl_warmup_steps == 0:
        return args.kl_weight
    return args.kl_weight * min(1.0, step / args.kl_warmup_steps)


class EncodeDecode(torch.nn.Module):
    """The training forward, x -> q(z|x) -> z = mean + std * eps -> reconstruction, as one module, so that it runs
    through the prepared (DDP, autocast) wrapper; the loss stays outside."""

    def __init__(self, vae: AutoencoderModel):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple:
        """:param x: (B, C, H, W) in [-1, 1]. :param eps: (B, c, h, w) standard normal. :return: (recon, posterior)."""
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps  # the AE's posterior is a point mass: std = 0
        return self.vae.decode(z).sample, posterior  # (B, C, H, W)


@torch.no_grad()
def log_samples(vae, fixed_images: torch.Tensor, args, accelerator: Accelerator, step: int) -> None:
    """Grids of (originals | reconstructions) and of prior samples: png files in ``samples/`` and tensorboard."""
    vae.eval()
    n = fixed_images.shape[0]
    recon = vae(fixed_images).sample  # (n, C, H, W)
    recon_grid = to_pil_grid(torch.cat([fixed_images, recon]), cols=n)
    side = args.resolution // vae.downsample_factor
    m = args.num_sample_images
    z = torch.randn(m, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    prior_grid = to_pil_grid(vae.decode(z.to(fixed_images.device, vae.dtype)).sample, cols=math.ceil(math.sqrt(m)))
    folder = Path(args.output_dir, "samples")
    folder.mkdir(parents=True, exist_ok=True)
    recon_grid.save(folder / f"reconstructions-{step:06d}.png")
    prior_grid.save(folder / f"prior-{step:06d}.png")
    log_image_grid(accelerator, "reconstructions", recon_grid, step)
    log_image_grid(accelerator, "prior_samples", prior_grid, step)
    vae.train()


@torch.no_grad()
def latent_std(vae, loader, num_images: int, device) -> float:
    """Standard deviation of posterior samples z over the first ``num_images`` images of ``loader``."""
    vae.eval()
    zs, seen = [], 0
    generator = torch.Generator(device=device).manual_seed(0)
    for batch in loader:
        x = batch.to(device, vae.dtype)
        zs.append(vae.encode(x).latent_dist.sample(generator=generator).float().flatten())
        seen += x.shape[0]
        if seen >= num_images:
            break
    return torch.cat(zs).std().item()


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def make_loader(args, dataset, transform) -> torch.utils.data.DataLoader:
    """Batches (B, C, H, W) in [-1, 1] of the training images."""
    dataset.set_transform(lambda ex: {"pixel_values": [transform(im) for im in ex["image"]]})
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= args.train_batch_size,
        collate_fn=lambda rows: torch.stack([r["pixel_values"] for r in rows]),
        num_workers=args.dataloader_num_workers,
    )


def build_autoencoder(args) -> AutoencoderModel:
    """The ``--model`` (ae | vae) of ``--preset``, with the flags' overrides of its latent channels and levels."""
    kwargs = dict(AUTOENCODER_PRESETS[args.preset])
    if args.latent_channels is not None:
        kwargs["latent_channels"] = args.latent_channels
    if args.block_out_channels is not None:
        kwargs["block_out_channels"] = tuple(args.block_out_channels)
    model_cls = VAEModel if args.model == "vae" else AutoencoderModel
    return model_cls(**kwargs, in_channels=args.channels, out_channels=args.channels, sample_size=args.resolution)


@dataclasses.dataclass
class Trainer:
    """What the loop updates, prepared by Accelerate: ``model`` wraps ``EncodeDecode(vae)``; ``vae`` is unwrapped."""

    model: torch.nn.Module
    vae: AutoencoderModel
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: torch.utils.data.DataLoader
    length: TrainingLength
    ema: EMAModel | None

    def weights(self) -> list[torch.Tensor]:
        return checkpoint_weights(self.vae, ema=self.ema)


def prepare_trainer(args, accelerator: Accelerator, vae: AutoencoderModel, loader) -> Trainer:
    """Optimiser, LR schedule over the sharded run, ``accelerator.prepare`` of all of them with the loader, EMA."""
    ema = EMAModel(vae.parameters(), decay=args.ema_decay) if args.use_ema else None
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = fused_adam(vae.parameters(), lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay)
    length = TrainingLength.of(accelerator, loader, args)
    lr_scheduler = length.lr_scheduler(args, optimizer, accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(EncodeDecode(vae), optimizer, loader, lr_scheduler)
    if ema is not None:
        attach_ema(accelerator, ema)  # on the device, saved in the checkpoints as safetensors
    return Trainer(model, accelerator.unwrap_model(model).vae, optimizer, lr_scheduler, loader, length, ema)


def batch_loss(args, trainer: Trainer, x: torch.Tensor, draws: GlobalBatchDraws, step: int) -> tuple:
    """Loss of one batch x (B, C, H, W) and its parts for the logs: encode, z ~ q(z|x) with noise of the global
    batch, decode; reconstruction, plus beta x KL per pixel for the VAE."""
    vae = trainer.vae
    latent_shape = (vae.config.latent_channels,) + (args.resolution // vae.downsample_factor,) * 2
    recon, posterior = trainer.model(x, draws.randn(*latent_shape))  # (B, C, H, W)
    recon_loss = reconstruction_loss(recon, x, args.recon_loss).mean()
    if args.model != "vae":
        return recon_loss, {"recon_loss": recon_loss.detach()}
    kl = posterior.kl().mean() / x[0].numel()
    beta = kl_beta(args, step)
    return recon_loss + beta * kl, {"recon_loss": recon_loss.detach(), "kl": kl.detach(), "beta": beta}


def train_loop(args, accelerator: Accelerator, trainer: Trainer, fixed_images: torch.Tensor) -> tuple[int, dict, int]:
    """Train from the resumed step to ``max_train_steps``; returns (last step, last logs, skipped updates)."""
    global_step, script_state = load_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir)
    guard = NonFiniteGuard(accelerator, args.max_nonfinite_steps, script_state)  # the count survives a resume
    loop = UpdateLoop(accelerator, trainer.loader, trainer.length, global_step, args.gradient_accumulation_steps)
    logs = {}
    trainer.model.train()
    for epoch, batch_index, x in loop:
        with accelerator.accumulate(trainer.model):
            draws = GlobalBatchDraws(accelerator, x.shape[0], args.seed, epoch, batch_index)  # keyed by the batch
            loss, parts = batch_loss(args, trainer, x, draws, loop.global_step)
            guarded_update(accelerator, guard, loss, trainer.optimizer, trainer.model.parameters(),
                           args.max_grad_norm, trainer.lr_scheduler)  # fmt: skip
        if not loop.updated():
            continue
        guard.end_update(loop.global_step, trainer.ema, trainer.vae)
        logs = {"loss": loss.item(), "lr": trainer.lr_scheduler.get_last_lr()[0]}
        logs.update({k: float(v) for k, v in parts.items()})
        loop.show(logs)
        checkpoint_if_due(accelerator, args, loop.global_step, guard, trainer.weights)
        if accelerator.is_main_process and args.sample_steps and loop.global_step % args.sample_steps == 0:
            log_samples(trainer.vae, fixed_images, args, accelerator, loop.global_step)
    return loop.global_step, logs, guard.skipped


def save_outputs(args, accelerator: Accelerator, trainer: Trainer, fixed_images: torch.Tensor, report: dict) -> None:
    """EMA weights in, ``scaling_factor`` = 1 / std(z), the last sample grids, the pipeline folder, the report and
    the Hub upload (main process)."""
    vae = trainer.vae
    if trainer.ema is not None:
        trainer.ema.copy_to(vae.parameters())
    std = latent_std(vae, trainer.loader, args.num_scaling_images, accelerator.device)
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-8))
    report.update(latent_std=std, scaling_factor=vae.config.scaling_factor)
    log_samples(vae, fixed_images, args, accelerator, report["steps"])
    logger.info(f"scaling_factor {report['scaling_factor']:.4f}")
    save_pipeline(args, HFGenVAEPipeline(vae=vae), report)


def main(args: argparse.Namespace) -> dict:
    """Train, set ``scaling_factor``, save an ``HFGenVAEPipeline`` folder in ``args.output_dir``; return a report."""
    accelerator = make_accelerator(args)  # data order = f(seed, epoch)
    dataset, transform = image_train_set(args)
    fixed_images = torch.stack([transform(dataset[i]["image"]) for i in range(min(len(dataset), 8))])  # for grids
    fixed_images = fixed_images.to(accelerator.device)
    loader = make_loader(args, dataset, transform)
    trainer = prepare_trainer(args, accelerator, build_autoencoder(args), loader)
    start_trackers(accelerator, args, "train_autoencoder")
    logger.info(f"{len(dataset)} images, {trainer.length.max_train_steps} steps of batch {args.train_batch_size}")

    global_step, logs, skipped = train_loop(args, accelerator, trainer, fixed_images)

    accelerator.wait_for_everyone()
    report = {"steps": global_step, "skipped_steps": skipped, **logs}
    if accelerator.is_main_process:
        save_outputs(args, accelerator, trainer, fixed_images, report)
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main(parse_args())
