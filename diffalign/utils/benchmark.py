"""Generic helpers for benchmark scripts: run a command in a subprocess and measure its wall time and peak RSS,
and turn wall times of runs with different step counts into a per-step time.

Peak RSS is the kernel's high-water mark of resident memory (``VmHWM``) as ``wait4`` reports it for the finished
child: ``ru_maxrss`` is the largest peak of the child and of any descendants it waited for (a maximum, not a sum).
On Linux it also includes the peak of the process the child was forked from (kept across ``exec``), so the
measuring process must stay small: build models and data in a subprocess, not in the caller.
While the child runs, the memory of its whole process tree is also sampled with psutil when it is installed (this
catches memory held at the same time by DataLoader workers): the child's RSS plus each descendant's USS (the pages
only that process holds). A forked worker's RSS would count again every page it still shares with its parent (the
interpreter, torch, the loaded models: about the parent's whole RSS per worker); its USS counts only what it adds.
The reported peak is the larger of the two measurements; ``peak_tree_bytes`` keeps the sampled one alone.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProcessRun", "format_table", "per_step_seconds", "run_measured"]


@dataclass(frozen=True)
class ProcessRun:
    """One finished subprocess: exit status, wall time and peak resident memory of its process tree."""

    argv: tuple[str, ...]
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    log_path: Path | None
    peak_tree_bytes: int = 0  # sampled peak of the child's RSS + its descendants' USS (0 without psutil)
    cpu_s: float = 0.0  # user + system CPU seconds of the child and of the descendants it waited for


class _TreeRssSampler(threading.Thread):
    """Polls the RSS of ``pid`` plus the USS of each of its descendants every ``interval_s`` until stopped (needs
    psutil; a descendant whose USS cannot be read counts with its RSS)."""

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop_event = threading.Event()
        self.peak_bytes = 0

    def run(self) -> None:
        psutil = self._psutil
        while not self._stop_event.is_set():
            try:
                total = self._root.memory_info().rss
                children = self._root.children(recursive=True)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            except psutil.AccessDenied:
                total, children = 0, []
            for proc in children:
                try:
                    total += _unique_bytes(psutil, proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop_event.wait(self._interval_s)

    def stop(self) -> None:
        self._stop_event.set()


def _unique_bytes(psutil: Any, proc: Any) -> int:
    """USS of a psutil process (its private pages), or its RSS where the platform or permissions give no USS."""
    try:
        return proc.memory_full_info().uss
    except (AttributeError, NotImplementedError, psutil.AccessDenied):
        return proc.memory_info().rss


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _maxrss_bytes(ru_maxrss: int) -> int:
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024  # Linux reports KiB, macOS bytes


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    sample_interval_s: float = 0.05,
) -> ProcessRun:
    """Run ``argv`` to completion (stdout and stderr to ``log_path``, or discarded) and measure it.

    ``wall_s`` runs from just before the fork to the reaping of the child, so it includes interpreter start-up and
    imports. ``cpu_s`` is the child's CPU time (its waited-for descendants', e.g. DataLoader workers, included): on
    a machine shared with other work it grows far less than the wall time does. A run that exceeds ``timeout_s`` is
    killed and reported with the kill's (negative) return code.
    """
    if not hasattr(os, "wait4"):
        raise OSError("run_measured needs os.wait4 (Linux or macOS) to read the child's peak RSS")
    argv = tuple(str(a) for a in argv)
    log = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=None if env is None else dict(env), cwd=cwd, stdout=log, stderr=log)
        sampler = None
        try:
            sampler = _TreeRssSampler(proc.pid, sample_interval_s)
            sampler.start()
        except ImportError:  # psutil is optional: the wait4 high-water mark alone is still exact per process
            sampler = None
        # os.kill, not proc.kill: Popen.kill polls first and could reap the child before wait4 reads its usage
        timer = threading.Timer(timeout_s, _kill, (proc.pid,)) if timeout_s is not None else None
        if timer is not None:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
        peak = _maxrss_bytes(usage.ru_maxrss)
        tree = 0
        if sampler is not None:
            sampler.stop()
            sampler.join()
            tree = sampler.peak_bytes
    finally:
        if log_path is not None:
            log.close()
    cpu = usage.ru_utime + usage.ru_stime
    log_file = None if log_path is None else Path(log_path)
    return ProcessRun(argv, proc.returncode, wall, max(peak, tree), log_file, tree, cpu)


def per_step_seconds(runs: Mapping[int, Sequence[float]], statistic: str = "median") -> tuple[float, float]:
    """Per-step time and fixed cost from wall times of runs with different step counts.

    ``runs`` maps a step count ``N`` to the wall times of runs of ``N`` steps. With exactly two step counts
    ``N1 < N2`` this is the difference quotient ``(median t(N2) - median t(N1)) / (N2 - N1)``; with more, the
    least-squares slope of ``t = a + b·N`` through the medians. Returns ``(b, a)``: seconds per step and the fixed
    cost of start-up, loading and saving, which the difference cancels. ``statistic="min"`` takes each step count's
    fastest run instead of the median: other load on a shared machine only ever adds time, so the fastest of
    several repeats is the one it disturbed least.
    """
    if len(runs) < 2:
        raise ValueError(f"per_step_seconds: need runs at two or more step counts, got {sorted(runs)}")
    if any(not times for times in runs.values()):
        raise ValueError("per_step_seconds: every step count needs at least one wall time")
    pick = {"median": statistics.median, "min": min}.get(statistic)
    if pick is None:
        raise ValueError(f"per_step_seconds: statistic {statistic!r} is not 'median' or 'min'")
    xs = sorted(runs)
    ys = [pick(runs[n]) for n in xs]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table with columns padded to their widest cell (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        parts = [
            c.rjust(w) if numeric[i] and k else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    if text == "-":  # a missing value in a numeric column
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True
