"""Issue #5's slices for runs of a grid (benchmarks/run_grid.py): test AUC, the activity buckets and the
truncated-history runs of each job, mean ± std over seeds, and each job's difference from a base job.

    .venv/bin/python benchmarks/coldstart_slices.py --runs runs/cs-uie-knobs --base ple --seeds 0 \
        --out benchmarks/results/coldstart_uie_knobs_beauty_seed0.json

Reads RUNS/<job>-s<seed>/metrics.json for every job found there (or those named by --jobs); the first
task only unless --task names another. With several seeds a cell is "mean ± std (Δ)"; issue #5 asks
Δ > 2 s with s the larger of the two jobs' stds. With one seed there is no spread: Δ is a screen,
not a verdict.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from coldstart_quality import _ms, rows  # benchmarks/coldstart_quality.py
from envinfo import package_versions  # benchmarks/envinfo.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--base", required=True, help="the job the others are compared with (e.g. ple)")
    ap.add_argument("--jobs", nargs="+", default=None, help="default: every <job>-s<seed> found under --runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--task", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    found = sorted({m.group(1) for p in args.runs.glob("*-s*") if (m := re.fullmatch(r"(.+)-s\d+", p.name))})
    jobs = args.jobs or [args.base] + [j for j in found if j != args.base]
    table: dict[str, dict[str, tuple[float, float]]] = {}
    per_seed: dict[str, list[dict]] = {}
    for job in jobs:
        paths = [args.runs / f"{job}-s{s}" / "metrics.json" for s in args.seeds]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            print(f"{job}: skipped, no metrics at {', '.join(missing)} (run the grid first)")
            continue
        ms = [json.loads(p.read_text()) for p in paths]
        task = args.task or ms[0]["tasks"][0]
        per_seed[job] = [rows(m, task) for m in ms]
        table[job] = {k: _ms([r[k] for r in per_seed[job]]) for k in per_seed[job][0]}
    if args.base not in table:
        raise SystemExit(f"no runs of the base job {args.base!r} under {args.runs} for seeds {args.seeds}")
    keys = list(table[args.base])
    print(f"\ntest AUC by slice, seeds {args.seeds}; Δ against {args.base}\n")
    print("| job | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for job, t in table.items():
        cells = []
        for k in keys:
            (a, sa), (b, sb) = table[args.base][k], t.get(k, (float("nan"), 0.0))
            mean = f"{b:.4f}" + (f" ± {sb:.4f}" if len(args.seeds) > 1 else "")
            cells.append(mean if job == args.base else f"{mean} ({b - a:+.4f})")
        print(f"| {job} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"base": args.base, "seeds": args.seeds, "runs": str(args.runs),
                                        "summary": table, "per_seed": per_seed, "environment": package_versions()},
                                       indent=2))


if __name__ == "__main__":
    main()
