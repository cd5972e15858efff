"""prepare: k-core, stable sort, ids, feature map, splits, ranking samples, aux negatives."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from facetrec.config import load_config
from facetrec.data.dataset import (Prepared, retrieval_batch, retrieval_eval_set, retrieval_train_samples,
                                   retrieval_window_targets)
from facetrec.data.prepare import ensure_prepared, kcore, prepare
from facetrec.errors import DataError
from tests.conftest import ROOT, real_data


def test_kcore_repeats_until_stable():
    # item c has 2 events; dropping it leaves user 2 with 1 event, which must then go too
    df = pl.DataFrame({"user": ["1", "1", "1", "2", "2", "3", "3"], "item": ["a", "b", "a", "b", "c", "c", "a"]})
    out = kcore(df, 2, 3)
    assert set(out["user"]) == {"1"} or out.height == 0
    users = out.group_by("user").len()["len"]
    items = out.group_by("item").len()["len"]
    assert (users >= 2).all() and (items >= 3).all()


def test_stable_sort_keeps_file_order_within_ties(tmp_path):
    (tmp_path / "raw").mkdir()
    rows = ["user_id\titem_id\ttimestamp"] + [f"1\t{i}\t{t}" for i, t in [(5, 20), (3, 10), (9, 10), (4, 10), (7, 30)]]
    rows += [f"2\t{i}\t1" for i in range(10, 15)]  # another user, so negatives can be sampled
    (tmp_path / "raw" / "interactions.tsv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, [f"data.root={tmp_path / 'raw'}", "prepare.min_user_events=1", "prepare.min_item_events=1",
                             f"run.dir={tmp_path / 'p'}"])
    prepare(cfg, verbose=False)
    items = pl.read_parquet(tmp_path / "p" / "items.parquet")
    ev = pl.read_parquet(tmp_path / "p" / "events.parquet")
    raw = dict(zip(items["id"], items["raw_id"]))
    assert [raw[i] for i in ev["item"]][:5] == ["3", "9", "4", "5", "7"]


def test_outputs_and_invariants(synth_prepared):
    path, raw = synth_prepared
    prep = Prepared(path)
    fm = json.loads((path / "feature_map.json").read_text())
    summary = json.loads((path / "summary.json").read_text())
    ev = pl.read_parquet(path / "events.parquet")
    # ids contiguous from 1, 0 is padding
    assert ev["user"].min() == 1 and ev["user"].max() == fm["n_users"] - 1
    assert ev["item"].min() == 1 and ev["item"].max() == fm["n_items"] - 1
    assert set(np.unique(ev["item"].to_numpy())) == set(range(1, fm["n_items"]))
    # k-core holds
    assert (prep.counts[1:] >= 5).all() and (prep.item_counts[1:] >= 2).all()
    # time-sorted within users
    t = prep.times
    same_user = np.diff(ev["user"].to_numpy()) == 0
    assert (np.diff(t)[same_user] >= 0).all()
    # aux negatives differ from the clicked item and are real ids
    assert (prep.aux_neg != prep.items).all() and prep.aux_neg.min() >= 1 and prep.aux_neg.max() < fm["n_items"]
    # item features: padding row is zero, category covers every item
    assert (prep.item_features["cate"][0] == 0).all() and (prep.item_features["cate"][1:, 0] > 0).all()
    # user split is 8:1:1
    s = summary["users_split"]
    n = summary["after"]["users"]
    assert s["train"] == round(0.8 * n) and s["valid"] == round(0.1 * n) and s["train"] + s["valid"] + s["test"] == n
    assert summary["after"]["events"] == ev.height


def test_ranking_negatives_never_in_history(synth_prepared):
    path, _ = synth_prepared
    prep = Prepared(path)
    rk = pl.read_parquet(path / "ranking.parquet")
    neg = rk.filter(pl.col("label") == 0)
    seen = set(zip(np.repeat(np.arange(1, prep.n_users), prep.counts[1:]).tolist(), prep.items.tolist()))
    assert not any((u, i) in seen for u, i in zip(neg["user"].to_list(), neg["target"].to_list()))
    # each positive is the user's event at `pos`; last position is test, the one before valid
    pos = rk.filter(pl.col("label") == 1)
    idx = prep.offsets[pos["user"].to_numpy() - 1] + pos["pos"].to_numpy()
    assert (prep.items[idx] == pos["target"].to_numpy()).all()
    last = prep.counts[pos["user"].to_numpy()] - 1
    split = pos["split"].to_numpy()
    assert (split[pos["pos"].to_numpy() == last] == "test").all()
    assert (split[pos["pos"].to_numpy() == last - 1] == "valid").all()


def test_fresh_training_negatives_follow_the_same_rule(synth_prepared):
    """train.resample_negatives: new label-0 targets outside the user's items; positives unchanged; seeded."""
    from facetrec.data.dataset import ranking_samples
    from facetrec.train.ranking import fresh_negatives

    prep = Prepared(synth_prepared[0])
    s = ranking_samples(prep, "train")
    a, a2, b = fresh_negatives(prep, s, 1), fresh_negatives(prep, s, 1), fresh_negatives(prep, s, 2)
    neg = s.label == 0
    assert (a.target[~neg] == s.target[~neg]).all() and (a.user == s.user).all() and (a.pos == s.pos).all()
    assert (a.target == a2.target).all() and (a.target[neg] != b.target[neg]).mean() > 0.9
    assert (a.target[neg] != s.target[neg]).mean() > 0.9
    seen = set(zip(np.repeat(np.arange(1, prep.n_users), prep.counts[1:]).tolist(), prep.items.tolist()))
    assert not any((u, i) in seen for u, i in zip(s.user[neg].tolist(), a.target[neg].tolist()))
    assert a.target[neg].min() >= 1 and a.target[neg].max() < prep.n_items
    # fresh auxiliary negatives: never the clicked item, and what the batches carry
    from facetrec.data.dataset import ranking_batch
    from facetrec.data.prepare import sample_aux_negatives

    aux = sample_aux_negatives(np.random.default_rng(3), prep.items, prep.n_items)
    assert (aux != prep.items).all() and (aux != prep.aux_neg).mean() > 0.9
    idx = np.arange(64)
    b, b0 = ranking_batch(prep, s, idx, prep.max_history, aux), ranking_batch(prep, s, idx, prep.max_history)
    assert (b.hist == b0.hist).all() and ((b.aux_neg != b0.aux_neg) & b.hist_mask).any()
    assert not ((b.aux_neg == b.hist) & b.hist_mask).any()


