"""MIND's training step under `train.negative_scores: max` on real data: each negative scored by the
user's best valid interest, computed two ways, timed side by side in one process.

    .venv/bin/python benchmarks/max_scores_speed.py                       # configs/amazon-beauty/mind.yaml
    .venv/bin/python benchmarks/max_scores_speed.py --config configs/amazon-beauty/mind.yaml --out /tmp/max.json

- grouped (the CPU default, `facetrec.models.losses.BestInterestScores`): users grouped by their
  number of valid interests K'_u, each group's valid slots alone multiplied with the negatives;
- dense (the GPU path): all K slots multiplied, the invalid ones masked to -inf, max over K.

The step is the config's own: the batches `facetrec train` draws (`retrieval_task`: the config's
protocol, batch size, shared negatives, in-batch negatives, the L2 term), forward, loss, backward,
the training loop's Adam (`make_optimizer`: the fused kernel) and weight-average update, on one
model whose weights both ways update in turn. Windows alternate grouped /
dense (`timing.interleaved`), so both see the machine's load alike; best and median samples/s and
the median ratio of adjacent windows are printed, with the batches' K'_u histogram (the saving is
the share of invalid slots).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from envinfo import package_versions  # benchmarks/envinfo.py
from timing import interleaved, training_step  # benchmarks/timing.py

from facetrec.config import load_config
from facetrec.data.dataset import Prepared
from facetrec.data.prepare import ensure_prepared
from facetrec.models.losses import BestInterestScores
from facetrec.models.mind import interest_count
from facetrec.train.retrieval import build_mind, retrieval_task

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "amazon-beauty" / "mind.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. train.batch_size=512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40, help="distinct batches of the first epoch, cycled")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed window")
    ap.add_argument("--repeats", type=int, default=8, help="timed windows per way, interleaved")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    cfg = load_config(args.config, [*args.overrides, "run.dir=/tmp/facetrec-max-scores-speed"])
    if cfg.train.negative_scores != "max":
        raise SystemExit(f"{args.config}: train.negative_scores is {cfg.train.negative_scores!r}; this benchmark times 'max' "
                         "(add --set train.negative_scores=max)")
    torch.set_num_threads(args.threads)
    prep = Prepared(ensure_prepared(cfg, verbose=True))
    torch.manual_seed(cfg.train.seed)
    model = build_mind(cfg, prep).train()
    task = retrieval_task(cfg, prep, model)
    batches = list(islice(task.batches(cfg.train.seed), args.batches))
    k_u = torch.cat([interest_count(b.batch.n_events, model.cfg.n_interests, model.cfg.dynamic_k) for b in batches])
    hist = {int(k): int(n) for k, n in zip(*np.unique(k_u.numpy(), return_counts=True))}
    share = float(k_u.float().mean()) / model.cfg.n_interests
    print(f"{args.config}: B={cfg.train.batch_size} N={cfg.train.n_negatives} in-batch={cfg.train.in_batch_negatives} "
          f"K={model.cfg.n_interests} D={model.cfg.dim}, {args.threads} threads; K'_u over {len(batches)} batches: {hist} "
          f"(valid slots {share:.0%} of K)")
    def loss_of(i: int) -> torch.Tensor:
        return task.loss(batches[i % len(batches)])[0]

    step = training_step(model, loss_of, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, ema=cfg.train.ema)  # as `facetrec train`

    def way(grouped: bool):
        def run(i: int) -> None:  # one model, one optimizer: the two ways update the same weights in turn
            BestInterestScores.cpu_grouped = grouped
            step(i)
        return run

    rates = interleaved({"grouped": way(True), "dense": way(False)}, cfg.train.batch_size, args.warmup, args.steps, args.repeats)
    BestInterestScores.cpu_grouped = True
    ratios = [g / d for g, d in zip(rates["grouped"], rates["dense"])]
    for name, r in rates.items():
        print(f"{name:8s} samples/s best {max(r):8.0f}  median {statistics.median(r):8.0f}")
    print(f"grouped / dense, median of adjacent windows: {statistics.median(ratios):.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "k_u": hist, "valid_share": share, "rates": rates,
                                              "ratio_median": statistics.median(ratios), "loadavg": os.getloadavg(),
                                              "environment": package_versions()}, indent=1))


if __name__ == "__main__":
    main()
