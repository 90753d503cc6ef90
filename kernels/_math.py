"""Small facts shared by the kernels and their torch twins (a leaf: imports nothing of the package)."""
from __future__ import annotations

PRECISIONS = ("ieee", "tf32", "tf32x3")  # tl.dot input precisions the correlation kernel accepts


def bezier_coefficients(t: float) -> tuple[float, float, float]:
    """Bernstein weights of the quadratic curve at t: (1-t)^2, 2t(1-t), t^2."""
    t = float(t)
    return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t
