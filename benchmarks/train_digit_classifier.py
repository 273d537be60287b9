"""
Train the digit classifier whose penultimate features are the FID/KID feature space of the digit benchmarks.

    .venv/bin/python benchmarks/train_digit_classifier.py            # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/train_digit_classifier.py --quick    # a few seconds, to a throwaway folder

Trains on the first 8000 digits of mnist10k.npz, reports top-1 accuracy on the last 2000 and saves the model
(safetensors + config) to ``--output_dir`` (default benchmarks/artifacts/digit_classifier, gitignored), with the
accuracy in ``accuracy.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hfgen.metrics import DigitClassifier, classifier_accuracy, fit_digit_classifier, load_digits

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = ROOT.parent / "shared" / "data" / "mnist10k.npz"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "artifacts" / "digit_classifier"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="path to mnist10k.npz")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--num_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is far faster than 2 on a shared, oversubscribed machine)",
    )
    parser.add_argument("--quick", action="store_true", help="30 steps (smoke test); do not use its features")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    num_steps = 30 if args.quick else args.num_steps
    train_x, train_y = load_digits(args.mnist, "train")  # (8000, 1, 32, 32) in [-1, 1]
    test_x, test_y = load_digits(args.mnist, "test")  # (2000, 1, 32, 32)
    model = DigitClassifier()
    start = time.perf_counter()
    fit_digit_classifier(model, train_x, train_y, num_steps, args.batch_size, args.learning_rate, args.seed)
    seconds = time.perf_counter() - start
    result = {
        "held_out_accuracy": classifier_accuracy(model, test_x, test_y),
        "train_accuracy": classifier_accuracy(model, train_x, train_y),
        "num_steps": num_steps,
        "batch_size": args.batch_size,
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)  # safetensors
    (args.output_dir / "accuracy.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
