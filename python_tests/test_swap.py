"""quantkernels.nn: the quantized modules against the float64 reference, swap_to_quantized's choices and report,
state_dict / safetensors round trips with their errors, memory while swapping, torch.compile and torch.export."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkernels
from quantkernels import QuantConfig, reference, swap_to_quantized
from quantkernels.formats import quantize_weight
from quantkernels.nn import (QuantizedConv2d, QuantizedLinear, SwapReport, load_quantized, quantize_with_sqnr,
                             save_quantized)
from quantkernels.testing import assert_close_to_reference, linear_bound

CONFIGS = [
    QuantConfig(),
    QuantConfig(bits=8, group_size=64),
    QuantConfig(bits=8, activations="int8"),
    QuantConfig(bits=4, group_size=32, symmetric=False),
    QuantConfig(bits=4, group_size=128),
    QuantConfig(bits=4, group_size=None, symmetric=False, activations="int8"),
]


def seeded(make, rng):
    """Builds ``make()`` with torch's global RNG seeded from ``rng`` (module initializers use the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
        return make()


def float64_twin(float_module, quantized, absolute=False):
    """``float_module`` in float64 with the weight ``quantized`` encodes (or |weight| and |bias| for an error bound)."""
    twin = copy.deepcopy(float_module).double()
    weight = quantized.quantized_weight().dequantize(torch.float64)
    with torch.no_grad():
        twin.weight.copy_(weight.abs() if absolute else weight)
        if twin.bias is not None:
            twin.bias.copy_(quantized.bias.double().abs() if absolute else quantized.bias.double())
    return twin


def check_against_twin(float_module, quantized, x):
    """Weight-only: the quantized module equals the float64 module with the dequantized weight, within the
    float32-accumulation tolerance of quantkernels.testing."""
    out = quantized(x)
    want = float64_twin(float_module, quantized)(x.double())
    bound = float64_twin(float_module, quantized, absolute=True)(x.double().abs())
    assert_close_to_reference(out, want, bound, x.dtype)
    return out


# -- QuantConfig ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(bits=3), ValueError, "bits: got 3, expected one of (4, 8)"),
    (dict(bits=8.0), TypeError, "bits: got 8.0 (float), expected an int"),
    (dict(bits=4, group_size=48), ValueError, "group_size: got 48"),
    (dict(bits=8, symmetric=False), ValueError, "symmetric: got False for bits=8"),
    (dict(symmetric=1), TypeError, "symmetric: got 1 (int), expected a bool"),
    (dict(activations="fp8"), ValueError, "activations: got 'fp8', expected None"),
])
def test_config_rejects_bad_values(kwargs, exc, message):
    with pytest.raises(exc) as info:
        QuantConfig(**kwargs)
    assert message in str(info.value)


def test_config_is_frozen_and_describes_itself():
    config = QuantConfig(bits=4, group_size=128, symmetric=False, activations="int8")
    assert config.describe() == "int4 g128 asym w4a8"
    assert QuantConfig().describe() == "int8 per-channel"
    with pytest.raises(dataclasses_frozen_error()):
        config.bits = 8


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# -- the modules ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=QuantConfig.describe)
@pytest.mark.parametrize("shape", [(1, 100), (3, 5, 257), (7, 64)])
def test_linear_matches_reference(isa, config, shape, rng):
    linear = seeded(lambda: nn.Linear(shape[-1], 33, bias=shape[0] != 7), rng)
    q = QuantizedLinear.from_float(linear, config)
    x = torch.randn(*shape, generator=rng)
    out = q(x)
    qw = q.quantized_weight()
    want = reference.linear(config.bits, x.double(), qw.qdata, qw.scale, qw.zero_point, q.bias, config.act_int8)
    bound = linear_bound(config.bits, x, qw.qdata, qw.scale, qw.zero_point, q.bias, config.act_int8)
    assert_close_to_reference(out, want, bound, x.dtype, config.act_int8)
    if not config.act_int8:
        check_against_twin(linear, q, x)


def test_linear_stores_exactly_quantize_weight(rng):
    linear = nn.Linear(100, 20)
    q = QuantizedLinear.from_float(linear, QuantConfig(bits=4, group_size=64, symmetric=False))
    direct = quantize_weight(linear.weight.detach(), bits=4, group_size=64, symmetric=False)
    assert torch.equal(q.qdata, direct.qdata) and torch.equal(q.scale, direct.scale)
    assert torch.equal(q.zero_point, direct.zero_point) and torch.equal(q.bias, linear.bias.detach())
    assert q.format_version.item() == quantkernels.FORMAT_VERSION


