"""How the scaling report writes numbers: seconds and exponents, and shares as percentages ("-" when unknown)."""
from __future__ import annotations

import math


def format_number(value: float) -> str:
    """Three significant digits; whole numbers from 100 on, scientific notation below 0.001."""
    if not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def format_percent(value: float) -> str:
    """A share as a percentage: two significant digits below 10%, whole percents from there on."""
    return "-" if not math.isfinite(value) else f"{100 * value:.2g}%" if value < 0.1 else f"{100 * value:.0f}%"
