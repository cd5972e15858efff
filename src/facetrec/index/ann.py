"""ANN layer: build / search / save / load over item vectors (inner product), and the
multi-interest search that serving and evaluation share (SPEC §2.6).

Kinds: `exact` (faiss IndexFlatIP; numpy when faiss is missing), `hnsw` (IndexHNSWFlat),
`ivf` (IndexIVFFlat), `ivfpq` (IndexIVFPQ). Item ids are the internal ids (1..n-1); 0 is
padding and never indexed.

faiss cannot take a max over several query vectors, so `multi_interest_search` queries each
valid interest for its top-M, then merges by max over interests, de-duplicates, drops excluded
(already seen) items and keeps the top-n, remembering which interest retrieved each item.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from facetrec.errors import ConfigError
from facetrec.io import atomic_write

try:
    import faiss
except ImportError:  # pragma: no cover - exercised only without the `ann` extra
    faiss = None

KINDS = ("exact", "hnsw", "ivf", "ivfpq")
DEFAULTS: dict[str, dict[str, Any]] = {
    "exact": {},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 256},
    "ivf": {"nlist": 0, "nprobe": 16},  # nlist 0 = about 4 * sqrt(n)
    "ivfpq": {"nlist": 0, "m": 16, "nbits": 8, "nprobe": 32},
}


def memory_estimate_bytes(n: int, d: int, kind: str, params: dict[str, Any] | None = None) -> int:
    """Rough index size: vectors (or codes) + graph links / inverted-list ids."""
    p = {**DEFAULTS.get(kind, {}), **(params or {})}
    if kind == "exact":
        return n * d * 4
    if kind == "hnsw":
        return n * d * 4 + n * p["M"] * 2 * 4 + n * 8
    if kind == "ivf":
        return n * d * 4 + n * 8 + _nlist(n, p) * d * 4
    if kind == "ivfpq":
        return n * (p["m"] * p["nbits"] // 8) + n * 8 + _nlist(n, p) * d * 4 + 256 * d * 4
    raise ConfigError(f"index kind {kind!r} must be one of {', '.join(KINDS)}")


def _nlist(n: int, p: dict[str, Any]) -> int:
    return int(p["nlist"]) or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))


class Index:
    """A searchable set of item vectors keyed by item id (a thin wrapper over a faiss index)."""

    def __init__(self, kind: str, index: Any, params: dict[str, Any], dim: int) -> None:
        self.kind = kind
        self.index = index
        self.params = params
        self.dim = dim
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if faiss is None or self.index is None:
            return
        inner = faiss.downcast_index(self.index.index)  # the index inside the IndexIDMap
        if self.kind == "hnsw":
            inner.hnsw.efSearch = int(self.params["ef_search"])
        elif self.kind in ("ivf", "ivfpq"):
            inner.nprobe = int(self.params["nprobe"])

    def set_search_params(self, **params: Any) -> None:
        self.params.update(params)
        self._apply_search_params()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) if faiss is not None else len(self.index[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, ids (Q, k) int64, -1 where fewer than k items)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {q.shape}")
        k = int(min(k, self.ntotal))
        if faiss is None:
            vecs, ids = self.index
            s = q @ vecs.T
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            ts = np.take_along_axis(s, top, 1)
            order = np.argsort(-ts, axis=1, kind="stable")
            return np.take_along_axis(ts, order, 1), ids[np.take_along_axis(top, order, 1)]
        scores, ids = self.index.search(q, k)
        return scores, ids

    def save(self, path: str | Path) -> None:
        """Write the index atomically (faiss's own format)."""
        if faiss is None:
            raise ConfigError("saving an index needs faiss: pip install 'facetrec[ann]'")
        data = faiss.serialize_index(self.index)
        meta = f"{self.kind}\n{repr(self.params)}\n{self.dim}\n".encode()
        atomic_write(path, lambda f: (f.write(len(meta).to_bytes(4, "little")), f.write(meta), f.write(data.tobytes())))


def load_index(path: str | Path) -> Index:
    """Read an index written by `Index.save`."""
    import ast

    if faiss is None:
        raise ConfigError("loading an index needs faiss: pip install 'facetrec[ann]'")
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:4], "little")
    kind, params, dim = raw[4:4 + n].decode().splitlines()
    index = faiss.deserialize_index(np.frombuffer(raw[4 + n:], dtype=np.uint8))
    return Index(kind, index, ast.literal_eval(params), int(dim))


