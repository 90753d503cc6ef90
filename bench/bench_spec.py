"""Timings of tsc_fast.spec: discover(), check_invariance() and the feature-tap pass, against plain inference.

    python bench/bench_spec.py [--repeats 3] [--models resnet50,vit_b_16,...] [--out bench/results/bench_spec.json]

Targets (issue 5 / issue 3): discover() resnet50 < 2 s and vit_b_16 < 5 s, check_invariance < 5 s (CPU; 224 x 224,
batch 1); a forward pass with every group's taps <= 1.3x a plain inference pass (the callback here only touches
the features; real statistics cost is the stats module's). Each row also reports a plain inference pass of the
same model measured in the same run (the anchor), medians over --repeats runs, and the largest relative output
error of the invariance check (random permutation of every group, randomised BN statistics, fp32). The full-size
torchvision models of issue 5 (weights=None) are all covered; the record keeps the machine's load average, since
wall-clock times on a shared machine scale with it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision

from tsc_fast.models import PreActResNet18
from tsc_fast.spec import check_invariance, discover, forward_with_taps
from _common import append_json_record, median_seconds


def randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def bench_model(name: str, model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict:
    model = randomise_bn(model)

    def plain():
        with torch.no_grad():
            model(x)

    plain()  # warm-up
    spec = discover(model, x)
    row = {"model": name, "input": list(x.shape), "groups": len(spec.groups),
           "plain_inference_s": median_seconds(plain, repeats),
           "discover_s": median_seconds(lambda: discover(model, x), repeats)}
    errors = []
    row["check_invariance_s"] = median_seconds(lambda: errors.append(check_invariance(model, spec, x, rtol=1e-4)),
                                               repeats)
    row["max_rel_error"] = max(errors)
    row["load_1min"] = os.getloadavg()[0]
    return row


def bench_taps(repeats: int) -> dict:
    torch.manual_seed(0)
    model = randomise_bn(PreActResNet18())
    x = torch.randn(128, 3, 32, 32)
    spec = discover(model, x[:2])
    sink = []

    def callback(group, features, channel_axis):
        sink.append(features.shape[channel_axis])

    def plain():
        with torch.no_grad():
            model(x)

    def tapped():
        with torch.no_grad():
            forward_with_taps(model, spec, x, callback)

    plain(), tapped()
    plain_times, tapped_times = [], []
    for _ in range(repeats):  # interleaved, so machine load drifts hit both alike
        plain_times.append(median_seconds(plain, 1))
        tapped_times.append(median_seconds(tapped, 1))
    p, t = statistics.median(plain_times), statistics.median(tapped_times)
    return {"model": "PreActResNet18 taps", "input": list(x.shape), "groups": len(spec.groups),
            "plain_inference_s": p, "tapped_inference_s": t, "ratio": t / p}


def bench_head_assignment(repeats: int) -> dict:
    """The head-aware assignment of every attention layer of vit_b_16 (12 layers, query/key and value/output
    groups of 768 units in 12 heads) on random costs, against plain 768 x 768 assignments of the same groups."""
    import numpy as np

    from tsc_fast import assign
    from tsc_fast.align import solve_heads

    rng = np.random.default_rng(0)
    layers = [[rng.standard_normal((768, 768)) for _ in range(2)] for _ in range(12)]

    def head_aware():
        for costs in layers:
            solve_heads(costs, 12, maximize=False)

    def plain():
        assign.solve_many([c for costs in layers for c in costs], maximize=False)

    head_aware(), plain()
    h, p = median_seconds(head_aware, repeats), median_seconds(plain, repeats)
    return {"model": "vit_b_16 head-aware assignment (random costs)", "groups": 24, "head_aware_s": h,
            "plain_lap_s": p, "ratio": h / p}


def _vit_b_16() -> torch.nn.Module:
    model = torchvision.models.vit_b_16(weights=None)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised head would make outputs all 0
    return model


def _encoder(name: str):
    def build() -> torch.nn.Module:
        model = getattr(torchvision.models, name)(weights=None)
        model.fc = torch.nn.Identity()  # SSL encoder: features out, no classifier
        return model
    return build


MODELS = {name: (lambda name=name: getattr(torchvision.models, name)(weights=None)) for name in (
    "resnet18", "resnet50", "wide_resnet50_2", "vgg16_bn", "vgg19_bn", "mobilenet_v2", "convnext_tiny",
    "resnext50_32x4d")}
MODELS.update({"vit_b_16": _vit_b_16, "resnet18_encoder": _encoder("resnet18"),
               "resnet50_encoder": _encoder("resnet50")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--no-taps", action="store_true", help="skip the PreActResNet18 taps row")
    parser.add_argument("--out", default="bench/results/bench_spec.json")
    args = parser.parse_args()
    rows = [bench_head_assignment(args.repeats)]
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    for name in filter(None, args.models.split(",")):
        torch.manual_seed(0)
        rows.append(bench_model(name, MODELS[name](), torch.randn(1, 3, 224, 224), args.repeats))
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)
    if not args.no_taps:
        rows.append(bench_taps(args.repeats))
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    out = Path(args.out)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "load_average_1min": os.getloadavg()[0], "rows": rows}
    append_json_record(out, record)


if __name__ == "__main__":
    main()
