"""Recall -> rank, without HTTP: what `/recommend` runs (SPEC §2.6, §5).

    history (raw item ids) -> internal ids -> MIND interests (K'_u valid) -> ANN top-M per interest
      -> merge by max over interests (seen items excluded) -> DIEN scores the candidates -> top-N

Each result carries the interest that retrieved it and the behaviours routed most strongly to
that interest (from the routing weights: the same code the report's heatmaps use). Users with
no history take the cold-start path: the most popular items.
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
        shown = ", ".join(map(str, self.ids[:5])) + (" ..." if len(self.ids) > 5 else "")
        super().__init__(f"{len(self.ids)} item id(s) not in the catalogue: {shown}")


@dataclass
class Recommended:
    item: Any  # raw item id
    score: float  # ranking score (click probability) or retrieval score when no ranker
    retrieval_score: float
    interest: int  # index of the interest that retrieved it (-1 = cold-start path)
    because: list[Any] = field(default_factory=list)  # behaviours routed most strongly to that interest


@dataclass
class Interest:
    index: int
    strength: float  # capsule length in (0, 1): how present the interest is
    behaviours: list[Any]  # raw ids, strongest routing first
    weights: list[float]


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class Pipeline:
    """A loaded, verified artifact version ready to answer requests (one thread per worker)."""

    def __init__(self, artifact: str | Path, explain_top: int = 3) -> None:
        from facetrec.index.ann import load_index

        self.version_dir = resolve_version(artifact)
        self.manifest = load_manifest(self.version_dir)
        d = self.version_dir
        self.feature_map = json.loads((d / "feature_map.json").read_text())
        self.raw_int = self.feature_map.get("raw_id_type") == "int"
        items = pl.read_parquet(d / "items.parquet").sort("id")
        raw = items["raw_id"].to_list()
        self.raw_items: list[Any] = [None] + ([int(x) for x in raw] if self.raw_int else raw)
        self.item_index = {str(r): i for i, r in enumerate(self.raw_items) if i > 0}  # keyed by the id as text
        self.n_items = len(self.raw_items)
        counts = np.zeros(self.n_items, dtype=np.int64)
        counts[items["id"].to_numpy()] = items["count"].to_numpy()
        self.popular = np.argsort(-counts[1:], kind="stable") + 1
        self.max_history = int(self.feature_map["max_history"])
        self.explain_top = explain_top
        with np.load(d / "item_features.npz", allow_pickle=False) as z:
            feats = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
        vocab = {k: int(v["vocab"]) for k, v in self.feature_map["item_fields"].items()}
        parts = self.manifest.get("parts", {})
        if "retrieval" not in parts:
            raise ArtifactError(f"{d}: the manifest has no retrieval part; export a MIND or YouTube DNN run")
        self.retrieval = _build_part(d, "retrieval", parts["retrieval"], feats, vocab)
        self.ranking = _build_part(d, "ranking", parts["ranking"], feats, vocab) if "ranking" in parts else None
        self.index = load_index(d / "index.faiss")
        self.top_m = int(parts["retrieval"].get("top_m", 200))
        self.n_candidates = int(parts.get("ranking", {}).get("candidates", 200))

    # ------------------------------------------------------------ ids

    def encode(self, raw_items: Sequence[Any]) -> np.ndarray:
        """Raw item ids (int or str) -> internal ids; raises UnknownItems listing those not in the catalogue."""
        ids = [self.item_index.get(str(r), 0) for r in raw_items]
        bad = [r for r, i in zip(raw_items, ids) if i == 0]
        if bad:
            raise UnknownItems(bad)
        return np.asarray(ids, dtype=np.int64)

    def _tensors(self, hist: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hist = hist[-self.max_history:]
        h = torch.from_numpy(hist).view(1, -1)  # (1, L)
        return h, torch.ones_like(h, dtype=torch.bool), torch.tensor([len(hist)])

    # ------------------------------------------------------------ requests

    @torch.no_grad()
    def route(self, hist: np.ndarray):
        h, m, n = self._tensors(hist)
        return self.retrieval.route(h, m, n), hist[-self.max_history:]

    @torch.no_grad()
    def interests(self, hist: np.ndarray) -> list[Interest]:
        """The user's valid interests with their strength and the behaviours routed to each."""
        if len(hist) == 0:
            return []
        r, used = self.route(hist)
        out = []
        w = r.weights[0].numpy()  # (L, K)
        for j in np.nonzero(r.valid[0].numpy())[0]:
            order = np.argsort(-w[:, j], kind="stable")[: self.explain_top]
            out.append(Interest(int(j), float(r.lengths[0, j]), [self.raw_items[used[i]] for i in order],
                                [round(float(w[i, j]), 4) for i in order]))
        return out

    @torch.no_grad()
    def recommend(self, hist: np.ndarray, n: int, exclude_seen: bool = True) -> list[Recommended]:
        """Top-n items for a history of internal ids (empty -> cold-start popularity)."""
        n = max(1, min(int(n), self.n_items - 1))
        if len(hist) == 0:
            return [Recommended(self.raw_items[i], 0.0, 0.0, -1) for i in self.popular[:n]]
        from facetrec.index.ann import multi_interest_search

        r, used = self.route(hist)
        h, m, cnt = self._tensors(hist)
        vecs, valid = self.retrieval.user_interests(h, m, cnt)
        exclude = (np.array([0, len(hist)]), hist) if exclude_seen else None
        want = max(n, self.n_candidates if self.ranking is not None else n)
        ids, scores, which = multi_interest_search(self.index, vecs.numpy().astype(np.float32), valid.numpy(),
                                                   max(self.top_m, want), want, exclude)
        keep = ids[0] > 0
        ids, scores, which = ids[0][keep], scores[0][keep], which[0][keep]
        final = scores.astype(np.float64)
        if self.ranking is not None and len(ids):
            logits = self.ranking.score_candidates(h[0], m[0], torch.from_numpy(ids))
            final = torch.sigmoid(logits.float()).numpy().astype(np.float64)
        order = np.argsort(-final, kind="stable")[:n]
        w = r.weights[0].numpy()  # (L, K)
        out = []
        for i in order:
            j = int(which[i])
            top = np.argsort(-w[:, j], kind="stable")[: self.explain_top]
            out.append(Recommended(self.raw_items[ids[i]], float(final[i]), float(scores[i]), j,
                                   [self.raw_items[used[b]] for b in top]))
        if len(out) < n:  # tiny catalogues or many exclusions: fill from popularity
            seen = set(ids.tolist()) | (set(hist.tolist()) if exclude_seen else set())
            for i in self.popular:
                if len(out) >= n:
                    break
                if int(i) not in seen:
                    out.append(Recommended(self.raw_items[i], 0.0, 0.0, -1))
        return out


def _build_part(d: Path, part: str, info: dict[str, Any], feats, vocab) -> torch.nn.Module:
    from facetrec.train.build import model_from_spec

    spec = json.loads((d / f"{part}.config.json").read_text())
    model = model_from_spec(spec, feats, vocab)
    state = load_state_dict_file(d / f"{part}.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{d / (part + '.safetensors')} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model
