"""Plumbing shared by the training scripts in ``training/`` (diffusion, CLIP, autoencoder, GAN).

- Checkpoints: ``output_dir/checkpoint-<step>`` folders written by ``accelerator.save_state`` into a temporary
  ``.tmp-checkpoint-<step>`` folder and renamed when complete, so a run killed during a write never leaves a
  half-written ``checkpoint-<step>``; ``--checkpoints_total_limit`` keeps the newest ones; ``--resume_from_checkpoint``
  takes ``latest`` or a ``checkpoint-<step>`` folder.
  Each checkpoint ends with a manifest of its files and sizes; ``latest`` skips a damaged checkpoint with a warning,
  an explicit damaged one is a ``ValueError`` naming the file and the newest whole checkpoint.
- Many processes, the same in all four scripts: ``GlobalBatchDraws`` (random draws keyed by (seed, step, ...) and made
  for the global batch, so 2 processes x b draw what 1 process x 2b draws), ``NonFiniteGuard`` (a non-finite loss
  or gradient skips the update on every rank alike; ``guarded_update`` is the whole update rule around it),
  ``resumed_epochs`` (where a resumed run picks the data up), ``TrainingLength`` (updates per epoch from the
  sharded loader, and the LR schedule over them), ``gather_with_grad`` (CLIP's global-batch contrast) and
  ``convert_sync_batchnorm`` (GAN ``--sync_batchnorm``, also on CPU / gloo).
- The run: ``add_run_args``, the run flags of every script, and ``make_accelerator``, the Accelerator, logging,
  seed and output folder they give; ``UpdateLoop``, the loop of every script (batches from the resumed position to
  ``--max_train_steps`` updates, the update count and its progress bar); ``checkpoint_if_due`` at every
  ``--checkpointing_steps``.
- Trackers and the Hub: ``--report_to`` takes Accelerate's trackers, ``start_trackers`` hands them the run's flags;
  ``log_image_grid`` sends sample grids to each active one; ``hub_training_info`` is what a model card shows of the
  flags.
- EMA: a diffusers ``EMAModel`` travels in the checkpoint as safetensors (``hfgen.loading.save_ema_state``) through
  Accelerate's save / load pre-hooks.
- Data: the training set from ``--mnist_npz``, ``--dataset_name`` (Hub), ``--train_data_dir`` (imagefolder) or the
  built-in shapes.
- Images: a grid of image tensors for the sample logs.
- Optimiser: ``fused_adam``, torch's AdamW / Adam with the fused kernel, in all four scripts; ``Lamb`` (RIN's
  optimiser) and its ``lamb_param_groups`` for ``train_diffusion.py --optimizer lamb``.

The recipe itself (arguments, model, loss, loop) stays in each flat script.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from tqdm.auto import tqdm

from hfgen.data import image_transform, load_image_dataset, load_mnist_npz, make_shapes_dataset
from hfgen.loading import load_ema_state, save_ema_state

logger = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------------------------------------------------


def fused_adam(params, decoupled_weight_decay: bool = True, **kwargs) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (``Adam`` with ``decoupled_weight_decay=False``) with the fused kernel: one call updates
    every parameter instead of one small kernel per tensor, the same update up to float rounding. On a 2-core CPU the
    step of the demo's 1.4M-parameter U-Net (282 tensors) takes 6.5 ms instead of 31. torch has the kernel for the
    devices the scripts train on (CPU, CUDA, MPS, XPU) and checks the parameters at the first step."""
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    return cls(params, fused=True, **kwargs)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., "Large Batch Optimization for Deep Learning", 2019), the optimiser RIN was trained with.

    Per tensor w: the Adam direction with bias correction plus decoupled weight decay,
    u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w, scaled by the trust ratio ||w|| / ||u|| (1 where either norm
    is 0, so a zero-initialised tensor takes a plain Adam step), then w <- w - lr * ratio * u. A group with
    ``adapt=False`` skips the ratio: ``lamb_param_groups`` puts biases and norm scales there, without weight decay,
    as RIN's (pix2seq) recipe does. The trust ratio needs whole tensors: use it with replicated parameters (DDP,
    one process), not with FSDP / DeepSpeed shards. Moment updates and norms are torch's multi-tensor (foreach)
    kernels, one call per group.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 adapt: bool = True):  # fmt: skip
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adapt=adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Lamb does not support sparse gradients")
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(m, denom)
        torch._foreach_div_(update, [1 - beta1 ** s["step"] for s in states])
        if group["weight_decay"]:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        if group["adapt"]:
            w_norm, u_norm = torch._foreach_norm(params), torch._foreach_norm(update)
            ratio = [torch.where((w > 0) & (u > 0), w / u.clamp_min(1e-30), 1.0) for w, u in zip(w_norm, u_norm)]
            torch._foreach_mul_(update, ratio)
        torch._foreach_add_(params, update, alpha=-group["lr"])


