"""Triton kernels and their torch twins (installed as ``tsc_fast.kernels``).

- ``CorrelationAccumulator``: streaming, numerically stable correlation statistics of two feature sets.
- ``bezier_point`` / ``bezier_coefficients``: the quadratic Bezier point of flat parameter buffers.

CUDA tensors run fused Triton kernels, CPU tensors the torch twins; ``TSC_FAST_KERNELS=triton|torch|auto``
forces a side (Triton on CPU tensors needs ``TRITON_INTERPRET=1``). Triton is imported only when a kernel runs.
"""
from ._dispatch import BACKEND_ENV, resolve_backend, triton_installed
from ._math import bezier_coefficients
from .bezier import bezier_point, bezier_point_torch
from .correlation import CorrelationAccumulator, batch_sums_torch

__all__ = [
    "BACKEND_ENV",
    "CorrelationAccumulator",
    "batch_sums_torch",
    "bezier_coefficients",
    "bezier_point",
    "bezier_point_torch",
    "resolve_backend",
    "triton_installed",
]
