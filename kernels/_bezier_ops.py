"""``torch.ops.tsc_fast.bezier_point`` and its backward as torch.library custom ops over the Triton kernels.

Custom ops give eager autograd (the autograd Function of the kernel) and let ``torch.compile`` keep them in one
graph (opaque nodes with fake-tensor shape rules). Registered on first use of the Triton path; triton itself is
imported only when an op runs on real tensors.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("tsc_fast::bezier_point", mutates_args=())
def bezier_point_op(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Fused w = (1-t)^2 a + 2t(1-t) m + t^2 b (one Triton launch)."""
    from . import _triton_bezier

    return _triton_bezier.combine(a, m, b, t, torch.empty_like(a, memory_format=torch.contiguous_format))


@bezier_point_op.register_fake
def _(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.custom_op("tsc_fast::bezier_point_backward", mutates_args=())
def bezier_point_backward_op(
    grad_w: torch.Tensor, t: float, need_a: bool, need_m: bool, need_b: bool
) -> list[torch.Tensor]:
    """The needed gradients among (c0*g, c1*g, c2*g), in that order, from one Triton launch."""
    from . import _triton_bezier

    grads = _triton_bezier.gradients(grad_w, t, (need_a, need_m, need_b))
    return [g for g in grads if g is not None]


@bezier_point_backward_op.register_fake
def _(grad_w: torch.Tensor, t: float, need_a: bool, need_m: bool, need_b: bool) -> list[torch.Tensor]:
    count = int(need_a) + int(need_m) + int(need_b)
    return [torch.empty_like(grad_w, memory_format=torch.contiguous_format) for _ in range(count)]


def _setup_context(ctx, inputs, output) -> None:
    ctx.t = inputs[3]


def _backward(ctx, grad_w: torch.Tensor):
    need = tuple(bool(flag) for flag in ctx.needs_input_grad[:3])
    grads = iter(bezier_point_backward_op(grad_w, ctx.t, *need) if any(need) else [])
    return tuple(next(grads) if wanted else None for wanted in need) + (None,)


bezier_point_op.register_autograd(_backward, setup_context=_setup_context)