def lamb_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for ``Lamb``: matrices and convolution kernels (weight decay, trust ratio), and 0- / 1-D tensors
    (biases, norm scales, gains: neither). Only trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "adapt": True},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "adapt": False},
    ]


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


MANIFEST_FILE = "hfgen_manifest.json"  # {relative file name: size in bytes}, written last at save time


def checkpoint_damage(path: str) -> str | None:
    """What is wrong with the checkpoint folder ``path`` (a missing or resized file against its manifest, or a
    safetensors file whose header does not open), or None when it is whole."""
    manifest = Path(path, MANIFEST_FILE)
    if manifest.is_file():
        for name, size in json.loads(manifest.read_text()).items():
            file = Path(path, name)
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size != size:
                return f"{file} has {file.stat().st_size} bytes, {size} when saved"
        return None
    from safetensors import safe_open  # a checkpoint written before manifests: open every weights file

    for file in sorted(Path(path).rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError
            return f"{file} does not open ({err})"
    return None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> tuple[str | None, int]:
    """
    The checkpoint to resume from and its step; ``latest`` with no checkpoint means a fresh start (None, 0).
    ``latest`` is the newest whole checkpoint (a damaged newer one is skipped with a warning); an explicit damaged
    checkpoint is a ``ValueError`` naming the damaged file and the newest whole checkpoint.
    """
    if resume_from_checkpoint is None:
        return None, 0
    found = list_checkpoints(output_dir)
    if resume_from_checkpoint == "latest":
        for step, path in reversed(found):
            damage = checkpoint_damage(path)
            if damage is None:
                return path, step
            logger.warning(f"skipping damaged checkpoint {path}: {damage}", main_process_only=False)
        return None, 0
    path = resume_from_checkpoint
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not os.path.isdir(path) or not m:
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is not a checkpoint-<step> folder "
            f"(or 'latest'); found {[p for _, p in found]}"
        )
    damage = checkpoint_damage(path)
    if damage is not None:
        good = next((p for _, p in reversed(found) if checkpoint_damage(p) is None), None)
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is damaged: {damage}; the newest whole checkpoint is {good}"
        )
    return path, int(m.group(1))


def write_manifest(folder: str) -> None:
    """Record every file of the checkpoint ``folder`` with its size (``MANIFEST_FILE``), so a damaged copy is found."""
    files = sorted(f for f in Path(folder).rglob("*") if f.is_file() and f.name != MANIFEST_FILE)
    sizes = {str(f.relative_to(folder)): f.stat().st_size for f in files}
    Path(folder, MANIFEST_FILE).write_text(json.dumps(sizes, indent=1))


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
    :param script_state: small JSON-able counters of the script (``SCRIPT_STATE_FILE`` in the checkpoint), returned
        again by ``load_checkpoint``.
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
        write_manifest(tmp)  # last, once every process has written its files
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, resume_from_checkpoint: str | None, output_dir: str) -> tuple[int, dict]:
    """Restore the state of ``--resume_from_checkpoint`` (``latest`` or a folder); returns its step and the
    ``script_state`` saved with it, (0, {}) for a new run ({} for a checkpoint written without one)."""
    path, step = resolve_resume(resume_from_checkpoint, output_dir)
    if path is None:
        if resume_from_checkpoint is not None:
            logger.info(f"no checkpoint in {output_dir}: starting a new run")
        return 0, {}
    accelerator.load_state(path)
    logger.info(f"resumed from {path} at step {step}")
    state_file = Path(path, SCRIPT_STATE_FILE)
    return step, json.loads(state_file.read_text()) if state_file.exists() else {}


