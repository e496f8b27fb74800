"""beit_kernels.backend: which tensors and which Triton installs the kernels accept, refused before any launch, and
the device facts that size the kernels' tiles."""

from types import SimpleNamespace

import pytest
import torch

import beit_kernels
from beit_kernels import backend

X3 = torch.zeros(2, 5, 8)
V8 = torch.ones(8)
Q = torch.zeros(1, 2, 5, 16)

# Each public Triton op with the smallest valid CPU inputs.
OPS = {
    "attention": lambda: beit_kernels.attention(Q, Q, Q),
    "bias_gelu": lambda: beit_kernels.bias_gelu(X3, None),
    "add_layer_norm": lambda: beit_kernels.add_layer_norm(X3, X3, None, V8, V8),
    "masked_gather": lambda: beit_kernels.masked_gather(X3, torch.tensor([[0, 1], [2, -1]])),
    "patch_embed": lambda: beit_kernels.patch_embed(
        torch.zeros(2, 16, 16, 3, dtype=torch.uint8), torch.zeros(8, 3, 16, 16), None
    ),  # fmt: skip
    "linear_cross_entropy": lambda: beit_kernels.linear_cross_entropy(
        torch.zeros(4, 8), torch.zeros(10, 8), None, torch.tensor([0, 1, 2, 3])
    ),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch, op):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=f"{op}: the Triton kernel needs a CUDA tensor"):
        OPS[op]()


@pytest.mark.parametrize("op", sorted(OPS))
def test_an_interpreter_that_cannot_run_is_refused_before_launch(monkeypatch, op):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    monkeypatch.setattr(backend, "_interpreter_problem", lambda: "Triton 3.6.0's interpreter cannot run")
    with pytest.raises(RuntimeError, match=f"{op}: Triton 3.6.0's interpreter cannot run"):
        OPS[op]()


@pytest.mark.parametrize(
    "triton_version, numpy_version, broken",
    [
        ("3.6.0", "2.4.1", True),
        ("3.2.0", "2.4.0rc1", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.4.1", False),
        ("3.9.0+git1a2b3c", "2.4.6", False),
        ("3.6.0", "1.26.4", False),
    ],
)
def test_interpreter_problem(triton_version, numpy_version, broken):
    problem = backend.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert "numpy<2.4 or triton>=3.7" in problem and triton_version in problem


def test_the_installed_pair_runs():
    if torch.cuda.is_available():
        pytest.skip("the interpreter is not used")
    assert backend._interpreter_problem() is None
    assert beit_kernels.bias_gelu(X3 + 1.0, None).shape == X3.shape


@pytest.mark.parametrize(
    "props, kib",
    [
        (SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=101376), 99),  # what torch reports wins
        (SimpleNamespace(major=9, minor=0), 227),  # a torch without the field: the capability table
        (SimpleNamespace(major=8, minor=0), 163),
        (SimpleNamespace(major=8, minor=9), 99),
        (SimpleNamespace(major=12, minor=0), 99),
        (SimpleNamespace(major=11, minor=0), 99),  # unknown: the smallest of the family
        (SimpleNamespace(major=7, minor=0), 96),  # V100
        (SimpleNamespace(major=7, minor=5), 64),  # T4
        (SimpleNamespace(major=6, minor=1), 48),  # unknown before sm80: what any block has
    ],
)
def test_block_shared_memory(monkeypatch, props, kib):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert backend.block_shared_memory(torch.device("cuda", 0)) == kib * 1024


def test_block_shared_memory_is_unbounded_for_the_interpreter():
    assert backend.block_shared_memory(torch.device("cpu")) >= 1 << 30


@pytest.mark.parametrize("major,native", [(7, False), (8, True), (9, True)])
def test_native_bf16_goes_by_compute_capability_not_emulation(monkeypatch, major, native):
    """torch.cuda.is_bf16_supported() says True on a V100 or T4 (it only allocates a bf16 tensor)."""
    from beit_kernels.backend import native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert native_bf16("cuda") is native and native_bf16(torch.device("cuda", 0)) is native
    assert native_bf16("cpu") is False


def test_env_switch_parses_one_zero_and_unset(monkeypatch):
    from beit_kernels.backend import env_switch

    for value, expected in (("1", True), ("0", False), ("", None)):
        monkeypatch.setenv("BEIT_KERNELS_TEST_SWITCH", value)
        assert env_switch("BEIT_KERNELS_TEST_SWITCH") is expected
    monkeypatch.delenv("BEIT_KERNELS_TEST_SWITCH")
    assert env_switch("BEIT_KERNELS_TEST_SWITCH") is None
    monkeypatch.setenv("BEIT_KERNELS_TEST_SWITCH", "yes")
    with pytest.raises(ValueError, match="BEIT_KERNELS_TEST_SWITCH must be 0 or 1, got 'yes'"):
        env_switch("BEIT_KERNELS_TEST_SWITCH")


