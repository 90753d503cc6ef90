"""The benchmark-suite runner: backdoored victims x defenses on identical inputs, one row per run.

    config = SuiteConfig(attacks=("badnets", "blended"), defenses=("tsc", "ft", "mcr", "fst"), rates=(0.1,),
                         seeds=(0,))
    result = run_suite(config, out_dir="bench/results/suite")   # table.md, runs.csv, plots, suite.json

``data`` is ``"digits"`` (the 8x8 digits, ``DigitsCNN``, 40 victim epochs) or ``"mnist"`` (28x28 MNIST,
``MnistCNN``, 20 victim epochs); each dataset's attack settings are ``tsc_fast.testbed.attacks.ATTACK_OPTIONS``.
For every (attack, rate, seed) one victim is trained (and cached for the run); every defense of that victim gets
the SAME clean subset (``clean_fraction`` of the clean training set, drawn with the run's seed: 72 digits or 200
MNIST images at 5%). The backdoored model itself is reported as the row ``defense = "none"``.

Each row also carries ``clean_asr``: the ASR of the attack's trigger on a model trained with the same recipe and
seed on CLEAN data (one per seed, cached for the run; ``clean_reference=False`` skips it). A victim counts as
``implanted`` when its backdoored ASR reaches ``IMPLANT_THRESHOLD`` (50%) and the clean model's stays below
``FOOLS_CLEAN_ASR`` (20%: above it the target ASR <= 15 is out of any defense's reach): an attack that does not
implant, or whose trigger fools a model that never saw a poisoned image (then it is not a backdoor), is flagged
and its defense rows are not judged.

The landscape figure (clean and poisoned loss along t for the stage-1 and stage-2 curves) comes from
:func:`landscape_curves`, which re-runs one TSC round with the package's own pieces (unalign, BezierCurve,
train_curve, realign) because ``purify`` does not hand out its trained curves.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.nn as nn

from ..metrics import evaluate, loss_metrics
from ..run_report import LandscapeRecorder
from ..tsc import TSCConfig, purify
from . import reports
from .adaptive_attack import make_adaptive_backdoored_digits
from .attacks import ATTACKS
from .defenses import DEFENSES, run_defense
from .victims import VICTIM_DATASETS, BackdoorSetup, dataset_attack_options, make_backdoored, make_clean

IMPLANT_THRESHOLD = reports.IMPLANT_THRESHOLD   # backdoored ASR (percent) below which an attack "did not implant"
FOOLS_CLEAN_ASR = reports.FOOLS_CLEAN_ASR       # clean-model ASR (percent) from which the trigger is no backdoor
ADAPTIVE_PREFIX = "adaptive_"      # "adaptive_badnets": the base attack trained by tsc_fast.testbed.adaptive_attack
METRICS = ("acc", "asr", "ra")
QUICK_STEPS = 60                   # optimiser steps per curve / fine-tune phase in --quick mode
QUICK_VICTIM_EPOCHS = {"digits": 15, "mnist": 5}      # --quick victims (every quick attack implants at these)
QUICK_CLEAN_FRACTION = {"digits": 0.1, "mnist": 0.05}  # --quick defender's share: 144 digits, 200 MNIST images


def known_attacks() -> list[str]:
    """Attack names the suite accepts: the package's attacks and their adaptive variants."""
    return sorted(ATTACKS) + [ADAPTIVE_PREFIX + name for name in ("badnets", "blended")]


def parse_names(text: str | Sequence[str], known: Sequence[str], what: str,
                all_names: Sequence[str] | None = None, lower: bool = True) -> tuple[str, ...]:
    """A comma list (or sequence) of ``what`` names checked against ``known``, duplicates dropped, order kept;
    ``"all"`` gives ``all_names`` (default: every known name)."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    names = [n.lower() for n in names] if lower else names
    if names == ["all"]:
        return tuple(known if all_names is None else all_names)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what}(s) {unknown or names}; known: all, {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def parse_attacks(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"`` (every package attack, adaptive ones excluded) or a comma list of names, validated."""
    return parse_names(text, known_attacks(), "attack", all_names=sorted(ATTACKS))


def parse_defenses(text: str | Sequence[str]) -> tuple[str, ...]:
    return parse_names(text, list(DEFENSES), "defense")


