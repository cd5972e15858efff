"""The numbers behind the report, without plotting: seed spread, interest diversity, ANN sweeps.

Everything here takes arrays and returns arrays or dicts, so tests check it against hand-computed
values; `facetrec.report.build` turns the results into figures and HTML.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

# ---------------------------------------------------------------- seed spread


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof = 1; NaN for one value) and count of the finite values.

    Example:
        >>> mean_std([0.2, 0.4, float("nan")])
        (0.30000000000000004, 0.14142135623730953, 2)
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), 0
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan"), len(x)


def bucket_sort_key(label: str) -> tuple[float, str]:
    """Order activity buckets by their lower end: "<=5" < "6-20" < ">20".

    Example:
        >>> sorted([">20", "6-20", "<=5"], key=bucket_sort_key)
        ['<=5', '6-20', '>20']
    """
    nums = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", label)]
    if not nums:
        return (math.inf, label)
    if label.lstrip().startswith(("<", "≤")):
        return (-math.inf, label)
    return (nums[0], label)


# ---------------------------------------------------------------- interest diversity


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon distance sqrt(JSD(p || q)) with log base 2: 0 for equal distributions, 1 for disjoint ones.

    Inputs are non-negative weights (normalised here).

    Example:
        >>> js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
        1.0
        >>> js_distance(np.array([1.0, 1.0]), np.array([2.0, 2.0]))
        0.0
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return math.sqrt(max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def mean_pairwise_js(groups: Sequence[np.ndarray], n_categories: int) -> float:
    """Mean JS distance over all pairs of groups' category histograms (each group: category ids).

    Example:
        >>> s = js_distance(np.array([1.0, 0.0]), np.array([0.5, 0.5]))  # 0.5578
        >>> groups = [np.array([1, 1]), np.array([2, 2]), np.array([1, 2])]  # pair distances 1, s, s
        >>> round(mean_pairwise_js(groups, 3), 4) == round((1 + 2 * s) / 3, 4)
        True
    """
    hists = [np.bincount(g, minlength=n_categories).astype(np.float64) for g in groups if len(g)]
    pairs = [js_distance(hists[a], hists[b]) for a in range(len(hists)) for b in range(a + 1, len(hists))]
    return float(np.mean(pairs)) if pairs else float("nan")


def random_split_js(groups: Sequence[np.ndarray], n_categories: int, rng: np.random.Generator, repeats: int = 20) -> float:
    """The same measure for random splits: pool the groups' items, shuffle, cut into groups of the same sizes.

    This is the null for "interests retrieve different categories": with no structure, interests
    would be random splits of the user's retrieved items, and their distance is sampling noise.
    """
    sizes = [len(g) for g in groups]
    pooled = np.concatenate(list(groups))
    cuts = np.cumsum(sizes)[:-1]
    vals = [mean_pairwise_js(np.split(rng.permutation(pooled), cuts), n_categories) for _ in range(repeats)]
    return float(np.mean(vals))


@dataclass
class Diversity:
    """Category diversity of interests over a set of users (each with >= 2 valid interests)."""

    users: int  # users measured
    top_m: int  # items retrieved per interest
    interest_js: float  # mean over users of the mean pairwise JS distance between interests
    random_js: float  # the same for random splits of each user's retrieved items
    share_above: float  # fraction of users whose interests are further apart than their random splits
    diff_ci: tuple[float, float]  # 95% interval of the mean of (interest JS - random JS) over users (normal approx.)
    per_user: list[tuple[int, float, float]]  # (user, interest JS, random-split JS)

    @property
    def verdict(self) -> str:
        """"further apart than" / "closer than" random splits when the 95% interval excludes 0, else "no different from"."""
        lo, hi = self.diff_ci
        return "further apart than" if lo > 0 else "closer than" if hi < 0 else "no different from"


def interest_diversity(users: Iterable[int], retrieved: Iterable[Sequence[np.ndarray]], item_cate: np.ndarray,
                       n_categories: int, top_m: int, seed: int = 0, repeats: int = 20) -> Diversity:
    """Mean pairwise JS distance of interests' retrieved-item categories vs random splits.

    Args:
        users: user ids, one per entry of `retrieved`.
        retrieved: per user, one array of item ids per valid interest (users with one interest are skipped).
        item_cate: (n_items,) category id of each item.
        n_categories: category vocabulary size.
        top_m: items per interest (recorded only; 0 when the groups are not retrieval results).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for u, groups in zip(users, retrieved):
        cats = [item_cate[np.asarray(g, dtype=np.int64)] for g in groups if len(g)]
        if len(cats) < 2:
            continue
        rows.append((int(u), mean_pairwise_js(cats, n_categories), random_split_js(cats, n_categories, rng, repeats)))
    return paired(rows, top_m)


