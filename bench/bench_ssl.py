"""Self-supervised TSC on digits: a SimCLR encoder backdoored during pre-training, purified with the NT-Xent loss
(no labels), evaluated by a linear probe; plain fine-tuning with the same loss for comparison.

    python bench/bench_ssl.py --seeds 0,1,2

Writes bench/results/ssl.json (per seed and mean) and prints a table. Target (issue 6): probe ASR <= 15% with a
probe ACC drop <= 3 points.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from tsc_fast.testbed import ssl_victim as ssl

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        result = ssl.run_ssl_experiment(seed=seed)
        result["wall_seconds"] = time.perf_counter() - start
        runs.append(result)
        print(json.dumps({k: v for k, v in result.items() if k in ("seed", "before", "tsc", "ft")}), flush=True)
    summary = {}
    for stage in ("before", "tsc", "ft"):
        if all(stage in r for r in runs):
            summary[stage] = {m: statistics.mean(r[stage][m] for r in runs) for m in ("acc", "asr")}
    command = "python bench/bench_ssl.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ssl.json").write_text(json.dumps({"command": command, "summary": summary, "runs": runs}, indent=2,
                                                 default=str))
    for stage, m in summary.items():
        print(f"{stage:7} probe ACC {m['acc']:.1f}  ASR {m['asr']:.1f}")


if __name__ == "__main__":
    main()
