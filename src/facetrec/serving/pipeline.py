"""Recall -> rank, without HTTP: what `/recommend` runs (SPEC §2.6, §5).

    history (raw item ids) -> internal ids -> MIND interests (K'_u valid) -> ANN top-M per interest
      -> merge by max over interests (seen items excluded) -> DIEN scores the candidates -> top-N
    (or a multi-task PLE / PLE + UIE ranker: its task chosen at export orders them; UIE's user memories
    and centres come with its weights, so users the training log never saw read their nearest centres)

Each result carries the interest that retrieved it and the behaviours routed most strongly to
that interest (the last-iteration B2I routing weights, `MIND.route(...).weights`, ranked by
`report.explain.explain_interests`: the same code as the report's heatmaps). Users with
no history take the cold-start path: the most popular items of the training log.

Interests are computed exactly as training and evaluation compute them
(`train.retrieval.user_interests` via `data.dataset.retrieval_batch`):
  - the model reads the most recent `max_history` behaviours (the feature map's value);
  - K'_u comes from n_events = |I_u|, the *full* number of the user's events, not the length
    of the truncated window (evaluation passes `ends`, the full count before the target);
    serving passes the store's event count, or the length of an explicit history;
  - the model is in eval mode, so the routing noise uses salt 0: one history, one answer;
  - the user profile embedding (when the model has one, n_users > 0) gets the internal user
    id from the artifact's users.parquet, 0 (unknown) for users the training log never saw.
The ranking model sees the same truncated window, as `ranking_batch` gives it in training.

    p = Pipeline("artifacts/amazon-beauty")
    recs = p.recommend(p.encode(["B0001", "B0002"]), n=10)   # -> [Recommended(item=..., interest=0, because=[...])]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import torch

from facetrec.errors import FacetrecError
from facetrec.serving.artifacts import ArtifactError, load_manifest, resolve_version


class UnknownItems(FacetrecError):
    """Some item ids are not in the model's vocabulary."""

    def __init__(self, ids: Sequence[Any]) -> None:
        self.ids = list(ids)
        shown = ", ".join(map(repr, self.ids[:5])) + (" ..." if len(self.ids) > 5 else "")
        super().__init__(f"{len(self.ids)} item id(s) not in the catalogue: {shown}")


@dataclass
class Recommended:
    item: Any  # raw item id
    score: float  # ranking score (click probability), or the retrieval score when there is no ranker
    retrieval_score: float  # max over interests of e_i · v_u^k
    interest: int  # index of the interest that retrieved it (-1 = cold-start / popularity fill)
    because: list[Any] = field(default_factory=list)  # behaviours routed most strongly to that interest


@dataclass
class Interest:
    index: int
    strength: float  # capsule length in [0, 1): how present the interest is
    behaviours: list[Any]  # raw ids, strongest routing first
    weights: list[float]  # their routing weights


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e}); export again") from None


