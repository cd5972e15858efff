"""The SQLite store's per-user event count: COUNT(*) over the user's index entries against the counter table
that the append transaction keeps (`SQLiteStore.count`), and what the counter costs an append.

    .venv/bin/python benchmarks/store_count.py --out benchmarks/results/store_count.json

Every `POST /recommend {"user_id"}` reads the user's event count (K'_u, the activity buckets) with the store's
lock held. One user's history grows to each of `--sizes` events (batches of 50,000 appends); at each size
both queries are timed on the same file, `--repeats` times each, alternating, for that heavy user and for a
user with 10 events. Then `--appends` single-event appends (the usual /events request, each its own durable
commit), alternating between the store (events + counter upsert) and the bare INSERT the store did before
the counter, on two files in the same directory.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from envinfo import package_versions  # benchmarks/envinfo.py

from facetrec.serving.store import Event, SQLiteStore


def timed(f, repeats: int) -> float:
    """Median ms of `repeats` calls."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--appends", type=int, default=500)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        s = SQLiteStore(Path(tmp) / "state.db")
        s.append([Event(f"light-{i}", "light", str(i), 1000 + i) for i in range(10)])
        have = 0
        for size in sorted(args.sizes):
            for lo in range(have, size, 50_000):
                s.append([Event(f"h{i}", "heavy", str(i % 5000), 1000 + i) for i in range(lo, min(size, lo + 50_000))])
            have = size
            for user in ("heavy", "light"):
                def count_star() -> int:
                    with s._lock:
                        return int(s._db.execute("SELECT COUNT(*) FROM events WHERE user = ?", (user,)).fetchone()[0])

                assert count_star() == s.count(user)
                star, counter = [], []
                for _ in range(3):  # alternate the two, a third of the repeats each time
                    star.append(timed(count_star, max(1, args.repeats // 3)))
                    counter.append(timed(lambda: s.count(user), max(1, args.repeats // 3)))
                rows.append({"user_events": s.count(user), "user": user, "count_star_ms": round(statistics.median(star), 4),
                             "counter_ms": round(statistics.median(counter), 4)})
                print(rows[-1], flush=True)
        s.close()

        store = SQLiteStore(Path(tmp) / "a.db")
        bare = sqlite3.connect(str(Path(tmp) / "b.db"), isolation_level=None)
        bare.execute("PRAGMA journal_mode=WAL")
        bare.execute("PRAGMA synchronous=FULL")
        bare.executescript("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, "
                           "user TEXT NOT NULL, item TEXT NOT NULL, ts INTEGER NOT NULL); "
                           "CREATE INDEX events_user ON events (user, seq);")

        def bare_append(e: Event) -> None:
            bare.execute("BEGIN IMMEDIATE")
            bare.execute("INSERT OR IGNORE INTO events (event_id, user, item, ts) VALUES (?, ?, ?, ?)",
                         (e.event_id, e.user, e.item, e.ts))
            bare.execute("COMMIT")

        with_counter, without = [], []
        for i in range(args.appends):
            e = Event(f"e{i}", f"u{i % 100}", str(i), 1000 + i)
            for fn, sink in ((lambda: store.append([e]), with_counter), (lambda: bare_append(e), without)):
                t = time.perf_counter()
                fn()
                sink.append((time.perf_counter() - t) * 1000)
        store.close()
        bare.close()
    appends = {"with_counter_ms_median": round(statistics.median(with_counter), 4),
               "without_counter_ms_median": round(statistics.median(without), 4), "appends": args.appends}
    print(appends)
    if args.out:
        args.out.write_text(json.dumps({"count": rows, "single_event_append": appends, "environment": package_versions()}, indent=2))


if __name__ == "__main__":
    main()
