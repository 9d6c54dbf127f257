"""Timing and statistics shared by tests/benchmarks/*.py and tests/gpu/gpu_check.py (benchmarks, never tests).

One place for: a clock that waits for queued GPU work, interleaved repeats (A B C A B C ..., never A A A B B B:
the machines are noisy and drift), min / median / spread (max - min) per variant, ratios of medians, per-step
times read from ComfyUI's progress bar, peak memory, and a plain-text table. Nothing here imports ComfyUI at
module level; StepTimer imports comfy.utils when it is entered.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping

MIN_REPEATS = 3


def sync() -> None:
    """Wait for queued CUDA work, so that a wall-clock reading covers it (no-op without an initialised GPU)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def clock() -> float:
    """time.perf_counter() after sync()."""
    sync()
    return time.perf_counter()


def check_repeats(repeats: int) -> int:
    if repeats < MIN_REPEATS:
        sys.exit(f"--repeats {repeats}: at least {MIN_REPEATS} interleaved repeats are needed for min / median / "
                 "spread")
    return repeats


@dataclass(frozen=True)
class Stats:
    values: tuple[float, ...]

    @classmethod
    def of(cls, values) -> "Stats":
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("no measurements")
        return cls(values)

    n = property(lambda self: len(self.values))
    min = property(lambda self: min(self.values))
    max = property(lambda self: max(self.values))
    median = property(lambda self: statistics.median(self.values))
    spread = property(lambda self: self.max - self.min)


def ratio_of_medians(a: Stats, b: Stats) -> float:
    return a.median / b.median


Result = Mapping[str, float]  # metric name -> value (a bare float is stored as metric "s")


def interleaved(variants: Mapping[str, Callable[[int], Result | float]], repeats: int, warmup: int = 0,
                log: Callable[[str], None] | None = None) -> dict[str, dict[str, Stats]]:
    """Run every variant once per round, in the given order, for `warmup` rounds (results dropped) and then
    `repeats` rounds: A B C A B C ... Each call gets its round number (0, 1, ... counting warm-up rounds), e.g.
    to derive a fresh seed. Returns {variant: {metric: Stats over the measured rounds}}."""
    collected: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for rnd in range(warmup + repeats):
        measured = rnd >= warmup
        for name, fn in variants.items():
            t = time.perf_counter()
            out = fn(rnd)
            if log:
                log(f"{'round ' + str(rnd - warmup + 1) + '/' + str(repeats) if measured else 'warm-up'}: "
                    f"{name} ({time.perf_counter() - t:.1f} s)")
            if not measured:
                continue
            for metric, value in ({"s": out} if isinstance(out, (int, float)) else out).items():
                collected[name].setdefault(metric, []).append(float(value))
    return {name: {m: Stats.of(v) for m, v in metrics.items()} for name, metrics in collected.items()}


def merge(runs: list[dict[str, Result]]) -> dict[str, dict[str, Stats]]:
    """[{variant: {metric: value}}, ...] (e.g. one dict per child process) -> {variant: {metric: Stats}}."""
    collected: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for name, metrics in run.items():
            for metric, value in metrics.items():
                collected.setdefault(name, {}).setdefault(metric, []).append(float(value))
    return {name: {m: Stats.of(v) for m, v in metrics.items()} for name, metrics in collected.items()}


class StepTimer:
    """Seconds per step from ComfyUI's progress bar: while entered, every comfy.utils.ProgressBar update is
    time-stamped (after a CUDA sync) and passed on to the hook that was installed before (cancel, UI).

    per_step(): (t_last - t_first) / (steps between them) over the last progress bar of `total` steps: the first
    step (lazy set-up, model loading) and everything before/after the loop are excluded. Works for any node that
    reports its steps to ComfyUI (KSampler, SINE Guided Sampler, SINE Finetune)."""

    def __init__(self):
        self.stamps: list[tuple[int, int, float]] = []  # (value, total, time)

    def __enter__(self) -> "StepTimer":
        import comfy.utils
        self._utils = comfy.utils
        self._previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._utils.set_progress_bar_global_hook(self._previous)

    def _hook(self, value, total, preview, *args, **kwargs):
        self.stamps.append((int(value), int(total), clock()))
        if self._previous is not None:
            self._previous(value, total, preview, *args, **kwargs)

    def per_step(self, total: int) -> float:
        first: dict[int, float] = {}
        for value, tot, t in self.stamps:
            if tot != total:
                continue
            if first and value < max(first):  # a new bar of the same length started: keep the last one only
                first = {}
            first.setdefault(value, t)
        if len(first) < 2:
            raise RuntimeError(f"ComfyUI's progress bar reported {len(first)} distinct step(s) of a {total}-step run; "
                               "per-step time needs at least 2 (use 3 or more steps)")
        lo, hi = min(first), max(first)
        return (first[hi] - first[lo]) / (hi - lo)


class PeakMemory:
    """Peak memory of a phase in MiB: CUDA max_memory_allocated since reset() on a GPU; on CPU the process's max
    RSS (cannot be reset: give each variant its own process when comparing CPU peaks)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.label = "peak VRAM MiB" if cuda else "max RSS MiB"

    def reset(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> float:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stats_cells(s: Stats, digits: int = 3) -> list[str]:
    """[min, median, spread] formatted for stats_header()'s columns."""
    return [f"{s.min:.{digits}f}", f"{s.median:.{digits}f}", f"{s.spread:.{digits}f}"]


def stats_header(unit: str) -> list[str]:
    return [f"{unit} min", f"{unit} median", f"{unit} spread"]


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
