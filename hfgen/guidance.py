"""Classifier-free guidance (Ho & Salimans 2022), in one place: the null condition and condition dropout in
training, and at sampling time the stacked [cond; uncond] batch and the guided prediction

    pred_hat = pred(x_t, null) + s (pred(x_t, c) - pred(x_t, null))        (eq. 6; s = ``guidance_scale``)

over every channel of the prediction (eps, v, x_0 or the flow velocity alike); a learned variance half stays
conditional. s = 1 is one conditional pass; guidance is on for s > 1.

The null condition: class label ``num_classes`` (one past the last class; the denoisers' label tables have that
extra row) and the empty caption "" (encoded and padded like any prompt).
"""

from __future__ import annotations

import numbers

import torch

NULL_CAPTION = ""

# The default s of each pipeline, used by the pipeline, the training scripts' validation samples and the model card.
# Both are the best measured scale: class-conditional MNIST reads the asked digit most often at s = 3
# (benchmarks/RESULTS_class_conditional.md: U-Net 91%, DiT 78%, RIN 100%), and the demo's flow-matching shapes
# pipeline draws the asked colour and shape most often at s = 3 (benchmarks/RESULTS.md, "Issue 16, stops 28-30":
# 90.9% seen / 89.6% left-out pairs over 432 images, against 90.1 / 83.3 at s = 2 and 90.9 / 83.3 at s = 5).
CLASS_GUIDANCE_SCALE = 3.0
TEXT_GUIDANCE_SCALE = 3.0


def guidance_enabled(guidance_scale: float) -> bool:
    """Whether s asks for guidance (two passes per step): s > 1."""
    return guidance_scale > 1.0


def check_guidance_scale(guidance_scale: float) -> None:
    """Raise unless s is a number >= 1 (diffusers reads any s <= 1 as "no guidance"; here that is s = 1)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise ValueError(f"guidance_scale must be a number >= 1, got {guidance_scale!r}")
    if not guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance; diffusers' 0 is 1 here), got {guidance_scale}")


# ----------------------------------------------------------------------------------------------------------------------
# Training: condition dropout
# ----------------------------------------------------------------------------------------------------------------------


def null_class_labels(batch_size: int, num_classes: int, device=None) -> torch.Tensor:
    """(B,) long, all the null label ``num_classes``."""
    return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)


def drop_class_labels(labels: torch.Tensor, drop: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels (B,) with the rows where ``drop`` (B,) bool is set replaced by the null label ``num_classes``."""
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def drop_captions(captions: list[str], drop: torch.Tensor) -> list[str]:
    """Captions with the rows where ``drop`` (B,) bool is set replaced by the null caption ""."""
    return [NULL_CAPTION if d else c for d, c in zip(drop.tolist(), captions, strict=True)]


# ----------------------------------------------------------------------------------------------------------------------
# Sampling: the stacked batch and the guided prediction
# ----------------------------------------------------------------------------------------------------------------------


def stack_conditions(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser's keyword inputs for one pass over [cond; uncond]: each (B, ...) pair -> (2B, ...)."""
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond must have the same inputs, got {sorted(cond)} and {sorted(uncond)}")
    return {k: torch.cat([cond[k], uncond[k]]) for k in cond}


def guided_prediction(model_output: torch.Tensor, channels: int, guidance_scale: float) -> torch.Tensor:
    """The output (2B, C or 2C, H, W) of a pass over [cond; uncond] -> (B, C or 2C, H, W): eq. 6 on the prediction's
    ``channels`` C; the learned variance half (channels C..2C), when there is one, stays conditional."""
    pred, var = model_output[:, :channels], model_output[:, channels:]
    pred_cond, pred_uncond = pred.chunk(2)
    pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    return torch.cat([pred, var.chunk(2)[0]], dim=1) if var.shape[1] else pred
