"""
adaLN-Zero at work in a trained DiT: the size of the shift beta, the scale gamma and the gate alpha that every block
takes from the conditioning, across timesteps, against a freshly initialised model of the same config.

    python examples/dit_modulation.py --pipeline hfgen-output/compare_denoisers/dit/pipeline    # a saved DiT pipeline
    python examples/dit_modulation.py        # first trains a small class-conditional DiT on the built-in shapes
    python examples/dit_modulation.py --quick                                                   # seconds, for tests

Each ``DiTBlock`` maps the conditioning vector c = time embedding + label embedding through its
``adaLN_modulation`` (SiLU, then one Linear to 6 D) to (beta, gamma, alpha) for the attention branch and for the MLP
branch: x + alpha * branch(LayerNorm(x) * (1 + gamma) + beta). That Linear starts at zero, so in a fresh model all
six are exactly 0 and every block is the identity; training grows them. The numbers are read from the model itself:
forward hooks on every block's ``adaLN_modulation`` record its output during ``model(sample, t, class_labels)``, for
``--num_timesteps`` timesteps across [0, 1000) and a few labels. c depends on t and the label only, so the sample
is a blank single patch (one token). For each (block, branch, kind, t, label) the size is the RMS (or, with
``--stat mean_abs``, the mean |.|) over the D channels.

Writes ``dit_modulation.png`` (rows beta, gamma, alpha; columns attention branch, MLP branch, the fresh model;
x = timestep; one line per block coloured by depth, the mean over the labels, the band their min..max) and
``dit_modulation.json``, and prints a table per block.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hfgen import DiTModel  # noqa: E402
from hfgen.training import train_diffusion  # noqa: E402

# the order in which DiTBlock.forward chunks the output of its adaLN_modulation
KINDS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
ROWS = (("shift", "beta (shift)"), ("scale", "gamma (scale)"), ("gate", "alpha (gate)"))
BRANCHES = (("msa", "attention branch"), ("mlp", "MLP branch"))

# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def train_small_dit(output_dir: Path, args: argparse.Namespace) -> Path:
    """A class-conditional DiT on the built-in shapes (18 colour-shape labels) with train_diffusion; its folder."""
    flags = [
        "--model", "dit", "--model_config", "DiT-tiny/2" if args.quick else "DiT-mini/4",
        "--conditioning", "class", "--output_dir", str(output_dir), "--seed", str(args.seed),
        "--max_train_steps", str(args.train_steps), "--learning_rate", "1e-3", "--adam_beta2", "0.99",
        "--lr_warmup_steps", "0" if args.quick else "50", "--use_ema", "--ema_max_decay", "0.999",
        "--report_to", "none", "--checkpointing_steps", "1000000",
        "--num_validation_images", "1", "--num_inference_steps", "1",
    ]  # fmt: skip
    if args.quick:
        flags += ["--resolution", "16", "--shapes_num_images", "64", "--train_batch_size", "8"]
    else:
        flags += ["--train_batch_size", "32"]
    train_diffusion.main(train_diffusion.parse_args(flags))
    return output_dir


def load_dit(pipeline: Path) -> DiTModel:
    """The denoiser of a saved pipeline folder; ``ValueError`` if it is not a DiTModel."""
    index = pipeline / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--pipeline {pipeline} has no model_index.json (not a saved pipeline folder)")
    denoiser = json.loads(index.read_text()).get("denoiser", [None, None])[1]
    if denoiser != "DiTModel":
        raise ValueError(f"--pipeline {pipeline} holds a {denoiser}; this example needs a DiTModel denoiser")
    return DiTModel.from_pretrained(pipeline, subfolder="denoiser").eval()


@torch.no_grad()
def block_modulations(model: DiTModel, timesteps: torch.Tensor, labels: list[int | None]) -> torch.Tensor:
    """
    Every block's adaLN output, recorded by forward hooks during a forward pass of ``model`` itself.

    :param timesteps: (T,) timesteps.
    :param labels: K class labels (None: no label, for an unconditional model).
    :return: (depth, 6, T, K, D), the second axis in ``KINDS`` order.
    """
    T, K = len(timesteps), len(labels)
    t = timesteps.repeat_interleave(K)  # (T * K,): t-major, each t with every label
    y = None if labels[0] is None else torch.tensor(labels).repeat(T)  # (T * K,)
    recorded: dict[int, torch.Tensor] = {}

    def hook(index: int):
        return lambda module, inputs, output: recorded.__setitem__(index, output)

    handles = [block.adaLN_modulation.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    try:
        p = model.config.patch_size
        blank = torch.zeros(T * K, model.config.in_channels, p, p, device=model.device, dtype=model.dtype)
        model(blank, t.to(model.device), class_labels=None if y is None else y.to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    out = torch.stack([recorded[i] for i in range(len(model.blocks))]).float().cpu()  # (depth, T * K, 6 D)
    return out.view(len(model.blocks), T, K, len(KINDS), -1).permute(0, 3, 1, 2, 4)  # (depth, 6, T, K, D)


def size(modulations: torch.Tensor, stat: str) -> torch.Tensor:
    """(..., D) -> (...): RMS or mean |.| over the channels."""
    return modulations.pow(2).mean(-1).sqrt() if stat == "rms" else modulations.abs().mean(-1)


def draw_figure(trained: torch.Tensor, init: torch.Tensor, timesteps: torch.Tensor, title: str, stat: str, path: Path):
    """trained, init: (depth, 6, T, K) sizes -> rows beta, gamma, alpha; columns attention, MLP, the fresh model."""
    depth = trained.shape[0]
    cmap = plt.get_cmap("viridis", depth)  # one colour per block
    colour = [cmap(i) for i in range(depth)]
    x = timesteps.numpy()
    fig, axes = plt.subplots(3, 3, figsize=(12, 8.5), sharex=True, sharey="row", layout="constrained")
    for r, (kind, row_label) in enumerate(ROWS):
        for c, (branch, branch_label) in enumerate(BRANCHES):
            ax = axes[r][c]
            k = KINDS.index(f"{kind}_{branch}")
            for i in range(depth):
                curves = trained[i, k]  # (T, K)
                ax.plot(x, curves.mean(-1).numpy(), color=colour[i], lw=1.5)
                ax.fill_between(x, curves.amin(-1).numpy(), curves.amax(-1).numpy(), color=colour[i], alpha=0.15)
            if r == 0:
                ax.set_title(f"trained: {branch_label}")
        ax = axes[r][2]
        for i in range(depth):
            for branch, style in (("msa", "-"), ("mlp", "--")):
                ax.plot(x, init[i, KINDS.index(f"{kind}_{branch}")].amax(-1).numpy(), style, color=colour[i], lw=1.5)
        ax.text(0.5, 0.5, "exactly 0" if init.abs().max() == 0 else "not 0", transform=ax.transAxes, ha="center")
        if r == 0:
            ax.set_title("at init (solid attention, dashed MLP)")
        axes[r][0].set_ylabel(f"{row_label}, {stat} over channels")
    for ax in axes[-1]:
        ax.set_xlabel("timestep t")
    scale = plt.cm.ScalarMappable(norm=plt.Normalize(-0.5, depth - 0.5), cmap=cmap)
    fig.colorbar(scale, ax=axes, label="block (0 = first)", ticks=range(depth), shrink=0.6)
    fig.suptitle(title)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", type=Path, default=None, help="saved DiT pipeline folder (default: train one)")
    p.add_argument("--output_dir", type=Path, default=Path("hfgen-output/dit_modulation"))
    p.add_argument("--train_steps", type=int, default=800, help="steps of the DiT trained without --pipeline")
    p.add_argument("--num_timesteps", type=int, default=50, help="timesteps, evenly spaced over [0, 999]")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="labels (default: 4 spread over all)")
    p.add_argument("--stat", choices=("rms", "mean_abs"), default="rms", help="the size over the D channels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny DiT trained 6 steps, 8 timesteps")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.num_timesteps = 6, 8
    for name in ("train_steps", "num_timesteps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(args: argparse.Namespace) -> dict:
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. the trained DiT (loaded, or trained here) and a fresh one of the same config
    pipeline = args.pipeline or train_small_dit(out / "pipeline", args)
    train_seconds = None if args.pipeline else round(time.perf_counter() - start, 1)
    model = load_dit(pipeline)
    fresh = DiTModel.from_config(model.config).eval()

    # 2. the conditionings: timesteps across [0, 1000), a few labels
    num_classes = model.config.num_classes
    if num_classes is None:
        if args.classes:
            raise ValueError(f"--classes given, but the DiT in {pipeline} is unconditional")
        labels = [None]
    else:
        labels = args.classes or torch.linspace(0, num_classes - 1, min(4, num_classes)).round().long().tolist()
        bad = [c for c in labels if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes must lie in [0, {num_classes - 1}] for this DiT, got {bad}")
    timesteps = torch.linspace(0, 999, args.num_timesteps).round()  # (T,)

    # 3. beta, gamma, alpha of every block, trained and at init
    trained = size(block_modulations(model, timesteps, labels), args.stat)  # (depth, 6, T, K)
    init_modulations = block_modulations(fresh, timesteps, labels)
    init_max_abs = init_modulations.abs().max().item()
    if init_max_abs != 0.0:
        raise RuntimeError(f"a fresh DiT's adaLN modulation should be exactly 0 (adaLN-Zero), got max {init_max_abs}")
    init = size(init_modulations, args.stat)

    # 4. the figure, the table and the report
    figure = out / "dit_modulation.png"
    cfg = model.config
    title = (
        f"adaLN-Zero modulation of each block: DiT depth {cfg.depth}, width {cfg.hidden_size}, patch {cfg.patch_size}"
        f" ({pipeline}); labels {labels}"
    )
    draw_figure(trained, init, timesteps, title, args.stat, figure)
    means = trained.mean(dim=(2, 3))  # (depth, 6): over timesteps and labels
    gates = [KINDS.index("gate_msa"), KINDS.index("gate_mlp")]
    print(f"\n{args.stat} over channels, mean over {len(timesteps)} timesteps x {len(labels)} labels (trained):")
    print("block " + "".join(f"{k:>11}" for k in KINDS))
    for i, row in enumerate(means.tolist()):
        print(f"{i:5d} " + "".join(f"{v:11.4f}" for v in row))
    print(f"at init: max |beta|, |gamma|, |alpha| over every block, timestep and label = {init_max_abs:g} (exactly 0)")
    report = {
        "pipeline": str(pipeline),
        "train_seconds": train_seconds,
        "config": {k: cfg[k] for k in ("depth", "hidden_size", "num_heads", "patch_size", "num_classes")},
        "stat": args.stat,
        "timesteps": timesteps.tolist(),
        "labels": labels,
        "kinds": list(KINDS),
        "trained_mean": means.tolist(),  # [block][kind]
        "trained_curves": trained.mean(-1).tolist(),  # [block][kind][timestep], mean over labels
        "trained_min_gate": means[:, gates].min().item(),
        "init_max_abs": init_max_abs,
        "figure": str(figure),
    }
    (out / "dit_modulation.json").write_text(json.dumps(report))
    print(f"figure: {figure}\nreport: {out / 'dit_modulation.json'}  ({time.perf_counter() - start:.1f} s)")
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(parse_args())
