"""hfgen.layers.attention and GroupNorm under a CPU autocast (``--mixed_precision bf16`` on a CPU): training-time
attention and every GroupNorm compute in float32, where torch's bfloat16 CPU kernels are slower; everything else, and
everything outside a CPU autocast, is torch's own op."""

import torch
import torch.nn.functional as F
from tolerances import assert_close_float32
from torch import nn

from hfgen import UNetModel
from hfgen.layers import GroupNorm, attention


def bf16_rounded(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).bfloat16().float()  # exact in bfloat16, so both paths see one input


def test_group_norm_normalises_bf16_input_in_float32_under_cpu_autocast():
    norm = GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = bf16_rounded(2, 16, 8, 8)
    expected = F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)  # float32 end to end
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.float32
    assert_close_float32(out, expected, num_eps=64, msg="GroupNorm of a bfloat16 input under autocast")
    plain = nn.GroupNorm(4, 16)
    plain.load_state_dict(norm.state_dict())  # the same parameters under the same names (checkpoints, conversions)
    assert torch.equal(plain(x), norm(x))
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # no autocast: torch's op as it is
    low = GroupNorm(4, 16).bfloat16()  # a model cast to bfloat16 keeps computing in it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert low(x.bfloat16()).dtype == torch.bfloat16


def test_attention_trains_in_float32_and_samples_in_bf16_under_cpu_autocast():
    q, k, v = (bf16_rounded(2, 2, 16, 8, seed=s) for s in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = attention(*(t.bfloat16().requires_grad_() for t in (q, k, v)))
        with torch.no_grad():
            sampled = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert trained.dtype == torch.float32 and trained.requires_grad
    assert_close_float32(trained.detach(), expected, num_eps=64, msg="attention under autocast, with grad")
    assert sampled.dtype == torch.bfloat16  # the forward kernel is as fast in bfloat16: autocast's choice stays
    assert attention(q, k, v).dtype == torch.float32 and attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == (
        torch.bfloat16
    )


def test_unet_trains_under_cpu_autocast_with_float32_gradients():
    """A U-Net step under autocast: convolutions and projections in bfloat16, norms and attention in float32, a finite
    loss close to the float32 step's, and float32 gradients for every parameter."""
    model = UNetModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        attention_levels=(False, True), attention_head_dim=8, norm_num_groups=4,
    )  # fmt: skip
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # zero-initialised: the output would say nothing
    x, t = bf16_rounded(2, 1, 8, 8), torch.tensor([10, 500])
    expected = model(x, t).sample
    dtypes = {}
    hooks = [
        m.register_forward_hook(lambda m, a, out: dtypes.setdefault(type(m).__name__, set()).add(out.dtype))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.GroupNorm))
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t).sample
    for h in hooks:
        h.remove()
    assert dtypes == {"Conv2d": {torch.bfloat16}, "GroupNorm": {torch.float32}}
    # bfloat16 keeps 8 bits: 2**-8 relative of the output's magnitude, times a few rounded layers
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.05 * expected.abs().max().item())
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
