"""Triton kernels (run under TRITON_INTERPRET=1, see conftest) and their torch twins, against float64 torch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from tsc_fast.kernels import (
    BACKEND_ENV,
    CorrelationAccumulator,
    bezier_coefficients,
    bezier_point,
    bezier_point_torch,
    resolve_backend,
)
from tsc_fast.kernels import _triton_correlation as triton_corr

BACKENDS = ["torch", "triton"]
SMALL_TILES = {"BLOCK_N": 16, "BLOCK_M": 16}  # several tiles and row chunks even for small shapes


# ------------------------------------------------------------------------------------------------ helpers
def samples(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, -1).reshape(-1, x.shape[axis]).double()


def reference_stats(xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two-pass float64 statistics of (M, C) and (M, D) samples."""
    xs, ys = xs.double(), ys.double()
    dx, dy = xs - xs.mean(0), ys - ys.mean(0)
    cxy = dx.T @ dy
    sx, sy = dx.pow(2).sum(0).sqrt(), dy.pow(2).sum(0).sqrt()
    denom = torch.outer(sx, sy)
    pearson = torch.where(denom > 0, cxy / denom.clamp_min(1e-300), torch.zeros_like(cxy))
    return {"pearson": pearson, "second_moment": xs.T @ ys / xs.shape[0], "mean_x": xs.mean(0), "cxy": cxy}


def accumulate(batches_x, batches_y, num_x, num_y, backend, channel_axis=1, options=None, **kwargs):
    acc = CorrelationAccumulator(num_x, num_y, backend=backend, **kwargs)
    acc.kernel_options = options or {}
    for bx, by in zip(batches_x, batches_y):
        acc.update(bx, by, channel_axis=channel_axis)
    return acc


def split_rows(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes, dim=0))


# ------------------------------------------------------------------------------------------------ dispatch
def test_backend_switch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend(cpu) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend(cpu) == "triton"  # conftest sets TRITON_INTERPRET=1
    assert resolve_backend(cpu, "torch") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match="TSC_FAST_KERNELS"):
        resolve_backend(cpu)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend(cpu)


