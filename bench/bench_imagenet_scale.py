"""One full TSC round on ImageNet-scale models (ResNet-50, ViT-B/16 at 224 x 224) on synthetic data: time and
peak memory of every component, next to plain inference and training measured in the same run (issue 7).

    python bench/bench_imagenet_scale.py --quick                      # smoke run: 4 images at 64 x 64, resnet50
    python bench/bench_imagenet_scale.py --images 16 --batch 8 --curve-steps 2     # the full run, CPU

Per model, two fresh worker processes (so that one's memory does not inflate the other's readings):

* ``components``: the stages of a round called one by one, exactly as ``tsc_fast.tsc.purify`` composes them
  (discover; un-align = statistics + assignment + permutation + verification; stage-1 curve: Bezier curve,
  training, point, BatchNorm recalibration; re-align; stage-2 curve), each inside a ``PeakMemory`` block, after
  the two anchors: one inference pass over all images (eval, no grad, statistics batch) and one plain SGD training
  step at the curve batch (median of --anchor-repeats steps after a warm-up step).
* ``purify``: the whole round through ``purify(model, dataset, TSCConfig(rounds=1, curve_steps=S, batch_size=B,
  finetune_epochs=0, ...))`` inside one ``PeakMemory`` block, with the per-stage seconds of ``result.history``.

Memory is the process's resident set size (``tsc_fast.testbed.memory.PeakMemory``: sampled every 5 ms, plus the exact
high-water mark when a block sets one): "peak" is the highest RSS during the component, "delta" its growth over
the RSS at the component's start. Freed heap memory is handed back to the system before every component
(``malloc_trim``), so deltas count what the component itself needs. Sub-phases of un-align/re-align take their
times from ``Alignment.seconds`` and their peaks from the sampler's trace. Models use ``weights=None`` (random
initialisation; nothing is downloaded); images are N(0, 1) noise with random labels of 1000 classes. CPU only
(the GPU path, bf16 autocast and channels-last, is not built here). Outputs: ``--out``/imagenet_scale.{json,md}
(``imagenet_scale_quick.*`` for --quick).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20
MODELS = ("resnet50", "vit_b_16")


# ---------------------------------------------------------------------------------------------- the workers
def build_model(name: str, image_size: int):
    import torch
    import torchvision

    torch.manual_seed(0)
    if name == "vit_b_16":
        model = torchvision.models.vit_b_16(weights=None, image_size=image_size)
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised head: outputs all 0
    elif name == "resnet50":
        model = torchvision.models.resnet50(weights=None)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return model.eval()


def synthetic_data(n: int, size: int, classes: int = 1000, seed: int = 0):
    """``n`` random 3 x size x size images with labels of ``classes`` classes (the scaling study's generator)."""
    from tsc_fast.testbed.scaling.zoo import synthetic_data as random_dataset

    return random_dataset((3, size, size), n, seed=seed, classes=classes)


def tsc_config(args):
    from tsc_fast.tsc import TSCConfig

    return TSCConfig(rounds=1, curve_steps=args.curve_steps, batch_size=args.batch, finetune_epochs=0,
                     stats_batch_size=args.stats_batch, progress=False, warn_below_steps=0, device="cpu",
                     autocast=args.autocast, channels_last=args.channels_last)


class Recorder:
    """Runs components inside PeakMemory blocks and collects their rows."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def measure(self, component: str, fn: Callable[[], Any], trace: bool = False, **extra) -> tuple[Any, Any]:
        from tsc_fast.testbed.memory import PeakMemory, release_freed_memory

        release_freed_memory()
        with PeakMemory(trace=trace) as mem:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        row = {"component": component, "seconds": seconds, "peak_mib": mem.peak_bytes / MIB,
               "delta_mib": mem.delta_bytes / MIB, "baseline_mib": mem.baseline_bytes / MIB, **extra}
        if mem.cuda_peak_bytes is not None:
            row["cuda_peak_mib"] = mem.cuda_peak_bytes / MIB
        self.rows.append(row)
        print(f"  {component:<34s} {seconds:8.2f} s  peak {row['peak_mib']:7.0f} MiB  "
              f"delta {row['delta_mib']:6.0f} MiB", flush=True)
        return out, (mem, t0)

    def alignment_phases(self, prefix: str, alignment, mem, t0: float) -> None:
        """Sub-rows of an un-align/re-align call: times from Alignment.seconds, peaks from the trace."""
        start = t0
        for phase in ("stats", "assign", "permute", "verify"):
            seconds = alignment.seconds[phase]
            peak = mem.peak_between(start, start + seconds)
            self.rows.append({"component": f"{prefix}.{phase}", "seconds": seconds,
                              "peak_mib": None if peak is None else peak / MIB,
                              "delta_mib": None if peak is None else (peak - mem.baseline_bytes) / MIB,
                              "baseline_mib": mem.baseline_bytes / MIB, "sub": True})
            start += seconds


def training_step_anchor(rec: Recorder, model, data, batch: int, repeats: int) -> dict[str, Any]:
    """One plain SGD step of a copy of ``model`` at the curve batch: median of ``repeats`` after a warm-up step."""
    import torch
    import torch.nn.functional as F

    plain = copy.deepcopy(model).train()
    opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xb, yb = data.tensors[0][:batch], data.tensors[1][:batch]

    def train_step():
        loss = F.cross_entropy(plain(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_step()  # warm-up (momentum buffers, autograd's pools)
    steps = []
    for _ in range(repeats):
        rec.measure("anchor: training step", train_step, anchor=True)
        steps.append(rec.rows.pop())
    row = sorted(steps, key=lambda r: r["seconds"])[len(steps) // 2]
    row["seconds_all"] = [r["seconds"] for r in steps]
    row["peak_mib"] = max(r["peak_mib"] for r in steps)
    row["delta_mib"] = max(r["delta_mib"] for r in steps)
    rec.rows.append(row)
    return row


def worker_components(args) -> dict[str, Any]:
    import torch

    from tsc_fast.align import realign, unalign
    from tsc_fast.batches import make_loader
    from tsc_fast.curve import BezierCurve, recalibrate_bn, train_curve
    from tsc_fast.training import ComputeOptions
    from tsc_fast.testbed.memory import rss_bytes
    from tsc_fast.spec import discover, permute

    torch.set_num_threads(args.threads)
    rss_start = rss_bytes()
    model = build_model(args.model, args.size)
    data = synthetic_data(args.images, args.size)
    config = tsc_config(args)
    stats_batches = make_loader(data, config.stats_batch_size, shuffle=False)
    plan = config.plan(len(data), args.size)
    train_batches = make_loader(data, plan.batch_size, shuffle=True, seed=config.seed)
    example = data.tensors[0][: config.stats_batch_size]
    rec = Recorder()
    rss_ready = rss_bytes()

    # ---- anchors
    with torch.no_grad():
        model(example[:1])  # warm-up: thread pools and lazily loaded kernels belong to the baseline

    @torch.no_grad()
    def inference_pass():
        for xb, _ in stats_batches:
            model(xb)

    rec.measure("anchor: inference pass", inference_pass, anchor=True)
    step_row = training_step_anchor(rec, model, data, plan.batch_size, args.anchor_repeats)
    print(f"  (training step: median of {[round(s, 2) for s in step_row['seconds_all']]})", flush=True)

    # ---- the round, stage by stage, as purify composes it
    current = copy.deepcopy(model).eval()
    align_kw = dict(objective=config.objective, backend=config.assign_backend, device="cpu", verify=config.verify)
    spec, _ = rec.measure("discover", lambda: discover(current, example))
    alignment, (mem, t0) = rec.measure("unalign", lambda: unalign(current, spec, stats_batches, **align_kw),
                                       trace=True)
    rec.alignment_phases("unalign", alignment, mem, t0)
    perms = alignment.perms
    del alignment

    def curve_stage(stage: int, start_model, end_model, t: float):
        curve, _ = rec.measure(f"curve{stage}: build", lambda: BezierCurve(start_model, end_model))
        losses, _ = rec.measure(
            f"curve{stage}: train ({plan.curve_steps} steps)",
            lambda: train_curve(curve, train_batches, plan.curve_epochs, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, l2_coeff=config.l2_coeff,
                                t_max=plan.cosine_t_max, augment_shift=plan.augment_shift,
                                seed=config.seed + stage, device="cpu", progress=False,
                                compute=ComputeOptions(config.autocast, config.channels_last)),
            steps=plan.curve_steps)
        point, _ = rec.measure(f"curve{stage}: point", lambda: curve.point(t))
        seen, _ = rec.measure(f"curve{stage}: BN recalibration", lambda: recalibrate_bn(point, stats_batches))
        rec.rows[-1]["examples"] = seen
        return point, losses

    unaligned, _ = rec.measure("curve1: permute end", lambda: permute(current, spec, perms))
    stage1_point, losses1 = curve_stage(1, current, unaligned, config.t_stage1)
    del unaligned
    alignment, (mem, t0) = rec.measure(
        "realign", lambda: realign(current, stage1_point, spec, stats_batches, **align_kw), trace=True)
    rec.alignment_phases("realign", alignment, mem, t0)
    perms = alignment.perms
    del alignment
    realigned, _ = rec.measure("curve2: permute start", lambda: permute(current, spec, perms))
    final, losses2 = curve_stage(2, realigned, stage1_point, config.t_stage2)
    return {"rows": rec.rows, "rss_start_mib": rss_start / MIB, "rss_model_and_data_mib": rss_ready / MIB,
            "groups": len(spec.groups), "attention_layers": len(spec.heads), "plan": plan.__dict__,
            "curve_losses": [losses1, losses2], "params": sum(p.numel() for p in model.parameters())}


def worker_purify(args) -> dict[str, Any]:
    import torch

    from tsc_fast.testbed.memory import PeakMemory, release_freed_memory, rss_bytes
    from tsc_fast.tsc import purify

    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.size)
    data = synthetic_data(args.images, args.size)
    with torch.no_grad():
        model(data.tensors[0][:1])  # the same warm-up as the components worker
    release_freed_memory()
    rss_ready = rss_bytes()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = purify(model, data, config=tsc_config(args))
        seconds = time.perf_counter() - t0
    history = [{"stage": h["stage"], "seconds": h["seconds"], "curve_losses": h["curve_losses"]}
               for h in result.history]
    print(f"  {'purify (1 round)':<34s} {seconds:8.2f} s  peak {mem.peak_bytes / MIB:7.0f} MiB  "
          f"delta {mem.delta_bytes / MIB:6.0f} MiB", flush=True)
    return {"seconds": seconds, "result_seconds": result.seconds, "peak_mib": mem.peak_bytes / MIB,
            "delta_mib": mem.delta_bytes / MIB, "baseline_mib": mem.baseline_bytes / MIB,
            "rss_model_and_data_mib": rss_ready / MIB, "history": history, "plan": result.plan.__dict__}


# ---------------------------------------------------------------------------------------------- the driver
def run_worker(kind: str, model: str, args) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--worker-out", out,
           "--images", str(args.images), "--size", str(args.size), "--batch", str(args.batch),
           "--stats-batch", str(args.stats_batch), "--curve-steps", str(args.curve_steps),
           "--threads", str(args.threads), "--anchor-repeats", str(args.anchor_repeats),
           *(["--autocast", args.autocast] if args.autocast else []),
           *(["--channels-last"] if args.channels_last else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            return {"error": f"worker {kind} for {model} exited with {proc.returncode} (see its output above)",
                    "wall_s": wall}
        record = json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)
    record["wall_s"] = wall
    return record


def machine() -> dict[str, Any]:
    import torch
    import torchvision

    from tsc_fast.testbed.machine import cpu_model, memory_total_gib

    cpu, memory_gib = cpu_model(), memory_total_gib() or 0.0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda_available": torch.cuda.is_available()}


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    import resource

    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def model_table(name: str, rec: dict[str, Any]) -> list[str]:
    comp, pur = rec["components"], rec["purify"]
    lines = [f"### {name}", ""]
    if "error" in comp:
        lines += [f"components worker failed: {comp['error']}", ""]
    if "error" in pur:
        lines += [f"purify worker failed: {pur['error']}", ""]
    if "error" in comp:
        return lines
    rows = comp["rows"]
    infer = next(r for r in rows if r["component"] == "anchor: inference pass")
    step = next(r for r in rows if r["component"] == "anchor: training step")
    plan = comp["plan"]
    lines += [f"{comp['params'] / 1e6:.1f} M parameters, {comp['groups']} permutation groups"
              f" ({comp['attention_layers']} attention layers head-aware); curve: {plan['curve_steps']} steps "
              f"({plan['curve_epochs']} epoch(s) at batch {plan['batch_size']}, shift {plan['augment_shift']} px); "
              f"RSS after imports {comp['rss_start_mib']:.0f} MiB, with model and data "
              f"{comp['rss_model_and_data_mib']:.0f} MiB.", "",
              "| component | seconds | ratio | anchor | peak RSS MiB | delta MiB |",
              "|---|---:|---:|---|---:|---:|"]

    def anchor_of(row) -> tuple[float | None, str]:
        c = row["component"]
        if row.get("anchor"):
            return None, ""
        if ": train" in c:
            return row["seconds"] / row["steps"] / step["seconds"], "training step (per curve step)"
        return row["seconds"] / infer["seconds"], "inference pass"

    total = 0.0
    for row in rows:
        ratio, anchor = anchor_of(row)
        if not row.get("anchor") and not row.get("sub"):
            total += row["seconds"]
        name_cell = f"&nbsp;&nbsp;{row['component']}" if row.get("sub") else row["component"]
        lines.append(f"| {name_cell} | {_fmt(row['seconds'])} | {_fmt(ratio)} | {anchor} | "
                     f"{_fmt(row['peak_mib'], 0)} | {_fmt(row['delta_mib'], 0)} |")
    round_peak = max(r["peak_mib"] for r in rows if not r.get("anchor") and r["peak_mib"] is not None)
    lines.append(f"| **round, sum of components** | {_fmt(total)} | {_fmt(total / infer['seconds'])} | "
                 f"inference pass | {_fmt(round_peak, 0)} (max) | |")
    if "error" not in pur:
        lines.append(f"| **purify, whole round (fresh process)** | {_fmt(pur['seconds'])} | "
                     f"{_fmt(pur['seconds'] / infer['seconds'])} | inference pass | {_fmt(pur['peak_mib'], 0)} | "
                     f"{_fmt(pur['delta_mib'], 0)} |")
        for h in pur["history"]:
            s = h["seconds"]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in s.items())
            stage_s = s.get("align", 0) + s.get("curve_and_bn", 0)
            lines.append(f"| &nbsp;&nbsp;purify history, stage {h['stage']} | {_fmt(stage_s)} | | ({parts}) | | |")
    lines.append("")
    return lines


def write_report(record: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
    m, a = record["machine"], record["settings"]
    lines = [f"# One TSC round at ImageNet scale ({'quick smoke run' if a['quick'] else 'CPU'})", ""]
    others = record.get("other_processes_cores")
    if record["loaded"]:
        lines += [f"**loaded machine (load {record['load_start'][0]:.2f} at start; other processes used "
                  f"{others} cores on average during the run)**: timings are inflated.", ""]
    lines += [f"- date: {record['date']}", f"- command: `{record['command']}`",
              f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['platform']}",
              f"- python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
              f"threads {a['threads']}, CUDA available: {m['cuda_available']} (CPU run)",
              f"- load average (1/5/15 min) at start {record['load_start']}, at end {record['load_end']} (this run "
              f"included); other processes used {others} of the {m['cores']} cores on average during the run",
              f"- data: {a['images']} random images 3x{a['size']}x{a['size']}, random labels (1000 classes); "
              f"statistics/inference batch {a['stats_batch']}, curve batch {a['batch']}, {a['curve_steps']} curve "
              f"steps per curve, fine-tune off (one round: rounds=1)",
              f"- total wall time {record['wall_s']:.0f} s", "",
              "Ratios: against one inference pass over all images (eval, no grad), or, for curve training, its time "
              "per optimiser step against one plain SGD training step at the same batch. Peak: highest process RSS "
              "during the component; delta: growth over the RSS at its start (models, data and earlier results "
              "held at that point are in the baseline). Indented un-align/re-align phases: times from "
              "`Alignment.seconds`, peaks from the 5 ms RSS trace. The purify row ran in its own fresh process.", ""]
    for name, rec in record["models"].items():
        lines += model_table(name, rec)
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--images", type=int, default=16, help="synthetic images (the clean set)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="curve training batch")
    parser.add_argument("--stats-batch", type=int, default=None,
                        help="statistics / BN recalibration / inference batch (default: all images)")
    parser.add_argument("--curve-steps", type=int, default=2, help="optimiser steps per curve")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--autocast", choices=["bf16"], help="curve training under bf16 autocast (TSCConfig.autocast)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last curve batches")
    parser.add_argument("--anchor-repeats", type=int, default=3, help="timed plain training steps (median)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/imagenet_scale"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 images at 64 x 64, resnet50, batch 2")
    parser.add_argument("--worker", choices=["components", "purify"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        sys.path.insert(0, str(ROOT))
        record = (worker_components if args.worker == "components" else worker_purify)(args)
        Path(args.worker_out).write_text(json.dumps(record))
        return

    if args.quick:
        args.images, args.size, args.batch, args.curve_steps, args.anchor_repeats = 4, 64, 2, 2, 1
        if "--models" not in sys.argv:
            args.models = "resnet50"
    args.stats_batch = args.stats_batch or args.images
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    load_start = [round(v, 2) for v in os.getloadavg()]
    busy_start, own_start = busy_cpu_seconds(), own_cpu_seconds()
    started = time.perf_counter()
    record: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "machine": machine(), "settings": {k: v for k, v in vars(args).items()
                                           if k not in ("worker", "model", "worker_out", "out")},
        "load_start": load_start, "loaded": load_start[0] > 0.8, "models": {}}
    for m in models:
        print(f"{m}: components", flush=True)
        comp = run_worker("components", m, args)
        print(f"{m}: purify", flush=True)
        pur = run_worker("purify", m, args)
        record["models"][m] = {"components": comp, "purify": pur}
    record["load_end"] = [round(v, 2) for v in os.getloadavg()]
    record["wall_s"] = time.perf_counter() - started
    busy_end = busy_cpu_seconds()
    if busy_start is not None and busy_end is not None:  # CPU the rest of the machine used while we ran
        other = max(0.0, busy_end - busy_start - (own_cpu_seconds() - own_start))
        record["other_processes_cores"] = round(other / record["wall_s"], 2)
        record["loaded"] = record["loaded"] or record["other_processes_cores"] > 0.3
    stem = ("imagenet_scale" + (f"_{args.autocast}" if args.autocast else "")
            + ("_channels_last" if args.channels_last else "") + ("_quick" if args.quick else ""))
    write_report(record, Path(args.out), stem)
    if any("error" in part for rec in record["models"].values() for part in rec.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
