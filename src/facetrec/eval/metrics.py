"""Evaluation metrics, vectorised over users: top-N retrieval (Recall / NDCG / HR @k), ranking
(AUC, GAUC, logloss), and the same metrics split by user-activity bucket (SPEC §4.3).

Conventions used throughout:
  - item id 0 is padding: a 0 (or any id <= 0) in a ranked list is an empty slot, never a hit;
  - relevance is binary and a user's targets are a *set* (an item bought twice in the target
    window counts once), so Recall@k <= 1;
  - a user with no targets has no defined recall/NDCG; top-N metrics skip them (NaN per user);
  - AUC ties are scored 1/2, exactly as scikit-learn's `roc_auc_score` (average ranks).

Shape legend: `U` users, `N` ranked slots per user, `S` samples, `T` targets in total.

    >>> import numpy as np
    >>> ranked = np.array([[3, 7, 0], [5, 1, 2]])      # user 0 has one empty slot
    >>> off, tgt = np.array([0, 1, 3]), np.array([7, 2, 9])
    >>> topn_metrics(ranked, off, tgt, ks=(2,))["hr@2"]
    0.5
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "topn_per_user",
    "topn_metrics",
    "topn_mean",
    "topn_by_bucket",
    "auc",
    "gauc",
    "logloss",
    "bucket_labels",
    "bucket_of",
    "ranking_by_bucket",
]

_SHIFT = np.int64(1 << 32)  # row * 2**32 + item: one int64 key per (user, item); item ids stay below 2**32


# --------------------------------------------------------------------------- top-N


def _check_csr(offsets: np.ndarray, items: np.ndarray, n_rows: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.asarray(offsets, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) != n_rows + 1:
        raise ValueError(f"{name} offsets must have shape ({n_rows + 1},) = rows + 1, got {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(items) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{name} offsets must start at 0, never decrease and end at len(items)={len(items)}; "
                         f"got first={offsets[0]}, last={offsets[-1]}")
    return offsets, items


def _row_keys(offsets: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Sorted unique int64 keys row * 2**32 + item of a CSR (padding items <= 0 dropped)."""
    owner = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    keep = items > 0
    return np.unique(owner[keep] * _SHIFT + items[keep])


