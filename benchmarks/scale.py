"""Scale: a 10M-event synthetic log over a ~1M-item catalogue — prepare, one MIND epoch, an IVF-PQ
index over every item, its recall@100 against exact search and its latency.

    .venv/bin/python benchmarks/scale.py --out benchmarks/results/scale.json

Stages run one after the other, each in a fresh Python process whose own peak RSS
(getrusage ru_maxrss) is reported: synth (writes the TSV; not part of the pipeline), prepare
(`facetrec prepare` on configs/synthetic.yaml), train (one MIND epoch, or --max-steps of it, with the training loop,
then item vectors, the IVF-PQ build and the search measurements). Recall@100 compares the
IVF-PQ top-100 with the exact top-100 for interest vectors of held-out test users (each
valid interest is one query); latency is per query, one query at a time, one thread.

Synthetic catalogue: 1000 categories of ~1050 items with a flat popularity (Zipf 0.6), so that
k-core (items with >= 2 events) keeps about a million items.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_scaling import CHILD as PREPARE  # noqa: E402  the same measured prepare child process

SYNTH = r"""
import json, resource, sys, time
from facetrec.data.synth import SynthConfig, synth
a = json.loads(sys.argv[1])
t = time.perf_counter()
meta = synth(SynthConfig(n_users=a["users"], n_items=a["items"], n_categories=a["categories"], zipf=a["zipf"],
                         chunk_users=20_000, seed=0), a["raw"], progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "events": meta["events"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


TRAIN = r"""
import json, resource, sys, time
import numpy as np, torch
from pathlib import Path
from facetrec.config import load_config
from facetrec.data.dataset import Prepared, retrieval_eval_set, retrieval_train_samples
from facetrec.index.ann import build_index, memory_estimate_bytes, ann_recall
from facetrec.train.loop import fit
from facetrec.train.retrieval import all_item_vectors, build_mind, retrieval_task, user_interests

a = json.loads(sys.argv[1])
cfg = load_config(sys.argv[2], sys.argv[3:])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {}
t = time.perf_counter()
prep = Prepared(a["prep"])
out["load_seconds"] = time.perf_counter() - t
model = build_mind(cfg, prep)
task = retrieval_task(cfg, prep, model)
out["train_samples"] = len(retrieval_train_samples(prep, cfg.train.protocol)[0])
t = time.perf_counter()
Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
res = fit(task, cfg.train, Path(cfg.run.dir), progress=a["progress"])
out.update(epoch_steps=res.steps, train_seconds=time.perf_counter() - t, valid=res.best_valid,
           peak_rss_after_train_mib=rss())

import faiss
faiss.omp_set_num_threads(a["threads"])
t = time.perf_counter()
items = all_item_vectors(model, prep.n_items)  # (N, D)
ids = np.arange(1, prep.n_items, dtype=np.int64)
out["item_vectors_seconds"] = time.perf_counter() - t
kind, params = a["index"], a["index_params"]
out["index"] = {"kind": kind, "params": params, "n": len(ids), "dim": items.shape[1],
                "memory_estimate_mib": memory_estimate_bytes(len(ids), items.shape[1], kind, params) / 2**20}
t = time.perf_counter()
index = build_index(items, ids, kind=kind, **params)
out["index"]["build_seconds"] = time.perf_counter() - t
exact = build_index(items, ids, kind="exact")

es = retrieval_eval_set(prep, "test", cfg.train.protocol, a["query_users"], seed=0)
V, valid = user_interests(model, prep, es.users, es.ends, prep.max_history)
q = np.ascontiguousarray(V[valid], dtype=np.float32)  # (Q, D): every valid interest is one query
t = time.perf_counter()
truth = exact.search(q, 100)[1]
out["exact_batch_ms_per_query"] = 1e3 * (time.perf_counter() - t) / len(q)
faiss.omp_set_num_threads(1)
def one_at_a_time(ix, n=300):
    t = time.perf_counter()
    for row in q[:n]:
        ix.search(row[None], 100)
    return 1e3 * (time.perf_counter() - t) / min(n, len(q))
out["queries"] = len(q)
out["exact_ms_per_query_1thread"] = one_at_a_time(exact, 50)
sweep = []
for nprobe in a["nprobe"]:
    index.nprobe = nprobe
    got = index.search(q, 100)[1]
    sweep.append({"nprobe": nprobe, "recall@100": ann_recall(got, truth), "ms_per_query_1thread": one_at_a_time(index)})
out["sweep"] = sweep
out["peak_rss_mib"] = rss()
print(json.dumps(out))
"""


def run(code: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"stage failed:\n{p.stderr[-4000:]}")
    sys.stderr.write(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=10, help="millions of events (about)")
    ap.add_argument("--items", type=int, default=1_050_000, help="items the synthetic catalogue draws from")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--n-negatives", type=int, default=2000)
    ap.add_argument("--max-steps", type=int, default=0, help="cut the epoch short (0 = the whole epoch)")
    ap.add_argument("--index-params", default='{"nlist": 2048, "m": 16, "nbits": 8}', help="IVF-PQ parameters (JSON)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--query-users", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="facetrec-scale-"))
    events = int(args.events * 1e6)
    raw, prep = work / "raw", work / "prep"
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    config = str(ROOT / "configs" / "synthetic.yaml")
    data = [f"data.root={raw}", f"run.dir={prep}"]
    if not (raw / "synth.json").exists():
        result["synth"] = run(SYNTH, json.dumps({"users": events // 28, "items": args.items, "categories": 1000,
                                                  "zipf": 0.6, "raw": str(raw)}))
        print(f"synth: {result['synth']}", flush=True)
    if not (prep / "summary.json").exists():
        result["prepare"] = run(PREPARE, config, *data)
        print(f"prepare: {result['prepare']}", flush=True)
    train = data[:1] + [f"run.dir={work / 'run'}", "model.name=mind", f"model.dim={args.dim}", "model.hidden=[64]",
                        "train.epochs=1", f"train.batch_size={args.batch_size}", f"train.n_negatives={args.n_negatives}",
                        f"train.max_steps={args.max_steps}", "train.max_eval_users=2000", f"train.threads={args.threads}",
                        "train.device=cpu"]  # the loop's own validation: exact search, 2000 users
    shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run, not a resume
    result["train"] = run(TRAIN, json.dumps({"prep": str(prep), "threads": args.threads, "query_users": args.query_users,
                                             "nprobe": args.nprobe, "progress": args.progress, "index": "ivfpq",
                                             "index_params": json.loads(args.index_params)}), config, *train)
    print(f"train: {json.dumps(result['train'], indent=1)}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
