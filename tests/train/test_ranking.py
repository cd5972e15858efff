"""Ranking training pieces: the mini-batch-aware L2 (DIN paper §4.3.1) and the item frequencies it uses."""

from __future__ import annotations

import numpy as np
import torch

from facetrec.data.dataset import Prepared, ranking_samples
from facetrec.train.l2 import item_frequencies, mini_batch_l2


def test_mini_batch_l2_touches_each_batch_row_once_weighted_by_its_frequency():
    torch.manual_seed(0)
    table = torch.randn(6, 3, requires_grad=True)
    inv_freq = torch.tensor([1.0, 1 / 2, 1 / 4, 1 / 8, 1.0, 1 / 5])
    ids = torch.tensor([0, 2, 2, 3, 0, 5, 2])  # repeats count once; 0 is padding
    reg = mini_batch_l2(table, ids, inv_freq)
    w = table.detach()
    expect = sum(float(w[j].pow(2).sum() * inv_freq[j]) for j in (2, 3, 5))
    assert abs(float(reg.detach()) - expect) < 1e-6
    reg.backward()
    for j in range(6):
        want = 2 * w[j] * inv_freq[j] if j in (2, 3, 5) else torch.zeros(3)
        assert torch.allclose(table.grad[j], want, atol=1e-6), j


def test_item_frequencies_count_candidates_and_history_windows(synth_prepared):
    prep = Prepared(synth_prepared[0])
    s = ranking_samples(prep, "train")
    n = item_frequencies(prep, s.user, s.pos, s.target)
    assert n.shape == (prep.n_items,) and (n >= 1).all()
    (hist,), _ = prep.windows(s.user, s.pos, prep.max_history, (prep.items,))
    j = int(s.target[0])
    assert n[j] == (s.target == j).sum() + (hist == j).sum()


def test_embed_l2_enters_the_ranking_loss(synth_prepared):
    from facetrec.config import load_config
    from facetrec.train.ranking import ranking_model, ranking_task
    from tests.conftest import ROOT

    prep = Prepared(synth_prepared[0])
    losses = {}
    for l2 in (0.0, 1.0):
        cfg = load_config(ROOT / "configs" / "synthetic.yaml", ["model.name=din", f"train.embed_l2={l2}", "train.batch_size=64"])
        torch.manual_seed(0)
        task = ranking_task(cfg, prep, ranking_model(cfg, prep))
        total, parts = task.loss(next(iter(task.batches(0))))
        losses[l2] = (float(total.detach()), parts)
    assert "l2" not in losses[0.0][1] and losses[1.0][1]["l2"] > 0
    assert np.isclose(losses[1.0][0], losses[0.0][0] + losses[1.0][1]["l2"], rtol=1e-5)


def test_embed_l2_covers_history_and_candidates_not_the_auxiliary_negatives():
    """Uniformly drawn aux negatives would decay rare rows (large 1/n_j) at every draw: left out."""
    from types import SimpleNamespace

    from facetrec.data.batches import RankingBatch
    from facetrec.train.l2 import embed_l2_term

    torch.manual_seed(0)
    items = SimpleNamespace(id_emb=torch.nn.Embedding(10, 3))
    model = SimpleNamespace(items=items)
    hist = torch.tensor([[1, 2, 0], [2, 4, 5]])
    b = RankingBatch(user=torch.tensor([1, 2]), hist=hist, hist_mask=hist > 0, aux_neg=torch.tensor([[7, 8, 0], [9, 7, 6]]),
                     target=torch.tensor([3, 1]), label=torch.tensor([1.0, 0.0]))
    inv_freq = torch.full((10,), 0.5)
    reg = embed_l2_term(model.items.id_emb.weight, b, 2.0, inv_freq)
    w = items.id_emb.weight.detach()
    assert torch.isclose(reg, 2.0 * 0.5 * w[[1, 2, 3, 4, 5]].pow(2).sum())
    reg.backward()
    g = items.id_emb.weight.grad
    assert torch.all(g[[0, 6, 7, 8, 9]] == 0) and torch.all(g[[1, 2, 3, 4, 5]].abs().sum(1) > 0)


def test_popularity_auxiliary_negatives_reach_the_batches_and_need_resampling(synth_prepared):
    import pytest

    from facetrec.config import load_config
    from facetrec.errors import ConfigError
    from facetrec.train.ranking import epoch_negatives
    from tests.conftest import ROOT

    prep = Prepared(synth_prepared[0])
    cfg = lambda *o: load_config(ROOT / "configs" / "synthetic.yaml", ["model.name=dien", *o])  # noqa: E731
    uni = epoch_negatives(cfg("train.resample_negatives=true"), prep, 5)
    pop = epoch_negatives(cfg("train.resample_negatives=true", "train.aux_negatives=popularity"), prep, 5)
    assert (pop != prep.items).all() and (uni != prep.items).all()
    # popular items are drawn more often than under the uniform draw
    top = np.argsort(prep.item_counts)[-20:]
    assert np.isin(pop, top).mean() > 2 * np.isin(uni, top).mean()
    assert epoch_negatives(cfg(), prep, 5) is None  # prepare's, uniform
    with pytest.raises(ConfigError, match="resample_negatives"):
        epoch_negatives(cfg("train.aux_negatives=popularity"), prep, 5)
    with pytest.raises(ConfigError, match="aux_negatives"):
        epoch_negatives(cfg("train.resample_negatives=true", "train.aux_negatives=hard"), prep, 5)


def test_last_positions_keep_one_positive_per_user_with_its_negatives(synth_prepared):
    import pytest

    from facetrec.config import load_config
    from facetrec.errors import ConfigError
    from facetrec.train.ranking import training_positions
    from tests.conftest import ROOT

    prep = Prepared(synth_prepared[0])
    full = ranking_samples(prep, "train")
    cfg = lambda *o: load_config(ROOT / "configs" / "synthetic.yaml", ["model.name=dien", *o])  # noqa: E731
    assert training_positions(cfg(), full) is full  # the default: every position (SPEC §1.3)
    last = training_positions(cfg("train.positions=last"), full)
    users = np.unique(full.user)
    # one positive per training user, at the user's largest training position, with that position's negatives
    assert np.array_equal(np.sort(last.user[last.label == 1]), users)
    for u in users[:50]:
        top = full.pos[full.user == u].max()
        sel = (full.user == u) & (full.pos == top)
        assert set(last.pos[last.user == u]) == {top}
        assert sorted(last.target[last.user == u]) == sorted(full.target[sel])
    with pytest.raises(ConfigError, match="train.positions"):
        training_positions(cfg("train.positions=first"), full)


def test_a_model_section_that_does_not_fit_the_data_is_a_config_error(synth_prepared):
    """An item field the prepared data lacks stops `facetrec train` with "error: ..." (exit 2), not a traceback."""
    import pytest

    from facetrec.errors import ConfigError
    from facetrec.train.build import build_model, make_config

    prep = Prepared(synth_prepared[0])
    cfg = make_config("dien", {"item_fields": ["nope"]}, prep.n_items)
    with pytest.raises(ConfigError, match="model section for dien does not fit the prepared data: .*'nope'"):
        build_model("dien", cfg, prep.feature_tensors(), prep.field_vocab)
