"""Streaming correlation statistics of two feature sets, pooled over batches.

Each batch is reduced to sums about a per-channel shift (``batch sums``), turned into centred statistics in
the accumulator's dtype, and merged into the running state with Chan et al.'s parallel update, so features with
large means do not cancel catastrophically. On CPU the torch twin below computes the batch sums (shift = batch
mean, products in ``compute_dtype``); on CUDA one fused Triton launch does (shift = running mean, fp32
accumulation, conv features read in place). See ``_dispatch`` for the ``TSC_FAST_KERNELS`` switch.
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from ._math import PRECISIONS

_SUM_KEYS = ("sum_x", "sum_xx", "sum_y", "sum_yy", "sum_xy")


def _as_samples(x: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """(..., C, ...) -> (M, C) with channels last."""
    return x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis])


def _normalise_axis(x: torch.Tensor, channel_axis: int, name: str) -> int:
    if x.dim() == 0:
        raise ValueError(f"{name} must have a channel axis, got a 0-d tensor")
    if not -x.dim() <= channel_axis < x.dim():
        raise ValueError(f"channel_axis={channel_axis} is out of range for {name} of shape {tuple(x.shape)}")
    return channel_axis % x.dim()


def batch_sums_torch(
    xs: torch.Tensor, ys: torch.Tensor | None, compute_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Torch twin of the kernel: sums of one (M, C) / (M, D) batch about its own mean, in ``compute_dtype``."""
    shift_x, dx = _centred(xs, compute_dtype)
    sums = {"shift_x": shift_x, "sum_x": dx.sum(0)}
    if ys is None:
        sum_xy = dx.T @ dx
        sum_xx = sum_xy.diagonal().clone()
        sums.update(sum_xx=sum_xx, shift_y=shift_x, sum_y=sums["sum_x"], sum_yy=sum_xx, sum_xy=sum_xy)
        return sums
    shift_y, dy = _centred(ys, compute_dtype)
    sums.update(sum_xx=_column_sum_squares(dx), shift_y=shift_y, sum_y=dy.sum(0),
                sum_yy=_column_sum_squares(dy), sum_xy=dx.T @ dy)
    return sums


