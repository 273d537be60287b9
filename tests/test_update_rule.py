"""The update rule all four training scripts share (``guarded_update``), where a resumed run picks the data up
(``resumed_epochs``), the loop around them (``UpdateLoop``), when they checkpoint and what they hand to trackers and
model cards, on a one-process Accelerator and a stand-in for an fp16 one."""

import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from hfgen.training_utils import (
    NonFiniteGuard,
    TrainingLength,
    UpdateLoop,
    checkpoint_if_due,
    guarded_update,
    hub_training_info,
    per_process_batches,
    resumed_epochs,
    start_trackers,
)


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def model_and_optimizer(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return (*accelerator.prepare(model, optimizer, scheduler),)


def loss_of(model, scale: float = 1.0) -> torch.Tensor:
    return model(torch.ones(4, 3)).pow(2).mean() * scale


def test_a_finite_loss_steps_and_a_nan_loss_leaves_the_weights(accelerator):
    model, optimizer, scheduler = model_and_optimizer(accelerator)
    guard = NonFiniteGuard(accelerator, max_skips=5)
    before = model.weight.detach().clone()
    guarded_update(accelerator, guard, loss_of(model), optimizer, model.parameters(), 1.0, scheduler)
    assert not guard.end_update(1)
    stepped = model.weight.detach().clone()
    assert not torch.allclose(stepped, before)
    assert model.weight.grad is None  # zeroed for the next update

    guarded_update(accelerator, guard, loss_of(model, float("nan")), optimizer, model.parameters(), 1.0, scheduler)
    assert guard.end_update(2)  # skipped, counted
    assert guard.skipped == 1
    torch.testing.assert_close(model.weight.detach(), stepped, rtol=0, atol=0)  # not touched by the NaN gradient
    assert model.weight.grad is None  # the NaN gradient does not leak into the next update
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 / 3)  # the schedule moves on: two updates ended


def test_the_ema_follows_finite_updates_only(accelerator):
    from diffusers.training_utils import EMAModel

    model, optimizer, scheduler = model_and_optimizer(accelerator)
    ema = EMAModel(model.parameters(), decay=0.5, use_ema_warmup=False)
    guard = NonFiniteGuard(accelerator, max_skips=5)
    start = model.weight.detach().clone()
    guarded_update(accelerator, guard, loss_of(model), optimizer, model.parameters(), 1.0, scheduler)
    assert not guard.end_update(1, ema, model)
    assert ema.optimization_step == 1
    averaged = ema.shadow_params[0].clone()
    assert not torch.allclose(averaged, start)  # moved towards the stepped weights

    guarded_update(accelerator, guard, loss_of(model, float("nan")), optimizer, model.parameters(), 1.0, scheduler)
    assert guard.end_update(2, ema, model)
    assert ema.optimization_step == 1  # the skipped update did not count
    torch.testing.assert_close(ema.shadow_params[0], averaged, rtol=0, atol=0)
    assert not guard.end_update(3, None, model)  # no EMA: nothing to step
    with pytest.raises(ValueError, match="`model`"):
        guard.end_update(4, ema)


def test_an_infinite_gradient_norm_skips_the_step(accelerator):
    model, optimizer, _ = model_and_optimizer(accelerator)
    guard = NonFiniteGuard(accelerator, max_skips=5)
    before = model.weight.detach().clone()
    zero = model.weight - model.weight.detach()  # 0, with gradient 1
    loss = loss_of(model) + zero.abs().sqrt().sum()  # a finite loss whose gradient is not (d sqrt(x)/dx at 0)
    assert torch.isfinite(loss)
    guarded_update(accelerator, guard, loss, optimizer, model.parameters(), max_grad_norm=1.0)
    assert guard.end_update(1)
    torch.testing.assert_close(model.weight.detach(), before, rtol=0, atol=0)


class ScalerAccelerator:
    """Stands in for an fp16 Accelerator: a real grad scaler (on the CPU), one process."""

    sync_gradients = True
    device = torch.device("cpu")

    def __init__(self, optimizer):
        self.scaler, self.optimizer = torch.amp.GradScaler("cpu", init_scale=1024.0), optimizer

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def gather(self, x):
        return x

    def clip_grad_norm_(self, parameters, max_norm):
        self.scaler.unscale_(self.optimizer)  # as Accelerate does; a second unscale_ before update() raises
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class CountingOptimizer(torch.optim.SGD):
    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        return super().step(closure)


