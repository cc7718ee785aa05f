"""Issue 6's conv targets timed block-paired: ours and the target's baseline in alternating blocks of calls in one
process, so that both see the same host (a vCPU taken away for a second, a busy neighbour) and the same caches.

    python -m benchmarks.paired                               # every conv target: ~1 min on 2 cores
    python -m benchmarks.paired -k pointwise --blocks 30 --calls 10

A block makes two untimed calls (they bring the input and the kernel's state into cache, as back-to-back
benchmark rounds find them) and then ``calls`` timed ones, each on the next of the implementation's weight copies
(as many as the benchmarks rotate over, at most ``--copies``); its median is kept. Each
pair of blocks, ours and the baseline's (which goes first alternates), gives one ratio baseline / ours; the
verdict is on the median ratio, "within noise" where the ratios' quartiles have the target between them.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
import warnings

import torch

from .conftest import ROTATION_BYTES, cpu_model, settle_allocator
from .report import target_test, verdict
from .shapes import CONV_BATCHES, CONV_SHAPES
from .test_conv2d import CONV_IMPLS, ConvImpl, conv_targets, float_weight, make_input


def weight_turns(impl: ConvImpl, shape, w: torch.Tensor, x: torch.Tensor, most: int):
    """An endless turn over the implementation's weight copies: as many as the benchmarks rotate over, at most
    ``most``."""
    state = impl.make(w, shape, x.float())
    count = max(1, min(most, math.ceil(ROTATION_BYTES / max(1, impl.weight_bytes(state)))))
    return itertools.cycle([state] + [impl.copy(state, shape) for _ in range(count - 1)])


def block_median(impl: ConvImpl, shape, x: torch.Tensor, turn, calls: int) -> float:
    for _ in range(2):
        impl.run(x, next(turn), shape)
    times = []
    for _ in range(calls):
        state = next(turn)
        start = time.perf_counter()
        impl.run(x, state, shape)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratios(ours: ConvImpl, base: ConvImpl, shape, batch: int, blocks: int, calls: int, most: int) -> list:
    w = float_weight(shape)
    torch.manual_seed(0)
    x = make_input(shape, batch, ours)
    x_base = x if (base.act_dtype, base.channels_last) == (ours.act_dtype, ours.channels_last) else \
        make_input(shape, batch, base)
    sides = [(ours, x, weight_turns(ours, shape, w, x, most)), (base, x_base, weight_turns(base, shape, w, x, most))]
    ratios = []
    for i in range(blocks):
        order = sides if i % 2 == 0 else sides[::-1]
        medians = {impl.name: block_median(impl, shape, xi, turn, calls) for impl, xi, turn in order}
        ratios.append(medians[base.name] / medians[ours.name])
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only the targets whose row contains this text")
    parser.add_argument("--blocks", type=int, default=20, help="pairs of blocks per target (default 20)")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per block (default 10)")
    parser.add_argument("--copies", type=int, default=64, help="most weight copies an implementation rotates over")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.calls < 1 or args.copies < 1:
        parser.error(f"--blocks, --calls and --copies: got {args.blocks}, {args.calls} and {args.copies}, "
                     "expected positive counts")
    settle_allocator()
    # torch.ao warns of its deprecation on every quantized tensor the baseline builds (see conftest.py).
    warnings.filterwarnings("ignore", message=".*(torch.ao.quantization is deprecated|quantized tensor creation)")
    by_name = {impl.name: impl for impl in CONV_IMPLS}
    print(f"# Conv targets, block-paired: {cpu_model()}, {torch.get_num_threads()} threads, {args.blocks} block "
          f"pairs of {args.calls} calls\n")
    print("| layer | batch | ours | target | median ratio | quartiles | |")
    print("| --- | ---: | --- | --- | --- | --- | --- |")
    for shape, batch, impl in itertools.product(CONV_SHAPES, CONV_BATCHES, CONV_IMPLS):
        for target in conv_targets(impl, shape, batch):
            want, meets = target_test(target.as_dict())
            row = f"| {shape.id()} | {batch} | {impl.name} | {want} |"
            if args.k not in row:
                continue
            ratios = paired_ratios(impl, by_name[target.vs], shape, batch, args.blocks, args.calls, args.copies)
            median = statistics.median(ratios)
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (median,) * 3
            status = verdict(meets(median), (meets(q1), meets(q3)))
            print(f"{row} {median:.2f}× | {q1:.2f}-{q3:.2f}× | {status} |", flush=True)


if __name__ == "__main__":
    main()
