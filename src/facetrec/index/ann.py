"""ANN layer (SPEC §2.6): inner-product indexes over item vectors, and the multi-interest search
that serving and evaluation share.

    index = build_index(item_vecs, np.arange(1, n_items), kind="hnsw", efSearch=256)  # (N, D), (N,)
    ids, scores, interest = multi_interest_search(index, interests, valid, top_m=200, n=50,
                                                  exclude=(hist_offsets, hist_items))   # (U, n) each
    index.save("index.faiss"); index = load_index("index.faiss")

Kinds and their parameters (names as in faiss):

| kind    | class        | faiss index                  | parameters                         |
| ------- | ------------ | ---------------------------- | ---------------------------------- |
| exact   | ExactIndex   | IndexFlatIP (numpy fallback) | backend (auto, faiss or numpy)     |
| hnsw    | HNSWIndex    | IndexHNSWFlat, inner product | M, efConstruction, efSearch, space |
| ivf     | IVFIndex     | IndexIVFFlat, inner product  | nlist, nprobe                      |
| ivfpq   | IVFPQIndex   | IndexIVFPQ, inner product    | nlist, m, nbits, nprobe            |

Any kind also takes `shards=S` (S > 1): a `ShardedIndex` of S sub-indexes of that kind over
disjoint slices of the catalogue, built one after the other and searched one after the other,
their top-k lists merged (for catalogues whose one index does not fit; each sub-index's
parameters default from its own size). In a config: `train.index: ivfpq`,
`train.index_params: {nlist: 4096, m: 16, nprobe: 64, shards: 4}`.

Item ids are the internal ids 1..n-1; 0 is padding and is never indexed (`build` refuses it).
faiss cannot take a max over several query vectors, so the merge in `multi_interest_search` is
ours: one batched search for every valid interest, then a numpy merge per user.

Shape legend: `N` indexed items, `D` dim, `Q` queries, `U` users, `K` interests, `M` per-interest
candidates (`top_m`), `n` results per user.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from facetrec.errors import ConfigError
from facetrec.io import atomic_write

try:
    import faiss
except ImportError:  # pragma: no cover - exercised only without the `ann` extra
    faiss = None

__all__ = [
    "ANNIndex",
    "ExactIndex",
    "HNSWIndex",
    "IVFIndex",
    "IVFPQIndex",
    "KINDS",
    "ShardedIndex",
    "ann_recall",
    "build_index",
    "load_index",
    "memory_estimate_bytes",
    "multi_interest_search",
]

KINDS = ("exact", "hnsw", "ivf", "ivfpq")
LARGE_INDEX_BYTES = 256 << 20  # `build` prints its memory estimate above this
_NPZ_MAGIC = b"PK\x03\x04"  # the numpy fallback saves an .npz (a zip) under the same file name
_SHARDS_MAGIC = b"FTSHARDS"  # a ShardedIndex file: magic, JSON header line, then (length, sub-index file) per shard
_MIN_POINTS_PER_CENTROID = 39  # below this faiss k-means warns and centroids are poor


def _need_faiss(what: str) -> None:
    if faiss is None:
        raise ConfigError(f"{what} needs faiss: pip install 'facetrec[ann]' (faiss-cpu), or use kind='exact', "
                          f"which falls back to numpy")


def _positive_int(kind: str, name: str, value: Any, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{kind} index parameter {name} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ConfigError(f"{kind} index parameter {name} must be at most {upper}, got {value}")
    return int(value)


def default_nlist(n: int) -> int:
    """Inverted lists for n items: about 4·sqrt(n), keeping >= 39 training points per list (faiss's minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // _MIN_POINTS_PER_CENTROID))


def default_nprobe(nlist: int) -> int:
    """Lists to visit: nlist / 16 (about 6% of the items), at least 8 (all of them when nlist <= 8)."""
    return min(nlist, max(8, nlist // 16))


def default_pq_m(d: int) -> int:
    """PQ sub-quantizers for dimension d: the largest divisor of d giving sub-vectors of >= 4 dims."""
    return max(m for m in range(1, d + 1) if d % m == 0 and d // m >= 4) if d >= 4 else 1


# --------------------------------------------------------------------------- memory estimate


def memory_estimate_bytes(n: int, d: int, kind: str, params: dict[str, Any] | None = None) -> int:
    """Approximate RAM of an index over n vectors of dimension d (what `save` writes is about the same).

    Counts the stored vectors or PQ codes, the id map (8 bytes per item), HNSW graph links
    (level 0 has 2·M neighbours of 4 bytes; upper levels add about 1/M of that), IVF centroids and
    list ids, and PQ codebooks. Good to ~10%; use it to pick a kind before building. With
    `shards` in params: the sum over the shards (each with its own default parameters).

    Args:
        n: number of items.
        d: vector dimension.
        kind: one of `KINDS`.
        params: the kind's parameters (defaults filled in), optionally `shards`.

    Example:
        >>> memory_estimate_bytes(1_000_000, 64, "exact") // 2**20
        251
    """
    cls = _CLASSES.get(kind)
    if cls is None:
        raise ConfigError(f"index kind {kind!r} must be one of {', '.join(KINDS)}")
    params = dict(params or {})
    shards = _positive_int(kind, "shards", params.pop("shards", 1))
    if shards > 1:
        return sum(memory_estimate_bytes(len(range(s, n, shards)), d, kind, params) for s in range(shards))
    p = cls.resolve_params(n, d, params)
    ids = 8 * n
    if kind == "exact":
        return 4 * n * d + ids
    if kind == "hnsw":
        links = 4 * 2 * p["M"] * n * (1 + 1 / p["M"])  # level 0 + geometric upper levels
        return int(4 * n * d + links + ids + 16 * n)  # + per-node level/offset bookkeeping
    centroids = 4 * p["nlist"] * d
    if kind == "ivf":
        return 4 * n * d + ids + centroids
    codes = n * math.ceil(p["m"] * p["nbits"] / 8)
    codebooks = 4 * d * (1 << p["nbits"])
    return codes + ids + centroids + codebooks


# --------------------------------------------------------------------------- the protocol


@runtime_checkable
class ANNIndex(Protocol):
    """What the rest of facetrec needs from an index: inner-product top-k over item ids."""

    kind: str

    @property
    def ntotal(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def params(self) -> dict[str, Any]: ...

    def build(self, vectors: np.ndarray, ids: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, path: str | Path) -> None: ...


def _check_build_inputs(vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"vectors must be a non-empty (N, D) array, got shape {np.shape(vectors)}")
    i = np.asarray(ids)
    if i.ndim != 1 or len(i) != len(x):
        raise ValueError(f"ids must be (N,) = ({len(x)},) to match vectors, got shape {i.shape}")
    if not np.issubdtype(i.dtype, np.integer):
        raise ValueError(f"ids must be integers (internal item ids), got dtype {i.dtype}")
    i = np.ascontiguousarray(i, dtype=np.int64)
    if (i <= 0).any():
        bad = np.flatnonzero(i <= 0)
        raise ValueError(f"ids must be >= 1: id 0 is padding and is never indexed (found {i[bad[0]]} at row "
                         f"{bad[0]}, {len(bad)} such rows); index items 1..n-1, e.g. "
                         f"build_index(table[1:], np.arange(1, len(table)))")
    if len(np.unique(i)) != len(i):
        raise ValueError("ids must be unique: each item is indexed once")
    if not np.isfinite(x).all():
        raise ValueError(f"vectors contain NaN/inf in {int((~np.isfinite(x)).any(axis=1).sum())} rows; "
                         f"check the model's item tower")
    return x, i


def _check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}) to match the index, got shape {np.shape(queries)}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return q


class _FaissIndex:
    """Shared build / search / save over a faiss index wrapped in an id map (ids are item ids)."""

    kind: ClassVar[str]
    PARAMS: ClassVar[dict[str, Any]]  # name -> default (None = derived from n, d at build time)

    def __init__(self) -> None:
        self._index: Any = None  # faiss index mapping search results to item ids
        self._inner: Any = None  # the index inside the id map (holds efSearch / nprobe)
        self._dim = 0
        self._requested: dict[str, Any] = {}  # parameters as given (None = derive at build time)
        self._p: dict[str, Any] = {}  # parameters in effect

    # -- parameters

    @classmethod
    def check_param_names(cls, params: dict[str, Any]) -> None:
        unknown = [k for k in params if k not in cls.PARAMS]
        if unknown:
            hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, cls.PARAMS, 1, 0.5)[0]!r}?)"
                     if difflib.get_close_matches(k, cls.PARAMS, 1, 0.5) else repr(k) for k in unknown]
            valid = ", ".join(cls.PARAMS) or "none"
            raise ConfigError(f"unknown {cls.kind} index parameter(s) {', '.join(hints)}; valid: {valid}")

    @classmethod
    def resolve_params(cls, n: int, d: int, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and checked against n and d (ConfigError says what to change)."""
        cls.check_param_names(params)
        return {**cls.PARAMS, **params}

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._p)

    # -- state

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return self._dim

    def _built(self) -> None:
        if self._index is None:
            raise RuntimeError(f"this {self.kind} index is empty; call build(vectors, ids) or load_index(path) first")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ntotal={self.ntotal}, dim={self.dim}, {self._p})"

    # -- build / search / save

    def _make(self, x: np.ndarray) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Index `vectors` (N, D) float32 under item `ids` (N,) int64 >= 1; replaces any previous content."""
        _need_faiss(f"the {self.kind} index")
        x, i = _check_build_inputs(vectors, ids)
        n, d = x.shape
        self._p = self.resolve_params(n, d, self._requested)
        est = memory_estimate_bytes(n, d, self.kind, self._p)
        if est >= LARGE_INDEX_BYTES:
            print(f"facetrec: building a {self.kind} index over {n:,} x {d} vectors, about {est / 2**20:,.0f} MiB "
                  f"({self._p})", file=sys.stderr, flush=True)
        stored = self._stored(x)
        inner = self._make(stored)
        index = faiss.IndexIDMap(inner)
        index.add_with_ids(stored, i)
        self._index, self._inner, self._dim = index, inner, d
        self._apply_search_params()

    def _stored(self, x: np.ndarray) -> np.ndarray:
        """The vectors the faiss index holds for items `x` (N, D): `x` itself unless a kind transforms them."""
        return x

    def _stored_queries(self, q: np.ndarray) -> np.ndarray:
        """The queries the faiss index is searched with, matching `_stored`: `q` itself by default."""
        return q

    def _inner_products(self, q: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """faiss's scores (Q, k) for queries `q` turned into inner products: already those by default."""
        return raw

    def _apply_search_params(self) -> None:
        pass

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores (Q, k) float32 descending, ids (Q, k) int64; -1 / -inf where fewer than k found."""
        self._built()
        q = _check_queries(queries, self._dim, k)
        raw, ids = self._index.search(self._stored_queries(q), int(k))
        scores = self._inner_products(q, raw)
        scores[ids < 0] = -np.inf  # faiss pads with -FLT_MAX
        return scores, ids

    def save(self, path: str | Path) -> None:
        """Write the index in faiss's own format (faiss.read_index reads it), atomically."""
        self._built()
        atomic_write(path, lambda f: faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write)))

    @classmethod
    def load(cls, path: str | Path) -> _FaissIndex:
        """Read an index written by `save`; it must be of this class's kind."""
        index = load_index(path)
        if not isinstance(index, cls):
            raise ValueError(f"{path} holds an index of kind {index.kind!r}, not {cls.kind!r}; "
                             f"use load_index(path) to read any kind")
        return index

    @classmethod
    def _wrap(cls, index: Any, inner: Any, params: dict[str, Any]) -> _FaissIndex:
        obj = cls.__new__(cls)
        _FaissIndex.__init__(obj)
        obj._index, obj._inner, obj._dim, obj._p = index, inner, int(index.d), params
        obj._requested = dict(params)
        return obj


