"""What a trained DIEN's auxiliary scorer does (SPEC §3.2): the inner products h_t · e_b[t+1] (positive)
and h_t · ê_b[t+1] (sampled negative) on training samples, their loss, how well they separate, and
the sizes of h_t and e.

    .venv/bin/python benchmarks/aux_diagnostics.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a finished `facetrec train` run of a DIEN with the auxiliary loss (its best.pt is
loaded). Prints, over 4,096 training samples drawn with seed 0: mean ± std of the positive and
negative scores, the auxiliary loss, the pairwise AUC of positives against 2,000 negatives, the
mean |h_t| (at most sqrt(H) for a GRU state) and the mean |e|.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facetrec.data.dataset import ranking_batch, ranking_samples
from facetrec.report.runs import LoadedModel, load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--samples", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        loaded = LoadedModel(load_run(run))  # best weights, eval mode
        model, prep = loaded.model, loaded.prep
        s = ranking_samples(prep, "train")
        idx = np.random.default_rng(0).choice(len(s), min(args.samples, len(s)), replace=False)
        b = ranking_batch(prep, s, idx, prep.max_history)
        with torch.no_grad():
            h = model.interest_states(b)  # (B, T, H)
            nxt = b.hist_mask[:, 1:] & b.hist_mask[:, :-1]  # (B, T-1): t and t + 1 both real
            ht = h[:, :-1][nxt]  # (M, H)
            e_pos, e_neg = model.items(b.hist[:, 1:][nxt]), model.items(b.aux_neg[:, 1:][nxt])  # (M, D)
            pos, neg = model._aux_logit(ht, e_pos), model._aux_logit(ht, e_neg)  # (M,)
            loss = -(F.logsigmoid(pos) + F.logsigmoid(-neg)).mean()
            pair_auc = (pos[:, None] > neg[None, :2000]).float().mean()
        print(f"{run}: positive {pos.mean():.3f} ± {pos.std():.3f}  negative {neg.mean():.3f} ± {neg.std():.3f}  "
              f"aux loss {loss:.3f}  pairwise AUC {pair_auc:.3f}  |h_t| {ht.norm(dim=-1).mean():.2f} "
              f"(max {ht.shape[-1] ** 0.5:.1f})  |e| {e_pos.norm(dim=-1).mean():.3f}")


if __name__ == "__main__":
    main()
