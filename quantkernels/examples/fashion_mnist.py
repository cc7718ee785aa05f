"""Fashion-MNIST and a small CNN trained on it in well under a minute on two cores, deterministically.

The data are Debian's ``dataset-fashion-mnist`` files (``apt-get install dataset-fashion-mnist``, installed by
scripts/setup.sh) under ``/usr/share/datasets/fashion-mnist``, or the directory in
``QUANTKERNELS_FASHION_MNIST``. :func:`trained_cnn` trains once with a fixed seed and caches the fp32 weights
in ``~/.cache/quantkernels`` (or ``$XDG_CACHE_HOME/quantkernels``), keyed by the recipe, so tests and tools
that need a trained CNN (the int8 accuracy test, QAT, GPTQ, sensitivity analysis) do not retrain.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049
# Mean and standard deviation of the training pixels scaled to [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def data_root() -> Path:
    return Path(os.environ.get("QUANTKERNELS_FASHION_MNIST", DEFAULT_ROOT))


def available() -> bool:
    return all((data_root() / name).is_file() for names in FILES.values() for name in names)


def load(split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: float32 ``(N, 1, 28, 28)`` normalized with the training mean and std, int64 ``(N,)``."""
    if split not in FILES:
        raise ValueError(f"split: got {split!r}, expected one of {list(FILES)}")
    if not available():
        raise FileNotFoundError(f"Fashion-MNIST not found under {data_root()}: apt-get install dataset-fashion-mnist, "
                                f"or point QUANTKERNELS_FASHION_MNIST at a directory holding {FILES[split]}")
    images_file, labels_file = (data_root() / name for name in FILES[split])
    pixels = _read_idx(images_file, IDX_IMAGES_MAGIC, dims=3)
    labels = _read_idx(labels_file, IDX_LABELS_MAGIC, dims=1)
    images = (pixels.to(torch.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    return images.unsqueeze(1), labels.to(torch.int64)


def _read_idx(path: Path, magic: int, dims: int) -> torch.Tensor:
    """An IDX file: big-endian int32 magic and ``dims`` sizes, then uint8 values."""
    raw = gzip.decompress(path.read_bytes())
    header = [int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(1 + dims)]
    if header[0] != magic:
        raise ValueError(f"{path}: got magic number {header[0]}, expected {magic} (not an IDX file of this kind?)")
    data = torch.frombuffer(bytearray(raw[4 * (1 + dims) :]), dtype=torch.uint8)
    return data.reshape(header[1:])


class SmallCNN(nn.Module):
    """Two 3x3 convs and two linear layers, ~0.1M weights and ~0.45M multiply-adds per image (the strided
    second conv instead of a pooled one saves 4x there), so training is cheap on a CPU. With ``batchnorm``, each
    conv is followed by a BatchNorm2d (and has no bias), as in most CNNs."""

    def __init__(self, batchnorm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=not batchnorm)  # 28x28, pooled to 14x14
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=not batchnorm)  # 7x7
        self.bn1, self.bn2 = (nn.BatchNorm2d(16), nn.BatchNorm2d(32)) if batchnorm else (nn.Identity(), nn.Identity())
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How :func:`trained_cnn` trains; part of the cache key, so changing it retrains."""

    train_images: int = 20000  # a fixed subset of the 60000: ~87% test top-1 in ~30 s on one idle core
    epochs: int = 2
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    batchnorm: bool = False  # SmallCNN(batchnorm)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
          seed: int, threads: int = 1) -> nn.Module:
    """Adam on cross-entropy, shuffled by a generator seeded with ``seed``; returns ``model`` in eval mode.

    Runs on ``threads`` threads (then restores the setting): a fixed count keeps the float sums, hence the
    trained weights, the same from run to run whatever the machine's core count, and small convs gain little
    from a second thread.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                optimizer.zero_grad()
                F.cross_entropy(model(images[batch]), labels[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads_before)
    return model.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    correct = 0
    with torch.inference_mode():
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            correct += int((model(x).argmax(dim=1) == y).sum())
    return 100.0 * correct / len(labels)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quantkernels"


def trained_cnn(recipe: Recipe = Recipe(), cache: Optional[Path] = None) -> SmallCNN:
    """The fp32 :class:`SmallCNN` trained by ``recipe``, from the cache when it was trained before."""
    model = _seeded_model(recipe.seed, recipe.batchnorm)
    key = hashlib.sha256(repr((recipe, repr(model))).encode()).hexdigest()[:16]
    path = (cache_dir() if cache is None else Path(cache)) / f"fashion_mnist_cnn-{key}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    images, labels = load("train")
    train(model, images[: recipe.train_images], labels[: recipe.train_images], epochs=recipe.epochs,
          batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a concurrent reader sees either no file or a whole one.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        torch.save(model.state_dict(), f)
    os.replace(f.name, path)
    return model


def _seeded_model(seed: int, batchnorm: bool) -> SmallCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(batchnorm)
