"""The drop-in modules of beit_kernels.nn: same parameters as the official attention, every impl agrees."""

import pytest
import torch
from _testutil import DEVICE

from beit_kernels.nn import Attention, RelativePositionBias


@pytest.mark.parametrize("window", [None, (3, 4)])
def test_attention_impls_agree(window):
    torch.manual_seed(0)
    n = 13 if window is not None else 11
    attn = Attention(48, num_heads=3, qkv_bias=True, window_size=window)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    attn.to(DEVICE)
    shared = torch.randn(3, n, n).to(DEVICE).requires_grad_()
    x = torch.randn(3, n, 48).to(DEVICE)
    results = {}
    for impl in ("ref", "sdpa", "triton"):
        attn.impl = impl
        attn.zero_grad()
        shared.grad = None
        y = attn(x, rel_pos_bias=shared)
        y.pow(2).sum().backward()
        grads = {name: p.grad.clone() for name, p in attn.named_parameters()}
        results[impl] = (y.detach(), grads, shared.grad.clone())

    def close(a, b, msg):
        # fp32 sums of different order: tolerance relative to the tensor's scale.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=msg)

    for impl in ("sdpa", "triton"):
        close(results[impl][0], results["ref"][0], f"{impl} output")
        close(results[impl][2], results["ref"][2], f"{impl} shared bias grad")
        for name, grad in results["ref"][1].items():
            close(results[impl][1][name], grad, f"{impl} {name}")


def test_official_parameter_names():
    attn = Attention(48, num_heads=3, qkv_bias=True, window_size=(14, 14))
    assert set(attn.state_dict()) == {
        "qkv.weight",
        "q_bias",
        "v_bias",
        "proj.weight",
        "proj.bias",
        "relative_position_bias_table",
    }
    assert tuple(attn.relative_position_bias_table.shape) == (732, 3)
    assert "relative_position_index" in dict(attn.named_buffers())  # derived, so not persistent
    rpb = RelativePositionBias((14, 14), 3)
    assert tuple(rpb().shape) == (3, 197, 197)


def test_unknown_impl_is_refused():
    attn = Attention(16, num_heads=2)
    attn.impl = "fast"
    with pytest.raises(ValueError, match="unknown impl"):
        attn(torch.randn(1, 3, 16))


def _grad_fns(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [f for f, _ in fn.next_functions]
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize(
    "impl, split",
    [("ref", "SelectBackward0"), ("sdpa", "UnbindBackward0"), ("triton", "AttentionPackedFunctionBackward")],
)
def test_qkv_split_backward(impl, split):
    """sdpa splits qkv with unbind (one stack in backward), triton hands the packed qkv to the kernel (whose
    backward writes one dqkv); the reference keeps the official indexing (three zero-filled full-size gradients
    added up)."""
    attn = Attention(48, num_heads=3, qkv_bias=True, impl=impl).to(DEVICE)
    out = attn(torch.randn(3, 7, 48, device=DEVICE, requires_grad=True))
    names = _grad_fns(out)
    assert split in names
    others = {"SelectBackward0", "UnbindBackward0", "AttentionPackedFunctionBackward"} - {split}
    assert others.isdisjoint(names), names & others