class ExactIndex(_FaissIndex):
    """Exact inner-product top-k: faiss IndexFlatIP, or a numpy matmul + argpartition without faiss.

    Args:
        backend: "auto" (faiss when installed), "faiss" or "numpy"; in a config
            `train.index_params: {backend: numpy}`.

    Example:
        >>> idx = ExactIndex(); idx.build(np.eye(3, dtype=np.float32), np.array([1, 2, 3]))
        >>> idx.search(np.array([[0, 1, 0]], dtype=np.float32), 1)[1].tolist()
        [[2]]
    """

    kind = "exact"
    PARAMS: ClassVar[dict[str, Any]] = {"backend": "auto"}
    BACKENDS = ("auto", "faiss", "numpy")
    QUERY_CHUNK_FLOATS = 1 << 24  # numpy path: score at most this many (query, item) pairs at once

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        backend = self.resolve_params(0, 0, {"backend": backend})["backend"]
        if backend == "faiss":
            _need_faiss("backend='faiss'")
        self.backend = "faiss" if backend == "auto" and faiss is not None else ("numpy" if backend == "auto" else backend)
        self._vectors: np.ndarray | None = None  # numpy backend
        self._ids: np.ndarray | None = None

    @classmethod
    def resolve_params(cls, n: int, d: int, params: dict[str, Any]) -> dict[str, Any]:
        p = super().resolve_params(n, d, params)
        if p["backend"] not in cls.BACKENDS:
            raise ConfigError(f"exact index backend must be one of {', '.join(map(repr, cls.BACKENDS))}, "
                              f"got {p['backend']!r} (e.g. train.index_params: {{backend: numpy}})")
        return p

    @property
    def params(self) -> dict[str, Any]:
        """The backend in effect ("faiss" or "numpy"; "auto" resolved)."""
        return {"backend": self.backend}

    @property
    def ntotal(self) -> int:
        return len(self._ids) if self.backend == "numpy" and self._ids is not None else super().ntotal

    def _built(self) -> None:
        if self.backend == "numpy":
            if self._vectors is None:
                raise RuntimeError("this exact index is empty; call build(vectors, ids) or load_index(path) first")
        else:
            super()._built()

    def _make(self, x: np.ndarray) -> Any:
        return faiss.IndexFlatIP(x.shape[1])

    def build(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if self.backend == "faiss":
            return super().build(vectors, ids)
        self._vectors, self._ids = _check_build_inputs(vectors, ids)
        self._dim = self._vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "faiss":
            return super().search(queries, k)
        self._built()
        assert self._vectors is not None and self._ids is not None
        q = _check_queries(queries, self._dim, k)
        n, k = len(self._ids), int(k)
        kk = min(k, n)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        step = max(1, self.QUERY_CHUNK_FLOATS // n)
        for lo in range(0, len(q), step):
            s = q[lo:lo + step] @ self._vectors.T  # (q, N)
            top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < n else np.broadcast_to(np.arange(n), s.shape)
            ts = np.take_along_axis(s, top, axis=1)
            order = np.argsort(-ts, axis=1, kind="stable")
            scores[lo:lo + step, :kk] = np.take_along_axis(ts, order, axis=1)
            ids[lo:lo + step, :kk] = self._ids[np.take_along_axis(top, order, axis=1)]
        return scores, ids

    def save(self, path: str | Path) -> None:
        if self.backend == "faiss":
            return super().save(path)
        self._built()
        atomic_write(path, lambda f: np.savez(f, vectors=self._vectors, ids=self._ids))


class HNSWIndex(_FaissIndex):
    """Graph index (faiss IndexHNSWFlat, inner product): fast on large catalogues, approximate.

    Args:
        M: neighbours per node (memory grows with 2·M links per item; 16–64 usual).
        efConstruction: candidate list while building (higher = better graph, slower build).
        efSearch: candidate list while searching (higher = better recall, slower queries);
            faiss uses max(efSearch, k), so set it well above the k you search for (top_m). Change it after building with `index.efSearch = ...`.
        space: "ip" builds the graph on inner product itself. "l2" builds it on a metric instead:
            every item gets one more coordinate sqrt(R² − ‖x‖²) (R = the largest item norm), so all
            items have length R and the largest inner product is the nearest neighbour in L2
            (Bachrach et al., RecSys 2014); queries get a 0 there and scores are turned back into
            inner products. An inner-product graph can leave items unreachable (its recall stops
            short of 1 however large efSearch gets, seen on weakly trained vectors); the L2 graph
            reaches exact search as efSearch grows, but at equal efSearch it is often the less
            accurate one, so "ip" is the default: measure both on your vectors
            (benchmarks/index_recall.py --space ip l2; docs/benchmarks.md, "The graph's space").

    Example:
        >>> idx = HNSWIndex(M=16, efSearch=64); idx.build(np.eye(4, dtype=np.float32), np.arange(1, 5))
        >>> idx.search(np.eye(4, dtype=np.float32)[:1], 1)[1].tolist()
        [[1]]
    """

    kind = "hnsw"
    PARAMS: ClassVar[dict[str, Any]] = {"M": 32, "efConstruction": 200, "efSearch": 256, "space": "ip"}
    SPACES = ("ip", "l2")

    def __init__(self, M: int = 32, efConstruction: int = 200, efSearch: int = 256, space: str = "ip") -> None:
        super().__init__()
        self._requested = {"M": M, "efConstruction": efConstruction, "efSearch": efSearch, "space": space}
        self._p = self.resolve_params(1, 1, self._requested)
        self._r2 = 0.0  # space "l2": R², every stored (lengthened) item's squared norm

    @classmethod
    def resolve_params(cls, n: int, d: int, params: dict[str, Any]) -> dict[str, Any]:
        p = super().resolve_params(n, d, params)
        if p["space"] not in cls.SPACES:
            raise ConfigError(f"hnsw index space must be one of {', '.join(map(repr, cls.SPACES))}, got {p['space']!r} "
                              f"(e.g. train.index_params: {{space: l2}})")
        return {name: p[name] if name == "space" else _positive_int("hnsw", name, p[name], 1024 if name == "M" else 1 << 20)
                for name in cls.PARAMS}

    def _make(self, x: np.ndarray) -> Any:
        metric = faiss.METRIC_L2 if self._p["space"] == "l2" else faiss.METRIC_INNER_PRODUCT
        inner = faiss.IndexHNSWFlat(x.shape[1], self._p["M"], metric)  # x already lengthened for "l2"
        inner.hnsw.efConstruction = self._p["efConstruction"]
        return inner

    def _stored(self, x: np.ndarray) -> np.ndarray:
        if self._p["space"] != "l2":
            return x
        sq = np.einsum("nd,nd->n", x, x, dtype=np.float64)  # (N,)
        self._r2 = float(sq.max())
        return np.hstack([x, np.sqrt(self._r2 - sq)[:, None].astype(np.float32)])  # (N, D + 1), all of length R

    def _stored_queries(self, q: np.ndarray) -> np.ndarray:
        return q if self._p["space"] != "l2" else np.hstack([q, np.zeros((len(q), 1), np.float32)])

    def _inner_products(self, q: np.ndarray, raw: np.ndarray) -> np.ndarray:
        if self._p["space"] != "l2":
            return raw
        # ‖q − x'‖² = ‖q‖² + R² − 2 q·x, so q·x = (‖q‖² + R² − ‖q − x'‖²) / 2: descending as the distance ascends
        return ((np.einsum("qd,qd->q", q, q, dtype=np.float64)[:, None] + self._r2 - raw) / 2).astype(np.float32)

    def _apply_search_params(self) -> None:
        self._inner.hnsw.efSearch = self._p["efSearch"]

    @property
    def efSearch(self) -> int:
        return self._p["efSearch"]

    @efSearch.setter
    def efSearch(self, value: int) -> None:
        self._p["efSearch"] = self._requested["efSearch"] = _positive_int("hnsw", "efSearch", value, 1 << 20)
        if self._inner is not None:
            self._apply_search_params()


class IVFIndex(_FaissIndex):
    """Inverted-file index (faiss IndexIVFFlat, inner product): k-means lists, search the nprobe closest.

    Args:
        nlist: number of lists; default about 4·sqrt(N) (at most N / 39, faiss's k-means minimum).
        nprobe: lists visited per query (higher = better recall, slower; values above nlist act as
            nlist, i.e. exact); default max(8, nlist / 16). Change it after building with
            `index.nprobe = ...`.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
        >>> idx = IVFIndex(nlist=16, nprobe=16); idx.build(x, np.arange(1, 2001))  # nprobe = nlist: exact
    """

    kind = "ivf"
    PARAMS: ClassVar[dict[str, Any]] = {"nlist": None, "nprobe": None}
    TRAIN_POINTS_PER_LIST = 256  # k-means sees at most this many points per list (faiss's own cap)

    def __init__(self, nlist: int | None = None, nprobe: int | None = None) -> None:
        super().__init__()
        self._requested = {"nlist": nlist, "nprobe": nprobe}
        self._p = self.resolve_params(0, 1, self._requested)

    @classmethod
    def resolve_params(cls, n: int, d: int, params: dict[str, Any]) -> dict[str, Any]:
        p = super().resolve_params(n, d, params)
        if p["nlist"] is None:
            p["nlist"] = default_nlist(n) if n else None
        else:
            p["nlist"] = _positive_int(cls.kind, "nlist", p["nlist"])
            if n and p["nlist"] > n:
                raise ConfigError(f"{cls.kind} nlist={p['nlist']} exceeds the {n} items to index; use about "
                                  f"4*sqrt(n) = {default_nlist(n)} (or leave nlist unset)")
        if p["nprobe"] is None:
            p["nprobe"] = default_nprobe(p["nlist"]) if p["nlist"] else None
        else:
            p["nprobe"] = _positive_int(cls.kind, "nprobe", p["nprobe"])
        return p

    def _train(self, inner: Any, x: np.ndarray) -> None:
        cap = self.TRAIN_POINTS_PER_LIST * self._p["nlist"]
        sample = x if len(x) <= cap else x[np.random.default_rng(0).choice(len(x), cap, replace=False)]
        inner.train(sample)

    def _make(self, x: np.ndarray) -> Any:
        self._quantizer = faiss.IndexFlatIP(x.shape[1])  # kept referenced: the IVF index does not own it
        inner = faiss.IndexIVFFlat(self._quantizer, x.shape[1], self._p["nlist"], faiss.METRIC_INNER_PRODUCT)
        self._train(inner, x)
        return inner

    def _apply_search_params(self) -> None:
        self._inner.nprobe = min(self._p["nprobe"], self._p["nlist"])

    @property
    def nprobe(self) -> int:
        return self._p["nprobe"]

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._p["nprobe"] = self._requested["nprobe"] = _positive_int(self.kind, "nprobe", value)
        if self._inner is not None:
            self._apply_search_params()


class IVFPQIndex(IVFIndex):
    """IVF with product-quantized vectors (faiss IndexIVFPQ, inner product): m·nbits/8 bytes per item.

    Scores are approximate (decoded from codes), so both recall and the returned scores are lossy.

    Args:
        nlist: number of lists; default about 4·sqrt(N).
        m: sub-quantizers; must divide D; default the largest divisor of D with >= 4 dims each.
        nbits: bits per sub-quantizer code (<= 16; training needs >= 39·2^nbits items, 8 is usual).
        nprobe: lists visited per query; default max(8, nlist / 16).

    Example:
        >>> idx = IVFPQIndex(nlist=64, m=16, nbits=8, nprobe=16)  # 16 bytes per item at D = 64
    """

    kind = "ivfpq"
    PARAMS: ClassVar[dict[str, Any]] = {"nlist": None, "m": None, "nbits": 8, "nprobe": None}

    def __init__(self, nlist: int | None = None, m: int | None = None, nbits: int = 8, nprobe: int | None = None) -> None:
        _FaissIndex.__init__(self)
        self._requested = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe}
        self._p = self.resolve_params(0, 0, self._requested)

    @classmethod
    def resolve_params(cls, n: int, d: int, params: dict[str, Any]) -> dict[str, Any]:
        p = super().resolve_params(n, d, params)
        p["nbits"] = _positive_int("ivfpq", "nbits", p["nbits"], 16)
        if p["m"] is None:
            p["m"] = default_pq_m(d) if d else None
        else:
            p["m"] = _positive_int("ivfpq", "m", p["m"])
            if d and d % p["m"]:
                divisors = [m for m in range(1, d + 1) if d % m == 0]
                raise ConfigError(f"ivfpq m={p['m']} must divide the dimension {d}; pick one of {divisors}")
        if n and n < (1 << p["nbits"]):
            raise ConfigError(f"ivfpq nbits={p['nbits']} needs at least 2^nbits = {1 << p['nbits']} items to train "
                              f"its codebooks, have {n}; lower nbits or use kind='ivf'/'exact'")
        return p

    def _make(self, x: np.ndarray) -> Any:
        self._quantizer = faiss.IndexFlatIP(x.shape[1])
        inner = faiss.IndexIVFPQ(self._quantizer, x.shape[1], self._p["nlist"], self._p["m"], self._p["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)
        cap = max(self.TRAIN_POINTS_PER_LIST * self._p["nlist"], 256 * (1 << self._p["nbits"]))
        sample = x if len(x) <= cap else x[np.random.default_rng(0).choice(len(x), cap, replace=False)]
        inner.train(sample)
        return inner


_CLASSES: dict[str, type[_FaissIndex]] = {"exact": ExactIndex, "hnsw": HNSWIndex, "ivf": IVFIndex, "ivfpq": IVFPQIndex}


class ShardedIndex:
    """S sub-indexes of one kind over disjoint slices of the catalogue; a search asks each for its
    top-k and merges the S lists by score.

    For catalogues whose one index does not fit: the shards are built one after the other, so
    build temporaries (k-means training sets, HNSW construction) are those of one shard, and
    each shard could be served by its own process. The merge loses nothing: the top-k of the
    union of the shards' top-k lists is the top-k over all items (exact shards give exact
    results; approximate shards give what their own recall gives). Item i of the build goes to
    shard i mod S. One file on disk (`save` / `load_index`).

    Args:
        kind: the sub-indexes' kind, one of `KINDS`.
        shards: S >= 1.
        **params: the kind's parameters, applied to every shard; derived ones (nlist, m, nprobe)
            default from each shard's own size.

    Example:
        >>> x = np.eye(4, dtype=np.float32)
        >>> idx = ShardedIndex("exact", 2); idx.build(x, np.arange(1, 5))
        >>> idx.search(x[2:3] + x[1:2] * 0.5, 2)[1].tolist()  # item 3 from shard 0, item 2 from shard 1
        [[3, 2]]
    """

    def __init__(self, kind: str = "exact", shards: int = 2, **params: Any) -> None:
        cls = _CLASSES.get(kind)
        if cls is None:
            raise ConfigError(f"index kind {kind!r} must be one of {', '.join(KINDS)}")
        cls.check_param_names(params)
        self.kind = kind
        self.n_shards = _positive_int(kind, "shards", shards)
        self._requested = dict(params)
        self._shards: list[ANNIndex] = []

    def __repr__(self) -> str:
        return f"ShardedIndex({self.kind!r}, shards={self.n_shards}, ntotal={self.ntotal}, dim={self.dim})"

    @property
    def shards(self) -> list[ANNIndex]:
        return list(self._shards)

    @property
    def ntotal(self) -> int:
        return sum(sh.ntotal for sh in self._shards)

    @property
    def dim(self) -> int:
        return self._shards[0].dim if self._shards else 0

    @property
    def params(self) -> dict[str, Any]:
        """The parameters as given (derived ones None) and `shards`: what `build_index` rebuilds it from."""
        return {**self._requested, "shards": self.n_shards}

    def build(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Index `vectors` (N, D) under `ids` (N,), row i in shard i mod S; replaces any previous content."""
        x, i = _check_build_inputs(vectors, ids)
        n, d = x.shape
        S = self.n_shards
        if n < S:
            raise ConfigError(f"shards={S} exceeds the {n} items to index; use fewer shards")
        est = memory_estimate_bytes(n, d, self.kind, self.params)
        if est >= LARGE_INDEX_BYTES:
            print(f"facetrec: building {S} {self.kind} shards over {n:,} x {d} vectors, about {est / 2**20:,.0f} MiB "
                  f"in all ({self._requested})", file=sys.stderr, flush=True)
        self._shards = []
        for s in range(S):
            sub = _CLASSES[self.kind](**self._requested)
            sub.build(x[s::S], i[s::S])  # a copy of 1/S of the vectors at a time
            self._shards.append(sub)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over all shards: scores (Q, k) descending, ids (Q, k); -1 / -inf where fewer found."""
        if not self._shards:
            raise RuntimeError("this sharded index is empty; call build(vectors, ids) or load_index(path) first")
        q = _check_queries(queries, self.dim, k)
        k = int(k)
        found = [sh.search(q, k) for sh in self._shards]  # S x ((Q, k), (Q, k))
        scores = np.concatenate([f[0] for f in found], axis=1)  # (Q, S·k)
        ids = np.concatenate([f[1] for f in found], axis=1)  # (Q, S·k)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k); missing (-inf) last
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)

    def save(self, path: str | Path) -> None:
        """One file, atomically: magic, a JSON header line, then per shard its length and its own index file."""
        if not self._shards:
            raise RuntimeError("this sharded index is empty; call build(vectors, ids) first")

        def write(f) -> None:
            f.write(_SHARDS_MAGIC)
            f.write(json.dumps({"kind": self.kind, "shards": self.n_shards, "params": self._requested}).encode() + b"\n")
            for sh in self._shards:
                at = f.tell()
                f.write(struct.pack("<Q", 0))
                if isinstance(sh, ExactIndex) and sh.backend == "numpy":
                    np.savez(f, vectors=sh._vectors, ids=sh._ids)
                else:
                    faiss.write_index(sh._index, faiss.PyCallbackIOWriter(f.write))
                end = f.tell()
                f.seek(at)
                f.write(struct.pack("<Q", end - at - 8))
                f.seek(end)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> ShardedIndex:
        """Read a file written by `save` (`load_index` does this for any kind)."""
        with open(path, "rb") as f:
            if f.read(len(_SHARDS_MAGIC)) != _SHARDS_MAGIC:
                raise ValueError(f"{path} is not a sharded facetrec index")
            head = json.loads(f.readline())
            obj = cls(head["kind"], head["shards"], **head["params"])
            for _ in range(obj.n_shards):
                (length,) = struct.unpack("<Q", f.read(8))
                start = f.tell()
                if f.read(4) == _NPZ_MAGIC:
                    f.seek(start)
                    with np.load(io.BytesIO(f.read(length)), allow_pickle=False) as z:
                        sub = ExactIndex(backend="numpy")
                        sub.build(z["vectors"], z["ids"])
                else:
                    _need_faiss(f"reading the index {path}")
                    f.seek(start)
                    left = [length]

                    def read(n: int) -> bytes:  # never past this shard
                        b = f.read(min(n, left[0]))
                        left[0] -= len(b)
                        return b

                    sub = _from_faiss(faiss.read_index(faiss.PyCallbackIOReader(read)), path)
                f.seek(start + length)
                obj._shards.append(sub)
        return obj


# --------------------------------------------------------------------------- factory / load


def build_index(vectors: np.ndarray, ids: np.ndarray, kind: str = "exact", **params: Any) -> ANNIndex:
    """Build an inner-product index of `kind` over item vectors; `params` are the kind's parameters.

    This is the boundary where a config dict (`train.index_params`) becomes a typed index: unknown
    or invalid parameter names and values raise a ConfigError naming the valid ones.

    Args:
        vectors: (N, D) float32 item vectors (row i is item ids[i]).
        ids: (N,) int64 item ids, all >= 1 (0 is padding and is refused).
        kind: "exact" | "hnsw" | "ivf" | "ivfpq".
        **params: see the table in the module docstring (e.g. efSearch=256 for hnsw), and
            `shards` (> 1: a ShardedIndex of that many sub-indexes of `kind`).

    Example:
        >>> v = np.eye(3, dtype=np.float32)
        >>> build_index(v, np.array([1, 2, 3])).search(v[:1], 2)[1].tolist()
        [[1, 2]]
    """
    cls = _CLASSES.get(kind)
    if cls is None:
        raise ConfigError(f"index kind {kind!r} must be one of {', '.join(KINDS)}")
    params = dict(params)
    shards = _positive_int(kind, "shards", params.pop("shards", 1))
    cls.check_param_names(params)
    index: ANNIndex = ShardedIndex(kind, shards, **params) if shards > 1 else cls(**params)
    index.build(vectors, ids)
    return index


def load_index(path: str | Path) -> ANNIndex:
    """Read any index written by `save` (the kind and its parameters are recovered from the file).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "index.faiss")
        >>> build_index(np.eye(2, dtype=np.float32), np.array([1, 2]), kind="hnsw").save(path)
        >>> back = load_index(path); back.kind, back.search(np.eye(2, dtype=np.float32), 1)[1].tolist()
        ('hnsw', [[1], [2]])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}; build one with build_index(...).save({str(path)!r})")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _NPZ_MAGIC:
        with np.load(path, allow_pickle=False) as z:
            obj = ExactIndex(backend="numpy")
            obj.build(z["vectors"], z["ids"])
        return obj
    if head == _SHARDS_MAGIC[:4]:
        return ShardedIndex.load(path)
    _need_faiss(f"reading the index {path}")
    return _from_faiss(faiss.read_index(str(path)), path)


def _from_faiss(index: Any, path: str | Path) -> ANNIndex:
    """The facetrec index around a faiss index read from `path` (an id map over a known kind)."""
    if not isinstance(index, faiss.IndexIDMap):
        raise ValueError(f"{path} is a faiss index but not one written by facetrec (no id map); rebuild it with build_index")
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSWFlat):
        hnsw = inner.hnsw
        M = int(hnsw.nb_neighbors(1))
        l2 = inner.metric_type == faiss.METRIC_L2
        obj = HNSWIndex._wrap(index, inner, {"M": M, "efConstruction": int(hnsw.efConstruction),
                                             "efSearch": int(hnsw.efSearch), "space": "l2" if l2 else "ip"})
        obj._r2 = 0.0
        if l2:  # the stored items all have length R: read R² back from them, drop the extra coordinate
            stored = faiss.downcast_index(inner.storage).reconstruct_n(0, min(int(inner.ntotal), 1024))
            obj._dim, obj._r2 = int(index.d) - 1, float(np.einsum("nd,nd->n", stored, stored, dtype=np.float64).max(initial=0.0))
        return obj
    if isinstance(inner, faiss.IndexIVFPQ):
        return IVFPQIndex._wrap(index, inner, {"nlist": int(inner.nlist), "m": int(inner.pq.M),
                                               "nbits": int(inner.pq.nbits), "nprobe": int(inner.nprobe)})
    if isinstance(inner, faiss.IndexIVFFlat):
        return IVFIndex._wrap(index, inner, {"nlist": int(inner.nlist), "nprobe": int(inner.nprobe)})
    if isinstance(inner, faiss.IndexFlat):
        obj = ExactIndex(backend="faiss")
        obj._index, obj._inner, obj._dim = index, inner, int(index.d)
        return obj
    raise ValueError(f"{path} holds a faiss {type(inner).__name__}, which facetrec does not use; rebuild it with build_index")


# --------------------------------------------------------------------------- multi-interest search


def _sorted_row_keys(offsets: np.ndarray, items: np.ndarray, row0: int, rows: int, stride: int) -> np.ndarray:
    """Sorted keys (row - row0)·stride + item of rows row0..row0+rows of a CSR."""
    lo, hi = int(offsets[row0]), int(offsets[row0 + rows])
    owner = np.repeat(np.arange(rows, dtype=np.int64), np.diff(offsets[row0:row0 + rows + 1]))
    real = items[lo:hi] > 0  # padding can never be returned anyway; negatives would alias other rows
    return np.sort(owner[real] * stride + items[lo:hi][real])


def multi_interest_search(index: ANNIndex, interests: np.ndarray, valid: np.ndarray, top_m: int, n: int,
                          exclude: tuple[np.ndarray, np.ndarray] | None = None,
                          chunk_candidates: int = 1 << 21) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-n items per user from K interest vectors, merged by max over interests (SPEC §2.6).

    Every valid interest asks the index for its top-M items; an item's score is the max over the
    user's interests of e_i · v_u^k, and it is credited to the interest giving that max (the lower
    index on an exact tie). Items are de-duplicated, excluded items dropped, and the n best kept.
    Invalid interests are never searched, so they never contribute. `top_m` counts candidates
    *after* exclusion: each of user u's interests takes its top (top_m + |exclude_u|) items, so
    seen items do not crowd out unseen ones (one search per chunk with the chunk's largest k,
    then each user's lists are cut to its own length: results do not depend on the batch).

    Args:
        index: any `ANNIndex` (built with inner product).
        interests: (U, K, D) float32 interest vectors.
        valid: (U, K) bool, True = a real interest.
        top_m: candidates per interest.
        n: results per user.
        exclude: optional CSR (offsets (U+1,), items) of items never to return to each user.
        chunk_candidates: users are processed in chunks of about this many candidates (memory bound).

    Returns:
        ids (U, n) int64 best first, 0 in slots that cannot be filled;
        scores (U, n) float32, -inf in unfilled slots;
        interest (U, n) int64, index k of the retrieving interest, -1 in unfilled slots.

    Example:
        >>> index = build_index(np.eye(3, dtype=np.float32), np.array([1, 2, 3]))
        >>> vecs = np.array([[[1, 0, 0], [0, 2, 0]]], dtype=np.float32)  # one user, K = 2
        >>> ids, scores, which = multi_interest_search(index, vecs, np.array([[True, True]]), top_m=2, n=3,
        ...                                            exclude=(np.array([0, 1]), np.array([3])))
        >>> ids.tolist(), scores.tolist(), which.tolist()  # item 3 was seen; nothing is left for slot 3
        ([[2, 1, 0]], [[2.0, 1.0, -inf]], [[1, 0, -1]])
    """
    x = np.asarray(interests, dtype=np.float32)
    if x.ndim != 3 or x.shape[2] != index.dim:
        raise ValueError(f"interests must be (U, K, {index.dim}), got shape {x.shape}")
    U, K, D = x.shape
    ok = np.asarray(valid)
    if ok.shape != (U, K) or ok.dtype != np.bool_:
        raise ValueError(f"valid must be a bool array of shape ({U}, {K}) (True = real interest), "
                         f"got {ok.dtype} {ok.shape}")
    if not np.isfinite(x[ok]).all():
        raise ValueError("some valid interest vectors contain NaN/inf; check the user tower")
    top_m, n = int(top_m), int(n)
    if top_m < 1 or n < 1:
        raise ValueError(f"top_m and n must be >= 1, got top_m={top_m}, n={n}")
    if exclude is not None:
        ex_off = np.asarray(exclude[0], dtype=np.int64)
        ex_items = np.asarray(exclude[1], dtype=np.int64)
        if ex_off.shape != (U + 1,) or ex_off[0] != 0 or ex_off[-1] != len(ex_items) or (np.diff(ex_off) < 0).any():
            raise ValueError(f"exclude must be a CSR (offsets of shape ({U + 1},) from 0 to len(items), "
                             f"items); got offsets {ex_off.shape} and {len(ex_items)} items")
        ex_len = np.diff(ex_off)

    out_ids = np.zeros((U, n), dtype=np.int64)
    out_scores = np.full((U, n), -np.inf, dtype=np.float32)
    out_which = np.full((U, n), -1, dtype=np.int64)
    m_most = max(1, min(top_m + (int(ex_len.max(initial=0)) if exclude is not None else 0), index.ntotal))
    step = max(1, chunk_candidates // (K * m_most))
    for lo in range(0, U, step):
        hi = min(U, lo + step)
        extra = int(ex_len[lo:hi].max(initial=0)) if exclude is not None else 0
        m = max(1, min(top_m + extra, index.ntotal))  # per chunk: one long history does not slow every user
        mask = ok[lo:hi]  # (u, K)
        rows = hi - lo
        ids = np.full((rows, K, m), -1, dtype=np.int64)  # (u, K, M)
        scores = np.full((rows, K, m), -np.inf, dtype=np.float32)  # (u, K, M)
        if mask.any():
            s, i = index.search(x[lo:hi][mask], m)  # one batched search: (V, M)
            scores[mask], ids[mask] = s, i
        ids = ids.reshape(rows, K * m)  # columns are interest-major: column c came from interest c // M
        scores = scores.reshape(rows, K * m)
        dead = ids <= 0  # faiss's "missing"; padding is never indexed
        if extra:  # each user keeps top_m + |its exclude list| per interest, whoever shares its chunk
            rank = np.arange(K * m) % m  # (K·M,) rank within the interest's result list
            dead |= rank[None, :] >= (top_m + ex_len[lo:hi])[:, None]
        scores[dead] = -np.inf
        # merge by max: order each row by score (stable: lower interest first on ties); within the
        # same id, the first in that order holds the max, the rest are duplicates
        by_score = np.argsort(-scores, axis=1, kind="stable")  # (u, K·M)
        ids_s = np.take_along_axis(ids, by_score, axis=1)
        sc_s = np.take_along_axis(scores, by_score, axis=1)
        by_id = np.argsort(ids_s, axis=1, kind="stable")  # (u, K·M), each id's max first
        ids_by_id = np.take_along_axis(ids_s, by_id, axis=1)
        drop = np.zeros_like(ids_by_id, dtype=bool)  # in id order
        drop[:, 1:] = ids_by_id[:, 1:] == ids_by_id[:, :-1]
        if exclude is not None and ex_off[hi] > ex_off[lo]:
            # rows are id-sorted, so row·stride + id is sorted over the whole chunk: look the (few)
            # excluded items up in the candidates, not the other way round
            stride = int(max(ids.max(initial=0), ex_items[ex_off[lo]:ex_off[hi]].max(initial=0))) + 1
            cand = (np.arange(rows, dtype=np.int64)[:, None] * stride + np.maximum(ids_by_id, 0)).ravel()
            ex_keys = _sorted_row_keys(ex_off, ex_items, lo, rows, stride)
            pos = np.minimum(np.searchsorted(cand, ex_keys), len(cand) - 1)  # first copy = the de-dup survivor
            drop.flat[pos[cand[pos] == ex_keys]] = True
        dropped = np.empty_like(drop)  # the same, in score order
        np.put_along_axis(dropped, by_id, drop, axis=1)
        keep = ~dropped & np.isfinite(sc_s)
        slot = np.cumsum(keep, axis=1) - 1  # output position of each kept candidate
        r, c = np.nonzero(keep & (slot < n))
        out_ids[lo + r, slot[r, c]] = ids_s[r, c]
        out_scores[lo + r, slot[r, c]] = sc_s[r, c]
        out_which[lo + r, slot[r, c]] = by_score[r, c] // m
    return out_ids, out_scores, out_which


def ann_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Recall of an approximate search against exact search: mean over queries of |approx ∩ exact| / |exact|.

    Entries <= 0 (padding 0, faiss's missing -1) are ignored on both sides; queries whose exact
    row is empty are skipped. Compare at the same k (same number of columns).

    Args:
        approx_ids: (Q, k) ids from the approximate index.
        exact_ids: (Q, k) ids from exact search for the same queries.

    Example:
        >>> ann_recall(np.array([[1, 2, 3], [4, 5, 0]]), np.array([[1, 2, 9], [4, 5, 6]]))
        0.6666666666666666
    """
    a = np.asarray(approx_ids, dtype=np.int64)
    e = np.asarray(exact_ids, dtype=np.int64)
    if a.ndim != 2 or e.ndim != 2 or len(a) != len(e):
        raise ValueError(f"approx_ids and exact_ids must be (Q, k) arrays for the same queries, got {a.shape} and {e.shape}")
    stride = int(max(a.max(initial=0), e.max(initial=0))) + 1
    rows = np.arange(len(e), dtype=np.int64)[:, None] * stride
    a_keys = np.unique((rows + a)[a > 0])  # unique: a repeated id counts once
    e_keys = np.unique((rows + e)[e > 0])
    found = np.isin(e_keys, a_keys, assume_unique=True)
    denom = np.bincount(e_keys // stride, minlength=len(e))
    hits = np.bincount(e_keys[found] // stride, minlength=len(e))
    has = denom > 0
    return float((hits[has] / denom[has]).mean()) if has.any() else float("nan")
