"""Choice between the Triton kernels and their torch twins.

CUDA tensors go to Triton, everything else to the torch twin. ``TSC_FAST_KERNELS=triton|torch|auto`` forces a
side for debugging; forcing Triton on CPU tensors needs ``TRITON_INTERPRET=1`` (set before triton is imported),
which is how the tests run the kernels. Triton is imported only when a kernel is about to run, so importing
``tsc_fast.kernels`` stays cheap and works where triton is not installed.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKEND_ENV = "TSC_FAST_KERNELS"
BACKENDS = ("auto", "triton", "torch")


def requested_backend(override: str | None = None) -> str:
    """The backend asked for: ``override`` if given, else the environment switch, else ``"auto"``."""
    choice = override if override is not None else os.environ.get(BACKEND_ENV, "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}/backend must be one of {BACKENDS}, got {choice!r}")
    return choice


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    """Whether the triton package can be imported (checked once, without importing it)."""
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(tensor: torch.Tensor, override: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for work on ``tensor``'s device."""
    choice = requested_backend(override)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if tensor.is_cuda and triton_installed() else "torch"
    if not triton_installed():
        raise RuntimeError(f"{BACKEND_ENV}=triton but the triton package is not installed")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            f"{BACKEND_ENV}=triton on {tensor.device.type} tensors needs TRITON_INTERPRET=1 "
            "set before triton is first imported"
        )
    return "triton"
