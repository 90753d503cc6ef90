"""Streaming correlation statistics (torch reference twin; the Triton kernel plugs in behind ``update``)."""
from __future__ import annotations

import torch


def _as_samples(x: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """(..., C, ...) -> (M, C) with channels last."""
    return x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis])


class CorrelationAccumulator:
    """Pooled statistics of features X (M x C) and Y (M x D) over a stream of batches.

    Keeps count, means, sums of squared deviations and the centred cross-product, merged batch by batch
    (Chan et al.'s parallel update), so large feature means do not cancel catastrophically.
    ``y=None`` accumulates X against itself.
    """

    def __init__(self, num_x: int, num_y: int | None = None, device="cpu", dtype=torch.float64):
        self.self_stats = num_y is None
        num_y = num_x if num_y is None else num_y
        kw = dict(device=device, dtype=dtype)
        self.count = 0
        self.mean_x = torch.zeros(num_x, **kw)
        self.mean_y = torch.zeros(num_y, **kw)
        self.m2_x = torch.zeros(num_x, **kw)
        self.m2_y = torch.zeros(num_y, **kw)
        self.cxy = torch.zeros(num_x, num_y, **kw)

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None, channel_axis: int = 1) -> None:
        xs = _as_samples(x.detach(), channel_axis).to(self.cxy.dtype)
        ys = xs if y is None else _as_samples(y.detach(), channel_axis).to(self.cxy.dtype)
        n = xs.shape[0]
        if n == 0:
            return
        bmx, bmy = xs.mean(0), ys.mean(0)
        dx, dy = xs - bmx, ys - bmy
        b_cxy = dx.T @ dy
        b_m2x = (dx * dx).sum(0)
        b_m2y = b_m2x if y is None else (dy * dy).sum(0)
        total = self.count + n
        wx, wy = bmx - self.mean_x, bmy - self.mean_y
        f = self.count * n / total
        self.cxy += b_cxy + f * torch.outer(wx, wy)
        self.m2_x += b_m2x + f * wx * wx
        self.m2_y += b_m2y + f * wy * wy
        self.mean_x += wx * (n / total)
        self.mean_y += wy * (n / total)
        self.count = total

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
