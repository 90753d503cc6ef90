"""Figures as PNG files (matplotlib, Agg backend): the shared plumbing and the loss-landscape figure."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (an ImportError naming the extra when it is missing)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'tsc-fast[plot]'") from None

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file renamed over it) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        pyplot().close(fig)
    return path


def is_valid_png(path: str | Path) -> bool:
    """True when ``path`` is a non-empty PNG file: the 8-byte signature and an IHDR chunk of positive size."""
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width > 0 and height > 0


def draw_landscape(axes, landscape: dict[str, Any]) -> None:
    """Clean and poisoned loss along t of the stage-1 and stage-2 curves, one panel each (two ``axes``).

    ``landscape``: ``{"stage1": [...], "stage2": [...], "t_stage1", "t_stage2"}``, each profile a list of
    ``{"t", "clean_loss", "poison_loss"?, ...}``.
    """
    for ax, stage in zip(axes, ("stage1", "stage2")):
        profile = landscape.get(stage) or []
        ts = [p["t"] for p in profile]
        ax.plot(ts, [p["clean_loss"] for p in profile], "o-", label="clean loss")
        if profile and "poison_loss" in profile[0]:
            ax.plot(ts, [p["poison_loss"] for p in profile], "s-", label="poisoned loss (target label)")
        ax.axvline(landscape[f"t_{stage}"], color="grey", linestyle="--", label="t*")
        ax.set_yscale("log")
        ax.set_xlabel("t")
        start, end = ("original", "un-aligned copy") if stage == "stage1" else ("re-aligned original",
                                                                               "stage-1 point")
        ax.set_title(f"stage {stage[-1]}: {start} (t=0) -> {end} (t=1)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend(fontsize=8)


def plot_landscape(landscape: dict[str, Any], path: str | Path) -> Path:
    """The paper's landscape figure as its own PNG: clean and poisoned loss along both curves of a round."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    draw_landscape(axes, landscape)
    fig.suptitle(f"TSC loss landscape, round {landscape.get('round', 1)}: {landscape.get('attack')}, rate "
                 f"{landscape.get('rate')}, seed {landscape.get('seed')}, {landscape.get('curve_steps')} steps per "
                 "curve", fontsize=10)
    return save_figure(fig, path)
