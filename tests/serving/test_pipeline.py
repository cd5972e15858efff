"""Recall -> rank without HTTP: the pipeline computes what training and evaluation compute."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from facetrec.data.batches import RankingBatch
from facetrec.serving.pipeline import Pipeline, UnknownItems


@pytest.fixture(scope="module")
def prepared(tiny):
    """The Prepared data the tiny runs were trained on, and the trained models loaded from their runs."""
    import os

    from facetrec.data.dataset import Prepared
    from facetrec.data.prepare import ensure_prepared
    from facetrec.serving.export import _load_run

    old = os.environ.get("FACETREC_CACHE")
    os.environ["FACETREC_CACHE"] = str(tiny.cache)
    try:
        _, _, _, mind, prep = _load_run(tiny.mind)
        _, _, _, dien, _ = _load_run(tiny.dien, prep)
        assert prep.path == ensure_prepared(__import__("facetrec.train.run", fromlist=["load_run_config"])
                                            .load_run_config(tiny.mind), verbose=False)
    finally:
        if old is None:
            os.environ.pop("FACETREC_CACHE", None)
        else:
            os.environ["FACETREC_CACHE"] = old
    return prep, mind, dien


def _user_history(prep, u: int) -> np.ndarray:
    lo = prep.offsets[u - 1]
    return prep.items[lo:lo + prep.counts[u]]


def _users_with(prep, at_least: int) -> list[int]:
    return [u for u in range(1, prep.n_users) if prep.counts[u] >= at_least]


def test_interest_vectors_equal_training_eval(tiny_pipeline, prepared):
    """Serving's interest vectors = train.retrieval.user_interests on the same user and cut-off."""
    from facetrec.train.retrieval import user_interests

    prep, mind, _ = prepared
    users = np.array(_users_with(prep, 25)[:8] + [u for u in range(1, prep.n_users) if prep.counts[u] < 12][:4])
    ends = np.array([prep.counts[u] - 1 for u in users])  # history before each user's last event
    V_train, valid_train = user_interests(mind, prep, users, ends, prep.max_history)
    for row, (u, e) in enumerate(zip(users, ends)):
        V, valid = tiny_pipeline.interest_vectors(_user_history(prep, u)[:e])
        np.testing.assert_array_equal(valid, valid_train[row])
        np.testing.assert_allclose(V, V_train[row], rtol=1e-5, atol=1e-6)


def test_k_prime_counts_all_events_not_the_window(tiny_pipeline):
    """K'_u = floor(log2 |I_u|) over the whole history: 100 events -> 6 interests with K = 8, though the
    model reads a 20-item window (which alone would give 4)."""
    rng = np.random.default_rng(0)
    hist = rng.integers(1, tiny_pipeline.n_items, size=100)
    assert tiny_pipeline.max_history == 20
    assert len(tiny_pipeline.interests(hist)) == 6
    assert len(tiny_pipeline.interests(hist[-20:])) == 4
    assert len(tiny_pipeline.interests(hist[-20:], n_events=100)) == 6
    _, valid = tiny_pipeline.interest_vectors(hist)
    assert valid.sum() == 6


def test_recommend_recall_then_rank(tiny_pipeline, prepared):
    """n distinct unseen items; each credited to the valid interest that scores it highest; ranked by DIEN."""
    prep, mind, dien = prepared
    p = tiny_pipeline
    u = _users_with(prep, 30)[0]
    hist = _user_history(prep, u)
    recs = p.recommend(hist, n=15)
    ids = [p.item_index[str(r.item)] for r in recs]
    assert len(ids) == 15 == len(set(ids)) and not set(ids) & set(hist.tolist())
    V, valid = p.interest_vectors(hist)
    vecs = mind.item_vectors(torch.tensor(ids)).detach().numpy()  # (n, D)
    s = vecs @ V.T  # (n, K)
    s[:, ~valid] = -np.inf
    assert [r.interest for r in recs] == s.argmax(1).tolist()
    np.testing.assert_allclose([r.retrieval_score for r in recs], s.max(1), rtol=1e-4, atol=1e-5)
    # the ranker's score is DIEN's click probability on the 20-item window, as in training batches
    window = torch.from_numpy(hist[-prep.max_history:])[None].expand(len(ids), -1)
    batch = RankingBatch(user=torch.zeros(len(ids), dtype=torch.long), hist=window, hist_mask=window > 0,
                         aux_neg=window, target=torch.tensor(ids), label=torch.zeros(len(ids)))
    with torch.no_grad():
        want = torch.sigmoid(dien(batch)).numpy()
    np.testing.assert_allclose([r.score for r in recs], want, rtol=1e-4, atol=1e-6)
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)


def test_explanations_are_the_strongest_routed_behaviours(tiny_pipeline, prepared):
    prep, mind, _ = prepared
    p = tiny_pipeline
    hist = _user_history(prep, _users_with(prep, 30)[1])
    window = hist[-p.max_history:]
    with torch.no_grad():
        r = mind.route(torch.from_numpy(window)[None], torch.ones(1, len(window), dtype=torch.bool),
                       torch.tensor([len(hist)]))
    w = r.weights[0].numpy()  # (L, K)
    interests = p.interests(hist)
    assert [i.index for i in interests] == np.nonzero(r.valid[0].numpy())[0].tolist()
    for it in interests:
        assert len(it.behaviours) == min(p.explain_top, len(set(window.tolist())))
        assert it.weights == sorted(it.weights, reverse=True)
        # no behaviour outside the list is routed more strongly than the weakest listed one
        listed = {p.item_index[str(b)] for b in it.behaviours}
        others = [w[i, it.index] for i in range(len(window)) if window[i] not in listed]
        assert all(o <= min(it.weights) + 1e-4 for o in others)
        assert 0 <= it.strength < 1
    for rec in p.recommend(hist, n=10):
        assert rec.because == next(i.behaviours for i in interests if i.index == rec.interest)


