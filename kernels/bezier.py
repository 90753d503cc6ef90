"""Quadratic Bezier interpolation of flat parameter buffers (torch reference twin)."""
from __future__ import annotations

import torch


def bezier_coefficients(t: float) -> tuple[float, float, float]:
    """Bernstein weights of the quadratic curve at t: (1-t)^2, 2t(1-t), t^2."""
    t = float(t)
    return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t


def bezier_point(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """w(t) = (1-t)^2 a + 2t(1-t) m + t^2 b; differentiable in all three (autograd)."""
    c0, c1, c2 = bezier_coefficients(t)
    return c0 * a + c1 * m + c2 * b
