"""The Triton kernels' tile configurations: a small fixed set chosen by the number of output rows, no autotuning.

Plain Python (no Triton import), so the configurations can be listed and compiled ahead of time anywhere.

Every kernel keeps a K-tile inside one scale group, so that it can contract integer codes exactly and multiply
by the group's scale once per tile (see ``dequant.load_weight_tile``): the effective ``block_k`` is lowered to
``group_len`` for grouped weights (group sizes and block sizes are both powers of two, so a lowered tile still
divides the group). Per-channel weights are one group per row and keep the configured ``block_k``.

Sizes are for the tensor-core GPUs Triton targets (A100: 108 SMs, 164 KB shared memory per block; H100:
132 SMs, 227 KB), derived in the comments beside each configuration.
"""

from __future__ import annotations

import dataclasses
import math

from ..formats import GROUP_SIZES


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a tiled kernel (linear or conv2d); block_k is for 16-bit activations."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # output tiles visited GROUP_M rows at a time, so W tiles are reused from L2
    split_k: bool = False  # may several programs share one output tile's K range (partials + a reduce)
    tap_major: bool = True  # conv2d: may per-channel int8 weights walk K tap by tap (see tap_major below)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"{name}: got {value}, expected a power of two")

    def specialize(self, group_len: int, single_group: bool, activation_bytes: int) -> "TileConfig":
        """The configuration one call runs with.

        float32 activations halve block_k: the x tile keeps its bytes, and their tf32x3 products (three MMAs
        on split operands, see ``tiles.contract``) need the registers; at full block_k ptxas spills on sm_80.
        Then block_k is lowered to the group length so that a tile stays inside one scale group.
        """
        block_k = self.block_k // 2 if activation_bytes == 4 else self.block_k
        if not single_group:
            block_k = min(block_k, group_len)
        return dataclasses.replace(self, block_k=block_k)


# Linear: (largest M, config), smallest first. M is the number of rows of x after flattening the batch dims.
# Every configuration compiles without register spills on sm_80 and sm_90 (python_tests/test_triton_compile.py).
LINEAR_CONFIGS = (
    # M = 1, GEMV: one row, contracted with FMAs (a tensor-core tile would be 15/16 padding). A 64 x 128 int4
    # tile is 4 KB of packed weight per iteration, 32 B per thread at 4 warps; 3 stages keep two more tiles
    # in flight per program while one is reduced. Measured on an H100 (benchmarks/sweep_triton.py gemv,
    # int4 g128, 4096x4096 / 11008x4096): 16.7 / 33.8 us against 17.1 / 40.7 for 32 x 128, the best of
    # 12 tile shapes, warps and stages.
    (1, TileConfig(block_m=1, block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=True)),
    # M = 2..16, skinny: still weight-bound, but FMAs would cost 16x the M=1 work, so rows are padded to the
    # 16-row minimum of an MMA. 64 x 128 int4 is 4 KB of weight per iteration; x adds 16 x 128 x 2 B = 4 KB.
    (16, TileConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=True)),
    # M = 17..64: one 64-row MMA tile covers M. Each K tile's MMA result is scaled into a second float32
    # accumulator (exact group scales), so accumulators cost 2 x 64 x 64 / 128 threads = 64 registers.
    (64, TileConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4)),
    # M > 64, GEMM: 128 x 64 tiles at 8 warps, again 64 accumulator registers per thread; 128 x 128 left
    # under 10 registers of headroom and spilled on sm_80. Per stage x 16 KB + packed W 2 KB, 3 stages.
    (math.inf, TileConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)),
)

# Conv2d (implicit GEMM, M = batch * out_h * out_w rows): no split-K, as K = C*kh*kw is short and M usually
# large. Gathering patches takes per-element addresses and masks (64-bit pointers: 2 registers each), so the
# 64 x 64 tile runs 8 warps (32 elements per thread at 4 warps spilled).
CONV2D_CONFIGS = (
    (16, TileConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)),
    (64, TileConfig(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3, tap_major=False)),
    (math.inf, TileConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)),
)

# Per-channel int8 conv weights with at least this many input channels per group walk K tap by tap
# (conv2d_kernel's TAP_MAJOR): fewer channels would leave most of each K tile empty (a 3-channel stem conv: 3
# of 64).
TAP_MAJOR_MIN_CHANNELS = 16


def tap_major(config: TileConfig, bits: int, n_groups: int, channels: int, activation_bytes: int) -> bool:
    """Whether conv2d_kernel walks K tap by tap. Not for int4 weights, float32 activations or the 64-row
    configuration: beside the tap loop's pointers, int4's per-element nibble shifts, tf32x3's split operands
    and the 64 x 64 tile at 8 warps each spilled registers on sm_80 (int4 per channel is rare for convs:
    grouped int4 keeps the (c, r, s) walk)."""
    return (config.tap_major and bits == 8 and n_groups == 1 and channels >= TAP_MAJOR_MIN_CHANNELS
            and activation_bytes <= 2)


# Split-K aims for this many programs: about 4 resident per SM on a 132-SM H100 (and 5 on a 108-SM A100),
# enough loads in flight to stream weights at full bandwidth. A fixed number, so results do not depend on the
# GPU model that ran them.
SPLIT_K_TARGET_PROGRAMS = 512

# The elementwise kernels (per-token int8 quantization, split-K reduction): 1024 elements per program and
# iteration, 8 per thread at 4 warps (two 16-byte fp32 vectors).
ELEMENTWISE_BLOCK = 1024
ELEMENTWISE_WARPS = 4
# Dynamic int8 activations: elements of a row per program (8 iterations of ELEMENTWISE_BLOCK). A linear row
# (K <= 8192) is one chunk; a ResNet-50 stage1 image (256 x 56 x 56) is 98.
QUANTIZE_CHUNK = 8192


def pick(configs, m: int) -> TileConfig:
    return next(config for largest_m, config in configs if m <= largest_m)


def split_k(config: TileConfig, output_tiles: int, k_tiles: int) -> int:
    """How many programs share one output tile's K range (1: none). Each split gets whole tiles."""
    if not config.split_k:
        return 1
    return max(1, min(k_tiles, -(-SPLIT_K_TARGET_PROGRAMS // output_tiles)))


def shipped_block_ks(config: TileConfig) -> list:
    """Every block_k this configuration can run with: the configured one, its float32 half, and the group
    sizes below them."""
    largest = (config.block_k, config.block_k // 2)
    return sorted(set(largest) | {g for g in GROUP_SIZES if g < config.block_k})