def test_blocked_quantization_equals_whole_tensor(rng):
    w = torch.randn(300, 1000, generator=rng)  # 300k weights: blocks of 262 rows and 38 rows
    config = QuantConfig(bits=4, group_size=32, symmetric=False)
    blocked, sqnr = quantize_with_sqnr(w, config)
    whole = config.quantize(w)
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(blocked, name), getattr(whole, name)), name
    noise = (w.double() - whole.dequantize(torch.float64)).square().sum()
    assert sqnr == pytest.approx(10 * torch.log10(w.double().square().sum() / noise).item(), rel=1e-9)


def test_linear_non_contiguous_and_batched_inputs(isa, rng):
    linear = seeded(lambda: nn.Linear(96, 40), rng)
    q = QuantizedLinear.from_float(linear, QuantConfig(bits=4, group_size=32))
    base = torch.randn(2, 96, 9, generator=rng)
    check_against_twin(linear, q, base.transpose(1, 2))  # (2, 9, 96), last dim strided
    check_against_twin(linear, q, torch.randn(96, generator=rng))  # a single vector


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_dtype_keeps_scales_float32(dtype, rng):
    linear = seeded(lambda: nn.Linear(128, 48), rng)
    q = QuantizedLinear.from_float(linear, QuantConfig(bits=4, group_size=64, symmetric=False))
    scale = q.scale.clone()
    q = q.to(dtype).eval()
    assert q.scale.dtype == torch.float32 and torch.equal(q.scale, scale)
    assert q.bias.dtype == dtype and q.qdata.dtype == torch.uint8
    x = torch.randn(4, 128, generator=rng).to(dtype)
    with torch.inference_mode():
        out = check_against_twin(linear, q, x)
    assert out.dtype == dtype
    assert q.half().scale.dtype == torch.float32 and q.float().bias.dtype == torch.float32


CONV_CASES = [
    # (cin, cout, kernel, stride, padding, dilation, groups, padding_mode)
    (3, 8, 3, 1, 1, 1, 1, "zeros"),
    (4, 6, 4, 1, "same", 1, 2, "zeros"),  # even kernel: torch pads one more on the right and bottom
    (5, 7, (2, 3), 1, "same", (2, 1), 1, "zeros"),
    (6, 6, 3, 2, 0, 1, 6, "zeros"),  # depthwise, strided
    (3, 5, 3, 1, "valid", 1, 1, "zeros"),
    (4, 8, 3, 1, 2, 1, 1, "reflect"),
    (4, 8, 3, 1, 1, 2, 2, "circular"),
    (3, 4, 5, 2, (1, 2), 1, 1, "replicate"),
]


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(bits=4, group_size=32, symmetric=False)],
                         ids=QuantConfig.describe)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_float_conv_with_dequantized_weight(isa, config, case, rng):
    cin, cout, kernel, stride, padding, dilation, groups, mode = case
    conv = seeded(lambda: nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=cin != 5,
                                    padding_mode=mode), rng)
    q = QuantizedConv2d.from_float(conv, config)
    x = torch.randn(2, cin, 11, 10, generator=rng)
    out = check_against_twin(conv, q, x)
    assert out.shape == conv(x).shape
    assert check_against_twin(conv, q, x[1]).shape == out.shape[1:]  # unbatched (C, H, W)
    check_against_twin(conv, q, x.to(memory_format=torch.channels_last))


def test_conv2d_int8_activations_match_reference(isa, rng):
    conv = seeded(lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2), rng)
    q = QuantizedConv2d.from_float(conv, QuantConfig(bits=8, activations="int8"))
    x = torch.randn(3, 8, 9, 9, generator=rng)
    args = (q.bias, [3, 3], [2, 2], [1, 1], [1, 1], 2, True)
    want = reference.conv2d(8, x.double(), q.qdata, q.scale, None, *args)
    out = q(x)
    assert (out.double() - want).abs().max() <= 1e-4 * want.abs().max()


