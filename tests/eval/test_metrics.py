"""Metrics against scikit-learn, brute-force per-user loops and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from facetrec.eval.metrics import (auc, bucket_labels, bucket_of, gauc, logloss, ranking_by_bucket, topn_by_bucket,
                                   topn_metrics, topn_per_user)

D = [1 / math.log2(r + 2) for r in range(10)]  # DCG discount at 0-based rank r


# --------------------------------------------------------------------------- top-N, by hand


def test_topn_hand_computed():
    ranked = np.array([[5, 1, 7, 2], [9, 8, 0, 0], [4, 3, 2, 1]])
    off = np.array([0, 2, 3, 3])  # user 0: {1, 2}; user 1: {3}; user 2: no targets (skipped)
    items = np.array([1, 2, 3])
    m = topn_metrics(ranked, off, items, ks=(2, 4))
    assert m["users"] == 2
    # user 0 hits at ranks 1 and 3; user 1 never hits
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@4"] == pytest.approx((2 / 2 + 0) / 2)
    assert m["hr@2"] == m["hr@4"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx((D[1] / (D[0] + D[1])) / 2)
    assert m["ndcg@4"] == pytest.approx(((D[1] + D[3]) / (D[0] + D[1])) / 2)


def test_ndcg_ideal_covers_min_of_targets_and_k():
    # 5 targets, k = 1: the ideal list has one relevant slot, so one hit at rank 0 is perfect
    m = topn_metrics(np.array([[1, 9, 9, 9]]), np.array([0, 5]), np.array([1, 2, 3, 4, 5]), ks=(1, 3))
    assert m["ndcg@1"] == pytest.approx(1.0) and m["recall@1"] == pytest.approx(0.2)
    assert m["ndcg@3"] == pytest.approx(D[0] / (D[0] + D[1] + D[2]))


def test_empty_slots_repeats_and_duplicate_targets():
    # 0 is an empty slot, never a hit, even when a (bogus) target 0 is listed
    assert topn_metrics(np.array([[0, 0]]), np.array([0, 1]), np.array([0]), ks=(2,))["users"] == 0
    # a repeated id in the ranking counts once; a target listed twice is one target
    m = topn_per_user(np.array([[7, 7, 3]]), np.array([0, 3]), np.array([7, 7, 4]), ks=(3,))
    assert m["n_targets"][0] == 2 and m["recall@3"][0] == pytest.approx(0.5)
    assert m["ndcg@3"][0] == pytest.approx(D[0] / (D[0] + D[1]))


def test_users_without_targets_are_nan_per_user_and_skipped_in_means():
    per = topn_per_user(np.array([[1, 2], [3, 4]]), np.array([0, 0, 1]), np.array([3]), ks=(2,))
    assert np.isnan(per["recall@2"][0]) and per["recall@2"][1] == 1.0
    assert topn_metrics(np.array([[1, 2], [3, 4]]), np.array([0, 0, 1]), np.array([3]), ks=(2,))["recall@2"] == 1.0


def test_k_beyond_ranked_columns_counts_missing_slots_as_empty():
    m = topn_metrics(np.array([[1, 2]]), np.array([0, 3]), np.array([1, 2, 3]), ks=(5,))
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((D[0] + D[1]) / (D[0] + D[1] + D[2]))


def test_topn_matches_a_per_user_loop_on_random_data():
    rng = np.random.default_rng(0)
    U, N, n_items = 300, 30, 60
    ranked = np.stack([rng.permutation(np.arange(1, n_items))[:N] for _ in range(U)])
    ranked[rng.random((U, N)) < 0.05] = 0
    sizes = rng.integers(0, 8, U)
    off = np.concatenate([[0], np.cumsum(sizes)])
    items = rng.integers(1, n_items, off[-1])
    ks = (5, 20)
    m = topn_metrics(ranked, off, items, ks)
    for k in ks:
        rec, ndcg, hr = [], [], []
        for u in range(U):
            t = set(items[off[u]:off[u + 1]].tolist())
            if not t:
                continue
            hits = [r for r, i in enumerate(ranked[u, :k]) if i in t]
            rec.append(len(hits) / len(t))
            hr.append(float(bool(hits)))
            ndcg.append(sum(1 / math.log2(r + 2) for r in hits)
                        / sum(1 / math.log2(r + 2) for r in range(min(len(t), k))))
        assert m[f"recall@{k}"] == pytest.approx(np.mean(rec))
        assert m[f"ndcg@{k}"] == pytest.approx(np.mean(ndcg))
        assert m[f"hr@{k}"] == pytest.approx(np.mean(hr))


def test_topn_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="offsets must have shape"):
        topn_metrics(np.array([[1, 2]]), np.array([0, 1, 1]), np.array([1]))
    with pytest.raises(ValueError, match="integer item ids"):
        topn_metrics(np.array([[1.0, 2.0]]), np.array([0, 1]), np.array([1]))


# --------------------------------------------------------------------------- AUC / GAUC / logloss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000), 1)  # about 11 distinct scores: ties everywhere
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    s = rng.normal(size=2000).astype(np.float32)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_hand_case_and_single_class():
    # pairs (pos, neg): (.9,.1) win, (.9,.5) win, (.5,.1) win, (.5,.5) tie -> 3.5 / 4
    assert auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.5, 0.5])) == 0.875
    assert auc(np.array([0, 0, 1, 1]), np.array([0.3, 0.3, 0.3, 0.3])) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auc(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))


@pytest.mark.parametrize("seed", [0, 1])
def test_logloss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    p[:10] = 0.0  # saturated probabilities are clipped, as sklearn clips at the dtype's epsilon
    p[10:20] = 1.0
    assert logloss(y, p, eps=np.finfo(np.float64).eps) == pytest.approx(log_loss(y, p), rel=1e-9)
    q = np.clip(p, 0.01, 0.99)
    assert logloss(y, q) == pytest.approx(log_loss(y, q), rel=1e-9)
    with pytest.raises(ValueError, match="sigmoid"):
        logloss(y, p * 3 - 1)


def test_gauc_matches_weighted_per_user_sklearn():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 60, 3000) * 7 + 1000  # sparse, non-contiguous user ids
    y = rng.integers(0, 2, 3000)
    s = np.round(rng.random(3000), 2)  # ties within users
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if len(np.unique(y[m])) == 2:
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
    assert gauc(users, y, s) == pytest.approx(num / den, abs=1e-12)
    perm = rng.permutation(3000)  # sample order does not matter
    assert gauc(users[perm], y[perm], s[perm]) == pytest.approx(num / den, abs=1e-12)


def test_gauc_hand_case_skips_single_class_users():
    users = np.array([1, 1, 1, 2, 2, 3, 3, 3])
    y = np.array([1, 0, 0, 1, 1, 1, 0, 1])
    s = np.array([0.9, 0.1, 0.95, 0.3, 0.4, 0.2, 0.5, 0.8])
    # user 1: pos .9 beats .1, loses to .95 -> 0.5 (3 samples); user 2 is single-class: skipped
    # user 3: neg .5 loses to .8, beats .2 -> 0.5 (3 samples)
    assert gauc(users, y, s) == pytest.approx(0.5)
    # user 1: 1.0 (2 samples); user 2: pos .2 loses to .3, ties .2, beats .1 -> 1.5/3 = 0.5 (4 samples)
    users2, y2 = np.array([1, 1, 2, 2, 2, 2]), np.array([1, 0, 1, 0, 0, 0])
    s2 = np.array([0.9, 0.1, 0.2, 0.3, 0.2, 0.1])
    assert gauc(users2, y2, s2) == pytest.approx((2 * 1.0 + 4 * 0.5) / 6)
    assert np.isnan(gauc(np.array([1, 1, 2]), np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3])))


# --------------------------------------------------------------------------- buckets


def test_bucket_labels_and_edges_are_inclusive():
    assert bucket_labels((5, 20)) == ["<=5", "6-20", ">20"]
    assert bucket_labels((1, 2, 10)) == ["<=1", "2", "3-10", ">10"]
    assert bucket_of(np.array([0, 5, 6, 20, 21])).tolist() == ["<=5", "<=5", "6-20", "6-20", ">20"]
    with pytest.raises(ValueError, match="strictly increasing"):
        bucket_of(np.array([1]), edges=(20, 5))


def test_topn_by_bucket_averages_within_each_bucket():
    ranked = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
    off = np.array([0, 1, 2, 3, 3])  # targets 1, 9, 5; user 3 has none
    per = topn_per_user(ranked, off, np.array([1, 9, 5]), ks=(1,))
    out = topn_by_bucket(per, bucket_of(np.array([3, 4, 30, 2])), order=bucket_labels((5, 20)))
    assert list(out) == ["<=5", "6-20", ">20"]
    assert out["<=5"] == {"recall@1": 0.5, "ndcg@1": 0.5, "hr@1": 0.5, "users": 2}  # user 3 skipped
    assert out[">20"]["recall@1"] == 1.0 and out["6-20"]["users"] == 0 and np.isnan(out["6-20"]["hr@1"])


def test_ranking_by_bucket_equals_metrics_on_each_subset():
    rng = np.random.default_rng(4)
    users = rng.integers(0, 50, 1500)
    y = rng.integers(0, 2, 1500)
    p = rng.random(1500)
    hist = rng.integers(0, 40, 1500)
    b = bucket_of(hist)
    b[(b == ">20") & (y == 0)] = "<=5"  # make ">20" single-class
    out = ranking_by_bucket(users, y, p, b, order=bucket_labels((5, 20)))
    m = b == "6-20"
    assert out["6-20"]["auc"] == pytest.approx(roc_auc_score(y[m], p[m]))
    assert out["6-20"]["gauc"] == pytest.approx(gauc(users[m], y[m], p[m]))
    assert out["6-20"]["logloss"] == pytest.approx(log_loss(y[m], p[m]))
    assert out["6-20"]["samples"] == m.sum()
    assert "auc" not in out[">20"] and out[">20"]["positives"] == out[">20"]["samples"] > 0
    assert sum(v["samples"] for v in out.values()) == len(y)  # every sample is in exactly one bucket


def test_docstring_examples_run():
    import doctest

    import facetrec.eval.metrics as metrics

    result = doctest.testmod(metrics, extraglobs={"np": np})
    assert result.failed == 0 and result.attempted > 10
