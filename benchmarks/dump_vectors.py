"""Dump a trained MIND run's item vectors and its test users' valid interest vectors as .npy,
so that `benchmarks/index_recall.py --vectors ... --queries ...` measures ANN recall on real
(e.g. amazon-beauty) embeddings:

    .venv/bin/python benchmarks/dump_vectors.py runs/bench-retrieval/mind-s0 /tmp/beauty-vectors
    .venv/bin/python benchmarks/index_recall.py --vectors /tmp/beauty-vectors/item_vectors.npy \
        --queries /tmp/beauty-vectors/interests.npy --k 100 --out benchmarks/results/index_recall_beauty.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished `facetrec train` run of mind or youtubednn")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    args = ap.parse_args()

    from facetrec.data.dataset import Prepared, retrieval_eval_set
    from facetrec.data.prepare import ensure_prepared
    from facetrec.train.loop import load_checkpoint
    from facetrec.train.retrieval import all_item_vectors, build_mind, user_interests
    from facetrec.train.run import load_run_config

    cfg = load_run_config(args.run_dir)
    prep = Prepared(ensure_prepared(cfg, verbose=False))
    model = build_mind(cfg, prep)
    model.load_state_dict(load_checkpoint(args.run_dir / "best.pt")["model"])
    items = all_item_vectors(model, prep.n_items)
    es = retrieval_eval_set(prep, args.split, cfg.train.protocol)
    vecs, valid = user_interests(model, prep, es.users, es.ends, prep.max_history)
    queries = np.ascontiguousarray(vecs[valid.astype(bool)], dtype=np.float32)  # one query per valid interest
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.save(args.out_dir / "item_vectors.npy", items)
    np.save(args.out_dir / "interests.npy", queries)
    print(f"{items.shape[0]} item vectors, {queries.shape[0]} interest vectors of {len(es.users)} {args.split} users "
          f"-> {args.out_dir}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