def test_bad_inputs_name_what_is_wrong():
    q = QuantizedLinear.from_float(nn.Linear(64, 8), QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match=r"x: got shape \(2, 63\), expected \(\.\.\., 64\)"):
        q(torch.randn(2, 63))  # 63 would fit inside the padded stored rows: only the module can tell
    with pytest.raises(TypeError, match="x: got dtype torch.int64"):
        q(torch.ones(2, 64, dtype=torch.int64))
    conv = QuantizedConv2d.from_float(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"x: got shape \(1, 4, 8, 8\), expected \(batch, 3, height, width\)"):
        conv(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="padding_mode: got 'mirror'"):
        QuantizedConv2d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="groups: got 2"):
        QuantizedConv2d(3, 4, 3, groups=2)
    with pytest.raises(TypeError, match="module: got Conv2d, expected an nn.Linear"):
        QuantizedLinear.from_float(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="weight: got format int8 per-channel, expected int4 g32 sym"):
        q.set_quantized_weight(quantize_weight(torch.randn(8, 64)))


def test_extra_repr_describes_format():
    text = repr(QuantizedLinear.from_float(nn.Linear(300, 20), QuantConfig(bits=4, group_size=128, symmetric=False)))
    assert "in_features=300" in text and "weights=int4 g128 asym" in text and "format_version=1" in text


# -- swap_to_quantized ---------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """Embedding tied to the output head, attention, a conv, a reused block and assorted layers that must stay float."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.block = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
        self.again = self.block  # the same module at two places
        self.conv = nn.Conv2d(1, 4, 3, padding="same")  # in_features 9: swapped at int8, too small for g128
        self.fp64 = nn.Linear(64, 64).double()
        self.tiny = nn.Linear(3, 64)  # in_features 3: a group of 128 would be larger than the float weight
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.again(self.block(h))
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        h = h + self.fp64(h.double()).float() + self.tiny(h[..., :3])
        return self.head(h)


def test_swap_skips_what_must_stay_float_and_reports_why(rng):
    model = seeded(TiedLM, rng).eval()
    tokens = torch.randint(0, 50, (2, 7), generator=rng)
    want = model(tokens)
    quantized = swap_to_quantized(copy.deepcopy(model), bits=4, group_size=128)
    report = quantized.quantization_report
    assert isinstance(report, SwapReport)
    reasons = {layer.name: layer.skip_reason for layer in report.skipped}
    assert "MultiheadAttention" in reasons["attn.out_proj"]
    assert "shared with embed" in reasons["head"]
    assert "float64" in reasons["fp64"]
    assert "in_features 3 is small" in reasons["tiny"] and "in_features 9 is small" in reasons["conv"]
    assert {layer.name for layer in report.swapped} == {"block.0", "block.2"}
    assert quantized.again is quantized.block and isinstance(quantized.block[0], QuantizedLinear)
    assert quantized.head.weight is quantized.embed.weight
    assert all(layer.sqnr_db > 15 for layer in report.swapped)
    assert report.bytes_after < report.bytes_before / 3 and report.model_bytes_after < report.model_bytes_before
    text = str(report)
    assert "block.0" in text and "skipped: weight is shared with embed (tied)" in text
    out = quantized(tokens)
    assert F.cosine_similarity(out.flatten(), want.flatten(), dim=0) > 0.99


def test_swap_default_matches_dequantized_float_model(rng):
    model = seeded(lambda: nn.Sequential(nn.Linear(40, 72), nn.ReLU(), nn.Linear(72, 10)), rng)
    quantized = swap_to_quantized(copy.deepcopy(model))
    assert quantized[0].config == QuantConfig() and quantized.quantization_report.skipped == []
    x = torch.randn(5, 40, generator=rng)
    twin = copy.deepcopy(model).double()
    for i in (0, 2):
        twin[i].weight.data = quantized[i].quantized_weight().dequantize(torch.float64)
    torch.testing.assert_close(quantized(x), twin(x.double()).float(), rtol=1e-5, atol=1e-5)


