"""Tolerances for float32 results that different kernels computed, in units of float32 eps of the values' magnitude.

The batch size, the thread count and the CPU (MKL and oneDNN pick other blockings and instruction sets on a Xeon and
on an EPYC) change the order in which a conv or a matmul adds its products, so one float32 computation can end a few
eps apart, and more where a later step amplifies it (DDPM's x_0 hat divides by sqrt(alpha_bar_t)). Such rounding is
proportional to the size of the summands, not of each result: an element-wise rtol fails on entries near zero, and a
fixed atol ignores the values' scale. Compare max |actual - expected| with a number of eps of max |expected| instead.
"""

import numpy as np
import torch

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # 2 ** -23 ~ 1.19e-7: the spacing of float32 numbers at 1


def float32_atol(expected, num_eps: float, floor: float = 0.0) -> float:
    """``num_eps`` float32 eps of the magnitude of ``expected``: num_eps * eps * max(floor, max |expected|)."""
    expected = torch.as_tensor(np.asarray(expected) if not torch.is_tensor(expected) else expected)
    return num_eps * FLOAT32_EPS * max(floor, expected.abs().max().item() if expected.numel() else 0.0)


def assert_close_float32(actual, expected, num_eps: float, floor: float = 0.0, msg: str = "") -> None:
    """max |actual - expected| <= num_eps * float32 eps * max(floor, max |expected|); tensors or arrays, same shape."""
    actual = torch.as_tensor(np.asarray(actual) if not torch.is_tensor(actual) else actual).double()
    expected = torch.as_tensor(np.asarray(expected) if not torch.is_tensor(expected) else expected).double()
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), f"{msg}: non-finite values"
    atol = float32_atol(expected, num_eps, floor)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = atol / (num_eps * FLOAT32_EPS) if num_eps else 0.0
    assert error <= atol, (
        f"{msg}: max |actual - expected| = {error:.3g} = {error / FLOAT32_EPS / max(scale, 1e-300):.0f} float32 eps "
        f"of the magnitude {scale:.3g}, allowed {num_eps:g} eps ({atol:.3g})"
    )
