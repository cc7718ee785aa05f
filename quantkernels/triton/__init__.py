"""Triton kernels for the ``quant::`` ops on CUDA.

Imported only where Triton is installed (``quantkernels/__init__.py`` registers them when CUDA is available
too). Layout: ``dequant`` (the one helper that reads stored weights), ``tiles`` (contraction and epilogue
shared by the kernels), ``activations`` (dynamic int8 activations), ``linear`` and ``conv2d`` (the kernels
and their wrappers), ``configs`` (tile configurations by problem size), ``register`` (the CUDA kernels of the
existing op schemas).
"""
