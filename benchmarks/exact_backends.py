"""Does the exact-search backend change a retrieval run's metrics? Evaluates a finished MIND /
YouTube DNN run's best weights on its valid and test users twice: through faiss's IndexFlatIP and
through the numpy fallback (matmul + argpartition) of `facetrec.index.ExactIndex`.

    .venv/bin/python benchmarks/exact_backends.py runs/bench-retrieval-v2/mind-s1

Used in docs/benchmarks.md (Retrieval quality, "Rerun on 2026-11-30") to rule out the search as
the cause of seeds that reproduce on one machine but not across machines.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from facetrec.data.dataset import retrieval_eval_set
from facetrec.index.ann import faiss
from facetrec.report.runs import LoadedModel, load_run
from facetrec.train.retrieval import evaluate_mind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    args = ap.parse_args()
    if faiss is None:
        raise SystemExit("faiss is not installed here: nothing to compare (pip install 'facetrec[ann]')")
    torch.set_num_threads(1)
    run = load_run(args.run)
    cfg = run.cfg
    if cfg.train.index != "exact":
        raise SystemExit(f"{args.run} evaluates with train.index={cfg.train.index!r}; this compares the exact backends only")
    loaded = LoadedModel(run)  # best weights, eval mode
    model, prep = loaded.model, loaded.prep
    for split in ("valid", "test"):
        es = retrieval_eval_set(prep, split, cfg.train.protocol, cfg.train.max_eval_users, seed=cfg.train.seed)
        for backend in ("faiss", "numpy"):
            params = {**cfg.train.index_params, "backend": backend}  # what `train.index_params: {backend: ...}` sets
            m = evaluate_mind(model, prep, es, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, index_params=params)))
            print(f"{split} {backend:5s} " + "  ".join(f"{k} {v:.6f}" for k, v in m.items() if k.endswith("@50")))


if __name__ == "__main__":
    main()
