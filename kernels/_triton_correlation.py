"""Fused Triton kernel for one batch of correlation statistics (imported only when it runs).

One launch computes, about per-channel shifts kx, ky (close to the means, so fp32 does not cancel):
    sum_xy = sum_m (x_m - kx)(y_m - ky)^T      (tl.dot, fp32 accumulation)
    sum_x, sum_xx, sum_y, sum_yy                (column sums and sums of squares, same pass)
Grid: (channel tiles of X) x (channel tiles of Y) x (row splits). Row splits give parallelism when there are
few channel tiles and a pairwise-style reduction over rows; their partial sums are added on the host in the
accumulator's dtype. Samples are addressed as (outer, inner) index pairs with arbitrary strides, so (N, C, H, W)
features are read in place. For self-statistics only tiles on or above the diagonal run and each also stores its
mirror image.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting
from ._math import PRECISIONS

# One config in the interpreter (autotuning several fails there); large tiles keep the program count low.
INTERPRETER_CONFIG = {"BLOCK_N": 128, "BLOCK_M": 128}
NOMINAL_TILE = 128  # tile edge used to size the row split, independent of the config autotuning picks
MIN_ROWS_PER_SPLIT = 2048
MAX_PARTIAL_BYTES = 256 * 2**20


@triton.jit
def _correlation_batch_kernel(
    x_ptr, y_ptr, shift_x_ptr, shift_y_ptr,
    sxy_ptr, sx_ptr, sxx_ptr, sy_ptr, syy_ptr,
    M, C, D, rows_per_split,
    x_inner, x_stride_outer, x_stride_inner, x_stride_c,
    y_inner, y_stride_outer, y_stride_inner, y_stride_d,
    SELF: tl.constexpr, PRECISION: tl.constexpr, X_FLAT: tl.constexpr, Y_FLAT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    if SELF:
        if pid_c > pid_d:
            return  # the tile above the diagonal writes this one

    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < C
    mask_d = offs_d < D
    kx = tl.load(shift_x_ptr + offs_c, mask=mask_c, other=0.0)
    ky = tl.load(shift_y_ptr + offs_d, mask=mask_d, other=0.0)
    col_x = offs_c.to(tl.int64) * x_stride_c
    col_y = offs_d.to(tl.int64) * y_stride_d

    if SELF:
        x_sums_here = pid_c == pid_d
        y_sums_here = pid_c < 0  # never: Y is X
    else:
        x_sums_here = pid_d == 0
        y_sums_here = pid_c == 0

    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_yy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        rows64 = rows.to(tl.int64)
        if X_FLAT:  # plain (M, C) matrix: keep the address arithmetic simple enough for vectorised loads
            x_rows = rows64 * x_stride_outer
        else:
            x_rows = (rows64 // x_inner) * x_stride_outer + (rows64 % x_inner) * x_stride_inner
        if Y_FLAT:
            y_rows = rows64 * y_stride_outer
        else:
            y_rows = (rows64 // y_inner) * y_stride_outer + (rows64 % y_inner) * y_stride_inner

        mask_xt = mask_c[:, None] & mask_m[None, :]
        xt = tl.load(x_ptr + col_x[:, None] + x_rows[None, :], mask=mask_xt, other=0.0).to(tl.float32)
        xt = tl.where(mask_xt, xt - kx[:, None], 0.0)  # (BLOCK_N channels, BLOCK_M rows)
        mask_yb = mask_m[:, None] & mask_d[None, :]
        yb = tl.load(y_ptr + y_rows[:, None] + col_y[None, :], mask=mask_yb, other=0.0).to(tl.float32)
        yb = tl.where(mask_yb, yb - ky[None, :], 0.0)  # (BLOCK_M rows, BLOCK_N channels)

        acc = tl.dot(xt, yb, acc, input_precision=PRECISION)
        if x_sums_here:
            sum_x += tl.sum(xt, axis=1)
            sum_xx += tl.sum(xt * xt, axis=1)
        if y_sums_here:
            sum_y += tl.sum(yb, axis=0)
            sum_yy += tl.sum(yb * yb, axis=0)

    base = split.to(tl.int64) * C * D
    mask_cd = mask_c[:, None] & mask_d[None, :]
    tl.store(sxy_ptr + base + offs_c.to(tl.int64)[:, None] * D + offs_d[None, :], acc, mask=mask_cd)
    if SELF:
        if pid_c < pid_d:
            tl.store(sxy_ptr + base + offs_d.to(tl.int64)[None, :] * C + offs_c[:, None], acc, mask=mask_cd)
    if x_sums_here:
        tl.store(sx_ptr + split * C + offs_c, sum_x, mask=mask_c)
        tl.store(sxx_ptr + split * C + offs_c, sum_xx, mask=mask_c)
    if y_sums_here:
        tl.store(sy_ptr + split * D + offs_d, sum_y, mask=mask_d)
        tl.store(syy_ptr + split * D + offs_d, sum_yy, mask=mask_d)


def _gpu_configs() -> list:
    configs = []
    for block_n, block_m, warps, stages in (
        (128, 32, 8, 3),
        (128, 32, 4, 4),
        (128, 64, 8, 3),
        (64, 32, 4, 4),
        (64, 64, 4, 3),
    ):
        configs.append(
            triton.Config({"BLOCK_N": block_n, "BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
        )
    return configs


@lru_cache(maxsize=None)
def _tuned_kernel():
    """The kernel autotuned over a few tile shapes (on a GPU; rerunning it is harmless: it only stores)."""
    key = ["C", "D", "SELF", "PRECISION", "X_FLAT", "Y_FLAT"]
    return triton.autotune(configs=_gpu_configs(), key=key)(_correlation_batch_kernel)


def sample_layout(x: torch.Tensor, channel_axis: int) -> tuple[torch.Tensor, int, int, int, int]:
    """(tensor, inner, stride_outer, stride_inner, stride_channel) addressing x's samples in place.

    Sample m sits at (m // inner) * stride_outer + (m % inner) * stride_inner. Non-channel dimensions are merged
    where their strides allow; if more than two remain, x is copied to a contiguous (M, C) matrix.
    """
    dims = [
        (size, stride)
        for axis, (size, stride) in enumerate(zip(x.shape, x.stride()))
        if axis != channel_axis and size != 1
    ]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    stride_c = x.stride(channel_axis)
    if not merged:
        return x, 1, 0, 0, stride_c
    if len(merged) == 1:
        return x, 1, merged[0][1], 0, stride_c
    if len(merged) == 2:
        return x, merged[1][0], merged[0][1], merged[1][1], stride_c
    flat = x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis]).contiguous()
    return flat, 1, flat.stride(0), 0, 1


def _row_splits(rows: int, tiles: int, channels_x: int, channels_y: int, device: torch.device) -> int:
    if interpreting() or not torch.cuda.is_available() or device.type != "cuda":
        return 1
    target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    by_parallelism = triton.cdiv(target_programs, max(tiles, 1))
    by_rows = max(1, rows // MIN_ROWS_PER_SPLIT)
    by_memory = max(1, MAX_PARTIAL_BYTES // (4 * channels_x * channels_y))
    return max(1, min(by_parallelism, by_rows, by_memory))


def batch_sums(
    x: torch.Tensor,
    x_axis: int,
    shift_x: torch.Tensor,
    y: torch.Tensor | None,
    y_axis: int,
    shift_y: torch.Tensor,
    precision: str = "ieee",
    reduce_dtype: torch.dtype = torch.float64,
    splits: int | None = None,
    config: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Shifted sums of one batch (see module docstring) from one kernel launch, reduced over row splits.

    ``shift_*`` are fp32 vectors on the features' device. ``y=None`` means Y is X (self-statistics, with
    ``shift_y`` ignored). ``splits`` and ``config`` (``{"BLOCK_N", "BLOCK_M"}``, plus optional ``num_warps``) pin
    the launch, for tests; by default the interpreter uses one large-tile config and a GPU autotunes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    self_stats = y is None
    x, x_inner, x_so, x_si, x_sc = sample_layout(x, x_axis)
    channels_x = shift_x.numel()
    rows = x.numel() // channels_x if channels_x else 0
    if self_stats:
        y, y_inner, y_so, y_si, y_sd, shift_y = x, x_inner, x_so, x_si, x_sc, shift_x
    else:
        y, y_inner, y_so, y_si, y_sd = sample_layout(y, y_axis)
    channels_y = shift_y.numel()

    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    tiles = triton.cdiv(channels_x, NOMINAL_TILE) * triton.cdiv(channels_y, NOMINAL_TILE)
    if splits is None:
        splits = _row_splits(rows, tiles, channels_x, channels_y, x.device)
    splits = max(1, min(int(splits), max(rows, 1)))
    rows_per_split = triton.cdiv(max(rows, 1), splits)

    device = x.device
    partial_xy = torch.empty(splits, channels_x, channels_y, device=device, dtype=torch.float32)
    partial_x = torch.empty(2, splits, channels_x, device=device, dtype=torch.float32)
    partial_y = torch.empty(2, splits, channels_y, device=device, dtype=torch.float32)

    args = (
        x, y, shift_x, shift_y,
        partial_xy, partial_x[0], partial_x[1], partial_y[0], partial_y[1],
        rows, channels_x, channels_y, rows_per_split,
        x_inner, x_so, x_si, x_sc,
        y_inner, y_so, y_si, y_sd,
    )
    flags = dict(SELF=self_stats, PRECISION=precision, X_FLAT=x_inner == 1, Y_FLAT=y_inner == 1)
    if config is not None:
        meta = dict(config)
        block_n = meta["BLOCK_N"]
        grid = (triton.cdiv(channels_x, block_n), triton.cdiv(channels_y, block_n), splits)
        _correlation_batch_kernel[grid](*args, **flags, **meta)
    else:
        def grid(meta):
            return (triton.cdiv(channels_x, meta["BLOCK_N"]), triton.cdiv(channels_y, meta["BLOCK_N"]), splits)

        _tuned_kernel()[grid](*args, **flags)

    sums = {
        "sum_xy": partial_xy.sum(0, dtype=reduce_dtype),
        "sum_x": partial_x[0].sum(0, dtype=reduce_dtype),
        "sum_xx": partial_x[1].sum(0, dtype=reduce_dtype),
    }
    if self_stats:
        sums["sum_y"], sums["sum_yy"] = sums["sum_x"], sums["sum_xx"]
    else:
        sums["sum_y"] = partial_y[0].sum(0, dtype=reduce_dtype)
        sums["sum_yy"] = partial_y[1].sum(0, dtype=reduce_dtype)
    return sums
