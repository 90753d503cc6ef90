"""Peak memory of a block of code: process RSS sampled in a background thread, plus CUDA's allocator peak.

    from tsc_fast.testbed.memory import PeakMemory

    with PeakMemory() as mem:
        run_something()
    print(mem.baseline_bytes, mem.peak_bytes, mem.delta_bytes, mem.cuda_peak_bytes)

torch's CPU allocations are invisible to tracemalloc, and the process high-water mark (``ru_maxrss``) only grows,
so a block that stays below an earlier high-water mark would read zero from it. ``PeakMemory`` therefore reads the
resident set size (``/proc/self/statm``; ``ru_maxrss`` where /proc is missing) at entry (the baseline), every
``interval_s`` (5 ms) from a daemon thread while the block runs, and at exit. A peak shorter than the sampling
interval can be missed; when the block raised the process's ``ru_maxrss`` high-water mark, that mark is the exact
peak and is used. Blocks may be nested or run one after another; each instance has its own sampler.
``trace=True`` keeps every (``time.perf_counter()``, RSS) reading, so ``peak_between(t0, t1)`` gives the peak of a
phase inside the block whose start and end times are known. ``release_freed_memory()`` hands memory that the C
heap keeps after frees back to the system (glibc ``malloc_trim``), so that a baseline taken after it reflects
live data rather than an earlier phase's leftovers.

When CUDA is initialised, the allocator's ``max_memory_allocated`` over the block is recorded too
(``cuda_peak_bytes``, ``cuda_baseline_bytes``; ``None`` without CUDA). Its peak counter is reset at entry; an
enclosing ``PeakMemory`` still sees the peaks of the blocks nested inside it.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_ACTIVE: list["PeakMemory"] = []   # open blocks, outermost first (for CUDA peaks across nested resets)


def max_rss_bytes() -> int:
    """The process's RSS high-water mark so far (Linux reports ``ru_maxrss`` in KiB, macOS in bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def rss_bytes() -> int:
    """The process's current resident set size in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return max_rss_bytes()  # no /proc: the high-water mark is the best available reading


def _cuda():
    """torch.cuda when torch is already imported and CUDA is initialised, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not break a measurement
        return None


def release_freed_memory() -> bool:
    """Return freed C-heap memory to the system (glibc ``malloc_trim(0)``); False where unavailable."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Context manager recording the baseline and peak resident memory (and CUDA allocator peak) of a block.

    Attributes after the block: ``baseline_bytes`` (RSS at entry), ``peak_bytes`` (highest RSS seen during the
    block, at least the baseline), ``delta_bytes`` (peak - baseline), ``end_bytes`` (RSS at exit), ``samples``
    (readings taken), ``cuda_baseline_bytes``/``cuda_peak_bytes``/``cuda_delta_bytes`` (``None`` without CUDA).
    """

    def __init__(self, interval_s: float = 0.005, trace: bool = False):
        self.interval_s = interval_s
        self.trace: list[tuple[float, int]] | None = [] if trace else None
        self.baseline_bytes = self.peak_bytes = self.end_bytes = 0
        self.samples = 0
        self.cuda_baseline_bytes: int | None = None
        self.cuda_peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._maxrss_at_entry = 0

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    @property
    def cuda_delta_bytes(self) -> int | None:
        if self.cuda_peak_bytes is None or self.cuda_baseline_bytes is None:
            return None
        return self.cuda_peak_bytes - self.cuda_baseline_bytes

    def _sample(self) -> None:
        value = rss_bytes()
        if self.trace is not None:
            self.trace.append((time.perf_counter(), value))
        self.samples += 1
        if value > self.peak_bytes:
            self.peak_bytes = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        cuda = _cuda()
        if cuda is not None:
            peak_so_far = cuda.max_memory_allocated()
            for outer in _ACTIVE:  # the reset below must not hide the enclosing blocks' peaks so far
                outer._note_cuda_peak(peak_so_far)
            self.cuda_baseline_bytes = cuda.memory_allocated()
            cuda.reset_peak_memory_stats()
            self.cuda_peak_bytes = self.cuda_baseline_bytes
        _ACTIVE.append(self)
        self._maxrss_at_entry = max_rss_bytes()
        self.samples = 0
        self.baseline_bytes = self.peak_bytes = 0
        if self.trace is not None:
            self.trace = []
        self._sample()
        self.baseline_bytes = self.peak_bytes
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakMemory", daemon=True)
        self._thread.start()
        return self

    def _note_cuda_peak(self, value: int) -> None:
        if self.cuda_peak_bytes is not None:
            self.cuda_peak_bytes = max(self.cuda_peak_bytes, value)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.end_bytes = rss_bytes()
        high_water = max_rss_bytes()
        if high_water > self._maxrss_at_entry:  # the block set a new high-water mark: that is its exact peak
            self.peak_bytes = max(self.peak_bytes, high_water)
        cuda = _cuda()
        if cuda is not None and self.cuda_peak_bytes is not None:
            self._note_cuda_peak(cuda.max_memory_allocated())
            for outer in _ACTIVE:
                if outer is not self:
                    outer._note_cuda_peak(self.cuda_peak_bytes)
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def peak_between(self, t0: float, t1: float) -> int | None:
        """Highest traced RSS read between perf_counter times t0 and t1 (None: no reading there, or no trace)."""
        if not self.trace:
            return None
        inside = [value for t, value in self.trace if t0 <= t <= t1]
        return max(inside) if inside else None

    def as_dict(self, unit: float = 2 ** 20) -> dict[str, float | None]:
        """Readings in MiB (or ``unit`` bytes), for reports."""
        def scaled(value):
            return None if value is None else value / unit
        return {"baseline": scaled(self.baseline_bytes), "peak": scaled(self.peak_bytes),
                "delta": scaled(self.delta_bytes), "end": scaled(self.end_bytes),
                "cuda_peak": scaled(self.cuda_peak_bytes), "cuda_delta": scaled(self.cuda_delta_bytes)}