def test_popularity_aux_negatives_follow_training_counts(synth_prepared):
    from facetrec.data.prepare import aux_negative_probs, sample_aux_negatives

    prep = Prepared(synth_prepared[0])
    p = aux_negative_probs(prep.items, prep.offsets, prep.n_items)
    # counted over every user's events but the last two (the valid and test targets), ^0.75
    held = np.zeros(len(prep.items), dtype=bool)
    for u in range(1, prep.n_users):
        held[max(prep.offsets[u - 1], prep.offsets[u] - 2):prep.offsets[u]] = True
    w = np.bincount(prep.items[~held], minlength=prep.n_items).astype(float) ** 0.75
    w[0] = 0
    assert np.allclose(p, w / w.sum()) and p[0] == 0
    aux = sample_aux_negatives(np.random.default_rng(0), prep.items, prep.n_items, p)
    assert (aux != prep.items).all() and aux.min() >= 1
    # popular items are drawn more often than uniform draws would: the correlation with p is clear
    freq = np.bincount(aux, minlength=prep.n_items) / len(aux)
    assert np.corrcoef(freq[1:], p[1:])[0, 1] > 0.9
    with pytest.raises(DataError, match="padding"):
        sample_aux_negatives(np.random.default_rng(0), prep.items, prep.n_items, np.ones(prep.n_items) / prep.n_items)


def test_user_split_protocol_history_and_targets(synth_prepared):
    prep = Prepared(synth_prepared[0])
    ev = retrieval_eval_set(prep, "test", "user_split")
    assert set(ev.users.tolist()) <= set(prep.users_of("test").tolist())
    n_t = np.diff(ev.target_offsets)
    c = prep.counts[ev.users]
    assert (ev.ends + n_t == c).all() and (ev.ends == np.floor(0.8 * c)).all()
    # targets are the user's events after the history cut-off, in order
    u, e = ev.users[0], ev.ends[0]
    assert (ev.target_items[: n_t[0]] == prep.user_items(u)[e:]).all()
    users, pos = retrieval_train_samples(prep, "user_split")
    assert set(users.tolist()) == set(prep.users_of("train").tolist()) and pos.min() == 1


def test_leave_last_out_protocol(synth_prepared):
    prep = Prepared(synth_prepared[0])
    test = retrieval_eval_set(prep, "test", "leave_last_out")
    valid = retrieval_eval_set(prep, "valid", "leave_last_out")
    assert (test.ends == prep.counts[test.users] - 1).all() and (valid.ends == test.ends - 1).all()
    users, pos = retrieval_train_samples(prep, "leave_last_out")
    assert (pos <= prep.counts[users] - 3).all()


