import pytest
import torch

import quantkernels
from quantkernels import formats
from quantkernels.formats import QuantizedWeight, pack_int4, quantize_weight, unpack_int4

CONFIGS = [(8, g, True) for g in (None,) + formats.GROUP_SIZES] + [
    (4, g, sym) for g in (None,) + formats.GROUP_SIZES for sym in (True, False)
]


def assert_round_trip(w, qw: QuantizedWeight):
    """Every element within half a quantization step of the original, plus the float32 rounding of w / scale."""
    back = qw.dequantize(torch.float64)
    step = qw.scale.double().repeat_interleave(qw.group_len, 1)[:, : qw.in_features].reshape(w.shape)
    err = (back - w.double()).abs()
    assert (err <= 0.5 * step + 2.0**-22 * w.double().abs() + 1e-12).all(), f"max err/step {(err / step).max().item()}"


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 100), (64, 257), (8, 3, 3, 5)])
def test_round_trip_random(bits, group_size, symmetric, shape, rng):
    w = torch.randn(shape, generator=rng) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=rng) * 3
    qw = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
    assert qw.shape == shape
    k_pad = formats.padded_k(bits, qw.in_features, group_size)
    assert qw.qdata.shape == (shape[0], k_pad if bits == 8 else k_pad // 2)
    assert qw.scale.shape == (shape[0], k_pad // qw.group_len) and qw.scale.dtype == torch.float32
    assert (qw.zero_point is None) == symmetric
    assert_round_trip(w, qw)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 128, True), (4, 32, False)])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096)])
def test_round_trip_real_shapes(bits, group_size, symmetric, shape, rng):
    w = torch.randn(shape, generator=rng) * 0.02
    qw = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
    assert_round_trip(w, qw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype, rng):
    w = torch.randn(32, 96, generator=rng).to(dtype)
    assert_round_trip(w.float(), quantize_weight(w, bits=4, group_size=32))


def test_nibble_order_is_low_then_high():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]])
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert unpack_int4(packed).tolist() == codes.tolist()


def test_symmetric_int4_codes_and_zero_point():
    w = torch.tensor([[-7.0, 0.0, 7.0, 3.5] + [0.0] * 28])
    qw = quantize_weight(w, bits=4, group_size=32, symmetric=True)
    assert qw.scale.item() == 1.0
    assert unpack_int4(qw.qdata)[0, :4].tolist() == [1, 8, 15, 12]  # code = q + 8, half-to-even at 3.5 -> 4


def test_asymmetric_range_includes_zero():
    w = torch.full((1, 32), 2.0)
    w[0, 0] = 5.0
    qw = quantize_weight(w, bits=4, group_size=32, symmetric=False)
    assert qw.zero_point.item() == 0 and qw.scale.item() == pytest.approx(5.0 / 15)
    assert_round_trip(w, qw)


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
def test_all_zero_group(bits, group_size, symmetric):
    w = torch.zeros(2, 64)
    w[1, 40:] = torch.linspace(-1, 1, 24)
    qw = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
    assert torch.isfinite(qw.scale).all()
    back = qw.dequantize()
    assert torch.isfinite(back).all() and (back[0] == 0).all()


def test_pad_elements_dequantize_to_zero():
    qw = quantize_weight(torch.randn(4, 33), bits=4, group_size=32, symmetric=False)
    full = (unpack_int4(qw.qdata).double() - qw.zero_points().double().repeat_interleave(32, 1)) * qw.scale.double(
    ).repeat_interleave(32, 1)
    assert (full[:, 33:] == 0).all()


def test_format_constants_match_native():
    assert quantkernels._C.FORMAT_VERSION == formats.FORMAT_VERSION


def test_bits_per_weight():
    qw = quantize_weight(torch.randn(256, 4096), bits=4, group_size=128)
    assert qw.bits_per_weight() == pytest.approx(4.25)
    qw = quantize_weight(torch.randn(256, 4096), bits=4, group_size=128, symmetric=False)
    assert qw.bits_per_weight() == pytest.approx(4.3125)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(bits=3), ValueError, ["bits", "3", "(4, 8)"]),
        (dict(bits=4, group_size=48), ValueError, ["group_size", "48", "32, 64, 128, 256"]),
        (dict(bits=8, symmetric=False), ValueError, ["symmetric", "bits=8"]),
    ],
)
def test_bad_config(kwargs, exc, words):
    with pytest.raises(exc) as info:
        quantize_weight(torch.randn(4, 64), **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"weight: contains NaN or Inf \(first at index \[2, 5\]\)"):
        quantize_weight(w, bits=4, group_size=32)


def test_bad_weight_dtype_and_shape():
    with pytest.raises(TypeError, match="weight: got dtype torch.int32"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight: got shape \(4,\)"):
        quantize_weight(torch.ones(4))
    with pytest.raises(TypeError, match="weight: got ndarray"):
        quantize_weight(torch.ones(4, 4).numpy())
