"""Run one training script under ``accelerate launch`` with two test-only hooks, for the many-process tests.

    accelerate launch ... tests/rank_probe.py <train_diffusion|train_clip|train_autoencoder|train_gan> <script args>

- Every rank writes its own copy of the weights at each checkpoint: ``<output_dir>/rank-<i>-step-<n>.safetensors``
  holds the parameters (and buffers) of every prepared model as that rank holds them, so a test can compare ranks.
- ``HFGEN_PROBE_NAN=<rank>:<call>`` makes the script's loss function return NaN on that rank at that call (counted
  from 1), so that one rank alone sees a non-finite loss.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from safetensors.torch import save_file

from hfgen import training_utils

# the function whose output becomes NaN on one rank: the loss of each script
LOSS_FUNCTION = {
    "train_diffusion": "objective_loss",
    "train_clip": "contrastive_loss",
    "train_autoencoder": "reconstruction_loss",
    "train_gan": "discriminator_loss",
}


def rank_weights(accelerator) -> dict[str, torch.Tensor]:
    """Parameters and buffers of every prepared model, as this rank holds them."""
    out = {}
    for i, model in enumerate(accelerator._models):
        state = accelerator.unwrap_model(model).state_dict()
        out.update(
            {f"{i}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items() if v.is_floating_point()}
        )
    return out


def main() -> None:
    name, argv = sys.argv[1], sys.argv[2:]
    script = importlib.import_module(f"hfgen.training.{name}")

    save_checkpoint = training_utils.save_checkpoint  # what every script's checkpoint_if_due calls

    def save_checkpoint_and_rank_weights(accelerator, output_dir, step, *args, **kwargs):
        path = os.path.join(output_dir, f"rank-{accelerator.process_index}-step-{step}.safetensors")
        save_file(rank_weights(accelerator), path)
        return save_checkpoint(accelerator, output_dir, step, *args, **kwargs)

    training_utils.save_checkpoint = save_checkpoint_and_rank_weights

    if os.environ.get("HFGEN_PROBE_NAN"):
        from accelerate import PartialState

        rank, call = (int(v) for v in os.environ["HFGEN_PROBE_NAN"].split(":"))
        loss_function, calls = getattr(script, LOSS_FUNCTION[name]), [0]

        def loss_with_nan(*args, **kwargs):
            out = loss_function(*args, **kwargs)
            if PartialState().process_index == rank:
                calls[0] += 1
                if calls[0] == call:
                    return out * float("nan")
            return out

        setattr(script, LOSS_FUNCTION[name], loss_with_nan)

    script.main(script.parse_args(argv))


if __name__ == "__main__":
    main()
