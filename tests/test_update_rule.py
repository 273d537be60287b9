"""The update rule all four training scripts share (``guarded_update``) and where a resumed run picks the data up
(``resumed_epochs``), on a one-process Accelerator and a stand-in for an fp16 one."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from hfgen.training_utils import NonFiniteGuard, TrainingLength, guarded_update, resumed_epochs


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
    """Stands in for an fp16 Accelerator: it has a grad scaler, whose step skips a non-finite update by itself."""

    scaler = object()
    sync_gradients = True
    device = torch.device("cpu")

    def backward(self, loss):
        loss.backward()

    def gather(self, x):
        return x

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class CountingOptimizer(torch.optim.SGD):
    calls = 0

    def step(self, closure=None):
        CountingOptimizer.calls += 1  # the scaler's step, which checks the gradients itself


def test_with_a_grad_scaler_the_optimizer_is_always_called(accelerator):  # (the real one: for the guard's logging)
    """Not calling the scaler's step on a non-finite update would never lower the loss scale: every later fp16
    update would overflow and be skipped too."""
    model = torch.nn.Linear(3, 2)
    optimizer = CountingOptimizer(model.parameters(), lr=0.1)
    fp16 = ScalerAccelerator()
    guard = NonFiniteGuard(fp16, max_skips=5)
    guarded_update(fp16, guard, loss_of(model, float("nan")), optimizer, model.parameters(), 1.0)
    assert CountingOptimizer.calls == 1
    assert guard.end_update(1)  # still counted as a skipped update


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