def paired(rows: Sequence[tuple[int, float, float]], top_m: int) -> Diversity:
    """Diversity from per-user (user, interests' JS, baseline JS) rows: means, share above, 95% interval."""
    rows = [r for r in rows if math.isfinite(r[1]) and math.isfinite(r[2])]
    if not rows:
        return Diversity(0, top_m, float("nan"), float("nan"), float("nan"), (float("nan"), float("nan")), [])
    a = np.array([r[1] for r in rows])
    b = np.array([r[2] for r in rows])
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return Diversity(len(rows), top_m, float(a.mean()), float(b.mean()), float((a > b).mean()),
                     (float(d.mean() - half), float(d.mean() + half)), list(rows))


def history_splits(hist: np.ndarray, k: int, rng: np.random.Generator, repeats: int) -> list[list[np.ndarray]]:
    """`repeats` random splits of a history's items into k groups of near-equal size (the second null:
    what routing would give if it grouped behaviours at random).

    Example:
        >>> splits = history_splits(np.arange(1, 8), 3, np.random.default_rng(0), repeats=2)
        >>> [sorted(len(g) for g in s) for s in splits], sorted(np.concatenate(splits[0]).tolist())
        ([[2, 2, 3], [2, 2, 3]], [1, 2, 3, 4, 5, 6, 7])
    """
    return [np.array_split(rng.permutation(np.asarray(hist)), k) for _ in range(repeats)]


# ---------------------------------------------------------------- ANN recall vs latency


def ann_sweep(items: np.ndarray, queries: np.ndarray, k: int = 50, timed: int = 200, rounds: int = 3,
              ef: Sequence[int] = (8, 16, 32, 64, 128, 256), nprobe: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128)
              ) -> list[dict[str, Any]]:
    """A small recall@k / latency sweep over index settings on the given vectors.

    Rows are shaped like benchmarks/index_recall.py's JSON rows: {"index", "params", "recall@k",
    "p50_ms"}. Latency is one query at a time on one faiss thread (as in the benchmark); the
    p50 is the smallest of `rounds` medians, which keeps a busy shared machine from making one
    setting look slow.

    Args:
        items: (N, D) item vectors (row i = item i + 1).
        queries: (Q, D) query vectors (e.g. users' interest vectors).
        k: neighbours compared against exact search.
        timed: queries timed one at a time, per round.
        rounds: timing rounds per setting.
    """
    import faiss

    from facetrec.index.ann import ann_recall, build_index, default_nlist

    ids = np.arange(1, len(items) + 1, dtype=np.int64)
    k = min(k, len(items))
    threads = faiss.omp_get_max_threads()
    rows: list[dict[str, Any]] = []

    def measure(name: str, index: Any, exact_ids: np.ndarray | None) -> np.ndarray:
        _, found = index.search(queries, k)
        faiss.omp_set_num_threads(1)
        try:
            index.search(queries[:1], k)  # warm-up
            medians = []
            for _ in range(rounds):
                lat = []
                for q in queries[:timed]:
                    t = time.perf_counter_ns()
                    index.search(q[None, :], k)
                    lat.append((time.perf_counter_ns() - t) / 1e6)
                medians.append(float(np.median(lat)))
        finally:
            faiss.omp_set_num_threads(threads)
        rows.append({"index": name, "params": dict(index.params), f"recall@{k}":
                     1.0 if exact_ids is None else round(ann_recall(found, exact_ids), 4),
                     "p50_ms": round(min(medians), 4)})
        return found

    exact_ids = measure("exact", build_index(items, ids, kind="exact"), None)
    hnsw = build_index(items, ids, kind="hnsw", M=16, efConstruction=64, efSearch=ef[0])
    for e in ef:
        hnsw.efSearch = e
        measure("hnsw", hnsw, exact_ids)
    nlist = default_nlist(len(items))
    if nlist >= 2:
        ivf = build_index(items, ids, kind="ivf", nlist=nlist, nprobe=1)
        for p in sorted({min(p, nlist) for p in nprobe}):
            ivf.nprobe = p
            measure("ivf", ivf, exact_ids)
    return rows
