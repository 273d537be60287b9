import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from datasets.packaged_modules.parquet.parquet import Parquet
from PIL import Image

from hfgen.data import (
    COLOR_RGB,
    COLORS,
    SHAPE_PAIRS,
    SHAPES,
    image_transform,
    load_image_dataset,
    load_mnist_npz,
    make_shapes_dataset,
    shapes_label,
)

# ----------------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------------


def test_shapes_columns_and_reproducible():
    a = make_shapes_dataset(num_images=64, seed=3)
    b = make_shapes_dataset(num_images=64, seed=3)
    c = make_shapes_dataset(num_images=64, seed=4)
    assert a.column_names == ["image", "text", "label"]
    assert a.features["label"].num_classes == len(SHAPE_PAIRS) == len(COLORS) * len(SHAPES)

    def arrays(d):
        return np.stack([np.asarray(im) for im in d["image"]])

    assert np.array_equal(arrays(a), arrays(b)) and a["label"] == b["label"]
    assert not np.array_equal(arrays(a), arrays(c))
    assert a[0]["image"].mode == "RGB" and a[0]["image"].size == (32, 32)


def test_shapes_one_pure_colour_on_black_matching_caption():
    data = make_shapes_dataset(num_images=200, image_size=32, seed=0)
    for row in data:
        pixels = np.asarray(row["image"]).reshape(-1, 3)
        colours = {tuple(p) for p in pixels.tolist()} - {(0, 0, 0)}
        color, shape = SHAPE_PAIRS[row["label"]]
        assert colours == {COLOR_RGB[color]}, row["text"]
        assert row["text"] == f"a {color} {shape}"
        # large enough to see, fully inside (at least one black pixel on the border ring is not required)
        area = (pixels != 0).any(axis=1).sum()
        assert area >= 40, (row["text"], area)
    # every pair shows up in 200 draws
    assert set(data["label"]) == set(range(len(SHAPE_PAIRS)))


def test_shapes_kinds_differ_in_fill_ratio():
    data = make_shapes_dataset(num_images=300, image_size=32, seed=1)
    ratio = {s: [] for s in SHAPES}
    for row in data:
        mask = (np.asarray(row["image"]) != 0).any(axis=-1)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        ratio[SHAPE_PAIRS[row["label"]][1]].append(mask.sum() / box)
    assert np.mean(ratio["square"]) > 0.99
    assert 0.7 < np.mean(ratio["circle"]) < 0.9
    assert 0.4 < np.mean(ratio["triangle"]) < 0.65


def test_shapes_exclude_pairs_and_size():
    data = make_shapes_dataset(
        num_images=300, image_size=16, seed=0, exclude_pairs=[("red", "triangle"), ("blue", "circle")]
    )
    assert shapes_label("red", "triangle") not in data["label"]
    assert shapes_label("blue", "circle") not in data["label"]
    assert "a red triangle" not in data["text"]
    assert data[0]["image"].size == (16, 16)
    with pytest.raises(ValueError, match="color must be one of"):
        make_shapes_dataset(num_images=4, exclude_pairs=[("purple", "circle")])


# ----------------------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------------------


def _write_folder(root, n=3, size=(20, 12), metadata=True):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", size, (40 * i, 0, 0)).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "caption": f"picture {i}", "cls": i % 2})
    if metadata:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_imagefolder_with_metadata(tmp_path):
    root = _write_folder(tmp_path / "data")
    data = load_image_dataset(train_data_dir=root, caption_column="caption", label_column="cls")
    assert sorted(data.column_names) == ["image", "label", "text"]
    assert len(data) == 3
    assert sorted(data["text"]) == ["picture 0", "picture 1", "picture 2"]
    x = image_transform(8, 3, center_crop=True)(data[0]["image"])
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_missing_column_lists_existing(tmp_path):
    root = _write_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"caption_column 'text' .*\['image', 'caption', 'cls'\]"):
        load_image_dataset(train_data_dir=root, caption_column="text")
    with pytest.raises(ValueError, match="image_column 'img'"):
        load_image_dataset(train_data_dir=root, image_column="img")


