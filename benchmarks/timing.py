"""Throughput timing shared by the speed benchmarks (run from this directory's scripts)."""

from __future__ import annotations

import time
from typing import Callable


def interleaved(runs: dict[str, Callable[[int], None]], batch: int, warmup: int, steps: int,
                repeats: int, sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Samples/s of each run over `repeats` rounds; a round times one window of `steps` calls per
    run, the runs one after the other (ABAB...), so that every run sees the same stretches of the
    machine's load (slow drifts hit all alike instead of whichever ran last). `sync` (e.g.
    torch.cuda.synchronize) runs before and after each window: a GPU's work is asynchronous."""
    sync = sync or (lambda: None)
    for run in runs.values():
        for i in range(warmup):
            run(i)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                run(i)
            sync()
            rates[name].append(steps * batch / (time.perf_counter() - t0))
    return rates
