"""Metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from facetrec.eval.metrics import auc, bucket_of, gauc, logloss, topn_by_bucket, topn_metrics


def test_topn_hand_computed():
    ranked = np.array([[5, 1, 7, 2], [9, 8, 0, 0], [4, 3, 2, 1]])
    off = np.array([0, 2, 3, 3])  # user 0: {1, 2}; user 1: {3}; user 2: no targets (skipped)
    items = np.array([1, 2, 3])
    m = topn_metrics(ranked, off, items, ks=(2, 4))
    # user 0: hit at rank 1 within k=2; hits at ranks 1 and 3 within k=4; user 1: no hits
    assert m["recall@2"] == pytest.approx((0.5 + 0) / 2)
    assert m["recall@4"] == pytest.approx((1.0 + 0) / 2)
    assert m["hr@2"] == pytest.approx(0.5) and m["hr@4"] == pytest.approx(0.5)
    idcg2 = 1 + 1 / math.log2(3)
    assert m["ndcg@2"] == pytest.approx(((1 / math.log2(3)) / idcg2) / 2)
    assert m["ndcg@4"] == pytest.approx(((1 / math.log2(3) + 1 / math.log2(5)) / idcg2) / 2)


def test_ndcg_ideal_uses_min_targets_k():
    ranked = np.array([[1, 9, 9, 9]])
    m = topn_metrics(ranked, np.array([0, 5]), np.array([1, 2, 3, 4, 5]), ks=(1,))
    assert m["ndcg@1"] == pytest.approx(1.0) and m["recall@1"] == pytest.approx(0.2)


def test_empty_slots_never_hit():
    m = topn_metrics(np.array([[0, 0]]), np.array([0, 1]), np.array([0]), ks=(2,))
    assert m["hr@2"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_logloss_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 1)  # many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    p = np.clip(rng.random(500), 0.01, 0.99)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)


def test_gauc_matches_weighted_per_user_sklearn():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 40, 2000)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000), 2)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if len(np.unique(y[m])) == 2:
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
    assert gauc(users, y, s) == pytest.approx(num / den, abs=1e-12)


def test_gauc_hand_case_skips_single_class_users():
    users = np.array([1, 1, 1, 2, 2, 3, 3, 3])
    y = np.array([1, 0, 0, 1, 1, 1, 0, 1])
    s = np.array([0.9, 0.1, 0.95, 0.3, 0.4, 0.2, 0.5, 0.8])
    # user 1: pos .9 vs negs .1 (win), .95 (loss) -> 0.5, 3 samples; user 2 single-class: skipped
    # user 3: pos .2, .8 vs neg .5 -> 1 win of 2 -> 0.5, 3 samples
    assert gauc(users, y, s) == pytest.approx(0.5)
    users2, y2, s2 = np.array([1, 1, 2, 2, 2]), np.array([1, 0, 1, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3, 0.1])
    # user 1: 1.0 (2 samples); user 2: pos .2 vs .3 loss, .1 win -> 0.5 (3 samples) -> (2*1 + 3*0.5)/5
    assert gauc(users2, y2, s2) == pytest.approx(3.5 / 5)


def test_buckets():
    assert bucket_of(np.array([1, 5, 6, 20, 21])).tolist() == ["<=5", "<=5", "6-20", "6-20", ">20"]
    ranked = np.array([[1, 2], [3, 4]])
    out = topn_by_bucket(ranked, np.array([0, 1, 2]), np.array([1, 9]), np.array([3, 30]), ks=(1,))
    assert out["<=5"]["recall@1"] == 1.0 and out[">20"]["recall@1"] == 0.0
