"""Timings of tsc_fast.spec: discover(), check_invariance() and the feature-tap pass, against plain inference.

    python bench/bench_spec.py [--repeats 3] [--out bench/results/bench_spec.json]

Targets (issue 5 / issue 3): discover() resnet50 < 2 s and vit_b_16 < 5 s, check_invariance < 5 s (CPU; 224 x 224,
batch 1); a forward pass with every group's taps <= 1.3x a plain inference pass (the callback here only touches
the features; real statistics cost is the stats module's). Each row also reports a plain inference pass of the
same model measured in the same run (the anchor), medians over --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision

from tsc_fast.backdoor.models import PreActResNet18
from tsc_fast.spec import check_invariance, discover, forward_with_taps


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/bench_spec.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    resnet50 = torchvision.models.resnet50(weights=None)
    rows.append(bench_model("resnet50", resnet50, torch.randn(1, 3, 224, 224), args.repeats))
    vit = torchvision.models.vit_b_16(weights=None)
    torch.nn.init.normal_(vit.heads.head.weight, std=0.02)  # zero-initialised head would make outputs all 0
    rows.append(bench_model("vit_b_16", vit, torch.randn(1, 3, 224, 224), args.repeats))
    rows.append(bench_taps(args.repeats))
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(), "rows": rows}
    history = json.loads(out.read_text()) if out.exists() else []
    history.append(record)
    out.write_text(json.dumps(history, indent=1))
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