# ----------------------------------------------------------------------------------------------------------------------
# Many processes: keyed draws, decisions every rank takes alike, global-batch statistics
# ----------------------------------------------------------------------------------------------------------------------


def keyed_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator that is a function of ``(seed, *key)`` only (e.g. the step and micro-batch), independent of
    history, so a resumed run draws what an uninterrupted one does."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class GlobalBatchDraws:
    """
    The random draws of one step, made for the whole global batch (all processes) from one keyed generator, of which
    this process keeps its own rows. Accelerate gives process i the rows [i * b, (i + 1) * b) of the global batch, so
    2 processes x batch b draw exactly what 1 process x batch 2b draws.

    :param local_batch: b, this process's batch size.
    """

    def __init__(self, accelerator, local_batch: int, seed: int, *key: int):
        self.generator = keyed_generator(seed, *key)
        self.global_batch = local_batch * accelerator.num_processes
        self.rows = slice(accelerator.process_index * local_batch, (accelerator.process_index + 1) * local_batch)
        self.device = accelerator.device

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal (b, *shape) on the device."""
        return torch.randn(self.global_batch, *shape, generator=self.generator)[self.rows].to(self.device)

    def rand(self, whole_batch: bool = False) -> torch.Tensor:
        """Uniform [0, 1) (b,) on the device; ``whole_batch``: the global batch's (B,), the same on every rank (for a
        decision every rank must take alike; ``rows`` selects this process's part)."""
        u = torch.rand(self.global_batch, generator=self.generator)
        return (u if whole_batch else u[self.rows]).to(self.device)

    def randint(self, high: int) -> torch.Tensor:
        """Integers in [0, high) (b,) on the device."""
        return torch.randint(0, high, (self.global_batch,), generator=self.generator)[self.rows].to(self.device)

    def timestep_density(self, weighting_scheme: str, logit_mean: float, logit_std: float, mode_scale: float):
        """u in [0, 1] (b,) on the device from diffusers' SD3 timestep density (``compute_density_for_timestep_sampling``:
        logit-normal, mode or uniform by ``weighting_scheme``), e.g. the noise level sigma of flow matching."""
        u = compute_density_for_timestep_sampling(
            weighting_scheme, self.global_batch, logit_mean, logit_std, mode_scale, generator=self.generator
        )
        return u[self.rows].to(self.device)


def finite_on_all_ranks(accelerator, *tensors: torch.Tensor) -> bool:
    """True when no tensor holds NaN or inf on any process: the same answer on every rank, so all of them skip a
    step together (a rank that skips alone would leave the others waiting in the gradient all-reduce)."""
    flag = torch.tensor([float(all_finite(tensors))], device=accelerator.device)
    return bool(accelerator.gather(flag).min() > 0)


