"""Load test of the HTTP service on loopback: fixed request rate, 90% recommend / 10% events, Zipf users.

    .venv/bin/python benchmarks/serve_load.py --artifact runs/serve-bench/artifact --rate 50 --seconds 60 --workers 2

Starts `facetrec serve` (uvicorn, N worker processes) on a free loopback port with a fresh
SQLite store, preloaded (in-process, before the server starts) with every user's history from
the prepared data the artifact was trained on, so that recommend requests take the personal
recall -> rank path, not the cold-start one. Then sends an open-loop stream of requests (each at
its scheduled time, whether or not earlier ones have answered — so queueing shows in the
latency) from an asyncio client: 90% POST /recommend {"user_id", "n"} and 10% POST /events of
one new event, users drawn from a Zipf law. Reports p50 / p90 / p99 / max latency per endpoint,
errors, the share of personal answers, the achieved rate and the machine's load average, and
stops the server. Loopback only; bounded in count and time.

With --reload-at S the server watches the artifact root (`serve --reload-every 1`) and S seconds into
the run a new version is published (a copy of the current one under a new name, CURRENT switched):
recommend latency is reported for the 10 s before, the 10 s after and the rest (each with its requests
over 30 ms and its five slowest as [send time s, ms]), with the time the first answer came from the new version; --reload-control keeps the setup and publishes nothing;
--reload-rollback publishes by pointing CURRENT at a version already there (writes no files).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, port: int, workers: int, store: str, log: Path,
                 search_params: list[str] | None = None, extra: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "facetrec", "serve", str(artifact), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", str(workers), "--store", store,
                                 *[a for kv in search_params or [] for a in ("--search-param", kv)], *(extra or [])],
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def publish_rollback(root: Path) -> str:
    """Switch CURRENT to the newest other version already under `root` (a rollback: no file is written but
    CURRENT). Returns its name."""
    from facetrec.io import atomic_write
    from facetrec.serving.artifacts import resolve_version

    cur = resolve_version(root).name
    others = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != cur),
                    key=lambda d: d.stat().st_mtime)
    if not others:
        raise SystemExit(f"--reload-rollback: {root} holds no other version to switch to")
    name = others[-1].name
    atomic_write(root / "CURRENT", lambda f: f.write(name.encode()))
    return json.loads((root / name / "manifest.json").read_text()).get("version", name)


def publish_copy(root: Path) -> str:
    """A new version under `root`: a copy of the current one under a new name (its manifest renamed too), then
    CURRENT switched, as `facetrec export` leaves it; a server with --reload-every loads it. Returns its name."""
    from facetrec.io import atomic_write
    from facetrec.serving.artifacts import resolve_version

    old = resolve_version(root)
    name = f"{old.name}-reload{os.getpid()}"
    tmp = root / f".{name}.tmp"
    shutil.copytree(old, tmp)
    m = json.loads((tmp / "manifest.json").read_text())
    m["version"] = name
    (tmp / "manifest.json").write_text(json.dumps(m, indent=2))
    os.rename(tmp, root / name)
    atomic_write(root / "CURRENT", lambda f: f.write(name.encode()))
    return name


async def wait_ready(client, base: str, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            r = await client.get(f"{base}/readyz")
            if r.status_code == 200:
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("server did not become ready")


def preload(run: Path, store_url: str) -> tuple[list, int]:
    """Write every user's history, from the prepared data of the training run `run`, into the
    store; returns (raw user ids, events written)."""
    import polars as pl

    from facetrec.data.prepare import ensure_prepared
    from facetrec.serving.store import Event, open_store
    from facetrec.train.run import load_run_config

    prep = ensure_prepared(load_run_config(run), verbose=False)
    ev = pl.read_parquet(prep / "events.parquet")
    users = pl.read_parquet(prep / "users.parquet").sort("id")
    items = pl.read_parquet(prep / "items.parquet").sort("id")
    raw_user = np.array([None] + [str(x) for x in users["raw_id"].to_list()], dtype=object)
    raw_item = np.array([None] + [str(x) for x in items["raw_id"].to_list()], dtype=object)
    u, it, t = ev["user"].to_numpy(), ev["item"].to_numpy(), ev["time"].to_numpy()
    store = open_store(store_url)
    step = 20_000
    for lo in range(0, len(u), step):
        store.append([Event(f"pre-{k}", raw_user[u[k]], raw_item[it[k]], int(t[k])) for k in range(lo, min(lo + step, len(u)))])
    store.close()
    return [x for x in raw_user[1:]], len(u)


def ann_recall_at(version: Path, users: int, k: int, seed: int, ef_search: list[int] | None = None) -> dict:
    """Recall@k of the artifact's index against an exact index, on the serving path (multi-interest
    search with the artifact's top_m, seen items excluded), for a sample of real user histories."""
    import torch

    from facetrec.data.dataset import Prepared
    from facetrec.data.prepare import ensure_prepared
    from facetrec.index.ann import ann_recall, build_index, multi_interest_search
    from facetrec.serving.pipeline import Pipeline
    from facetrec.train.retrieval import all_item_vectors
    from facetrec.train.run import load_run_config

    torch.set_num_threads(1)
    p = Pipeline(version)
    run = Path(p.manifest["parts"]["retrieval"]["run"])
    prep = Prepared(ensure_prepared(load_run_config(run), verbose=False))
    rng = np.random.default_rng(seed)
    sample = rng.choice(np.arange(1, prep.n_users), size=min(users, prep.n_users - 1), replace=False)
    V, valid, hists = [], [], []
    for u in sample:
        hist = prep.items[prep.offsets[u - 1]:prep.offsets[u - 1] + prep.counts[u]]
        v, ok = p.interest_vectors(hist)
        V.append(v)
        valid.append(ok)
        hists.append(np.unique(hist))
    V, valid = np.stack(V), np.stack(valid)
    exclude = (np.concatenate([[0], np.cumsum([len(h) for h in hists])]), np.concatenate(hists))
    t0 = time.perf_counter()
    exact = build_index(all_item_vectors(p.retrieval, p.n_items), np.arange(1, p.n_items), kind="exact")
    build_s = time.perf_counter() - t0
    exact_ids, _, _ = multi_interest_search(exact, V, valid, p.top_m, k, exclude)
    approx_ids, _, _ = multi_interest_search(p.index, V, valid, p.top_m, k, exclude)
    out = {"index": p.index.kind, "params": p.index.params, "k": k, "users": len(sample),
           "recall": round(float(ann_recall(approx_ids, exact_ids)), 4), "exact_build_s": round(build_s, 1)}
    if ef_search and p.index.kind == "hnsw":
        out["by_efSearch"] = {}
        for ef in ef_search:  # the same graph searched wider: recall against search time (wall, this machine)
            p.index.efSearch = ef
            t0 = time.perf_counter()
            ids, _, _ = multi_interest_search(p.index, V, valid, p.top_m, k, exclude)
            out["by_efSearch"][ef] = {"recall": round(float(ann_recall(ids, exact_ids)), 4),
                                      "search_ms_per_user": round((time.perf_counter() - t0) / len(sample) * 1000, 2)}
    return out


