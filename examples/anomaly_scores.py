"""Anomaly scoring with an autoencoder's reconstruction error: MNIST digits vs uniform noise vs shapes.

    python examples/anomaly_scores.py --mnist_npz ../shared/data/mnist10k.npz --max_train_steps 400
    python examples/anomaly_scores.py --mnist_npz ../shared/data/mnist10k.npz --ae_path ae-mnist   # reuse a model

Trains (``training/train_autoencoder.py --model ae``) or loads an autoencoder on the first 8000 digits, then scores
held-out digits (the last 2000), uniform noise and grayscale shapes images with
``AutoencoderModel.reconstruction_error`` and prints the mean scores and the AUROC of "anomaly vs held-out digit"
(1.0: every anomaly scores above every digit; 0.5: chance).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from hfgen import AutoencoderModel, VAEModel
from hfgen.data import image_transform, load_mnist_npz, make_shapes_dataset


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney U / (n_neg * n_pos))."""
    scores = np.concatenate([negatives, positives])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_neg, n_pos = len(negatives), len(positives)
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_neg * n_pos))


def load_or_train(args) -> AutoencoderModel:
    if args.ae_path:
        path = args.ae_path
    else:
        from hfgen.training.train_autoencoder import main, parse_args

        argv = ["--model", "ae", "--mnist_npz", args.mnist_npz, "--resolution", "32", "--preset", args.preset]
        argv += ["--block_out_channels", *map(str, args.block_out_channels)]
        argv += ["--max_train_steps", str(args.max_train_steps), "--output_dir", args.output_dir]
        argv += ["--report_to", "none", "--checkpointing_steps", "0", "--sample_steps", "0"]
        main(parse_args(argv))
        path = args.output_dir
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    cls = AutoencoderModel
    config = AutoencoderModel.load_config(path, subfolder=subfolder)
    if config["_class_name"] == "VAEModel":
        cls = VAEModel
    return cls.from_pretrained(path, subfolder=subfolder).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mnist_npz", default="../shared/data/mnist10k.npz")
    p.add_argument("--ae_path", default=None, help="an HFGenVAEPipeline folder or a model folder; default: train one")
    p.add_argument("--output_dir", default="ae-mnist", help="where a newly trained autoencoder goes")
    p.add_argument("--preset", default="ae-small")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 64], help="levels of a new model")
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--num_eval", type=int, default=500, help="images of each kind to score")
    p.add_argument("--kind", default="mse", choices=["mse", "bce"])
    args = p.parse_args()

    ae = load_or_train(args)
    size, channels = ae.config.sample_size, ae.config.in_channels
    digits_t = image_transform(size, channels, pad=True)
    shapes_t = image_transform(size, channels)
    test = load_mnist_npz(args.mnist_npz, split="test").select(range(args.num_eval))
    sets = {
        "held-out digits": torch.stack([digits_t(im) for im in test["image"]]),
        "uniform noise": torch.rand(args.num_eval, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2
        - 1,
        "shapes": torch.stack([shapes_t(im) for im in make_shapes_dataset(args.num_eval, size, seed=1)["image"]]),
    }
    scores = {
        name: torch.cat([ae.reconstruction_error(b, args.kind) for b in x.split(100)]).numpy()
        for name, x in sets.items()
    }
    print(f"reconstruction error ({args.kind}), {args.num_eval} images each")
    for name, s in scores.items():
        print(f"  {name:16s} mean {s.mean():.4f}  std {s.std():.4f}")
    for name in ("uniform noise", "shapes"):
        print(f"AUROC {name} vs held-out digits: {auroc(scores['held-out digits'], scores[name]):.4f}")


if __name__ == "__main__":
    main()