def test_skip_layer_configs_and_filter_fn():
    model = nn.ModuleDict({
        "encoder": nn.ModuleDict({"q": nn.Linear(64, 64), "k": nn.Linear(64, 64), "out_proj": nn.Linear(64, 64)}),
        "decoder": nn.ModuleDict({"q": nn.Linear(64, 64), "out_proj": nn.Linear(64, 64)}),
        "classifier": nn.Linear(64, 3),
    })
    seen = []

    def filter_fn(module, name):
        seen.append((type(module), name))
        return name != "encoder.k"

    quantized = swap_to_quantized(
        model, QuantConfig(bits=4, group_size=32), skip=["classifier", "*.out_proj"],
        layer_configs={"decoder.*": QuantConfig(bits=8), "*": None, "decoder.q": QuantConfig(bits=4)},
        filter_fn=filter_fn)
    reasons = {layer.name: layer.skip_reason for layer in quantized.quantization_report.skipped}
    assert reasons == {"encoder.out_proj": "matches skip pattern '*.out_proj'",
                       "decoder.out_proj": "matches skip pattern '*.out_proj'",
                       "classifier": "matches skip pattern 'classifier'",
                       "encoder.k": "filter_fn returned False",
                       "encoder.q": "layer_configs['*'] is None"}
    assert quantized["decoder"]["q"].config == QuantConfig(bits=8)  # first match wins
    assert (nn.Linear, "encoder.q") in seen and all(t is nn.Linear for t, _ in seen)


def test_swap_argument_errors_and_unmatched_patterns():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(TypeError, match="either config or the shorthands"):
        swap_to_quantized(model, QuantConfig(), bits=4)
    with pytest.raises(ValueError, match="group_size: got 100"):
        swap_to_quantized(model, bits=4, group_size=100)
    with pytest.raises(TypeError, match=r"layer_configs\['0'\]: got dict"):
        swap_to_quantized(model, layer_configs={"0": {"bits": 4}})
    with pytest.warns(UserWarning, match="pattern 'clasifier' matched no Linear or Conv2d layer"):
        swap_to_quantized(model, skip=["clasifier"])


def test_swap_keeps_subclasses_hooks_and_bad_weights_float():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    hooked, broken = nn.Linear(64, 64), nn.Linear(64, 64)
    hooked.register_forward_hook(lambda module, args, out: out)
    with torch.no_grad():
        broken.weight[3, 5] = float("nan")
    model = nn.ModuleDict({"scaled": Scaled(64, 64), "hooked": hooked, "broken": broken})
    reasons = {layer.name: layer.skip_reason
               for layer in swap_to_quantized(model).quantization_report.skipped}
    assert reasons == {"scaled": "Scaled overrides Linear.forward",
                       "hooked": "has hooks registered, which the quantized module would not carry",
                       "broken": "weight contains NaN or Inf"}


def test_swap_root_module_and_progress_bar(capsys):
    quantized = swap_to_quantized(nn.Linear(64, 8), bits=4, group_size=32, progress=True)
    assert isinstance(quantized, QuantizedLinear) and quantized.quantization_report.swapped[0].name == ""
    assert "swap_to_quantized" in capsys.readouterr().err


# -- saving and loading --------------------------------------------------------------------------------------------
def mixed_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 40), nn.ReLU(),
                         nn.Linear(40, 10))


MIXED = dict(config=QuantConfig(bits=4, group_size=32, symmetric=False),
             layer_configs={"4": QuantConfig(bits=8, activations="int8")})


def test_state_dict_round_trip_into_freshly_swapped_model(rng):
    source = swap_to_quantized(seeded(mixed_model, rng), **MIXED)
    target = swap_to_quantized(seeded(mixed_model, rng), **MIXED)
    x = torch.randn(2, 3, 6, 6, generator=rng)
    assert not torch.equal(source(x), target(x))
    target.load_state_dict(source.state_dict())
    assert torch.equal(source(x), target(x))


def state_errors():
    def retype(state):
        state["2.qdata"] = state["2.qdata"].view(torch.int8)

    def version(state):
        state["2.format_version"] = torch.tensor(2)

    def drop_zero_point(state):
        del state["2.zero_point"]

    def float_weights(state):
        state["2.weight"] = torch.randn(40, 288)

    return [
        ("dtype", retype, "2.qdata: got torch.int8 (40, 144), expected torch.uint8 (40, 144)"),
        ("version", version, "2.format_version: got 2, expected 1"),
        ("missing zero point", drop_zero_point, "2.zero_point: missing, expected torch.uint8 (40, 9)"),
        ("float weight", float_weights, "2.weight: got a float weight"),
    ]


@pytest.mark.parametrize("case", state_errors(), ids=lambda c: c[0])
@pytest.mark.parametrize("strict", [True, False])
def test_state_that_does_not_fit_is_an_error(case, strict):
    _, corrupt, message = case
    state = swap_to_quantized(mixed_model(), **MIXED).state_dict()
    corrupt(state)
    target = swap_to_quantized(mixed_model(), **MIXED)
    with pytest.raises(RuntimeError) as info:
        target.load_state_dict(state, strict=strict)
    assert message in str(info.value)