# ------------------------------------------------------------------------------------------------ correlation
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "num_x, num_y, batch_sizes, options",
    [
        (1, None, [5, 1, 9], None),
        (3, 17, [7, 30, 2], None),
        (17, None, [33, 16, 1, 17], {"config": SMALL_TILES, "splits": 3}),  # edges of tiles, rows and splits
        (17, 15, [31, 1, 49], {"config": SMALL_TILES, "splits": 2}),
        (1000, 17, [40, 23], None),
        (70, None, [20, 13], {"config": SMALL_TILES}),  # many mirrored tiles
    ],
)
def test_correlation_matches_float64(backend, num_x, num_y, batch_sizes, options):
    gen = torch.Generator().manual_seed(num_x * 7 + len(batch_sizes))
    rows = sum(batch_sizes)
    scale, offset = torch.rand(num_x, generator=gen) * 3, torch.randn(num_x, generator=gen)
    x = torch.randn(rows, num_x, generator=gen) * scale + offset
    if num_y is None:
        y = x
    else:  # correlated with x so the answer is not all near zero
        mix = torch.randn(num_x, num_y, generator=gen) / num_x**0.5
        y = x @ mix + 0.5 * torch.randn(rows, num_y, generator=gen)
    batches_y = [None] * len(batch_sizes) if num_y is None else split_rows(y, batch_sizes)
    acc = accumulate(split_rows(x, batch_sizes), batches_y, num_x, num_y, backend, channel_axis=-1, options=options)
    ref = reference_stats(x, y)
    tol = 1e-12 if backend == "torch" else 2e-6
    assert acc.count == rows
    torch.testing.assert_close(acc.pearson(), ref["pearson"], atol=tol, rtol=0)
    torch.testing.assert_close(acc.second_moment(), ref["second_moment"], atol=tol * 10, rtol=tol)
    torch.testing.assert_close(acc.mean_x, ref["mean_x"], atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_features_do_not_cancel(backend):
    """Mean 1e4, std 1: the naive fp32 E[xy] - E[x]E[y] loses everything; shifted/Chan sums do not."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(600, 5, generator=gen)
    x = (base + 1e4).float()
    y = (base @ torch.randn(5, 4, generator=gen) + 0.3 * torch.randn(600, 4, generator=gen) - 2e4).float()
    ref = reference_stats(x, y)["pearson"]  # float64 two-pass on the same fp32 values

    n = x.shape[0]
    naive_cov = x.T @ y / n - torch.outer(x.mean(0), y.mean(0))
    naive_std_x = (x.pow(2).mean(0) - x.mean(0).pow(2)).clamp_min(0).sqrt()
    naive_std_y = (y.pow(2).mean(0) - y.mean(0).pow(2)).clamp_min(0).sqrt()
    naive = naive_cov / torch.outer(naive_std_x, naive_std_y)
    assert not torch.allclose(naive.double().nan_to_num(9.0), ref, atol=0.1)  # the case is genuinely hard

    acc = accumulate(split_rows(x, [100, 250, 250]), split_rows(y, [100, 250, 250]), 5, 4, backend,
                     channel_axis=-1, compute_dtype=torch.float32)
    torch.testing.assert_close(acc.pearson(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_channels_correlate_zero(backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 4, 5, generator=gen)
    x[:, 1] = 0.0
    x[:, 4] = 1e4 + 0.1  # constant with a large mean
    acc = accumulate([x[:1], x[1:]], [None, None], 6, None, backend)
    corr = acc.pearson()
    assert torch.isfinite(corr).all()
    assert corr[1].abs().max() == 0 and corr[:, 4].abs().max() == 0
    ref = reference_stats(samples(x, 1), samples(x, 1))["pearson"]
    torch.testing.assert_close(corr, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "nlc"])
def test_strided_conv_features(backend, layout):
    gen = torch.Generator().manual_seed(3)
    if layout == "nlc":
        x, y, axis = torch.randn(3, 11, 9, generator=gen), torch.randn(3, 11, 5, generator=gen), -1
    else:
        x, y, axis = torch.randn(3, 9, 7, 6, generator=gen), torch.randn(3, 5, 7, 6, generator=gen), 1
        y = y + x[:, :5]
        if layout == "channels_last":
            x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
        if layout == "sliced":
            x, y = x[:, :, ::2, 1:], y[:, :, ::2, 1:]
    acc = accumulate([x[:2], x[2:]], [y[:2], y[2:]], x.shape[axis], y.shape[axis], backend, channel_axis=axis,
                     options={"config": SMALL_TILES})
    ref = reference_stats(samples(x, axis), samples(y, axis))
    torch.testing.assert_close(acc.pearson(), ref["pearson"], atol=2e-6, rtol=0)


def test_conv_features_are_read_in_place():
    x = torch.randn(2, 9, 7, 6)
    for view in (x, x.to(memory_format=torch.channels_last), x[:, :, 2:, :]):
        tensor, inner, *_ = triton_corr.sample_layout(view, 1)
        assert tensor.data_ptr() == view.data_ptr()
    tensor, inner, stride_outer, stride_inner, stride_c = triton_corr.sample_layout(x, 1)
    assert (inner, stride_outer, stride_inner, stride_c) == (42, 378, 1, 42)
    tangled = x.permute(3, 1, 0, 2)[:, :, :, ::2]  # three non-mergeable sample dimensions: copied
    tensor, inner, *_ = triton_corr.sample_layout(tangled, 1)
    assert inner == 1 and tensor.is_contiguous()


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 5e-6), (torch.bfloat16, 5e-6), (torch.float32, 2e-6)])
def test_low_precision_inputs(dtype, atol):
    """Inputs are upcast before the products: only their own rounding differs from float64."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 7, 5, 5, generator=gen) * 2 + 3).to(dtype)
    y = (x[:, :4].float() + torch.randn(2, 4, 5, 5, generator=gen)).to(dtype)
    ref = reference_stats(samples(x, 1), samples(y, 1))
    for backend in BACKENDS:
        acc = accumulate([x[:1], x[1:]], [y[:1], y[1:]], 7, 4, backend, options={"config": SMALL_TILES})
        torch.testing.assert_close(acc.pearson(), ref["pearson"], atol=atol, rtol=0)
        torch.testing.assert_close(acc.second_moment(), ref["second_moment"], atol=atol * 20, rtol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_leaves_features_untouched(backend, dtype):
    x, y = torch.randn(30, 4, dtype=dtype), torch.randn(30, 3, dtype=dtype)
    x_before, y_before = x.clone(), y.clone()
    accumulate([x], [y], 4, 3, backend, channel_axis=-1)
    accumulate([x], [None], 4, None, backend, channel_axis=-1)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)


def test_kernel_batch_sums_against_float64():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(37, 19, generator=gen) + 2, torch.randn(37, 21, generator=gen)
    shift_x, shift_y = torch.randn(19, generator=gen), torch.randn(21, generator=gen)
    sums = triton_corr.batch_sums(x, 1, shift_x, y, 1, shift_y, config=SMALL_TILES, splits=3)
    dx, dy = x.double() - shift_x.double(), y.double() - shift_y.double()
    expected = {"sum_x": dx.sum(0), "sum_xx": (dx * dx).sum(0), "sum_y": dy.sum(0), "sum_yy": (dy * dy).sum(0),
                "sum_xy": dx.T @ dy}
    for key, value in expected.items():
        torch.testing.assert_close(sums[key], value, atol=1e-4, rtol=1e-5, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_equals_one_pass(backend):
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(50, 8, generator=gen) + 5, torch.randn(50, 3, generator=gen)
    whole = accumulate([x[:10], x[10:]], [y[:10], y[10:]], 8, 3, backend, channel_axis=-1)
    first = accumulate([x[:23]], [y[:23]], 8, 3, backend, channel_axis=-1)
    second = accumulate([x[23:40], x[40:]], [y[23:40], y[40:]], 8, 3, backend, channel_axis=-1)
    merged = first.merge(second)
    assert merged.count == whole.count == 50
    tol = 1e-12 if backend == "torch" else 1e-6
    for name in ("mean_x", "mean_y", "m2_x", "m2_y", "cxy"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), atol=tol, rtol=tol)
    torch.testing.assert_close(merged.pearson(), reference_stats(x, y)["pearson"], atol=tol * 2, rtol=0)


def test_shifted_sums_add_across_workers():
    """The all-reduce form: sums about a common shift add up to the pooled statistics."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(40, 6, generator=gen) * 2 + 300, torch.randn(40, 5, generator=gen)
    workers = [accumulate([x[:15]], [y[:15]], 6, 5, "torch", channel_axis=-1),
               accumulate([x[15:]], [y[15:]], 6, 5, "torch", channel_axis=-1)]
    shift_x, shift_y = workers[0].mean_x.clone(), workers[0].mean_y.clone()
    parts = [w.shifted_sums(shift_x, shift_y) for w in workers]
    total = {key: parts[0][key] + parts[1][key] for key in parts[0] if not key.startswith("shift")}
    total.update(shift_x=shift_x, shift_y=shift_y)
    pooled = CorrelationAccumulator(6, 5).load_shifted_sums(total)
    ref = reference_stats(x, y)
    assert pooled.count == 40
    torch.testing.assert_close(pooled.pearson(), ref["pearson"], atol=1e-12, rtol=0)
    torch.testing.assert_close(pooled.cxy, ref["cxy"], atol=1e-9, rtol=1e-12)
    assert workers[0].all_reduce() is workers[0]  # no process group: a no-op


def test_correlation_input_errors():
    acc = CorrelationAccumulator(4, 3)
    with pytest.raises(ValueError, match="channels"):
        acc.update(torch.randn(5, 3), torch.randn(5, 3), channel_axis=-1)
    with pytest.raises(ValueError, match="sample dimensions"):
        acc.update(torch.randn(5, 4), torch.randn(6, 3), channel_axis=-1)
    with pytest.raises(ValueError, match="y is required"):
        acc.update(torch.randn(5, 4), channel_axis=-1)
    with pytest.raises(ValueError, match="out of range"):
        acc.update(torch.randn(5, 4), torch.randn(5, 3), channel_axis=2)
    with pytest.raises(ValueError, match="precision"):
        triton_corr.batch_sums(torch.randn(4, 2), 1, torch.zeros(2), None, 1, torch.zeros(2), precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        CorrelationAccumulator(4, precision="fp8")
    with pytest.raises(ValueError, match="merge"):
        acc.merge(CorrelationAccumulator(4))


# ------------------------------------------------------------------------------------------------ bezier
def test_bezier_coefficients():
    for t in (0.0, 0.3, 0.4, 1.0):
        c0, c1, c2 = bezier_coefficients(t)
        assert c0 + c1 + c2 == pytest.approx(1.0)
        assert (c0, c1, c2) == pytest.approx(((1 - t) ** 2, 2 * t * (1 - t), t * t))


@pytest.mark.parametrize("n", [1, 4095, 4097, 3 * 4096 + 5])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-14), (torch.float32, 1e-6), (torch.float16, 2e-3),
                                         (torch.bfloat16, 2e-2)])
def test_bezier_point_matches_float64(n, dtype, atol):
    gen = torch.Generator().manual_seed(n)
    a, m, b = (torch.randn(n, generator=gen).to(dtype) for _ in range(3))
    t = 0.37
    c0, c1, c2 = bezier_coefficients(t)
    expected = c0 * a.double() + c1 * m.double() + c2 * b.double()
    for backend in BACKENDS:
        w = bezier_point(a, m, b, t, backend=backend)
        assert w.dtype == dtype and w.shape == (n,)
        torch.testing.assert_close(w.double(), expected, atol=atol, rtol=0)
        out = torch.full_like(a, float("nan"))
        assert bezier_point(a, m, b, t, out=out, backend=backend) is out
        torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)


def test_bezier_twin_gradcheck():
    gen = torch.Generator().manual_seed(8)
    a, m, b = (torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, m, b: bezier_point(a, m, b, 0.4, backend="torch"), (a, m, b))


@pytest.mark.parametrize("trainable", [(False, True, False), (True, True, True), (True, False, True)])
def test_bezier_kernel_gradients(trainable):
    gen = torch.Generator().manual_seed(9)
    n, t = 5000, 0.63
    grad_w = torch.randn(n, generator=gen, dtype=torch.float64)
    results = {}
    for backend in BACKENDS:
        gen.manual_seed(10)
        buffers = [torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_(flag) for flag in trainable]
        bezier_point(*buffers, t, backend=backend).backward(grad_w)
        results[backend] = [buf.grad for buf in buffers]
    for coefficient, flag, kernel_grad, twin_grad in zip(bezier_coefficients(t), trainable, results["triton"],
                                                         results["torch"]):
        if not flag:
            assert kernel_grad is None and twin_grad is None
            continue
        torch.testing.assert_close(kernel_grad, coefficient * grad_w, atol=1e-14, rtol=0)
        torch.testing.assert_close(kernel_grad, twin_grad, atol=1e-14, rtol=0)


def test_bezier_input_errors():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="length"):
        bezier_point(a, torch.zeros(5), a, 0.5)
    with pytest.raises(TypeError, match="dtype"):
        bezier_point(a, a.double(), a, 0.5)
    with pytest.raises(ValueError, match="1-D"):
        bezier_point(a.view(2, 2), a.view(2, 2), a.view(2, 2), 0.5)
    with pytest.raises(ValueError, match="no_grad"):
        bezier_point(a, a.clone().requires_grad_(), a, 0.5, out=torch.empty(4))


def test_bezier_custom_op_compiles_in_one_graph(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    a, m, b = torch.randn(300), torch.randn(300, requires_grad=True), torch.randn(300)

    def loss(m):
        return bezier_point(a, m, b, 0.25).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    value = compiled(m)
    value.backward()
    expected = bezier_point_torch(a, m.detach(), b, 0.25)
    torch.testing.assert_close(value, expected.square().sum())
    torch.testing.assert_close(m.grad, 2 * expected * bezier_coefficients(0.25)[1])


def _train_curve_losses(backend: str, steps: int = 25) -> list[float]:
    """Train the middle point of a tiny MLP curve (weights as views of w(t)); the per-step losses."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    end = start[torch.randperm(start.numel())] * 0.8
    middle = ((start + end) / 2).requires_grad_()
    optimiser = torch.optim.SGD([middle], lr=0.5, momentum=0.9)
    x = torch.randn(64, 6)
    y = (x @ torch.randn(6, 3)).argmax(1)  # a learnable rule
    ts = torch.rand(steps).tolist()
    losses = []
    for t in ts:
        w = bezier_point(start, middle, end, t, backend=backend)
        params = {name: view.view(shape) for name, view, shape in zip(names, w.split(sizes), shapes)}
        loss = nn.functional.cross_entropy(functional_call(net, params, (x,)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def test_curve_training_with_and_without_kernel():
    twin, kernel = _train_curve_losses("torch"), _train_curve_losses("triton")
    assert sum(twin[-5:]) < 0.8 * sum(twin[:5])  # it trains
    assert kernel == pytest.approx(twin, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------------------------ real compiler
def test_kernels_compile_for_gpu():
    """The interpreter is lenient; the real compiler (no GPU needed) must accept every kernel variant."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tsc_fast.kernels._compile_check", "80", "90"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = done.stdout.splitlines()
    assert len(compiled) == 14 and all(line.startswith(("sm_80: ", "sm_90: ")) for line in compiled)
