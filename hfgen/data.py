"""Image data for hfgen's training scripts, tests and benchmarks.

- ``make_shapes_dataset``: the built-in procedural data set (one filled circle / square / triangle in one pure colour
  on black, captioned "a red circle"), the default everywhere a data set is needed. ``exclude_pairs`` holds chosen
  (colour, shape) pairs out of training to measure generalisation to unseen combinations.
- ``load_mnist_npz``: MNIST digits from an npz file, e.g. the tests' and benchmarks' ``../shared/data/mnist10k.npz``
  (first 8000 train, last 2000 test).
- ``load_image_dataset``: any image data set from the Hub (by name, e.g. ``ylecun/mnist``; offline from the cache of an
  earlier run, or from a local folder of its data files) or a local ``imagefolder``; columns are checked up front and
  renamed to the common ``image`` / ``text`` / ``label``.
- ``image_transform``: PIL image -> (C, H, W) float tensor in [-1, 1] at the training resolution.

Every loader returns a ``datasets.Dataset`` with an ``image`` column and, where known, ``text`` and ``label``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value, load_dataset
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

# ----------------------------------------------------------------------------------------------------------------------
# Shapes: the built-in procedural data set
# ----------------------------------------------------------------------------------------------------------------------

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
SHAPE_PAIRS = [(c, s) for c in COLORS for s in SHAPES]  # label = index in this list
COLOR_RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
MIN_SHAPE_FRACTION = 0.35  # smallest shape side as a fraction of the image side (11 px at 32x32)
MAX_SHAPE_FRACTION = 0.8  # largest


def shapes_label(color: str, shape: str) -> int:
    """Index of the (color, shape) pair in ``SHAPE_PAIRS``, e.g. ``shapes_label("red", "circle") == 0``."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return SHAPE_PAIRS.index((color, shape))


