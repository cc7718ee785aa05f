"""The Triton kernels compile for real GPUs (sm_80 A100, sm_90 H100), checked on a machine without one.

Every kernel is compiled ahead of time down to PTX and a cubin (Triton bundles ptxas) at every shipped tile
configuration, with the exact arguments the op wrappers launch it with (``plan_linear`` / ``plan_conv2d`` on
CPU tensors, specialized by Triton's own launcher code). Then: kernels that contract with ``tl.dot`` emit
tensor-core MMAs (``mma.sync`` on sm_80, ``wgmma`` or ``mma.sync`` on sm_90), shared memory fits the device,
and ptxas reports no register spills.

Compilation runs in a subprocess without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` builds
interpreted functions, which cannot be compiled), with a fresh Triton cache so that ptxas really runs. The
specialization reuses two Triton 3.9 internals (the launcher's binder and ``JITFunction._pack_args``).
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

pytest.importorskip("triton", reason="Triton is not installed: there are no GPU kernels to compile")

ARCHS = (80, 90)
# Largest shared memory one block may use (opt-in): A100 163 KB, H100 227 KB (CUDA programming guide,
# "Technical Specifications per Compute Capability").
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, bits, act_int8, x dtype name, group_size, symmetric): one of each weight format and activation
# kind; every tiled configuration compiles with each, so each MMA operand type is seen at each configuration.
VARIANTS = (
    ("int4-asym-fp16", 4, False, "float16", 128, False),
    ("int4-sym-bf16", 4, False, "bfloat16", 128, True),
    ("int8-fp32", 8, False, "float32", None, True),
    ("int8-bf16", 8, False, "bfloat16", None, True),
    ("w4a8", 4, True, "float16", 128, False),
    ("w8a8", 8, True, "bfloat16", 128, True),
)
# The smaller block_k a configuration runs with for small groups (configs.shipped_block_ks).
SMALL_GROUP_VARIANT = "int4-asym-fp16"
# Conv shares the contraction with linear; it compiles with one variant per MMA operand type but float16, and
# int8 weights with bf16 and with int8 activations for its tap-major K walk.
CONV_VARIANTS = ("int4-sym-bf16", "int8-fp32", "int8-bf16", "w4a8", "w8a8")


def _stored_weight(torch, bits, n, k, group_size, symmetric):
    """Random bytes in the stored shapes: compilation needs shapes and dtypes, not quantized values."""
    from quantkernels.formats import padded_k

    k_pad = padded_k(bits, k, group_size)
    n_groups = k_pad // (group_size or k_pad)
    qweight = torch.randint(0, 255, (n, k_pad // 2), dtype=torch.uint8) if bits == 4 else torch.randint(
        -127, 128, (n, k_pad), dtype=torch.int8)
    zero = torch.randint(0, 16, (n, n_groups), dtype=torch.uint8) if bits == 4 and not symmetric else None
    return qweight, torch.rand(n, n_groups), zero


def planned_launches():
    """(description, Launch) for every kernel at every shipped configuration, as the wrappers plan them."""
    import torch

    from quantkernels.triton import configs
    from quantkernels.triton.conv2d import plan_conv2d
    from quantkernels.triton.linear import plan_linear

    n = k = 4096  # a transformer projection: N and K multiples of 16 like real models
    for largest_m, config in configs.LINEAR_CONFIGS:
        m = min(largest_m, 256)
        for label, bits, act_int8, dtype, group_size, symmetric in VARIANTS:
            group_sizes = [group_size]
            if label == SMALL_GROUP_VARIANT:
                group_sizes += [g for g in configs.shipped_block_ks(config) if g != config.block_k]
            for g in group_sizes:
                qweight, scale, zero = _stored_weight(torch, bits, n, k, g, symmetric)
                x = torch.randn(m, k, dtype=getattr(torch, dtype))
                _, launches = plan_linear(bits, act_int8, x, qweight, scale, zero, torch.randn(n))
                for launch in launches:
                    yield f"linear M={m} {label} group={g}", launch

    # Conv: a 3x3, 64 -> 128 channel layer at batch/spatial sizes that land in each configuration.
    for largest_m, config in configs.CONV2D_CONFIGS:
        side = {16: 4, 64: 8}.get(largest_m, 16)
        for label, bits, act_int8, dtype, group_size, symmetric in VARIANTS:
            if label not in CONV_VARIANTS:
                continue
            for g in dict.fromkeys((group_size, None)):  # grouped: (c, r, s) K walk; per channel: tap-major too
                qweight, scale, zero = _stored_weight(torch, bits, 128, 64 * 9, g, symmetric)
                x = torch.randn(1, 64, side, side, dtype=getattr(torch, dtype))
                _, launches = plan_conv2d(bits, x, qweight, scale, zero, torch.randn(128), [3, 3], [1, 1], [1, 1],
                                          [1, 1], 1, act_int8)
                for launch in launches:
                    yield f"conv2d M={side * side} {label} group={g}", launch


_JOBS = []  # filled before the worker processes fork, so that kernels and tensors need no pickling


def _compile(index):
    """Compiles one launch for one architecture exactly as Triton's launcher would specialize it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    description, kernel, args, num_warps, arch = _JOBS[index]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(args, num_warps=num_warps)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    ptxas = log.getvalue()
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas)]
    registers = re.findall(r"Used (\d+) registers", ptxas)
    return {
        "description": description,
        "kernel": kernel.__name__,
        "arch": arch,
        "tile": {name: value for name, value in args.items() if name.isupper()},
        "num_warps": num_warps,
        "has_cubin": bool(compiled.asm.get("cubin")),
        "mma": sorted(set(re.findall(r"\b(mma\.sync\.aligned\.\S+|wgmma\.mma_async\.\S+?)\s", compiled.asm["ptx"]))),
        "shared_bytes": compiled.metadata.shared,
        "spill_bytes": sum(spills) if spills else None,
        "registers": int(registers[0]) if registers else None,
    }


