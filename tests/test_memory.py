import time

import torch

from tsc_fast.memory import PeakMemory, max_rss_bytes, release_freed_memory, rss_bytes

MB = 2 ** 20


def _allocate(mib: int, hold_s: float = 0.03) -> None:
    x = torch.ones(mib * MB // 4)  # float32, pages touched
    time.sleep(hold_s)            # give the sampler a few readings
    del x


def test_readings_are_plausible():
    assert 10 * MB < rss_bytes() <= max_rss_bytes() + 64 * MB


def test_allocation_raises_delta():
    with PeakMemory() as mem:
        _allocate(200)
    assert mem.delta_bytes >= 150 * MB
    assert mem.peak_bytes >= mem.baseline_bytes and mem.samples >= 2
    assert mem.cuda_peak_bytes is None or mem.cuda_peak_bytes >= 0


def test_idle_block_has_small_delta():
    _allocate(200)  # serial use: an earlier big block must not leak into the next one
    with PeakMemory() as mem:
        time.sleep(0.02)
    assert mem.delta_bytes < 30 * MB


def test_sampler_sees_peak_below_high_water_mark():
    _allocate(400, hold_s=0)  # the process high-water mark is now above what the block will reach
    with PeakMemory() as mem:
        _allocate(200)
    assert mem.delta_bytes >= 150 * MB


def test_nested_blocks():
    with PeakMemory() as outer:
        with PeakMemory() as inner:
            _allocate(200)
        with PeakMemory() as idle:
            time.sleep(0.01)
    assert inner.delta_bytes >= 150 * MB
    assert outer.peak_bytes >= inner.peak_bytes - 8 * MB
    assert idle.delta_bytes < 30 * MB
    assert set(outer.as_dict()) >= {"baseline", "peak", "delta", "cuda_peak"}


def test_trace_gives_phase_peaks():
    with PeakMemory(trace=True) as mem:
        t0 = time.perf_counter()
        time.sleep(0.03)
        t1 = time.perf_counter()
        _allocate(200)
        t2 = time.perf_counter()
    quiet, busy = mem.peak_between(t0, t1), mem.peak_between(t1, t2)
    assert quiet is not None and busy is not None
    assert busy - mem.baseline_bytes >= 150 * MB and quiet - mem.baseline_bytes < 30 * MB
    assert mem.peak_between(t2 + 10, t2 + 11) is None


def test_release_freed_memory_runs():
    assert release_freed_memory() in (True, False)