def test_ensure_prepared_caches(tmp_path, monkeypatch, synth_prepared):
    _, raw = synth_prepared
    monkeypatch.setenv("FACETREC_CACHE", str(tmp_path / "cache"))
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.root={raw}"])
    a = ensure_prepared(cfg, verbose=False)
    mtime = (a / "summary.json").stat().st_mtime_ns
    assert ensure_prepared(cfg, verbose=False) == a and (a / "summary.json").stat().st_mtime_ns == mtime
    b = ensure_prepared(load_config(ROOT / "configs" / "synthetic.yaml", [f"data.root={raw}", "prepare.max_history=7"]),
                        verbose=False)
    assert b != a


def test_everything_filtered_explains(tmp_path, synth_prepared):
    _, raw = synth_prepared
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.root={raw}", "prepare.min_user_events=100000",
                                                            f"run.dir={tmp_path}"])
    with pytest.raises(DataError, match="lower prepare.min_user_events"):
        prepare(cfg, verbose=False)


def test_real_amazon_beauty_counts(tmp_path):
    real_data("amazon-beauty")
    cfg = load_config(ROOT / "configs" / "amazon-beauty.yaml", [f"run.dir={tmp_path}"])
    s = prepare(cfg, verbose=False)
    assert s["after"] == {"events": 198502, "users": 22363, "items": 12101}
    assert s["users_split"] == {"train": 17890, "valid": 2236, "test": 2237}
    assert json.loads((tmp_path / "feature_map.json").read_text())["item_fields"]["cate"]["vocab"] == 196


def test_real_taobao_prepare_lenient(tmp_path):
    real_data("taobao-userbehavior-sample")
    with pytest.raises(DataError, match="line 84476"):
        prepare(load_config(ROOT / "configs" / "taobao.yaml", [f"run.dir={tmp_path}"]), verbose=False)
    s = prepare(load_config(ROOT / "configs" / "taobao.yaml", [f"run.dir={tmp_path}", "prepare.lenient=true"]), verbose=False)
    assert s["skipped_rows"] == 1 and s["before"]["events"] == 84475


def test_retrieval_min_history_drops_the_early_positions_only(synth_prepared):
    prep = Prepared(synth_prepared[0])
    u1, p1 = retrieval_train_samples(prep, "user_split")
    u3, p3 = retrieval_train_samples(prep, "user_split", min_history=3)
    keep = p1 >= 3
    assert np.array_equal(u3, u1[keep]) and np.array_equal(p3, p1[keep])
    assert p3.min() == 3
    with pytest.raises(DataError, match="min_history"):
        retrieval_train_samples(prep, "user_split", min_history=0)


@pytest.mark.parametrize("protocol", ["user_split", "leave_last_out"])
def test_retrieval_target_window_draws_every_later_event_and_none_past_training(synth_prepared, protocol):
    prep = Prepared(synth_prepared[0])
    users, pos = retrieval_train_samples(prep, protocol)
    rng = np.random.default_rng(0)
    assert np.array_equal(retrieval_window_targets(prep, protocol, users, pos, 1, rng), pos)
    reserve = 2 if protocol == "leave_last_out" else 0
    last = prep.counts[users] - 1 - reserve  # the last event training may use
    span = np.minimum(4, last - pos + 1)
    seen = np.zeros((len(pos), 4), dtype=bool)
    for _ in range(60):
        t = retrieval_window_targets(prep, protocol, users, pos, 4, rng)
        assert (t >= pos).all() and (t <= last).all() and (t - pos < 4).all()
        seen[np.arange(len(pos)), t - pos] = True
    # each of the next min(4, left) events is drawn (60 draws of at most 4 choices), none beyond them
    assert np.array_equal(seen.sum(axis=1), span)
    # the batch's target is the drawn event, its history still ends before pos
    t = retrieval_window_targets(prep, protocol, users[:64], pos[:64], 4, rng)
    b = retrieval_batch(prep, users[:64], pos[:64], prep.max_history, t)
    assert np.array_equal(b.target.numpy(), prep.items[prep.offsets[users[:64] - 1] + t])
    assert np.array_equal(b.n_events.numpy(), pos[:64])
    with pytest.raises(DataError, match="target_window"):
        retrieval_window_targets(prep, protocol, users, pos, 0, rng)