def draw_shape(color: str, shape: str, image_size: int, box: tuple[int, int, int]) -> Image.Image:
    """
    One filled shape on black, without anti-aliasing (every pixel is black or exactly ``COLOR_RGB[color]``).

    :param box: (x0, y0, side): the shape fills the square [x0, x0 + side) x [y0, y0 + side).
    """
    x0, y0, side = box
    x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive corner
    image = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(image)
    fill = COLOR_RGB[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # triangle, apex up
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def make_shapes_dataset(
    num_images: int = 4096,
    image_size: int = 32,
    seed: int = 0,
    exclude_pairs: Sequence[tuple[str, str]] | None = None,
) -> Dataset:
    """
    The built-in shapes data set: ``num_images`` RGB images of size ``image_size``, each one filled shape from
    ``SHAPES`` in one pure colour from ``COLORS`` on black, with random size (35-80% of the side) and position
    (fully inside the image). Columns: ``image`` (PIL RGB), ``text`` ("a red circle"), ``label`` (``ClassLabel``
    over all 18 ``SHAPE_PAIRS``, so label ids stay the same when pairs are excluded).

    :param seed: the same seed gives the same images.
    :param exclude_pairs: (color, shape) pairs that never appear, e.g. ``[("red", "triangle")]``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    excluded = set()
    for pair in exclude_pairs or ():
        color, shape = pair
        excluded.add(SHAPE_PAIRS[shapes_label(color, shape)])
    allowed = [i for i, pair in enumerate(SHAPE_PAIRS) if pair not in excluded]
    if not allowed:
        raise ValueError("exclude_pairs leaves no (color, shape) pair to draw")

    rng = np.random.default_rng(seed)
    lo = max(3, round(MIN_SHAPE_FRACTION * image_size))
    hi = max(lo, round(MAX_SHAPE_FRACTION * image_size))
    labels = rng.choice(allowed, size=num_images)
    sides = rng.integers(lo, hi + 1, size=num_images)
    corner_u = rng.random((num_images, 2))  # position within the free range, uniform

    images, texts = [], []
    for label, side, (u, v) in zip(labels.tolist(), sides.tolist(), corner_u):
        free = image_size - side
        x0, y0 = int(u * (free + 1)), int(v * (free + 1))
        color, shape = SHAPE_PAIRS[label]
        images.append(_png_bytes(draw_shape(color, shape, image_size, (x0, y0, side))))
        texts.append(f"a {color} {shape}")
    features = Features(
        {
            "image": ImageFeature(),
            "text": Value("string"),
            "label": ClassLabel(names=[f"{c} {s}" for c, s in SHAPE_PAIRS]),
        }
    )
    return Dataset.from_dict({"image": images, "text": texts, "label": labels.tolist()}, features=features)


def _png_bytes(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


# ----------------------------------------------------------------------------------------------------------------------
# MNIST from the shared npz
# ----------------------------------------------------------------------------------------------------------------------

MNIST_NUM_TRAIN = 8000  # the first 8000 of mnist10k.npz train, the last 2000 are held out


def load_mnist_npz(path: str | os.PathLike, split: str = "train") -> Dataset:
    """
    MNIST digits from an npz with ``images`` uint8 (N, 28, 28) and ``labels`` (N,).

    :param split: "train" (the first 8000), "test" (the rest) or "all".
    :return: columns ``image`` (PIL "L", 28x28), ``label`` (``ClassLabel`` 0-9), ``text`` ("a handwritten digit 3").
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST npz file not found: {path}")
    with np.load(path) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise ValueError(f"{path} must hold arrays 'images' and 'labels', found {sorted(data.files)}")
        images, labels = data["images"], data["labels"]
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(
            f"{path}: images must be uint8 (N, H, W) with one label each, got {images.dtype} {images.shape}"
        )
    rows = {"train": slice(0, MNIST_NUM_TRAIN), "test": slice(MNIST_NUM_TRAIN, None), "all": slice(None)}[split]
    images, labels = images[rows], labels[rows].astype(np.int64)
    features = Features(
        {"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)]), "text": Value("string")}
    )
    return Dataset.from_dict(
        {
            "image": [_png_bytes(Image.fromarray(img, mode="L")) for img in images],
            "label": labels.tolist(),
            "text": [f"a handwritten digit {d}" for d in labels.tolist()],
        },
        features=features,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Hub or local image folders
# ----------------------------------------------------------------------------------------------------------------------


def load_image_dataset(
    dataset_name: str | os.PathLike | None = None,
    train_data_dir: str | os.PathLike | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
) -> Dataset:
    """
    Load an image data set from the Hub (``dataset_name``) or a local folder (``train_data_dir``, the ``imagefolder``
    layout: images in the folder or in class sub-folders, optional ``metadata.jsonl`` with a ``file_name`` key).

    ``dataset_name`` goes to ``datasets.load_dataset`` as it is: a Hub name such as ``"ylecun/mnist"`` (with
    ``HF_HUB_OFFLINE=1`` it is read from the datasets cache an earlier online run filled: ``cache_dir``, by default
    ``~/.cache/huggingface/datasets``), or a
    local folder holding a data set's files, e.g. its parquet files as ``hf download ... --local-dir`` writes them.

    The named columns are checked up front and renamed to ``image`` / ``text`` / ``label``; other columns are dropped.
    Images of a local folder are all opened once, so an unreadable file fails here, naming the file.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("give exactly one of dataset_name or train_data_dir")
    if dataset_name is not None:
        dataset_name = os.fspath(dataset_name)  # a local folder may be given as a Path
        dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
        source = f"dataset_name={dataset_name!r}"
    else:
        train_data_dir = os.fspath(train_data_dir)
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"train_data_dir {train_data_dir!r} is not a directory")
        try:
            dataset = load_dataset("imagefolder", data_dir=train_data_dir, split="train", cache_dir=cache_dir)
        except Exception as error:  # datasets raises several types for an empty or image-less folder
            if not _has_images(train_data_dir):
                raise ValueError(f"train_data_dir {train_data_dir!r} contains no images") from error
            raise
        source = f"train_data_dir={train_data_dir!r}"
    if len(dataset) == 0:
        raise ValueError(f"the data set {source} is empty")

    check_columns(dataset, image_column=image_column, caption_column=caption_column, label_column=label_column)
    keep = {image_column: "image"}
    if caption_column is not None:
        keep[caption_column] = "text"
    if label_column is not None:
        keep[label_column] = "label"
    dataset = dataset.select_columns(list(keep))
    dataset = dataset.rename_columns({old: new for old, new in keep.items() if old != new})
    if train_data_dir is not None:
        verify_images(dataset)
    return dataset


def check_columns(
    dataset: Dataset, image_column: str = "image", caption_column: str | None = None, label_column: str | None = None
) -> None:
    """Raise ``ValueError`` naming the argument and the existing columns when a requested column is missing."""
    names = dataset.column_names
    for argument, column in (
        ("image_column", image_column),
        ("caption_column", caption_column),
        ("label_column", label_column),
    ):
        if column is not None and column not in names:
            raise ValueError(f"{argument} {column!r} is not a column of the data set; its columns are {names}")


def verify_images(dataset: Dataset, column: str = "image") -> None:
    """Open every image of ``column`` once; raise ``ValueError`` naming the first file that cannot be read."""
    raw = dataset.cast_column(column, ImageFeature(decode=False))
    for i, value in enumerate(raw[column]):
        decode_image(value, where=f"row {i}")


def decode_image(value: dict | Image.Image, where: str = "") -> Image.Image:
    """A PIL image from a PIL image or a ``datasets`` ``{"bytes", "path"}`` dict; unreadable -> ``ValueError``."""
    if isinstance(value, Image.Image):
        return value
    name = value.get("path") or where
    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        image = Image.open(source)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {name}: {error}") from error
    return image


def _has_images(folder: str) -> bool:
    extensions = {e.lower() for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------------
# Transform: PIL -> tensor in [-1, 1]
# ----------------------------------------------------------------------------------------------------------------------


def image_transform(
    resolution: int,
    channels: int = 3,
    center_crop: bool = False,
    random_flip: bool = False,
    pad: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """
    A callable PIL image -> float tensor (channels, resolution, resolution) in [-1, 1].

    :param channels: 1 (grayscale) or 3 (RGB); the image is converted.
    :param center_crop: after resizing the short side to ``resolution``, crop the centre; otherwise a random crop
        (torch's global RNG).
    :param random_flip: flip horizontally with probability 0.5 (torch's global RNG).
    :param pad: pad with black to ``resolution`` instead of resizing (e.g. MNIST 28 -> 32 with 2 px a side);
        an image larger than ``resolution`` is an error.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"

    def transform(image: Image.Image) -> torch.Tensor:
        image = decode_image(image).convert(mode)
        w, h = image.size
        if pad:
            if w > resolution or h > resolution:
                raise ValueError(f"cannot pad a {w}x{h} image to resolution {resolution}: it is larger")
            left, top = (resolution - w) // 2, (resolution - h) // 2
            image = ImageOps.expand(image, (left, top, resolution - w - left, resolution - h - top), fill=0)
        else:
            if min(w, h) != resolution:
                scale = resolution / min(w, h)
                w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
                image = image.resize((w, h), Image.BICUBIC)
            if center_crop:
                left, top = (w - resolution) // 2, (h - resolution) // 2
            else:
                left = int(torch.randint(0, w - resolution + 1, ()).item()) if w > resolution else 0
                top = int(torch.randint(0, h - resolution + 1, ()).item()) if h > resolution else 0
            image = image.crop((left, top, left + resolution, top + resolution))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W) or (H, W, C)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
        if random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.float() / 127.5 - 1.0

    return transform