def _centred(samples: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(column means, samples minus means) in ``dtype``, centring in place when the upcast made a copy."""
    converted = samples.to(dtype)
    means = converted.mean(0)
    if converted.data_ptr() == samples.data_ptr():  # no copy was made: leave the caller's features alone
        return means, converted - means
    return means, converted.sub_(means)


def _column_sum_squares(d: torch.Tensor) -> torch.Tensor:
    return (d * d).sum(0)


class CorrelationAccumulator:
    """Pooled statistics of features X (M x C) and Y (M x D) over a stream of batches.

    State: ``count`` samples, ``mean_x``/``mean_y``, sums of squared deviations ``m2_x``/``m2_y`` and the centred
    cross-product ``cxy`` (C x D), in ``dtype`` on ``device``. ``y=None`` accumulates X against itself.

    Args:
        num_x, num_y: channel counts C and D (``num_y=None``: self-statistics, D = C).
        device, dtype: where and in which precision the running state lives (float64 by default).
        backend: ``"auto"``/``"triton"``/``"torch"``, overriding the ``TSC_FAST_KERNELS`` switch.
        compute_dtype: precision of the torch twin's per-batch products (default: ``dtype``).
        precision: ``tl.dot`` input precision of the Triton kernel: ``"ieee"`` (default, exact fp32 products)
            or ``"tf32"``/``"tf32x3"`` (faster tensor-core products, about 1e-3 relative error per product).
    """

    def __init__(
        self,
        num_x: int,
        num_y: int | None = None,
        device="cpu",
        dtype=torch.float64,
        *,
        backend: str | None = None,
        compute_dtype: torch.dtype | None = None,
        precision: str = "ieee",
    ):
        if int(num_x) < 1 or (num_y is not None and int(num_y) < 1):
            raise ValueError(f"channel counts must be positive, got num_x={num_x}, num_y={num_y}")
        if not dtype.is_floating_point:
            raise TypeError(f"accumulator dtype must be floating point, got {dtype}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.self_stats = num_y is None
        self.num_x = int(num_x)
        self.num_y = self.num_x if num_y is None else int(num_y)
        self.backend = backend
        self.compute_dtype = dtype if compute_dtype is None else compute_dtype
        self.precision = precision
        kw = dict(device=device, dtype=dtype)
        self.count = 0
        self.mean_x = torch.zeros(self.num_x, **kw)
        self.mean_y = torch.zeros(self.num_y, **kw)
        self.m2_x = torch.zeros(self.num_x, **kw)
        self.m2_y = torch.zeros(self.num_y, **kw)
        self.cxy = torch.zeros(self.num_x, self.num_y, **kw)
        self.kernel_options: dict = {}  # pinned launch settings (splits, config) for tests of the Triton path

    # ---------------------------------------------------------------- updates
    def update(self, x: torch.Tensor, y: torch.Tensor | None = None, channel_axis: int = 1) -> None:
        """Add one batch: x (channels on ``channel_axis``), y (same layout, D channels) or None for X itself."""
        x, y, x_axis, y_axis = self._checked_batch(x, y, channel_axis)
        rows = x.numel() // self.num_x
        if rows == 0:
            return
        if resolve_backend(x, self.backend) == "triton":
            sums = self._triton_sums(x, x_axis, y, y_axis)
        else:
            xs = _as_samples(x, x_axis)
            ys = None if y is None else _as_samples(y, y_axis)
            sums = batch_sums_torch(xs, ys, self.compute_dtype)
        self._merge_sums(rows, sums)

    def _checked_batch(self, x, y, channel_axis):
        if not isinstance(x, torch.Tensor) or (y is not None and not isinstance(y, torch.Tensor)):
            raise TypeError("update expects torch.Tensor features")
        x_axis = _normalise_axis(x, channel_axis, "x")
        if x.shape[x_axis] != self.num_x:
            raise ValueError(f"x has {x.shape[x_axis]} channels on axis {channel_axis}, expected {self.num_x}")
        if y is None:
            if not self.self_stats and self.num_y != self.num_x:
                raise ValueError(f"y is required: this accumulator expects {self.num_y} Y channels")
            return x.detach(), None, x_axis, x_axis
        y_axis = _normalise_axis(y, channel_axis, "y")
        if y.shape[y_axis] != self.num_y:
            raise ValueError(f"y has {y.shape[y_axis]} channels on axis {channel_axis}, expected {self.num_y}")
        x_rest = x.shape[:x_axis] + x.shape[x_axis + 1:]
        y_rest = y.shape[:y_axis] + y.shape[y_axis + 1:]
        if x_rest != y_rest:
            raise ValueError(f"x and y disagree on their sample dimensions: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.device != y.device:
            raise ValueError(f"x and y are on different devices: {x.device} vs {y.device}")
        return x.detach(), y.detach(), x_axis, y_axis

    def _triton_sums(self, x, x_axis, y, y_axis) -> dict[str, torch.Tensor]:
        from . import _triton_correlation

        shift_x = self._shift(self.mean_x, x, x_axis)
        shift_y = shift_x if y is None else self._shift(self.mean_y, y, y_axis)
        sums = _triton_correlation.batch_sums(
            x, x_axis, shift_x, y, y_axis, shift_y,
            precision=self.precision, reduce_dtype=self.cxy.dtype, **self.kernel_options,
        )
        sums.update(shift_x=shift_x.to(self.cxy.dtype), shift_y=shift_y.to(self.cxy.dtype))
        return sums

    def _shift(self, running_mean: torch.Tensor, feats: torch.Tensor, axis: int) -> torch.Tensor:
        """fp32 shift near the channel means: the running mean, or for the first batch its first slice's mean."""
        if self.count > 0:
            return running_mean.to(device=feats.device, dtype=torch.float32)
        samples = feats.movedim(axis, -1)
        first = samples[0] if samples.dim() > 1 else samples  # first slice along the leading sample dimension
        return first.reshape(-1, feats.shape[axis]).to(torch.float32).mean(0)

    def _merge_sums(self, rows: int, sums: dict[str, torch.Tensor]) -> None:
        """Centre one batch's shifted sums and merge them into the state."""
        kw = dict(device=self.cxy.device, dtype=self.cxy.dtype)
        s = {key: value.to(**kw) for key, value in sums.items()}
        off_x, off_y = s["sum_x"] / rows, s["sum_y"] / rows  # batch mean minus shift
        batch_mean_x, batch_mean_y = s["shift_x"] + off_x, s["shift_y"] + off_y
        batch_m2_x = s["sum_xx"] - s["sum_x"] * off_x
        batch_m2_y = s["sum_yy"] - s["sum_y"] * off_y
        batch_cxy = s["sum_xy"].addr_(s["sum_x"], off_y, alpha=-1.0)  # in place: no (C x D) temporaries
        self._chan_merge(rows, batch_mean_x, batch_mean_y, batch_m2_x, batch_m2_y, batch_cxy)

    def _chan_merge(self, n, mean_x, mean_y, m2_x, m2_y, cxy) -> None:
        total = self.count + n
        if total == 0:
            return
        wx, wy = mean_x - self.mean_x, mean_y - self.mean_y
        f = self.count * n / total
        self.cxy.add_(cxy).addr_(wx, wy, alpha=f)  # in place: at C = 16384 each temporary was 2 GiB
        self.m2_x += m2_x + f * wx * wx
        self.m2_y += m2_y + f * wy * wy
        self.mean_x += wx * (n / total)
        self.mean_y += wy * (n / total)
        self.count = total

    def merge(self, other: "CorrelationAccumulator") -> "CorrelationAccumulator":
        """Fold ``other``'s statistics into this accumulator (as if its batches had been added here)."""
        if not isinstance(other, CorrelationAccumulator):
            raise TypeError(f"merge expects a CorrelationAccumulator, got {type(other).__name__}")
        if (other.num_x, other.num_y) != (self.num_x, self.num_y):
            raise ValueError(
                f"cannot merge statistics of shape {(other.num_x, other.num_y)} into {(self.num_x, self.num_y)}"
            )
        kw = dict(device=self.cxy.device, dtype=self.cxy.dtype)
        self._chan_merge(
            other.count, other.mean_x.to(**kw), other.mean_y.to(**kw),
            other.m2_x.to(**kw), other.m2_y.to(**kw), other.cxy.to(**kw),
        )
        return self

    # ---------------------------------------------------------------- all-reduce support
    def shifted_sums(
        self, shift_x: torch.Tensor | None = None, shift_y: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """State as sums about given shifts (default: own means): additive across workers sharing the shifts.

        Keys: ``count`` (0-d), ``sum_x``, ``sum_xx``, ``sum_y``, ``sum_yy``, ``sum_xy``, ``shift_x``, ``shift_y``.
        Summing these dicts' sum entries over workers (same shifts) and ``load_shifted_sums`` gives the pooled
        statistics; shifts near the global means keep that stable.
        """
        kw = dict(device=self.cxy.device, dtype=self.cxy.dtype)
        shift_x = self.mean_x.clone() if shift_x is None else shift_x.to(**kw)
        shift_y = self.mean_y.clone() if shift_y is None else shift_y.to(**kw)
        n = self.count
        dx, dy = self.mean_x - shift_x, self.mean_y - shift_y
        return {
            "count": torch.tensor(float(n), **kw),
            "sum_x": n * dx,
            "sum_xx": self.m2_x + n * dx * dx,
            "sum_y": n * dy,
            "sum_yy": self.m2_y + n * dy * dy,
            "sum_xy": self.cxy + n * torch.outer(dx, dy),
            "shift_x": shift_x,
            "shift_y": shift_y,
        }

    def load_shifted_sums(self, sums: dict[str, torch.Tensor]) -> "CorrelationAccumulator":
        """Replace the state by the statistics that ``sums`` (see ``shifted_sums``) describe."""
        count = int(round(float(sums["count"])))
        if count < 0:
            raise ValueError(f"count must be non-negative, got {count}")
        self.count = 0
        for name in ("mean_x", "mean_y", "m2_x", "m2_y", "cxy"):
            getattr(self, name).zero_()
        if count:
            # clones: _merge_sums works in place and the caller keeps its sums
            self._merge_sums(count, {key: sums[key].clone() for key in _SUM_KEYS + ("shift_x", "shift_y")})
        return self

    def all_reduce(self, group=None) -> "CorrelationAccumulator":
        """Pool the statistics of all workers of a torch.distributed ``group`` in place (every worker ends equal).

        Two collectives: the global means (used as shifts, for stability), then the shifted sums in one flat
        buffer. A no-op outside an initialised process group.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        kw = dict(device=self.cxy.device, dtype=self.cxy.dtype)
        weighted = torch.cat([torch.tensor([float(self.count)], **kw), self.count * self.mean_x,
                              self.count * self.mean_y])
        dist.all_reduce(weighted, group=group)
        total = max(float(weighted[0]), 1.0)
        shift_x = weighted[1:1 + self.num_x] / total
        shift_y = weighted[1 + self.num_x:] / total
        sums = self.shifted_sums(shift_x, shift_y)
        flat = torch.cat([sums["count"].reshape(1)] + [sums[key].reshape(-1) for key in _SUM_KEYS])
        dist.all_reduce(flat, group=group)
        sizes = [1, self.num_x, self.num_x, self.num_y, self.num_y, self.num_x * self.num_y]
        parts = torch.split(flat, sizes)
        reduced = {"count": parts[0][0], "shift_x": shift_x, "shift_y": shift_y}
        reduced.update({key: part for key, part in zip(_SUM_KEYS, parts[1:])})
        reduced["sum_xy"] = reduced["sum_xy"].reshape(self.num_x, self.num_y)
        return self.load_shifted_sums(reduced)

    # ---------------------------------------------------------------- results
    def pearson(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation (C x D); units with zero variance correlate 0 with everything."""
        sx, sy = self.m2_x.clamp_min(0).sqrt(), self.m2_y.clamp_min(0).sqrt()
        denom = torch.outer(sx, sy)
        corr = torch.where(denom > eps, self.cxy / denom.clamp_min(eps), torch.zeros_like(denom))
        return corr.clamp_(-1.0, 1.0)

    def second_moment(self) -> torch.Tensor:
        """Uncentred E[x y^T] (C x D)."""
        if self.count == 0:
            return torch.zeros_like(self.cxy)
        return self.cxy / self.count + torch.outer(self.mean_x, self.mean_y)