def compile_all() -> list:
    seen = set()
    for description, launch in planned_launches():
        key = (launch.kernel.__name__, launch.num_warps,
               tuple(sorted((k, str(v.dtype) if hasattr(v, "dtype") else repr(v)) for k, v in launch.args.items()
                            if k.isupper() or hasattr(v, "dtype") or v is None)))
        if key in seen:
            continue
        seen.add(key)
        for arch in ARCHS:
            _JOBS.append((description, launch.kernel, launch.args, launch.num_warps, arch))
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile, range(len(_JOBS))))


@pytest.fixture(scope="module")
def compiled():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _uses_dot(record):
    return record["kernel"] in ("linear_kernel", "conv2d_kernel") and record["tile"]["BLOCK_M"] >= 16


def test_every_configuration_compiles_for_both_archs(compiled):
    from quantkernels.triton import configs

    for arch in ARCHS:
        records = [r for r in compiled if r["arch"] == arch]
        assert all(r["has_cubin"] for r in records)
        for kernel, table in (("linear_kernel", configs.LINEAR_CONFIGS), ("conv2d_kernel", configs.CONV2D_CONFIGS)):
            for _, config in table:
                tiles = {(r["tile"]["BLOCK_M"], r["tile"]["BLOCK_N"], r["tile"]["BLOCK_K"]) for r in records
                         if r["kernel"] == kernel and r["num_warps"] == config.num_warps}
                for block_k in configs.shipped_block_ks(config):
                    assert (config.block_m, config.block_n, block_k) in tiles, (arch, kernel, config, block_k)
        elementwise = {"chunk_absmax_kernel", "quantize_chunk_kernel", "splitk_reduce_kernel"}
        assert elementwise <= {r["kernel"] for r in records}


def test_dot_kernels_use_tensor_cores(compiled):
    want_operand = {"float16": "f16", "bfloat16": "bf16", "float32": "tf32", "int8": "s8"}
    for record in filter(_uses_dot, compiled):
        assert record["mma"], f"{record['description']} sm_{record['arch']}: no MMA instruction in the PTX"
        variant = next(v for v in VARIANTS if v[0] in record["description"])
        operand = want_operand["int8" if variant[2] else variant[3]]
        assert all(operand in instruction for instruction in record["mma"]), (record["description"], record["mma"])


def test_shared_memory_fits(compiled):
    for record in compiled:
        assert record["shared_bytes"] <= MAX_SHARED_BYTES[record["arch"]], record


def test_no_register_spills(compiled):
    for record in compiled:
        assert record["spill_bytes"] == 0, record


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    print(json.dumps(compile_all()))
