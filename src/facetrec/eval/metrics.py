"""Evaluation metrics, vectorised with numpy.

Top-N (retrieval), per user then averaged, binary relevance:
  Recall@k = |top-k ∩ targets| / |targets|
  HR@k     = 1 if top-k ∩ targets is non-empty
  NDCG@k   = DCG / IDCG, DCG = Σ_{hits at rank r (0-based)} 1 / log2(r + 2), IDCG over min(|targets|, k) hits
Users with no targets are skipped.

Ranking (CTR): AUC (ties count one half, as sklearn), GAUC (per-user AUC weighted by the user's
samples; users with one class skipped), logloss. `bucket_of` labels users by activity.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _hits(ranked: np.ndarray, target_offsets: np.ndarray, target_items: np.ndarray) -> np.ndarray:
    """(U, N) bool: ranked[u, r] is one of user u's targets (0 = empty slot, never a hit)."""
    u_count = len(target_offsets) - 1
    if ranked.shape[0] != u_count:
        raise ValueError(f"ranked has {ranked.shape[0]} rows but target_offsets describes {u_count} users")
    n_t = np.diff(target_offsets)
    owner = np.repeat(np.arange(u_count, dtype=np.int64), n_t)
    shift = np.int64(1) << np.int64(40)
    keys_t = np.unique(owner * shift + target_items.astype(np.int64))
    keys_r = np.arange(u_count, dtype=np.int64)[:, None] * shift + ranked.astype(np.int64)
    return np.isin(keys_r, keys_t) & (ranked > 0)


def topn_metrics(ranked: np.ndarray, target_offsets: np.ndarray, target_items: np.ndarray,
                 ks: Sequence[int] = (20, 50), per_user: bool = False) -> dict[str, float] | dict[str, np.ndarray]:
    """Recall@k, NDCG@k, HR@k for each k.

    Args:
        ranked: (U, N) item ids, best first; 0 marks an empty slot.
        target_offsets: (U+1,) user u's targets are target_items[off[u]:off[u+1]].
        target_items: the targets, concatenated.
        ks: cut-offs (each <= N).
        per_user: return per-user arrays (for users with targets) instead of means.

    Example:
        >>> topn_metrics(np.array([[3, 1, 2]]), np.array([0, 2]), np.array([1, 9]), ks=(2,))["recall@2"]
        0.5
    """
    ranked = np.asarray(ranked)
    if max(ks) > ranked.shape[1]:
        raise ValueError(f"k = {max(ks)} is larger than the {ranked.shape[1]} ranked items per user")
    hits = _hits(ranked, np.asarray(target_offsets), np.asarray(target_items))
    n_t = np.diff(target_offsets)
    has = n_t > 0
    disc = 1.0 / np.log2(np.arange(ranked.shape[1]) + 2.0)
    out = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(1)
        dcg = (h * disc[:k]).sum(1)
        ideal_n = np.minimum(n_t, k)
        idcg = np.cumsum(disc[:k])[np.maximum(ideal_n - 1, 0)]
        per = {
            f"recall@{k}": n_hit[has] / n_t[has],
            f"ndcg@{k}": dcg[has] / idcg[has],
            f"hr@{k}": (n_hit[has] > 0).astype(np.float64),
        }
        out.update(per)
    if per_user:
        return out
    return {k: float(v.mean()) if len(v) else float("nan") for k, v in out.items()}


def _rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.concatenate([[True], xs[1:] != xs[:-1], [True]])
    starts = np.nonzero(boundaries)[0]
    avg = (starts[:-1] + starts[1:] + 1) / 2.0  # mean of ranks start+1 .. end
    sizes = np.diff(starts)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, sizes)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction). NaN with one class only."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rank_average(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ_u n_u · AUC_u / Σ_u n_u over users that have both classes (vectorised over users)."""
    users = np.asarray(users)
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if len(users) == 0:
        return float("nan")
    # rank scores within each user: sort by (user, score), average ties within (user, score) groups
    order = np.lexsort((s, users))
    u, ss, yy = users[order], s[order], y[order]
    new_user = np.concatenate([[True], u[1:] != u[:-1]])
    new_group = new_user | np.concatenate([[True], ss[1:] != ss[:-1]])
    g_start = np.nonzero(new_group)[0]
    g_end = np.concatenate([g_start[1:], [len(u)]])
    u_start_idx = np.nonzero(new_user)[0]
    pos_in_user_start = np.repeat(u_start_idx, np.diff(np.concatenate([u_start_idx, [len(u)]])))
    # average within-user 1-based rank of each tie group
    avg = ((g_start - pos_in_user_start[g_start]) + (g_end - pos_in_user_start[g_start]) + 1) / 2.0
    ranks = np.repeat(avg, g_end - g_start)
    uid = np.cumsum(new_user) - 1
    n_users = uid[-1] + 1
    n = np.bincount(uid, minlength=n_users).astype(np.float64)
    n_pos = np.bincount(uid, weights=yy, minlength=n_users)
    n_neg = n - n_pos
    r_pos = np.bincount(uid, weights=ranks * yy, minlength=n_users)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per = (r_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float((per * n[ok]).sum() / n[ok].sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def bucket_of(n_events: np.ndarray, edges: Sequence[int] = (5, 20)) -> np.ndarray:
    """Activity bucket labels: edges (5, 20) -> '<=5', '6-20', '>20'."""
    labels = [f"<={edges[0]}"] + [f"{a + 1}-{b}" for a, b in zip(edges[:-1], edges[1:])] + [f">{edges[-1]}"]
    idx = np.searchsorted(np.asarray(edges), np.asarray(n_events), side="left")
    return np.asarray(labels, dtype=object)[idx]


def topn_by_bucket(ranked: np.ndarray, target_offsets: np.ndarray, target_items: np.ndarray, n_events: np.ndarray,
                   ks: Sequence[int] = (20, 50), edges: Sequence[int] = (5, 20)) -> dict[str, dict[str, float]]:
    """Top-N metrics per user-activity bucket (n_events: each user's history size)."""
    per = topn_metrics(ranked, target_offsets, target_items, ks, per_user=True)
    has = np.diff(target_offsets) > 0
    b = bucket_of(np.asarray(n_events)[has], edges)
    out = {}
    for label in dict.fromkeys(b.tolist()):
        m = b == label
        out[label] = {k: float(v[m].mean()) for k, v in per.items()} | {"users": int(m.sum())}
    return out
