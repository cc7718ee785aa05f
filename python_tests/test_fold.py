"""fold_batchnorm: which BatchNorm2d fold into which conv, the folded model against the float64 original, what
stays unfolded, swap_to_quantized(fold_batchnorm=True) and its save/load round trip, and the errors."""

import copy

import pytest
import torch
from torch import nn

from quantkernels import (QuantConfig, convert_qat, fold_batchnorm, prepare_qat, quantize_model, quantize_weight,
                          swap_to_quantized)
from quantkernels.nn import FoldedBatchNorm2d, QuantizedConv2d, load_quantized, save_quantized

from test_swap import seeded


def randomize_batchnorms(model, rng):
    """Running statistics and affine parameters far from the identity, signs of gamma mixed."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                if bn.running_mean is not None:
                    bn.running_mean.copy_(torch.randn(bn.num_features, generator=rng))
                    bn.running_var.copy_(torch.rand(bn.num_features, generator=rng) * 3 + 0.1)
                if bn.affine:
                    bn.weight.copy_(torch.randn(bn.num_features, generator=rng))
                    bn.bias.copy_(torch.randn(bn.num_features, generator=rng))
    return model.eval()


class Folds(nn.Module):
    """Pairs fold_batchnorm folds: attributes called in forward (found by torch.fx), a Sequential, a conv with
    and without bias, depthwise, strided and dilated, a BatchNorm without affine parameters."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(5, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.body = nn.Sequential(nn.Conv2d(12, 12, 3, stride=2, padding=2, dilation=2, groups=12, bias=False),
                                  nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 7, 1, bias=False),
                                  nn.BatchNorm2d(7, affine=False))

    def forward(self, x):
        return self.body(self.bn1(self.conv1(x)).relu())


class Unfoldable(nn.Module):
    """Pairs that must stay: the conv's output also used elsewhere, a conv called twice, a BatchNorm called
    twice, a BatchNorm without running statistics, one after a ReLU, one with a hook, a conv with a tied weight."""

    def __init__(self):
        super().__init__()
        self.shared_out, self.bn_a = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.twice, self.bn_b = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.c, self.bn_twice = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.d, self.bn_batch_stats = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6, track_running_stats=False)
        self.relu, self.bn_after_relu = nn.ReLU(), nn.BatchNorm2d(6)
        self.e, self.bn_hooked = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.bn_hooked.register_forward_hook(lambda module, args, out: out)
        self.tied, self.tied_twin, self.bn_tied = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.tied_twin.weight = self.tied.weight

    def forward(self, x):
        y = self.shared_out(x)
        x = self.bn_a(y) + y
        x = self.bn_b(self.twice(self.twice(x)))
        x = self.bn_twice(self.bn_twice(self.c(x)))
        x = self.bn_batch_stats(self.d(x))
        x = self.bn_after_relu(self.relu(x))
        x = self.bn_hooked(self.e(x))
        return self.bn_tied(self.tied(x)) + self.tied_twin(x)