def test_state_from_another_config_is_an_error():
    state = swap_to_quantized(mixed_model(), **MIXED).state_dict()
    target = swap_to_quantized(mixed_model(), bits=4, group_size=64, symmetric=False)
    with pytest.raises(RuntimeError, match=r"2\.scale: got torch.float32 \(40, 9\), expected torch.float32 \(40, 5\)"):
        target.load_state_dict(state)
    symmetric = swap_to_quantized(mixed_model(), bits=4, group_size=32)
    with pytest.raises(RuntimeError, match="2.zero_point: got a tensor, expected none for int4 g32 sym weights"):
        symmetric.load_state_dict(state, strict=False)


def test_safetensors_round_trip_into_float_model(tmp_path, rng):
    model = seeded(TiedLM, rng).eval()
    quantized = swap_to_quantized(copy.deepcopy(model), MIXED["config"], skip=["tiny"],
                                  layer_configs={"block.2": QuantConfig(bits=8, activations="int8")})
    path = tmp_path / "model.safetensors"
    save_quantized(quantized, path)
    loaded = load_quantized(seeded(TiedLM, rng).eval(), path)
    assert isinstance(loaded.block[2], QuantizedLinear) and loaded.again is loaded.block
    assert loaded.block[0].config == MIXED["config"] and loaded.head.weight is loaded.embed.weight
    tokens = torch.randint(0, 50, (2, 5), generator=rng)
    assert torch.equal(loaded(tokens), quantized(tokens))


def test_safetensors_errors(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(ValueError, match="expected a file written by save_quantized"):
        load_quantized(mixed_model(), plain)
    with pytest.raises(ValueError, match="has no quantized layers"):
        save_quantized(mixed_model(), tmp_path / "float.safetensors")
    path = tmp_path / "q.safetensors"
    save_quantized(swap_to_quantized(mixed_model(), **MIXED), path)
    with pytest.raises(ValueError, match="holds layer '4', which the model does not have"):
        load_quantized(mixed_model()[:3], path)
    smaller = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 40), nn.ReLU(),
                            nn.Linear(40, 12))
    with pytest.raises(RuntimeError, match=r"4\.qdata: got torch.int8 \(10, 40\), expected torch.int8 \(12, 40\)"):
        load_quantized(smaller, path)
    with pytest.raises(ValueError, match="already quantized as int8 per-channel"):
        load_quantized(swap_to_quantized(mixed_model()), path)


# -- memory, compile, export ---------------------------------------------------------------------------------------
def test_peak_memory_while_swapping_stays_under_model_plus_largest_layer():
    """A 256 MB model: swapping layer by layer must never hold much more than the model. Measured as the peak
    RSS of a fresh interpreter, once the model is built and after the swap (one thread: memory is measured,
    not speed, and a shared machine runs one thread much faster than two)."""
    code = textwrap.dedent("""
        import resource, torch, quantkernels
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(4)])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        quantkernels.swap_to_quantized(model)
        print(before * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, peak = map(int, out.stdout.split())
    largest_layer = 4096 * 4096 * 4
    assert peak - before < largest_layer, f"swapping grew the peak by {(peak - before) / 1e6:.0f} MB"


def compile_model():
    return nn.Sequential(nn.Conv2d(3, 8, 4, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 48),
                         nn.GELU(), nn.Linear(48, 10))


@pytest.fixture(scope="module")
def compile_case():
    g = torch.Generator().manual_seed(3)
    model = swap_to_quantized(seeded(compile_model, g), bits=4, group_size=32,
                              layer_configs={"5": QuantConfig(bits=8, activations="int8")}).eval()
    return model, torch.randn(2, 3, 5, 5, generator=g)


def test_compile_fullgraph_matches_eager(compile_case):
    model, x = compile_case
    with torch.no_grad():
        # The quant ops give the same bits; inductor's fused GELU / ReLU / pad may round differently by an ulp.
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_export_matches_eager(compile_case):
    model, x = compile_case
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"quant.conv2d_int4.default", "quant.linear_int4.default", "quant.linear_w8a8.default"} <= targets
    x2 = torch.randn_like(x)
    torch.testing.assert_close(exported.module()(x2), model(x2), rtol=0, atol=0)