def breakdown(version: Path, users: int, n: int, seed: int) -> dict:
    """Where a recommend's CPU goes, in-process and single-threaded (thread CPU time, so another
    process's load does not count): MIND routing, interest MLP, multi-interest search, ranking."""
    import torch

    from facetrec.data.dataset import Prepared
    from facetrec.data.prepare import ensure_prepared
    from facetrec.index.ann import multi_interest_search
    from facetrec.serving.pipeline import Pipeline
    from facetrec.train.run import load_run_config

    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    p = Pipeline(version)
    p.warm_up()
    prep = Prepared(ensure_prepared(load_run_config(Path(p.manifest["parts"]["retrieval"]["run"])), verbose=False))
    rng = np.random.default_rng(seed)
    parts: dict[str, list[float]] = {"route": [], "interest_mlp": [], "search": [], "rank": [], "recommend": []}

    def timed(key, f):
        t = time.thread_time()
        out = f()
        parts[key].append((time.thread_time() - t) * 1000)
        return out

    with torch.inference_mode():
        for u in rng.choice(np.arange(1, prep.n_users), size=users, replace=False):
            hist = prep.items[prep.offsets[u - 1]:prep.offsets[u - 1] + prep.counts[u]]
            h, m, r = timed("route", lambda: p._route(hist, None))
            V = timed("interest_mlp", lambda: p.retrieval.interests_from_capsules(r.capsules, r.valid, torch.tensor([0])))
            seen = np.unique(hist)
            ids, _, _ = timed("search", lambda: multi_interest_search(
                p.index, V.numpy(), r.valid.numpy(), max(p.top_m, p.n_candidates), p.n_candidates,
                (np.array([0, len(seen)]), seen)))
            cand = torch.from_numpy(ids[0][ids[0] > 0])
            if p.ranking is not None:
                timed("rank", lambda: p.ranking.score_candidates(h[0], m[0], cand))
            timed("recommend", lambda: p.recommend(hist, n))
    return {k: {"mean_ms": round(float(np.mean(v)), 2), "p50_ms": round(float(np.median(v)), 2)}
            for k, v in parts.items() if v} | {"users": users}


