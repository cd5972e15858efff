"""Sampled softmax and negative sampling (SPEC §2.5), checked against hand-written full softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facetrec.data.batches import RetrievalBatch
from facetrec.models.losses import NegativeSampler, interest_similarity, retrieval_loss, sampled_softmax_loss
from facetrec.models.mind import MIND, MINDConfig

N_ITEMS = 30


def vectors(B=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(N_ITEMS, D, generator=g)
    items[0] = 0
    return items, torch.randn(B, D, generator=g), torch.randint(1, N_ITEMS, (B,), generator=g)


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_sampled_softmax_with_every_item_sampled_equals_the_full_softmax(temperature):
    items, user, target = vectors()
    all_ids = torch.arange(1, N_ITEMS)  # the target is among them and gets masked as a negative
    loss = sampled_softmax_loss(user, items[target], target, items[all_ids], all_ids, temperature=temperature)
    full = F.cross_entropy(user @ items[1:].T / temperature, target - 1)
    assert torch.allclose(loss, full, atol=1e-6)


def test_a_sampled_negative_equal_to_the_target_is_masked():
    items, user, target = vectors(B=1)
    other = torch.tensor([i for i in range(1, 6) if i != target.item()])
    dup = torch.cat([other, target])
    with_dup = sampled_softmax_loss(user, items[target], target, items[dup], dup)
    without = sampled_softmax_loss(user, items[target], target, items[other], other)
    assert torch.allclose(with_dup, without)


def test_log_q_correction_subtracts_log_q_from_every_logit():
    items, user, target = vectors(B=3)
    neg = torch.tensor([1, 2, 3, 4])
    log_q = -torch.arange(N_ITEMS, dtype=torch.float32) / 10
    loss = sampled_softmax_loss(user, items[target], target, items[neg], neg,
                                neg_log_q=log_q[neg], target_log_q=log_q[target])
    logits = torch.cat([(user * items[target]).sum(1, keepdim=True) - log_q[target][:, None],
                        user @ items[neg].T - log_q[neg][None, :]], 1)
    logits[:, 1:] = logits[:, 1:].masked_fill(neg[None, :] == target[:, None], -math.inf)
    assert torch.allclose(loss, F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)), atol=1e-6)


def test_in_batch_negatives_are_the_other_rows_targets_with_equal_ids_masked():
    items, user, _ = vectors(B=3)
    target = torch.tensor([4, 7, 4])  # rows 0 and 2 share a target: not a negative for each other
    neg = torch.tensor([9])
    loss = sampled_softmax_loss(user, items[target], target, items[neg], neg, in_batch=True)
    by_hand = []
    for r in range(3):
        others = [k for k in range(3) if target[k] != target[r]]
        logits = torch.stack([user[r] @ items[target[r]], user[r] @ items[9],
                              *[user[r] @ items[target[k]] for k in others]])
        by_hand.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(loss, torch.stack(by_hand).mean(), atol=1e-6)


def test_sampler_never_draws_padding_and_follows_popularity():
    s = NegativeSampler(np.array([100, 1, 0, 9]), "popularity", seed=0)
    ids, log_q = s.sample(20000)
    assert ids.min() >= 1 and not (ids == 2).any()  # padding and a zero-count item are never drawn
    assert abs((ids == 3).float().mean().item() - 0.9) < 0.02
    assert torch.allclose(log_q[ids == 1][:1], torch.log(torch.tensor([0.1])), atol=1e-5)
    assert torch.isfinite(s.log_q).all()  # a zero-count target never makes the correction infinite
    u = NegativeSampler(np.array([0, 5, 1, 1, 1]), "uniform", seed=0)
    ids, log_q = u.sample(4000)
    assert set(ids.tolist()) == {1, 2, 3, 4} and torch.allclose(log_q, torch.full_like(log_q, -math.log(4)))
    assert torch.allclose(u.log_freq[1:], torch.log(torch.tensor([5.0, 1, 1, 1]) / 8))


def test_sampler_seed_makes_draws_reproducible():
    a = NegativeSampler(np.ones(100), "uniform", seed=3).sample(50)[0]
    b = NegativeSampler(np.ones(100), "uniform", seed=3).sample(50)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="uniform"):
        NegativeSampler(np.zeros(5), "popularity")


class _AllItems(NegativeSampler):
    """Every item once, in order: sampled softmax becomes the full softmax."""

    def sample(self, n):
        ids = torch.arange(1, self.n_items)
        return ids, self.log_q[ids]


def _model():
    torch.manual_seed(0)
    cate = torch.randint(1, 4, (N_ITEMS, 1))
    cate[0] = 0
    return MIND(MINDConfig(n_items=N_ITEMS, dim=8, hidden=(16,)), {"cate": cate}, {"cate": 4}).eval()


def _batch():
    hist = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 9, 10, 11, 0]])
    return RetrievalBatch(user=torch.arange(3), hist=hist, hist_mask=hist > 0, target=torch.tensor([12, 3, 20]),
                          n_events=torch.tensor([20, 2, 4]))


def test_retrieval_loss_with_every_item_sampled_equals_full_softmax_of_the_model():
    m, b = _model(), _batch()
    loss = retrieval_loss(m, b, _AllItems(np.ones(N_ITEMS)), N_ITEMS - 1)
    V, valid = m.user_interests(b.hist, b.hist_mask, b.n_events)
    user = m.label_aware(V, valid, m.item_vectors(b.target))
    full = F.cross_entropy(user @ m.item_vectors(torch.arange(1, N_ITEMS)).T, b.target - 1)
    assert torch.allclose(loss, full, atol=1e-5)


def test_retrieval_loss_applies_popularity_log_q():
    m, b = _model(), _batch()
    counts = np.arange(N_ITEMS, dtype=float)
    s = _AllItems(counts, "popularity")
    loss = retrieval_loss(m, b, s, N_ITEMS - 1)
    V, valid = m.user_interests(b.hist, b.hist_mask, b.n_events)
    user = m.label_aware(V, valid, m.item_vectors(b.target))
    logits = user @ m.item_vectors(torch.arange(1, N_ITEMS)).T - s.log_q[1:][None, :]
    assert torch.allclose(loss, F.cross_entropy(logits, b.target - 1), atol=1e-5)
    assert not torch.allclose(loss, retrieval_loss(m, b, s, N_ITEMS - 1, log_q=False))


def test_max_negative_scores_with_every_item_sampled_equal_the_full_softmax_of_servings_merge():
    # hard attention scores the target by its best interest; negative_scores="max" scores every other item
    # the same way, so the loss is the full softmax over the scores serving's max-merge ranks by
    m, b = _model(), _batch()
    assert m.cfg.attention_p == "hard"
    with torch.no_grad():  # at init the tiny embeddings give every interest about the MLP's bias: spread them
        m.items.table.mul_(30)
    loss = retrieval_loss(m, b, _AllItems(np.ones(N_ITEMS)), N_ITEMS - 1, negative_scores="max")
    V, valid = m.user_interests(b.hist, b.hist_mask, b.n_events)
    merged = torch.stack([torch.stack([V[r, k] @ m.item_vectors(torch.arange(1, N_ITEMS)).T
                                       for k in range(V.shape[1]) if valid[r, k]]).amax(0) for r in range(len(V))])
    assert torch.allclose(loss, F.cross_entropy(merged, b.target - 1), atol=1e-5)
    assert valid.sum(1).max() > 1  # a user with several interests: the two scorings differ
    assert not torch.allclose(loss, retrieval_loss(m, b, _AllItems(np.ones(N_ITEMS)), N_ITEMS - 1))


def test_best_interest_scores_grouped_by_count_equal_the_masked_dense_max_with_gradients():
    """The CPU path (users grouped by their number of valid interests, only valid slots multiplied)
    against the GPU path (all K slots, invalid ones masked): same values, same gradients, for
    prefix masks (K'_u), a non-prefix one (model.global_interest's extra slot) and a row with none."""
    from facetrec.models.losses import BestInterestScores

    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 1],
                          [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    V0, C0 = torch.randn(6, 5, 8, generator=g), torch.randn(7, 8, generator=g)
    w = torch.randn(6, 7, generator=g)
    out, grads = [], []
    for grouped in (True, False):
        V, C = V0.clone().requires_grad_(), C0.clone().requires_grad_()
        best = BestInterestScores(V, valid, grouped=grouped)
        assert (best.groups is not None) == grouped
        s = best(C)
        s[valid.any(1)].mul(w[valid.any(1)]).sum().backward()
        out.append(s.detach()), grads.append((V.grad, C.grad))
    assert torch.equal(torch.isinf(out[0]), torch.isinf(out[1])) and torch.isinf(out[0][4]).all()
    assert torch.allclose(out[0], out[1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert (grads[0][0][~valid] == 0).all() and (grads[0][0][valid].abs().sum(-1) > 0).any()
    expect = torch.stack([(V0[r][valid[r]] @ C0.T).amax(0) for r in (0, 1, 2, 3, 5)])
    assert torch.allclose(out[0][valid.any(1)], expect, atol=1e-6)


def test_max_negative_scores_are_the_readout_for_one_interest_and_refuse_unknown_modes():
    torch.manual_seed(0)
    m, b = MIND(MINDConfig(n_items=N_ITEMS, dim=8, n_interests=1, hidden=(16,)), {}, {}).eval(), _batch()
    s = _AllItems(np.ones(N_ITEMS))
    for in_batch in (False, True):
        assert torch.allclose(retrieval_loss(m, b, s, N_ITEMS - 1, in_batch=in_batch, negative_scores="max"),
                              retrieval_loss(m, b, s, N_ITEMS - 1, in_batch=in_batch), atol=1e-6)
    with pytest.raises(ValueError, match="negative_scores"):
        retrieval_loss(m, b, s, N_ITEMS - 1, negative_scores="mean")


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_hard_negatives_weight_each_negative_by_its_exp_beta_logit(beta):
    # -log(e^s_t / (e^s_t + M Σ_n w_n e^s_n)), w_n = e^{β s_n} / Σ_m e^{β s_m}: the negatives' sum under the
    # proposal ∝ e^{β s}; the row's target (masked as a negative) is not among the M columns
    items, user, target = vectors()
    all_ids = torch.arange(1, N_ITEMS)
    loss = sampled_softmax_loss(user, items[target], target, items[all_ids], all_ids, temperature=0.5,
                                hard_negatives=beta)
    want = []
    for r in range(len(user)):
        s_t = user[r] @ items[target[r]] / 0.5
        neg = user[r] @ items[all_ids[all_ids != target[r]]].T / 0.5
        w = torch.softmax(beta * neg, 0)
        want.append(-(s_t - torch.log(torch.exp(s_t) + len(neg) * (w * torch.exp(neg)).sum())))
    assert torch.allclose(loss, torch.stack(want).mean(), atol=1e-5)
    plain = sampled_softmax_loss(user, items[target], target, items[all_ids], all_ids, temperature=0.5)
    assert loss > plain  # the weights lean on the high-scoring negatives: a larger estimate of the sum
    with pytest.raises(ValueError, match="hard_negatives"):
        sampled_softmax_loss(user, items[target], target, items[all_ids], all_ids, hard_negatives=-1.0)


def test_interest_diversity_adds_lambda_times_the_users_mean_pairwise_cosine_of_valid_interests():
    m, b = _model(), _batch()
    s = _AllItems(np.ones(N_ITEMS))
    with torch.no_grad():
        V, valid = m.user_interests(b.hist, b.hist_mask, b.n_events)
    assert valid.sum(1).tolist() == [4, 1, 2]  # users with several interests and one with a single one
    # by hand: per user with >= 2 valid interests, the mean cosine over ordered pairs of distinct valid slots
    per_user = []
    for r in range(len(V)):
        ks = [k for k in range(V.shape[1]) if valid[r, k]]
        if len(ks) > 1:
            per_user.append(np.mean([float(F.cosine_similarity(V[r, i], V[r, j], dim=0))
                                     for i in ks for j in ks if i != j]))
    expected = float(np.mean(per_user))
    plain = retrieval_loss(m, b, s, N_ITEMS - 1)
    with_div = retrieval_loss(m, b, s, N_ITEMS - 1, diversity=0.5)
    assert (with_div - plain).item() == pytest.approx(0.5 * expected, abs=1e-5)
    assert retrieval_loss(m, b, s, N_ITEMS - 1, diversity=0.0).item() == plain.item()
    # the penalty's gradient reaches the interest MLP and pushes the interests apart
    with torch.no_grad():  # at init the tiny embeddings give every interest about the MLP's bias: spread them
        m.items.table.mul_(30)
    before = interest_similarity(*m.user_interests(b.hist, b.hist_mask, b.n_events))
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        interest_similarity(*m.user_interests(b.hist, b.hist_mask, b.n_events)).backward()
        opt.step()
    after = interest_similarity(*m.user_interests(b.hist, b.hist_mask, b.n_events))
    assert after.item() < before.item() - 0.1


def test_sampler_mode_all_gives_every_item_once_and_the_loss_is_the_full_softmax():
    s = NegativeSampler(np.arange(N_ITEMS, dtype=float), "all")
    ids, log_q = s.sample(5)  # n is ignored: the whole catalogue but padding
    assert ids.tolist() == list(range(1, N_ITEMS)) and torch.allclose(log_q, log_q[:1].expand_as(log_q))
    m, b = _model(), _batch()
    for scores in ("readout", "max"):
        got = retrieval_loss(m, b, s, 5, negative_scores=scores)
        want = retrieval_loss(m, b, _AllItems(np.ones(N_ITEMS)), N_ITEMS - 1, negative_scores=scores)
        assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="must be one of uniform, popularity, all"):
        NegativeSampler(np.ones(N_ITEMS), "everything")
