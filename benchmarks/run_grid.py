"""Train a grid of configs x overrides x seeds as concurrent `facetrec train` processes; summarise valid and test.

    .venv/bin/python benchmarks/run_grid.py --seeds 0 1 2 -j 2 --runs runs/grid --out /tmp/grid.json \
        --job "mind=configs/amazon-beauty/mind.yaml" \
        --job "mind-pop=configs/amazon-beauty/mind.yaml train.negatives=popularity"

Each `--job "NAME=CONFIG [key=value ...]"` (or line of `--job-file`) is trained once per seed into RUNS/NAME-sSEED (a run
whose metrics.json exists is read, not retrained, so an interrupted grid resumes). `--set` adds
overrides to every job (e.g. `train.device=cuda data.root=...`); `{seed}` in an override is the
run's seed (`model.warm_start=runs/ytb/youtubednn-s{seed}`). The data is prepared once before
the processes start. `-j` processes run at once, each with `train.threads=1` unless --set says
otherwise: on a GPU machine with many cores, many small runs share the device (a run of
MIND on amazon-beauty is bound by its host-side batching, not the GPU). Prints, per job, mean ±
std over seeds of every scalar metric under "valid" and "test" (nested per-task metrics are
flattened to "task/metric"), and writes them with the per-seed values to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from envinfo import package_versions  # benchmarks/envinfo.py

ROOT = Path(__file__).resolve().parents[1]


def parse_job(text: str) -> tuple[str, str, list[str]]:
    """'name=config.yaml k=v k=v' -> (name, config, [k=v, ...])."""
    head, *overrides = text.split()
    name, sep, config = head.partition("=")
    if not sep or not name or not config:
        raise SystemExit(f"--job {text!r}: expected 'NAME=CONFIG [key=value ...]'")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--job {text!r}: overrides must be key=value, got {bad}")
    return name, config, overrides


def flat(d: dict, prefix: str = "") -> dict[str, float]:
    """Scalar metrics of a metrics.json section, nested dicts as 'a/b' (lists and buckets left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", action="append", default=[], help="'NAME=CONFIG [key=value ...]' (repeat)")
    ap.add_argument("--job-file", type=Path, help="one job per line as for --job; '#' starts a comment")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "grid")
    ap.add_argument("-j", "--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes at once")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every job (repeat)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.runs, args.out = args.runs.resolve(), args.out.resolve() if args.out else None
    if args.job_file:
        args.job_file = args.job_file.resolve()
    os.chdir(ROOT)  # configs, data.root and the runs' processes all resolve from the repository root

    lines = list(args.job)
    if args.job_file:
        lines += [ln.split("#", 1)[0].strip() for ln in args.job_file.read_text().splitlines()]
    jobs = [parse_job(j) for j in lines if j.strip()]
    if not jobs:
        raise SystemExit("no jobs: give --job 'NAME=CONFIG [key=value ...]' or --job-file FILE")
    names = [n for n, _, _ in jobs]
    if len(set(names)) != len(names):
        raise SystemExit(f"job names must be distinct: {names}")
    common = list(args.overrides)
    if not any(o.startswith("train.threads=") for o in common):
        common.append("train.threads=1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    args.runs.mkdir(parents=True, exist_ok=True)

    def command(config: str, sets: list[str]) -> list[str]:
        cmd = [sys.executable, "-m", "facetrec", "train", config, "--quiet"]
        for s in sets:
            cmd += ["--set", s]
        return cmd

    # prepare each distinct data/prepare setting once (into the shared cache), so the processes do not race to build it
    sys.path.insert(0, str(ROOT / "src"))
    from facetrec.config import load_config
    from facetrec.data.prepare import ensure_prepared

    for name, config, extra in jobs:
        sets = [s for s in [*extra, *common] if s.split("=", 1)[0].split(".")[0] in ("data", "prepare")]
        ensure_prepared(load_config(ROOT / config, sets), verbose=False)

    tasks = [(name, config, extra, seed) for name, config, extra in jobs for seed in args.seeds]
    t_start = time.perf_counter()

    def run(task) -> tuple[str, int, dict]:
        name, config, extra, seed = task
        run_dir = args.runs / f"{name}-s{seed}"
        metrics_path = run_dir / "metrics.json"
        rec: dict = {"run_dir": str(run_dir)}
        if not metrics_path.exists():
            t0 = time.perf_counter()
            try:
                per_seed = [o.replace("{seed}", str(seed)) for o in [*extra, *common]]
                p = subprocess.run(command(config, [*per_seed, f"train.seed={seed}", f"run.dir={run_dir}"]),
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
                rec.update(rc=p.returncode, tail=(p.stdout + p.stderr)[-1500:])
            except subprocess.TimeoutExpired:
                rec.update(rc=None, tail=f"killed after {args.timeout:.0f} s")
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
        if metrics_path.exists():
            rec["metrics"] = json.loads(metrics_path.read_text())
        status = "ok" if "metrics" in rec else f"FAILED rc {rec.get('rc')}: {rec.get('tail', '')[-400:]}"
        print(f"[{time.perf_counter() - t_start:6.0f} s] {name} seed {seed}: {status}", flush=True)
        return name, seed, rec

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(run, tasks))

    summary: dict = {}
    for name, config, extra in jobs:
        recs = [(seed, r) for n, seed, r in done if n == name]
        ok = [(seed, r["metrics"]) for seed, r in recs if "metrics" in r]
        row: dict = {"config": config, "overrides": extra, "seeds": [s for s, _ in ok],
                     "failed": {str(s): r.get("tail", "")[-600:] for s, r in recs if "metrics" not in r}}
        for section in ("valid", "test"):
            vals: dict[str, list[float]] = {}
            for _, m in ok:
                for k, v in flat(m.get(section, {})).items():
                    vals.setdefault(k, []).append(v)
            row[section] = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "per_seed": v}
                            for k, v in vals.items() if len(v) == len(ok)}
        row["best_epoch"] = [m.get("train", {}).get("best_epoch") for _, m in ok]
        row["train_seconds"] = [m.get("train", {}).get("seconds") for _, m in ok]
        summary[name] = row
        keys = [k for k in row["test"] if not k.endswith("samples")][:6]
        print(f"\n{name} ({config} {' '.join(extra)}), seeds {row['seeds']}, best epochs {row['best_epoch']}")
        for section in ("valid", "test"):
            cells = [f"{k} {row[section][k]['mean']:.4f} ± {row[section][k]['std']:.4f}" for k in keys if k in row[section]]
            print(f"  {section}: " + "  ".join(cells))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"jobs": summary, "common_overrides": common, "seeds": args.seeds,
                                        "wall_seconds": round(time.perf_counter() - t_start, 1),
                                        "environment": package_versions()}, indent=2))


if __name__ == "__main__":
    main()
