"""Faults for train_clip.py, train_autoencoder.py and train_gan.py: a real SIGKILL mid-run then
``--resume_from_checkpoint latest`` ends with the weights of an uninterrupted run, and a 2-process (gloo) launch runs.
(train_diffusion.py has the same tests in test_train_diffusion.py.)"""

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import sigkill_when_exists
from safetensors.torch import load_file

from hfgen.training import train_autoencoder, train_clip, train_gan

TRAINING = Path(__file__).resolve().parents[1] / "training"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Script:
    module: object
    args: list[str]  # tiny settings: 32 shapes at 16x16, batch 8 (4 batches per epoch), EMA on
    weight_files: tuple[str, ...]  # safetensors files of the output folder compared across runs

    @property
    def path(self) -> Path:
        return TRAINING / f"{self.module.__name__.rsplit('.', 1)[-1]}.py"

    def weights(self, folder: Path) -> dict:
        return {f"{f}:{k}": v for f in self.weight_files for k, v in load_file(folder / f).items()}


COMMON = ["--num_shapes", "32", "--resolution", "16", "--train_batch_size", "8", "--report_to", "none", "--use_ema"]
SCRIPTS = {
    "clip": Script(
        train_clip,
        [
            *COMMON,
            *"--patch_size 4 --num_heads 2 --max_length 8 --num_eval_images 8 --lr_warmup_steps 2".split(),
            *"--vision_width 32 --text_width 32 --projection_dim 32 --vision_layers 1 --text_layers 1".split(),
            *"--ema_decay 0.9".split(),
        ],
        ("clip/model.safetensors",),
    ),
    "autoencoder": Script(
        train_autoencoder,
        [
            *COMMON,
            *"--model vae --preset ae-tiny --num_scaling_images 16 --lr_warmup_steps 2".split(),
            *"--kl_warmup_steps 4 --sample_steps 2 --num_sample_images 4 --ema_decay 0.9".split(),
        ],
        ("vae/diffusion_pytorch_model.safetensors",),
    ),
    "gan": Script(
        train_gan,
        [
            *COMMON,
            *"--preset dcgan-tiny --class_conditional --r1_every 3 --sample_steps 2".split(),
            *"--num_sample_images 4 --bn_calibration_batches 2 --ema_decay 0.9".split(),
        ],
        ("generator/diffusion_pytorch_model.safetensors", "discriminator/diffusion_pytorch_model.safetensors"),
    ),
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*"))


# ----------------------------------------------------------------------------------------------------------------------
# SIGKILL, then resume from latest
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sigkill_then_resume_latest_matches_uninterrupted(tmp_path, name):
    """A real run killed by SIGKILL once its first checkpoint exists (maybe while it writes the next one or draws the
    sample grid of the same step), resumed in-process with ``latest``, ends with the weights (EMA, BatchNorm stats,
    discriminator) of an uninterrupted in-process run. Tolerance: exact (atol 0), one thread in both processes."""
    script = SCRIPTS[name]
    args = [*script.args, "--max_train_steps", "10", "--checkpointing_steps", "2"]
    killed = tmp_path / "killed"
    command = [sys.executable, str(script.path), *args, "--output_dir", str(killed)]
    assert sigkill_when_exists(command, ENV, killed / "checkpoint-2", timeout=60) == -signal.SIGKILL
    assert "checkpoint-10" not in checkpoints(killed), "the run finished before the kill"

    report = script.module.main(script.module.parse_args([*args, "--output_dir", str(killed),
                                                          "--resume_from_checkpoint", "latest"]))  # fmt: skip
    script.module.main(script.module.parse_args([*args, "--output_dir", str(tmp_path / "straight")]))
    assert report["steps"] == 10
    assert not list(killed.glob(".tmp-checkpoint-*"))
    assert checkpoints(killed) == [f"checkpoint-{s}" for s in (10, 2, 4, 6, 8)]  # sorted as strings
    a, b = script.weights(killed), script.weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------------------------------------------------
# 2 processes on CPU (gloo)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_two_processes_run_and_main_process_writes_once(tmp_path, name):
    """``accelerate launch`` with 2 CPU processes (torchrun via ``--multi_gpu`` + ``ACCELERATE_USE_CPU``, as in
    test_train_diffusion.py): 3 steps of 4 images per process finish; one checkpoint folder holds both processes'
    random states and the main process's EMA; the output folder is complete and the temp folders are gone."""
    script = SCRIPTS[name]
    port = str(29540 + sorted(SCRIPTS).index(name))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
              str(script.path)]  # fmt: skip
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "two"
    argv = [*script.args, "--train_batch_size", "4", "--max_train_steps", "3", "--checkpointing_steps", "3"]
    result = subprocess.run([*launch, *argv, "--output_dir", str(out)], env=env, capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    assert checkpoints(out) == ["checkpoint-3"]
    ckpt = out / "checkpoint-3"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert (ckpt / "ema_state.safetensors").exists()
    assert not list(out.glob(".tmp-checkpoint-*")) and not list(out.glob(".deleting-*"))
    weights = script.weights(out)
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights.values())
    report_file = {"clip": "zero_shot.json"}.get(name, "train_report.json")
    assert json.loads((out / report_file).read_text())["steps"] == 3
