"""`facetrec recommend`: recommendations for many users at once, offline (a campaign, a nightly cache).

    facetrec recommend artifacts/amazon-beauty --store sqlite:///runs/state.db --out recs.jsonl [--users ids.txt] [--n 20] [--workers 4]

Each user's history comes from the store exactly as `POST /recommend {"user_id": ...}` reads it
(`stored_history`: the most recent STORE_READ events, items a newer catalogue dropped skipped, the
full event count for K'_u), so a line of the output is what the service would answer that user.
Without `--users` every user with a stored event is written. One JSON object per line:
{"user_id", "path", "items": [{"item_id", "score", "interest"}]}; the file is written to a temp
name and renamed, so a crash leaves no half file. `--workers N` answers the users in N processes
(one model thread each); the lines come out in the same order, with the same items, as with one
(scores to float rounding: the workers' one thread may sum in another order).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from facetrec.serving.pipeline import STORE_READ, Pipeline, one_model_thread, stored_history
from facetrec.serving.store import UserStore


def _histories(store: UserStore, users: Iterable[str] | None) -> Iterator[tuple[str, list[str], int]]:
    """(user, most recent STORE_READ items, event count) for the listed users, or every stored user."""
    if users is not None:
        for u in users:
            yield u, [item for item, _ in store.history(u, STORE_READ)], store.count(u)
        return
    cur: str | None = None
    items: list[str] = []
    for u, item, _ in store.events():  # one user's events come together
        if u != cur:
            if cur is not None:
                yield cur, items[-STORE_READ:], len(items)
            cur, items = u, []
        items.append(item)
    if cur is not None:
        yield cur, items[-STORE_READ:], len(items)


def _line(pipeline: Pipeline, u: str, items: list[str], count: int, n: int) -> tuple[str, str]:
    """One user's output line (JSON) and path, as POST /recommend would answer."""
    raw = int(u) if pipeline.raw_int and u.lstrip("-").isdigit() else u
    hist, n_events = stored_history(pipeline, items, count)
    recs = pipeline.recommend(hist, n, n_events=n_events, user=raw)
    path = "personal" if len(hist) else "cold_start"
    line = {"user_id": raw, "path": path,
            "items": [{"item_id": r.item, "score": r.score, "interest": r.interest} for r in recs]}
    return json.dumps(line) + "\n", path


_worker: dict[str, Any] = {}


def _start_worker(version_dir: str, device: str) -> None:
    """A worker process: one model thread (the processes are the parallelism), its own loaded version."""
    one_model_thread()
    _worker["pipeline"] = Pipeline(version_dir, device=device)


def _answer_chunk(chunk: list[tuple[str, list[str], int]], n: int) -> list[tuple[str, str]]:
    p = _worker["pipeline"]
    return [_line(p, u, items, count, n) for u, items, count in chunk]


def _chunks(rows: Iterator[tuple[str, list[str], int]], size: int) -> Iterator[list[tuple[str, list[str], int]]]:
    chunk: list[tuple[str, list[str], int]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def batch_recommend(pipeline: Pipeline, store: UserStore, out: str | Path, n: int = 20,
                    users: Iterable[str] | None = None, progress: bool = True, workers: int = 1,
                    chunk: int = 64) -> dict[str, Any]:
    """Write n recommendations per user to `out` (JSON lines, in the order the users are read);
    returns counts and seconds.

    workers > 1: that many processes (spawned, one model thread each) answer chunks of `chunk` users,
    each from its own copy of the pipeline's version directory (the version this pipeline loaded, even
    if CURRENT moves meanwhile); this process reads the store and writes the lines in order, keeping
    at most 4 chunks per worker in flight.
    """
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm import tqdm

    from facetrec.io import atomic_write

    if workers < 1:
        raise ValueError(f"workers {workers} must be >= 1")
    stats = {"users": 0, "personal": 0, "cold_start": 0}
    t0 = time.perf_counter()

    def write(f) -> None:
        bar = tqdm(desc="users", unit="user", disable=not progress, total=len(users) if isinstance(users, list) else None)

        def put(lines: list[tuple[str, str]]) -> None:
            for text, path in lines:
                f.write(text.encode())
                stats["users"] += 1
                stats[path] += 1
            bar.update(len(lines))

        rows = _histories(store, users)
        if workers == 1:
            for u, items, count in rows:
                put([_line(pipeline, u, items, count, n)])
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                     initargs=(str(pipeline.version_dir), str(pipeline.device))) as pool:
                pending: deque = deque()
                for c in _chunks(rows, chunk):
                    pending.append(pool.submit(_answer_chunk, c, n))
                    if len(pending) >= 4 * workers:
                        put(pending.popleft().result())
                while pending:
                    put(pending.popleft().result())
        bar.close()

    atomic_write(out, write)
    return {**stats, "seconds": round(time.perf_counter() - t0, 2)}
