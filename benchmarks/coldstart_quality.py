"""Cold start (SPEC §4): PLE against PLE + UIE, several seeds, on amazon-beauty and amazon-hin.

    .venv/bin/python benchmarks/coldstart_quality.py --seeds 0 1 2 --out benchmarks/results/coldstart_quality.json

Each run is a `facetrec train` of configs/<dataset>/{ple,ple-uie}.yaml (+ overrides, e.g.
`--set train.epochs=2`), run one after another in this process. Reported per dataset and task,
mean ± std over seeds: test AUC, AUC per activity bucket (history events at the sample: <=5,
6-20, >20), AUC with test histories cut to their last 1 / 2 / 3 / 5 events (users treated as
unseen), share of UIE centres in use in the last epoch, training seconds.

Acceptance checks printed at the end (SPEC §4.3 / issue #5), with s = the larger of the two
variants' standard deviations over seeds:
  sparse: AUC(PLE+UIE) - AUC(PLE) > 2 s   for the <=5 bucket and every truncated-history run
  dense:  AUC(PLE) - AUC(PLE+UIE) <= s    for the >20 bucket
  centres: >= 50% of each memory's centres in use at the end of training
  time:   one PLE+UIE run on amazon-hin trains in <= 15 min

`--warm-start`: each PLE + UIE run starts from the same seed's trained PLE (`model.warm_start` =
its run dir; run dirs `<dataset>-ple-uie-warm-s<seed>`, so the PLE runs are shared with the plain
grid), i.e. UIE's memories and towers are learnt on top of a converged main model.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from envinfo import package_versions  # benchmarks/envinfo.py

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("amazon-beauty", "amazon-hin")
VARIANTS = ("ple", "ple-uie")


def _ms(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def rows(m: dict, task: str) -> dict[str, float | None]:
    """The numbers compared, from one run's metrics.json."""
    out: dict[str, float | None] = {"test": m["test"][task].get("auc")}
    for b, per in m["buckets"].items():
        out[f"bucket {b}"] = per[task].get("auc")
    for k, per in m["cold_start"].items():
        out[f"history {k}"] = per[task].get("auc")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-coldstart")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--warm-start", action="store_true", help="PLE + UIE starts from the same seed's trained PLE")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra override for every run")
    args = ap.parse_args()

    from facetrec.config import load_config
    from facetrec.train.run import train

    results: dict[str, dict[str, list[dict]]] = {d: {v: [] for v in VARIANTS} for d in args.datasets}
    for seed in args.seeds:  # seed-major: partial results already compare both variants
        for data in args.datasets:
            for variant in VARIANTS:
                warm = args.warm_start and variant == "ple-uie"
                run_dir = args.runs / f"{data}-{variant}{'-warm' if warm else ''}-s{seed}"
                path = run_dir / "metrics.json"
                if path.exists():
                    m = json.loads(path.read_text())
                else:
                    per_run = [f"train.seed={seed}"] + ([f"model.uie.seed={seed}"] if variant == "ple-uie" else [])
                    if warm:
                        per_run.append(f"model.warm_start={args.runs / f'{data}-ple-s{seed}'}")
                    cfg = load_config(ROOT / "configs" / data / f"{variant}.yaml", [*args.overrides, *per_run, f"run.dir={run_dir}"])
                    m = train(cfg, progress=False)
                results[data][variant].append(m)
                t0 = m["tasks"][0]
                print(f"{data} {variant} seed {seed}: {t0} AUC {m['test'][t0]['auc']:.4f}  ({m['train']['seconds']:.0f} s)", flush=True)

    summary: dict = {}
    per_seed: dict = {}  # {dataset: {task: {variant: [slice -> AUC, one per seed]}}}
    checks: list[str] = []
    for data, per_variant in results.items():
        runs = per_variant
        if not runs["ple"] or not runs["ple-uie"]:
            continue
        tasks = runs["ple"][0]["tasks"]
        summary[data] = {}
        per_seed[data] = {}
        for task in tasks:
            table = {v: {} for v in VARIANTS}
            per_seed[data][task] = {}
            for v in VARIANTS:
                per_run = [rows(m, task) for m in runs[v]]
                per_seed[data][task][v] = per_run
                for key in per_run[0]:
                    table[v][key] = _ms([r[key] for r in per_run])
            summary[data][task] = table
            print(f"\n### {data}, task {task} (test AUC, mean ± std over seeds {args.seeds})\n")
            print("| slice | PLE | PLE + UIE | Δ | 2 s |")
            print("|---|---:|---:|---:|---:|")
            for key in table["ple"]:
                (a, sa), (b, sb) = table["ple"][key], table["ple-uie"][key]
                s = max(sa, sb)
                print(f"| {key} | {a:.4f} ± {sa:.4f} | {b:.4f} ± {sb:.4f} | {b - a:+.4f} | {2 * s:.4f} |")
                if math.isnan(a) or math.isnan(b):
                    continue
                if key == "bucket <=5" or key.startswith("history"):
                    checks.append(f"{data} {task} {key}: Δ {b - a:+.4f} vs 2s {2 * s:.4f} -> {'holds' if b - a > 2 * s else 'does NOT hold'}")
                if key == "bucket >20":
                    checks.append(f"{data} {task} {key} (dense cost): {a - b:+.4f} vs s {s:.4f} -> {'holds' if a - b <= s else 'does NOT hold'}")
        centres = [m.get("centres", {}) for m in runs["ple-uie"]]
        in_use = {k: _ms([c[k]["in_use"] for c in centres if k in c]) for k in ("profile", "item", "sequence")}
        secs = {v: _ms([m["train"]["seconds"] for m in runs[v]]) for v in VARIANTS}
        summary[data]["centres_in_use"] = in_use
        summary[data]["train_seconds"] = secs
        print(f"\n{data}: centres in use at the end of training " + ", ".join(f"{k} {m:.2f} ± {s:.2f}" for k, (m, s) in in_use.items()))
        print(f"{data}: train seconds " + ", ".join(f"{v} {m:.0f} ± {s:.0f}" for v, (m, s) in secs.items()))
        for k, (mean, _) in in_use.items():
            checks.append(f"{data} centres {k}: {mean:.2f} in use -> {'holds' if mean >= 0.5 else 'does NOT hold'}")
        if data == "amazon-hin":
            worst = max(m["train"]["seconds"] for m in runs["ple-uie"])
            checks.append(f"amazon-hin PLE+UIE train time: max {worst:.0f} s -> {'holds' if worst <= 900 else 'does NOT hold'} (<= 900 s)")
    print("\nacceptance:")
    for c in checks:
        print("  " + c)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "per_seed": per_seed, "checks": checks, "seeds": args.seeds,
                                        "overrides": args.overrides, "warm_start": args.warm_start, "environment": package_versions()}, indent=2))


if __name__ == "__main__":
    main()
