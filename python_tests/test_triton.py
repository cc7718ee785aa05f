"""The Triton kernels against the float64 reference, run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be set before the kernels are defined (scripts/test.sh sets it; this module sets it
too when it is unset). Where the kernels were already compiled for a GPU (a CUDA machine with the variable
unset imports them with ``quantkernels``), the same tests run on CUDA tensors instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed: the GPU kernels cannot run")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from quantkernels import reference  # noqa: E402
from quantkernels.formats import quantize_activation_per_token, quantize_weight  # noqa: E402
from quantkernels.testing import (  # noqa: E402
    INTERPRETER_BFLOAT16_SCALE, assert_close_to_reference, conv2d_bound, linear_bound)
from quantkernels.triton import configs  # noqa: E402
from quantkernels.triton.activations import quantize_rows  # noqa: E402
from quantkernels.triton.conv2d import conv2d, plan_conv2d  # noqa: E402
from quantkernels.triton.linear import linear, linear_kernel, plan_linear  # noqa: E402
from test_conv2d import CASES as CONV_CASES  # noqa: E402

# The interpreter is slow: one case per kind of geometry (1x1, 3x3, 5x5, ragged 3x1, groups, depthwise + stride).
TRITON_CONV_CASES = ["3x3", "1x1", "5x5", "7x7_groups2", "3x1_groups2", "depthwise_stride2"]
from test_op_contract import bad_linear_cases  # noqa: E402

INTERPRETED = isinstance(linear_kernel, InterpretedFunction)
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("the Triton kernels were compiled for a GPU (TRITON_INTERPRET unset before they were imported) "
                "and there is no GPU to run them", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@triton.jit
def _dot_probe_kernel(a_ptr, b_ptr, c_ptr):
    offs = tl.arange(0, 16)
    tile = offs[:, None] * 16 + offs[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


def _bfloat16_dot_is_right() -> bool:
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    _dot_probe_kernel[(1,)](a, b, c)
    return torch.allclose(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def exact_bfloat16_dot_in_interpreter():
    """Triton 3.9's interpreter stores bfloat16 as uint16 and its ``create_dot`` multiplies those bit patterns
    as integers, so every ``tl.dot`` on bfloat16 tiles returns garbage there (float16, float32 and int8 are
    right). Where the probe shows this, dot operands are widened to float32 first: exactly what the GPU's
    MMA computes (bfloat16 products are exact in float32, accumulated in float32). The kernels are unchanged;
    the bfloat16 MMA they compile to is checked in test_triton_compile.py."""
    if not INTERPRETED or _bfloat16_dot_is_right():
        yield
        return
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    assert _bfloat16_dot_is_right()
    yield
    builder.create_dot = original


def check_linear(bits, act_int8, x, qw, bias):
    """Runs the Triton linear on DEVICE and compares it with the reference on the CPU."""
    on = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    out = linear(bits, act_int8, on(x), on(qw.qdata), on(qw.scale), on(qw.zero_point), on(bias)).cpu()
    want = reference.linear(bits, x.double(), qw.qdata, qw.scale, qw.zero_point, bias, act_int8)
    bound = linear_bound(bits, x, qw.qdata, qw.scale, qw.zero_point, bias, act_int8)
    assert_close_to_reference(out, want, bound, x.dtype, act_int8, tolerance_scale(x.dtype))
    return out


def tolerance_scale(dtype) -> float:
    return INTERPRETER_BFLOAT16_SCALE if INTERPRETED and dtype == torch.bfloat16 else 1.0


# Every group size, symmetric and asymmetric; per-channel int8 K is not a power of two.
WEIGHTS = [(8, None, True), (8, 64, True), (4, None, True), (4, None, False), (4, 32, False), (4, 64, True),
           (4, 128, False), (4, 256, True)]
# The smallest problem, then one shape per kernel family (M = 1 GEMV, 2..16 skinny, 17..64, > 64 GEMM with M
# over two row tiles); N and K are not multiples of any block; K = 1000 at M = 1 splits K over several
# programs. The GEMM shape is slow to interpret, so it runs one weight of each kind.
SHAPES = [(1, 1, 1), (1, 33, 100), (1, 20, 1000), (7, 40, 300), (40, 24, 200)]
GEMM_SHAPE = (130, 20, 96)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", WEIGHTS)
def test_linear_matches_reference(bits, group_size, symmetric, act_int8, m, n, k, rng):
    x = torch.randn(m, k, generator=rng)
    qw = quantize_weight(torch.randn(n, k, generator=rng), bits=bits, group_size=group_size, symmetric=symmetric)
    bias = torch.randn(n, generator=rng) if (m + n + bits) % 2 else None
    check_linear(bits, act_int8, x, qw, bias)


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, False), (4, 128, True)])
def test_linear_gemm_matches_reference(bits, group_size, symmetric, act_int8, rng):
    m, n, k = GEMM_SHAPE
    x = torch.randn(m, k, generator=rng)
    qw = quantize_weight(torch.randn(n, k, generator=rng), bits=bits, group_size=group_size, symmetric=symmetric)
    check_linear(bits, act_int8, x, qw, torch.randn(n, generator=rng) if bits == 4 else None)


def test_shapes_cover_every_family_and_split_k():
    used = set()
    for m, n, k in SHAPES + [GEMM_SHAPE]:
        qw = quantize_weight(torch.randn(n, k), bits=4, group_size=32)
        _, launches = plan_linear(4, False, torch.randn(m, k), qw.qdata, qw.scale, None, None)
        used.add((launches[0].args["BLOCK_M"], launches[0].grid[1] > 1))
    assert {c.block_m for _, c in configs.LINEAR_CONFIGS} == {block_m for block_m, _ in used}
    assert (1, True) in used and (16, True) in used  # split-K at both small-M families


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, False), (8, None, True)])
@pytest.mark.parametrize("batch", [(1,), (7,), (2, 20)], ids=["M=1", "M=7", "M=40 3-D"])
def test_linear_dtypes_and_batched_inputs(dtype, act_int8, bits, group_size, symmetric, batch, rng):
    x = torch.randn(*batch, 384, generator=rng).to(dtype)
    qw = quantize_weight(torch.randn(70, 384, generator=rng), bits=bits, group_size=group_size, symmetric=symmetric)
    out = check_linear(bits, act_int8, x, qw, torch.randn(70, generator=rng).to(dtype))
    assert out.shape == batch + (70,)


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("m", [1, 12, 80])
def test_linear_non_contiguous_input(act_int8, m, rng):
    x = torch.randn(256, m, generator=rng).T[:, ::2]  # (m, 128) with strides (1, 2m)
    assert not x.is_contiguous()
    qw = quantize_weight(torch.randn(20, 128, generator=rng), bits=4, group_size=64)
    check_linear(4, act_int8, x, qw, None)


@pytest.mark.parametrize("act_int8", [False, True])
def test_linear_empty_batch(act_int8):
    qw = quantize_weight(torch.randn(20, 64), bits=4, group_size=32)
    out = linear(4, act_int8, torch.randn(0, 64, device=DEVICE), qw.qdata.to(DEVICE), qw.scale.to(DEVICE))
    assert out.shape == (0, 20)


# NaN and Inf inputs on purpose: numpy, running the interpreted kernels, warns about them.
NONFINITE_INPUTS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@NONFINITE_INPUTS
@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("m", [3, 20])
def test_linear_nan_propagates_per_row(act_int8, m, rng):
    x = torch.randn(m, 64, generator=rng)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    qw = quantize_weight(torch.randn(8, 64, generator=rng), bits=4, group_size=32)
    out = linear(4, act_int8, x.to(DEVICE), qw.qdata.to(DEVICE), qw.scale.to(DEVICE)).cpu()
    assert out[1].isnan().all() and torch.isfinite(out[[0] + list(range(3, m))]).all()
    assert not torch.isfinite(out[2]).any()  # Inf times weights of both signs: Inf and NaN


@pytest.mark.parametrize("case", bad_linear_cases(), ids=lambda c: c[0])
def test_linear_rejects_bad_input_like_the_cpu_kernel(case):
    _, args, exc, message = case
    with pytest.raises(exc) as info:
        linear(4, False, *args)
    assert message in str(info.value)


@NONFINITE_INPUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantized_activation_integers_match_the_reference(dtype, rng):
    x = torch.randn(6, 300, generator=rng).to(dtype)
    x[1] = 0.0  # all-zero row: scale 0, codes 0
    x[2, :9] = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 126.5])  # scale 1: ties to even
    x[2, 9:] = 0.25
    x[3, 5] = float("nan")
    x[4, 6] = float("-inf")
    xq = torch.empty(6, 300, dtype=torch.int8, device=DEVICE)
    xs = torch.empty(6, device=DEVICE)
    for launch in quantize_rows(x.to(DEVICE), xq, xs, 6, 300, x.stride(0), x.stride(1)):
        launch()
    xq, xs = xq.cpu(), xs.cpu()
    want_q, want_s = quantize_activation_per_token(x)
    finite = [0, 1, 2, 5]
    assert torch.equal(xq[finite].float(), want_q[finite]) and torch.equal(xs[finite], want_s[finite, 0])
    assert xq[2, :9].tolist() == [127, 2, 4, -2, -4, 0, 0, 2, 126]
    assert xs[[3, 4]].isnan().all() and (xq[[3, 4]] == 0).all()


@NONFINITE_INPUTS
def test_quantized_activation_rows_longer_than_a_chunk(rng):
    """A row spans several programs (configs.QUANTIZE_CHUNK elements each): its scale comes from the largest
    |x| in any chunk, here the last, partial one, and a NaN in one chunk zeroes the whole row."""
    row_len = 2 * configs.QUANTIZE_CHUNK + 77
    x = torch.randn(3, row_len, generator=rng)
    x[0, -3] = 9.0
    x[1, configs.QUANTIZE_CHUNK + 5] = float("nan")
    xq = torch.full((3, row_len), 99, dtype=torch.int8, device=DEVICE)
    xs = torch.full((3,), -1.0, device=DEVICE)
    for launch in quantize_rows(x.to(DEVICE), xq, xs, 3, row_len, x.stride(0), x.stride(1)):
        launch()
    xq, xs = xq.cpu(), xs.cpu()
    want_q, want_s = quantize_activation_per_token(x[[0, 2]])
    assert xs[0] == 9.0 / 127
    assert torch.equal(xq[[0, 2]].float(), want_q) and torch.equal(xs[[0, 2]], want_s[:, 0])
    assert xs[1].isnan() and (xq[1] == 0).all()


@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, None, False), (4, 32, True)])
@pytest.mark.parametrize("name", TRITON_CONV_CASES)
def test_conv2d_matches_reference(bits, group_size, symmetric, act_int8, name, rng):
    b, cin, cout, (h, w), kernel, stride, padding, dilation, groups = CONV_CASES[name]
    x = torch.randn(b, cin, h, w, generator=rng)
    qw = quantize_weight(torch.randn(cout, cin // groups, *kernel, generator=rng), bits=bits,
                         group_size=group_size, symmetric=symmetric)
    bias = torch.randn(cout, generator=rng) if b % 2 else None
    check_conv2d(bits, x, qw, bias, kernel, stride, padding, dilation, groups, act_int8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act_int8", [False, True])
def test_conv2d_dtypes_and_memory_format(dtype, channels_last, act_int8, rng):
    x = torch.randn(2, 8, 9, 9, generator=rng).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    qw = quantize_weight(torch.randn(16, 8, 3, 3, generator=rng), bits=4, group_size=32, symmetric=False)
    out = check_conv2d(4, x, qw, torch.randn(16, generator=rng), (3, 3), (1, 1), (1, 1), (1, 1), 1, act_int8)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


# Per-channel weights with at least configs.TAP_MAJOR_MIN_CHANNELS channels per group: K walked tap by tap (80
# channels: a full 64-channel tile and a ragged one) for int8 weights and 16-bit or int8 activations;
# channels_last 1x1 with float activations runs linear's kernel.
MANY_CHANNEL_CASES = {
    # name: (cin, cout, kernel, stride, padding, dilation, groups)
    "3x3": (80, 20, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "1x1": (80, 20, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "3x2_strided_dilated": (80, 20, (3, 2), (2, 1), (1, 0), (2, 1), 1),
    "groups2": (48, 18, (3, 3), (1, 1), (1, 1), (1, 1), 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False), (4, True)])
@pytest.mark.parametrize("name", MANY_CHANNEL_CASES)
def test_conv2d_per_channel_many_channels(name, bits, symmetric, act_int8, channels_last, dtype, rng):
    cin, cout, kernel, stride, padding, dilation, groups = MANY_CHANNEL_CASES[name]
    x = torch.randn(2, cin, 7, 9, generator=rng).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    qw = quantize_weight(torch.randn(cout, cin // groups, *kernel, generator=rng), bits=bits, symmetric=symmetric)
    bias = torch.randn(cout, generator=rng)
    args = (list(kernel), list(stride), list(padding), list(dilation), groups, act_int8)
    _, launches = plan_conv2d(bits, x, qw.qdata, qw.scale, qw.zero_point, bias, *args)
    as_gemm = name == "1x1" and channels_last and not act_int8
    assert [launch.kernel.__name__ for launch in launches][-1] == ("linear_kernel" if as_gemm else "conv2d_kernel")
    assert as_gemm or launches[-1].args["TAP_MAJOR"] == (bits == 8 and (act_int8 or dtype != torch.float32)
                                                          and launches[-1].args["BLOCK_M"] != 64)
    check_conv2d(bits, x, qw, bias, kernel, stride, padding, dilation, groups, act_int8)


def check_conv2d(bits, x, qw, bias, kernel, stride, padding, dilation, groups, act_int8):
    on = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    args = (list(kernel), list(stride), list(padding), list(dilation), groups, act_int8)
    out = conv2d(bits, on(x), on(qw.qdata), on(qw.scale), on(qw.zero_point), on(bias), *args).cpu()
    want = reference.conv2d(bits, x.double(), qw.qdata, qw.scale, qw.zero_point, bias, *args)
    bound = conv2d_bound(bits, x, qw.qdata, qw.scale, qw.zero_point, bias, *args)
    assert_close_to_reference(out, want, bound, x.dtype, act_int8, tolerance_scale(x.dtype))
    return out


def test_conv2d_rejects_bad_input_like_the_cpu_kernel():
    qw = quantize_weight(torch.randn(8, 4, 3, 3), bits=8)
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="groups: got 3"):
        conv2d(8, x, qw.qdata, qw.scale, None, None, [3, 3], [1, 1], [0, 0], [1, 1], 3, False)
    with pytest.raises(ValueError, match="too small for kernel_size"):
        conv2d(8, x[..., :2, :2], qw.qdata, qw.scale, None, None, [3, 3], [1, 1], [0, 0], [1, 1], 2, False)


# torch.compile traces through the CUDA registration. Needs compiled (not interpreted) kernels, so it runs in a
# subprocess without TRITON_INTERPRET; fake CUDA tensors stand in for a GPU (tracing never launches anything).
TRACE_SCRIPT = r"""
import torch, quantkernels
import quantkernels.triton.register
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from quantkernels.formats import quantize_weight
from quantkernels.ops import ALL_OPS

assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"quant::{name}", "CUDA") for name in ALL_OPS)

def linear_then_conv(x, q, s, z, img, qc, sc):
    y = torch.ops.quant.linear_int4(x, q, s, z, None).relu()
    c = torch.ops.quant.conv2d_int8(img, qc, sc, None, [3, 3], [1, 1], [1, 1], [1, 1], 1, True)
    return y, c

q4 = quantize_weight(torch.randn(64, 96), bits=4, group_size=32, symmetric=False)
q8 = quantize_weight(torch.randn(8, 3, 3, 3), bits=8)
cpu_args = (torch.randn(4, 96), q4.qdata, q4.scale, q4.zero_point, torch.randn(2, 3, 8, 8), q8.qdata, q8.scale)
graphs = []
def keep_graph(gm, inputs):
    graphs.append(gm)
    return gm

# CPU inputs keep the opaque op and its C++ kernel, compiled or not.
compiled = torch.compile(linear_then_conv, fullgraph=True, backend="aot_eager")(*cpu_args)
for a, b in zip(compiled, linear_then_conv(*cpu_args)):
    torch.testing.assert_close(a, b, rtol=0, atol=0)

with FakeTensorMode() as mode:
    cuda_args = [torch.empty(a.shape, dtype=a.dtype, device="cuda") for a in cpu_args]
    try:
        aot_function(linear_then_conv, fw_compiler=keep_graph)(*cuda_args)
    except RuntimeError as error:  # running the traced graph needs a CUDA build of torch; tracing did not
        assert "cuda" in str(error).lower(), error
names = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
kernels = [node.kwargs["kernel_idx"] for node in graphs[0].graph.nodes
           if "triton_kernel_wrapper_functional" in str(node.target)]
assert not any(name.startswith("quant.") for name in names), names
print(len(kernels))
"""


@pytest.mark.skipif(not INTERPRETED, reason="covered by running the ops on the GPU")
def test_compile_traces_through_the_triton_kernels():
    """Under AOTAutograd (what torch.compile runs) a CUDA call becomes the Triton launches themselves:
    linear_int4 at M=4 is a split-K kernel and its reduce, conv2d_int8 with int8 activations two quantize
    launches (chunk maxima, codes) and the conv kernel. CPU calls keep the op."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-1] == "5"
