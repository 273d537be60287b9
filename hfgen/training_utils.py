"""Plumbing shared by the training scripts in ``training/`` (diffusion, CLIP, autoencoder, GAN).

- Checkpoints: ``output_dir/checkpoint-<step>`` folders written by ``accelerator.save_state`` into a temporary
  ``.tmp-checkpoint-<step>`` folder and renamed when complete, so a run killed during a write never leaves a
  half-written ``checkpoint-<step>``; ``--checkpoints_total_limit`` keeps the newest ones; ``--resume_from_checkpoint``
  takes ``latest`` or a ``checkpoint-<step>`` folder.
- EMA: a diffusers ``EMAModel`` travels in the checkpoint as safetensors (``hfgen.loading.save_ema_state``) through
  Accelerate's save / load pre-hooks.
- Data: the training set from ``--mnist_npz``, ``--dataset_name`` (Hub), ``--train_data_dir`` (imagefolder) or the
  built-in shapes.
- Images: a grid of image tensors for the sample logs.

The recipe itself (arguments, model, loss, loop) stays in each flat script.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import PIL.Image
import torch
from accelerate.logging import get_logger

from hfgen.data import load_image_dataset, load_mnist_npz, make_shapes_dataset
from hfgen.loading import load_ema_state, save_ema_state

logger = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SCRIPT_STATE_FILE = "hfgen_script_state.json"  # counters a script keeps beside the accelerate state


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints, oldest first (temp folders of an interrupted write never match)."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(output_dir, d))
        for d in os.listdir(output_dir)
        if (m := CHECKPOINT_RE.match(d)) and os.path.isdir(os.path.join(output_dir, d))
    ]
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The path of the newest complete ``checkpoint-<step>`` in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def check_resume_arg(resume_from_checkpoint: str | None) -> None:
    """Reject a ``--resume_from_checkpoint`` that is neither None, ``latest`` nor a ``checkpoint-<step>`` folder."""
    resume = resume_from_checkpoint
    if resume not in (None, "latest") and not (
        os.path.isdir(resume) and CHECKPOINT_RE.fullmatch(os.path.basename(os.path.normpath(resume)))
    ):
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a checkpoint-<step> folder (or 'latest')")


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> tuple[str | None, int]:
    """The checkpoint to resume from and its step; ``latest`` with no checkpoint means a fresh start (None, 0)."""
    if resume_from_checkpoint is None:
        return None, 0
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return (found[-1][1], found[-1][0]) if found else (None, 0)
    path = resume_from_checkpoint
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not os.path.isdir(path) or not m:
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is not a checkpoint-<step> folder "
            f"(or 'latest'); found {[p for _, p in list_checkpoints(output_dir)]}"
        )
    return path, int(m.group(1))


def all_finite(tensors) -> bool:
    """True when no tensor of ``tensors`` holds NaN or inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def remove_partial_checkpoints(output_dir: str) -> None:
    """Delete the temp folders a kill during ``save_checkpoint`` left behind (main process, before training)."""
    for stale in Path(output_dir).glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale)


def prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
    """Keep the newest ``total_limit`` checkpoints (all when None); each old one is renamed before it is deleted."""
    if total_limit is None:
        return
    for _, old in list_checkpoints(output_dir)[:-total_limit]:
        doomed = os.path.join(output_dir, ".deleting-" + os.path.basename(old))
        os.replace(old, doomed)  # never leave a half-deleted checkpoint-<step>
        shutil.rmtree(doomed)


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    total_limit: int | None = None,
    weights=(),
    script_state: dict | None = None,
) -> None:
    """
    ``accelerator.save_state`` into a temp folder, then an atomic rename to ``checkpoint-<step>`` and pruning to
    ``total_limit``. Call it on every process (each writes its own random states).

    :param weights: tensors checked first: if any holds NaN or inf, no checkpoint is written (``RuntimeError``).
    :param script_state: small JSON-able counters of the script (``SCRIPT_STATE_FILE`` in the checkpoint), read back
        with ``read_script_state``.
    """
    if not all_finite(weights):
        raise RuntimeError(f"refusing to write checkpoint-{step}: the weights hold NaN or inf")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process and script_state is not None:
        Path(tmp, SCRIPT_STATE_FILE).write_text(json.dumps(script_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, resume_from_checkpoint: str | None, output_dir: str) -> int:
    """Restore the state of ``--resume_from_checkpoint`` (``latest`` or a folder); returns its step, 0 for a new run."""
    path, step = resolve_resume(resume_from_checkpoint, output_dir)
    if path is None:
        if resume_from_checkpoint is not None:
            logger.info(f"no checkpoint in {output_dir}: starting a new run")
        return 0
    accelerator.load_state(path)
    logger.info(f"resumed from {path} at step {step}")
    return step


def read_script_state(resume_from_checkpoint: str | None, output_dir: str) -> dict:
    """The ``script_state`` saved with the checkpoint that ``load_checkpoint`` resumes from; {} for a new run or a
    checkpoint written without one."""
    path, _ = resolve_resume(resume_from_checkpoint, output_dir)
    if path is None or not os.path.exists(os.path.join(path, SCRIPT_STATE_FILE)):
        return {}
    return json.loads(Path(path, SCRIPT_STATE_FILE).read_text())


# ----------------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------------


def attach_ema(accelerator, ema) -> None:
    """Move a diffusers ``EMAModel`` to the device and make it travel in the checkpoints as safetensors
    (``register_for_checkpointing`` would pickle it)."""
    ema.to(accelerator.device)

    def save_ema_hook(models, weights, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_ema_state(ema, output_dir)

    def load_ema_hook(models, input_dir: str) -> None:
        load_ema_state(ema, input_dir)
        ema.to(accelerator.device)  # loaded on the CPU

    accelerator.register_save_state_pre_hook(save_ema_hook)
    accelerator.register_load_state_pre_hook(load_ema_hook)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_train_dataset(
    args,
    num_shapes: int,
    caption_column: str | None = None,
    label_column: str | None = None,
    exclude_pairs: list[tuple[str, str]] | None = None,
):
    """
    The training set as a ``datasets.Dataset`` with an ``image`` column (and ``text`` / ``label`` as asked for), from
    ``args.mnist_npz`` (first 8000 digits), ``args.dataset_name`` / ``args.train_data_dir``, or else the built-in
    shapes (``num_shapes`` images at ``args.resolution``, seeded by ``args.seed``, without ``exclude_pairs``).
    """
    if getattr(args, "mnist_npz", None):
        return load_mnist_npz(args.mnist_npz, split="train")
    if args.dataset_name or args.train_data_dir:
        return load_image_dataset(
            dataset_name=args.dataset_name,
            train_data_dir=args.train_data_dir,
            dataset_config_name=args.dataset_config_name,
            image_column=args.image_column,
            caption_column=caption_column,
            label_column=label_column,
            cache_dir=args.cache_dir,
        )
    return make_shapes_dataset(
        num_images=num_shapes, image_size=args.resolution, seed=args.seed, exclude_pairs=exclude_pairs
    )


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------


def to_pil_grid(images: torch.Tensor, cols: int) -> PIL.Image.Image:
    """Images (N, C, H, W) in [-1, 1] -> one RGB grid, ``cols`` per row."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    rows = math.ceil(n / cols)
    grid = torch.zeros(3, rows * h, cols * w, dtype=torch.uint8)
    for i in range(n):
        grid[:, i // cols * h : (i // cols + 1) * h, i % cols * w : (i % cols + 1) * w] = x[i]
    return PIL.Image.fromarray(grid.permute(1, 2, 0).numpy())
