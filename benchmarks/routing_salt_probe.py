"""How much a trained MIND's test metrics depend on its routing's random start (SPEC §2.2).

The initial routing logits are drawn per sample from a hash of the history and a salt; in eval
mode the salt is 0, so serving is deterministic per history, but another salt is an equally valid
draw. This evaluates a finished run's best weights on its test users with salts 0..N-1 (the weights
unchanged) and prints Recall@50 overall and per history-length bucket for each:

    .venv/bin/python benchmarks/routing_salt_probe.py runs/ret-cos/mind-s0 --salts 5 --out benchmarks/results/routing_salt_probe_mind_s0.json

The spread is evaluation noise that a seed's number carries on top of training's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from envinfo import package_versions  # benchmarks/envinfo.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished `facetrec train` run of MIND")
    ap.add_argument("--salts", type=int, default=5, help="evaluate with routing salts 0 .. N-1")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from facetrec.data.dataset import Prepared, retrieval_eval_set
    from facetrec.data.prepare import ensure_prepared
    from facetrec.train.loop import load_checkpoint
    from facetrec.train.retrieval import build_mind, evaluate_mind
    from facetrec.train.run import load_run_config

    torch.set_num_threads(1)
    cfg = load_run_config(args.run_dir)
    if cfg.model.get("name", "mind") != "mind":
        raise SystemExit(f"{args.run_dir} is a {cfg.model.get('name')} run; give a MIND run (YouTube DNN does not route)")
    prep = Prepared(ensure_prepared(cfg, verbose=False))
    model = build_mind(cfg, prep)
    model.load_state_dict(load_checkpoint(args.run_dir / "best.pt")["model"])
    model.eval()
    es = retrieval_eval_set(prep, "test", cfg.train.protocol)
    route = model._route
    rows = []
    for salt in range(args.salts):
        model._route = lambda c, hist, n, _ignored, _salt=salt: route(c, hist, n, _salt)
        m = evaluate_mind(model, prep, es, cfg, detail=True)
        row = {"salt": salt, "recall@50": m["recall@50"],
               "buckets_recall@50": {b: v["recall@50"] for b, v in m["buckets"].items() if v["users"]}}
        rows.append(row)
        print(f"salt {salt}: test recall@50 {row['recall@50']:.4f}  by history length "
              + " ".join(f"{b} {v:.4f}" for b, v in row["buckets_recall@50"].items()), flush=True)
    lo, hi = min(r["recall@50"] for r in rows), max(r["recall@50"] for r in rows)
    print(f"range over {args.salts} salts: {lo:.4f} - {hi:.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run": str(args.run_dir), "rows": rows, "environment": package_versions()},
                                       indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
