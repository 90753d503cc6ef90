"""What each TSC component costs, as ratios against plain PyTorch work measured in the same run.

    python bench/bench_tsc_costs.py                      # PreAct-ResNet18, CIFAR-shaped random data, CPU
    python bench/bench_tsc_costs.py --model cnn --quick

Anchors: a plain inference pass over the data (eval, no grad) and a plain SGD training step of the same model.
Components: the correlation statistics pass for all groups (un-align: one model; re-align: two models, against two
inference passes), one curve training step (Bezier weights + functional call + backward + SGD on the middle
point), and the BatchNorm recalibration pass. Medians of --repeats runs; results appended to
bench/results/tsc_costs.csv and written to bench/results/tsc_costs.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tsc_fast import discover
from tsc_fast.models import build_model
from tsc_fast.curve import BezierCurve, cross_entropy_loss, recalibrate_bn
from tsc_fast.stats import cross_correlations, self_correlations
from _common import median_seconds

RESULTS = Path(__file__).parent / "results"
TARGETS = {"stats_unalign": 1.3, "stats_realign": 1.3, "curve_step": 1.1, "bn_recalibration": 1.1}


def build(name: str):
    if name == "preact_resnet18":
        return build_model("preact_resnet18"), (3, 32, 32)
    if name == "cnn":
        return build_model("cnn"), (1, 8, 8)
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preact_resnet18", choices=["preact_resnet18", "cnn"])
    parser.add_argument("--images", type=int, default=512, help="images in the statistics/inference pass")
    parser.add_argument("--stats-batch", type=int, default=128)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 128, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, shape = build(args.model)
    x = torch.randn(args.images, *shape)
    y = torch.randint(0, 10, (args.images,))
    loader = DataLoader(TensorDataset(x, y), batch_size=args.stats_batch)
    spec = discover(model, x[:2])
    other = build(args.model)[0]

    @torch.no_grad()
    def inference_pass(m=model):
        m.eval()
        for xb, _ in loader:
            m(xb)

    def two_inference_passes():
        inference_pass(model)
        inference_pass(other)

    xb, yb = x[: args.train_batch], y[: args.train_batch]
    plain = build(args.model)[0].train()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def plain_step():
        loss = F.cross_entropy(plain(xb), yb)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    curve = BezierCurve(model, other)
    curve.template.train()
    curve_opt = torch.optim.SGD([curve.middle], lr=0.02, momentum=0.9, weight_decay=5e-4)
    t_values = iter(torch.rand(10_000).tolist())

    def curve_step():
        w = curve.weights(next(t_values))
        loss = cross_entropy_loss(curve.bind(w), (xb, yb)) + 0.5e-4 * w.pow(2).sum()
        curve_opt.zero_grad(set_to_none=True)
        loss.backward()
        curve_opt.step()

    point = curve.point(0.4)
    timings = {
        "inference_pass": median_seconds(inference_pass, args.repeats, warmup=1),
        "two_inference_passes": median_seconds(two_inference_passes, args.repeats, warmup=1),
        "train_step": median_seconds(plain_step, args.repeats, warmup=2),
        "stats_unalign": median_seconds(lambda: self_correlations(model, spec, loader), args.repeats, warmup=1),
        "stats_realign": median_seconds(lambda: cross_correlations(model, other, spec, loader), args.repeats,
                                        warmup=1),
        "curve_step": median_seconds(curve_step, args.repeats, warmup=2),
        "bn_recalibration": median_seconds(lambda: recalibrate_bn(point, loader), args.repeats, warmup=1),
    }
    anchors = {"stats_unalign": "inference_pass", "stats_realign": "two_inference_passes",
               "curve_step": "train_step", "bn_recalibration": "inference_pass"}
    rows = []
    for name, anchor in anchors.items():
        ratio = timings[name] / timings[anchor]
        rows.append({"component": name, "seconds": timings[name], "anchor": anchor,
                     "anchor_seconds": timings[anchor], "ratio": ratio, "target": TARGETS[name],
                     "met": ratio <= TARGETS[name]})
    meta = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
            "images": args.images, "stats_batch": args.stats_batch, "train_batch": args.train_batch,
            "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "device": "cpu",
            "groups": len(spec.groups)}
    print(f"{args.model}: {meta['groups']} groups, {args.images} images, batch {args.stats_batch} / "
          f"train batch {args.train_batch}, {args.threads} threads, median of {args.repeats}")
    print(f"{'component':18}{'seconds':>10}{'anchor':>22}{'anchor s':>10}{'ratio':>8}{'target':>8}")
    for r in rows:
        print(f"{r['component']:18}{r['seconds']:10.4f}{r['anchor']:>22}{r['anchor_seconds']:10.4f}"
              f"{r['ratio']:8.3f}{r['target']:8.2f}{'' if r['met'] else '  MISSED'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / "tsc_costs.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **r})
    (RESULTS / f"tsc_costs_{args.model}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
