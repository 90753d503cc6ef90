"""Fused Triton kernels for the quadratic Bezier point and its gradients (imported only when they run).

Forward: one launch over the whole flat buffer, w = c0*a + c1*m + c2*b. Backward: one launch writing every
needed gradient (c0*g, c1*g, c2*g) from a single read of g. Coefficients travel as Python floats, which
Triton passes as fp32; for fp64 buffers each coefficient is split into an fp32 pair (hi + lo) so it keeps about
48 bits.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting
from ._math import bezier_coefficients

# Large blocks: streaming kernels want many bytes in flight per program, and the interpreter wants few programs.
GPU_BLOCK = 2048
GPU_WARPS = 8
INTERPRETER_BLOCK = 4096


@triton.jit
def _bezier_combine_kernel(
    a_ptr, m_ptr, b_ptr, out_ptr, n,
    c0_hi, c0_lo, c1_hi, c1_lo, c2_hi, c2_lo,
    BLOCK: tl.constexpr, WIDE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if WIDE:
        c0 = tl.cast(c0_hi, tl.float64) + tl.cast(c0_lo, tl.float64)
        c1 = tl.cast(c1_hi, tl.float64) + tl.cast(c1_lo, tl.float64)
        c2 = tl.cast(c2_hi, tl.float64) + tl.cast(c2_lo, tl.float64)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        c0 = c0_hi
        c1 = c1_hi
        c2 = c2_hi
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = c0 * a + c1 * m + c2 * b
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bezier_grad_kernel(
    g_ptr, ga_ptr, gm_ptr, gb_ptr, n,
    c0_hi, c0_lo, c1_hi, c1_lo, c2_hi, c2_lo,
    BLOCK: tl.constexpr, WIDE: tl.constexpr,
    NEED_A: tl.constexpr, NEED_M: tl.constexpr, NEED_B: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if WIDE:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        c0 = tl.cast(c0_hi, tl.float64) + tl.cast(c0_lo, tl.float64)
        c1 = tl.cast(c1_hi, tl.float64) + tl.cast(c1_lo, tl.float64)
        c2 = tl.cast(c2_hi, tl.float64) + tl.cast(c2_lo, tl.float64)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c0 = c0_hi
        c1 = c1_hi
        c2 = c2_hi
    if NEED_A:
        tl.store(ga_ptr + offs, (c0 * g).to(ga_ptr.dtype.element_ty), mask=mask)
    if NEED_M:
        tl.store(gm_ptr + offs, (c1 * g).to(gm_ptr.dtype.element_ty), mask=mask)
    if NEED_B:
        tl.store(gb_ptr + offs, (c2 * g).to(gb_ptr.dtype.element_ty), mask=mask)


def _split_fp32(value: float) -> tuple[float, float]:
    """value ~= hi + lo with hi, lo both exactly representable in fp32."""
    hi = _round_fp32(value)
    return hi, _round_fp32(value - hi)


def _round_fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _coefficient_args(t: float) -> list[float]:
    args: list[float] = []
    for c in bezier_coefficients(t):
        args.extend(_split_fp32(c))
    return args


def _launch_shape(n: int, block: int | None) -> tuple[int, int]:
    if block is None:
        block = INTERPRETER_BLOCK if interpreting() else GPU_BLOCK
    return block, triton.cdiv(max(n, 1), block)


def combine(
    a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, t: float, out: torch.Tensor, block: int | None = None
) -> torch.Tensor:
    """Write c0*a + c1*m + c2*b into ``out`` (all 1-D, same length and dtype) in one launch."""
    a, m, b = a.contiguous(), m.contiguous(), b.contiguous()
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    n = a.numel()
    if n:
        block, programs = _launch_shape(n, block)
        _bezier_combine_kernel[(programs,)](
            a, m, b, target, n, *_coefficient_args(t),
            BLOCK=block, WIDE=a.dtype == torch.float64, num_warps=GPU_WARPS,
        )
    if target is not out:
        out.copy_(target)
    return out


def gradients(
    grad_w: torch.Tensor, t: float, need: tuple[bool, bool, bool], block: int | None = None
) -> list[torch.Tensor | None]:
    """[c0*g, c1*g, c2*g] for the requested entries (None elsewhere), from one read of ``grad_w``."""
    g = grad_w.contiguous()
    outs = [torch.empty_like(g) if wanted else None for wanted in need]
    n = g.numel()
    if n and any(need):
        block, programs = _launch_shape(n, block)
        dummy = g  # never written: the matching NEED_* flag is off
        _bezier_grad_kernel[(programs,)](
            g, *(o if o is not None else dummy for o in outs), n, *_coefficient_args(t),
            BLOCK=block, WIDE=g.dtype == torch.float64,
            NEED_A=need[0], NEED_M=need[1], NEED_B=need[2], num_warps=GPU_WARPS,
        )
    return outs