class Untraceable(nn.Module):
    """Control flow on a value: torch.fx cannot trace it; only the Sequential's pair folds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.seq(x) if x.sum() > 0 else -self.seq(x)


def batchnorm_places(model):
    return ({name for name, m in model.named_modules() if isinstance(m, FoldedBatchNorm2d)},
            {name for name, m in model.named_modules() if type(m) is nn.BatchNorm2d})


def assert_matches_float64(model, original, x):
    want = copy.deepcopy(original).double()(x.double())
    out = model(x)
    assert out.dtype == torch.float32 and out.shape == want.shape
    # The folded weight and bias are the float64 fold rounded once to float32: float32 accumulation error.
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_fold_matches_the_float64_model(rng):
    model = randomize_batchnorms(seeded(Folds, rng), rng)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert batchnorm_places(folded) == ({"bn1", "body.1", "body.4"}, set())
    assert folded.bn1.conv == "conv1" and folded.body[1].conv == "body.0" and "folded into 'body.3'" in str(folded)
    assert folded.body[0].bias is not None and folded.body[3].bias is not None
    x = torch.randn(3, 5, 13, 11, generator=rng)
    assert_matches_float64(folded, model, x)
    assert_matches_float64(folded, model, x.to(memory_format=torch.channels_last))


def test_what_must_stay_unfolded_stays(rng):
    model = randomize_batchnorms(seeded(Unfoldable, rng), rng)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert batchnorm_places(folded)[0] == set()
    x = torch.randn(2, 6, 8, 8, generator=rng)
    assert torch.equal(folded(x), model(x))


def test_untraceable_model_folds_only_sequential_pairs(rng):
    model = randomize_batchnorms(seeded(Untraceable, rng), rng)
    with pytest.warns(UserWarning, match="torch.fx cannot trace Untraceable"):
        folded = fold_batchnorm(copy.deepcopy(model))
    assert batchnorm_places(folded) == ({"seq.1"}, {"bn"})
    assert_matches_float64(folded, model, torch.randn(2, 4, 9, 9, generator=rng))


def test_fold_after_swap_warns_and_changes_nothing(rng):
    model = swap_to_quantized(randomize_batchnorms(seeded(Folds, rng), rng))
    with pytest.warns(UserWarning, match=r"BatchNorm2d \['bn1', 'body.1', 'body.4'\] follow convs already quantized"):
        fold_batchnorm(model)
    assert batchnorm_places(model) == (set(), {"bn1", "body.1", "body.4"})


def test_model_without_batchnorm_is_not_traced(recwarn):
    model = Untraceable()
    model.bn, model.seq[1] = nn.Identity(), nn.Identity()
    assert fold_batchnorm(model) is model and not recwarn.list  # no "cannot trace" warning


def test_fold_errors():
    with pytest.raises(TypeError, match="model: got Tensor, expected a torch.nn.Module"):
        fold_batchnorm(torch.ones(1))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match=r"model: BatchNorm2d '1.0' is in training mode, expected eval mode .* "
                                         r"call model.eval\(\) first"):
        fold_batchnorm(model)
    with pytest.raises(ValueError, match="in training mode"):
        swap_to_quantized(model, fold_batchnorm=True)
    assert type(model[1][0]) is nn.BatchNorm2d and type(model[0]) is nn.Conv2d  # nothing changed
    with pytest.raises(TypeError, match="fold_batchnorm: got int, expected a bool"):
        swap_to_quantized(model.eval(), fold_batchnorm=1)


@pytest.mark.parametrize("config", [QuantConfig(bits=8, activations="int8"), QuantConfig(bits=4, group_size=32)],
                         ids=QuantConfig.describe)
def test_swap_with_fold_quantizes_the_folded_weights(config, rng, tmp_path):
    model = randomize_batchnorms(seeded(Folds, rng), rng)
    quantized = swap_to_quantized(copy.deepcopy(model), config, fold_batchnorm=True)
    report = quantized.quantization_report
    assert report.folded == (("conv1", "bn1"), ("body.0", "body.1"), ("body.3", "body.4"))
    assert "3 BatchNorm2d folded into their convs" in str(report)
    rows = str(report).splitlines()[2:]  # after the summary and the table's header
    assert [row.split()[0] for row in rows] == ["conv1", "body.0", "body.3"]
    assert all(row.endswith(f"  {bn} folded in") for row, bn in zip(rows, ("bn1", "body.1", "body.4")))
    folded_float = fold_batchnorm(copy.deepcopy(model))
    for name in ("conv1", "body.0", "body.3"):
        layer, float_layer = quantized.get_submodule(name), folded_float.get_submodule(name)
        assert isinstance(layer, QuantizedConv2d) and torch.equal(layer.bias, float_layer.bias)
        expected = quantize_weight(float_layer.weight, bits=config.bits, group_size=config.group_size,
                                   symmetric=config.symmetric)
        assert torch.equal(layer.qdata, expected.qdata) and torch.equal(layer.scale, expected.scale)
    # Per-channel scales: the folded weight's codes are the unfolded weight's, negated where gamma < 0 (a code
    # may differ by one where the float32 product lands on a rounding boundary).
    if config.group_size is None:
        plain = swap_to_quantized(copy.deepcopy(model), config)
        sign = torch.sign(model.bn1.weight).to(torch.int16).view(-1, 1)
        diff = (quantized.conv1.qdata.to(torch.int16) - sign * plain.conv1.qdata.to(torch.int16)).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    x = torch.randn(2, 5, 13, 11, generator=rng)
    out = quantized(x)
    path = tmp_path / "folded.safetensors"
    save_quantized(quantized, path)
    loaded = load_quantized(seeded(Folds, rng).eval(), path)  # fresh float model, BatchNorms unfolded
    assert batchnorm_places(loaded) == ({"bn1", "body.1", "body.4"}, set())
    assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("tool", ["quantize_model", "prepare_qat"])
def test_rounding_tools_fold_before_rounding(tool, rng):
    model = randomize_batchnorms(seeded(Folds, rng), rng)
    x = torch.randn(4, 5, 13, 11, generator=rng)
    if tool == "quantize_model":
        quantized = quantize_model(copy.deepcopy(model), [x], bits=8, fold_batchnorm=True)
    else:
        quantized = convert_qat(prepare_qat(copy.deepcopy(model), bits=8, fold_batchnorm=True))
    assert batchnorm_places(quantized) == ({"bn1", "body.1", "body.4"}, set())
    assert len(quantized.quantization_report.folded) == 3
    want = model.double()(x.double())
    assert ((quantized(x).double() - want).norm() / want.norm()) < 0.02  # int8 weights: measured 0.05-0.5 %
    with pytest.raises(TypeError, match="fold_batchnorm: got str, expected a bool"):
        quantize_model(model, [x], fold_batchnorm="yes")


def test_fold_refuses_weights_rounded_before_folding(rng):
    model = randomize_batchnorms(seeded(Folds, rng), rng)
    weights = {"conv1": quantize_weight(model.conv1.weight, bits=8, group_size=None, symmetric=True)}
    with pytest.raises(ValueError, match=r"weights: got weights for \['conv1'\], which fold_batchnorm=True changes"):
        swap_to_quantized(model, weights=weights, fold_batchnorm=True)
    assert type(model.bn1) is nn.BatchNorm2d


def test_load_into_a_model_that_cannot_hold_the_fold(rng, tmp_path):
    model = randomize_batchnorms(seeded(Folds, rng), rng)
    path = tmp_path / "folded.safetensors"
    save_quantized(swap_to_quantized(copy.deepcopy(model), fold_batchnorm=True), path)
    with pytest.raises(ValueError, match="body.0: the file folded BatchNorm2d 'body.1' into it, the model's quantized "
                                         "layer has no bias"):
        load_quantized(swap_to_quantized(copy.deepcopy(model)), path)
    other = seeded(Folds, rng).eval()
    other.bn1 = nn.Identity()
    with pytest.raises(TypeError, match="bn1: the file folded a BatchNorm2d into the Conv2d 'conv1', the model has "
                                        "Identity and Conv2d there"):
        load_quantized(other, path)


def test_folded_quantized_model_exports(rng):
    model = randomize_batchnorms(seeded(Folds, rng), rng)
    quantized = swap_to_quantized(model, bits=8, activations="int8", fold_batchnorm=True)
    x = torch.randn(2, 5, 13, 11, generator=rng)
    exported = torch.export.export(quantized, (x,))
    assert not any("batch_norm" in str(node.target) for node in exported.graph.nodes)
    assert torch.equal(exported.module()(x), quantized(x))
