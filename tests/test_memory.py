"""PeakMemory: the sampled RSS peak of a block. Allocations are held until the sampler has read them (no sleeps
whose length decides the outcome), and freed heap memory is handed back before each test, so an earlier test's
leftovers cannot be reused silently by the next allocation."""
import time

import pytest
import torch

from tsc_fast.testbed.memory import PeakMemory, max_rss_bytes, release_freed_memory, rss_bytes

MB = 2 ** 20


@pytest.fixture(autouse=True)
def fresh_heap():
    release_freed_memory()


def _wait_for_samples(mem: PeakMemory, count: int = 2, timeout_s: float = 10.0) -> None:
    """Block until ``mem``'s sampler has taken ``count`` more readings (however busy the machine is)."""
    target, deadline = mem.samples + count, time.monotonic() + timeout_s
    while mem.samples < target and time.monotonic() < deadline:
        time.sleep(0.001)
    assert mem.samples >= target, "the sampler thread took no readings"


def _allocate(mib: int, seen_by: PeakMemory | None = None) -> None:
    x = torch.ones(mib * MB // 4)  # float32, pages touched
    if seen_by is not None:
        _wait_for_samples(seen_by)
    del x


def test_readings_are_plausible():
    assert 10 * MB < rss_bytes() <= max_rss_bytes() + 64 * MB


def test_allocation_raises_delta():
    with PeakMemory() as mem:
        _allocate(200, seen_by=mem)
    assert mem.delta_bytes >= 150 * MB
    assert mem.peak_bytes >= mem.baseline_bytes and mem.samples >= 2
    assert mem.cuda_peak_bytes is None or mem.cuda_peak_bytes >= 0


def test_idle_block_has_small_delta():
    _allocate(200)  # serial use: an earlier big block must not leak into the next one
    with PeakMemory() as mem:
        _wait_for_samples(mem)
    assert mem.delta_bytes < 30 * MB


def test_sampler_sees_peak_below_high_water_mark():
    _allocate(400)  # the process high-water mark is now above what the block will reach
    release_freed_memory()
    with PeakMemory() as mem:
        _allocate(200, seen_by=mem)
    assert max_rss_bytes() > mem.peak_bytes  # the high-water mark could not have told this peak
    assert mem.delta_bytes >= 150 * MB


def test_nested_blocks():
    with PeakMemory() as outer:
        with PeakMemory() as inner:
            _allocate(200, seen_by=inner)
        release_freed_memory()
        with PeakMemory() as idle:
            _wait_for_samples(idle)
    assert inner.delta_bytes >= 150 * MB
    assert outer.peak_bytes >= inner.peak_bytes - 8 * MB
    assert idle.delta_bytes < 30 * MB
    assert set(outer.as_dict()) >= {"baseline", "peak", "delta", "cuda_peak"}


def test_trace_gives_phase_peaks():
    with PeakMemory(trace=True) as mem:
        t0 = time.perf_counter()
        _wait_for_samples(mem)
        t1 = time.perf_counter()
        _allocate(200, seen_by=mem)
        t2 = time.perf_counter()
    quiet, busy = mem.peak_between(t0, t1), mem.peak_between(t1, t2)
    assert quiet is not None and busy is not None
    assert busy - mem.baseline_bytes >= 150 * MB and quiet - mem.baseline_bytes < 30 * MB
    assert mem.peak_between(t2 + 10, t2 + 11) is None


def test_release_freed_memory_hands_heap_memory_back():
    small = [torch.ones(1000) for _ in range(40000)]  # ~160 MB of small blocks: heap memory, not mmaps
    del small
    held = rss_bytes()
    if not release_freed_memory():
        pytest.skip("no glibc malloc_trim here")
    assert held - rss_bytes() > 50 * MB