def test_with_a_grad_scaler_a_flagged_update_backs_the_scale_off_and_moves_nothing(accelerator):
    """fp16: the optimizer must not move on a flagged update (in the GAN a NaN discriminator loss flags the
    generator's finite update too), and the scale must still come down as the scaler's own step would lower it,
    or every later update would overflow as well. (The real Accelerator fixture is there for the guard's logging.)"""
    model = torch.nn.Linear(3, 2)
    optimizer = CountingOptimizer(model.parameters(), lr=0.1)
    fp16 = ScalerAccelerator(optimizer)
    guard = NonFiniteGuard(fp16, max_skips=5)
    before = model.weight.detach().clone()
    guarded_update(fp16, guard, loss_of(model, float("nan")), optimizer, model.parameters(), 1.0)
    assert optimizer.calls == 0 and guard.end_update(1)
    torch.testing.assert_close(model.weight.detach(), before, rtol=0, atol=0)
    assert fp16.scaler.get_scale() == 512.0  # backed off once
    guarded_update(fp16, guard, loss_of(model), optimizer, model.parameters(), 1.0)  # the next update is normal
    assert optimizer.calls == 1 and not guard.end_update(2)  # (unscale_ again: the backoff cleared its state)


@pytest.mark.parametrize("num_processes", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("num_examples", [9, 10, 12])
def test_per_process_batches_is_the_length_of_the_sharded_loader(num_processes, drop_last, num_examples):
    """Counted before ``accelerator.prepare``; the same number as Accelerate's shard of the loader has."""
    from accelerate.data_loader import prepare_data_loader

    loader = torch.utils.data.DataLoader(list(range(num_examples)), batch_size=2, shuffle=True, drop_last=drop_last)
    sharded = [
        len(prepare_data_loader(loader, num_processes=num_processes, process_index=r)) for r in range(num_processes)
    ]
    stub = types.SimpleNamespace(num_processes=num_processes, split_batches=False)
    assert sharded == [per_process_batches(stub, loader)] * num_processes


class Loader:
    """A loader stand-in that records ``set_epoch``."""

    def __init__(self):
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


class Skipper:
    def skip_first_batches(self, loader, n):
        return ("skipped", n)


@pytest.mark.parametrize(
    "step, accumulation, first",
    [(0, 1, (0, 0)), (7, 1, (1, 2)), (7, 2, (1, 4)), (10, 1, (2, 0))],
)
def test_resumed_epochs_start_where_the_checkpoint_stopped(step, accumulation, first):
    """5 updates per epoch, 3 epochs: step 7 is 2 updates into epoch 1, i.e. 2 x accumulation batches."""
    loader = Loader()
    got = list(resumed_epochs(Skipper(), loader, step, TrainingLength(5, 15), accumulation))
    epoch, skip, epoch_loader = got[0]
    assert (epoch, skip) == first
    assert epoch_loader == (("skipped", skip) if skip else loader)
    assert [e for e, _, _ in got] == loader.epochs == list(range(first[0], 3))
    assert all(s == 0 and lo is loader for _, s, lo in got[1:])  # later epochs are whole


def test_a_data_set_smaller_than_the_global_batch_is_refused_by_name():
    loader = torch.utils.data.DataLoader(list(range(6)), batch_size=4, drop_last=True)  # 1 batch: none for rank 2
    stub = types.SimpleNamespace(num_processes=2, split_batches=False)
    args = types.SimpleNamespace(train_batch_size=4, gradient_accumulation_steps=1, max_train_steps=None, num_epochs=1)
    with pytest.raises(ValueError, match=r"6 examples, fewer than one global batch \(--train_batch_size 4 x 2"):
        TrainingLength.of(stub, loader, args)


def run_loop(accumulation: int, start: int, max_steps: int) -> tuple[list, int, int]:
    """An ``UpdateLoop`` over 10 one-example batches (10 / accumulation updates per epoch), each batch through
    ``accelerator.accumulate`` as the scripts do; returns the (epoch, index, value) drawn, the final step and the
    number of updates counted."""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = accelerator.prepare(torch.nn.Linear(1, 1))
    loader = torch.utils.data.DataLoader(torch.arange(10.0), batch_size=1, shuffle=False)
    length = TrainingLength(-(-10 // accumulation), max_steps)  # a short last update where 10 % accumulation > 0
    loop = UpdateLoop(accelerator, accelerator.prepare(loader), length, start, accumulation)
    drawn, updates = [], 0
    for epoch, index, batch in loop:
        with accelerator.accumulate(model):
            drawn.append((epoch, index, int(batch.item())))
        updates += loop.updated()
    AcceleratorState._reset_state(reset_partial_state=True)
    return drawn, loop.global_step, updates


def test_the_update_loop_makes_the_asked_updates_and_draws_no_batch_after_the_last():
    drawn, step, updates = run_loop(accumulation=2, start=0, max_steps=7)  # 5 updates per epoch
    assert (step, updates) == (7, 7)
    assert len(drawn) == 14  # 7 updates x 2 micro-batches, not one more
    assert drawn[:10] == [(0, i, i) for i in range(10)]
    assert drawn[10:] == [(1, i, i) for i in range(4)]


def test_a_resumed_update_loop_draws_what_the_uninterrupted_one_draws_after_the_checkpoint():
    whole, _, _ = run_loop(accumulation=2, start=0, max_steps=7)
    resumed, step, updates = run_loop(accumulation=2, start=3, max_steps=7)
    assert (step, updates) == (7, 4)
    assert resumed == whole[6:]  # 3 updates x 2 batches already trained on


def test_an_epoch_that_ends_in_a_short_update_is_counted_and_resumed_alike():
    """10 batches with accumulation 3: updates of 3, 3, 3 and 1 batches, 4 per epoch."""
    whole, step, updates = run_loop(accumulation=3, start=0, max_steps=6)
    assert (step, updates) == (6, 6)
    assert whole == [(0, i, i) for i in range(10)] + [(1, i, i) for i in range(6)]
    assert run_loop(accumulation=3, start=4, max_steps=6)[0] == whole[10:]  # resumed at the epoch boundary
    assert run_loop(accumulation=3, start=5, max_steps=6)[0] == whole[13:]  # one update into epoch 1


def test_an_update_loop_resumed_at_its_end_draws_nothing():
    drawn, step, updates = run_loop(accumulation=1, start=7, max_steps=7)
    assert (drawn, step, updates) == ([], 7, 0)


def test_checkpoints_are_written_at_every_checkpointing_step_only(accelerator, tmp_path):
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    guard = NonFiniteGuard(accelerator, max_skips=5)
    args = types.SimpleNamespace(checkpointing_steps=2, output_dir=str(tmp_path), checkpoints_total_limit=None)
    for step in range(1, 6):
        checkpoint_if_due(accelerator, args, step, guard, lambda: list(model.parameters()))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    args.checkpointing_steps = 0  # never
    checkpoint_if_due(accelerator, args, 6, guard, lambda: list(model.parameters()))
    assert not (tmp_path / "checkpoint-6").exists()


def test_trackers_get_the_flags_as_scalars_without_secrets(tmp_path):
    """TensorBoard's hparams refuse a list (ValueError); a list flag reaches the tracker as text, hub_token never."""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    args = types.SimpleNamespace(
        report_to="tensorboard", learning_rate=1e-3, prompts=["a red square", "a blue circle"], unset=None,
        hub_token="hf_secret", use_ema=True,
    )  # fmt: skip
    seen = {}
    real_init = accelerator.init_trackers
    accelerator.init_trackers = lambda project, config: seen.update(config) or real_init(project, config=config)
    start_trackers(accelerator, args, "test")
    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == {"report_to": "tensorboard", "learning_rate": 1e-3, "prompts": str(args.prompts), "use_ema": True}
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # TensorBoard took them


def test_the_model_card_gets_the_flags_without_secrets_paths_or_upload_flags(tmp_path):
    digits = tmp_path / "mnist10k.npz"
    digits.write_bytes(b"")
    args = types.SimpleNamespace(
        learning_rate=1e-3, hub_token="hf_secret", output_dir="/home/me/run", logging_dir="logs", push_to_hub=True,
        hub_model_id="me/model", seed=0, unset=None, mnist_npz=str(digits), text_encoder="openai/clip-vit-base-patch32",
    )  # fmt: skip
    assert hub_training_info(args, train_steps=10) == {
        "learning_rate": 1e-3, "seed": 0, "mnist_npz": "mnist10k.npz", "text_encoder": "openai/clip-vit-base-patch32",
        "train_steps": 10,
    }  # fmt: skip
