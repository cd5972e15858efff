"""`facetrec recommend`: recommendations for many users at once, offline (a campaign, a nightly cache).

    facetrec recommend artifacts/amazon-beauty --store sqlite:///runs/state.db --out recs.jsonl [--users ids.txt] [--n 20]

Each user's history comes from the store exactly as `POST /recommend {"user_id": ...}` reads it
(`stored_history`: the most recent STORE_READ events, items a newer catalogue dropped skipped, the
full event count for K'_u), so a line of the output is what the service would answer that user.
Without `--users` every user with a stored event is written. One JSON object per line:
{"user_id", "path", "items": [{"item_id", "score", "interest"}]}; the file is written to a temp
name and renamed, so a crash leaves no half file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from facetrec.serving.pipeline import STORE_READ, Pipeline, stored_history
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


def batch_recommend(pipeline: Pipeline, store: UserStore, out: str | Path, n: int = 20,
                    users: Iterable[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Write n recommendations per user to `out` (JSON lines); returns counts and seconds."""
    from tqdm import tqdm

    from facetrec.io import atomic_write

    stats = {"users": 0, "personal": 0, "cold_start": 0}
    t0 = time.perf_counter()

    def raw_user(u: str) -> Any:
        return int(u) if pipeline.raw_int and u.lstrip("-").isdigit() else u

    def write(f) -> None:
        for u, items, count in tqdm(_histories(store, users), desc="users", unit="user", disable=not progress):
            hist, n_events = stored_history(pipeline, items, count)
            recs = pipeline.recommend(hist, n, n_events=n_events, user=raw_user(u))
            path = "personal" if len(hist) else "cold_start"
            stats["users"] += 1
            stats[path] += 1
            line = {"user_id": raw_user(u), "path": path,
                    "items": [{"item_id": r.item, "score": r.score, "interest": r.interest} for r in recs]}
            f.write((json.dumps(line) + "\n").encode())

    atomic_write(out, write)
    return {**stats, "seconds": round(time.perf_counter() - t0, 2)}
