"""Shared benchmark plumbing: peak-memory measurement and a ratio table printed at the end of the run.

Every benchmark records its median time (and peak memory where measured) under a group; the terminal summary prints,
per group, each contender's time relative to vireid_fast's ("ours").
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import defaultdict

import pytest

_results: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_peak_rss(fn) -> tuple[float, object]:
    """Run ``fn()`` once, sampling RSS every 2 ms; return (peak RSS increase in MiB, result)."""
    gc.collect()
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_mb())
    return peak[0] - base, result


@pytest.fixture
def record(benchmark):
    """``record(group, name, peak_mb=None, **extra)`` after ``benchmark(...)``: keeps the median for the summary."""

    def _record(group: str, name: str, peak_mb: float | None = None, **extra):
        median = benchmark.stats.stats.median
        _results[group][name] = {"median_s": median, "peak_mb": peak_mb, **extra}
        benchmark.extra_info.update({"peak_rss_mb": peak_mb, **extra})

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    tr = terminalreporter
    tr.section("vireid_fast: time relative to ours (same run)")
    for group, rows in sorted(_results.items()):
        ours = rows.get("ours", {}).get("median_s")
        tr.write_line(f"{group}")
        for name, row in sorted(rows.items(), key=lambda kv: kv[1]["median_s"]):
            ratio = f"{row['median_s'] / ours:7.2f}x ours" if ours else ""
            mem = f"peak +{row['peak_mb']:.0f} MiB" if row.get("peak_mb") is not None else ""
            extra = " ".join(f"{k}={v}" for k, v in row.items() if k not in ("median_s", "peak_mb"))
            tr.write_line(f"  {name:<28} {row['median_s'] * 1e3:10.1f} ms  {ratio:>14}  {mem:>18}  {extra}")
