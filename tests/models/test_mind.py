"""MIND properties a reader can check (SPEC §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrec.models.losses import NegativeSampler, sampled_softmax_loss
from facetrec.models.mind import MIND, MINDConfig, interest_count, squash

N_ITEMS, N_CATE = 50, 6


def make(**kw) -> MIND:
    torch.manual_seed(0)
    cate = torch.randint(1, N_CATE, (N_ITEMS, 1))
    cate[0] = 0
    return MIND(MINDConfig(n_items=N_ITEMS, dim=8, hidden=(16,), **kw), {"cate": cate}, {"cate": N_CATE})


def batch(B=4, L=6, lengths=(6, 3, 1, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, N_ITEMS, (B, L), generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    hist = hist * mask
    return hist, mask, torch.tensor([16, 3, 1, 5])


@pytest.mark.parametrize("axis", ["interests", "behaviours"])
def test_routing_weights_sum_to_one_on_softmax_axis_and_padding_gets_zero(axis):
    m = make(softmax_axis=axis).eval()
    hist, mask, n = batch()
    r = m.route(hist, mask, n)
    w = r.weights  # (B, L, K)
    assert (w[~mask] == 0).all()
    if axis == "interests":
        assert torch.allclose(w.sum(-1)[mask], torch.ones(int(mask.sum())), atol=1e-6)
    else:
        sums = w.sum(1)  # (B, K)
        assert torch.allclose(sums[r.valid], torch.ones(int(r.valid.sum())), atol=1e-6)


def test_dynamic_interest_number_and_invalid_interests_never_surface():
    assert interest_count(torch.tensor([1, 2, 3, 4, 7, 8, 100]), 4).tolist() == [1, 1, 1, 2, 2, 3, 4]
    m = make().eval()
    hist, mask, n = batch()
    r = m.route(hist, mask, n)
    assert r.valid.sum(1).tolist() == [4, 1, 1, 2]
    assert (r.weights[..., 1:][:, :, :][~r.valid[:, None, 1:].expand(-1, hist.shape[1], -1)] == 0).all()
    assert (r.lengths[~r.valid] == 0).all()
    V, valid = m.user_interests(hist, mask, n)
    # even a target that matches an invalid interest perfectly is never chosen by hard attention
    target = V[1, 3].detach().clone() * 100
    out = m.label_aware(V[1:2], valid[1:2], target[None])
    assert torch.allclose(out, V[1:2, 0])


def test_interests_do_not_depend_on_the_rest_of_the_batch():
    m = make().eval()
    hist, mask, n = batch()
    alone, _ = m.user_interests(hist[:1], mask[:1], n[:1])
    hist2, mask2, n2 = batch(seed=7)
    together, _ = m.user_interests(torch.cat([hist2[:2], hist[:1]]), torch.cat([mask2[:2], mask[:1]]),
                                   torch.cat([n2[:2], n[:1]]))
    assert torch.allclose(alone[0], together[2], atol=1e-6)


def test_routing_logits_are_fresh_per_training_step():
    m = make().train()
    hist, mask, n = batch()
    a = m.route(hist, mask, n).weights
    b = m.route(hist, mask, n).weights
    assert not torch.allclose(a, b)


def test_squash_length_below_one_and_safe_at_zero():
    z = torch.randn(100, 8) * torch.logspace(-3, 3, 100)[:, None]
    lengths = squash(z).norm(dim=-1)
    assert (lengths < 1).all() and (lengths > 0).all()
    assert torch.allclose(lengths, z.norm(dim=-1) ** 2 / (1 + z.norm(dim=-1) ** 2), rtol=1e-4)
    assert torch.isfinite(squash(torch.zeros(3, 8))).all() and (squash(torch.zeros(3, 8)) == 0).all()


def test_sampled_softmax_with_every_item_equals_full_softmax():
    torch.manual_seed(0)
    B, D = 5, 8
    items = torch.randn(N_ITEMS, D)
    user = torch.randn(B, D)
    target = torch.randint(1, N_ITEMS, (B,))
    all_ids = torch.arange(1, N_ITEMS)
    loss = sampled_softmax_loss(user, items[target], target, items[all_ids], all_ids)
    full = torch.nn.functional.cross_entropy(user @ items[1:].T, target - 1)
    assert torch.allclose(loss, full, atol=1e-6)


def test_negative_equal_to_target_is_masked():
    user = torch.ones(1, 2)
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([1])
    with_dup = sampled_softmax_loss(user, items[target], target, items[[1, 2]], torch.tensor([1, 2]))
    without = sampled_softmax_loss(user, items[target], target, items[[2]], torch.tensor([2]))
    assert torch.allclose(with_dup, without)


def test_sampler_never_returns_padding_and_follows_popularity():
    s = NegativeSampler(np.array([100, 1, 0, 9]), "popularity", seed=0)
    ids, log_q = s.sample(20000)
    assert (ids > 0).all() and not (ids == 2).any()
    assert abs((ids == 3).float().mean().item() - 0.9) < 0.02
    assert torch.allclose(log_q[ids == 1][:1], torch.log(torch.tensor([0.1])), atol=1e-5)


def test_gradients_reach_S_and_embeddings():
    from facetrec.data.batches import RetrievalBatch
    from facetrec.models.losses import retrieval_loss

    m = make().train()
    hist, mask, n = batch()
    b = RetrievalBatch(user=torch.arange(4), hist=hist, hist_mask=mask, target=torch.tensor([1, 2, 3, 4]), n_events=n)
    retrieval_loss(m, b, NegativeSampler(np.ones(N_ITEMS), seed=0), 10).backward()
    assert m.S.grad is not None and m.S.grad.abs().sum() > 0
    assert m.items.id_emb.weight.grad.abs().sum() > 0 and m.items.field_emb["cate"].weight.grad.abs().sum() > 0


def test_label_aware_attention_limits():
    V = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])
    t = torch.tensor([[0.2, 1.0]])
    mean = make(attention_p=0.0).label_aware(V, valid, t)
    assert torch.allclose(mean, torch.tensor([[0.5, 0.5]]))
    hard = make(attention_p="hard").label_aware(V, valid, t)
    assert torch.allclose(hard, torch.tensor([[0.0, 1.0]]))
    sharp = make(attention_p=50.0).label_aware(V, valid, t)
    assert torch.allclose(sharp, hard, atol=1e-6)


def test_youtube_dnn_is_masked_mean_through_the_mlp():
    m = make(n_interests=1, pooling="mean").eval()
    hist, mask, n = batch()
    V, valid = m.user_interests(hist, mask, n)
    e = m.items(hist) * mask[..., None]
    mean = e.sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(V[:, 0], m.mlp(mean), atol=1e-6) and valid.all()


def test_item_tower_mean_excludes_padding():
    cate = torch.zeros(N_ITEMS, 2, dtype=torch.long)
    cate[5] = torch.tensor([2, 0])  # one real attribute, one padding slot
    m = MIND(MINDConfig(n_items=N_ITEMS, dim=4), {"attrs": cate}, {"attrs": 4})
    expect = (m.items.id_emb.weight[5] + m.items.field_emb["attrs"].weight[2]) / 2
    assert torch.allclose(m.items(torch.tensor([5]))[0], expect)
    assert (m.items(torch.tensor([0])) == 0).all()
