#!/usr/bin/env bash
# The demo: data -> prepare -> summary. Uses amazon-beauty when ../shared/data is present,
# a synthetic log otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${FACETREC_DATA:-../shared/data}"
if [ -f "$DATA/amazon-beauty/interactions.tsv" ]; then
  CONFIG=configs/amazon-beauty.yaml
  echo "== data: amazon-beauty from $DATA"
else
  echo "== data: $DATA/amazon-beauty not found; generating a synthetic log"
  facetrec synth runs/synthetic-data --users 3000 --items 4000
  CONFIG=configs/synthetic.yaml
fi
echo "== prepare $CONFIG"
facetrec prepare "$CONFIG" --set run.dir=runs/demo/prepared
echo "== summary: runs/demo/prepared/summary.json"