class NonFiniteGuard:
    """
    The one rule of every script for a non-finite loss or gradient: the flag is reduced over all processes first
    (``finite_on_all_ranks``), so every rank skips the same update, still joins the gradient all-reduce, and never
    steps its optimizer with NaN; after ``max_skips`` skipped updates the run stops with a ``RuntimeError`` (on every
    rank, at the same step).

    Use: ``guard.check(loss)`` after each forward (and ``guard.check(grad_norm)`` after clipping); step the optimizer
    only when ``guard.ok``; then ``guard.end_update(step, ema, model)`` once per optimizer update (the EMA, if any,
    steps there). The count of skipped updates travels in the checkpoints:
    ``save_checkpoint(..., script_state=guard.script_state())``, and the ``script_state`` that ``load_checkpoint``
    returns goes back into the constructor.
    """

    STATE_KEY = "nonfinite_steps"  # the count's name in the checkpoint's script state

    def __init__(self, accelerator, max_skips: int, script_state: dict | None = None):
        self.accelerator, self.max_skips = accelerator, max_skips
        self.skipped = (script_state or {}).get(self.STATE_KEY, 0)  # carried over from the resumed checkpoint
        self.ok = True  # the pending update has been finite on every rank so far

    def script_state(self) -> dict:
        """What a checkpoint keeps of the guard (``save_checkpoint(script_state=...)``)."""
        return {self.STATE_KEY: self.skipped}

    def check(self, *tensors: torch.Tensor | None) -> bool:
        """Fold ``tensors`` (None is ignored) into the pending update's flag; returns the flag."""
        tensors = [t for t in tensors if t is not None]
        self.ok = finite_on_all_ranks(self.accelerator, *tensors) and self.ok
        return self.ok

    def end_update(self, step: int, ema=None, model: torch.nn.Module | None = None) -> bool:
        """Close the pending update; True when it was skipped (counted, logged, and fatal past ``max_skips``). An
        ``ema`` (diffusers' ``EMAModel``, or None) steps on ``model``'s parameters after a finite update only, so a
        skipped update leaves the average as it was, on every rank."""
        if ema is not None and model is None:
            raise ValueError("end_update: an `ema` needs the `model` whose parameters it averages")
        skipped, self.ok = not self.ok, True
        if skipped:
            self.skipped += 1
            logger.warning(
                f"step {step}: non-finite loss or gradient, update skipped ({self.skipped}/{self.max_skips})"
            )
            if self.skipped >= self.max_skips:
                raise RuntimeError(
                    f"stopping at step {step}: {self.skipped} updates had a non-finite loss or gradient "
                    f"(--max_nonfinite_steps {self.max_skips}); lower --learning_rate or try --mixed_precision no"
                )
        elif ema is not None:
            ema.step(model.parameters())
        return skipped


def per_process_batches(accelerator, loader) -> int:
    """How many batches each process gets of ``loader`` once ``accelerator.prepare`` shards it (Accelerate's
    ``BatchSamplerShard``: whole rounds of ``num_processes`` batches, the last round dropped with ``drop_last`` and
    otherwise completed from the start). Known before ``prepare``, so that the LR schedule can be built first and
    prepared in the same call as the model and the loader, which DeepSpeed needs (its batch size is read there)."""
    batches, n = len(loader), accelerator.num_processes
    if n == 1 or accelerator.split_batches:
        return batches
    return batches // n if loader.drop_last else math.ceil(batches / n)


@dataclasses.dataclass
class TrainingLength:
    """
    How long a run is, in optimiser updates counted on one process: ``updates_per_epoch`` from the batches one
    process sees of an epoch (``per_process_batches``), so N processes make the updates ``--max_train_steps`` asks
    for (counting the unsharded loader would make each process's epoch N times too long on paper, and the run would
    stop after 1/N of the asked updates). ``--num_epochs`` counts when ``--max_train_steps`` is not given.
    """

    updates_per_epoch: int
    max_train_steps: int

    @classmethod
    def of(cls, accelerator, loader, args) -> TrainingLength:
        """From the loader *before* ``accelerator.prepare``."""
        batches = per_process_batches(accelerator, loader)
        updates_per_epoch = math.ceil(batches / getattr(args, "gradient_accumulation_steps", 1))
        if updates_per_epoch == 0:
            raise ValueError(
                f"the data set has {len(loader.dataset)} examples, fewer than one global batch "
                f"(--train_batch_size {args.train_batch_size} x {accelerator.num_processes} processes)"
            )
        return cls(updates_per_epoch, args.max_train_steps or args.num_epochs * updates_per_epoch)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_train_steps / self.updates_per_epoch)

    def lr_scheduler(self, args, optimizer, num_processes: int):
        """``--lr_scheduler`` with ``--lr_warmup_steps`` over the run; both counts are multiplied by the number of
        processes because Accelerate's prepared scheduler steps once per process at each update."""
        return get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * num_processes,
            num_training_steps=self.max_train_steps * num_processes,
        )


