"""The op namespace as a contract: every op has a fake, passes opcheck, compiles, exports and rejects bad input."""

import pytest
import torch

import quantkernels
from quantkernels import ops
from quantkernels.formats import quantize_weight


def linear_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 96, generator=g)
    bias = torch.randn(40, generator=g)
    q8 = quantize_weight(torch.randn(40, 96, generator=g), bits=8)
    q4 = quantize_weight(torch.randn(40, 96, generator=g), bits=4, group_size=32, symmetric=False)
    q4s = quantize_weight(torch.randn(40, 96, generator=g), bits=4, group_size=32)
    return {
        "linear_int8": [(x, q8.qdata, q8.scale, bias), (x[0], q8.qdata, q8.scale, None)],
        "linear_w8a8": [(x, q8.qdata, q8.scale, bias)],
        "linear_int4": [(x, q4.qdata, q4.scale, q4.zero_point, bias), (x.bfloat16(), q4s.qdata, q4s.scale, None, None)],
        "linear_w4a8": [(x, q4.qdata, q4.scale, q4.zero_point, None)],
    }


def conv_samples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 9, 9, generator=g)
    q8 = quantize_weight(torch.randn(12, 4, 3, 3, generator=g), bits=8)
    q4 = quantize_weight(torch.randn(12, 8, 1, 1, generator=g), bits=4, group_size=None, symmetric=False)
    bias = torch.randn(12, generator=g)
    return {
        "conv2d_int8": [(x, q8.qdata, q8.scale, bias, [3, 3], [2, 1], [1, 1], [1, 2], 2, False),
                        (x, q8.qdata, q8.scale, None, [3, 3], [1, 1], [0, 0], [1, 1], 2, True)],
        "conv2d_int4": [(x, q4.qdata, q4.scale, q4.zero_point, bias, [1, 1], [1, 1], [0, 0], [1, 1], 1, False),
                        (x.to(memory_format=torch.channels_last), q4.qdata, q4.scale, q4.zero_point, None, [1, 1],
                         [1, 1], [0, 0], [1, 1], 1, True)],
    }


SAMPLES = {**linear_samples(), **conv_samples()}


def test_every_op_has_samples_and_a_fake():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("quant::")}
    assert registered == set(ops.ALL_OPS) == set(SAMPLES)
    for name in registered:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quant::{name}", "Meta"), f"{name} has no fake"


@pytest.mark.parametrize("name,args", [(n, a) for n, cases in SAMPLES.items() for a in cases])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.quant, name).default, args)


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.q1 = quantize_weight(torch.randn(64, 96, generator=g), bits=4, group_size=32, symmetric=False)
        self.q2 = quantize_weight(torch.randn(16, 64, generator=g), bits=8)
        self.qc = quantize_weight(torch.randn(8, 3, 3, 3, generator=g), bits=8)
        for prefix, qw in (("q1", self.q1), ("q2", self.q2), ("qc", self.qc)):
            self.register_buffer(f"{prefix}_data", qw.qdata)
            self.register_buffer(f"{prefix}_scale", qw.scale)
        self.register_buffer("q1_zero", self.q1.zero_point)

    def forward(self, x, img):
        h = torch.ops.quant.linear_int4(x, self.q1_data, self.q1_scale, self.q1_zero, None)
        h = torch.relu(h)
        y = torch.ops.quant.linear_w8a8(h, self.q2_data, self.q2_scale, None)
        c = torch.ops.quant.conv2d_int8(img, self.qc_data, self.qc_scale, None, [3, 3], [1, 1], [1, 1], [1, 1], 1, True)
        return y, c