def parse_rates(text: str | Sequence[float]) -> tuple[float, ...]:
    values = [float(s) for s in (text.split(",") if isinstance(text, str) else text)]
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise ValueError(f"poisoning rates must be in (0, 1], got {values}")
    return tuple(values)


@dataclass
class SuiteConfig:
    """What the suite runs. ``defense_configs`` maps a defense name to its config (dataclass or dict of fields)."""

    attacks: tuple[str, ...] = ("badnets", "blended")
    defenses: tuple[str, ...] = ("tsc", "ft", "mcr", "fst")
    rates: tuple[float, ...] = (0.1, 0.01)
    seeds: tuple[int, ...] = (0, 1, 2)
    data: str = "digits"
    target: int = 0
    clean_fraction: float = 0.05
    victim_epochs: int | None = None      # None: the dataset's recipe (40 digits, 20 MNIST)
    defense_configs: dict[str, Any] = field(default_factory=dict)
    landscape: bool = True                # train the landscape curves for the first victim
    landscape_points: int = 11            # t values on [0, 1] at which the curves are evaluated
    clean_reference: bool = True          # measure each trigger on a clean model too (column clean_asr)
    plots: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if self.data not in VICTIM_DATASETS:
            raise ValueError(f"the suite runs on {' or '.join(VICTIM_DATASETS)} (the embedded datasets), "
                             f"got data={self.data!r}")
        self.attacks, self.defenses = parse_attacks(self.attacks), parse_defenses(self.defenses)
        adaptive = [a for a in self.attacks if a.startswith(ADAPTIVE_PREFIX)]
        if adaptive and self.data != "digits":
            raise ValueError(f"the adaptive attacks ({', '.join(adaptive)}) run on the digits only")
        if self.victim_epochs is None:
            self.victim_epochs = VICTIM_DATASETS[self.data].epochs
        self.rates = parse_rates(self.rates)
        if not self.seeds:
            raise ValueError("need at least one seed")
        if not 0.0 < self.clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in (0, 1], got {self.clean_fraction}")
        if self.victim_epochs < 1 or self.landscape_points < 2:
            raise ValueError("victim_epochs must be >= 1 and landscape_points >= 2")

    @classmethod
    def quick(cls, **overrides: Any) -> "SuiteConfig":
        """CI budget: 2 attacks, 1 rate, 1 seed, short victims (``QUICK_VICTIM_EPOCHS``), the defender's share of
        ``QUICK_CLEAN_FRACTION``, curves and fine-tunes of ``QUICK_STEPS`` steps."""
        data = overrides.get("data", "digits")
        settings: dict[str, Any] = dict(attacks=("badnets", "blended"), rates=(0.1,), seeds=(0,),
                                        victim_epochs=QUICK_VICTIM_EPOCHS.get(data),
                                        clean_fraction=QUICK_CLEAN_FRACTION.get(data, 0.05), landscape_points=6,
                                        defense_configs=quick_defense_configs())
        settings.update(overrides)
        return cls(**settings)

    def defense_config(self, name: str) -> Any:
        if name in self.defense_configs:
            return self.defense_configs[name]
        if name == "tsc":  # the suite's defaults keep progress bars and short-curve warnings off
            return TSCConfig(progress=False, warn_below_steps=0)
        return None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["defense_configs"] = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                  for k, v in self.defense_configs.items()}
        return out


def quick_defense_configs(steps: int = QUICK_STEPS) -> dict[str, Any]:
    """Tiny budgets for every defense (CI): one TSC round, ``steps`` steps per curve / fine-tune."""
    return {"tsc": TSCConfig(rounds=1, curve_steps=steps, progress=False, warn_below_steps=0),
            "ft": {"steps": steps}, "mcr": {"finetune_steps": steps, "curve_steps": steps},
            "fst": {"steps": steps}}


# ---------------------------------------------------------------------------------------------------------------
# victims


