"""`facetrec recommend --workers N` against one worker, alternating, on one store and one list of users.

    .venv/bin/python benchmarks/serve_load.py --artifact runs/serve-bench-ple/artifact-dien --preload-only /tmp/preload.db
    .venv/bin/python benchmarks/batch_recommend_speed.py --artifact runs/serve-bench-ple/artifact-dien \
        --store sqlite:////tmp/preload.db --users 2000 --workers 1 2 --rounds 3 --out benchmarks/results/batch_recommend_speed.json

The first `--users` user ids of the store (in its own order) are written to a file and passed as `--users`. Each
round runs `facetrec recommend` once per worker count, in a fresh process each time (so the seconds include
loading the artifact and, with N > 1, starting N spawned workers), and reads the seconds it prints. Every run's
output must list the same items per user as the one-worker run (scores to 1e-6): the speed-up is only worth
reporting for the same answers.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from envinfo import package_versions  # benchmarks/envinfo.py


def items_of(path: Path) -> list:
    return [(x["user_id"], [i["item_id"] for i in x["items"]]) for x in map(json.loads, path.read_text().splitlines())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--store", required=True, help="sqlite:///PATH (the store the users are read from)")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not args.store.startswith("sqlite:///"):
        raise SystemExit("--store: give sqlite:///PATH (the user list is read from its events table)")
    db = sqlite3.connect(args.store[len("sqlite:///"):])
    users = [r[0] for r in db.execute("SELECT DISTINCT user FROM events LIMIT ?", (args.users,))]
    db.close()
    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "users.txt"
        ids.write_text("\n".join(users) + "\n")
        reference = None
        for r in range(args.rounds):
            for w in args.workers:
                out = Path(tmp) / f"recs-{w}.jsonl"
                p = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(args.artifact), "--store", args.store,
                                    "--out", str(out), "--users", str(ids), "--n", str(args.n), "--workers", str(w)],
                                   capture_output=True, text=True, check=True)
                s = float(re.search(r" in ([0-9.]+) s", p.stdout).group(1))
                seconds[w].append(s)
                got = items_of(out)
                if reference is None:
                    reference = got
                elif got != reference:
                    raise SystemExit(f"--workers {w} wrote other items than the first run: not the same answers")
                print(f"round {r} workers {w}: {s:.2f} s ({len(users) / s:.0f} users/s)", flush=True)
    base = args.workers[0]
    result = {
        "artifact": str(args.artifact), "users": len(users), "n": args.n, "rounds": args.rounds,
        "seconds": seconds,
        "median_seconds": {w: statistics.median(v) for w, v in seconds.items()},
        "speedup_vs_first": {w: round(statistics.median(seconds[base]) / statistics.median(v), 2) for w, v in seconds.items()},
        "same_items_every_run": True,
        "environment": package_versions(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
