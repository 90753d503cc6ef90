"""Quadratic Bezier interpolation of flat parameter buffers: w(t) = (1-t)^2 a + 2t(1-t) m + t^2 b.

Every parameter of a model lives in one flat buffer per control point, so one call interpolates the whole
model. ``bezier_point`` dispatches on the buffers' device (see ``_dispatch``): the torch twin below on CPU, one
fused Triton launch on CUDA (forward w, backward all needed gradients in one more launch), registered as the
``torch.ops.tsc_fast.bezier_point`` custom op so ``torch.compile`` traces through it.
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from ._math import bezier_coefficients


def _check_buffers(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor) -> None:
    for name, buf in (("a", a), ("m", m), ("b", b)):
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"bezier_point: {name} must be a torch.Tensor, got {type(buf).__name__}")
        if buf.dim() != 1:
            raise ValueError(f"bezier_point: {name} must be a flat 1-D buffer, got shape {tuple(buf.shape)}")
        if not buf.is_floating_point():
            raise TypeError(f"bezier_point: {name} must be floating point, got {buf.dtype}")
    if not (a.shape == m.shape == b.shape):
        raise ValueError(
            f"bezier_point: control points differ in length: {a.numel()}, {m.numel()}, {b.numel()}"
        )
    if not (a.dtype == m.dtype == b.dtype):
        raise TypeError(f"bezier_point: control points differ in dtype: {a.dtype}, {m.dtype}, {b.dtype}")
    if not (a.device == m.device == b.device):
        raise ValueError(
            f"bezier_point: control points on different devices: {a.device}, {m.device}, {b.device}"
        )


def bezier_point_torch(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Torch twin: three passes over memory (scale, two fused multiply-adds), differentiable in a, m, b."""
    c0, c1, c2 = bezier_coefficients(t)
    w = a * c0
    w.add_(m, alpha=c1)
    w.add_(b, alpha=c2)
    return w


def bezier_point(
    a: torch.Tensor,
    m: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The curve's point at ``t`` for flat control-point buffers ``a``, ``m``, ``b`` (same length, dtype, device).

    Differentiable with respect to whichever buffers require grad. ``out`` (no autograd) writes the point into an
    existing buffer, for extracting a model at t*. ``backend`` overrides the ``TSC_FAST_KERNELS`` switch
    (``"auto"``, ``"triton"`` or ``"torch"``).
    """
    _check_buffers(a, m, b)
    t = float(t)
    use_triton = resolve_backend(a, backend) == "triton"
    if out is not None:
        return _bezier_point_into(a, m, b, t, out, use_triton)
    if not use_triton:
        return bezier_point_torch(a, m, b, t)
    from . import _bezier_ops  # registers the custom ops on first use of the Triton path

    return _bezier_ops.bezier_point_op(a, m, b, t)


def _bezier_point_into(
    a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, t: float, out: torch.Tensor, use_triton: bool
) -> torch.Tensor:
    if torch.is_grad_enabled() and (a.requires_grad or m.requires_grad or b.requires_grad):
        raise ValueError("bezier_point: out= does not support autograd; call it under torch.no_grad()")
    if out.shape != a.shape or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(
            f"bezier_point: out must match the control points (shape {tuple(a.shape)}, {a.dtype}, {a.device}),"
            f" got shape {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if use_triton:
        from . import _triton_bezier  # imports triton: only when a kernel runs

        _triton_bezier.combine(a, m, b, t, out)
        return out
    with torch.no_grad():
        c0, c1, c2 = bezier_coefficients(t)
        torch.mul(a, c0, out=out)
        out.add_(m, alpha=c1)
        out.add_(b, alpha=c2)
    return out
