"""Peak memory of the statistics pass against plain inference (issue 5: resnet50, batch 32, 224 x 224, <= 1.5x).

    python bench/bench_stats_memory.py [--model resnet50] [--batch 32] [--size 224] [--out bench/results/...]

Each measurement runs in a fresh subprocess (the process high-water mark, ``ru_maxrss``, only grows; torch's CPU
allocations are invisible to tracemalloc). Inside it: build the model(s) and the batch, warm up on one sample,
read ``ru_maxrss`` (the baseline: libraries, weights, the input), run the measured pass once, read it again. The
reported peak of a pass is the growth over the baseline; the plain inference pass measured the same way is the
anchor. Modes: plain inference; self-statistics (un-align, whole batches, features folded in slices);
cross-statistics (re-align, two models) with automatic micro-batches, and with whole batches (all groups'
reference features of the batch held at once: the behaviour before micro-batching).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from _common import append_json_record

MODES = ("plain", "self", "cross_auto", "cross_whole_batch")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure(mode: str, model_name: str, batch: int, size: int) -> dict:
    """Run one mode in this process (meant to be a fresh one) and return its memory and time."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    from tsc_fast.spec import discover, permute, random_permutations
    from tsc_fast.stats import cross_correlations, self_correlations

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(batch, 3, size, size)
    spec = discover(model, x[:1])
    other = permute(model, spec, random_permutations(spec, seed=1)) if mode.startswith("cross") else None
    loader = DataLoader(TensorDataset(x), batch_size=batch)
    with torch.no_grad():
        model(x[:1])  # warm-up: lazily loaded kernels and thread pools count in the baseline
    whole = {"micro_batch": batch}
    runs = {
        "plain": lambda: torch.no_grad()(model)(x),
        "self": lambda: self_correlations(model, spec, loader),
        "cross_auto": lambda: cross_correlations(model, other, spec, loader),
        "cross_whole_batch": lambda: cross_correlations(model, other, spec, loader, **whole),
    }
    baseline = _maxrss_mib()
    start = time.perf_counter()
    runs[mode]()
    seconds = time.perf_counter() - start
    peak = _maxrss_mib()
    return {"mode": mode, "baseline_mib": baseline, "peak_mib": peak, "growth_mib": peak - baseline,
            "seconds": seconds}


def run_fresh(mode: str, args) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--model", args.model, "--batch", str(args.batch),
               "--size", str(args.size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help="free text stored with the record")
    parser.add_argument("--out", default="bench/results/bench_stats_memory.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.batch, args.size)))
        return
    rows = [run_fresh(mode, args) for mode in args.modes.split(",")]
    plain = next((r for r in rows if r["mode"] == "plain"), None)
    for row in rows:
        if plain:
            row["growth_vs_plain"] = row["growth_mib"] / plain["growth_mib"]
            row["peak_vs_plain"] = row["peak_mib"] / plain["peak_mib"]
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    out = Path(args.out)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "tag": args.tag, "model": args.model, "batch": args.batch,
              "size": args.size, "machine": platform.processor() or platform.machine(), "rows": rows}
    append_json_record(out, record)


if __name__ == "__main__":
    main()
