"""beit_kernels.attention against float64 references: outputs and the gradients of q, k, v and the bias.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), whose bf16 dot is wrong: fp32 and fp16 here,
bf16 in the `gpu` tests. Low-precision results must be within twice plain PyTorch's error in the same dtype
(plus a tiny epsilon) of the float64 reference.
"""

import importlib
import os

import pytest
import torch
from _testutil import DEVICE, assert_bitwise_reproducible

import beit_kernels
from beit_kernels import reference, tuning
from beit_kernels.attention import _num_groups


def torch_lowp_attention(q, k, v, bias, scale):
    """Plain PyTorch attention computed in the inputs' own dtype (no upcast): the error yardstick."""
    s = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        s = s + bias.to(q.dtype)
    return s.softmax(-1) @ v


def make_inputs(B, H, N, D, dtype, bias_shape, bias_grad=True, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    bias = None
    if bias_shape is not None:
        bias = (torch.randn(bias_shape, generator=g) * 2).to(device).requires_grad_(bias_grad)
    do = torch.randn(B, H, N, D, generator=g).to(device, dtype)
    return q, k, v, bias, do


def run(fn, q, k, v, bias, do, scale):
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    out = fn(q, k, v, bias, scale)
    out.backward(do)
    grads = [t.grad.clone() if t is not None and t.requires_grad else None for t in (q, k, v, bias)]
    for t in leaves:
        t.grad = None
    return out.detach(), grads


def check(q, k, v, bias, do, *, eps=None):
    scale = q.shape[-1] ** -0.5
    dtype = q.dtype
    ours, ours_g = run(lambda *a: beit_kernels.attention(*a[:4], scale=a[4]), q, k, v, bias, do, scale)

    def detach64(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    q64, k64, v64, b64 = (detach64(t) for t in (q, k, v, bias))
    ref, ref_g = run(lambda *a: reference.attention(*a[:4], scale=a[4]), q64, k64, v64, b64, do.double(), scale)
    lowp, lowp_g = run(torch_lowp_attention, q, k, v, bias, do, scale)

    eps = eps if eps is not None else (1e-6 if dtype == torch.float32 else 1e-4)
    names = ["out", "dq", "dk", "dv", "dbias"]
    for name, a, r, p in zip(names, [ours, *ours_g], [ref, *ref_g], [lowp, *lowp_g]):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape and a.dtype == (bias.dtype if name == "dbias" else dtype), name
        assert torch.isfinite(a).all(), name
        err = (a.double() - r).abs().max().item()
        bound = 2 * (p.double() - r).abs().max().item() + eps * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"
    return ours, ours_g


SHAPES = [(1, 2, 1, 16), (2, 3, 7, 32), (3, 2, 50, 64)]


def bias_shapes(B, H, N):
    return {"none": None, "HNN": (H, N, N), "1HNN": (1, H, N, N), "BHNN": (B, H, N, N)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias_kind", ["none", "HNN", "1HNN", "BHNN"])
def test_forward_and_gradients(dtype, shape, bias_kind):
    B, H, N, D = shape
    check(*make_inputs(B, H, N, D, dtype, bias_shapes(B, H, N)[bias_kind]))


@pytest.mark.parametrize(
    "dtype, D", [(torch.float32, 64), (torch.float32, 256), (torch.float16, 64), (torch.float16, 256)]
)
def test_gpu_tile_table(monkeypatch, dtype, D):
    """The tiles a GPU launch takes (fp32: 32 x 32, 32 x 16 for dk/dv, 16 x 16 at D > 64; half precision:
    128 x 64 forward at D <= 64, 64 x 32 forward and 32 x 32 backward at D > 128), run in the interpreter, which
    otherwise takes 64 x 64 tiles for everything; N = 37 leaves a partial block at the end."""
    if DEVICE.type == "cuda":
        pytest.skip("the GPU runs these tiles in every test")
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    configs = [tuning.attention_tile(k, D, dtype, 99 * 1024) for k in ("fwd", "dq", "dkdv")]  # an sm86's shared memory
    tiles = {(c["BLOCK_M"], c["BLOCK_N"]) for c in configs}
    assert tiles != {(64, 64)}
    B, H, N = 3, 1, 37
    check(*make_inputs(B, H, N, D, dtype, (1, H, N, N)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_beit_sequence_length(dtype):
    check(*make_inputs(3, 2, 197, 64, dtype, (2, 197, 197)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", ["last_keys", "local_window"])
def test_masking_bias_with_whole_key_blocks_at_minus_inf(dtype, pattern):
    """-inf over a row's first key blocks (a mask as a bias): the online softmax must not subtract -inf from
    -inf (NaN), as neither the reference nor SDPA does."""
    B, H, N, D = 3, 2, 80, 16
    q, k, v, _, do = make_inputs(B, H, N, D, dtype, None)
    i = torch.arange(N, device=DEVICE)
    if pattern == "last_keys":
        masked = (i[None, :] < N - 8).expand(N, N)  # every row sees only the last 8 keys
    else:
        masked = (i[:, None] - i[None, :]).abs() > 8  # the late rows' first blocks are all masked
    bias = torch.zeros(H, N, N, device=DEVICE).masked_fill(masked, float("-inf")).requires_grad_()
    out, grads = check(q, k, v, bias, do)
    assert torch.equal(grads[3][:, masked], torch.zeros_like(grads[3][:, masked]))


@pytest.mark.parametrize("bias_shape", [(7, 7), (3, 1, 1, 7), (1, 1, 7, 1), (2, 7, 7)])
def test_other_broadcast_bias_shapes(bias_shape):
    check(*make_inputs(3, 2, 7, 16, torch.float32, bias_shape))


@pytest.mark.parametrize("fused", [False, True], ids=["two_kernels", "fused"])
def test_bias_as_an_expanded_view(tuned, fused):
    """A shared [H, N, N] bias passed as its expand to [B, H, N, N] (stride 0 over the batch): the op returns one
    gradient per batch, and autograd sums them into the shared bias once, through the expand."""
    tuned({"attention.bwd_fused": fused})
    B, H, N, D = 3, 2, 20, 16
    q, k, v, bias, do = make_inputs(B, H, N, D, torch.float16, (H, N, N))
    beit_kernels.attention(q, k, v, bias.expand(B, H, N, N)).backward(do)
    ours = bias.grad.clone()
    bias.grad = None
    beit_kernels.attention(q, k, v, bias).backward(do)
    torch.testing.assert_close(ours, bias.grad, rtol=1e-3, atol=1e-4)
    b64 = bias.detach().double().requires_grad_()
    qkv64 = [t.detach().double() for t in (q, k, v)]
    reference.attention(*qkv64, b64.expand(B, H, N, N)).backward(do.double())
    assert (ours.double() - b64.grad).abs().max().item() < 2e-2 * max(1.0, b64.grad.abs().max().item())


@pytest.mark.parametrize("bias_kind", ["HNN", "BHNN"])
def test_bias_without_gradient(bias_kind):
    B, H, N, D = 2, 3, 20, 32
    q, k, v, bias, do = make_inputs(B, H, N, D, torch.float16, bias_shapes(B, H, N)[bias_kind], bias_grad=False)
    _, grads = check(q, k, v, bias, do)
    assert grads[3] is None


@pytest.mark.parametrize(
    "shape", [(3, 2, 50, 64), (2, 3, 7, 32), (5, 1, 33, 16), (6, 2, 19, 32)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("bias_kind", ["none", "HNN", "BHNN"])
def test_all_queries_dkdv_kernel(monkeypatch, tuned, shape, bias_kind):
    """The all-queries dk/dv kernel (the default on sm90 only, so not in the interpreter), switched on: the same
    gradients within the error bound, the bias gradient summed over batch groups in registers."""
    attn_mod = importlib.import_module("beit_kernels.attention")
    tuned({"attention.dkdv_all_queries": True})
    B, H, N, D = shape
    assert tuning.attention_all_queries(N, D, torch.float16) and not tuning.attention_all_queries(N, D, torch.float32)
    launched = []
    real = attn_mod._attn_bwd_dkdv_allq_kernel
    monkeypatch.setattr(
        attn_mod,
        "_attn_bwd_dkdv_allq_kernel",
        type("Spy", (), {"__getitem__": lambda self, grid: launched.append(grid) or real[grid]})(),
    )
    check(*make_inputs(B, H, N, D, torch.float16, bias_shapes(B, H, N)[bias_kind]))
    assert len(launched) == 1 and launched[0][1] == H


def _spy_fused(monkeypatch, attn_mod) -> list:
    """Record each launch of the fused backward as (grid, shape of its partial bias buffer), with that buffer
    filled with NaN first: it is not zeroed, so an element a group's first batch did not store would reach the
    gradient."""
    launched = []
    real = attn_mod._attn_bwd_fused_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                partial = args[10]  # dbias_ptr
                launched.append((grid, tuple(partial.shape)))
                return real[grid](*args[:10], partial.fill_(float("nan")), *args[11:], **kwargs)

            return launch

    monkeypatch.setattr(attn_mod, "_attn_bwd_fused_kernel", Spy())
    return launched


def _set_dkdv_t(tuned, value: bool):
    """The fused backward's tile, with dk and dv as transposed products (``DKDV_T``) or not."""
    tuned({"attention.fused": {"DKDV_T": value}})


@pytest.mark.parametrize(
    "shape", [(3, 2, 50, 64), (2, 3, 7, 32), (5, 1, 33, 16), (6, 2, 19, 32)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("bias_kind", ["none", "HNN", "1HNN", "BHNN"])
@pytest.mark.parametrize("dkdv_t", [False, True], ids=["dkdv", "dkdv_t"])
def test_fused_backward_kernel(monkeypatch, tuned, shape, bias_kind, dkdv_t):
    """The fused backward (off by default), switched on, with dk and dv as plain or transposed products: one launch
    on an (H, groups) grid gives the gradients within the error bound, its partial bias buffer starting as NaN."""
    attn_mod = importlib.import_module("beit_kernels.attention")
    tuned({"attention.bwd_fused": True})
    _set_dkdv_t(tuned, dkdv_t)
    B, H, N, D = shape
    cpu = torch.device("cpu")  # the switch's own logic: the interpreter's device has no shared-memory limit
    fused_at = tuning.attention_fused
    assert fused_at(N, D, torch.float16, cpu) and not fused_at(N, D, torch.float32, cpu)
    assert not fused_at(257, 64, torch.float16, cpu)
    assert not fused_at(N, 128, torch.float16, cpu)
    # Where a block gets under 160 KiB of shared memory (sm86, sm89, sm120), the two kernels stay.
    for shared, fused in ((99 * 1024, False), (163 * 1024, True), (227 * 1024, True)):
        with tuning.override({"shared_memory": shared}):
            assert fused_at(N, D, torch.float16, cpu) == fused
    launched = _spy_fused(monkeypatch, attn_mod)
    for name in ("_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dkdv_allq_kernel"):
        monkeypatch.setattr(attn_mod, name, None)  # the two-kernel path must not run
    check(*make_inputs(B, H, N, D, torch.float16, bias_shapes(B, H, N)[bias_kind]))
    groups = {"none": B, "HNN": min(2, max(1, B // 2)), "1HNN": min(2, max(1, B // 2)), "BHNN": B}[bias_kind]
    partial = (groups, H, N, N) if bias_kind != "none" else (1, 1, 1, 1)
    assert launched == [((H, groups), partial)]


def test_fused_backward_at_beit_length(monkeypatch):
    """N = 197 (every query in one 256-row tile, the last key block partial), on the model's packed qkv: the fused
    backward's dqkv and bias gradient against the two kernels'."""
    attn_mod = importlib.import_module("beit_kernels.attention")
    B, N, H, D = 3, 197, 2, 64
    cpu = torch.device("cpu")
    assert tuning.FUSED_MAX_N == 256 and not tuning.attention_fused(N, D, torch.float16, cpu)  # off by default
    launched = _spy_fused(monkeypatch, attn_mod)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, torch.float16).requires_grad_()
    bias = torch.randn(H, N, N, generator=g).to(DEVICE).requires_grad_()
    do = torch.randn(B, N, H, D, generator=g).to(DEVICE, torch.float16)
    grads = {}
    for fused in (False, True):
        with tuning.override({"attention.bwd_fused": fused}):
            fused_at = tuning.attention_fused
            assert fused_at(N, D, torch.float16, cpu) == fused_at(256, D, torch.float16, cpu)
            assert fused_at(N, D, torch.float16, cpu) == fused
            beit_kernels.attention_qkvpacked(qkv, bias).backward(do)
        grads[fused] = (qkv.grad, bias.grad)
        qkv.grad = bias.grad = None
    assert [grid[0] for grid, _ in launched] == [H]  # one launch, the fused one; its partial started as NaN
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    q, k, v = (t.detach().requires_grad_() for t in qkv.detach().permute(2, 0, 3, 1, 4).unbind(0))
    check(q, k, v, bias, do.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_views_of_packed_qkv(dtype):
    B, N, H, D = 3, 50, 2, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # three [B, H, N, D] views with strides of the packed tensor
    assert not q.is_contiguous() and q.stride(-1) == 1
    bias = torch.randn(H, N, N, generator=g).to(DEVICE).requires_grad_()
    do = torch.randn(B, H, N, D, generator=g).to(DEVICE, dtype)
    out = beit_kernels.attention(q, k, v, bias)
    out.backward(do)
    qkv64 = qkv.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    q64, k64, v64 = qkv64.permute(2, 0, 3, 1, 4).unbind(0)
    ref = reference.attention(q64, k64, v64, bias64)
    ref.backward(do.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(bias.grad.double(), bias64.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias_kind", ["none", "HNN", "BHNN"])
def test_qkvpacked_equals_split_attention_and_reference(dtype, bias_kind):
    """attention_qkvpacked runs the same kernels as attention on the three views: equal bit for bit, the qkv
    gradient arriving as one [B, N, 3, H, D] tensor (no stack); and close to the float64 reference."""
    B, N, H, D = 3, 19, 2, 32
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, dtype)
    shape = bias_shapes(B, H, N)[bias_kind]
    bias = (torch.randn(shape, generator=g) * 2).to(DEVICE) if shape is not None else None
    do = torch.randn(B, N, H, D, generator=g).to(DEVICE, dtype)

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() if t is not None else None for t in (qkv, bias)]
        out = fn(*leaves)
        out.backward(do.to(dt))
        return out.detach(), [t.grad if t is not None else None for t in leaves], out

    def split(qkv_, bias_):
        q, k, v = qkv_.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] views
        return beit_kernels.attention(q, k, v, bias_).transpose(1, 2)

    packed, packed_g, packed_out = grads(beit_kernels.attention_qkvpacked, dtype)
    assert packed.shape == (B, N, H, D) and packed_out.is_contiguous()
    assert type(packed_out.grad_fn).__name__ == "AttentionPackedFunctionBackward"
    plain, plain_g, _ = grads(split, dtype)
    assert torch.equal(packed, plain)
    for a, b in zip(packed_g, plain_g):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    ref, ref_g, _ = grads(reference.attention_qkvpacked, torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed.double(), ref, atol=tol, rtol=tol)
    for a, r in zip(packed_g, ref_g):
        if r is not None:
            torch.testing.assert_close(a.double(), r, atol=tol, rtol=tol)


def test_qkvpacked_bad_inputs():
    qkv = torch.randn(2, 7, 3, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[B, N, 3, H, D\]"):
        beit_kernels.attention_qkvpacked(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"\[B, N, 3, H, D\]"):
        beit_kernels.attention_qkvpacked(qkv[0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        beit_kernels.attention_qkvpacked(qkv.tolist())
    with pytest.raises(ValueError, match="does not broadcast"):
        beit_kernels.attention_qkvpacked(qkv, torch.randn(3, 7, 7, device=DEVICE))
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        beit_kernels.attention_qkvpacked(torch.randn(2, 7, 3, 2, 16, 2, device=DEVICE)[..., 0])


def test_backward_switches_from_the_environment():
    """The switches are read with env_switch when the module is imported (1 on, 0 off, unset: the default, tested
    above), and a bad value stops the import."""
    import subprocess
    import sys

    # The module, not the function of the same name that the package exports.
    code = "from beit_kernels import tuning; print(tuning.get('attention.dkdv_all_queries'), "
    code += "tuning.get('attention.bwd_fused'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEIT_KERNELS_")}
    env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, BEIT_KERNELS_DKDV_ALL_QUERIES="0", BEIT_KERNELS_ATTN_BWD_FUSED="1"))  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "False True", run.stderr[-500:]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, BEIT_KERNELS_DKDV_ALL_QUERIES="yes"))  # fmt: skip
    assert run.returncode != 0 and "BEIT_KERNELS_DKDV_ALL_QUERIES must be 0 or 1" in run.stderr


def test_head_dim_not_a_power_of_two():
    check(*make_inputs(2, 2, 19, 40, torch.float32, (2, 19, 19)))


def test_single_feature_heads_take_any_last_stride():
    q, k, v, bias, do = make_inputs(3, 2, 9, 2, torch.float32, (2, 9, 9))
    q1, k1, v1 = (t.detach()[..., ::2].requires_grad_() for t in (q, k, v))  # D = 1, last stride 2
    check(q1, k1, v1, bias, do[..., :1].contiguous())


def test_output_memory_is_token_major():
    q, k, v, bias, _ = make_inputs(2, 3, 7, 16, torch.float32, (3, 7, 7))
    out = beit_kernels.attention(q, k, v, bias)
    # [B, H, N, D] laid out as [B, N, H, D]: the model's transpose(1, 2).reshape(B, N, H*D) is a view.
    assert out.transpose(1, 2).is_contiguous()


def test_no_n_by_n_tensor_is_saved_for_backward():
    B, H, N, D = 2, 3, 50, 16
    q, k, v, bias, do = make_inputs(B, H, N, D, torch.float32, (H, N, N))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = beit_kernels.attention(q, k, v, bias)
    out.backward(do)
    assert (B, H, N) in saved  # the log-sum-exp
    nn_shaped = [s for s in saved if len(s) >= 2 and s[-2:] == (N, N)]
    assert nn_shaped == [(H, N, N)]  # the bias, an input; nothing of [B, H, N, N]


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
# The interpreter runs programs one after another, so only a GPU can show an order dependence: there the packed
# qkv (the model's path) is checked too; in the interpreter the split case keeps the test itself checked, for time.
@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["split", "packed"])
def test_forward_and_backward_are_bitwise_reproducible(dtype, packed):
    """BEiT-B's attention at 197 tokens on a GPU (13 in the interpreter, for time), with a shared bias whose
    gradient is summed over batch groups in a fixed order, no atomics (B = 7: groups of 3, 3 and 1 on the GPU; 2
    groups of 2 in the interpreter): two runs agree bit for bit."""
    B, H, N, D = (7, 12, 197, 64) if DEVICE.type == "cuda" else (4, 2, 13, 16)
    if packed:
        g = torch.Generator().manual_seed(6)
        qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
        bias = torch.randn(H, N, N, generator=g).to(DEVICE).requires_grad_()
        do = torch.randn(B, N, H, D, generator=g).to(DEVICE, dtype)

        def step():
            out = beit_kernels.attention_qkvpacked(qkv, bias)
            return [out.detach(), *torch.autograd.grad(out, (qkv, bias), do)]

        names = ("out", "dqkv", "dbias")
    else:
        q, k, v, bias, do = make_inputs(B, H, N, D, dtype, (H, N, N))

        def step():
            out, grads = run(lambda *a: beit_kernels.attention(*a[:4]), q, k, v, bias, do, None)
            return [out, *grads]

        names = ("out", "dq", "dk", "dv", "dbias")
    assert_bitwise_reproducible(step, names)


def test_batch_groups_never_reach_the_batch_size():
    for B in (2, 3, 16, 256):
        g = _num_groups(B, 12, 4, torch.device("cpu"), batch_broadcast=True)
        assert 1 <= g <= max(1, B // 2)
    assert _num_groups(5, 12, 4, torch.device("cpu"), batch_broadcast=False) == 5


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, bias, _ = make_inputs(1, 1, 5, 16, torch.float32, None)
    torch.testing.assert_close(beit_kernels.attention(q, k, v), beit_kernels.attention(q, k, v, scale=0.25))


def test_compiles_without_graph_break():
    q, k, v, bias, _ = make_inputs(2, 2, 7, 16, torch.float32, (2, 7, 7))

    def f(q, k, v, bias):
        return (beit_kernels.attention(q, k, v, bias) * 2).sum()

    explanation = torch._dynamo.explain(f)(q, k, v, bias)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_custom_ops_pass_opcheck():
    q, k, v, bias, do = make_inputs(2, 2, 7, 16, torch.float32, (2, 7, 7))
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))
    torch.library.opcheck(torch.ops.beit_kernels.attention_fwd.default, (q, k, v, bias, 0.25))
    o, lse = torch.ops.beit_kernels.attention_fwd(q, k, v, bias, 0.25)
    torch.library.opcheck(torch.ops.beit_kernels.attention_bwd.default, (do, q, k, v, bias, o, lse, 0.25, True))
    qkv = torch.stack((q, k, v), 2).transpose(1, 3).contiguous()  # [B, H, 3, N, D] -> [B, N, 3, H, D]
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    o, lse = torch.ops.beit_kernels.attention_fwd(q, k, v, bias, 0.25)
    torch.library.opcheck(torch.ops.beit_kernels.attention_bwd_packed.default, (do, qkv, bias, o, lse, 0.25, True))


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _qkv(shape=(2, 2, 7, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(3)]


def test_bad_inputs_are_refused_before_launch():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="one dtype"):
        beit_kernels.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="not supported"):
        beit_kernels.attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        beit_kernels.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="one shape"):
        beit_kernels.attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="one device"):
        beit_kernels.attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="does not broadcast"):
        beit_kernels.attention(q, k, v, torch.randn(3, 7, 7, device=DEVICE))
    with pytest.raises(ValueError, match="does not broadcast"):
        beit_kernels.attention(q, k, v, torch.randn(2, 7, 8, device=DEVICE))
    with pytest.raises(TypeError, match="bias dtype"):
        beit_kernels.attention(q, k, v, torch.zeros(2, 7, 7, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="head dimension 300"):
        beit_kernels.attention(*_qkv((1, 1, 3, 300)))
    t = torch.randn(2, 2, 16, 7, device=DEVICE).transpose(-1, -2)  # last dimension strided
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        beit_kernels.attention(t, t, t)
    with pytest.raises(TypeError, match="torch.Tensor"):
        beit_kernels.attention(q, k, v, bias=[[0.0]])


# ---------------------------------------------------------------------------------------------------------------
# GPU: bf16 and real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [12, 16])
@pytest.mark.parametrize("bias_kind", ["HNN", "BHNN"])
def test_gpu_real_shapes(dtype, heads, bias_kind):
    B, N, D = 8, 197, 64
    check(*make_inputs(B, heads, N, D, dtype, bias_shapes(B, heads, N)[bias_kind]))


def test_all_queries_default_is_sm90_only_and_scales_its_groups(monkeypatch, tuned):
    tuned({"attention.dkdv_all_queries": None})
    all_queries = tuning.attention_all_queries
    assert not all_queries(197, 64, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert all_queries(197, 64, torch.bfloat16, torch.device("cuda"))
    assert not all_queries(197, 64, torch.float32, torch.device("cuda"))
    assert not all_queries(257, 64, torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not all_queries(197, 64, torch.bfloat16, torch.device("cuda"))
    # Groups scale on top of the fill, within B // 2.
    assert _num_groups(256, 12, 13, torch.device("cpu"), True, scale=4) == 8
    assert _num_groups(6, 12, 13, torch.device("cpu"), True, scale=4) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["all_queries", "dkdv", "fused", "fused_t"])
@pytest.mark.parametrize("bias_kind", ["HNN", "BHNN"])
def test_gpu_backward_kernels_real_shape(tuned, bias_kind, kernel):
    """Every backward (the all-queries dk/dv kernel is the default on sm90, the other elsewhere; the fused one, with
    dk and dv as plain or transposed products, is off by default), compiled for this GPU, at BEiT-B's shape in
    bf16."""
    fused = kernel.startswith("fused")
    if fused and tuning.shared_memory(DEVICE) < 160 * 1024:
        pytest.skip("the fused backward needs 160 KiB of shared memory a block")
    tuned({"attention.dkdv_all_queries": kernel == "all_queries", "attention.bwd_fused": fused})
    _set_dkdv_t(tuned, kernel == "fused_t")
    B, H, N, D = 8, 12, 197, 64
    assert tuning.attention_all_queries(N, D, torch.bfloat16, DEVICE) == (kernel == "all_queries")
    assert tuning.attention_fused(N, D, torch.bfloat16, DEVICE) == fused
    check(*make_inputs(B, H, N, D, torch.bfloat16, bias_shapes(B, H, N)[bias_kind]))


@pytest.mark.gpu
def test_gpu_qkvpacked_bf16_equals_split():
    B, N, H, D = 8, 197, 12, 64
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    bias = torch.randn(H, N, N, generator=g).to(DEVICE).requires_grad_()
    do = torch.randn(B, N, H, D, generator=g).to(DEVICE, torch.bfloat16)
    out = beit_kernels.attention_qkvpacked(qkv, bias)
    out.backward(do)
    dqkv, dbias = qkv.grad, bias.grad
    qkv.grad = bias.grad = None
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out2 = beit_kernels.attention(q, k, v, bias).transpose(1, 2)
    out2.backward(do)
    assert torch.equal(out, out2) and torch.equal(dqkv, qkv.grad) and torch.equal(dbias, bias.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("N,D", [(577, 64), (50, 128), (197, 32)])
def test_gpu_other_lengths_and_head_dims(N, D):
    check(*make_inputs(4, 6, N, D, torch.bfloat16, (6, N, N)))


@pytest.mark.gpu
def test_gpu_broadcast_bias_gradient_allocates_no_batch_sized_buffer():
    B, H, N, D = 64, 12, 197, 64
    q, k, v, bias, do = make_inputs(B, H, N, D, torch.bfloat16, (H, N, N))
    out = beit_kernels.attention(q, k, v, bias)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    # autograd.grad, not backward: .grad accumulation may copy dq, dk, dv into q's layout, which is not ours to count.
    grads = torch.autograd.grad(out, (q, k, v, bias), do)
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - base
    outputs = 3 * q.numel() * q.element_size()  # dq, dk, dv: half the size of a [B, H, N, N] fp32 buffer already
    full_fp32_bias = B * H * N * N * 4
    extra = added - outputs
    assert extra < full_fp32_bias / 2, f"backward added {extra / 2**20:.1f} MiB besides dq, dk, dv"
    assert grads[3].shape == bias.shape


@pytest.mark.parametrize(
    "bias_shape",
    [(7,), (1,), (7, 7), (1, 7), (7, 1), (2, 7, 7), (1, 7, 7), (3, 2, 7, 7), (1, 1, 1, 1), (3, 1, 7, 1), (0, 7),
     (2, 1), (7, 2), (3, 7, 7), (4, 2, 7, 7), (3, 2, 7, 7, 1), (2, 7, 8), (0,), ()],
)  # fmt: skip
def test_bias_shape_check_agrees_with_broadcast_shapes(bias_shape):
    """The validation's own broadcast check accepts a bias exactly when torch.broadcast_shapes gives [B, H, N, N]."""
    from beit_kernels.attention import _validate

    q = torch.zeros(3, 2, 7, 16, device=DEVICE)
    bias = torch.zeros(bias_shape, device=DEVICE)
    try:
        ok = torch.broadcast_shapes(bias_shape, tuple(q.shape[:3]) + (7,)) == (3, 2, 7, 7)
    except RuntimeError:
        ok = False
    if ok:
        _validate(q, q, q, bias)
    else:
        with pytest.raises(ValueError, match="does not broadcast|more than 4 dimensions"):
            _validate(q, q, q, bias)