def test_compile_fullgraph_matches_eager():
    model = TinyModel()
    x, img = torch.randn(4, 96), torch.randn(2, 3, 8, 8)
    eager = model(x, img)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")(x, img)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_matches_eager():
    model = TinyModel()
    x, img = torch.randn(4, 96), torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x, img))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"quant.linear_int4.default", "quant.linear_w8a8.default", "quant.conv2d_int8.default"} <= targets
    x2, img2 = torch.randn(4, 96), torch.randn(2, 3, 8, 8)
    for a, b in zip(model(x2, img2), exported.module()(x2, img2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# Bad input: each case names the argument, what it got and what it expects, on the kernel and on the fake.
def _q4():
    return quantize_weight(torch.randn(8, 64), bits=4, group_size=32, symmetric=False)


def bad_linear_cases():
    q = _q4()
    x = torch.randn(2, 64)
    return [
        ("x dtype", (x.to(torch.int32), q.qdata, q.scale, q.zero_point, None), TypeError, "x: got dtype torch.int32"),
        ("K mismatch", (torch.randn(2, 65), q.qdata, q.scale, q.zero_point, None), ValueError,
         "qweight: got 64 stored columns in 2 groups for an activation with in_features=65"),
        ("qweight dtype", (x, q.qdata.to(torch.int8), q.scale, q.zero_point, None), TypeError, "qweight: got dtype"),
        ("truncated qweight", (x, q.qdata[:, :20], q.scale, q.zero_point, None), ValueError,
         "qweight: got 40 stored columns"),
        ("scale rows", (x, q.qdata, q.scale[:5], q.zero_point, None), ValueError, "scale: got shape (5, 2)"),
        ("scale dtype", (x, q.qdata, q.scale.double(), q.zero_point, None), TypeError, "scale: got dtype"),
        ("zero_point shape", (x, q.qdata, q.scale, q.zero_point[:, :1], None), ValueError,
         "zero_point: got shape (8, 1)"),
        ("zero_point dtype", (x, q.qdata, q.scale, q.zero_point.int(), None), TypeError, "zero_point: got dtype"),
        ("bias shape", (x, q.qdata, q.scale, q.zero_point, torch.randn(7)), ValueError, "bias: got shape (7,)"),
        ("device", (x.to("meta"), q.qdata, q.scale, q.zero_point, None), ValueError, "got device cpu, expected meta"),
    ]


@pytest.mark.parametrize("case", bad_linear_cases(), ids=lambda c: c[0])
def test_bad_linear_input(case):
    _, args, exc, message = case
    with pytest.raises(exc) as info:
        torch.ops.quant.linear_int4(*args)
    assert message in str(info.value)
    if args[0].device.type == "cpu":  # the fake kernel checks the same things
        with pytest.raises(exc) as info:
            with torch._subclasses.FakeTensorMode() as mode:
                torch.ops.quant.linear_int4(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        assert message in str(info.value)


def test_group_size_that_does_not_divide_k_is_padded():
    q = quantize_weight(torch.randn(8, 100), bits=4, group_size=64)
    assert q.qdata.shape == (8, 64) and q.scale.shape == (8, 2)
    assert torch.ops.quant.linear_int4(torch.randn(1, 100), q.qdata, q.scale, None, None).shape == (1, 8)


def test_bad_conv_input():
    q = quantize_weight(torch.randn(8, 4, 3, 3), bits=8)
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="groups: got 3"):
        torch.ops.quant.conv2d_int8(x, q.qdata, q.scale, None, [3, 3], [1, 1], [0, 0], [1, 1], 3, False)
    with pytest.raises(ValueError, match="stride: got"):
        torch.ops.quant.conv2d_int8(x, q.qdata, q.scale, None, [3, 3], [0, 1], [0, 0], [1, 1], 2, False)
    with pytest.raises(ValueError, match="too small for kernel_size"):
        torch.ops.quant.conv2d_int8(x[..., :2, :2], q.qdata, q.scale, None, [3, 3], [1, 1], [0, 0], [1, 1], 2, False)
    with pytest.raises(ValueError, match=r"x: got shape \(8, 5, 5\)"):
        torch.ops.quant.conv2d_int8(x[0], q.qdata, q.scale, None, [3, 3], [1, 1], [0, 0], [1, 1], 2, False)


def test_isa_switch_rejects_unknown():
    with pytest.raises(ValueError, match="isa: got 'sse9'"):
        quantkernels.set_isa("sse9")
