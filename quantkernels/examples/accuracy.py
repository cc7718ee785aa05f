"""The accuracy toolkit on the real models: the measurements behind the README's accuracy tables.

    python -m quantkernels.examples.accuracy          # both models (minutes on two cores)

Fashion-MNIST CNN (:mod:`quantkernels.examples.fashion_mnist`): int4 per output channel, where round-to-
nearest costs this small CNN most, rounded to nearest, by GPTQ, and trained with QAT. all-MiniLM-L6-v2
(:mod:`quantkernels.examples.minilm`): int4 at group 128 and at group 32 asymmetric, rounded to nearest and by
GPTQ, and an automatic mixed precision. Calibration data are never evaluation data: CNN calibration images
come from training images the CNN was not trained on, MiniLM calibration sentences are not demo sentences.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..accuracy import auto_mixed_precision, convert_qat, prepare_qat, quantize_model
from ..accuracy.report import QuantizationReport
from ..config import QuantConfig
from ..nn import swap_to_quantized

CNN_CONFIG = QuantConfig(bits=4, group_size=None, symmetric=True)
CNN_CALIBRATION = slice(50000, 51024)  # training images past the 20000 the recipe trains on
CNN_CALIBRATION_BATCH = 256
# QAT fine-tuning: 100 Adam steps of 128 images (~1/4 epoch), seeded; a lower rate than training's 2e-3.
QAT_STEPS, QAT_BATCH, QAT_LR, QAT_SEED = 100, 128, 3e-4, 1

MINILM_CONFIGS = (QuantConfig(bits=4, group_size=128), QuantConfig(bits=4, group_size=32, symmetric=False))
MINILM_CALIBRATION_SENTENCES = 128
MINILM_BATCH = 32
MINILM_MIXED_CANDIDATES = (QuantConfig(bits=4, group_size=128, symmetric=False), QuantConfig(bits=8))
# The mixed precision is chosen on calibration sentences; aiming a little above 0.99 there leaves room for
# the unseen evaluation sentences.
MINILM_MIN_COSINE = 0.992


def top_k(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, k: int, batch_size: int = 1000) -> float:
    """Top-k accuracy in percent."""
    correct = 0
    with torch.inference_mode():
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            correct += int((model(x).topk(k, dim=1).indices == y.unsqueeze(1)).any(dim=1).sum())
    return 100.0 * correct / len(labels)


def cnn_metrics(images, labels):
    return lambda model: {"top-1": top_k(model, images, labels, 1), "top-5": top_k(model, images, labels, 5)}


def cnn_calibration(train_images: torch.Tensor) -> List[torch.Tensor]:
    return list(train_images[CNN_CALIBRATION].split(CNN_CALIBRATION_BATCH))


def cnn_qat(model: nn.Module, config: QuantConfig, images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    """A copy of ``model`` fine-tuned with fake quantization in ``config``, then converted to the kernels."""
    qat = prepare_qat(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(QAT_SEED)
    optimizer = torch.optim.Adam(qat.parameters(), lr=QAT_LR)
    qat.train()
    for batch in torch.randperm(len(images), generator=generator)[: QAT_STEPS * QAT_BATCH].split(QAT_BATCH):
        optimizer.zero_grad()
        F.cross_entropy(qat(images[batch]), labels[batch]).backward()
        optimizer.step()
    return convert_qat(qat.eval())


def cnn_report() -> QuantizationReport:
    from . import fashion_mnist

    model = fashion_mnist.trained_cnn()
    train_images, train_labels = fashion_mnist.load("train")
    test_images, test_labels = fashion_mnist.load("test")
    metrics = cnn_metrics(test_images, test_labels)
    example = test_images[:64]
    report = QuantizationReport()
    quantized = {
        "RTN": swap_to_quantized(copy.deepcopy(model), CNN_CONFIG),
        "GPTQ": quantize_model(copy.deepcopy(model), cnn_calibration(train_images), CNN_CONFIG),
        "QAT": cnn_qat(model, CNN_CONFIG, train_images[: CNN_CALIBRATION.start], train_labels[: CNN_CALIBRATION.start]),
    }
    for method, q in quantized.items():
        report.add(f"Fashion-MNIST CNN, {CNN_CONFIG.describe()}, {method}", model, q, metrics, example=example)
    return report


def minilm_batches(model, sentences) -> List[Dict[str, torch.Tensor]]:
    """Tokenized batches, fed to a SentenceTransformer as ``model(features)``."""
    return [dict(model.tokenize(sentences[i : i + MINILM_BATCH])) for i in range(0, len(sentences), MINILM_BATCH)]


def sentence_embedding(output) -> torch.Tensor:
    return output["sentence_embedding"]


def minilm_report() -> QuantizationReport:
    from . import minilm

    model = minilm.load_model()
    sentences = minilm.demo_sentences()
    reference = minilm.encode(model, sentences)
    calibration = minilm_batches(model, minilm.calibration_sentences(MINILM_CALIBRATION_SENTENCES))
    example = dict(model.tokenize(sentences[:32]))

    def metrics(m):
        return {"cosine": float((minilm.encode(m, sentences) * reference).sum(dim=1).mean())}

    report = QuantizationReport()
    for config in MINILM_CONFIGS:
        rtn = swap_to_quantized(copy.deepcopy(model), config)
        report.add(f"all-MiniLM-L6-v2, {config.describe()}, RTN", model, rtn, metrics, example=example)
        gptq = quantize_model(copy.deepcopy(model), calibration, config)
        report.add(f"all-MiniLM-L6-v2, {config.describe()}, GPTQ", model, gptq, metrics, example=example)
    plan = auto_mixed_precision(model, calibration, min_cosine=MINILM_MIN_COSINE, candidates=MINILM_MIXED_CANDIDATES,
                                output_fn=sentence_embedding)
    mixed = plan.apply(copy.deepcopy(model))
    report.add(f"all-MiniLM-L6-v2, mixed GPTQ {plan.bits_per_weight:.2f} bits/weight", model, mixed, metrics,
               example=example)
    return report


def main() -> None:
    print(cnn_report())
    print()
    print(minilm_report())


if __name__ == "__main__":
    main()
