"""One kernel launch, planned by an op wrapper before it runs: the ops run their plans, and the ahead-of-time
compile test compiles the very same kernels, arguments and configurations for sm_80 and sm_90."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Launch:
    kernel: object  # a @triton.jit function
    grid: tuple
    args: dict  # every kernel argument by name, constexprs included
    num_warps: int  # (software pipelining depth is a constexpr of the kernels that loop over K)

    def __call__(self) -> None:
        # wrap_triton: under torch.compile the launch becomes a graph node Inductor compiles with the graph;
        # eagerly (wrap_triton disabled by the registered kernel) it is the plain Triton launch.
        torch.library.wrap_triton(self.kernel)[self.grid](**self.args, num_warps=self.num_warps)

