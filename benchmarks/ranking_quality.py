"""Ranking quality on amazon-beauty (DIEN protocol, SPEC §1.3), several seeds.

    .venv/bin/python benchmarks/ranking_quality.py --seeds 0 1 2 --out benchmarks/results/ranking_quality.json

Variants: base, DIN, DIEN (AUGRU) without the auxiliary loss, and DIEN with the auxiliary loss
(α = AUX_ALPHA) and AIGRU / AGRU / AUGRU — the last is the amazon-beauty config as is. Each is
a `facetrec train` run (configs/amazon-beauty/{base,din,dien}.yaml + overrides). Prints mean ± std
of test AUC, GAUC, logloss, and the AUC of the sparse (<= 5 events) bucket.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from envinfo import package_versions  # benchmarks/envinfo.py

ROOT = Path(__file__).resolve().parents[1]
AUX_ALPHA = 0.1  # the auxiliary-loss rows' α, the config's own (best valid AUC, docs/benchmarks.md)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("configs/amazon-beauty/base.yaml", []),
    "din": ("configs/amazon-beauty/din.yaml", []),
    "dien-noaux": ("configs/amazon-beauty/dien.yaml", ["model.aux_alpha=0.0"]),
    "dien-aigru": ("configs/amazon-beauty/dien.yaml", ["model.evolution=aigru", f"model.aux_alpha={AUX_ALPHA}"]),
    "dien-agru": ("configs/amazon-beauty/dien.yaml", ["model.evolution=agru", f"model.aux_alpha={AUX_ALPHA}"]),
    "dien-augru": ("configs/amazon-beauty/dien.yaml", ["model.evolution=augru", f"model.aux_alpha={AUX_ALPHA}"]),
}
METRICS = ("auc", "gauc", "logloss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-ranking")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra override for every run")
    args = ap.parse_args()

    from facetrec.config import load_config
    from facetrec.train.run import train

    results: dict[str, list[dict]] = {}
    for name in args.variants:
        config, extra = VARIANTS[name]
        for seed in args.seeds:
            run_dir = args.runs / f"{name}-s{seed}"
            path = run_dir / "metrics.json"
            if path.exists():
                m = json.loads(path.read_text())
            else:
                m = train(load_config(ROOT / config, [*extra, *args.overrides, f"train.seed={seed}", f"run.dir={run_dir}"]),
                          progress=False)
            results.setdefault(name, []).append(m)
            print(f"{name} seed {seed}: " + " ".join(f"{k} {m['test'][k]:.4f}" for k in METRICS)
                  + f"  valid auc {m['train']['best_valid']['auc']:.4f} (epoch {m['train']['best_epoch']})"
                  + f"  ({m['train']['seconds']:.0f} s)", flush=True)

    print("\n| model | AUC | GAUC | logloss | AUC <=5 events | valid AUC | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for name, runs in results.items():
        row = {}
        for k in METRICS:
            vals = [r["test"][k] for r in runs]
            row[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        sparse = [r["buckets"].get("<=5", {}).get("auc") for r in runs]
        sparse = [s for s in sparse if s is not None]
        row["auc<=5"] = (statistics.mean(sparse), statistics.stdev(sparse) if len(sparse) > 1 else 0.0) if sparse else (float("nan"), 0.0)
        valid = [r["train"]["best_valid"]["auc"] for r in runs]
        row["valid_auc"] = (statistics.mean(valid), statistics.stdev(valid) if len(valid) > 1 else 0.0)
        secs = statistics.mean(r["train"]["seconds"] for r in runs)
        per_seed = {str(seed): {"auc": r["test"]["auc"], "gauc": r["test"]["gauc"], "logloss": r["test"]["logloss"],
                                "auc<=5": r["buckets"].get("<=5", {}).get("auc"),
                                "valid_auc": r["train"]["best_valid"]["auc"], "best_epoch": r["train"]["best_epoch"]}
                    for seed, r in zip(args.seeds, runs)}
        summary[name] = {"metrics": row, "train_seconds": secs, "seeds": args.seeds, "per_seed": per_seed}
        print(f"| {name} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in row.values()) + f" | {secs:.0f} |")
    if "dien-noaux" in results and len(args.seeds) > 1:
        print("\npaired by seed against dien-noaux (same data order and negatives): mean difference, paired t")
        for name, runs in results.items():
            if name == "dien-noaux":
                continue
            for key, get in (("test auc", lambda r: r["test"]["auc"]), ("valid auc", lambda r: r["train"]["best_valid"]["auc"])):
                diffs = [get(a) - get(b) for a, b in zip(runs, results["dien-noaux"])]
                sd = statistics.stdev(diffs)
                t = statistics.mean(diffs) / (sd / len(diffs) ** 0.5) if sd > 0 else float("inf")
                print(f"  {name} {key}: " + " ".join(f"{d:+.4f}" for d in diffs) + f"  mean {statistics.mean(diffs):+.4f}  t {t:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**summary, "environment": package_versions()}, indent=2))


if __name__ == "__main__":
    main()
