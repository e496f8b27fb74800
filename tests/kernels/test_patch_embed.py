"""patch_embed: the fused Triton patch embedding against its float64 reference (outputs and every gradient)."""

import importlib

import pytest
import torch
from _testutil import DEVICE, assert_bitwise_reproducible, check_close, max_err, no_host_sync

import beit_kernels
from beit_kernels import reference

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """fp32 is held to 1e-5 of float64; the kernel's fp32 GEMMs follow cuDNN's TF32 switch, as Conv2d does, and
    that is on by default, which would put them at 1e-3 on a GPU."""
    with torch.backends.cudnn.flags(allow_tf32=False):
        yield


def make_inputs(B, H, W, p, D, *, uint8, cls=True, pos=True, mask_p=0.5, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    N = (H // p) * (W // p)
    if uint8:
        images = torch.randint(0, 256, (B, H, W, 3), dtype=torch.uint8, generator=g)
    else:
        images = torch.randn(B, 3, H, W, dtype=torch.float64, generator=g)
    params = {
        "weight": torch.randn(D, 3, p, p, dtype=torch.float64, generator=g) * 0.05,
        "bias": torch.randn(D, dtype=torch.float64, generator=g),
        "mask_token": torch.randn(1, 1, D, dtype=torch.float64, generator=g),
        "cls_token": torch.randn(1, 1, D, dtype=torch.float64, generator=g) if cls else None,
        "pos_embed": torch.randn(1, N + int(cls), D, dtype=torch.float64, generator=g) if pos else None,
    }
    mask = torch.rand(B, N, generator=g) < mask_p
    return images.to(device), mask.to(device), {k: v.to(device) if v is not None else None for k, v in params.items()}


def cast(params, dtype=torch.float32, grad=False):
    return {k: v.detach().to(dtype).requires_grad_(grad) if v is not None else None for k, v in params.items()}


def embed(fn, images, mask, p, **kw):
    """``fn`` (the kernel or its reference) with every parameter of the dict ``p``."""
    return fn(images, p["weight"], p["bias"], mask=mask, mask_token=p["mask_token"], cls_token=p["cls_token"],
              pos_embed=p["pos_embed"], **kw)  # fmt: skip


def run(fn, images, mask, params, dtype, grad_out, norm):
    """Output and gradients of ``fn`` with the parameters (and float images) cast to ``dtype``."""
    leaves = {k: v.detach().to(dtype).requires_grad_() if v is not None else None for k, v in params.items()}
    imgs = images if images.dtype == torch.uint8 else images.to(dtype)
    kw = dict(mean=MEAN, std=STD) if norm else {}
    out = embed(fn, imgs, mask, leaves, **kw)
    out.backward(grad_out.to(out.dtype))
    grads = {k: v.grad for k, v in leaves.items() if v is not None and v.grad is not None}
    return out, grads


CASES = [
    # B, H, W, p, D, uint8, cls, pos, norm
    (3, 48, 32, 16, 40, True, True, True, True),  # the odd shape of the issue, from DALI-style uint8
    (3, 48, 32, 16, 40, False, True, True, False),  # float images, already normalised
    (2, 24, 40, 8, 24, False, False, False, True),  # no cls, no pos, normalisation fused on float input
    (1, 16, 16, 16, 130, True, True, False, False),  # D over one output block, one patch
]


@pytest.mark.parametrize("weight_grad", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,W,p,D,uint8,cls,pos,norm", CASES)
def test_patch_embed_matches_reference(tuned, dtype, B, H, W, p, D, uint8, cls, pos, norm, weight_grad):
    tuned({"patch_embed.bwd": {"weight_grad": weight_grad}})
    images, mask, params = make_inputs(B, H, W, p, D, uint8=uint8, cls=cls, pos=pos)
    N = (H // p) * (W // p)
    grad_out = torch.randn(B, N + int(cls), D, dtype=torch.float64).to(DEVICE)
    # The reference of the kernel's own inputs, in float64 (the fp16 parameters, upcast).
    rounded = {k: v.to(dtype).double() if v is not None else None for k, v in params.items()}
    imgs64 = images if uint8 else images.to(dtype).double()
    ref, ref_grads = run(reference.patch_embed, imgs64, mask, rounded, torch.float64, grad_out, norm)
    got, grads = run(beit_kernels.patch_embed, images, mask, params, dtype, grad_out, norm)
    base, base_grads = (
        (None, {})
        if dtype == torch.float32
        else run(reference.patch_embed, images, mask, params, dtype, grad_out, norm)
    )
    assert got.dtype == dtype
    check_close("out", got, ref, base, dtype)
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        check_close(f"grad {k}", grads[k], ref_grads[k], base_grads.get(k), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_forward_and_backward_are_bitwise_reproducible(dtype):
    """BEiT-B's embedding of 3 uint8 images at 224 px (197 tokens) on a GPU, 6 patches in the interpreter (for
    time): the weight, bias and token gradients' partial sums are added in a fixed order, so two runs agree bit for
    bit."""
    H, W, D = (224, 224, 768) if DEVICE.type == "cuda" else (48, 32, 40)
    images, mask, params = make_inputs(3, H, W, 16, D, uint8=True, seed=4)
    grad_out = torch.randn(3, (H // 16) * (W // 16) + 1, D, dtype=torch.float64).to(DEVICE)

    def step():
        out, grads = run(beit_kernels.patch_embed, images, mask, params, dtype, grad_out, True)
        return [out.detach(), *(grads[k] for k in params)]

    assert_bitwise_reproducible(step, ("out", *(f"grad {k}" for k in params)))


def test_blend_is_exact_on_masked_rows():
    images, mask, params = make_inputs(3, 48, 32, 16, 40, uint8=True, pos=False)
    p = cast(params)
    out = beit_kernels.patch_embed(
        images, p["weight"], p["bias"], mask=mask, mask_token=p["mask_token"], cls_token=p["cls_token"]
    )
    patches = out[:, 1:]  # [B, N, D]
    assert torch.equal(patches[mask], p["mask_token"].reshape(1, -1).expand(int(mask.sum()), -1))
    assert torch.equal(out[:, 0], p["cls_token"].reshape(1, -1).expand(3, -1))


@pytest.mark.parametrize("mask_kind", ["none_masked", "all_masked", "no_mask"])
def test_mask_extremes(mask_kind):
    images, mask, params = make_inputs(
        3, 48, 32, 16, 40, uint8=False, mask_p=0.0 if mask_kind == "none_masked" else 1.0
    )
    use_mask = mask if mask_kind != "no_mask" else None
    grad_out = torch.randn(3, 7, 40, dtype=torch.float64).to(DEVICE)

    def fn(impl):
        def call(images, weight, bias, *, mask, mask_token, cls_token, pos_embed):
            return impl(
                images,
                weight,
                bias,
                mask=use_mask,
                mask_token=mask_token if use_mask is not None else None,
                cls_token=cls_token,
                pos_embed=pos_embed,
            )

        return call

    ref, ref_grads = run(fn(reference.patch_embed), images, mask, params, torch.float64, grad_out, False)
    got, grads = run(fn(beit_kernels.patch_embed), images, mask, params, torch.float32, grad_out, False)
    check_close("out", got, ref, None, torch.float32)
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        check_close(k, grads[k], ref_grads[k], None, torch.float32)
    if mask_kind == "none_masked":
        assert torch.equal(grads["mask_token"], torch.zeros_like(grads["mask_token"]))
    if mask_kind == "all_masked":
        assert torch.equal(grads["weight"], torch.zeros_like(grads["weight"]))
        assert torch.equal(grads["bias"], torch.zeros_like(grads["bias"]))


def test_mask_in_grid_shape_and_strided_images():
    images, mask, params = make_inputs(2, 32, 48, 16, 24, uint8=False)
    p = cast(params)
    channels_last = images.float().contiguous(memory_format=torch.channels_last)
    kw = dict(mask_token=p["mask_token"], cls_token=p["cls_token"], pos_embed=p["pos_embed"])
    got = beit_kernels.patch_embed(channels_last, p["weight"], p["bias"], mask=mask.view(2, 2, 3), **kw)
    ref = reference.patch_embed(images, params["weight"], params["bias"], mask=mask, **{k: params[k] for k in kw})
    check_close("out", got, ref, None, torch.float32)
    strided_mask = torch.stack((mask, ~mask), dim=2)[:, :, 0]  # [B, N] with stride 2
    got = beit_kernels.patch_embed(images.float(), p["weight"], p["bias"], mask=strided_mask, **kw)
    check_close("out, strided mask", got, ref, None, torch.float32)


def test_autocast_output_dtype():
    images, mask, params = make_inputs(2, 32, 32, 16, 24, uint8=True)
    p = cast(params, grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out = embed(beit_kernels.patch_embed, images, mask, p, mean=MEAN, std=STD)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert p["weight"].grad.dtype == torch.float32 and torch.isfinite(p["weight"].grad).all()
    ref = embed(reference.patch_embed, images, mask, params, mean=MEAN, std=STD)
    assert max_err(out, ref) < 2e-2 * ref.abs().max().item()


def test_no_patch_buffer_is_saved():
    images, mask, params = make_inputs(2, 32, 32, 16, 24, uint8=True)
    p = cast(params, grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embed(beit_kernels.patch_embed, images, mask, p)
    K = 3 * 16 * 16
    assert all(K not in s for s in saved), saved  # only the images, weight and mask, never [B N, K] patches


def test_compiles_without_graph_break():
    images, mask, params = make_inputs(2, 32, 32, 16, 24, uint8=True)
    p = cast(params, grad=True)

    def step(images, mask):
        out = embed(beit_kernels.patch_embed, images, mask, p)
        return (out * out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(images, mask)
    loss.backward()
    grads = {k: v.grad.clone() for k, v in p.items()}
    for v in p.values():
        v.grad = None
    step(images, mask).backward()
    for k, v in p.items():
        torch.testing.assert_close(grads[k], v.grad, rtol=1e-5, atol=1e-6)


def test_opcheck_registrations():
    images, mask, params = make_inputs(1, 16, 32, 16, 24, uint8=True)
    p = cast(params)
    args = (
        images,
        p["weight"],
        p["bias"],
        mask,
        p["mask_token"].reshape(-1),
        p["cls_token"],
        p["pos_embed"],
        None,
        None,
        torch.float32,
    )
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.beit_kernels.patch_embed_fwd.default, args, test_utils=checks)
    grad_out = torch.randn(1, 3, 24).to(DEVICE)
    bwd_args = (grad_out, images, p["weight"], mask, None, None, True)
    torch.library.opcheck(torch.ops.beit_kernels.patch_embed_bwd.default, bwd_args, test_utils=checks)
    torch.library.opcheck(torch.ops.beit_kernels.patch_embed_bwd.default, (*bwd_args, "cublas"), test_utils=checks)
    with pytest.raises(ValueError, match="weight_grad must be"):
        torch.ops.beit_kernels.patch_embed_bwd(*bwd_args, "cudnn")


def test_weight_grad_choice_is_read_at_forward_time(monkeypatch, tuned):
    """The backward runs the weight-gradient GEMM chosen when its forward ran (a captured graph keeps it)."""
    pe = importlib.import_module("beit_kernels.patch_embed")
    images, mask, params = make_inputs(2, 32, 32, 16, 24, uint8=True)
    p = cast(params, grad=True)
    tuned({"patch_embed.bwd": {"weight_grad": "cublas"}})
    out = embed(beit_kernels.patch_embed, images, mask, p)
    called = []
    real = pe._weight_grads_cublas
    monkeypatch.setattr(pe, "_weight_grads_cublas", lambda *a: called.append(1) or real(*a))
    tuned({"patch_embed.bwd": {"weight_grad": "triton"}})
    out.sum().backward()
    assert called == [1]


def bad(**over):
    images, mask, params = make_inputs(2, 32, 32, 16, 24, uint8=True)
    kw = dict(
        images=images,
        weight=params["weight"].float(),
        bias=params["bias"].float(),
        mask=mask,
        mask_token=params["mask_token"].float(),
        cls_token=params["cls_token"].float(),
        pos_embed=params["pos_embed"].float(),
    )
    kw.update(over)
    images, weight, bias = kw.pop("images"), kw.pop("weight"), kw.pop("bias")
    return beit_kernels.patch_embed(images, weight, bias, **kw)


def zeros(*shape, **kw):
    return torch.zeros(*shape, device=DEVICE, **kw)


@pytest.mark.parametrize(
    "over,err,match",
    [
        (dict(images=zeros(2, 32, 32, dtype=torch.uint8)), ValueError, "4-D"),
        (dict(images=zeros(2, 3, 32, 32, dtype=torch.uint8)), ValueError, "channels-last"),
        (dict(images=zeros(2, 32, 32, 3)), ValueError, r"\[B, 3, H, W\]"),
        (dict(images=zeros(2, 3, 32, 32, dtype=torch.int32)), TypeError, "uint8 or float"),
        (dict(images=zeros(2, 40, 32, 3, dtype=torch.uint8)), ValueError, "multiple of the patch size"),
        (dict(weight=zeros(24, 3, 16, 8)), ValueError, r"\[D, 3, p, p\]"),
        (dict(weight=zeros(24, 3, 16, 16, dtype=torch.int64)), TypeError, "float"),
        (dict(bias=zeros(23)), ValueError, "bias must have shape"),
        (dict(mask=zeros(2, 5, dtype=torch.bool)), ValueError, "mask must be"),
        (dict(mask=zeros(2, 4)), TypeError, "torch.bool"),
        (dict(mask_token=None), ValueError, "mask needs mask_token"),
        (dict(pos_embed=zeros(1, 4, 24)), ValueError, "pos_embed must have shape"),
        (dict(cls_token=zeros(1, 2, 24)), ValueError, "cls_token must have shape"),
        (dict(mean=(0.0, 0.0, 0.0)), ValueError, "both mean and std"),
        (dict(mean=(0.0, 0.0), std=(1.0, 1.0)), ValueError, "3 per-channel"),
        (dict(mean=(0.0, 0.0, 0.0), std=(1.0, 0.0, 1.0)), ValueError, "non-zero"),
        (dict(mean="abc", std=(1.0, 1.0, 1.0)), ValueError, "3 per-channel"),
        (dict(images=zeros(2, 3, 32, 32, requires_grad=True)), ValueError, "must not require grad"),
    ],
)
def test_bad_inputs_raise_before_launch(over, err, match):
    with pytest.raises(err, match=match):
        bad(**over)


def test_mean_and_std_as_any_iterable_of_three():
    np = pytest.importorskip("numpy")
    as_tuple = bad(mean=(120.0, 110.0, 100.0), std=(60.0, 57.0, 58.0))
    as_array = bad(mean=np.array([120.0, 110.0, 100.0]), std=iter([60.0, 57.0, 58.0]))
    assert torch.equal(as_tuple, as_array)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at BEiT-B shapes, and no host synchronisation


@pytest.mark.gpu
@pytest.mark.parametrize("weight_grad", ["triton", "cublas"])
def test_gpu_bf16_beit_b_matches_reference(tuned, weight_grad):
    tuned({"patch_embed.bwd": {"weight_grad": weight_grad}})
    B, D = 64, 768
    images, mask, params = make_inputs(B, 224, 224, 16, D, uint8=True)
    grad_out = torch.randn(B, 197, D, dtype=torch.float64, device=DEVICE)
    rounded = {k: v.to(torch.bfloat16).double() if v is not None else None for k, v in params.items()}
    ref, ref_grads = run(reference.patch_embed, images, mask, rounded, torch.float64, grad_out, True)
    got, grads = run(beit_kernels.patch_embed, images, mask, params, torch.bfloat16, grad_out, True)
    base, base_grads = run(reference.patch_embed, images, mask, params, torch.bfloat16, grad_out, True)
    check_close("out", got, ref, base, torch.bfloat16)
    for k in ref_grads:
        check_close(f"grad {k}", grads[k], ref_grads[k], base_grads[k], torch.bfloat16)


@pytest.mark.gpu
def test_gpu_no_sync():
    images, mask, params = make_inputs(8, 224, 224, 16, 768, uint8=True)
    p = cast(params, grad=True)
    mean = torch.tensor(MEAN, device=DEVICE)
    std = torch.tensor(STD, device=DEVICE)
    with no_host_sync():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = embed(beit_kernels.patch_embed, images, mask, p, mean=mean, std=std)
        out.float().square().mean().backward()
    assert torch.isfinite(p["weight"].grad).all()