def checkpoint_weights(*modules: torch.nn.Module, ema=None) -> list[torch.Tensor]:
    """What ``save_checkpoint`` must find finite: the parameters of ``modules`` and the EMA's shadow copies."""
    return [p for m in modules for p in m.parameters()] + (list(ema.shadow_params) if ema is not None else [])


def guarded_update(
    accelerator, guard: NonFiniteGuard, loss, optimizer, parameters, max_grad_norm: float, lr_scheduler=None
):
    """
    The update rule of every script, for one micro-batch (inside ``accelerator.accumulate`` where there is
    accumulation): fold the loss into the all-rank ``guard``, backward (every rank joins the gradient all-reduce, a
    non-finite one too), and at the micro-batch that ends an update clip to ``max_grad_norm`` (0: no clipping; the
    norm is checked too), step the optimizer unless the guard saw NaN or inf on any rank, step ``lr_scheduler`` and
    zero the gradients. The caller closes the update with ``guard.end_update(step)``.

    With fp16 a flagged update backs the grad scaler off as its own step would on an overflow (the scale times the
    backoff factor, and the per-optimizer state of ``unscale_`` cleared for the next update) without stepping: so
    the optimizer never moves on a flagged update, in any precision, and the LR schedule moves on alike.
    """
    guard.check(loss)
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return
    if max_grad_norm > 0:
        guard.check(accelerator.clip_grad_norm_(parameters, max_grad_norm))
    if guard.ok:
        optimizer.step()
    elif accelerator.scaler is not None:
        scaler = accelerator.scaler
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def checkpoint_if_due(accelerator, args, global_step: int, guard: NonFiniteGuard, weights) -> None:
    """At every ``--checkpointing_steps``-th update (0: never) ``save_checkpoint`` into ``--output_dir``, keeping
    ``--checkpoints_total_limit``; ``weights()`` (``checkpoint_weights``) lists what must be finite to be saved, and
    the guard's count travels in the checkpoint."""
    if not args.checkpointing_steps or global_step % args.checkpointing_steps:
        return
    save_checkpoint(
        accelerator,
        args.output_dir,
        global_step,
        args.checkpoints_total_limit,
        weights(),
        script_state=guard.script_state(),
    )


def resumed_epochs(accelerator, loader, global_step: int, length: TrainingLength, accumulation: int = 1):
    """
    Yield (epoch, index of its first batch, its loader) from the epoch that holds ``global_step`` on, each epoch's
    loader set to its seeded order (``loader.set_epoch``); in the resumed epoch the loader skips the batches the
    checkpointed run already trained on (``updates x accumulation``), so a resumed run sees what an uninterrupted one
    sees.
    """
    first_epoch = global_step // length.updates_per_epoch
    skip = (global_step % length.updates_per_epoch) * accumulation
    for epoch in range(first_epoch, length.num_epochs):
        loader.set_epoch(epoch)
        if epoch == first_epoch and skip:
            yield epoch, skip, accelerator.skip_first_batches(loader, skip)
        else:
            yield epoch, 0, loader