def test_cold_start_is_popularity(tiny_pipeline, tiny):
    items = pl.read_parquet(tiny.version / "items.parquet").sort("count", "id", descending=[True, False])
    recs = tiny_pipeline.recommend(np.zeros(0, dtype=np.int64), n=7)
    assert [r.item for r in recs] == [int(x) for x in items["raw_id"][:7]]
    assert all(r.interest == -1 and r.because == [] for r in recs)


def test_deterministic_and_exclude_seen_switch(tiny_pipeline, prepared):
    prep, _, _ = prepared
    hist = _user_history(prep, _users_with(prep, 20)[2])
    a = tiny_pipeline.recommend(hist, n=10)
    assert [(r.item, r.score) for r in a] == [(r.item, r.score) for r in tiny_pipeline.recommend(hist, n=10)]
    with_seen = tiny_pipeline.recommend(hist, n=tiny_pipeline.n_items - 1, exclude_seen=False)
    assert {tiny_pipeline.item_index[str(r.item)] for r in with_seen} >= set(hist.tolist())


def test_n_as_large_as_the_catalogue_returns_every_unseen_item_once(tiny_pipeline, prepared):
    prep, _, _ = prepared
    p = tiny_pipeline
    hist = _user_history(prep, _users_with(prep, 20)[3])
    recs = p.recommend(hist, n=p.n_items - 1)
    ids = [p.item_index[str(r.item)] for r in recs]
    assert len(ids) == len(set(ids)) == p.n_items - 1 - len(set(hist.tolist()))  # everything unseen, once


def test_encode_names_unknown_items(tiny_pipeline):
    known = tiny_pipeline.raw_items[1]
    with pytest.raises(UnknownItems, match=r"2 item id\(s\) not in the catalogue: -5, 10000000"):
        tiny_pipeline.encode([known, -5, 10_000_000])
    assert tiny_pipeline.encode([known, -5], drop_unknown=True).tolist() == [1]


def test_artifact_root_and_version_dir_load_the_same(tiny):
    assert Pipeline(tiny.artifact).version == Pipeline(tiny.version).version == tiny.version.name


def test_warm_up_leaves_answers_unchanged(tiny):
    a, b = Pipeline(tiny.artifact), Pipeline(tiny.artifact)
    hist = np.arange(1, 15)
    b.warm_up()
    assert [(r.item, r.score) for r in a.recommend(hist, 10)] == [(r.item, r.score) for r in b.recommend(hist, 10)]


def test_pipeline_device_option(tiny):
    """`serve --device`: the models can run on another device; here, with no GPU, cuda is a clear
    error and auto falls back to the CPU with the same answers."""
    import torch

    from facetrec.errors import ConfigError

    hist = np.array([3, 5, 7], dtype=np.int64)
    auto = Pipeline(tiny.artifact, device="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert [r.item for r in auto.recommend(hist, 5)] == [r.item for r in Pipeline(tiny.artifact).recommend(hist, 5)]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            Pipeline(tiny.artifact, device="cuda")


def test_interest_offsets_travel_to_serving(tiny, tmp_path, monkeypatch):
    """A MIND with per-interest offsets (model.interest_bias) exports and serves: each recommended item's
    retrieval score is max over valid interests of cosine + c_k, as in training's evaluation."""
    from facetrec.config import load_config
    from facetrec.serving.export import _load_run, export
    from facetrec.train.run import train

    from tests.serving.conftest import ROOT

    monkeypatch.setenv("FACETREC_CACHE", str(tiny.cache))
    run = tmp_path / "mind-bias"
    train(load_config(ROOT / "configs" / "synthetic.yaml", [
        f"data.root={tiny.raw}", "train.epochs=1", "train.max_steps=5", "train.batch_size=64", "train.threads=1",
        "train.device=cpu", "model.name=mind", "model.dim=8", "model.n_interests=4", "model.hidden=[16]",
        "model.normalize=true", "model.temperature=0.1", "model.interest_bias=true", "train.n_negatives=50",
        "train.max_eval_users=50", f"run.dir={run}"]), progress=False)
    p = Pipeline(export(run, tmp_path / "artifact", candidates=50, top_m=30))
    _, _, _, mind, prep = _load_run(run)
    hist = _user_history(prep, _users_with(prep, 30)[0])
    V, valid = p.interest_vectors(hist)
    assert V.shape == (4, 9) and valid.sum() > 1 and len(set(np.round(V[valid, 8], 6))) > 1  # offsets differ
    recs = p.recommend(hist, n=10)
    ids = [p.item_index[str(r.item)] for r in recs]
    vecs = mind.item_vectors(torch.tensor(ids)).detach().numpy()  # (n, D + 1), last coordinate 1
    s = vecs[:, :8] @ V[:, :8].T + V[:, 8][None, :]
    s[:, ~valid] = -np.inf
    np.testing.assert_allclose([r.retrieval_score for r in recs], s.max(1), rtol=1e-4, atol=1e-5)
    assert [r.interest for r in recs] == s.argmax(1).tolist()
