"""add_layer_norm: the residual add (layer scale, drop path) fused with LayerNorm, against its float64 reference."""

import pytest
import torch
from _testutil import DEVICE, assert_bitwise_reproducible, check_close, no_host_sync

import beit_kernels
from beit_kernels import reference
from beit_kernels.layer_norm import add_layer_norm_bwd, add_layer_norm_fwd

NAMES = ("x", "branch", "gamma", "weight", "bias")


def make_inputs(B, N, D, parts, generator, device=DEVICE):
    """x, branch, gamma, weight, bias in float64 on ``device`` (None where ``parts`` lacks r, g, w, b), drawn on
    the CPU."""
    x = torch.randn(B, N, D, dtype=torch.float64, generator=generator) * 2 + 0.5
    br = torch.randn(B, N, D, dtype=torch.float64, generator=generator) if "r" in parts else None
    vecs = {p: torch.randn(D, dtype=torch.float64, generator=generator) if p in parts else None for p in "gwb"}
    return [t.to(device) if t is not None else None for t in (x, br, vecs["g"], vecs["w"], vecs["b"])]


def drop_scale(B, keep_prob=0.9):
    """Drop path's per-sample scale: every other sample dropped (0), the rest 1 / keep_prob."""
    return torch.tensor([(i % 2) / keep_prob for i in range(B)], dtype=torch.float64, device=DEVICE)


def randn(*shape, generator, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=generator).to(DEVICE)