class UpdateLoop:
    """
    The loop of every script: the batches from where a resumed run left off (``resumed_epochs``) until
    ``length.max_train_steps`` updates are made, with the update count and its progress bar. After each batch's
    update (inside ``accelerator.accumulate`` where there is accumulation) ``loop.updated()`` says whether the batch
    ended an update, and counts it; after the last update the loop stops without drawing another batch.

        loop = UpdateLoop(accelerator, loader, length, global_step, args.gradient_accumulation_steps)
        for epoch, index, batch in loop:       # index: the batch's place in its epoch (a resumed epoch skips some)
            with accelerator.accumulate(model):
                guarded_update(...)
            if not loop.updated():
                continue                        # a micro-batch of an accumulated update
            ... loop.global_step ...            # EMA, logs, checkpoint_if_due
    """

    def __init__(self, accelerator, loader, length: TrainingLength, global_step: int, accumulation: int = 1):
        self.accelerator, self.loader, self.length, self.accumulation = accelerator, loader, length, accumulation
        self.global_step = global_step
        self.progress = tqdm(
            range(length.max_train_steps),
            initial=global_step,
            desc="steps",
            disable=not accelerator.is_local_main_process,
        )

    @property
    def done(self) -> bool:
        return self.global_step >= self.length.max_train_steps

    def __iter__(self):
        epochs = resumed_epochs(self.accelerator, self.loader, self.global_step, self.length, self.accumulation)
        for epoch, skip, epoch_loader in epochs:
            batches = enumerate(epoch_loader, start=skip)
            while not self.done and (item := next(batches, None)) is not None:
                yield epoch, *item
            if self.done:
                break
        self.progress.close()

    def updated(self) -> bool:
        """True (and one more update counted) when the last batch ended an update."""
        if not self.accelerator.sync_gradients:
            return False
        self.global_step += 1
        self.progress.update(1)
        return True

    def show(self, logs: dict) -> None:
        """Put ``logs`` on the progress bar and send them to the trackers at the current update."""
        self.progress.set_postfix(**logs)
        self.accelerator.log(logs, step=self.global_step)


