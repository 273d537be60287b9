"""
Score trained VAE, GAN and latent-diffusion pipelines on MNIST with the benchmarks' digit classifier.

    python benchmarks/eval_ae_gan.py vae  OUTPUT_DIR_OF_train_autoencoder
    python benchmarks/eval_ae_gan.py gan  OUTPUT_DIR_OF_train_gan
    python benchmarks/eval_ae_gan.py ldit OUTPUT_DIR_OF_train_diffusion_WITH_--vae

- vae / gan: ``--num_images`` prior samples against as many held-out digits: FID and KID in the classifier's feature
  space, and the class histogram (normalised entropy 1 = every digit equally often; a collapsed model scores low).
  For a VAE also the share of its reconstructions of held-out digits that the classifier still reads correctly.
- ldit: ``--per_class`` samples of each digit at every ``--guidance_scales``; the share read as the asked digit.
  Also the VAE reconstruction ceiling: a perfect latent model cannot beat what its decoder can draw.

Writes ``eval_<kind>.json`` and grids (``eval_<kind>*.png``) into the pipeline folder and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_class_conditional import NUM_CLASSES, grid_image, score  # noqa: E402
from common import CLASSIFIER, MNIST  # noqa: E402

from hfgen.cards import image_grid  # noqa: E402
from hfgen.metrics import DigitClassifier, class_balance, fid_kid, load_digits  # noqa: E402
from hfgen.pipelines import HFGenGANPipeline, HFGenPipeline, HFGenVAEPipeline  # noqa: E402

PIPELINES = {"vae": HFGenVAEPipeline, "gan": HFGenGANPipeline, "ldit": HFGenPipeline}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(PIPELINES))
    p.add_argument("pipeline", type=Path, help="a folder saved by the training script (or a pipeline folder)")
    p.add_argument("--mnist", type=Path, default=MNIST)
    p.add_argument("--classifier", type=Path, default=CLASSIFIER)
    p.add_argument("--num_images", type=int, default=1000, help="vae / gan: samples (and held-out digits) for FID")
    p.add_argument("--per_class", type=int, default=20, help="ldit: samples per digit")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def sample_unconditional(pipe, n: int, seed: int) -> torch.Tensor:
    """n samples (N, 1, 32, 32) in [-1, 1] from a VAE or GAN pipeline, in batches of 500."""
    g = torch.Generator().manual_seed(seed)
    batches = [pipe(batch_size=min(500, n - i), generator=g, output_type="pt").images for i in range(0, n, 500)]
    return torch.cat(batches) * 2 - 1


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if not (args.classifier / "config.json").exists():
        raise FileNotFoundError(
            f"--classifier {args.classifier} holds no digit classifier; train it with "
            "benchmarks/train_digit_classifier.py"
        )
    classifier = DigitClassifier.from_pretrained(args.classifier).eval()
    folder = args.pipeline / "pipeline" if (args.pipeline / "pipeline" / "model_index.json").exists() else args.pipeline
    pipe = PIPELINES[args.kind].from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    real, real_labels = load_digits(args.mnist, "test")  # (2000, 1, 32, 32) in [-1, 1]
    report: dict = {"kind": args.kind, "pipeline": str(folder)}

    if args.kind in ("vae", "gan"):
        start = time.perf_counter()
        fake = sample_unconditional(pipe, args.num_images, args.seed)
        report["sampling_seconds"] = round(time.perf_counter() - start, 1)
        report.update({k: round(v, 4) for k, v in fid_kid(real[: args.num_images], fake, classifier).items()})
        balance = class_balance(fake, classifier)
        report["class_entropy"] = round(balance.normalized_entropy, 3)
        report["max_class_share"] = round(balance.max_class_share, 3)
        report["class_counts"] = balance.counts
        image_grid([im for im in pipe(batch_size=64, generator=torch.Generator().manual_seed(args.seed)).images]).save(
            folder / f"eval_{args.kind}.png"
        )
    else:
        labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
        report["accuracy"] = {}
        for s in args.guidance_scales:
            start = time.perf_counter()
            images = pipe(batch_size=len(labels), class_labels=labels, guidance_scale=s, output_type="pt",
                          num_inference_steps=args.num_inference_steps,
                          generator=torch.Generator().manual_seed(args.seed)).images  # fmt: skip
            report["accuracy"][f"{s:g}"] = round(score(classifier, images, labels)[0], 3)
            report[f"sampling_seconds_g{s:g}"] = round(time.perf_counter() - start, 1)
            grid_image(images, args.per_class).save(folder / f"eval_ldit_g{s:g}.png")

    if getattr(pipe, "vae", None) is not None:  # how much of a digit survives the autoencoder
        vae_pipe = HFGenVAEPipeline(pipe.vae)
        recon = vae_pipe.reconstruct(real[:500], output_type="pt").images
        report["vae_reconstruction_accuracy"] = round(score(classifier, recon, real_labels[:500])[0], 3)
    report["real_accuracy"] = round(score(classifier, (real[:500] + 1) / 2, real_labels[:500])[0], 3)
    (folder / f"eval_{args.kind}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(parse_args())