def test_empty_folder_and_unreadable_image(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        load_image_dataset(train_data_dir=tmp_path / "empty")
    root = _write_folder(tmp_path / "bad", metadata=False)
    (root / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_dataset(train_data_dir=root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_dataset(train_data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset()


# ----------------------------------------------------------------------------------------------------------------------
# MNIST and the transform
# ----------------------------------------------------------------------------------------------------------------------


def test_mnist_splits(mnist_path):
    train = load_mnist_npz(mnist_path, "train")
    test = load_mnist_npz(mnist_path, "test")
    assert len(train) == 8000 and len(test) == 2000
    raw = np.load(mnist_path)
    assert np.array_equal(np.asarray(test[0]["image"]), raw["images"][8000])
    assert test[0]["label"] == raw["labels"][8000]
    assert train[5]["text"] == f"a handwritten digit {raw['labels'][5]}"
    assert train[0]["image"].mode == "L"
    padded = image_transform(32, 1, pad=True)(train[0]["image"])
    assert padded.shape == (1, 32, 32)
    assert (padded[:, :2] == -1).all() and (padded[:, :, -2:] == -1).all()  # 2 px black border
    assert torch.allclose(padded[0, 2:30, 2:30], torch.from_numpy(raw["images"][0]).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="split"):
        load_mnist_npz(mnist_path, "val")


def test_transform_channels_resize_flip():
    x = image_transform(4, 3, center_crop=True)(Image.new("RGB", (16, 8)))
    assert x.shape == (3, 4, 4) and (x == -1).all()
    gray = image_transform(8, 1, center_crop=True)(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert gray.shape == (1, 8, 8) and torch.allclose(gray, torch.ones_like(gray))
    ramp = Image.frombytes("RGB", (8, 8), bytes(range(192)))
    torch.manual_seed(0)
    flip = image_transform(8, 3, random_flip=True)
    corners = {flip(ramp)[0, 0, 0].item() for _ in range(20)}
    assert len(corners) == 2  # both orientations appear
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        image_transform(8, 2)


# ----------------------------------------------------------------------------------------------------------------------
# A Hub data set by name (--dataset_name ylecun/mnist), offline
# ----------------------------------------------------------------------------------------------------------------------


def _mnist_like(images: np.ndarray, labels: np.ndarray) -> Dataset:
    """A ``datasets.Dataset`` with the schema of ``ylecun/mnist``: ``image`` (PIL "L" 28x28), ``label`` ClassLabel."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    rows = {"image": [Image.fromarray(im, mode="L") for im in images], "label": labels.tolist()}
    return Dataset.from_dict(rows, features=features)


def _cache_as_hub_download(parquet: Path, cache_dir: Path, repo_id: str = "ylecun/mnist", config: str = "mnist"):
    """Leave in ``cache_dir`` what ``load_dataset(repo_id, cache_dir=cache_dir)`` leaves after one online run:
    ``<namespace>___<name>/<config>/0.0.0/<commit>/`` with ``<name>-train.arrow`` and ``dataset_info.json``."""
    namespace, name = repo_id.split("/")
    staging = cache_dir / "staging"
    builder = Parquet(
        cache_dir=str(staging),
        dataset_name=name,
        config_name=config,
        hash="0123456789abcdef",
        data_files={"train": str(parquet)},
    )
    builder.download_and_prepare()
    # the staged folder is <name>/<config>-<data-files hash>; a Hub config has no suffix
    staged = Path(builder.cache_dir).parents[1]
    (cache_dir / f"{namespace}___{name}").mkdir()
    shutil.move(staged, cache_dir / f"{namespace}___{name}" / config)
    shutil.rmtree(staging)


def _training_batches(argv: list[str]) -> dict:
    """Every training example as train_diffusion.py feeds them to the model: its flags, its data loading, its
    transform and collate, one batch of the whole (small) set in data-set order."""
    from hfgen.training.train_diffusion import TrainExamples, collate, load_training_data, parse_args

    args = parse_args(["--output_dir", "unused", "--conditioning", "class", "--pad_images", *argv])
    dataset = load_training_data(args)
    assert dataset.features["label"].num_classes == 10  # where the script reads num_classes from
    transform = image_transform(args.resolution, args.channels, center_crop=args.center_crop, pad=args.pad_images)
    loader = torch.utils.data.DataLoader(
        TrainExamples(dataset, transform), batch_size=len(dataset), shuffle=False, collate_fn=collate
    )
    return next(iter(loader))


@pytest.mark.parametrize("where", ["hub_cache", "local_folder"])
def test_hub_dataset_name_offline_gives_what_the_npz_gives(tmp_path, where):
    """``--dataset_name ylecun/mnist`` (columns ``image`` / ``label``) through the scripts' ``dataset_name`` branch,
    with no network: from the HF datasets cache an earlier online run left, and from a local folder of the repo's
    parquet files (what ``hf download ylecun/mnist --repo-type dataset --local-dir DIR`` writes). The training batches
    equal those of the same digits given as ``--mnist_npz``."""
    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: no request may reach the Hub
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, -1, -1] = 0, 255  # the full range shows in [-1, 1]
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    repo = tmp_path / "hub" / "ylecun" / "mnist"  # the repo's layout: mnist/train-00000-of-00001.parquet
    (repo / "mnist").mkdir(parents=True)
    _mnist_like(images, labels).to_parquet(str(parquet := repo / "mnist" / "train-00000-of-00001.parquet"))
    cache = tmp_path / "cache"
    cache.mkdir()
    if where == "hub_cache":
        _cache_as_hub_download(parquet, cache)
        name = "ylecun/mnist"
    else:
        name = str(repo)

    hub = _training_batches(["--dataset_name", name, "--cache_dir", str(cache), "--channels", "1"])
    npz = _training_batches(["--mnist_npz", str(tmp_path / "digits.npz"), "--channels", "1"])
    assert hub["x"].shape == npz["x"].shape == (12, 1, 32, 32)  # 28x28 padded to --resolution 32
    assert hub["x"].min() == -1 and hub["x"].max() == 1
    assert torch.equal(hub["x"], npz["x"])
    assert hub["label"].tolist() == npz["label"].tolist() == labels.tolist()
    expected = torch.from_numpy(images).float() / 127.5 - 1
    assert torch.equal(hub["x"][:, 0, 2:30, 2:30], expected)


def test_hub_dataset_name_offline_not_cached_names_it(tmp_path):
    with pytest.raises(ConnectionError, match="ylecun/mnist"):
        load_image_dataset(dataset_name="ylecun/mnist", cache_dir=str(tmp_path))
    repo = tmp_path / "mnist"
    repo.mkdir()
    _mnist_like(np.zeros((2, 28, 28), np.uint8), np.array([0, 1])).to_parquet(str(repo / "train.parquet"))
    with pytest.raises(ValueError, match=r"label_column 'digit' .*\['image', 'label'\]"):
        load_image_dataset(dataset_name=repo, label_column="digit", cache_dir=str(tmp_path / "cache"))


def test_training_images_are_transformed_once_when_cached():
    """train_diffusion keeps each transformed image after its first epoch when the transform is deterministic; a
    random crop (a Hub set without --center_crop / --pad_images) is never frozen into the cache."""
    from hfgen.training.train_diffusion import TrainExamples, may_cache_images, parse_args

    dataset = make_shapes_dataset(num_images=6, image_size=16, seed=0)
    calls = []
    transform = image_transform(16, 3)

    def counting(image):
        calls.append(1)
        return transform(image)

    cached = TrainExamples(dataset, counting, cache_images=True)
    first = [cached[i]["x"] for i in range(6)]
    second = [cached[i]["x"] for i in reversed(range(6))][::-1]
    assert len(calls) == 6  # the second epoch reads the cache
    for a, b, c in zip(first, second, (TrainExamples(dataset, transform)[i]["x"] for i in range(6))):
        assert torch.equal(a, b) and torch.equal(a, c)
    args = parse_args(["--output_dir", "unused", "--resolution", "16"])
    assert may_cache_images(args, dataset, 3)  # the built-in shapes
    hub = parse_args(["--output_dir", "unused", "--resolution", "16", "--dataset_name", "user/images"])
    assert not may_cache_images(hub, dataset, 3)  # random crops
    hub_centred = parse_args(["--output_dir", "unused", "--dataset_name", "user/images", "--center_crop"])
    assert may_cache_images(hub_centred, dataset, 3)
    workers = parse_args(["--output_dir", "unused", "--dataloader_num_workers", "2"])
    assert not may_cache_images(workers, dataset, 3)  # each worker would keep its own copy


def test_the_class_count_of_a_data_set_is_its_feature_or_the_flag_and_never_too_small():
    from hfgen.training_utils import count_classes

    labelled = Dataset.from_dict({"label": [0, 3, 1]}, features=Features({"label": ClassLabel(num_classes=10)}))
    plain = Dataset.from_dict({"label": [0, 3, 1]})
    assert count_classes(labelled) == 10  # the feature's own count, though the largest label is 3
    assert count_classes(plain) == 4  # largest + 1
    assert count_classes(plain, num_classes=6) == 6
    with pytest.raises(ValueError, match=r"--num_classes \(3\) is too small for the largest label 3"):
        count_classes(plain, num_classes=3)
    with pytest.raises(ValueError, match=r"--class_conditional needs every example labelled; .* label -1"):
        count_classes(Dataset.from_dict({"label": [0, -1]}), needed_by="--class_conditional")
    with pytest.raises(ValueError, match=r"--class_conditional needs a label column; the data set has \['image'\]"):
        count_classes(Dataset.from_dict({"image": [0]}), needed_by="--class_conditional")
