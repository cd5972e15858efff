"""How much could MIND's interests retrieve, merged other ways than SPEC's max? (issue #3 diagnostic)

    .venv/bin/python benchmarks/retrieval_headroom.py runs/ret-sid/mind-s0 runs/ret-sid/mind-s1 \
        --baseline runs/ret-hr/youtubednn-s0 runs/ret-hr/youtubednn-s1 --out benchmarks/results/retrieval_headroom.json

For each trained MIND run, on its test users (the run's protocol, exact inner-product scores over
the whole catalogue, history items excluded, as evaluation does), Recall@50 of:
  - max:    SPEC §2.6's merge, each item scored by its best valid interest (what metrics.json
            reports; recomputed here from the ranks, and checked against the library's own
            search and metrics);
  - quota:  each of the K'_u valid interests fills 50 / K'_u of the slots with its own best items
            (round robin by rank, repeats skipped): no interest's scale can crowd out another's;
  - oracle: a target counts when ANY valid interest ranks it in its own top 50. This one knows
            the target, so no merge can reach it: it bounds what choosing, per target, the right
            interest could give with 50 slots, K'_u lists of 50 looked at;
  - max at 50 K'_u slots (K'_u = max(1, min(4, floor(log2 |I_u|))), MIND's interest count, for every
    model): the oracle looks at up to K'_u lists of 50, so this is the same budget for one ranking.
If the oracle stands far above MIND's max@50 K'_u and the baseline's, MIND's interests hold more
than the merge hands on; if it stands near them, choosing the interest cannot buy what more slots do.

With --offsets b1 b2 ...: the max merge with each interest's score raised by b * log(its share of the
routing votes) (how many behaviours chose it; unit interests under `normalize` lose that as a length),
on the valid users and the test users, so that b is chosen on valid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from facetrec.data.dataset import Prepared, history_csr, retrieval_eval_set  # noqa: E402
from facetrec.data.prepare import ensure_prepared  # noqa: E402
from facetrec.index.ann import build_index, multi_interest_search  # noqa: E402
from facetrec.train.loop import load_checkpoint  # noqa: E402
from facetrec.train.retrieval import all_item_vectors, build_mind, retrieval_metrics, user_interests  # noqa: E402
from facetrec.train.run import load_run_config  # noqa: E402

N = 50


def per_user(es, off: np.ndarray, hist_items: np.ndarray, V: np.ndarray, valid: np.ndarray, E: np.ndarray):
    """For each evaluated user u: (u, scores (K'_u, N_items) of its valid interests with its history items at
    -inf, its distinct target ids). E (N_items, D) item vectors, row i-1 = item i."""
    for u in range(len(es.users)):
        S = V[u][valid[u]] @ E.T
        S[:, hist_items[off[u]:off[u + 1]] - 1] = -np.inf
        yield u, S, np.unique(es.target_items[es.target_offsets[u]:es.target_offsets[u + 1]])


def ranks(S: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of each target under scores S (..., N_items): items scored above it, (..., T)."""
    return (S[..., None, :] > S[..., targets - 1][..., None]).sum(-1)


def quota_list(S: np.ndarray, n: int) -> np.ndarray:
    """Round robin over the valid interests' scores S (K'_u, N_items) by rank, repeats skipped, n items."""
    order = np.argsort(-S, axis=1, kind="stable")[:, : n * len(S)] + 1  # (K', n K') item ids
    out: list[int] = []
    seen: set[int] = set()
    for col in range(order.shape[1]):
        for k in range(order.shape[0]):
            i = int(order[k, col])
            if i not in seen:
                seen.add(i)
                out.append(i)
            if len(out) == n:
                return np.array(out)
    return np.array(out + [0] * (n - len(out)))


@torch.no_grad()
def vote_shares(model, prep: Prepared, users: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Each interest's share of the routing votes, (U, K): Σ_i w_ik / Σ_ik w_ik (last routing iteration)."""
    from facetrec.data.dataset import retrieval_batch

    out = []
    for lo in range(0, len(users), 1024):
        b = retrieval_batch(prep, users[lo:lo + 1024], ends[lo:lo + 1024], prep.max_history)
        w = model.route(b.hist, b.hist_mask, b.n_events).weights.sum(1)  # (B, K)
        out.append((w / w.sum(1, keepdim=True).clamp_min(1e-12)).numpy())
    return np.concatenate(out)


def offset_recall(model, prep: Prepared, E: np.ndarray, split: str, protocol: str, betas: list[float]) -> dict[str, float]:
    """Recall@50 of the max merge with offsets b * log(vote share) per interest, for each b."""
    es = retrieval_eval_set(prep, split, protocol)
    V, valid = user_interests(model, prep, es.users, es.ends, prep.max_history)
    share = vote_shares(model, prep, es.users, es.ends)
    off, hist_items = history_csr(prep, es.users, es.ends)
    hits = {b: [] for b in betas}
    for u, S, targets in per_user(es, off, hist_items, V, valid, E):
        logs = np.log(np.maximum(share[u][valid[u]], 1e-12))[:, None]
        for b in betas:
            hits[b].append(float((ranks((S + b * logs).max(0), targets) < N).mean()))
    return {str(b): float(np.mean(v)) for b, v in hits.items()}


def analyse(run: Path, betas: list[float] | None = None) -> dict:
    cfg = load_run_config(run)
    prep = Prepared(ensure_prepared(cfg, verbose=False))
    model = build_mind(cfg, prep)
    model.load_state_dict(load_checkpoint(run / "best.pt")["model"])
    model.eval()
    es = retrieval_eval_set(prep, "test", cfg.train.protocol)
    with torch.no_grad():
        E = all_item_vectors(model, prep.n_items)
    V, valid = user_interests(model, prep, es.users, es.ends, prep.max_history)
    off, hist_items = history_csr(prep, es.users, es.ends)
    # the library's own path, for the check
    index = build_index(E, np.arange(1, prep.n_items, dtype=np.int64), kind="exact")
    top, _, _ = multi_interest_search(index, V, valid, cfg.train.top_m, N, (off, hist_items))
    lib = retrieval_metrics(top, es)["recall@50"]
    rec = {"max": [], "oracle": [], "max_kslots": []}
    kprime = np.clip(np.floor(np.log2(np.maximum(es.ends, 1))).astype(np.int64), 1, 4)  # SPEC's K'_u at K = 4
    if model.cfg.pooling == "routing" and model.cfg.dynamic_k and model.cfg.n_interests == 4:
        assert (valid.sum(1) == kprime).all(), "K'_u here differs from the model's: the budget would not match"
    quota = np.zeros((len(es.users), N), dtype=np.int64)
    for u, S, targets in per_user(es, off, hist_items, V, valid, E):
        rank_max = ranks(S.max(0), targets)  # max merge: items whose best score beats the target's
        rec["max"].append(float((rank_max < N).mean()))
        rec["oracle"].append(float((ranks(S, targets).min(0) < N).mean()))  # its best interest's own rank
        rec["max_kslots"].append(float((rank_max < N * kprime[u]).mean()))
        quota[u] = quota_list(S, N)
    out = {"run": str(run), "model": cfg.model.get("name"), "users": int(len(es.users)),
           "recall@50_library": lib,
           "recall@50_max": float(np.mean(rec["max"])),
           "recall@50_quota": retrieval_metrics(quota, es)["recall@50"],
           "recall@50_oracle": float(np.mean(rec["oracle"])),
           "recall_at_50_kprime_slots": float(np.mean(rec["max_kslots"]))}
    out["by_k_prime"] = {str(k): {"users": int((kprime == k).sum()),
                                  **{name: float(np.mean(np.array(v)[kprime == k])) for name, v in rec.items()}}
                         for k in sorted(set(kprime.tolist()))}
    if betas and model.cfg.pooling == "routing":
        out["offsets"] = {split: offset_recall(model, prep, E, split, cfg.train.protocol, betas) for split in ("valid", "test")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="MIND run directories")
    ap.add_argument("--baseline", nargs="*", type=Path, default=[], help="YouTube DNN run directories (K = 1)")
    ap.add_argument("--offsets", nargs="*", type=float, default=[],
                    help="b values of the vote-share offsets b * log(share) (0 = the max merge)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    res = {"mind": [analyse(r, args.offsets) for r in args.runs], "baseline": [analyse(r) for r in args.baseline]}
    for part, rows in res.items():
        for row in rows:
            gap = row["recall@50_max"] - row["recall@50_library"]
            print(f"{part:8s} {row['run']}: library {row['recall@50_library']:.4f} (max recomputed {row['recall@50_max']:.4f}, "
                  f"{gap:+.1e})  quota {row['recall@50_quota']:.4f}  oracle {row['recall@50_oracle']:.4f}  "
                  f"max at 50 K' slots {row['recall_at_50_kprime_slots']:.4f}")
        for row in rows:
            for split, by_b in row.get("offsets", {}).items():
                print(f"         {split} Recall@50 by offset b: " + "  ".join(f"{b} {v:.4f}" for b, v in by_b.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