BF16_OPS = {
    "attention": lambda: beit_kernels.attention(*(Q.bfloat16(),) * 3),
    "attention_qkvpacked": lambda: beit_kernels.attention_qkvpacked(torch.zeros(1, 5, 3, 2, 16, dtype=torch.bfloat16)),
    "patch_embed (bf16 images)": lambda: beit_kernels.patch_embed(
        torch.zeros(2, 3, 16, 16, dtype=torch.bfloat16), torch.zeros(8, 3, 16, 16), None
    ),  # fmt: skip
    "patch_embed (bf16 autocast)": lambda: _under_bf16_autocast(
        lambda: beit_kernels.patch_embed(torch.zeros(2, 3, 16, 16), torch.zeros(8, 3, 16, 16), None)
    ),
}


def _under_bf16_autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


@pytest.mark.parametrize("case", sorted(BF16_OPS))
def test_bf16_in_the_interpreter_is_refused_for_the_dot_kernels(case):
    """The interpreter's bf16 tl.dot multiplies bit patterns: the ops whose kernels use it refuse bf16 on the CPU
    with the alternatives, instead of returning garbage (errors of 1e11 were seen)."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter")
    op = case.split(" ")[0].replace("_qkvpacked", "")
    with pytest.raises(ValueError, match=f"{op}: bfloat16 is not computed correctly by Triton's CPU interpreter"):
        BF16_OPS[case]()


@pytest.mark.parametrize("n", [*range(0, 70), 127, 128, 129, 768, 3072, 8192, 65535, 65536, 65537, 2**40 + 1])
def test_host_cdiv_and_next_power_of_2_match_triton(n):
    import triton

    assert backend.next_power_of_2(n) == triton.next_power_of_2(n)
    for d in (1, 2, 3, 16, 64, 128):
        assert backend.cdiv(n, d) == triton.cdiv(n, d)


class _Op:
    """Stands for a torch.library custom op: records that the dispatcher was asked."""

    _qualname = "beit_kernels::stand_in"

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return "op"


def _impl(*args):
    return "impl"


def test_call_op_calls_the_launcher_directly_in_eager_mode():
    x = torch.zeros(3)
    w = torch.nn.Parameter(torch.zeros(3))
    op = _Op()
    with torch.no_grad():  # as inside an autograd.Function's forward and backward
        assert backend.call_op(op, _impl, x, w, None, 1.0, True) == "impl"
    assert backend.call_op(op, _impl, x, w.detach()) == "impl"  # nothing for autograd to record
    # Under the profiler the direct call is recorded under the op's name.
    from torch.profiler import profile

    with profile() as prof:
        backend.call_op(op, _impl, x)
    assert "beit_kernels::stand_in" in {e.key for e in prof.key_averages()}
    assert op.calls == 0


def test_call_op_goes_through_the_dispatcher_where_it_matters(monkeypatch):
    from torch._subclasses import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.zeros(3)
    op = _Op()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    with Mode():
        assert backend.call_op(op, _impl, x) == "op"  # a dispatch mode sees the op
    with FakeTensorMode():
        assert backend.call_op(op, _impl, x) == "op"
    assert backend.call_op(op, _impl, torch.zeros(3, device="meta")) == "op"
    assert backend.call_op(op, _impl, x.as_subclass(Sub)) == "op"
    # Autograd would record the launcher's own ops: a backward with create_graph=True.
    assert backend.call_op(op, _impl, torch.zeros(3, requires_grad=True)) == "op"
    with torch.no_grad():
        assert backend.call_op(op, _impl, torch.zeros(3, requires_grad=True)) == "impl"
    with torch.device("cpu"):  # a torch function mode
        assert backend.call_op(op, _impl, x) == "op"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backend.call_op(op, _impl, x) == "op"
    assert op.calls == 7


def test_the_direct_call_and_the_custom_op_agree():
    import importlib

    mg = importlib.import_module("beit_kernels.masked_gather")  # the module (the package exports the function)
    x = torch.randn(2, 7, 24)
    index = torch.tensor([[3, 5, -1], [1, 2, 6]])
    w, b = torch.randn(24), torch.randn(24)
    op = mg.masked_gather_fwd(x, index, w, b, 1e-6, True)
    direct = mg._masked_gather_fwd(x, index, w, b, 1e-6, True)
    for a, d in zip(op, direct):
        assert torch.equal(a, d)
