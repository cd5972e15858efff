#!/usr/bin/env bash
# The demo, end to end: data -> prepare -> train MIND and DIEN (briefly) -> export -> serve ->
# events and recommendations over HTTP -> explanations -> stop the server.
# Uses amazon-beauty when ../shared/data (or $FACETREC_DATA) has it, a synthetic log otherwise.
# Outputs go to runs/demo/. A few minutes on 2 CPU cores; set DEMO_STEPS to train longer.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${FACETREC_DATA:-../shared/data}"
OUT=runs/demo
STEPS="${DEMO_STEPS:-200}"
TRAIN=(--quiet --set train.epochs=1 --set "train.max_steps=$STEPS" --set train.device=cpu)

if [ -f "$DATA/amazon-beauty/interactions.tsv" ]; then
  echo "== data: amazon-beauty from $DATA"
  CONFIG=configs/amazon-beauty.yaml
  MIND=(configs/amazon-beauty/mind.yaml --set "data.root=$DATA/amazon-beauty")
  DIEN=(configs/amazon-beauty/dien.yaml --set "data.root=$DATA/amazon-beauty")
  PREP=(--set "data.root=$DATA/amazon-beauty")
else
  echo "== data: $DATA/amazon-beauty not found; generating a synthetic log"
  facetrec synth runs/synthetic-data --users 3000 --items 4000
  CONFIG=configs/synthetic.yaml
  MIND=(configs/synthetic.yaml --set model.name=mind --set model.dim=32 --set model.n_interests=4 --set train.n_negatives=500)
  DIEN=(configs/synthetic.yaml --set model.name=dien --set model.embed_dim=16)
  PREP=()
fi

echo "== prepare $CONFIG -> $OUT/prepared/summary.json"
facetrec prepare "$CONFIG" "${PREP[@]}" --set "run.dir=$OUT/prepared"

# fresh runs each time (a run dir with last.pt would be resumed)
rm -rf "$OUT/mind" "$OUT/dien" "$OUT/artifact" "$OUT/state.db" "$OUT/state.db-wal" "$OUT/state.db-shm"
echo "== train MIND ($STEPS steps) -> $OUT/mind"
facetrec train "${MIND[@]}" "${TRAIN[@]}" --set train.max_eval_users=2000 --set "run.dir=$OUT/mind"
echo "== train DIEN ($STEPS steps) -> $OUT/dien"
facetrec train "${DIEN[@]}" "${TRAIN[@]}" --set "run.dir=$OUT/dien"

echo "== export -> $OUT/artifact"
facetrec export --retrieval "$OUT/mind" --ranking "$OUT/dien" --out "$OUT/artifact"

PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== serve on 127.0.0.1:$PORT (store sqlite:///$OUT/state.db)"
facetrec serve "$OUT/artifact" --store "sqlite:///$OUT/state.db" --port "$PORT" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

python - "$PORT" "$OUT/artifact" <<'EOF'
"""Send a few users' events to the server, then ask for their recommendations and print why."""
import sys
import time

import httpx
import polars as pl

from facetrec.serving.artifacts import resolve_version

port, artifact = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
version = resolve_version(artifact)
for _ in range(600):
    try:
        if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
else:
    sys.exit(f"the server did not become ready; see {artifact}/../server.log")

# a few test-split users: their histories come from the prepared log, sent as events
prepared = version.parent.parent / "prepared"
events = pl.read_parquet(prepared / "events.parquet")
users = pl.read_parquet(prepared / "users.parquet")
items = pl.read_parquet(version / "items.parquet")
raw_item = dict(zip(items["id"].to_list(), items["raw_id"].to_list()))
raw_user = dict(zip(users["id"].to_list(), users["raw_id"].to_list()))
picked = users.filter((pl.col("split") == "test") & (pl.col("n_events") >= 12)).head(3)["id"].to_list()
batch = []
for u in picked:
    rows = events.filter(pl.col("user") == u)  # already in time order (prepare sorts stably)
    for k, (item, ts) in enumerate(zip(rows["item"].to_list(), rows["time"].to_list())):
        batch.append({"event_id": f"demo-{u}-{k}", "user_id": raw_user[u], "item_id": raw_item[item], "timestamp": int(ts)})
fm_int = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]["EventIn"]["properties"]["item_id"]["type"] == "integer"
if fm_int:
    batch = [{**e, "user_id": int(e["user_id"]), "item_id": int(e["item_id"])} for e in batch]
r = httpx.post(f"{base}/events", json={"events": batch}, timeout=30)
print(f"POST /events ({len(batch)} events of {len(picked)} users) -> {r.status_code} {r.json()}")
again = httpx.post(f"{base}/events", json={"events": batch[:2]}, timeout=30)
print(f"POST /events (2 repeated ids)                       -> {again.status_code} {again.json()}")

for u in picked:
    uid = int(raw_user[u]) if fm_int else raw_user[u]
    rec = httpx.post(f"{base}/recommend", json={"user_id": uid, "n": 5}, timeout=30).json()
    interests = httpx.get(f"{base}/users/{uid}/interests", timeout=30).json()
    print(f"\nuser {uid}: {interests['history_length']} events, {len(interests['interests'])} interests ({rec['path']})")
    for it in interests["interests"]:
        print(f"  interest {it['index']} (strength {it['strength']:.3f}) <- {it['behaviours']}")
    for k, item in enumerate(rec["items"], 1):
        print(f"  {k}. {item['item_id']}  p(click) {item['score']:.3f}  via interest {item['interest']}"
              f"  because you interacted with {item['because']}")
    item = rec["items"][0]["item_id"]
    like = httpx.get(f"{base}/items/{item}/similar", params={"n": 3}, timeout=30).json()
    print(f"  more like {item}: {[x['item_id'] for x in like['items']]}")
    kept_out = httpx.post(f"{base}/recommend", json={"user_id": uid, "n": 5, "exclude": [item]}, timeout=30).json()
    print(f"  with {item} excluded (already in the basket): {[x['item_id'] for x in kept_out['items']]}")
cold = httpx.post(f"{base}/recommend", json={"user_id": "new-user" if not fm_int else 10**15, "n": 3}, timeout=30).json()
print(f"\nan unknown user -> {cold['path']}: {[i['item_id'] for i in cold['items']]}")
bad = httpx.post(f"{base}/recommend", json={"history": ["no-such-item"] if not fm_int else [10**15]}, timeout=30)
print(f"a history with an unknown item -> {bad.status_code} {bad.json()['error']}")
EOF

echo "== stop the server"
kill "$SERVER"
wait "$SERVER" 2>/dev/null || true
trap - EXIT

echo "== offline: what the server would answer every stored user -> $OUT/recs.jsonl"
facetrec recommend "$OUT/artifact" --store "sqlite:///$OUT/state.db" --out "$OUT/recs.jsonl" --n 10 --workers 2
echo "== the events it received -> $OUT/served.tsv (for retraining: --set 'data.extra_events=[$OUT/served.tsv]')"
facetrec dump-events --store "sqlite:///$OUT/state.db" --out "$OUT/served.tsv"

# ===================================================================================
# ISSUE 8 — the report: figures + one self-contained HTML page about the demo's runs
# ===================================================================================
echo "== report -> $OUT/report"
facetrec report "$OUT/mind" "$OUT/dien" --out "$OUT/report"
echo "open $(pwd)/$OUT/report/index.html"
