"""Faults for train_clip.py, train_autoencoder.py and train_gan.py: a real SIGKILL mid-run then
``--resume_from_checkpoint latest`` ends with the weights of an uninterrupted run, and a 2-process (gloo) launch runs.
(train_diffusion.py has the same tests in test_train_diffusion.py.)"""

import json
import logging
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
from test_train_diffusion import TINY as DIFFUSION_TINY

from hfgen.training import train_autoencoder, train_clip, train_diffusion, train_gan

TRAINING = Path(__file__).resolve().parents[1] / "training"
PROBE = Path(__file__).resolve().parent / "rank_probe.py"
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

DIFFUSION = Script(
    train_diffusion, [*DIFFUSION_TINY, "--snr_gamma", "5"], ("denoiser/diffusion_pytorch_model.safetensors",)
)
ALL_SCRIPTS = {**SCRIPTS, "diffusion": DIFFUSION}
# flow matching on RIN: logit-normal sigma draws, self-conditioning and label dropout, all keyed by the global batch;
# trained with LAMB (whole-tensor trust ratios, the same on both DDP ranks)
FLOW = Script(
    train_diffusion,
    [
        *DIFFUSION_TINY,
        *"--objective flow_matching --model rin --model_config RIN-tiny --conditioning class".split(),
        *"--self_cond_prob 0.5 --cond_dropout 0.5 --optimizer lamb --adam_weight_decay 0.01".split(),
    ],
    DIFFUSION.weight_files,
)
TWO_PROCESS_RUNS = {**ALL_SCRIPTS, "diffusion-flow": FLOW}


def launch_two_processes(script: Script, argv: list[str], out: Path, port: int, nan_at: str | None = None):
    """``accelerate launch`` with 2 CPU processes through ``tests/rank_probe.py`` (each rank writes its weights at
    every checkpoint; ``nan_at="<rank>:<call>"`` makes that rank's loss NaN once). torchrun (``--multi_gpu``) with
    ``ACCELERATE_USE_CPU=true`` picks MULTI_CPU / gloo; ``--cpu --num_processes 2`` would start one process unless
    mpirun is installed."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), str(PROBE), script.module.__name__.rsplit(".", 1)[-1]]  # fmt: skip
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    if nan_at:
        env["HFGEN_PROBE_NAN"] = nan_at
    result = subprocess.run([*launch, *argv, "--output_dir", str(out)], env=env, capture_output=True, text=True,
                            timeout=180, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_ranks_identical(out: Path, step: int, with_buffers: bool) -> None:
    """Both ranks hold the same parameters after ``step`` updates (and the same buffers when ``with_buffers``: without
    SyncBatchNorm each rank keeps the BatchNorm running statistics of its own batches, as DDP does). Exact: DDP
    applies one all-reduced gradient on both ranks with the same kernels and the same optimizer state."""
    a, b = (load_file(out / f"rank-{r}-step-{step}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and a
    buffers = ("running_mean", "running_var")
    for k, value in a.items():
        if with_buffers or not k.endswith(buffers):
            torch.testing.assert_close(value, b[k], rtol=0, atol=0, msg=k)
            assert torch.isfinite(value).all(), k


@pytest.mark.parametrize("name", sorted(TWO_PROCESS_RUNS))
def test_two_processes_stay_in_step_and_match_one_process_with_double_batch(tmp_path, name):
    """2 processes x batch 4 for 6 steps, which cross an epoch (32 examples: 4 batches per process and epoch):
    both ranks make all 6 updates and hold identical weights; the saved output equals that of
    1 process x batch 8 (draws keyed by the global batch, CLIP's loss over the gathered global batch, the GAN with
    ``--sync_batchnorm``); one checkpoint holds both ranks' random states, the output folder is complete.
    Tolerance rtol 1e-3 / atol 1e-4: the all-reduce and the per-rank partial sums add in another order (float32
    rounding, ~1e-7 of the summands); Adam divides a gradient by sqrt(v) + eps (1e-8 or larger), so a gradient that
    is nothing but rounding (<= ~1e-10) moves a weight by at most lr * 1e-10 / 1e-8 ~ 1e-5 a step, 6 steps < 1e-4.
    The bugs this guards against differ by 1e-3 to 1 (an unsynchronised rank, CLIP's per-shard contrast)."""
    script = TWO_PROCESS_RUNS[name]
    extra = ["--sync_batchnorm"] if name == "gan" else []
    steps = ["--max_train_steps", "6", "--checkpointing_steps", "6", *extra]
    two = tmp_path / "two"
    result = launch_two_processes(script, [*script.args, *steps, "--train_batch_size", "4"], two,
                                  29530 + sorted(TWO_PROCESS_RUNS).index(name))  # fmt: skip
    assert_ranks_identical(two, 6, with_buffers=True)
    assert "saved" in result.stderr and "checkpoint-6" in result.stderr  # the scripts' logger.info lines print

    assert checkpoints(two) == ["checkpoint-6"]
    ckpt = two / "checkpoint-6"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert not list(two.glob(".tmp-checkpoint-*")) and not list(two.glob(".deleting-*"))
    if not name.startswith("diffusion"):
        assert (ckpt / "ema_state.safetensors").exists()
        report_file = {"clip": "zero_shot.json"}.get(name, "train_report.json")
        assert json.loads((two / report_file).read_text())["steps"] == 6

    one = tmp_path / "one"
    script.module.main(script.module.parse_args([*script.args, *steps, "--train_batch_size", "8", "--output_dir",
                                                 str(one)]))  # fmt: skip
    a, b = script.weights(two), script.weights(one)
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("name", sorted(ALL_SCRIPTS))
def test_nonfinite_loss_on_one_rank_skips_the_step_on_both(tmp_path, name):
    """Rank 1 alone sees a NaN loss at its 2nd loss call: neither rank hangs in the all-reduce, both skip that update
    (the count in the checkpoint is 1), and both end with identical, finite weights after 4 steps."""
    script = ALL_SCRIPTS[name]
    out = tmp_path / "nan"
    argv = [*script.args, "--train_batch_size", "4", "--max_train_steps", "4", "--checkpointing_steps", "4"]
    launch_two_processes(script, argv, out, 29550 + sorted(ALL_SCRIPTS).index(name), nan_at="1:2")
    state = json.loads((out / "checkpoint-4" / "hfgen_script_state.json").read_text())
    assert state["nonfinite_steps"] == 1
    assert_ranks_identical(out, 4, with_buffers=False)
    assert all(torch.isfinite(v).all() for v in script.weights(out).values())


# ----------------------------------------------------------------------------------------------------------------------
# A damaged checkpoint
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_SCRIPTS))
def test_latest_skips_a_damaged_checkpoint_and_an_explicit_one_is_named(tmp_path, name, caplog):
    """checkpoint-4's weights truncated after the run (a disk or copy fault): ``latest`` resumes from checkpoint-2
    with a warning naming checkpoint-4, and the run finishes; an explicit ``checkpoint-4`` is a short ValueError
    naming the damaged file and the newest whole checkpoint."""
    script = ALL_SCRIPTS[name]
    args = [*script.args, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(tmp_path)]
    script.module.main(script.module.parse_args(args))
    weights_file = tmp_path / "checkpoint-4" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])

    resume = [*args, "--max_train_steps", "6"]  # the last value of a flag wins
    with pytest.raises(ValueError, match=r"checkpoint-4.* is damaged: .*model.safetensors.*checkpoint-2"):
        script.module.main(
            script.module.parse_args([*resume, "--resume_from_checkpoint", str(tmp_path / "checkpoint-4")])
        )
    with caplog.at_level(logging.WARNING):
        script.module.main(script.module.parse_args([*resume, "--resume_from_checkpoint", "latest"]))
    assert "skipping damaged checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert "checkpoint-6" in checkpoints(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Trackers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_SCRIPTS))