def make_victim(attack: str, rate: float, seed: int, target: int = 0, epochs: int | None = None,
                data: str = "digits") -> BackdoorSetup:
    """A backdoored victim of ``data`` (``digits``: DigitsCNN, ``mnist``: MnistCNN; ``epochs`` default: the dataset's
    recipe): the package attack with the dataset's options, or (digits only) an adaptive variant."""
    if attack.startswith(ADAPTIVE_PREFIX):
        if data != "digits":
            raise ValueError(f"the adaptive attacks run on the digits only, got data={data!r}")
        base = attack[len(ADAPTIVE_PREFIX):]
        return make_adaptive_backdoored_digits(base, rate=rate, target=target, seed=seed,
                                               epochs=VICTIM_DATASETS[data].epochs if epochs is None else epochs,
                                               attack_options=dataset_attack_options(data, base))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*clean-label.*|.*capped.*|.*target class.*")
        return make_backdoored(data, attack, rate=rate, target=target, seed=seed, epochs=epochs, progress=False,
                               attack_options=dataset_attack_options(data, attack))


# ---------------------------------------------------------------------------------------------------------------
# the landscape figure's data


def landscape_curves(setup: BackdoorSetup, clean_data, config: TSCConfig | None = None,
                     points: int = 11) -> dict[str, Any]:
    """Round 1 of ``purify`` itself (stage-1 curve original -> un-aligned copy, stage-2 curve re-aligned
    original -> stage-1 point), with both trained curves evaluated at ``points`` t values in [0, 1].

    Every point gets its BatchNorm statistics recomputed on the clean data first (as TSC does at t*). Returns
    ``{"stage1": [...], "stage2": [...], "t_stage1", "t_stage2"}``, each profile a list of
    ``{"t", "clean_loss", "poison_loss", "acc", "asr"}`` measured on the clean test set and its triggered copy.
    """
    config = dataclasses.replace(config or TSCConfig(), rounds=1, progress=False, warn_below_steps=0)
    keep = setup.y_test != setup.attack.target
    x_triggered = setup.attack.apply(setup.x_test[keep])

    def evaluate(m: nn.Module) -> dict[str, float]:
        return loss_metrics(m, setup.x_test, setup.y_test, x_triggered, setup.attack.target)

    recorder = LandscapeRecorder(evaluate, config.rounds, config.t_stage1, config.t_stage2, points)
    result = purify(setup.model, clean_data, config=config, on_curve=recorder)
    return {**recorder.landscape, "curve_steps": result.plan.curve_steps, "attack": setup.config.get("attack"),
            "rate": setup.config.get("rate"), "seed": setup.config.get("seed")}


# ---------------------------------------------------------------------------------------------------------------
# the runner


@dataclass
class SuiteResult:
    rows: list[dict[str, Any]]               # one per (attack, rate, seed, defense); defense "none": backdoored
    landscape: dict[str, Any] | None
    config: SuiteConfig
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _row(attack: str, rate: float, seed: int, defense: str, metrics: dict[str, float], seconds: float,
         steps: int, epochs: int, examples: int, implanted: bool, clean_asr: float | None = None) -> dict[str, Any]:
    row = {"attack": attack, "rate": rate, "seed": seed, "defense": defense,
           **{m: round(float(metrics[m]), 4) for m in METRICS}, "seconds": round(seconds, 3), "steps": steps,
           "epochs": epochs, "clean_examples": examples, "implanted": implanted}
    if clean_asr is not None:
        row["clean_asr"] = round(float(clean_asr), 4)
    return row


def is_implanted(backdoored_asr: float, clean_asr: float | None = None) -> bool:
    """The suite's rule: backdoored ASR >= ``IMPLANT_THRESHOLD`` and (when measured) a clean model's ASR under the
    same trigger below ``FOOLS_CLEAN_ASR``."""
    return backdoored_asr >= IMPLANT_THRESHOLD and (clean_asr is None or clean_asr < FOOLS_CLEAN_ASR)


class CleanModels:
    """One clean reference model per seed (the victim recipe on clean data), trained on first use."""

    def __init__(self, data: str, epochs: int | None):
        self.data, self.epochs, self.models = data, epochs, {}

    def asr(self, setup: BackdoorSetup, seed: int) -> float:
        """ASR of ``setup``'s trigger on the clean model of ``seed``, on ``setup``'s test set."""
        if seed not in self.models:
            self.models[seed] = make_clean(self.data, seed=seed, epochs=self.epochs)
        return evaluate(self.models[seed], setup.x_test, setup.y_test, setup.attack)["asr"]