def build_index(vectors: np.ndarray, ids: np.ndarray, kind: str = "exact", verbose: bool = False, **params: Any) -> Index:
    """Index `vectors` (N, D) under `ids` (N,) for inner-product search.

    Example:
        >>> v = np.eye(3, dtype=np.float32); idx = build_index(v, np.array([1, 2, 3]))
        >>> idx.search(v[:1], 1)[1].tolist()
        [[1]]
    """
    if kind not in KINDS:
        raise ConfigError(f"index kind {kind!r} must be one of {', '.join(KINDS)}")
    unknown = set(params) - set(DEFAULTS[kind])
    if unknown:
        raise ConfigError(f"unknown {kind} index parameter(s) {sorted(unknown)}; valid: {sorted(DEFAULTS[kind])}")
    p = {**DEFAULTS[kind], **params}
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    keep = ids > 0  # padding is never indexed
    x, ids = x[keep], ids[keep]
    n, d = x.shape
    if n == 0:
        raise ValueError("no item vectors to index")
    if verbose:
        print(f"building {kind} index over {n:,} x {d} vectors: about {memory_estimate_bytes(n, d, kind, p) / 2**20:,.0f} MiB")
    if faiss is None:
        if kind != "exact":
            raise ConfigError(f"index kind {kind!r} needs faiss: pip install 'facetrec[ann]'")
        return Index(kind, (x, ids), p, d)
    if kind == "exact":
        inner = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(p["ef_construction"])
    else:
        nlist = _nlist(n, p)
        quant = faiss.IndexFlatIP(d)
        if kind == "ivf":
            inner = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if d % int(p["m"]):
                raise ConfigError(f"ivfpq: dimension {d} must be divisible by m = {p['m']}")
            inner = faiss.IndexIVFPQ(quant, d, nlist, int(p["m"]), int(p["nbits"]), faiss.METRIC_INNER_PRODUCT)
        train = x if n <= 256 * nlist else x[np.random.default_rng(0).choice(n, 256 * nlist, replace=False)]
        inner.train(train)
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(x, ids)
    return Index(kind, index, p, d)


def multi_interest_search(index: Index, interests: np.ndarray, valid: np.ndarray, top_m: int, n: int,
                          exclude: tuple[np.ndarray, np.ndarray] | None = None,
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-n items per user, merged by max over the user's valid interests.

    Args:
        interests: (U, K, D) interest vectors.
        valid: (U, K) bool; invalid interests never contribute.
        top_m: candidates per interest from the index.
        n: results per user.
        exclude: optional CSR (offsets (U+1,), items) of items to leave out per user.

    Returns:
        ids (U, n) int64 (0 = unfilled slot), scores (U, n) float32 (-inf when unfilled),
        interest (U, n) int64: the interest giving the max (-1 when unfilled).
    """
    U, K, D = interests.shape
    m = int(min(top_m + (0 if exclude is None else int(np.diff(exclude[0]).max(initial=0))), index.ntotal))
    q = interests.reshape(U * K, D)
    flat_valid = valid.reshape(-1).astype(bool)
    scores = np.full((U * K, m), -np.inf, dtype=np.float32)
    ids = np.full((U * K, m), -1, dtype=np.int64)
    if flat_valid.any():
        s, i = index.search(q[flat_valid], m)
        scores[flat_valid], ids[flat_valid] = s, i
    scores = scores.reshape(U, K * m)
    ids = ids.reshape(U, K * m)
    which = np.repeat(np.arange(K), m)[None, :].repeat(U, 0)
    scores[ids < 0] = -np.inf
    if exclude is not None:
        off, items = exclude
        owner = np.repeat(np.arange(U, dtype=np.int64), np.diff(off))
        shift = np.int64(1) << np.int64(40)
        bad = np.isin(np.arange(U, dtype=np.int64)[:, None] * shift + np.maximum(ids, 0), owner * shift + items.astype(np.int64))
        scores[bad] = -np.inf
    # de-duplicate: sort each row by (id, -score) and keep the first of each id
    order = _row_lexsort(ids, scores)
    ids_s = np.take_along_axis(ids, order, 1)
    sc_s = np.take_along_axis(scores, order, 1)
    wh_s = np.take_along_axis(which, order, 1)
    dup = np.zeros_like(ids_s, dtype=bool)
    dup[:, 1:] = ids_s[:, 1:] == ids_s[:, :-1]
    sc_s[dup] = -np.inf
    n_eff = min(n, sc_s.shape[1])
    top = np.argsort(-sc_s, axis=1, kind="stable")[:, :n_eff]
    out_s = np.take_along_axis(sc_s, top, 1)
    out_i = np.where(np.isfinite(out_s), np.take_along_axis(ids_s, top, 1), 0)
    out_w = np.where(np.isfinite(out_s), np.take_along_axis(wh_s, top, 1), -1)
    if n_eff < n:
        pad = n - n_eff
        out_i = np.pad(out_i, ((0, 0), (0, pad)))
        out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_w = np.pad(out_w, ((0, 0), (0, pad)), constant_values=-1)
    return out_i.astype(np.int64), out_s.astype(np.float32), out_w.astype(np.int64)


def _row_lexsort(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per row: order by id, then by descending score (so the max comes first within an id)."""
    by_score = np.argsort(-scores, axis=1, kind="stable")
    ids_by_score = np.take_along_axis(ids, by_score, 1)
    by_id = np.argsort(ids_by_score, axis=1, kind="stable")
    return np.take_along_axis(by_score, by_id, 1)


def ann_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (0 / -1 entries ignored)."""
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    shift = np.int64(1) << np.int64(40)
    rows = np.arange(len(e), dtype=np.int64)[:, None] * shift
    ka = (rows + a)[a > 0]
    ke = rows + e
    valid_e = e > 0
    hit = np.isin(ke, ka) & valid_e
    denom = valid_e.sum(1)
    ok = denom > 0
    return float((hit.sum(1)[ok] / denom[ok]).mean()) if ok.any() else float("nan")
