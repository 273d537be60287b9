"""training/train_diffusion.py speed flags: --compile and --channels_last train what eager trains, and save plain
weights."""

import os

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch import nn

import hfgen.training.train_diffusion as script
from hfgen import DiTModel

# 32 shapes at 16x16, 4 per batch, the tiny U-Net; no LR warm-up, so that the first update already moves the weights
TINY = [
    "--model", "unet", "--model_config", "unet-tiny", "--resolution", "16", "--shapes_num_images", "32",
    "--train_batch_size", "4", "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none",
    "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--max_train_steps", "3",
    "--objective", "diffusion",
]  # fmt: skip
# --compile runs the tiny DiT: inductor compiles its graph (forward and backward, one C++ kernel after another) in a
# quarter of the tiny U-Net's time on this CPU, ~1 min instead of ~4 with a cold cache on 2 busy cores
DIT = ["--model", "dit", "--model_config", "DiT-tiny/2"]
# Same weights and draws: eager and compiled (or channels-last) differ only in how the float32 arithmetic is fused
# and ordered (norm, softmax and convolution sums), a few ulp per op: the losses here agree to < 1e-7 relative. A real
# difference is far larger: a 10% higher learning rate already moves the third loss by 4e-3. 1e-4 sits in between.
RTOL = 1e-4
# bfloat16 forwards (8 bits of mantissa): the tiny U-Net's zero-initialised output layer keeps its early predictions
# small, so its losses here move by ~2e-5 relative; training that differs (the 10% higher learning rate above) by 4e-3
BF16_LOSS_RTOL = 1e-3


def train(tmp, monkeypatch, *extra) -> list[float]:
    """The loss of every micro-batch of a TINY run, in order."""
    losses = []
    objective_loss = script.objective_loss

    def recording(*args):
        loss = objective_loss(*args)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(script, "objective_loss", recording)
    script.main(script.parse_args([*TINY, "--output_dir", str(tmp), *extra]))
    return losses


def saved(folder) -> dict:
    return load_file(os.path.join(folder, "denoiser", "diffusion_pytorch_model.safetensors"))


def eager_run(tmp_path_factory, *extra) -> tuple[list[float], dict]:
    """Losses and saved weights of an eager TINY run."""
    tmp = tmp_path_factory.mktemp("eager")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        losses = train(tmp, monkeypatch, *extra)
    torch.set_num_threads(threads)
    return losses, saved(tmp)


@pytest.fixture(scope="module")
def eager_dit(tmp_path_factory):
    return eager_run(tmp_path_factory, *DIT)


@pytest.fixture(scope="module")
def eager_unet(tmp_path_factory):
    return eager_run(tmp_path_factory)


def test_compiled_training_equals_eager(tmp_path, monkeypatch, eager_dit):
    """--compile: the same losses step by step (the first one alone says little: adaLN-Zero makes a fresh DiT predict
    0 whatever the rest computes), the forward really ran compiled graphs, and the pipeline folder and the checkpoint
    hold the plain module's weights under their own names."""
    eager_losses, eager_weights = eager_dit
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        losses = train(tmp_path, monkeypatch, *DIT, "--compile", "--checkpointing_steps", "3")
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the training forward was compiled
    finally:
        torch._dynamo.reset()
    assert len(losses) == len(eager_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=RTOL, atol=0)

    weights = saved(tmp_path)
    assert not [k for k in weights if "_orig_mod" in k]
    assert weights.keys() == eager_weights.keys()
    # the trained weights, not the initial ones: close to eager's (Adam's first steps are +-lr wherever a gradient is
    # not zero, and the attention key bias, which softmax ignores, has a gradient of rounding noise only)
    for k, value in weights.items():
        torch.testing.assert_close(value, eager_weights[k], rtol=0, atol=5e-3, msg=k)
    model = DiTModel.from_pretrained(tmp_path, subfolder="denoiser")  # strict: a plain model takes them
    assert type(model) is DiTModel
    checkpoint = load_file(os.path.join(tmp_path, "checkpoint-3", "model.safetensors"))
    assert checkpoint.keys() == eager_weights.keys()  # resumable with or without --compile


def test_channels_last_training_equals_eager(tmp_path, monkeypatch, eager_unet):
    """--channels_last (U-Net): the same losses (oneDNN's channels-last convolutions sum in another order) and
    ordinary contiguous weights in the folder."""
    eager_losses, eager_weights = eager_unet
    losses = train(tmp_path, monkeypatch, "--channels_last")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=RTOL, atol=0)
    weights = saved(tmp_path)
    assert weights.keys() == eager_weights.keys() and all(w.is_contiguous() for w in weights.values())


def test_bf16_mixed_precision_trains_in_bf16_and_saves_float32(tmp_path, monkeypatch, eager_unet):
    """--mixed_precision bf16 on a CPU: the convolutions and matmuls of the forward run in bfloat16 (Accelerate's
    autocast around the prepared model), the losses follow eager's to bfloat16 accuracy, and the saved weights are
    the float32 master weights."""
    eager_losses, eager_weights = eager_unet
    dtypes = set()

    def record(module, args, output):
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.training:
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    AcceleratorState._reset_state(reset_partial_state=True)  # one state per process: this run's mixed precision
    try:
        losses = train(tmp_path, monkeypatch, "--mixed_precision", "bf16")
    finally:
        handle.remove()
        AcceleratorState._reset_state(reset_partial_state=True)  # and the next test's from a fresh one
    assert dtypes == {torch.bfloat16}
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=BF16_LOSS_RTOL, atol=0)
    weights = saved(tmp_path)
    assert weights.keys() == eager_weights.keys() and {w.dtype for w in weights.values()} == {torch.float32}


def test_compile_model_does_not_compile_twice():
    """A model that Accelerate's dynamo config (``accelerate launch --dynamo_backend inductor``) compiled in
    ``prepare`` is left as it is; a plain one is wrapped. torch.compile is lazy: nothing is compiled here."""
    accelerator = Accelerator()
    plain = nn.Linear(2, 2)
    compiled = script.compile_model(accelerator, plain, None)
    assert compiled is not plain and compiled._orig_mod is plain
    assert script.compile_model(accelerator, compiled, "max-autotune") is compiled
    assert accelerator.unwrap_model(compiled, keep_torch_compile=False) is plain  # what the script saves and samples


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--compile_mode", "max-autotune"], "--compile_mode max-autotune needs --compile"),
        (["--model", "dit", "--channels_last"], "--channels_last applies to the convolutional U-Net"),
        (["--model", "rin", "--channels_last"], "got --model rin"),
    ],
)
def test_speed_flag_errors(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        script.parse_args(["--output_dir", str(tmp_path), *argv])


def test_allow_tf32_sets_the_cuda_flags(tmp_path, monkeypatch):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        train(tmp_path, monkeypatch, "--allow_tf32", "--max_train_steps", "1")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
