"""ANN index recall@k against exact search, per-query latency and build time (SPEC §2.6).

    .venv/bin/python benchmarks/index_recall.py --out benchmarks/results/index_recall_100k.json
    .venv/bin/python benchmarks/index_recall.py --n 1000000 --ef 128 256 512 1024 --out benchmarks/results/index_recall_1m.json
    .venv/bin/python benchmarks/index_recall.py --vectors runs/x/item_vectors.npy --queries runs/x/interests.npy

Items: a .npy of (N, D) float32 item vectors (`--vectors`), or a synthetic clustered set
(default 100k x 64: Gaussian blobs around `--clusters` random centres, each vector scaled by a
log-normal norm so inner product is not cosine). Queries: a .npy (`--queries`), or held-out
vectors from the same generator (synthetic), or item vectors plus Gaussian noise (`--vectors`).

Every index goes through `facetrec.index.ann` exactly as training and serving use it. For each
setting it reports: recall@k of the index's top-k against exact top-k (`ann_recall`), p50/p99
latency of one query at a time on ONE faiss thread (`faiss.omp_set_num_threads(1)`, timed
around `index.search`), build time (on `--build-threads` threads, default all), the memory
estimate and the serialized size. Prints a markdown table; `--out` writes JSON with the
environment (cores, faiss/numpy versions, malloc settings) next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from facetrec.index.ann import (HNSWIndex, IVFIndex, IVFPQIndex, ann_recall, build_index, memory_estimate_bytes)


def clustered(n: int, d: int, clusters: int, seed: int, spread: float = 0.6, norm_sigma: float = 0.3) -> np.ndarray:
    """(n, d) float32: blobs around `clusters` N(0, I) centres, each vector scaled by exp(N(0, norm_sigma²))."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    step = 1 << 18  # generate in blocks: bounded temporaries at 1M x 64
    for lo in range(0, n, step):
        m = min(step, n - lo)
        x = centres[rng.integers(0, clusters, m)] + spread * rng.normal(size=(m, d)).astype(np.float32)
        out[lo:lo + m] = x * np.exp(norm_sigma * rng.normal(size=(m, 1))).astype(np.float32)
    return out


def latency_ms(index: Any, queries: np.ndarray, k: int) -> np.ndarray:
    """Milliseconds of each single-query search (one warm-up query first)."""
    index.search(queries[:1], k)
    out = np.empty(len(queries))
    for i in range(len(queries)):
        q = queries[i:i + 1]
        t = time.perf_counter_ns()
        index.search(q, k)
        out[i] = (time.perf_counter_ns() - t) / 1e6
    return out


def serialized_mib(index: Any) -> float:
    import faiss

    inner = getattr(index, "_index", None)
    return float(len(faiss.serialize_index(inner)) / 2**20) if inner is not None else float("nan")