def gather_with_grad(accelerator, x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each process -> (num_processes * b, ...), rows in process order; gradients flow back to every
    process's own rows (summed over processes, as open_clip's ``gather_with_grad``)."""
    if accelerator.num_processes == 1:
        return x
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x.contiguous()))


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """
    BatchNorm2d whose training statistics are those of the global batch over all processes, on any device (torch's
    ``SyncBatchNorm`` runs on GPUs only); with one process it is ``BatchNorm2d``. Mean and variance come from an
    all-reduce of the per-channel count, sum and sum of squares, with gradients through the all-reduce.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: (B, C, H, W). :return: (B, C, H, W)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not (self.training and distributed and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        import torch.distributed.nn.functional as dist_nn

        xf = x.float()
        count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device)
        stats = torch.cat([count, xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3))])  # (1 + 2C,)
        stats = dist_nn.all_reduce(stats)
        n, C = stats[0], x.shape[1]
        mean = stats[1 : 1 + C] / n
        var = (stats[1 + C :] / n - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every ``BatchNorm2d`` of ``module`` computes global-batch statistics: torch's ``SyncBatchNorm`` on CUDA,
    ``GlobalBatchNorm2d`` elsewhere (same weights, buffers and results)."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            bn = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            convert_sync_batchnorm(child, device)
    return module


def plain_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Undo ``convert_sync_batchnorm`` in place (for a copy used by one process alone, e.g. for sampling)."""
    for name, child in module.named_children():
        if isinstance(child, (GlobalBatchNorm2d, torch.nn.SyncBatchNorm)):
            bn = torch.nn.BatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn.to(child.running_mean.device))
        else:
            plain_batchnorm(child)
    return module


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


def add_image_data_args(p, label_help: str) -> None:
    """The image-data flags of train_autoencoder.py and train_gan.py, read by ``image_train_set`` (train_diffusion.py
    and train_clip.py have conditioning-specific ones of their own)."""
    g = p.add_argument_group("data")
    g.add_argument("--mnist_npz", default=None, help="train on the first 8000 digits of this npz (1 channel)")
    g.add_argument("--dataset_name", default=None, help="a Hub data set; default: the built-in shapes")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="a local imagefolder")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default=None, help="unused (accepted for a common command line)")
    g.add_argument("--label_column", default=None, help=label_help)
    g.add_argument("--num_shapes", type=int, default=4096, help="size of the built-in shapes training set")
    g.add_argument("--resolution", type=int, default=32)
    g.add_argument("--channels", type=int, default=None, choices=[1, 3], help="default: 1 for MNIST, else 3")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--cache_dir", default=None)


def image_train_set(args, label_column: str | None = None):
    """The training images of ``add_image_data_args``'s flags as a ``datasets.Dataset`` (``image``, and ``label``
    when ``label_column`` is given), and the transform to (C, H, W) in [-1, 1]; MNIST's 28x28 digits are framed to
    the resolution by black borders, not resized."""
    dataset = load_train_dataset(args, args.num_shapes, label_column=label_column)
    pad = bool(args.mnist_npz) and args.resolution >= 28
    transform = image_transform(args.resolution, args.channels, args.center_crop, args.random_flip, pad=pad)
    return dataset, transform


def count_classes(dataset, num_classes: int | None = None, needed_by: str = "class conditioning") -> int:
    """The class count of ``dataset``'s ``label`` column: ``num_classes`` (``--num_classes``) when given, else the
    label feature's own count, else the largest label + 1. ``needed_by`` names the flag that asked for labels in
    the errors."""
    if "label" not in dataset.column_names:
        raise ValueError(f"{needed_by} needs a label column; the data set has {dataset.column_names}")
    labels = dataset["label"]
    smallest, largest = int(min(labels)), int(max(labels))
    if smallest < 0:
        raise ValueError(f"{needed_by} needs every example labelled; the data set has label {smallest}")
    source = "--num_classes" if num_classes else "the label feature's class count"
    num_classes = num_classes or getattr(dataset.features["label"], "num_classes", None) or largest + 1
    if largest >= num_classes:
        raise ValueError(f"{source} ({num_classes}) is too small for the largest label {largest}")
    return num_classes


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


IMAGE_CACHE_BYTES = 2**30  # transformed training images are kept in memory when they fit in 1 GiB as float32


def image_cache_fits(num_images: int, image_numel: int, num_workers: int) -> bool:
    """Whether ``num_images`` transformed images of ``image_numel`` float32 values fit in ``IMAGE_CACHE_BYTES``, with
    no data-loader worker (each would keep a copy of its own)."""
    return num_images * image_numel * 4 <= IMAGE_CACHE_BYTES and num_workers == 0


class TransformedImages:
    """``transform(dataset[i]["image"])`` for index ``i``; with ``keep`` each result is kept after its first use, so
    later epochs decode and transform nothing. Only for a deterministic transform (no random crop or flip)."""

    def __init__(self, dataset, transform, keep: bool = False):
        self.dataset, self.transform = dataset, transform
        self.kept: dict[int, torch.Tensor] | None = {} if keep else None

    def __call__(self, i: int) -> torch.Tensor:
        if self.kept is not None and i in self.kept:
            return self.kept[i]
        x = self.transform(self.dataset[i]["image"])
        if self.kept is not None:
            self.kept[i] = x
        return x


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


# ----------------------------------------------------------------------------------------------------------------------
# The run: one Accelerator set-up for all four scripts
# ----------------------------------------------------------------------------------------------------------------------


def add_run_args(p, output_dir: str | None) -> None:
    """The flags of a run that all four scripts share, with the same names, defaults and meaning: seed, precision,
    the non-finite stop, the output folder (``output_dir`` its default; None: required), checkpoints and resume,
    trackers and the Hub. ``make_accelerator`` reads them."""
    g = p.add_argument_group("run: seed, precision, checkpoints, logging, Hub (the same in every training script)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: accelerate's")
    g.add_argument("--max_nonfinite_steps", type=int, default=10, help="stop after this many non-finite updates")
    g.add_argument("--output_dir", default=output_dir, required=output_dir is None)
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    g.add_argument("--logging_dir", default="logs", help="the trackers' folder, relative to --output_dir")
    g.add_argument("--report_to", choices=REPORT_TO_CHOICES, default="tensorboard", help="an Accelerate tracker")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)


def make_accelerator(args, seedable_sampler: bool = True) -> Accelerator:
    """The ``Accelerator`` of a script's shared flags (``--gradient_accumulation_steps``, ``--mixed_precision``,
    ``--report_to``, ``--output_dir``/``--logging_dir``), then logging, ``set_seed(--seed)`` for the model
    initialisation, and the output folder, created on the main process and cleared of the partial checkpoints a kill
    during a write left. ``seedable_sampler``: Accelerate's seeded shuffle, so the data order is f(seed, epoch)
    (train_diffusion.py brings its own ``EpochSampler`` instead)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=seedable_sampler),
        log_with=tracker_arg(args.report_to),
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_partial_checkpoints(args.output_dir)
    return accelerator


