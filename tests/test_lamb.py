"""hfgen.training_utils.Lamb (RIN's optimiser) and ``train_diffusion.py --optimizer lamb``."""

import math

import pytest
import torch
from test_train_diffusion import assert_same_weights, run, weights

from hfgen.training_utils import Lamb, lamb_param_groups


def small_model(zero_last: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    if zero_last:  # a zero-initialised matrix, as adaLN-Zero and the RIN's gains start
        torch.nn.init.zeros_(model[2].weight)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        x, y = batch(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def reference_lamb(model, steps, lr, betas, eps, weight_decay):
    """The paper's update, one tensor at a time, with the recipe's groups (ndim > 1: decay and trust ratio)."""
    state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in model.parameters()}
    for step in range(steps):
        x, y = batch(step)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                m, v = state[p]
                m.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                v.mul_(betas[1]).add_(p.grad**2, alpha=1 - betas[1])
                u = (m / (1 - betas[0] ** (step + 1))) / ((v / (1 - betas[1] ** (step + 1))).sqrt() + eps)
                ratio = 1.0
                if p.ndim > 1:
                    u = u + weight_decay * p
                    w_norm, u_norm = p.norm(), u.norm()
                    ratio = (w_norm / u_norm).item() if w_norm > 0 and u_norm > 0 else 1.0
                p.sub_(lr * ratio * u)


def test_lamb_matches_the_papers_update():
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    a, b = small_model(), small_model()
    train(a, Lamb(lamb_param_groups(a, weight_decay=0.1), **kwargs), steps=6)
    reference_lamb(b, steps=6, weight_decay=0.1, **kwargs)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=name)


def test_without_the_trust_ratio_lamb_is_adam():
    a, b = small_model(), small_model()
    train(a, Lamb(a.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, adapt=False), steps=5)
    train(b, torch.optim.Adam(b.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8), steps=5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=name)


def test_each_matrix_moves_by_lr_times_its_norm_and_a_zero_matrix_takes_an_adam_step():
    model = small_model(zero_last=False)
    before = [p.detach().clone() for p in model.parameters() if p.ndim > 1]
    train(model, Lamb(lamb_param_groups(model, weight_decay=0.0), lr=1e-2), steps=1)
    for w, w0 in zip([model[0].weight, model[2].weight], before):
        assert math.isclose((w.detach() - w0).norm().item(), 1e-2 * w0.norm().item(), rel_tol=1e-4)
    # ||w|| = 0: ratio 1, so the first step is Adam's, lr * sign(grad) up to eps
    model = small_model(zero_last=True)
    train(model, Lamb(lamb_param_groups(model, weight_decay=0.0), lr=1e-2), steps=1)
    step = model[2].weight.detach()
    torch.testing.assert_close(step.abs(), torch.full_like(step, 1e-2), rtol=1e-3, atol=0)


def test_state_dict_resumes_exactly():
    straight, split = small_model(), small_model()
    train(straight, Lamb(lamb_param_groups(straight, 0.01), lr=1e-2), steps=5)
    opt = Lamb(lamb_param_groups(split, 0.01), lr=1e-2)
    train(split, opt, steps=3)
    resumed = Lamb(lamb_param_groups(split, 0.01), lr=1e-2)
    resumed.load_state_dict(opt.state_dict())
    train(split, resumed, steps=2, start=3)
    for pa, pb in zip(straight.parameters(), split.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-8)


def test_param_groups_and_bad_arguments():
    model = small_model()
    matrices, vectors = lamb_param_groups(model, weight_decay=0.05)
    assert [p.ndim for p in matrices["params"]] == [2, 2] and matrices["weight_decay"] == 0.05 and matrices["adapt"]
    assert [p.ndim for p in vectors["params"]] == [1, 1, 1, 1] and vectors["weight_decay"] == 0.0
    assert not vectors["adapt"]
    for kwargs, name in [({"lr": 0.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": 0.0}, "eps"),
                         ({"weight_decay": -1.0}, "weight_decay")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            Lamb(model.parameters(), **kwargs)


def test_train_diffusion_with_lamb_resumes_as_uninterrupted(tmp_path):
    """--optimizer lamb trains the denoiser (its weights change) and its moments travel in the checkpoint."""
    common = ["--optimizer", "lamb", "--adam_weight_decay", "0.01", "--checkpointing_steps", "2"]
    run(tmp_path / "straight", *common, "--max_train_steps", "4")
    run(tmp_path / "split", *common, "--max_train_steps", "2")
    run(tmp_path / "split", *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"), atol=1e-6)
    run(tmp_path / "adamw", "--max_train_steps", "4")
    lamb, adamw = weights(tmp_path / "straight"), weights(tmp_path / "adamw")
    assert any(not torch.allclose(lamb[k], adamw[k], rtol=1e-3, atol=1e-5) for k in lamb)