def run(fn, tensors, dtype, grad_h, grad_y, sample_scale=None, y_dtype=None):
    """(h, y, grads of the five inputs) with the backward fed grad_h and/or grad_y."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]
    s = sample_scale.to(dtype) if sample_scale is not None else None
    h, y = fn(*leaves, eps=1e-6, sample_scale=s, y_dtype=y_dtype)
    outs = [(o, g.to(o.dtype)) for o, g in ((h, grad_h), (y, grad_y)) if g is not None]
    torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
    return h, y, [t.grad if t is not None else None for t in leaves]


CASES = [
    # B, N, D, parts (r=branch, g=gamma, w=weight, b=bias), drop path, incoming gradients
    (3, 13, 72, "rgwb", True, "hy"),  # the BEiT block, dropped samples, D not a power of two
    (2, 197, 48, "rgwb", False, "hy"),  # BEiT's token count
    (3, 13, 96, "rwb", True, "h"),  # no layer scale; grad_h only (y unused)
    (3, 13, 72, "rgw", False, "y"),  # LayerNorm without bias; grad_y only (h unused)
    (3, 13, 72, "wb", False, "hy"),  # no branch: plain LayerNorm, h is x
    (2, 5, 40, "r", False, "y"),  # LayerNorm without weight or bias
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,N,D,parts,drop,grads", CASES)
@pytest.mark.parametrize("variant", ["default", "joint_sums_no_loop_stages"])
def test_add_layer_norm_matches_reference(tuned, dtype, B, N, D, parts, drop, grads, variant):
    if variant != "default":  # the alternatives bench/tune_glue.py sweeps: joint sums, an unpipelined loop
        tuned({"layer_norm.bwd": {"joint_sums": True, "loop_stages": None}})
    g = torch.Generator().manual_seed(1)
    tensors = make_inputs(B, N, D, parts, g)
    grad_h = randn(B, N, D, generator=g) if "h" in grads else None
    grad_y = randn(B, N, D, generator=g) if "y" in grads else None
    s = drop_scale(B) if drop else None
    rounded = [t.to(dtype).double() if t is not None else None for t in tensors]
    s64 = s.to(dtype).double() if s is not None else None
    ref_h, ref_y, ref_grads = run(reference.add_layer_norm, rounded, torch.float64, grad_h, grad_y, s64)
    h, y, grads_ = run(beit_kernels.add_layer_norm, tensors, dtype, grad_h, grad_y, s)
    base_h, base_y, base_grads = run(reference.add_layer_norm, tensors, dtype, grad_h, grad_y, s)
    assert h.dtype == y.dtype == dtype and y.shape == (B, N, D)
    check_close("h", h, ref_h, base_h, dtype)
    check_close("y", y, ref_y, base_y, dtype)
    for name, gg, rg, bg in zip(NAMES, grads_, ref_grads, base_grads):
        assert (gg is None) == (rg is None), name
        if rg is not None:
            assert gg.dtype == dtype, name
            check_close(f"grad {name}", gg, rg, bg, dtype)
    if drop:  # dropped samples: h is x exactly, and the branch gets an exact zero gradient
        assert torch.equal(h[0], tensors[0][0].to(dtype))
        assert torch.equal(grads_[1][0], torch.zeros_like(grads_[1][0]))


def test_without_branch_h_is_x_itself():
    x = torch.randn(2, 5, 24).to(DEVICE).requires_grad_()
    h, y = beit_kernels.add_layer_norm(x, None, None, torch.ones(24, device=DEVICE), None)
    assert h is x
    ref = reference.add_layer_norm(x.double(), None, None, torch.ones(24, device=DEVICE).double(), None)[1]
    check_close("y", y, ref, None, torch.float32)


def test_fp32_residual_with_half_branch_and_y_dtype():
    """The autocast case: fp32 residual stream, fp16 branch (a Linear's output), y for the next Linear in fp16."""
    g = torch.Generator().manual_seed(2)
    B, N, D = 3, 13, 72
    x, br, gamma, w, b = make_inputs(B, N, D, "rgwb", g)
    gh, gy = (randn(B, N, D, generator=g) for _ in range(2))
    s = drop_scale(B)
    leaves = [x.float(), br.half(), gamma.float(), w.float(), b.float()]
    leaves = [t.detach().requires_grad_() for t in leaves]
    h, y = beit_kernels.add_layer_norm(*leaves, sample_scale=s.float(), y_dtype=torch.float16)
    assert h.dtype == torch.float32 and y.dtype == torch.float16
    torch.autograd.backward([h, y], [gh.float(), gy.half()])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_h, ref_y = reference.add_layer_norm(*ref_leaves, sample_scale=s.float().double())
    torch.autograd.backward([ref_h, ref_y], [gh, gy.half().double()])
    check_close("h", h, ref_h, None, torch.float32)
    # y rounded once to fp16, from fp32 math: within an fp16 rounding of the float64 value
    assert (y.double() - ref_y).abs().max() <= 2**-10 * ref_y.abs().max()
    for name, t, r in zip(NAMES, leaves, ref_leaves):
        assert t.grad.dtype == t.dtype, name
        tol = 1e-3 if t.dtype == torch.float16 else 1e-5
        assert (t.grad.double() - r.grad).abs().max() <= tol * r.grad.abs().max(), name


def test_only_some_inputs_take_gradients():
    """x and gamma frozen (no dx written, branch not kept for dgamma): the others' gradients are unchanged."""
    g = torch.Generator().manual_seed(7)
    tensors = [t.float() for t in make_inputs(3, 13, 72, "rgwb", g)]
    gh, gy = (randn(3, 13, 72, generator=g, dtype=torch.float32) for _ in range(2))
    wants = (False, True, False, True, False)
    leaves = [t.clone().requires_grad_(w) for t, w in zip(tensors, wants)]
    ref_leaves = [t.double().requires_grad_(w) for t, w in zip(tensors, wants)]
    s = drop_scale(3)
    torch.autograd.backward(beit_kernels.add_layer_norm(*leaves, sample_scale=s.float()), [gh, gy])
    torch.autograd.backward(reference.add_layer_norm(*ref_leaves, sample_scale=s), [gh.double(), gy.double()])
    for name, t, r, w in zip(NAMES, leaves, ref_leaves, wants):
        assert (t.grad is not None) == w, name
        if w:
            check_close(f"grad {name}", t.grad, r.grad, None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_forward_and_backward_are_bitwise_reproducible(dtype):
    """BEiT-B's block at its 197 tokens on a GPU (13 in the interpreter, for time): the gamma, weight and bias
    gradients' partial sums are added in a fixed order, so two runs agree bit for bit."""
    N, D = (197, 768) if DEVICE.type == "cuda" else (13, 72)
    g = torch.Generator().manual_seed(3)
    tensors = make_inputs(3, N, D, "rgwb", g)
    gh, gy = (randn(3, N, D, generator=g) for _ in range(2))

    def step():
        h, y, grads = run(beit_kernels.add_layer_norm, tensors, dtype, gh, gy, drop_scale(3))
        return [h.detach(), y.detach(), *grads]

    assert_bitwise_reproducible(step, ("h", "y", *(f"grad {n}" for n in NAMES)))


def test_compiles_without_graph_break():
    g = torch.Generator().manual_seed(4)
    x, br, gamma, w, b = (t.float().requires_grad_() for t in make_inputs(2, 7, 24, "rgwb", g))
    s = torch.tensor([0.0, 1.25], device=DEVICE)

    def step(x, br):
        h, y = beit_kernels.add_layer_norm(x, br, gamma, w, b, sample_scale=s)
        _, y2 = beit_kernels.add_layer_norm(h, None, None, w, None)  # the plain-LayerNorm path too
        return (h * y).sum() + y2.square().sum()

    torch.compile(step, backend="aot_eager", fullgraph=True)(x, br).backward()
    compiled = [t.grad.clone() for t in (x, br, gamma, w, b)]
    for t in (x, br, gamma, w, b):
        t.grad = None
    step(x, br).backward()
    for name, c, t in zip(NAMES, compiled, (x, br, gamma, w, b)):
        torch.testing.assert_close(c, t.grad, msg=name)


def test_opcheck_registrations():
    g = torch.Generator().manual_seed(5)
    x, br, gamma, w, b = (t.float() for t in make_inputs(2, 7, 24, "rgwb", g))
    s = torch.tensor([0.0, 1.25], device=DEVICE)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(add_layer_norm_fwd, (x, br, gamma, s, w, b, 1e-6, torch.float32), test_utils=checks)
    torch.library.opcheck(add_layer_norm_fwd, (x, None, None, None, w, None, 1e-6, torch.float16), test_utils=checks)
    h, _, mean, rstd = add_layer_norm_fwd(x, br, gamma, s, w, b, 1e-6, torch.float32)
    gh, gy = torch.randn_like(x), torch.randn_like(x)
    args = (gh, gy, h, br, gamma, s, w, mean, rstd, True, torch.float32, True, True)
    torch.library.opcheck(add_layer_norm_bwd, args, test_utils=checks)
    args = (None, gy, x, None, None, None, None, mean, rstd, False, torch.float32, True, False)
    torch.library.opcheck(add_layer_norm_bwd, args, test_utils=checks)


X = torch.zeros(2, 5, 8, device=DEVICE)
V = torch.ones(8, device=DEVICE)


@pytest.mark.parametrize(
    "args,kw,err,match",
    [
        ((X[0], X[0], None, V, V), {}, ValueError, r"\[B, N, D\]"),
        ((X.double(), None, None, V, V), {}, TypeError, "fp32, fp16 or bf16"),
        ((X, X.long(), None, V, V), {}, TypeError, "branch must be fp32"),
        ((X, X[:, :4], None, V, V), {}, ValueError, "branch must have x's shape"),
        ((X.transpose(1, 2).contiguous().transpose(1, 2), None, None, V, V), {}, ValueError, "unit stride"),
        ((X, X.transpose(1, 2).contiguous().transpose(1, 2), None, V, V), {}, ValueError, "unit stride"),
        ((X, X, torch.ones(7, device=DEVICE), V, V), {}, ValueError, r"gamma must be \[8\]"),
        ((X, X, None, V.long(), V), {}, TypeError, "weight must be a float"),
        ((X, X, None, V, V.to("meta")), {}, ValueError, "bias is on meta"),
        ((X, X.to("meta"), None, V, V), {}, ValueError, "branch is on meta"),
        ((X, X, None, V, V), dict(sample_scale=V[:3]), ValueError, r"sample_scale must be \[2\]"),
        ((X, X, None, V, V), dict(sample_scale=V[:2].long()), TypeError, "sample_scale must"),
        ((X, X, None, V, V), dict(sample_scale=V[:2].clone().requires_grad_()), ValueError, "gets no gradient"),
        ((X, None, V, V, V), {}, ValueError, "need one"),
        ((X, X, None, V, V), dict(eps=0.0), ValueError, "eps must be positive"),
        ((X, X, None, V, V), dict(y_dtype=torch.float64), TypeError, "y_dtype"),
        ((torch.zeros(1, 1, 8192, device=DEVICE), None, None, None, None), {}, ValueError, "wider than"),
    ],
)
def test_bad_inputs_raise(args, kw, err, match):
    with pytest.raises(err, match=match):
        beit_kernels.add_layer_norm(*args, **kw)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at BEiT-B shapes, and no host synchronisation


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["default", "joint_sums_no_loop_stages"])
def test_gpu_bf16_beit_b_matches_reference(tuned, variant):
    if variant != "default":  # the alternatives bench/tune_glue.py sweeps: joint sums, an unpipelined loop
        tuned({"layer_norm.bwd": {"joint_sums": True, "loop_stages": None}})
    B, N, D = 64, 197, 768
    g = torch.Generator().manual_seed(6)
    tensors = make_inputs(B, N, D, "rgwb", g)
    gh, gy = (randn(B, N, D, generator=g) for _ in range(2))
    s = drop_scale(B)
    dt = torch.bfloat16
    rounded = [t.to(dt).double() for t in tensors]
    ref_h, ref_y, ref_grads = run(reference.add_layer_norm, rounded, torch.float64, gh, gy, s.to(dt).double())
    h, y, grads = run(beit_kernels.add_layer_norm, tensors, dt, gh, gy, s)
    base_h, base_y, base_grads = run(reference.add_layer_norm, tensors, dt, gh, gy, s)
    check_close("h", h, ref_h, base_h, dt)
    check_close("y", y, ref_y, base_y, dt)
    for name, gg, rg, bg in zip(NAMES, grads, ref_grads, base_grads):
        check_close(f"grad {name}", gg, rg, bg, dt)


@pytest.mark.gpu
def test_gpu_no_sync():
    B, N, D = 32, 197, 768
    x = torch.randn(B, N, D, device=DEVICE, requires_grad=True)
    br = torch.randn(B, N, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    gamma, w, b = (torch.ones(D, device=DEVICE, requires_grad=True) for _ in range(3))
    s = (torch.rand(B, device=DEVICE) > 0.1).float() / 0.9
    with no_host_sync():
        h, y = beit_kernels.add_layer_norm(x, br, gamma, w, b, sample_scale=s, y_dtype=torch.bfloat16)
        (h.square().mean() + y.float().square().mean()).backward()
    assert torch.isfinite(gamma.grad).all()
