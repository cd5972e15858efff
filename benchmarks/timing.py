"""Throughput timing shared by the speed benchmarks (run from this directory's scripts)."""

from __future__ import annotations

import time
from typing import Any, Callable


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


def training_step(model: Any, loss_of: Callable[[int], Any], lr: float = 1e-3, weight_decay: float = 0.0,
                  ema: float = 0.0) -> Callable[[int], None]:
    """Step i as `facetrec train` runs it: loss_of(i) -> backward -> the loop's optimizer
    (`make_optimizer`: fused Adam) -> its weight average (train.ema; 0 = off)."""
    from facetrec.train.loop import WeightAverage, make_optimizer

    opt = make_optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)
    avg = WeightAverage(model, ema) if ema > 0 else None

    def step(i: int) -> None:
        loss = loss_of(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if avg is not None:
            avg.update()

    return step
