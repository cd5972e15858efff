"""What loading a new export costs a serving worker, and whether its warm-up is needed (`serve --reload-every`).

    .venv/bin/python benchmarks/reload_cost.py --artifact runs/serve-bench-ple/artifact-dien --out benchmarks/results/reload_cost.json

One thread, as a worker runs its models (`serving.pipeline.one_model_thread`). For each history length 1..max_history + 1
(the shapes `Pipeline.warm_up` runs) one `recommend` call, timed, in three settings:
- **cold process**: a fresh process loads the version and answers without a warm-up (a child process of this
  script): what the warm-up at `facetrec serve`'s start is for;
- **new version, same models**: this process has loaded and warmed up the version, then loads a copy of it
  (another export of the same models, as `--reload-every` meets it) and answers without warming the copy up;
- **the same again**: a second round on that copy (every shape seen).
It also times, on the thread's CPU clock, loading the copy (`Pipeline(...)`) and warming it up (`warm_up()`): the
work a worker's watcher thread does beside the requests when a version is swapped in. `--repeats` rounds; the
median and max per setting over all calls.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from envinfo import package_versions  # benchmarks/envinfo.py


def first_calls(p) -> list[float]:
    """ms of one recommend per history length 1..max_history + 1 (each a new shape)."""
    hist = p.popular[: p.max_history + 1].astype(np.int64)
    out = []
    for L in range(1, len(hist) + 1):
        t = time.perf_counter()
        p.recommend(hist[:L][::-1].copy(), n=20)
        out.append((time.perf_counter() - t) * 1000)
    return out


def summary(xs: list[float]) -> dict:
    a = np.array(xs)
    return {"calls": len(a), "median_ms": round(float(np.median(a)), 2), "max_ms": round(float(a.max()), 2),
            "first_call_ms": round(float(a[0]), 2), "over_2x_median": int((a > 2 * np.median(a)).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True, help="artifact root or version directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cold-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from facetrec.serving.artifacts import resolve_version
    from facetrec.serving.pipeline import Pipeline, one_model_thread

    one_model_thread()

    version = resolve_version(args.artifact)
    if args.cold_child:
        print(json.dumps(first_calls(Pipeline(version))))
        return

    cold: list[float] = []
    for _ in range(args.repeats):
        child = subprocess.run([sys.executable, __file__, "--artifact", str(version), "--cold-child"],
                               capture_output=True, text=True, check=True)
        cold += json.loads(child.stdout.strip().splitlines()[-1])

    live = Pipeline(version)
    live.warm_up()
    new, again, load_cpu, load_wall, warm_cpu, warm_wall = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            copy = Path(tmp) / f"{version.name}-copy{r}"
            shutil.copytree(version, copy)
            c0, w0 = time.thread_time(), time.perf_counter()
            p = Pipeline(copy)
            load_cpu.append(time.thread_time() - c0)
            load_wall.append(time.perf_counter() - w0)
            assert p.model_specs() == live.model_specs()
            new += first_calls(p)
            again += first_calls(p)
            other = Pipeline(copy)  # the warm-up's own cost, on a fresh copy of the same version
            c0, w0 = time.thread_time(), time.perf_counter()
            other.warm_up()
            warm_cpu.append(time.thread_time() - c0)
            warm_wall.append(time.perf_counter() - w0)
    out = {
        "artifact": str(version), "repeats": args.repeats, "history_lengths": live.max_history + 1,
        "cold_process_no_warm_up": summary(cold),
        "new_version_same_models_no_warm_up": summary(new),
        "same_again": summary(again),
        "load_seconds": {"cpu_median": round(float(np.median(load_cpu)), 3), "wall_median": round(float(np.median(load_wall)), 3)},
        "warm_up_seconds": {"cpu_median": round(float(np.median(warm_cpu)), 3), "wall_median": round(float(np.median(warm_wall)), 3)},
        "environment": package_versions(),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
