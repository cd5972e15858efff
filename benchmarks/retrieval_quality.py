"""Retrieval quality on amazon-beauty (user split, history <= 20, D = 64, K = 4), several seeds.

    .venv/bin/python benchmarks/retrieval_quality.py --seeds 0 1 2 --out benchmarks/results/retrieval_quality.json
    .venv/bin/python benchmarks/retrieval_quality.py --variants mind-behaviours mind-k1 mind-k2 mind-k8 --seeds 0 1 2

Every variant is a `facetrec train` run (configs/amazon-beauty/*.yaml + overrides), so the
numbers are exactly what users get. Prints mean ± std of Recall/NDCG/HR @20/@50 per variant,
the interest diagnostics (mean pairwise cosine of a user's interests, hit share by interest),
training seconds, and test Recall@50 per history-length bucket (metrics.json "buckets"; a run
trained before those existed gets them from `facetrec evaluate RUN_DIR`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from envinfo import package_versions  # benchmarks/envinfo.py

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "popularity": ("configs/amazon-beauty/popularity.yaml", []),
    "youtubednn": ("configs/amazon-beauty/youtubednn.yaml", []),
    "mind": ("configs/amazon-beauty/mind.yaml", []),
    "mind-behaviours": ("configs/amazon-beauty/mind.yaml", ["model.softmax_axis=behaviours"]),
    "mind-k1": ("configs/amazon-beauty/mind.yaml", ["model.n_interests=1"]),
    "mind-k2": ("configs/amazon-beauty/mind.yaml", ["model.n_interests=2"]),
    "mind-k8": ("configs/amazon-beauty/mind.yaml", ["model.n_interests=8"]),
}
METRICS = ("recall@20", "recall@50", "ndcg@20", "ndcg@50", "hr@20", "hr@50")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["popularity", "youtubednn", "mind"], choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-retrieval")
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
            metrics_path = run_dir / "metrics.json"
            if metrics_path.exists():
                m = json.loads(metrics_path.read_text())
            else:
                cfg = load_config(ROOT / config, [*extra, *args.overrides, f"train.seed={seed}", f"run.dir={run_dir}"])
                m = train(cfg, progress=False)
            results.setdefault(name, []).append(m)
            print(f"{name} seed {seed}: " + " ".join(f"{k} {m['test'][k]:.4f}" for k in METRICS)
                  + f"  ({m['train']['seconds']:.0f} s)", flush=True)

    print("\n| model | " + " | ".join(METRICS) + " | mean pairwise cosine | train s |")
    print("|---|" + "---:|" * (len(METRICS) + 2))
    summary = {}
    for name, runs in results.items():
        row = {}
        for k in METRICS:
            vals = [r["test"][k] for r in runs]
            row[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        cos = [r.get("interests", {}).get("mean_pairwise_cosine") for r in runs]
        cos = [c for c in cos if c is not None and c == c]
        secs = statistics.mean(r["train"]["seconds"] for r in runs)
        summary[name] = {"metrics": row, "mean_pairwise_cosine": statistics.mean(cos) if cos else None,
                         "hit_share_by_interest": [r.get("interests", {}).get("hit_share_by_interest") for r in runs],
                         "train_seconds": secs, "seeds": args.seeds,
                         "per_seed": {str(seed): {**{k: r["test"][k] for k in METRICS},
                                                  "valid_recall@50": r.get("valid", {}).get("recall@50"),
                                                  "best_epoch": r["train"].get("best_epoch")}
                                      for seed, r in zip(args.seeds, runs)}}
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in row.values())
        print(f"| {name} | {cells} | {summary[name]['mean_pairwise_cosine'] or float('nan'):.3f} | {secs:.0f} |")
    bucketed = {name: runs for name, runs in results.items() if all(r.get("buckets") for r in runs)}
    if bucketed:
        first = next(iter(bucketed.values()))[0]["buckets"]
        labels = [b for b, m in first.items() if m["users"]]  # the same test users in every run; empty buckets left out
        users = {b: first[b]["users"] for b in labels}
        print("\n| test Recall@50 by history length | " + " | ".join(f"{b} events ({users[b]} users)" for b in labels) + " |")
        print("|---|" + "---:|" * len(labels))
        for name, runs in bucketed.items():
            cells = {}
            for b in labels:
                vals = [r["buckets"][b]["recall@50"] for r in runs]
                cells[b] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
            summary[name]["buckets_recall@50"] = {b: {"mean": m, "std": sd, "users": users[b]} for b, (m, sd) in cells.items()}
            print(f"| {name} | " + " | ".join(f"{m:.4f} ± {sd:.4f}" for m, sd in cells.values()) + " |")
    missing = sorted(set(results) - set(bucketed))
    if missing:
        print(f"(no history-length buckets for {', '.join(missing)}: runs older than them; `facetrec evaluate RUN_DIR` adds them)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**summary, "environment": package_versions()}, indent=2))


if __name__ == "__main__":
    main()
