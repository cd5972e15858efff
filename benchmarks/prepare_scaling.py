"""Time and peak RSS of `facetrec prepare` on synthetic logs of growing size.

    .venv/bin/python benchmarks/prepare_scaling.py --sizes 0.2 2 20 --out benchmarks/results/prepare_scaling.json

Each size runs synth (not timed) then prepare in a fresh Python process, whose own
peak RSS (getrusage) is reported. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from facetrec.config import load_config
from facetrec.data.prepare import prepare
t = time.perf_counter()
s = prepare(load_config(sys.argv[1], sys.argv[2:]), verbose=False)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "events_in": s["before"]["events"], "events_out": s["after"]["events"], "users": s["after"]["users"],
                  "items": s["after"]["items"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.2, 2, 20], help="millions of events")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="facetrec-scaling-"))
    rows = []
    for m in args.sizes:
        events = int(m * 1e6)
        users = max(1000, events // 28)  # synth draws 10-60 events per user log-uniformly: ~28 on average
        items = max(2000, events // 100)
        raw = work / f"raw-{m}M"
        if not (raw / "synth.json").exists():
            subprocess.run([sys.executable, "-m", "facetrec", "synth", str(raw), "--users", str(users), "--items", str(items),
                            "--categories", "500", "--seed", "0"], check=True)
        out = subprocess.run([sys.executable, "-c", CHILD, str(root / "configs" / "synthetic.yaml"), f"data.root={raw}",
                              f"run.dir={work / f'prep-{m}M'}"], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["size_m"] = m
        rows.append(r)
        print(f"{m}M: {r}", flush=True)
    print("\n| events in | events after k-core | users | items | prepare seconds | peak RSS (MiB) | µs / event |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['events_in']:,} | {r['events_out']:,} | {r['users']:,} | {r['items']:,} | {r['seconds']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {1e6 * r['seconds'] / r['events_in']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