def _in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Elementwise membership of `keys` in the sorted array `sorted_keys` (faster than np.isin here)."""
    if len(sorted_keys) == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.searchsorted(sorted_keys, keys)
    return sorted_keys[np.minimum(pos, len(sorted_keys) - 1)] == keys


def _first_occurrence(ranked: np.ndarray) -> np.ndarray:
    """(U, N) bool: True where the id appears for the first time in its row (repeats never score twice)."""
    order = np.argsort(ranked, axis=1, kind="stable")
    s = np.take_along_axis(ranked, order, axis=1)
    first_sorted = np.ones_like(s, dtype=bool)
    first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    return first


def topn_per_user(ranked: np.ndarray, target_offsets: np.ndarray, target_items: np.ndarray,
                  ks: Sequence[int] = (20, 50)) -> dict[str, np.ndarray]:
    """Recall / NDCG / HR @k for every user, so callers can average or bucket them.

    Binary relevance against the user's target *set*:
      Recall@k = |top-k ∩ T_u| / |T_u|;  HR@k = 1 if any hit;
      NDCG@k = Σ_{hit at rank r < k} 1/log2(r+2)  /  Σ_{r < min(|T_u|, k)} 1/log2(r+2).
    Slots with id <= 0 are empty; a repeated id in a row counts once (at its first rank).
    When `ranked` has fewer than k columns the missing slots count as empty.

    Args:
        ranked: (U, N) int item ids, best first; 0 = empty slot.
        target_offsets: (U+1,) CSR offsets into `target_items`.
        target_items: (T,) target item ids of all users, concatenated.
        ks: cut-offs.

    Returns:
        {"recall@k", "ndcg@k", "hr@k"} -> (U,) float64, NaN for users with no targets;
        plus "n_targets" -> (U,) int64 (size of each target set).

    Example:
        >>> import numpy as np
        >>> m = topn_per_user(np.array([[4, 2, 9]]), np.array([0, 2]), np.array([2, 5]), ks=(3,))
        >>> float(m["recall@3"][0]), float(m["hr@3"][0])
        (0.5, 1.0)
    """
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a 2-D (users, slots) array of item ids, got shape {ranked.shape}")
    if not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must hold integer item ids, got dtype {ranked.dtype}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs like (20, 50), got {ks}")
    n_users = ranked.shape[0]
    offsets, items = _check_csr(target_offsets, target_items, n_users, "target")

    tkeys = _row_keys(offsets, items)  # (T',) unique, sorted
    n_targets = np.bincount(tkeys // _SHIFT, minlength=n_users).astype(np.int64)  # (U,)

    width = min(ranked.shape[1], max(ks))
    top = ranked[:, :width].astype(np.int64)  # (U, W)
    keys = np.arange(n_users, dtype=np.int64)[:, None] * _SHIFT + top
    hit = (top > 0) & _in_sorted(keys, tkeys) & _first_occurrence(top)  # (U, W)

    discount = 1.0 / np.log2(np.arange(max(ks), dtype=np.float64) + 2.0)  # (maxk,)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])  # ideal[j] = IDCG with j relevant slots
    has = n_targets > 0
    denom = np.where(has, n_targets, 1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hit[:, :k]
        n_hit = h.sum(axis=1)
        dcg = h @ discount[: h.shape[1]]
        idcg = ideal[np.minimum(n_targets, k)]
        out[f"recall@{k}"] = np.where(has, n_hit / denom, np.nan)
        out[f"ndcg@{k}"] = np.where(has, dcg / np.where(has, idcg, 1.0), np.nan)
        out[f"hr@{k}"] = np.where(has, (n_hit > 0).astype(np.float64), np.nan)
    out["n_targets"] = n_targets
    return out


def topn_metrics(ranked: np.ndarray, target_offsets: np.ndarray, target_items: np.ndarray,
                 ks: Sequence[int] = (20, 50)) -> dict[str, float]:
    """Recall / NDCG / HR @k averaged over users that have at least one target.

    Users with no targets are skipped (they have no defined recall); `"users"` says how many counted.
    For the per-user arrays (to bucket by activity) use `topn_per_user`.

    Args:
        ranked: (U, N) int item ids, best first; 0 = empty slot.
        target_offsets: (U+1,) CSR offsets into `target_items`.
        target_items: (T,) target item ids.
        ks: cut-offs.

    Returns:
        {"recall@k", "ndcg@k", "hr@k" for each k, "users"}.

    Example:
        >>> import numpy as np
        >>> topn_metrics(np.array([[2, 1]]), np.array([0, 1]), np.array([1]), ks=(2,))["ndcg@2"]  # 1/log2(3)
        0.6309297535714575
    """
    return topn_mean(topn_per_user(ranked, target_offsets, target_items, ks))


def topn_mean(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """`topn_metrics` from `topn_per_user`'s arrays, for callers that also bucket them (one pass over the top-N).

    Example:
        >>> per = topn_per_user(np.array([[2, 1]]), np.array([0, 1]), np.array([1]), ks=(2,))
        >>> topn_mean(per)["users"]
        1
    """
    counted = per_user["n_targets"] > 0
    n = int(counted.sum())
    out = {name: float(v[counted].mean()) if n else float("nan") for name, v in per_user.items() if name != "n_targets"}
    out["users"] = n
    return out


def topn_by_bucket(per_user: dict[str, np.ndarray], buckets: np.ndarray,
                   order: Iterable[Hashable] | None = None) -> dict[Any, dict[str, float]]:
    """Average per-user top-N metrics within each bucket (e.g. activity bucket from `bucket_of`).

    Args:
        per_user: output of `topn_per_user` (arrays of length U; NaN = user without targets).
        buckets: (U,) bucket label of each user.
        order: bucket labels in the order wanted (e.g. `bucket_labels((5, 20))`); every one appears,
            an empty bucket with users = 0 and NaN metrics. Default: labels in order of first appearance.

    Returns:
        {bucket: {"recall@k": ..., ..., "users": n}}.

    Example:
        >>> per = topn_per_user(np.array([[1, 2], [3, 4]]), np.array([0, 1, 2]), np.array([1, 9]), ks=(2,))
        >>> topn_by_bucket(per, bucket_of(np.array([3, 30])), order=bucket_labels((5, 20)))["<=5"]
        {'recall@2': 1.0, 'ndcg@2': 1.0, 'hr@2': 1.0, 'users': 1}
    """
    buckets = np.asarray(buckets)
    names = [k for k in per_user if k != "n_targets"]
    if any(len(per_user[k]) != len(buckets) for k in names):
        raise ValueError(f"buckets has {len(buckets)} entries but the per-user metrics have "
                         f"{len(per_user[names[0]]) if names else 0}; pass one bucket per user")
    labels = list(order) if order is not None else list(dict.fromkeys(buckets.tolist()))
    counted = ~np.isnan(per_user[names[0]]) if names else np.zeros(len(buckets), dtype=bool)
    out: dict[Any, dict[str, float]] = {}
    for b in labels:
        m = (buckets == b) & counted
        n = int(m.sum())
        out[b] = {name: float(per_user[name][m].mean()) if n else float("nan") for name in names}
        out[b]["users"] = n
    return out


# --------------------------------------------------------------------------- ranking (CTR)


def _check_binary(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape[0]}) and {what} ({s.shape[0]}) must have the same length")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"labels must be 0/1 (click or not), got values {np.unique(y)[:10].tolist()}")
    if np.isnan(s).any():
        raise ValueError(f"{what} contain NaN at {int(np.isnan(s).sum())} positions; check the model output")
    return y.astype(bool), s


def _tie_average_ranks(sorted_values: np.ndarray, new_group: np.ndarray) -> np.ndarray:
    """1-based ranks of an already sorted array, ties (runs where new_group is False) sharing their mean rank."""
    n = len(sorted_values)
    pos = np.arange(1, n + 1, dtype=np.float64)
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of positions starts+1 .. ends
    return np.repeat(mean_rank, ends - starts) if n else pos


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties 1/2.

    Equals `sklearn.metrics.roc_auc_score` (Mann–Whitney U with average ranks).

    Args:
        labels: (S,) 0/1.
        scores: (S,) any real scores (probabilities or logits).

    Raises:
        ValueError: when only one class is present (AUC is undefined), as scikit-learn does.

    Example:
        >>> auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.5, 0.5]))
        0.875
    """
    y, s = _check_binary(labels, scores, "scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives "
                         f"(evaluate on a split or bucket that has both)")
    order = np.argsort(s, kind="stable")
    ss = s[order]
    new = np.ones(len(ss), dtype=bool)
    new[1:] = ss[1:] != ss[:-1]
    ranks = _tie_average_ranks(ss, new)
    rank_sum = ranks[y[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-user AUC weighted by the user's sample count, Σ_u n_u·AUC_u / Σ_u n_u.

    Only users with both a positive and a negative sample enter (single-class users have no AUC and
    are skipped, in the sum and in the weights). Computed in one sort, no loop over users.

    Args:
        users: (S,) user id of each sample (any integers).
        labels: (S,) 0/1.
        scores: (S,) real scores.

    Returns:
        GAUC, or NaN when no user has both classes.

    Example:
        >>> gauc(np.array([1, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 0]), np.array([.2, .8, .1, .5, .0]))  # (2·1 + 3·0.5) / 5
        0.7
    """
    y, s = _check_binary(labels, scores, "scores")
    u = np.asarray(users).ravel()
    if u.shape != y.shape:
        raise ValueError(f"users ({u.shape[0]}) and labels ({y.shape[0]}) must have the same length")
    _, g = np.unique(u, return_inverse=True)  # dense group ids
    g = g.ravel()
    n_groups = int(g.max()) + 1 if len(g) else 0
    order = np.lexsort((s, g))  # by user, then score
    gs, ss, ys = g[order], s[order], y[order]
    new = np.ones(len(gs), dtype=bool)
    new[1:] = (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])
    ranks = _tie_average_ranks(ss, new)  # global ranks; subtract each user's offset below
    n_u = np.bincount(gs, minlength=n_groups).astype(np.float64)
    start = np.concatenate([[0.0], np.cumsum(n_u)[:-1]])  # samples before each user in sorted order
    pos_u = np.bincount(gs, weights=ys, minlength=n_groups)
    rank_sum = np.bincount(gs, weights=np.where(ys, ranks - start[gs], 0.0), minlength=n_groups)
    neg_u = n_u - pos_u
    ok = (pos_u > 0) & (neg_u > 0)
    if not ok.any():
        return float("nan")
    auc_u = (rank_sum[ok] - pos_u[ok] * (pos_u[ok] + 1) / 2.0) / (pos_u[ok] * neg_u[ok])
    return float((n_u[ok] * auc_u).sum() / n_u[ok].sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [eps, 1 - eps].

    The default eps suits float32 model outputs (a sigmoid saturates to exactly 0 or 1 near
    float32 precision); scikit-learn's `log_loss` clips at the input dtype's machine epsilon,
    so pass `eps=np.finfo(np.float64).eps` to reproduce it on float64 inputs.

    Args:
        labels: (S,) 0/1.
        probs: (S,) predicted click probabilities in [0, 1].
        eps: clipping bound.

    Example:
        >>> round(logloss(np.array([1, 0]), np.array([0.5, 0.5])), 6)  # ln 2
        0.693147
    """
    y, p = _check_binary(labels, probs, "probs")
    if len(y) == 0:
        raise ValueError("logloss of zero samples is undefined; pass at least one sample")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probs must lie in [0, 1] (got range [{p.min():.4g}, {p.max():.4g}]); "
                         f"apply a sigmoid to logits first")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


# --------------------------------------------------------------------------- activity buckets


def bucket_labels(edges: Sequence[int] = (5, 20)) -> list[str]:
    """Names of the activity buckets cut at `edges`, in increasing order.

    Example:
        >>> bucket_labels((5, 20))
        ['<=5', '6-20', '>20']
    """
    edges = [int(e) for e in edges]
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be a non-empty, strictly increasing list like (5, 20), got {edges}")
    out = [f"<={edges[0]}"]
    for lo, hi in zip(edges, edges[1:]):
        out.append(f"{hi}" if lo + 1 == hi else f"{lo + 1}-{hi}")
    out.append(f">{edges[-1]}")
    return out


def bucket_of(n_events: np.ndarray, edges: Sequence[int] = (5, 20)) -> np.ndarray:
    """Activity bucket label for each count: n <= e1, e1 < n <= e2, ..., n > e_last.

    Args:
        n_events: (S,) history length (or any activity count) per user or per sample.
        edges: inclusive upper ends of all buckets but the last.

    Returns:
        (S,) array of str labels from `bucket_labels(edges)`.

    Example:
        >>> bucket_of(np.array([0, 5, 6, 20, 21])).tolist()
        ['<=5', '<=5', '6-20', '6-20', '>20']
    """
    labels = np.asarray(bucket_labels(edges))
    n = np.asarray(n_events)
    return labels[np.searchsorted(np.asarray(edges), n, side="left")]


def ranking_by_bucket(users: np.ndarray, labels: np.ndarray, probs: np.ndarray, buckets: np.ndarray,
                      order: Iterable[Hashable] | None = None) -> dict[Any, dict[str, float]]:
    """AUC / GAUC / logloss within each bucket of samples (SPEC §4.3: report every bucket).

    A bucket with only one class keeps its logloss and counts but has no "auc"/"gauc" key (they
    are undefined there); a bucket with no samples has only the counts. Nothing is dropped silently.

    Args:
        users: (S,) user of each sample.
        labels: (S,) 0/1.
        probs: (S,) predicted probabilities.
        buckets: (S,) bucket label per sample, e.g. `bucket_of(history_len_at_sample)`.
        order: bucket labels in the order wanted; default: order of first appearance.

    Returns:
        {bucket: {"auc", "gauc", "logloss", "samples", "positives"}}.

    Example:
        >>> out = ranking_by_bucket(np.array([1, 1, 2, 2]), np.array([1, 0, 1, 1]), np.array([.9, .2, .6, .7]),
        ...                         bucket_of(np.array([2, 2, 30, 30])), order=bucket_labels((5, 20)))
        >>> out["<=5"]["auc"], "auc" in out[">20"], out["6-20"]["samples"]
        (1.0, False, 0)
    """
    users, labels, probs, buckets = (np.asarray(a).ravel() for a in (users, labels, probs, buckets))
    if not len(users) == len(labels) == len(probs) == len(buckets):
        raise ValueError(f"users, labels, probs, buckets must have equal lengths, got "
                         f"{len(users)}, {len(labels)}, {len(probs)}, {len(buckets)}")
    names = list(order) if order is not None else list(dict.fromkeys(buckets.tolist()))
    out: dict[Any, dict[str, float]] = {}
    for b in names:
        m = buckets == b
        y = labels[m]
        row: dict[str, float] = {"samples": int(m.sum()), "positives": int((y == 1).sum())}
        if row["samples"]:
            if 0 < row["positives"] < row["samples"]:
                row["auc"] = auc(y, probs[m])
                row["gauc"] = gauc(users[m], y, probs[m])
            row["logloss"] = logloss(y, probs[m])
        out[b] = row
    return out
