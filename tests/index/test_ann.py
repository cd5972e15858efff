"""ANN layer: exact top-k, merge by max over interests, exclusions, save/load, HNSW/IVF recall."""

from __future__ import annotations

import numpy as np
import pytest

from facetrec.errors import ConfigError
from facetrec.index.ann import ann_recall, build_index, load_index, multi_interest_search


def clustered(n=20000, d=32, c=50, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    x = centres[rng.integers(0, c, n)] + 0.5 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def test_exact_is_the_true_top_k():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(500, 16)).astype(np.float32)
    ids = np.arange(1, 501)
    q = rng.normal(size=(7, 16)).astype(np.float32)
    s, i = build_index(v, ids).search(q, 10)
    truth = np.argsort(-(q @ v.T), axis=1)[:, :10] + 1
    assert (i == truth).all()
    assert np.allclose(s, np.sort(q @ v.T, axis=1)[:, ::-1][:, :10], atol=1e-5)


def test_merge_by_max_hand_case():
    # items: 1 = e0, 2 = e1, 3 = (e0 + e1) / 2, 4 = -e0
    v = np.array([[1, 0], [0, 1], [0.6, 0.6], [-1, 0]], dtype=np.float32)
    index = build_index(v, np.array([1, 2, 3, 4]))
    interests = np.array([[[1, 0], [0, 2]]], dtype=np.float32)  # interest 1 is "stronger" on item 2 and 3
    ids, scores, which = multi_interest_search(index, interests, np.array([[True, True]]), top_m=3, n=3)
    assert ids[0].tolist() == [2, 3, 1]
    assert scores[0].tolist() == pytest.approx([2.0, 1.2, 1.0])
    assert which[0].tolist() == [1, 1, 0]  # item 3 scores .6 via interest 0 and 1.2 via interest 1: max wins


def test_invalid_interests_never_surface_and_exclusion():
    v = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    index = build_index(v, np.array([1, 2, 3]))
    interests = np.array([[[1, 0], [0, 100]]], dtype=np.float32)
    ids, _, which = multi_interest_search(index, interests, np.array([[True, False]]), top_m=3, n=3)
    assert (which[ids > 0] == 0).all()
    ids, scores, _ = multi_interest_search(index, interests, np.array([[True, False]]), top_m=3, n=3,
                                           exclude=(np.array([0, 1]), np.array([1])))
    assert 1 not in ids[0].tolist() and ids[0].tolist()[:2] == [2, 3]
    assert ids[0, 2] == 0 and scores[0, 2] == -np.inf  # nothing left to fill the slot


def test_no_duplicates_across_interests():
    x = clustered(2000, 16, 10)
    index = build_index(x, np.arange(1, 2001))
    rng = np.random.default_rng(1)
    q = rng.normal(size=(20, 4, 16)).astype(np.float32)
    q[:, 1] = q[:, 0] + 1e-3  # near-identical interests retrieve the same items
    ids, _, _ = multi_interest_search(index, q, np.ones((20, 4), bool), top_m=50, n=100)
    for row in ids:
        real = row[row > 0]
        assert len(real) == len(set(real.tolist()))


def test_save_load_round_trip(tmp_path):
    x = clustered(3000, 16, 10)
    for kind in ("exact", "hnsw", "ivf"):
        idx = build_index(x, np.arange(1, 3001), kind=kind)
        idx.save(tmp_path / f"{kind}.faiss")
        back = load_index(tmp_path / f"{kind}.faiss")
        q = x[:5]
        assert (idx.search(q, 10)[1] == back.search(q, 10)[1]).all() and back.kind == kind


def test_hnsw_and_ivf_recall_against_exact():
    x = clustered()
    ids = np.arange(1, len(x) + 1)
    q = clustered(200, seed=5)
    _, exact = build_index(x, ids).search(q, 100)
    _, hnsw = build_index(x, ids, kind="hnsw", ef_search=1024).search(q, 100)
    _, ivf = build_index(x, ids, kind="ivf", nprobe=32).search(q, 100)
    assert ann_recall(hnsw, exact) >= 0.9
    assert ann_recall(ivf, exact) >= 0.9


def test_padding_is_never_indexed_and_bad_params():
    v = np.eye(3, dtype=np.float32)
    assert 0 not in build_index(v, np.array([0, 1, 2])).search(v, 2)[1]
    with pytest.raises(ConfigError, match="unknown hnsw index parameter"):
        build_index(v, np.array([1, 2, 3]), kind="hnsw", efsearch=3)
    with pytest.raises(ConfigError, match="must be one of"):
        build_index(v, np.array([1, 2, 3]), kind="lsh")