def run_victim(config: SuiteConfig, attack: str, rate: float, seed: int,
               log: Callable[[str], None] = lambda _: None, clean_models: CleanModels | None = None
               ) -> tuple[BackdoorSetup, list[dict[str, Any]]]:
    """Train one victim and run every defense on the same clean subset; returns the setup and its rows.
    ``clean_models`` (when ``config.clean_reference``; default: a fresh cache) measures the trigger on a clean
    model."""
    setup = make_victim(attack, rate, seed, target=config.target, epochs=config.victim_epochs, data=config.data)
    clean = setup.clean_subset(config.clean_fraction, seed=seed)
    clean_asr = None
    if config.clean_reference:
        clean_models = clean_models or CleanModels(config.data, config.victim_epochs)
        clean_asr = clean_models.asr(setup, seed)
    implanted = is_implanted(setup.before["asr"], clean_asr)
    rows = [_row(attack, rate, seed, "none", setup.before, setup.train_seconds, 0, config.victim_epochs,
                 len(clean), implanted, clean_asr)]
    note = "" if implanted else ("  (the trigger fools a clean model)" if (clean_asr or 0.0) >= FOOLS_CLEAN_ASR
                                 else "  (did not implant)")
    log(f"{config.data} {attack} rate {rate} seed {seed}: backdoored ACC {setup.before['acc']:.1f} "
        f"ASR {setup.before['asr']:.1f}" + ("" if clean_asr is None else f", clean-model ASR {clean_asr:.1f}")
        + note)
    for name in config.defenses:
        result = run_defense(name, setup.model, clean, config=copy.deepcopy(config.defense_config(name)))
        metrics = setup.evaluate(result.model)
        rows.append(_row(attack, rate, seed, name, metrics, result.seconds, int(result.budget.get("steps", 0)),
                         int(result.budget.get("epochs", 0)), len(clean), implanted, clean_asr))
        log(f"  {name:4s} ACC {metrics['acc']:.1f} ASR {metrics['asr']:.1f} RA {metrics['ra']:.1f} "
            f"({result.seconds:.1f} s)")
    return setup, rows


def run_suite(config: SuiteConfig, out_dir: str | Path | None = None,
              log: Callable[[str], None] = lambda _: None) -> SuiteResult:
    """Run every (attack, rate, seed) victim against every defense; write the reports to ``out_dir`` if given."""
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    landscape = None
    clean_models = CleanModels(config.data, config.victim_epochs)
    for attack in config.attacks:
        for rate in config.rates:
            for seed in config.seeds:
                setup, victim_rows = run_victim(config, attack, rate, seed, log, clean_models)
                rows.extend(victim_rows)
                if config.landscape and landscape is None:
                    tsc_config = config.defense_config("tsc") or TSCConfig(progress=False, warn_below_steps=0)
                    if isinstance(tsc_config, dict):
                        tsc_config = TSCConfig(**{"progress": False, "warn_below_steps": 0, **tsc_config})
                    landscape = landscape_curves(setup, setup.clean_subset(config.clean_fraction, seed=seed),
                                                 tsc_config, config.landscape_points)
    result = SuiteResult(rows, landscape, config, seconds=time.perf_counter() - started)
    if out_dir is not None:
        result.files = reports.write_suite_reports(result, Path(out_dir))
    return result


def merge_suite_runs(folders: Sequence[str | Path], out_dir: str | Path) -> SuiteResult:
    """One report from several suite runs (e.g. one process per poisoning rate run side by side): their rows
    joined, the first landscape kept, times added; writes the reports to ``out_dir``."""
    payloads = []
    for folder in folders:
        path = Path(folder) / "suite.json"
        if not path.is_file():
            raise FileNotFoundError(f"no suite.json in {folder}: not the output folder of a suite run")
        payloads.append(json.loads(path.read_text()))
    settings = dict(payloads[0]["config"])
    settings.pop("defense_configs", None)
    for key in ("attacks", "defenses", "rates", "seeds"):
        settings[key] = tuple(dict.fromkeys(v for p in payloads for v in p["config"][key]))
    rows = [row for p in payloads for row in p["rows"]]
    landscape = next((p["landscape"] for p in payloads if p.get("landscape")), None)
    config = SuiteConfig(**settings)
    config.defense_configs = payloads[0]["config"].get("defense_configs", {})
    result = SuiteResult(rows, landscape, config, seconds=sum(p["seconds"] for p in payloads))
    result.files = reports.write_suite_reports(result, Path(out_dir))
    return result