def save_pipeline(args, pipeline, report: dict) -> None:
    """Save ``pipeline`` in ``--output_dir`` with ``train_report.json`` (``report``) beside it, and with
    ``--push_to_hub`` upload it to ``--hub_model_id`` (default: the folder's name) with the run's flags on its card."""
    pipeline.save_pretrained(args.output_dir)
    Path(args.output_dir, "train_report.json").write_text(json.dumps(report, indent=2))
    logger.info(f"saved {args.output_dir}")
    if args.push_to_hub:
        pipeline.push_to_hub(args.hub_model_id or Path(args.output_dir).name, training_info=hub_training_info(args))


# ----------------------------------------------------------------------------------------------------------------------
# Trackers
# ----------------------------------------------------------------------------------------------------------------------

# what ``--report_to`` accepts: Accelerate's trackers, "all" of the installed ones, or "none"
REPORT_TO_CHOICES = (
    "tensorboard",
    "wandb",
    "comet_ml",
    "aim",
    "mlflow",
    "clearml",
    "dvclive",
    "swanlab",
    "all",
    "none",
)


SECRET_ARGS = ("hub_token",)  # flags never written to a tracker or a model card


def tracker_arg(report_to: str) -> str | None:
    """``--report_to`` as ``Accelerator(log_with=...)`` takes it ("none" -> None)."""
    return None if report_to == "none" else report_to


def start_trackers(accelerator, args, project: str) -> None:
    """Start ``--report_to``'s trackers on the main process with the run's flags as their config: scalars as they
    are, lists and other values as text (TensorBoard's hparams take scalars only), unset flags and ``hub_token``
    left out."""
    if not accelerator.is_main_process or args.report_to == "none":
        return
    config = {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in vars(args).items()
        if v is not None and k not in SECRET_ARGS
    }
    accelerator.init_trackers(project, config=config)


def hub_training_info(args, **extra) -> dict:
    """The run's flags for the model card of a Hub upload (``training_info``), plus ``extra`` (e.g. the steps made):
    without secrets, the output folders and the upload flags themselves; a flag naming a local file or folder
    (``--mnist_npz``, ``--text_encoder`` ...) shows its name only, not where it lies on this machine (a Hub id
    stays whole)."""
    skip = SECRET_ARGS + ("push_to_hub", "hub_model_id", "output_dir", "logging_dir")
    info = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    info = {k: Path(v).name if isinstance(v, str) and os.path.exists(v) else v for k, v in info.items()}
    return {**info, **extra}


def log_image_grid(accelerator, tag: str, grid: PIL.Image.Image, step: int) -> None:
    """Log one image (a sample grid) to every active tracker: TensorBoard's ``add_image``, and the tracker's own
    ``log_images`` for the others (``wandb.Image`` for wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [grid]}, step=step)