def measure(name: str, params: dict[str, Any], index: Any, build_s: float, queries: np.ndarray, lat_queries: np.ndarray,
            exact_ids: np.ndarray, k: int, threads: int) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(threads)
    _, ids = index.search(queries, k)  # batched, for recall
    faiss.omp_set_num_threads(1)
    lat = latency_ms(index, lat_queries, k)
    faiss.omp_set_num_threads(threads)
    row = {"index": name, "params": params, "build_s": round(build_s, 2), f"recall@{k}": round(ann_recall(ids, exact_ids), 4),
           "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
           "qps_1thread": round(1000.0 / float(lat.mean()), 1)}
    print("  " + json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=Path, default=None, help="(N, D) float32 .npy of item vectors")
    ap.add_argument("--queries", type=Path, default=None, help="(Q, D) float32 .npy of query vectors")
    ap.add_argument("--n", type=int, default=100_000, help="synthetic items (e.g. 1000000)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=0, help="synthetic centres (default n / 100)")
    ap.add_argument("--n-queries", type=int, default=1000, help="queries for recall")
    ap.add_argument("--latency-queries", type=int, default=500, help="of those, timed one at a time")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--M", type=int, default=32, help="HNSW neighbours per node")
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", type=int, nargs="*", default=[64, 128, 256, 512], help="HNSW efSearch values")
    ap.add_argument("--space", nargs="+", default=["ip"], choices=["ip", "l2"], help="HNSW graph space(s): ip, l2 (both: side by side)")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (default about 4 sqrt(n))")
    ap.add_argument("--nprobe", type=int, nargs="*", default=[8, 16, 32, 64, 128], help="IVF nprobe values")
    ap.add_argument("--pq-m", type=int, default=0, help="also IVFPQ with this many sub-quantizers (0 = skip)")
    ap.add_argument("--build-threads", type=int, default=0, help="faiss threads for building and batched search (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import faiss

    threads = args.build_threads or faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(args.seed + 1)
    if args.vectors is not None:
        items = np.ascontiguousarray(np.load(args.vectors), dtype=np.float32)
        source = str(args.vectors)
    else:
        clusters = args.clusters or max(10, args.n // 100)
        both = clustered(args.n + args.n_queries, args.dim, clusters, args.seed)  # the last n_queries are held out
        items, held_out = both[: args.n], both[args.n:]
        source = f"synthetic clustered n={args.n} d={args.dim} clusters={clusters} spread=0.6 norm_sigma=0.3"
    n, d = items.shape
    if args.queries is not None:
        queries = np.ascontiguousarray(np.load(args.queries), dtype=np.float32)[: args.n_queries]
    elif args.vectors is None:
        queries = np.ascontiguousarray(held_out)
    else:
        pick = items[rng.choice(n, args.n_queries, replace=n < args.n_queries)]
        queries = pick + 0.5 * items.std(axis=0) * rng.normal(size=pick.shape).astype(np.float32)
    lat_queries = queries[: args.latency_queries]
    ids = np.arange(1, n + 1, dtype=np.int64)
    k = args.k
    print(f"{source}; {len(queries)} queries; k={k}; faiss {faiss.__version__}, {threads} build thread(s), "
          f"latency on 1 thread", flush=True)

    rows: list[dict[str, Any]] = []

    def build(kind: str, **params: Any) -> tuple[Any, float]:
        est = memory_estimate_bytes(n, d, kind, params)
        print(f"building {kind} {params}: estimate {est / 2**20:,.0f} MiB", flush=True)
        t = time.perf_counter()
        index = build_index(items, ids, kind=kind, **params)
        return index, time.perf_counter() - t

    exact, t_exact = build("exact")
    _, exact_ids = exact.search(queries, k)
    rows.append(measure("exact", {}, exact, t_exact, queries, lat_queries, exact_ids, k, threads)
                | {"est_mib": round(memory_estimate_bytes(n, d, "exact") / 2**20, 1), "size_mib": round(serialized_mib(exact), 1)})
    del exact

    for space in args.space if args.ef else ():
        hnsw, t_hnsw = build("hnsw", M=args.M, efConstruction=args.ef_construction, efSearch=args.ef[0], space=space)
        assert isinstance(hnsw, HNSWIndex)
        mem = {"est_mib": round(memory_estimate_bytes(n, d + (space == "l2"), "hnsw", hnsw.params) / 2**20, 1),
               "size_mib": round(serialized_mib(hnsw), 1)}
        for ef in args.ef:
            hnsw.efSearch = ef
            rows.append(measure("hnsw", hnsw.params, hnsw, t_hnsw, queries, lat_queries, exact_ids, k, threads) | mem)
        del hnsw

    if args.nprobe:
        ivf, t_ivf = build("ivf", **({"nlist": args.nlist} if args.nlist else {}))
        assert isinstance(ivf, IVFIndex)
        mem = {"est_mib": round(memory_estimate_bytes(n, d, "ivf", ivf.params) / 2**20, 1),
               "size_mib": round(serialized_mib(ivf), 1)}
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            rows.append(measure("ivf", ivf.params, ivf, t_ivf, queries, lat_queries, exact_ids, k, threads) | mem)
        del ivf

    if args.pq_m:
        pq, t_pq = build("ivfpq", m=args.pq_m, **({"nlist": args.nlist} if args.nlist else {}))
        assert isinstance(pq, IVFPQIndex)
        mem = {"est_mib": round(memory_estimate_bytes(n, d, "ivfpq", pq.params) / 2**20, 1),
               "size_mib": round(serialized_mib(pq), 1)}
        for nprobe in args.nprobe:
            pq.nprobe = nprobe
            rows.append(measure("ivfpq", pq.params, pq, t_pq, queries, lat_queries, exact_ids, k, threads) | mem)

    rk = f"recall@{k}"
    print(f"\n{source}; {len(queries)} queries ({len(lat_queries)} timed one at a time on 1 thread); "
          f"build on {threads} thread(s)\n")
    print(f"| index | params | build s | {rk} | p50 ms | p99 ms | QPS (1 thread) | est. MiB | file MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        params = ", ".join(f"{a}={b}" for a, b in r["params"].items()) or "—"
        print(f"| {r['index']} | {params} | {r['build_s']:.1f} | {r[rk]:.4f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
              f"| {r['qps_1thread']:,.0f} | {r['est_mib']:,.0f} | {r['size_mib']:,.0f} |")

    if args.out is not None:
        from facetrec.io import write_json

        env = {"python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
               "cpu_count": os.cpu_count(), "build_threads": threads, "latency_threads": 1,
               "platform": platform.platform(), "machine": platform.machine(),
               "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
        write_json(args.out, {"source": source, "n": n, "dim": d, "queries": len(queries),
                              "latency_queries": len(lat_queries), "k": k, "env": env, "rows": rows})
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