class Pipeline:
    """A loaded, verified artifact version ready to answer requests.

    Args:
        artifact: an artifact root (follows CURRENT) or one version directory.
        explain_top: behaviours listed per interest in explanations.
        max_exclude: most recent distinct history items excluded from results ("seen").
        search_params: index search-time parameters (efSearch, nprobe).
        device: where the models run: cpu (default), cuda or auto; the index search stays on the CPU.

    Raises:
        ArtifactError: missing / truncated / altered files, or parts that do not fit together
            (feature map, model configs, weights and index must describe one catalogue).
    """

    def __init__(self, artifact: str | Path, explain_top: int = 3, max_exclude: int = 1000,
                 search_params: dict[str, int] | None = None, device: str = "cpu") -> None:
        from facetrec.index.ann import load_index
        from facetrec.train.run import resolve_device

        # the models run here (cpu | cuda | auto); one request is a few small kernels, so the CPU
        # answers sooner (docs/benchmarks.md, "GPU"); the index search stays on the CPU (faiss)
        self.device = resolve_device(device, "--device")

        self.version_dir = resolve_version(artifact)
        self.manifest = load_manifest(self.version_dir)
        self.version = str(self.manifest.get("version", self.version_dir.name))
        d = self.version_dir
        self.feature_map = json.loads((d / "feature_map.json").read_text())
        self.raw_int = self.feature_map.get("raw_id_type") == "int"
        items = pl.read_parquet(d / "items.parquet").sort("id")
        raw = items["raw_id"].to_list()
        self.raw_items: list[Any] = [None] + ([int(x) for x in raw] if self.raw_int else [str(x) for x in raw])
        self.item_index = {str(r): i for i, r in enumerate(self.raw_items) if i > 0}  # keyed by the id as text
        self.n_items = len(self.raw_items)  # incl. padding 0
        fm_items = int(self.feature_map.get("n_items", self.n_items))
        if items["id"].to_list() != list(range(1, self.n_items)) or fm_items != self.n_items:
            raise ArtifactError(f"{d}: items.parquet holds {self.n_items - 1} items (ids must be 1..N), the feature map "
                                f"says n_items = {fm_items}: the files come from different prepared data; export again")
        counts = np.zeros(self.n_items, dtype=np.int64)
        counts[1:] = items["count"].to_numpy()
        self.popular = np.argsort(-counts[1:], kind="stable") + 1  # internal ids, most popular first
        self.max_history = int(self.feature_map["max_history"])
        self.explain_top = explain_top
        self.max_exclude = max_exclude
        with np.load(d / "item_features.npz", allow_pickle=False) as z:
            feats = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
        vocab = {k: int(v["vocab"]) for k, v in self.feature_map["item_fields"].items()}
        parts = self.manifest.get("parts", {})
        if "retrieval" not in parts:
            raise ArtifactError(f"{d}: the manifest has no retrieval part; export a MIND or YouTube DNN run")
        self.retrieval = _build_part(d, "retrieval", self.n_items, feats, vocab).to(self.device)
        self.ranking = _build_part(d, "ranking", self.n_items, feats, vocab).to(self.device) if "ranking" in parts else None
        try:
            self.index = load_index(d / "index.faiss")
        except (ValueError, RuntimeError, OSError) as e:
            raise ArtifactError(f"{d / 'index.faiss'} cannot be read ({e}); export again") from None
        self.set_search_params(search_params or {})
        dim = int(self.retrieval.vector_dim)
        if self.index.ntotal != self.n_items - 1 or self.index.dim != dim:
            raise ArtifactError(f"{d / 'index.faiss'} holds {self.index.ntotal} vectors of dim {self.index.dim}, but the "
                                f"catalogue has {self.n_items - 1} items and the retrieval model dim {dim}: "
                                f"index and model come from different exports; export again")
        # a multi-task ranker (PLE, PLE + UIE) gives one logit per task: the export chose the one that orders
        self.rank_task: str | None = None
        self._task_col = 0
        tasks = list(getattr(getattr(self.ranking, "cfg", None), "tasks", ()) or ())
        if tasks:
            self.rank_task = str(parts["ranking"].get("task", tasks[0]))
            if self.rank_task not in tasks:
                raise ArtifactError(f"{d / 'manifest.json'}: the ranking task {self.rank_task!r} is not one of the ranking "
                                    f"model's tasks ({', '.join(tasks)}); export again with --rank-task")
            self._task_col = tasks.index(self.rank_task)
        self.top_m = int(parts["retrieval"].get("top_m", 200))
        self.n_candidates = int(parts.get("ranking", {}).get("candidates", 200))
        self._users: dict[str, int] | None = None
        needs_users = self.retrieval.cfg.n_users > 0 or (self.ranking is not None and getattr(self.ranking.cfg, "n_users", 0) > 0)
        if needs_users:
            users = pl.read_parquet(d / "users.parquet")
            self._users = {str(r): int(i) for r, i in zip(users["raw_id"].to_list(), users["id"].to_list())}

    # ------------------------------------------------------------ ids

    def encode(self, raw_items: Sequence[Any], drop_unknown: bool = False) -> np.ndarray:
        """Raw item ids (int or str) -> internal ids (L,) int64.

        Raises UnknownItems listing the ids not in the catalogue, or with drop_unknown leaves
        them out (stored histories may hold items a newer catalogue no longer has).
        """
        get = self.item_index.get
        ids = [get(str(r), 0) for r in raw_items]
        if drop_unknown:
            return np.asarray([i for i in ids if i], dtype=np.int64)
        if 0 in ids:
            raise UnknownItems([r for r, i in zip(raw_items, ids) if i == 0])
        return np.asarray(ids, dtype=np.int64)

    def user_id(self, raw_user: Any) -> int:
        """Internal user id for the models' profile embeddings; 0 = unknown (or not needed)."""
        if self._users is None or raw_user is None:
            return 0
        return self._users.get(str(raw_user), 0)

    def _window(self, hist: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input: the most recent max_history behaviours, (1, L) ids and (1, L) mask."""
        h = torch.from_numpy(np.ascontiguousarray(self._recent(hist))).view(1, -1).to(self.device)  # (1, L)
        return h, torch.ones_like(h, dtype=torch.bool)

    def _recent(self, hist: np.ndarray) -> np.ndarray:
        """The window the model reads, on the host (explanations index it; no copy back from the device)."""
        return hist[-self.max_history:]

    def _event_count(self, hist: np.ndarray, n_events: int | None) -> int:
        """|I_u|: the given count (the store's), else the history's length; never below the window read."""
        return max(int(n_events) if n_events is not None else len(hist), min(len(hist), self.max_history))

    def _route(self, hist: np.ndarray, n_events: int | None):
        h, m = self._window(hist)
        n = self._event_count(hist, n_events)
        return h, m, self.retrieval.route(h, m, torch.tensor([n], device=self.device))  # eval mode: salt 0

    def _explain(self, r, window: np.ndarray) -> dict[int, Interest]:
        """Each valid interest with the distinct behaviours routed most strongly to it, strongest first.

        The ranking of behaviours is `report.explain.explain_interests`, the code behind the
        report's routing heatmaps; a behaviour repeated in the history is listed once.
        """
        from facetrec.report.explain import explain_interests

        out = {}
        for e in explain_interests(type(r)(*(x.cpu() for x in r)), top=len(window)):
            items, ws = [], []
            for pos, w in zip(e.positions, e.weights):
                raw = self.raw_items[int(window[pos])]
                if raw not in items:
                    items.append(raw)
                    ws.append(w)
                if len(items) >= self.explain_top:
                    break
            out[e.index] = Interest(e.index, e.strength, items, ws)
        return out

    # ------------------------------------------------------------ requests

    @torch.inference_mode()
    def interests(self, hist: np.ndarray, n_events: int | None = None) -> list[Interest]:
        """The user's valid interests (K'_u of them) with their strength and the behaviours routed to each."""
        if len(hist) == 0:
            return []
        _, _, r = self._route(hist, n_events)
        return list(self._explain(r, self._recent(hist)).values())

    @torch.inference_mode()
    def interest_vectors(self, hist: np.ndarray, n_events: int | None = None, user: Any = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Interest vectors V (K, D) float32 and validity (K,) bool for a non-empty history: what queries the index."""
        _, _, r = self._route(np.asarray(hist, dtype=np.int64), n_events)
        V = self.retrieval.interests_from_capsules(r.capsules, r.valid, torch.tensor([self.user_id(user)], device=self.device))
        return V[0].float().cpu().numpy(), r.valid[0].cpu().numpy()  # (K, D), (K,)

    @torch.inference_mode()
    def recommend(self, hist: np.ndarray, n: int, exclude_seen: bool = True, n_events: int | None = None,
                  user: Any = None, exclude: np.ndarray | None = None) -> list[Recommended]:
        """Top-n items for a history of internal ids, oldest first (empty -> cold-start popularity).

        Args:
            hist: (L,) internal item ids; the model reads the last max_history, exclusion uses
                the last `max_exclude` distinct ones.
            n: results wanted (fewer come back only when exclusion leaves fewer items).
            exclude_seen: leave out items in the history.
            n_events: |I_u| for K'_u (default len(hist)).
            user: raw user id, for models with a profile embedding.
            exclude: internal ids never to return (a basket, items already shown), on every path.
        """
        from facetrec.index.ann import multi_interest_search

        n = max(1, min(int(n), self.n_items - 1))
        hist = np.asarray(hist, dtype=np.int64)
        seen = _recent_distinct(hist, self.max_exclude) if exclude_seen else np.zeros(0, dtype=np.int64)
        if exclude is not None and len(exclude):
            seen = np.union1d(seen, np.asarray(exclude, dtype=np.int64))
        if len(hist) == 0:
            return self._fill([], n, seen)
        h, m, r = self._route(hist, n_events)
        uid = self.user_id(user)
        vecs = self.retrieval.interests_from_capsules(r.capsules, r.valid, torch.tensor([uid], device=self.device))  # (1, K, D)
        want = max(n, self.n_candidates if self.ranking is not None else n)
        ids, scores, which = multi_interest_search(self.index, vecs.float().cpu().numpy(), r.valid.cpu().numpy(),
                                                   max(self.top_m, want), want, (np.array([0, len(seen)]), seen))
        keep = ids[0] > 0
        ids, scores, which = ids[0][keep], scores[0][keep], which[0][keep]
        final = scores.astype(np.float64)
        if self.ranking is not None and len(ids):
            cand = torch.from_numpy(ids).to(self.device)
            if self.rank_task is None:
                logits = self.ranking.score_candidates(h[0], m[0], cand, user=uid)  # (N,)
            else:  # (N, K) -> the export's task; the whole history's length, as training's samples give it
                logits = self.ranking.score_candidates(h[0], m[0], cand, user=uid,
                                                       n_events=self._event_count(hist, n_events))[:, self._task_col]
            final = torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)
        order = np.argsort(-final, kind="stable")[:n]
        why = self._explain(r, self._recent(hist))
        out = [Recommended(self.raw_items[int(ids[i])], float(final[i]), float(scores[i]), int(which[i]),
                           why[int(which[i])].behaviours) for i in order]
        return self._fill(out, n, np.concatenate([seen, ids]))

    @torch.inference_mode()
    def similar(self, item: int, n: int) -> list[tuple[Any, float]]:
        """The n items nearest to internal item `item` in the retrieval model's item space, through the
        same index that recall searches (inner product; cosine under `normalize`): (raw id, score), best
        first, the item itself left out."""
        from facetrec.index.ann import multi_interest_search

        n = max(1, min(int(n), self.n_items - 2))
        v = self.retrieval.item_vectors(torch.tensor([int(item)], device=self.device)).float().cpu().numpy()  # (1, D)
        ids, scores, _ = multi_interest_search(self.index, v[:, None, :], np.ones((1, 1), dtype=bool), n, n,
                                               (np.array([0, 1]), np.array([int(item)], dtype=np.int64)))
        keep = ids[0] > 0
        return [(self.raw_items[int(i)], float(s)) for i, s in zip(ids[0][keep], scores[0][keep])]

    def model_specs(self) -> tuple:
        """What the version's models are (class and typed config per part): two versions with equal specs
        run the same code on the same shapes, only with other weights."""
        return tuple((type(m).__name__, getattr(m, "cfg", None)) for m in (self.retrieval, self.ranking) if m is not None)

    SEARCH_PARAMS = {"hnsw": ("efSearch",), "ivf": ("nprobe",), "ivfpq": ("nprobe",), "exact": ()}

    def set_search_params(self, params: dict[str, int]) -> None:
        """Change the index's search-time parameters (HNSW efSearch, IVF nprobe) without rebuilding it.

        Raises:
            ArtifactError: a parameter the artifact's index kind does not take at search time.
        """
        kind = getattr(self.index, "kind", "exact")
        allowed = self.SEARCH_PARAMS.get(kind, ())
        for key, value in params.items():
            if key not in allowed:
                raise ArtifactError(f"search parameter {key!r} does not apply to this artifact's {kind} index; "
                                    f"it takes {', '.join(allowed) or 'none'}")
            try:
                setattr(self.index, key, int(value))
            except (ValueError, TypeError) as e:
                raise ArtifactError(f"search parameter {key}={value!r}: {e}") from None

    def warm_up(self, pause: float = 0.0) -> None:
        """Run every history length once, so that first requests do not pay for TorchScript's
        per-shape profiling and optimisation (a p99 spike otherwise). `pause` seconds between calls
        hand the CPU and the GIL back to the requests a live version is answering meanwhile."""
        import time

        hist = self.popular[: self.max_history + 1].astype(np.int64)
        for L in range(1, len(hist) + 1):
            self.recommend(hist[:L], n=min(10, self.n_items - 1))
            if pause > 0:
                time.sleep(pause)

    def _fill(self, out: list[Recommended], n: int, skip: np.ndarray) -> list[Recommended]:
        """Top up with popular items (cold start, tiny catalogues, heavy exclusion)."""
        if len(out) >= n:
            return out
        taken = set(skip.tolist())
        for i in self.popular:
            if len(out) >= n:
                break
            if int(i) not in taken:
                out.append(Recommended(self.raw_items[int(i)], 0.0, 0.0, -1, []))
        return out


