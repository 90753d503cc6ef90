"""Fused kernels against their anchors, measured in the same run. One command each:

    python bench/bench_kernels.py                          # CUDA: Triton kernels vs torch paths (full sizes)
    python bench/bench_kernels.py --device cpu --quick     # CPU: the torch twins' cost vs matmul / copy

Correlation: one accumulator update (full statistics) at C in {256, 1024, 4096}, M in {1e5, 1e6} against the
unfused torch twin and against torch.matmul of the same GEMM (TFLOP/s = 2*M*C*D / time; ratio to matmul).
Bezier: the point of ResNet-50's parameter set (torchvision resnet50(weights=None): 25,557,032 parameters in 161
tensors) against an eager per-parameter loop, torch._foreach ops and the flat torch twin; effective bandwidth
counts the minimal traffic (3 reads + 1 write forward, 1 read + 1 write backward); ratio to a device-to-device
copy. Curve step: the twin's/kernel's share of one curve-training step on the digits CNN.
Targets (issue 4, CUDA): correlation >= 80% of matmul throughput; Bezier >= 85% of copy bandwidth and >= 3x the
eager loop. Medians of several runs; every row records the device name. Results: bench/results/kernels_<device>.*
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
try:
    import tsc_fast.kernels as kernels
except ImportError:  # a bare checkout (e.g. a fresh GPU machine, nothing built): the kernels need no build
    sys.path.append(str(ROOT))
    for name in [n for n in sys.modules if n == "tsc_fast" or n.startswith("tsc_fast.")]:
        del sys.modules[name]
    import kernels  # type: ignore[no-redef]

CorrelationAccumulator = kernels.CorrelationAccumulator
bezier_coefficients = kernels.bezier_coefficients
bezier_point = kernels.bezier_point

RESNET50_PARAMETERS = 25_557_032


# ------------------------------------------------------------------------------------------------ timing
def make_timer(device: torch.device) -> Callable[..., float]:
    """median seconds of fn() over ``reps`` runs after ``warmup`` runs (CUDA events on a GPU)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return measure


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------ correlation
def correlation_rows(device: torch.device, quick: bool, measure) -> list[dict]:
    if device.type == "cuda":
        channels, row_counts = ([256, 1024], [100_000]) if quick else ([256, 1024, 4096], [100_000, 1_000_000])
    else:
        channels, row_counts = ([64, 256], [10_000, 100_000]) if quick else ([64, 256, 1024], [10_000, 100_000])
    rows = []
    for c in channels:
        for m in row_counts:  # smaller M first: the autotuner keys on C, so it tunes on the cheaper size
            rows += correlation_case(device, c, m, measure)
    if device.type == "cuda":
        rows += conv_layout_case(device, 256, 1_000_000 if not quick else 100_000, measure)
    return rows


def _free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float("inf")


def correlation_case(device: torch.device, c: int, m: int, measure) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, c, device=device, generator=gen)
    y = torch.randn(m, c, device=device, generator=gen)
    flops = 2.0 * m * c * c
    reps = 5 if (flops > 5e12 or device.type == "cpu") else 10
    results: dict[str, float] = {}

    def run(label: str, fn: Callable[[], object], tf32: bool = False) -> None:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        results[label] = measure(fn, reps)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False

    def accumulator(**kw) -> CorrelationAccumulator:
        return CorrelationAccumulator(c, None if kw.pop("self_stats", False) else c, device=device, **kw)

    if device.type == "cuda":
        for precision in ("ieee", "tf32"):
            cross = accumulator(backend="triton", precision=precision)
            run(f"fused {precision}", lambda a=cross: a.update(x, y, channel_axis=-1))
            own = accumulator(backend="triton", precision=precision, self_stats=True)
            run(f"fused {precision} self", lambda a=own: a.update(x, channel_axis=-1))
        run("matmul tf32", lambda: x.T @ y, tf32=True)
    run("matmul fp32", lambda: x.T @ y)
    twin32 = accumulator(backend="torch", compute_dtype=torch.float32)
    if _free_bytes(device) > 2.5 * x.numel() * 4 * 2:  # the twin materialises centred copies of x and y
        run("twin fp32", lambda: twin32.update(x, y, channel_axis=-1))
    if device.type == "cpu":
        run("matmul fp64", lambda: x.double().T @ y.double())
        twin64 = accumulator(backend="torch")
        run("twin fp64 (default)", lambda: twin64.update(x, y, channel_axis=-1))
    del x, y

    anchors = {"fused ieee": "matmul fp32", "fused ieee self": "matmul fp32", "fused tf32": "matmul tf32",
               "fused tf32 self": "matmul tf32", "twin fp32": "matmul fp32", "twin fp64 (default)": "matmul fp64"}
    rows = []
    for label, seconds in results.items():
        anchor = anchors.get(label)
        rows.append({
            "bench": "correlation", "method": label, "channels": c, "rows": m, "layout": "(M,C)",
            "seconds": seconds, "tflops": flops / seconds / 1e12, "anchor": anchor or "",
            "ratio_to_anchor": results[anchor] / seconds if anchor in results else "",
        })
    return rows