async def run_load(base: str, users: list[str], items: list, rate: float, seconds: float, zipf: float, seed: int,
                   n: int, reload_at: float = 0.0, root: Path | None = None, publish: bool = True,
                   rollback: bool = False) -> dict:
    import httpx

    rng = np.random.default_rng(seed)
    total = int(rate * seconds)
    ranks = np.arange(1, len(users) + 1)
    p = 1.0 / ranks ** zipf
    p /= p.sum()
    who = rng.choice(len(users), size=total, p=p)
    kinds = rng.random(total) < 0.9
    pick = [items[k] for k in rng.integers(len(items), size=total)]
    lat: dict[str, list[float]] = {"recommend": [], "events": []}
    sent: list[tuple[float, float, str]] = []  # recommend: (send time from the start, latency ms, artifact answered)
    errors: dict[str, int] = {}
    paths: dict[str, int] = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await wait_ready(client, base)
        # warm-up: a few requests not counted
        for u in users[:5]:
            await client.post(f"{base}/recommend", json={"user_id": u, "n": n})

        async def one(i: int, at: float) -> None:
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            user = users[who[i]]
            t = time.perf_counter()
            kind = "recommend" if kinds[i] else "events"
            try:
                if kinds[i]:
                    r = await client.post(f"{base}/recommend", json={"user_id": user, "n": n})
                else:
                    body = {"events": [{"event_id": f"load-{seed}-{i}", "user_id": user, "item_id": pick[i],
                                        "timestamp": int(time.time())}]}
                    r = await client.post(f"{base}/events", json=body)
            except Exception as e:  # a connection error counts as an error, with its latency
                lat[kind].append((time.perf_counter() - t) * 1000)
                errors[f"{kind} {type(e).__name__}"] = errors.get(f"{kind} {type(e).__name__}", 0) + 1
                return
            lat[kind].append((time.perf_counter() - t) * 1000)
            if r.status_code >= 400:
                errors[f"{kind} {r.status_code}"] = errors.get(f"{kind} {r.status_code}", 0) + 1
            elif kind == "recommend":
                body = r.json()
                paths[body["path"]] = paths.get(body["path"], 0) + 1
                sent.append((t - start, lat[kind][-1], body["artifact"]))

        start = time.perf_counter() + 0.5
        t0 = time.perf_counter()
        published: dict[str, float] = {}

        async def publish_at() -> None:  # a new export appears mid-run (the copy runs off the event loop)
            await asyncio.sleep(max(0.0, start + reload_at - time.perf_counter()))
            published["at"] = time.perf_counter() - start
            how = publish_rollback if rollback else publish_copy
            published["name"] = await asyncio.to_thread(how, root) if publish else ""

        extra = [publish_at()] if reload_at > 0 and root is not None else []
        await asyncio.gather(*(one(i, start + i / rate) for i in range(total)), *extra)
        wall = time.perf_counter() - t0
    out = {"requests": total, "wall_s": round(wall, 2), "achieved_rate": round(total / wall, 1), "errors": errors,
           "recommend_paths": paths}
    for kind, xs in lat.items():
        if xs:
            a = np.array(xs)
            out[kind] = {"count": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 2),
                         "p90_ms": round(float(np.percentile(a, 90)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
                         "max_ms": round(float(a.max()), 2)}
    if published:
        new = [t for t, _, a in sent if a == published["name"]]
        at = published["at"]

        def window(lo: float, hi: float) -> dict:
            xs = np.array([ms for t, ms, _ in sent if lo <= t < hi])
            return ({"count": int(len(xs)), "p50_ms": round(float(np.percentile(xs, 50)), 2),
                     "p99_ms": round(float(np.percentile(xs, 99)), 2), "max_ms": round(float(xs.max()), 2),
                     "over_30ms": int((xs > 30).sum()),
                     "slowest": sorted(([round(t, 2), round(ms, 1)] for t, ms, _ in sent if lo <= t < hi),
                                       key=lambda x: -x[1])[:5]}
                    if len(xs) else {"count": 0})

        out["reload"] = {"published_at_s": round(at, 2), "version": published["name"] or "(control: nothing published)",
                         "first_answer_from_it_s": round(min(new), 2) if new else None,
                         "answers_from_it": len(new),
                         "recommend_before": window(at - 10, at), "recommend_10s_after_publish": window(at, at + 10),
                         "recommend_later": window(at + 10, float("inf"))}
    allx = np.array(lat["recommend"] + lat["events"])
    out["all"] = {"p50_ms": round(float(np.percentile(allx, 50)), 2), "p99_ms": round(float(np.percentile(allx, 99)), 2)}
    return out


async def run_sequential(base: str, users: list, count: int, n: int, server_pid: int, seed: int) -> dict:
    """One request at a time: latency without queueing, and the server's CPU seconds per request
    (all its processes, from psutil) — the cost that decides the sustainable rate."""
    import httpx
    import psutil

    def cpu() -> float:
        procs = [psutil.Process(server_pid)] + psutil.Process(server_pid).children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    rng = np.random.default_rng(seed + 2)
    async with httpx.AsyncClient(timeout=30) as client:
        await wait_ready(client, base)
        for u in users[:20]:
            await client.post(f"{base}/recommend", json={"user_id": u, "n": n})
        lat, bad = [], 0
        c0 = cpu()
        for _ in range(count):
            t = time.perf_counter()
            r = await client.post(f"{base}/recommend", json={"user_id": users[int(rng.integers(len(users)))], "n": n})
            lat.append((time.perf_counter() - t) * 1000)
            bad += r.status_code != 200
        per = (cpu() - c0) / count * 1000
    a = np.array(lat)
    return {"requests": count, "errors": bad, "server_cpu_ms_per_recommend": round(per, 2),
            "p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--search-param", action="append", default=[], help="passed to `facetrec serve --search-param`, e.g. efSearch=2048")
    ap.add_argument("--n", type=int, default=20, help="recommendations per request")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-preload", action="store_true", help="start with an empty store (every user cold)")
    ap.add_argument("--store", default=None,
                    help="use this (already loaded) store instead of a fresh preloaded one, e.g. from --preload-only")
    ap.add_argument("--preload-only", type=Path, default=None,
                    help="only write the histories of the artifact's training data into this SQLite file, then exit")
    ap.add_argument("--sequential", type=int, default=0,
                    help="instead of the rate test: this many recommend requests one at a time (CPU cost per request)")
    ap.add_argument("--breakdown", type=int, default=0,
                    help="only: in-process CPU time of each pipeline stage over this many sampled users, no server")
    ap.add_argument("--ann-recall-users", type=int, default=0,
                    help="also measure the index's recall@100 against exact search for this many sampled users")
    ap.add_argument("--ann-only", action="store_true", help="only the recall measurement, no server")
    ap.add_argument("--reload-at", type=float, default=0.0,
                    help="serve the artifact root with --reload-every 1 and publish a copy of the current version as a "
                         "new one this many seconds into the rate test: latency before, around and after the swap")
    ap.add_argument("--reload-rollback", action="store_true",
                    help="with --reload-at: publish by pointing CURRENT at the newest other version already there "
                         "(writes no files), instead of writing a copy")
    ap.add_argument("--reload-control", action="store_true",
                    help="with --reload-at: the same run and windows, but nothing is published (the control)")
    ap.add_argument("--ef-search", type=int, nargs="*", default=None,
                    help="with --ann-recall-users on an HNSW artifact: also recall and search time at these efSearch")
    args = ap.parse_args()
    if args.rate * args.seconds > 100_000 or args.sequential > 100_000:
        raise SystemExit("refusing more than 100k requests in one run")

    from facetrec.serving.artifacts import resolve_version
    import polars as pl

    version = resolve_version(args.artifact)
    if args.ann_only:
        res = {"ann_recall": ann_recall_at(version, args.ann_recall_users or 200, 100, args.seed, args.ef_search),
               "artifact": str(version), "loadavg_1m": round(os.getloadavg()[0], 2)}
        print(json.dumps(res, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2))
        return
    if args.preload_only:
        run = Path(json.loads((version / "manifest.json").read_text())["parts"]["retrieval"]["run"])
        t0 = time.time()
        users, preloaded = preload(run, f"sqlite:///{args.preload_only}")
        print(f"{preloaded:,} events of {len(users):,} users written to {args.preload_only} in {time.time() - t0:.1f} s")
        return
    if args.breakdown:
        res = {"breakdown": breakdown(version, args.breakdown, args.n, args.seed), "artifact": str(version)}
        print(json.dumps(res, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2))
        return
    manifest = json.loads((version / "manifest.json").read_text())
    items = pl.read_parquet(version / "items.parquet")["raw_id"].to_list()
    workdir = Path(tempfile.mkdtemp(prefix="facetrec-load-"))
    store = args.store or f"sqlite:///{workdir / 'state.db'}"
    t0 = time.time()
    if args.no_preload or args.store:
        users, preloaded = [str(u) for u in pl.read_parquet(version / "users.parquet")["raw_id"].to_list()], 0
    else:
        users, preloaded = preload(Path(manifest["parts"]["retrieval"]["run"]), store)
    print(f"store {store}: {preloaded:,} events of {len(users):,} users preloaded in {time.time() - t0:.1f} s", flush=True)
    users = list(np.random.default_rng(args.seed + 1).permutation(np.array(users, dtype=object)))  # Zipf rank -> user
    fm = json.loads((version / "feature_map.json").read_text())
    if fm.get("raw_id_type") == "int":
        items = [int(i) for i in items]
        users = [int(u) for u in users]

    port = free_port()
    if args.reload_at and (args.sequential or not (args.artifact / "CURRENT").exists()):
        raise SystemExit("--reload-at needs the rate test and the artifact root (the folder with CURRENT)")
    served, extra = (args.artifact, ["--reload-every", "1"]) if args.reload_at else (version, [])
    proc = start_server(served, port, args.workers, store, workdir / "server.log", args.search_param, extra)
    load_before = os.getloadavg()
    try:
        if args.sequential:
            res = asyncio.run(run_sequential(f"http://127.0.0.1:{port}", users, args.sequential, args.n, proc.pid, args.seed))
        else:
            res = asyncio.run(run_load(f"http://127.0.0.1:{port}", users, items, args.rate, args.seconds, args.zipf,
                                       args.seed, args.n, args.reload_at, args.artifact, not args.reload_control,
                                       args.reload_rollback))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    if args.ann_recall_users:
        res["ann_recall"] = ann_recall_at(version, args.ann_recall_users, 100, args.seed)
    res.update({"search_params": args.search_param, "rate": args.rate, "seconds": args.seconds, "workers": args.workers, "n": args.n, "artifact": str(version),
                "index": manifest.get("index", {}), "top_m": manifest["parts"]["retrieval"].get("top_m"),
                "candidates": manifest["parts"].get("ranking", {}).get("candidates"),
                "ranking": manifest["parts"].get("ranking", {}).get("model"),
                "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "cpus": os.cpu_count()})
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
