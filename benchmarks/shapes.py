"""The shapes every benchmark draws from, defined once.

Linear shapes are ``(N, K)`` = (out_features, in_features) of a weight; M is the number of activation rows
(tokens). Conv shapes are one layer each, named after the network and stage they come from.
"""

from __future__ import annotations

import dataclasses

# Llama-7B projections (q/k/v/o at 4096x4096, MLP up/gate 11008x4096 and down 4096x11008) and a small
# encoder layer (1536x384: MiniLM's MLP up-projection) where per-call overhead, not bandwidth, dominates.
LINEAR_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (1536, 384))
# M = 1 is token-by-token generation (memory bound); 8 a small decode batch; 32 and 128 prompt processing.
LINEAR_MS = (1, 8, 32, 128)
# The rows at which the dynamic-int8-activation variants (act_int8=True) are benchmarked: below this the
# weights' bytes, not the multiply, set the time, and the weight-only kernels are the ones to use.
ACT_INT8_MS = (32, 128)


@dataclasses.dataclass(frozen=True)
class ConvShape:
    name: str
    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel: int
    stride: int = 1
    groups: int = 1

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def flops(self, batch: int) -> int:
        """Multiply-adds times two over the whole output."""
        k = self.in_channels // self.groups * self.kernel * self.kernel
        return 2 * batch * self.out_channels * self.out_size**2 * k

    def id(self) -> str:
        return f"{self.name} {self.in_channels}->{self.out_channels} @{self.size}"


def _resnet50_stage(stage: int, width: int, size: int):
    # A bottleneck block: 1x1 reduce (4*width -> width), 3x3 (width -> width), 1x1 expand (width -> 4*width).
    return (
        ConvShape(f"resnet50 stage{stage} 1x1 reduce", 4 * width, width, size, 1),
        ConvShape(f"resnet50 stage{stage} 3x3", width, width, size, 3),
        ConvShape(f"resnet50 stage{stage} 1x1 expand", width, 4 * width, size, 1),
    )


CONV_SHAPES = (
    *_resnet50_stage(1, 64, 56),
    *_resnet50_stage(2, 128, 28),
    *_resnet50_stage(3, 256, 14),
    *_resnet50_stage(4, 512, 7),
    # MobileNetV2 inverted-residual blocks (expansion 6): depthwise 3x3 on the expanded channels, then the
    # pointwise projection back down.
    ConvShape("mobilenetv2 depthwise 3x3", 144, 144, 56, 3, groups=144),
    ConvShape("mobilenetv2 pointwise 1x1", 144, 24, 56, 1),
    ConvShape("mobilenetv2 depthwise 3x3", 384, 384, 14, 3, groups=384),
    ConvShape("mobilenetv2 pointwise 1x1", 384, 64, 14, 1),
)
CONV_BATCHES = (1, 8)
