"""Sample-quality metrics for hfgen's benchmarks.

- ``DigitClassifier``: a small CNN trained on the 8000 training digits; its penultimate activations are the feature
  space for FID/KID on digits (Inception features mean little on 32x32 grey digits), its predictions give the class
  histogram of generated digits.
- ``fid_kid``: FID and KID through ``torchmetrics`` with that (or any) feature extractor.
- ``class_balance``: histogram, entropy and largest-class share of predicted digits, to expose mode collapse.
- ``shape_color_accuracy``: a rule-based judge of the shapes data (which pure colour, which shape).

Images enter every function as float tensors (B, C, H, W) in ``value_range`` = (-1, 1) (the pipelines' and training's
range, the default) or (0, 1) (``output_type="pt"`` of a pipeline). Digits are (B, 1, 32, 32): 28x28 MNIST padded
by 2 pixels of background on each side, as ``load_digits`` returns them; ``pad_digits`` frames 28x28 samples alike.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

VALUE_RANGES = ((-1.0, 1.0), (0.0, 1.0))

# ----------------------------------------------------------------------------------------------------------------------
# Image helpers
# ----------------------------------------------------------------------------------------------------------------------


def to_unit_range(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Map float images (B, C, H, W) from ``value_range`` to [0, 1], clamped; reject wrongly scaled input."""
    value_range = tuple(float(v) for v in value_range)
    if value_range not in VALUE_RANGES:
        raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range}")
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
        desc = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, C, H, W), got {desc}")
    lo, hi = value_range
    if images.numel() and (images.min() < lo - 1.0 or images.max() > hi + 1.0):
        raise ValueError(
            f"images must lie in value_range {value_range}, got values in "
            f"[{images.min().item():.3g}, {images.max().item():.3g}] (uint8-style [0, 255] input?)"
        )
    return ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def load_digits(path: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """
    Load ``mnist10k.npz`` as padded tensors.

    :param split: "train" (first 8000), "test" (last 2000) or "all".
    :return: images (N, 1, 32, 32) float in [-1, 1] (background -1), labels (N,) long.
    """
    splits = {"train": slice(0, 8000), "test": slice(8000, None), "all": slice(None)}
    if split not in splits:
        raise ValueError(f"split must be one of {tuple(splits)}, got {split!r}")
    with np.load(path) as data:
        images = torch.from_numpy(data["images"][splits[split]].copy())  # (N, 28, 28) uint8
        labels = torch.from_numpy(data["labels"][splits[split]].astype(np.int64))
    images = images.float()[:, None] / 127.5 - 1.0  # (N, 1, 28, 28) in [-1, 1]
    return pad_digits(images), labels  # (N, 1, 32, 32)


def pad_digits(images: torch.Tensor, size: int = 32, background: float = -1.0) -> torch.Tensor:
    """
    Centre digit images in a ``size`` x ``size`` frame of ``background``, as ``load_digits`` frames MNIST's 28x28
    digits: a model trained on the 28x28 digits is scored on the same 32x32 frames as the data.

    :param images: (N, C, H, W) with H, W <= size and size - H, size - W even.
    :param background: -1.0 for images in [-1, 1], 0.0 for images in [0, 1].
    """
    h, w = images.shape[-2:]
    if h > size or w > size or (size - h) % 2 or (size - w) % 2:
        raise ValueError(f"images of {h}x{w} cannot be centred in a {size}x{size} frame")
    dy, dx = (size - h) // 2, (size - w) // 2
    return F.pad(images, (dx, dx, dy, dy), value=background)


# ----------------------------------------------------------------------------------------------------------------------
# Digit classifier (feature extractor for FID/KID on digits)
# ----------------------------------------------------------------------------------------------------------------------


class DigitClassifier(ModelMixin, ConfigMixin):
    """
    A small CNN digit classifier: three conv stages (a 3x3 conv, ReLU and a 2x2 max-pool each), then a
    ``feature_dim`` fully connected layer (the features for FID/KID) and a linear head to ``num_classes`` logits.

    Input: images (B, in_channels, sample_size, sample_size) in [-1, 1].
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,  # grey digits
        sample_size: int = 32,  # must divide by 8 (three 2x2 pools)
        channels: tuple[int, ...] = (16, 32, 64),  # width of each conv stage
        feature_dim: int = 128,  # width of the penultimate layer = number of FID/KID features
        num_classes: int = 10,
    ):
        super().__init__()
        if sample_size % 2 ** len(channels):
            raise ValueError(f"sample_size must be divisible by {2 ** len(channels)}, got {sample_size}")
        stages, c_in = [], in_channels
        for c in channels:
            stages += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.convs = nn.Sequential(*stages)
        side = sample_size // 2 ** len(channels)
        self.fc = nn.Linear(c_in * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations: images (B, C, H, W) in [-1, 1] -> (B, feature_dim)."""
        h = self.convs(images)  # (B, C', H/8, W/8)
        return F.relu(self.fc(h.flatten(1)))  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits: images (B, C, H, W) in [-1, 1] -> (B, num_classes)."""
        return self.head(self.features(images))


class ClassifierFeatures(nn.Module):
    """
    The feature extractor that torchmetrics' FID/KID call: a frozen ``DigitClassifier`` in eval mode.

    torchmetrics passes a custom module's input through untouched (its ``normalize`` flag only applies to its own
    Inception), so the images given to the metric must already be in [-1, 1]; ``num_features`` spares the metric a
    probe with a random 299x299 image.
    """

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.config.feature_dim

    def train(self, mode: bool = True) -> ClassifierFeatures:
        # the metric may be put in train mode; the classifier's layers must never follow
        super().train(mode)
        self.classifier.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)  # (B, feature_dim)


def fit_digit_classifier(
    model: DigitClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_steps: int = 400,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> DigitClassifier:
    """
    Train ``model`` with AdamW and a cosine learning rate on images (N, 1, 32, 32) in [-1, 1] with labels (N,).
    Light augmentation: random shifts of up to 2 pixels. Returns the model in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_steps)
    model.train()
    for _ in range(num_steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        x = images[idx]
        dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    return model.eval()


@torch.no_grad()
def asked_label_share(
    classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, num_classes: int = 10
) -> tuple[float, list[float]]:
    """Samples (N, 1, 32, 32) in [0, 1] drawn for ``labels`` -> (the fraction the classifier reads as the asked label,
    the same per class, rounded to 3 digits)."""
    hit = (classifier(images * 2 - 1).argmax(-1) == labels).float()  # the classifier takes [-1, 1]
    return hit.mean().item(), [round(hit[labels == c].mean().item(), 3) for c in range(num_classes)]


@torch.no_grad()
def classifier_accuracy(
    model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> float:
    """Top-1 accuracy of ``model`` on images (N, 1, 32, 32) in [-1, 1]."""
    model.eval()
    preds = torch.cat([model(images[i : i + batch_size]).argmax(-1) for i in range(0, images.shape[0], batch_size)])
    return (preds == labels).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# FID / KID
# ----------------------------------------------------------------------------------------------------------------------


def _as_feature_module(feature_extractor: nn.Module) -> nn.Module:
    if isinstance(feature_extractor, DigitClassifier):
        return ClassifierFeatures(feature_extractor)
    if not isinstance(feature_extractor, nn.Module):
        raise TypeError(f"feature_extractor must be an nn.Module, got {type(feature_extractor).__name__}")
    return feature_extractor


@torch.no_grad()
def fid_kid(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    feature_extractor: nn.Module,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 500,
    kid_subsets: int = 50,
    kid_subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """
    FID and KID between two image sets, in the feature space of ``feature_extractor``.

    :param real_images: (N, C, H, W) float in ``value_range``.
    :param fake_images: (M, C, H, W) float in ``value_range``.
    :param feature_extractor: a ``DigitClassifier`` (its penultimate features are used) or any module mapping images
        in [-1, 1] to (B, F) features, ideally with a ``num_features`` attribute.
    :param kid_subset_size: KID's subset size; default min(1000, N, M).
    :return: ``{"fid", "kid_mean", "kid_std"}``. FID grows with fewer samples (a biased estimator): compare figures
        computed with the same N and M only.
    """
    real = to_unit_range(real_images, value_range) * 2 - 1  # (N, C, H, W) in [-1, 1]
    fake = to_unit_range(fake_images, value_range) * 2 - 1
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"real and fake images must have the same (C, H, W), got {real.shape[1:]} and {fake.shape[1:]}"
        )
    if min(real.shape[0], fake.shape[0]) < 2:
        raise ValueError(f"need at least 2 images per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    features = _as_feature_module(feature_extractor)
    device = next(features.parameters()).device
    subset_size = kid_subset_size or min(1000, real.shape[0], fake.shape[0])
    fid = FrechetInceptionDistance(feature=features, reset_real_features=True).to(device)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": a few MB at our sizes
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=features, subsets=kid_subsets, subset_size=subset_size).to(device)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, images.shape[0], batch_size):
            chunk = images[i : i + batch_size].to(device)
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws random subsets
    kid_mean, kid_std = kid.compute()
    torch.random.set_rng_state(state)
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


# ----------------------------------------------------------------------------------------------------------------------
# Class balance (mode collapse)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ClassBalance:
    """
    :param counts: (num_classes,) number of images predicted as each class.
    :param fractions: counts / total.
    :param normalized_entropy: entropy of ``fractions`` divided by log(num_classes): 1 = uniform, 0 = one class.
    :param max_class_share: the largest fraction (0.1 for balanced digits, 1.0 for a single class).
    :param collapsed: ``normalized_entropy < min_normalized_entropy``.
    """

    counts: list[int]
    fractions: list[float]
    normalized_entropy: float
    max_class_share: float
    collapsed: bool


@torch.no_grad()
def class_balance(
    images: torch.Tensor,
    classifier: DigitClassifier,
    value_range: tuple[float, float] = (-1.0, 1.0),
    min_normalized_entropy: float = 0.9,
    batch_size: int = 500,
) -> ClassBalance:
    """
    Histogram of the classes ``classifier`` predicts for images (N, C, H, W) in ``value_range``.

    Real MNIST scores a normalized entropy of ~0.998; a model that only draws 5 of 10 digits scores at most 0.70.
    """
    x = to_unit_range(images, value_range) * 2 - 1
    classifier.eval()
    device = next(classifier.parameters()).device
    preds = torch.cat(
        [classifier(x[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
    )
    num_classes = classifier.config.num_classes
    counts = torch.bincount(preds, minlength=num_classes)
    p = counts.double() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    normalized = entropy / math.log(num_classes)
    return ClassBalance(
        counts=counts.tolist(),
        fractions=[round(v, 4) for v in p.tolist()],
        normalized_entropy=normalized,
        max_class_share=p.max().item(),
        collapsed=normalized < min_normalized_entropy,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Shapes judge (text-to-image)
# ----------------------------------------------------------------------------------------------------------------------

# the pure colours of hfgen.data's shapes, as RGB in [0, 1]
PURE_COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
# fraction of its bounding box that a shape fills
FILL_RATIOS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def judge_shape_color(image: torch.Tensor, ink_threshold: float = 0.35) -> tuple[str | None, str | None]:
    """
    Name the colour and shape one RGB image (3, H, W) in [0, 1] shows, or (None, None) if it is blank.

    1. ink = pixels whose brightest channel exceeds ``ink_threshold``;
    2. colour = the pure colour nearest to the median ink pixel;
    3. shape = the shape whose fill ratio (ink pixels of that colour / their bounding box area) is nearest.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    # 1. ink
    pixels = image.flatten(1).T  # (H*W, 3)
    ink = pixels.max(dim=1).values > ink_threshold  # (H*W,)
    if ink.sum() < 4:
        return None, None
    # 2. colour
    names = list(PURE_COLORS)
    palette = torch.tensor([PURE_COLORS[n] for n in names], dtype=pixels.dtype)  # (6, 3)
    median = pixels[ink].median(dim=0).values  # (3,)
    color = names[torch.cdist(median[None], palette).argmin().item()]
    # 3. shape: pixels nearer to this colour than to any other pure colour or to black
    palette_black = torch.cat([palette, torch.zeros(1, 3, dtype=pixels.dtype)])  # (7, 3)
    nearest = torch.cdist(pixels, palette_black).argmin(dim=1)  # (H*W,)
    mask = (nearest == names.index(color)).view(image.shape[1:])  # (H, W)
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum().item() / box_area.item()
    shape = min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill))
    return color, shape


def shape_color_accuracy(
    images: torch.Tensor,
    colors: list[str],
    shapes: list[str],
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> dict[str, float]:
    """
    How often RGB images (B, 3, H, W) in ``value_range`` show the asked colour and shape, by ``judge_shape_color``.

    :param colors: B colour names from ``PURE_COLORS``; ``shapes``: B shape names from ``FILL_RATIOS``.
    :return: ``{"accuracy" (both right), "color_accuracy", "shape_accuracy"}``.
    """
    x = to_unit_range(images, value_range)
    if x.shape[1] != 3:
        raise ValueError(f"images must be RGB (B, 3, H, W), got {tuple(x.shape)}")
    if not len(colors) == len(shapes) == x.shape[0]:
        raise ValueError(f"need one colour and one shape per image ({x.shape[0]}), got {len(colors)} and {len(shapes)}")
    for c in colors:
        if c not in PURE_COLORS:
            raise ValueError(f"unknown colour {c!r}; accepted: {tuple(PURE_COLORS)}")
    for s in shapes:
        if s not in FILL_RATIOS:
            raise ValueError(f"unknown shape {s!r}; accepted: {tuple(FILL_RATIOS)}")
    judged = [judge_shape_color(img) for img in x]
    color_ok = [jc == c for (jc, _), c in zip(judged, colors)]
    shape_ok = [js == s for (_, js), s in zip(judged, shapes)]
    n = len(judged)
    return {
        "accuracy": sum(a and b for a, b in zip(color_ok, shape_ok)) / n,
        "color_accuracy": sum(color_ok) / n,
        "shape_accuracy": sum(shape_ok) / n,
    }