def test_report_to_takes_accelerates_trackers(tmp_path, name, capsys):
    module = ALL_SCRIPTS[name].module
    for tracker in ("tensorboard", "wandb", "comet_ml", "all", "none"):
        assert module.parse_args(["--report_to", tracker, "--output_dir", str(tmp_path)]).report_to == tracker
    with pytest.raises(SystemExit):
        module.parse_args(["--report_to", "tensorbord", "--output_dir", str(tmp_path)])
    assert "--report_to" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(ALL_SCRIPTS))
def test_every_script_takes_num_shapes(tmp_path, name):
    """One flag for the size of the built-in shapes set in all four scripts (train_diffusion.py also keeps its
    older --shapes_num_images)."""
    args = ALL_SCRIPTS[name].module.parse_args(["--num_shapes", "7", "--output_dir", str(tmp_path)])
    assert getattr(args, "shapes_num_images", getattr(args, "num_shapes", None)) == 7


def test_sample_grids_reach_every_active_tracker():
    """TensorBoard gets ``add_image`` (HWC); any other tracker its own ``log_images`` (wandb turns them into
    ``wandb.Image``)."""
    from types import SimpleNamespace

    from PIL import Image

    from hfgen.training_utils import log_image_grid

    calls = []
    tensorboard = SimpleNamespace(
        name="tensorboard", writer=SimpleNamespace(add_image=lambda *a, **k: calls.append(("tb", a, k)))
    )
    wandb = SimpleNamespace(name="wandb", log_images=lambda values, step: calls.append(("wandb", values, step)))
    grid = Image.new("RGB", (8, 4))
    log_image_grid(SimpleNamespace(trackers=[tensorboard, wandb]), "samples", grid, 7)
    assert calls[0][0] == "tb" and calls[0][1][0] == "samples" and calls[0][1][1].shape == (4, 8, 3)
    assert calls[0][1][2] == 7 and calls[0][2] == {"dataformats": "HWC"}
    assert calls[1] == ("wandb", {"samples": [grid]}, 7)


def test_checkpoint_damage_reads_the_manifest_or_opens_older_checkpoints(tmp_path):
    """With a manifest: a missing or resized file is named. Without one (written before manifests): every
    safetensors file is opened, and one that does not open is named."""
    from safetensors.torch import save_file

    from hfgen.training_utils import MANIFEST_FILE, checkpoint_damage, write_manifest

    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    save_file({"w": torch.ones(4)}, folder / "model.safetensors")
    (folder / "random_states_0.pkl").write_bytes(b"x" * 10)
    assert checkpoint_damage(str(folder)) is None  # no manifest, the weights open
    write_manifest(str(folder))
    assert checkpoint_damage(str(folder)) is None
    (folder / "random_states_0.pkl").write_bytes(b"x" * 9)
    assert "random_states_0.pkl has 9 bytes, 10 when saved" in checkpoint_damage(str(folder))
    (folder / "random_states_0.pkl").unlink()
    assert "random_states_0.pkl is missing" in checkpoint_damage(str(folder))
    (folder / MANIFEST_FILE).unlink()
    (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    assert "model.safetensors does not open" in checkpoint_damage(str(folder))
