"""Scaling study (``tsc-fast bench scaling``): how each TSC component's cost grows with layer width.

Three families (:mod:`.zoo`), each swept over one width knob on synthetic random data (nothing is downloaded):

- ``mlp``: :class:`~tsc_fast.models.MLP`, 64 inputs, two hidden layers of ``h`` units (two h-unit groups,
  one h x h layer), h = 256 ... 16384;
- ``cnn``: :class:`~tsc_fast.models.DigitsCNN` on 1x8x8 images, width 32 * multiplier (groups of 32m and
  64m channels), multiplier 1 ... 16;
- ``vit``: torchvision's ``VisionTransformer`` (32x32 images, patch 8, hidden 64, 4 heads, 2 layers), MLP dim
  = 64 * ratio, ratio 1 ... 16.

Components (:mod:`.timing`), each timed on its real code path: the statistics pass, every group's assignment
with our solver and with scipy, applying the permutations, one curve step, BatchNorm recalibration, one whole
round and the assignment seconds inside it; skipped with a note over a width cap or the memory guard
(:mod:`.guard`). :mod:`.fit` fits power laws and derives the LAP's shares and crossings; :mod:`.report` writes
``scaling.csv``, ``report.md``, one log-log PNG per family and ``command.txt``; :mod:`.command` is the
sub-command and :func:`run_study` the entry point.
"""
from .command import add_scaling_parser, config_from_args, run_study
from .config import COMPONENTS, FAMILIES, SWEEP_NAMES, ScalingConfig
from .fit import crossing, exponent_table, fit_power_law, lap_shares, series
from .guard import estimated_peak_bytes
from .report import CSV_FIELDS, markdown_report, read_csv, write_csv, write_outputs
from .timing import cost_matrices, measure_point, run_sweep, solve_all, timed
from .zoo import SweepPoint, batches_of, build_model, sweep_points, synthetic_data

__all__ = ["ScalingConfig", "SweepPoint", "sweep_points", "build_model", "synthetic_data", "batches_of",
           "fit_power_law", "timed", "solve_all", "cost_matrices", "measure_point", "run_sweep", "series",
           "lap_shares", "crossing", "exponent_table", "markdown_report", "write_csv", "write_outputs", "run_study",
           "read_csv", "config_from_args", "add_scaling_parser", "estimated_peak_bytes", "COMPONENTS", "FAMILIES",
           "SWEEP_NAMES", "CSV_FIELDS"]