def one_model_thread() -> None:
    """One torch and one faiss thread in this process: serving workers and `recommend --workers` processes
    are the parallelism (two threads per worker showed multi-second p99 stalls, SPEC §7)."""
    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:  # pragma: no cover - the exact numpy index without the `ann` extra
        pass


STORE_READ = 1000  # most recent stored events read per user (model window + seen-item exclusion)


def stored_history(pipeline: Pipeline, items: list[str], count: int) -> tuple[np.ndarray, int]:
    """A user's model input from the store, for the API and `facetrec recommend` alike: the most recent
    `items` (raw ids, oldest first) -> internal ids, skipping those the catalogue no longer has, and the
    event count K'_u reads (`count` minus the skipped ones among them)."""
    hist = pipeline.encode(items, drop_unknown=True)
    return hist, count - (len(items) - len(hist))


def _recent_distinct(hist: np.ndarray, k: int) -> np.ndarray:
    """The last k distinct ids of hist (any order)."""
    rev = hist[::-1]
    _, first = np.unique(rev, return_index=True)
    return rev[np.sort(first)[:k]]


def _build_part(d: Path, part: str, n_items: int, feats: dict[str, torch.Tensor], vocab: dict[str, int]) -> torch.nn.Module:
    from facetrec.train.build import model_from_spec

    try:
        spec = json.loads((d / f"{part}.config.json").read_text())
        cfg_items = int(spec["config"]["n_items"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{d / (part + '.config.json')} is missing or not a model spec ({e}); export again") from None
    if cfg_items != n_items:
        raise ArtifactError(f"{part} model was trained for {cfg_items - 1} items, the artifact's catalogue has {n_items - 1}: "
                            f"the parts come from different prepared data; export again")
    try:
        model = model_from_spec(spec, feats, vocab)
    except (FacetrecError, ValueError) as e:
        raise ArtifactError(f"{d / (part + '.config.json')} does not fit the artifact's feature map: {e}") from None
    state = load_state_dict_file(d / f"{part}.safetensors")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ArtifactError(f"{d / (part + '.safetensors')} does not fit {part}.config.json: {str(e)[:300]}") from None
    if missing or unexpected:
        raise ArtifactError(f"{d / (part + '.safetensors')} does not fit {part}.config.json: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model