def conv_layout_case(device: torch.device, c: int, m: int, measure) -> list[dict]:
    """Conv features (N, C, H, W) read in place vs the same statistics on a channels-last (M, C) matrix."""
    n = max(1, m // 1024)
    feats = torch.randn(n, c, 32, 32, device=device)
    flat = feats.movedim(1, -1).reshape(-1, c).contiguous()
    flops = 2.0 * flat.shape[0] * c * c
    rows = []
    for label, tensor, axis in (("fused ieee self", feats, 1), ("fused ieee self", flat, -1)):
        acc = CorrelationAccumulator(c, device=device, backend="triton")
        seconds = measure(lambda a=acc, t=tensor, ax=axis: a.update(t, channel_axis=ax), 10)
        rows.append({"bench": "correlation", "method": label, "channels": c, "rows": flat.shape[0],
                     "layout": "(N,C,H,W)" if axis == 1 else "(M,C)", "seconds": seconds,
                     "tflops": flops / seconds / 1e12, "anchor": "", "ratio_to_anchor": ""})
    return rows


# ------------------------------------------------------------------------------------------------ bezier
def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50 (from torchvision if present, else rebuilt here)."""
    try:
        import torchvision

        return [tuple(p.shape) for p in torchvision.models.resnet50(weights=None).parameters()]
    except ImportError:
        pass
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def bezier_rows(device: torch.device, quick: bool, measure) -> list[dict]:
    shapes = resnet50_shapes()
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    n = sum(sizes)
    assert n == RESNET50_PARAMETERS, n
    gen = torch.Generator(device=device).manual_seed(0)
    a, m, b = (torch.randn(n, device=device, generator=gen) for _ in range(3))
    grad_w = torch.randn(n, device=device, generator=gen)
    out = torch.empty_like(a)
    t = 0.4
    c0, c1, c2 = bezier_coefficients(t)
    a_list, m_list, b_list = (list(buf.split(sizes)) for buf in (a, m, b))
    reps = 7 if (quick or device.type == "cpu") else 50
    elem = a.element_size()
    forward_bytes, backward_bytes = 4 * n * elem, 2 * n * elem

    def eager_loop():
        return [c0 * ai + c1 * mi + c2 * bi for ai, mi, bi in zip(a_list, m_list, b_list)]

    def foreach():
        w = torch._foreach_mul(a_list, c0)
        torch._foreach_add_(w, m_list, alpha=c1)
        torch._foreach_add_(w, b_list, alpha=c2)
        return w

    cases: list[tuple[str, Callable[[], object], int]] = [
        ("copy (anchor)", lambda: out.copy_(a), 2 * n * elem),
        ("eager per-parameter loop", eager_loop, forward_bytes),
        ("torch._foreach", foreach, forward_bytes),
        ("twin (flat torch)", lambda: bezier_point(a, m, b, t, backend="torch"), forward_bytes),
        ("twin out=", lambda: bezier_point(a, m, b, t, out=out, backend="torch"), forward_bytes),
        ("twin backward (c1*g)", lambda: grad_w * c1, backward_bytes),
    ]
    if device.type == "cuda":
        import importlib

        _triton_bezier = importlib.import_module(kernels.__name__ + "._triton_bezier")

        cases += [
            ("fused forward", lambda: bezier_point(a, m, b, t, backend="triton"), forward_bytes),
            ("fused out=", lambda: bezier_point(a, m, b, t, out=out, backend="triton"), forward_bytes),
            ("fused backward (c1*g)", lambda: _triton_bezier.gradients(grad_w, t, (False, True, False)),
             backward_bytes),
        ]
    timings = {label: (measure(fn, reps), nbytes) for label, fn, nbytes in cases}
    copy_gbps = 2 * n * elem / timings["copy (anchor)"][0] / 1e9
    eager_seconds = timings["eager per-parameter loop"][0]
    rows = []
    for label, (seconds, nbytes) in timings.items():
        gbps = nbytes / seconds / 1e9
        rows.append({"bench": "bezier", "method": label, "parameters": n, "tensors": len(shapes),
                     "seconds": seconds, "gbps": gbps, "fraction_of_copy_bw": gbps / copy_gbps,
                     "speedup_vs_eager_loop": eager_seconds / seconds})
    return rows


# ------------------------------------------------------------------------------------------------ curve step
def digits_cnn() -> nn.Module:
    """The calibration CNN (docs/calibration.md): 1x8x8 inputs, a 32-channel residual stream, 64 channels, 10 classes."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
            self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
            self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = h + torch.relu(self.bn2(self.conv2(h)))
            h = torch.relu(self.bn3(self.conv3(h)))
            return self.fc(h.mean((2, 3)))

    return Net()


def curve_step_rows(device: torch.device, measure) -> list[dict]:
    """Time of a whole curve-training step vs the Bezier point's forward + backward inside it."""
    net = digits_cnn().to(device)
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    end = start.flip(0).clone()
    middle = ((start + end) / 2).requires_grad_()
    optimiser = torch.optim.SGD([middle], lr=0.02, momentum=0.9, weight_decay=5e-4)
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    rows = []
    for batch in (16, 256):
        x = torch.randn(batch, 1, 8, 8, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for backend in backends:
            def point_only(backend=backend):
                w = bezier_point(start, middle, end, 0.4, backend=backend)
                w.backward(torch.ones_like(w))
                middle.grad = None

            def step(backend=backend):
                w = bezier_point(start, middle, end, 0.4, backend=backend)
                params = {k: v.view(s) for k, v, s in zip(names, w.split(sizes), shapes)}
                loss = nn.functional.cross_entropy(functional_call(net, params, (x,)), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()

            point_seconds, step_seconds = measure(point_only, 20, 3), measure(step, 20, 3)
            rows.append({"bench": "curve_step", "method": f"{backend} bezier fwd+bwd", "batch": batch,
                         "parameters": start.numel(), "seconds": point_seconds, "step_seconds": step_seconds,
                         "share_of_step": point_seconds / step_seconds})
    return rows


# ------------------------------------------------------------------------------------------------ output
def print_table(rows: list[dict]) -> None:
    for bench in dict.fromkeys(r["bench"] for r in rows):
        subset = [r for r in rows if r["bench"] == bench]
        keys = list(dict.fromkeys(k for r in subset for k in r if k != "bench"))
        cells = [[_fmt(r.get(k, "")) for k in keys] for r in subset]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        print(f"\n== {bench}")
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(rows: list[dict], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", meta["device_name"].lower()).strip("_")[:40]
    stem = out_dir / f"kernels_{meta['device_type']}_{slug}{'_quick' if meta['quick'] else ''}"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["device_name"] + keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({"device_name": meta["device_name"], **r})
    with open(stem.with_suffix(".json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--only", choices=["correlation", "bezier", "curve_step"], action="append")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    measure = make_timer(device)
    sections = args.only or ["correlation", "bezier", "curve_step"]
    rows: list[dict] = []
    if "correlation" in sections:
        rows += correlation_rows(device, args.quick, measure)
    if "bezier" in sections:
        rows += bezier_rows(device, args.quick, measure)
    if "curve_step" in sections:
        rows += curve_step_rows(device, measure)
    meta = {"device_type": device.type, "device_name": device_name(device), "quick": args.quick,
            "torch": torch.__version__, "python": platform.python_version(),
            "triton": _triton_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"device: {meta['device_name']}  torch {meta['torch']}  triton {meta['triton']}")
    print_table(rows)
    for path in write_results(rows, meta, args.out):
        print(f"wrote {path}")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
