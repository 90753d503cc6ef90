"""Where a purification run stands, and exactly what a checkpoint of it holds.

A run is a sequence of steps per round (``STEPS``); the state records the next step to run and what it needs:
the permutations found so far, the stage-1 point between the two curves, and inside a curve or fine-tune the
middle control point and the optimisation loop's state. ``to_checkpoint`` turns it into tensors plus plain data;
``from_checkpoint`` reads them back and refuses any state the run could not have reached.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointError, join_state, split_state
from .training import LoopState

# The steps of one round, in order. A checkpoint records the next step to run (and, inside a curve or the
# fine-tune, the optimisation loop's state), so a resumed run continues exactly where the last one stopped.
STEPS = ("unalign", "curve1", "realign", "curve2", "finetune", "distill")
ALIGNMENTS_DONE_BEFORE = {"unalign": 0, "curve1": 1, "realign": 1, "curve2": 2, "finetune": 2, "distill": 2}  # within a round
NEEDS_STAGE1 = ("realign", "curve2")


@dataclass
class RunState:
    """The position of a run and what its next step needs (the models themselves live with the run)."""

    round: int = 0
    step: str = STEPS[0]
    history: list[dict[str, Any]] = field(default_factory=list)     # one record per finished stage
    perms: list[dict[str, np.ndarray]] = field(default_factory=list)  # every alignment found, in order
    pending: dict[str, Any] = field(default_factory=dict)            # alignment summary of the running stage
    middle: torch.Tensor | None = None                               # inside a curve: its middle control point
    loop: LoopState | None = None                                    # inside a curve or fine-tune: the loop

    def to_checkpoint(self, model: nn.Module, stage1: nn.Module | None, identity: dict[str, Any],
                      elapsed_s: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, plain data) of a checkpoint: the current model, the stage-1 point, the loop's tensors and
        the global RNG (which drives a user DataLoader's shuffling and dropout)."""
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        if stage1 is not None:
            tensors.update({f"stage1/{k}": v for k, v in stage1.state_dict().items()})
        if self.middle is not None:
            tensors["middle"] = self.middle
        tensors["rng/torch"] = torch.get_rng_state()
        meta = {"identity": identity, "round": self.round, "step": self.step, "history": self.history,
                "pending": self.pending, "perms_used": [{g: np.asarray(p).tolist() for g, p in ps.items()}
                                                       for ps in self.perms],
                "elapsed_s": elapsed_s}
        if self.loop is not None:
            loop_tensors, loop_plain = split_state("loop", dataclasses.asdict(self.loop))
            tensors.update(loop_tensors)
            meta["loop"] = loop_plain
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], rounds: int,
                        groups: dict[str, int]) -> "Restored":
        """The state a checkpoint holds, checked against a run of ``rounds`` rounds over ``groups``; any damage
        or impossible position is a :class:`CheckpointError`."""
        try:
            _check_position(meta, tensors, rounds, groups)
            state = cls(round=meta["round"], step=meta["step"], history=meta["history"],
                        perms=[{g: np.asarray(p, dtype=np.int64) for g, p in ps.items()} for ps in meta["perms_used"]],
                        pending=meta["pending"], middle=tensors.get("middle"),
                        loop=LoopState(**join_state(tensors, meta["loop"])) if "loop" in meta else None)
            return Restored(state, _part(tensors, "model/"), _part(tensors, "stage1/") or None, tensors["rng/torch"],
                            float(meta["elapsed_s"]))
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise CheckpointError(f"the checkpoint's run state is damaged ({type(error).__name__}: {error})") from None


@dataclass
class Restored:
    """What resuming hands back: the state, the current model's and stage-1 point's weights, the RNG, the time."""

    state: RunState
    model: dict[str, torch.Tensor]
    stage1: dict[str, torch.Tensor] | None
    rng: torch.Tensor
    elapsed_s: float


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_position(meta: dict[str, Any], tensors: dict[str, torch.Tensor], rounds: int,
                    groups: dict[str, int]) -> None:
    """The saved position is one this run can reach, with what that position needs."""
    round_, step = meta["round"], meta["step"]
    if isinstance(round_, bool) or not isinstance(round_, int) or not 0 <= round_ <= rounds:
        raise CheckpointError(f"checkpoint round {round_!r} is outside 0..{rounds}")
    if step not in STEPS or (round_ == rounds and step != STEPS[0]):
        raise CheckpointError(f"checkpoint step {step!r} is not one of {STEPS}")
    perms, done = meta["perms_used"], 2 * round_ + ALIGNMENTS_DONE_BEFORE[step]
    if not isinstance(perms, list) or len(perms) != done:
        found = len(perms) if isinstance(perms, list) else perms
        raise CheckpointError(f"checkpoint at round {round_ + 1} step {step!r} records {found!r} alignments, "
                              f"expected {done}")
    for entry in perms:
        if not isinstance(entry, dict) or set(entry) != set(groups):
            raise CheckpointError("checkpoint permutations name other groups than this model's")
        for group, perm in entry.items():
            if sorted(perm) != list(range(groups[group])):
                raise CheckpointError(f"checkpoint permutation of {group!r} is not a permutation")
    needs_stage1 = step in NEEDS_STAGE1
    if needs_stage1 != any(k.startswith("stage1/") for k in tensors):
        raise CheckpointError(f"checkpoint at step {step!r} {'lacks' if needs_stage1 else 'has'} the stage-1 point")
    if not isinstance(meta["history"], list) or not isinstance(meta["pending"], dict):
        raise CheckpointError("checkpoint history/pending records are damaged")
    if not isinstance(meta["elapsed_s"], (int, float)) or not math.isfinite(meta["elapsed_s"]):
        raise CheckpointError("checkpoint elapsed time is damaged")
    if "rng/torch" not in tensors:
        raise CheckpointError("checkpoint lacks the random number generator's state")
