"""MIND properties a reader can check (SPEC §2): routing, dynamic K, attention, towers, YouTube DNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrec.data.batches import RetrievalBatch
from facetrec.models.losses import NegativeSampler, retrieval_loss
from facetrec.models.mind import MIND, MINDConfig, _normal_from_bits, interest_count, routing_noise, squash, youtube_dnn

N_ITEMS, N_CATE = 50, 6


def make(**kw) -> MIND:
    torch.manual_seed(0)
    cate = torch.randint(1, N_CATE, (N_ITEMS, 1))
    cate[0] = 0
    return MIND(MINDConfig(n_items=N_ITEMS, dim=8, hidden=(16,), **kw), {"cate": cate}, {"cate": N_CATE})


def batch(lengths=(6, 3, 1, 5), n_events=(16, 3, 1, 5), L=6, seed=1):
    """Left-aligned 0-padded histories; K'_u = 4, 1, 1, 2 for the default n_events."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    hist = torch.randint(1, N_ITEMS, (len(lengths), L), generator=g) * mask
    return hist, mask, torch.tensor(n_events)


def literal_routing(m: MIND, hist, mask, salt):
    """SPEC §2.2 written out literally: ĉ = S c materialised, logits (B, L, K), explicit masks."""
    cfg = m.cfg
    c = m.items(hist * mask)  # (B, L, D)
    chat = c @ m.S.T  # (B, L, D)
    valid = torch.arange(cfg.n_interests)[None, :] < interest_count(mask.sum(1), cfg.n_interests)[:, None]
    b = cfg.routing_sigma * routing_noise(hist * mask, cfg.n_interests, salt).transpose(1, 2)  # (B, L, K)
    for r in range(cfg.routing_iters):
        x = chat if r == cfg.routing_iters - 1 else chat.detach()
        if cfg.softmax_axis == "interests":
            w = torch.softmax(b.masked_fill(~valid[:, None, :], float("-inf")), dim=2)
        else:
            w = torch.softmax(b.masked_fill(~mask[:, :, None], float("-inf")), dim=1) * valid[:, None, :]
        w = w * mask[:, :, None]  # (B, L, K)
        u = squash(torch.einsum("blk,bld->bkd", w, x))  # (B, K, D)
        b = b + torch.einsum("bkd,bld->blk", u, chat).detach()
    return u * valid[:, :, None], w


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("axis", ["interests", "behaviours"])
def test_routing_equals_the_literal_spec_formula_values_and_gradients(axis):
    m = make(softmax_axis=axis, routing_iters=3)
    hist, mask, _ = batch()
    ref_caps, ref_w = literal_routing(m, hist, mask, salt=5)
    (ref_caps * torch.arange(ref_caps.numel()).view_as(ref_caps).sin()).sum().backward()
    ref_grads = m.S.grad.clone(), m.items.table.grad.clone()
    m.zero_grad()
    r = m.route(hist, mask, n_events=None, salt=5)
    (r.capsules * torch.arange(ref_caps.numel()).view_as(ref_caps).sin()).sum().backward()
    assert torch.allclose(r.capsules, ref_caps, atol=1e-6)
    assert torch.allclose(r.weights, ref_w, atol=1e-6)
    assert torch.allclose(m.S.grad, ref_grads[0], atol=1e-6)  # gradient through ĉ of the last iteration only
    assert torch.allclose(m.items.table.grad, ref_grads[1], atol=1e-6)


@pytest.mark.parametrize("axis", ["interests", "behaviours"])
def test_routing_weights_sum_to_one_on_the_softmax_axis_and_padding_gets_zero(axis):
    m = make(softmax_axis=axis).eval()
    hist, mask, n = batch()
    mask[0, 5] = False  # a real id behind a False mask is padding too
    r = m.route(hist, mask, n)
    w = r.weights  # (B, L, K)
    assert (w[~mask] == 0).all()
    if axis == "interests":  # each real behaviour splits its vote over the user's valid interests
        assert torch.allclose(w.sum(-1)[mask], torch.ones(int(mask.sum())), atol=1e-6)
    else:  # each valid interest is a weighted mean of the real behaviours
        assert torch.allclose(w.sum(1)[r.valid], torch.ones(int(r.valid.sum())), atol=1e-6)


def test_dynamic_interest_number_masks_invalid_interests_everywhere():
    n = torch.tensor([0, 1, 2, 3, 4, 7, 8, 15, 16, 100])
    assert interest_count(n, 4).tolist() == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert interest_count(torch.tensor([1, 100]), 4, dynamic=False).tolist() == [4, 4]
    m = make().eval()
    hist, mask, n = batch()
    r = m.route(hist, mask, n)
    assert r.valid.sum(1).tolist() == [4, 1, 1, 2]  # K'_u for |I_u| = 16, 3, 1, 5
    assert torch.equal(r.valid, torch.arange(4)[None, :] < r.valid.sum(1, keepdim=True))  # the first K'_u are valid
    assert (r.weights.transpose(1, 2)[~r.valid] == 0).all()  # no behaviour routed to an invalid interest
    assert (r.capsules[~r.valid] == 0).all() and (r.lengths[~r.valid] == 0).all()
    V, valid = m.user_interests(hist, mask, n)
    assert torch.equal(valid, r.valid) and (V[~valid] == 0).all()


def test_hard_attention_never_picks_an_invalid_interest():
    m = make(attention_p="hard")
    V = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]])  # the invalid third one matches best
    valid = torch.tensor([[True, True, False]])
    assert torch.equal(m.label_aware(V, valid, torch.tensor([[0.2, 1.0]])), torch.tensor([[0.0, 1.0]]))
    assert torch.equal(m.label_aware(V, valid, torch.tensor([[1.0, 0.2]])), torch.tensor([[1.0, 0.0]]))


def test_label_aware_attention_p0_is_the_mean_and_large_p_tends_to_hard():
    V = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])
    t = torch.tensor([[0.2, 1.0]])
    assert torch.allclose(make(attention_p=0.0).label_aware(V, valid, t), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(make(attention_p=1.0).label_aware(V, valid, t),
                          torch.softmax(torch.tensor([0.2, 1.0]), 0) @ V[0, :2])
    assert torch.allclose(make(attention_p=50.0).label_aware(V, valid, t), torch.tensor([[0.0, 1.0]]), atol=1e-6)


def test_a_users_interests_do_not_depend_on_the_rest_of_the_batch():
    m = make().eval()
    hist, mask, n = batch()
    alone, _ = m.user_interests(hist[:1], mask[:1], n[:1])
    others, omask, on = batch(lengths=(2, 6), n_events=(9, 40), seed=7)
    # other users, another position in the batch and a wider padding (L = 9)
    h2 = torch.nn.functional.pad(torch.cat([others, hist[:1]]), (0, 3))
    m2 = torch.nn.functional.pad(torch.cat([omask, mask[:1]]), (0, 3))
    together, _ = m.user_interests(h2, m2, torch.cat([on, n[:1]]))
    assert torch.allclose(alone[0], together[2], atol=1e-6)
    # the same holds in training mode for a fixed salt
    m.train()
    a = m.route(hist[:1], mask[:1], n[:1], salt=3).capsules[0]
    b = m.route(h2, m2, torch.cat([on, n[:1]]), salt=3).capsules[2]
    assert torch.allclose(a, b, atol=1e-6)


def test_routing_logits_are_fresh_each_training_step_and_fixed_in_eval():
    m = make().train()
    hist, mask, n = batch()
    assert not torch.allclose(m.route(hist, mask, n).weights, m.route(hist, mask, n).weights)
    m.eval()
    assert torch.equal(m.route(hist, mask, n).weights, m.route(hist, mask, n).weights)


def test_routing_noise_is_standard_normal_and_per_history():
    hist = torch.randint(1, 1000, (4000, 20))
    z = routing_noise(hist, 4, salt=0)  # (B, K, L)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.01
    same = routing_noise(torch.stack([hist[0], hist[0], hist[1]]), 4, salt=0)
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], same[2])
    assert not torch.equal(routing_noise(hist[:1], 4, 0), routing_noise(hist[:1], 4, 1))


def test_routing_noise_is_finite_even_for_the_extreme_hashes():
    edge = torch.cat([torch.arange(1 << 12), (1 << 32) - 1 - torch.arange(1 << 12)])  # lowest and highest hashes
    z = _normal_from_bits(edge)
    assert torch.isfinite(z).all() and z.abs().max() < 5.5


@pytest.mark.parametrize("axis", ["interests", "behaviours"])
def test_empty_history_gives_finite_zero_capsules(axis):
    m = make(softmax_axis=axis)
    hist = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    r = m.route(hist, mask, torch.tensor([0, 0]))
    assert torch.isfinite(r.weights).all() and (r.weights == 0).all() and (r.capsules == 0).all()
    V, valid = m.user_interests(hist, mask)
    assert torch.isfinite(V).all() and valid.sum().item() == 2


def test_squash_length_below_one_and_safe_at_zero():
    z = torch.randn(100, 8) * torch.logspace(-3, 3, 100)[:, None]
    lengths = squash(z).norm(dim=-1)
    assert (lengths < 1).all() and (lengths > 0).all()
    assert torch.allclose(lengths, z.norm(dim=-1) ** 2 / (1 + z.norm(dim=-1) ** 2), rtol=1e-4)
    zero = torch.zeros(3, 8, requires_grad=True)
    out = squash(zero)
    assert (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(zero.grad).all()


# ---------------------------------------------------------------- towers, baselines, training


def test_item_tower_mean_excludes_padding_attributes():
    attrs = torch.zeros(N_ITEMS, 3, dtype=torch.long)
    attrs[5] = torch.tensor([2, 0, 3])  # multi-valued, one padding slot
    cate = torch.zeros(N_ITEMS, dtype=torch.long)
    cate[5], cate[6] = 1, 2
    m = MIND(MINDConfig(n_items=N_ITEMS, dim=4), {"attrs": attrs, "cate": cate}, {"attrs": 4, "cate": 3})
    t = m.items
    W = t.table
    expect5 = (W[t.id_row(5)] + W[t.field_row("attrs", 2)] + W[t.field_row("attrs", 3)] + W[t.field_row("cate", 1)]) / 4
    expect6 = (W[t.id_row(6)] + W[t.field_row("cate", 2)]) / 2
    got = m.item_vectors(torch.tensor([[5, 6, 7, 0]]))  # any shape of ids
    assert got.shape == (1, 4, 4)
    assert torch.allclose(got[0, 0], expect5) and torch.allclose(got[0, 1], expect6)
    assert torch.allclose(got[0, 2], W[7]) and (got[0, 3] == 0).all()


def test_item_features_that_do_not_fit_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="vocabulary size"):
        MIND(MINDConfig(n_items=4), {"cate": torch.tensor([0, 1, 5, 1])}, {"cate": 3})


def test_youtube_dnn_is_the_masked_mean_of_history_vectors_through_the_mlp():
    cfg = youtube_dnn(MINDConfig(n_items=N_ITEMS, dim=8, hidden=(16,)))
    assert (cfg.n_interests, cfg.pooling) == (1, "mean")
    m = MIND(cfg, {}, {}).eval()
    hist, mask, n = batch()
    V, valid = m.user_interests(hist, mask, n)
    e = m.item_vectors(hist) * mask[..., None]
    mean = e.sum(1) / mask.sum(1, keepdim=True)
    assert V.shape == (4, 1, 8) and valid.all()
    assert torch.allclose(V[:, 0], m.mlp(mean), atol=1e-6)


def test_interests_and_items_equals_the_separate_calls():
    m = make().eval()
    hist, mask, n = batch()
    ids = torch.tensor([3, 4, 0, 9])
    V, valid, items = m.interests_and_items(hist, mask, n, ids)
    V2, valid2 = m.user_interests(hist, mask, n)
    assert torch.allclose(V, V2, atol=1e-6) and torch.equal(valid, valid2)
    assert torch.allclose(items, m.item_vectors(ids))


def test_gradients_reach_S_the_mlp_and_every_embedding_but_padding():
    m = make().train()
    hist, mask, n = batch()
    b = RetrievalBatch(user=torch.arange(4), hist=hist, hist_mask=mask, target=torch.tensor([1, 2, 3, 4]), n_events=n)
    retrieval_loss(m, b, NegativeSampler(np.ones(N_ITEMS), seed=0), 10).backward()
    assert m.S.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.mlp.parameters())
    g = m.items.table.grad
    assert g[hist[0, 0]].abs().sum() > 0  # an item id row
    assert g[N_ITEMS:].abs().sum() > 0  # category rows
    assert (g[0] == 0).all()  # padding never learns


def test_user_profile_embedding_is_used_and_unknown_users_are_row_zero():
    m = make(n_users=5, profile_dim=3).eval()
    hist, mask, n = batch()
    a, _ = m.user_interests(hist, mask, n, user=torch.tensor([1, 2, 3, 4]))
    b, _ = m.user_interests(hist, mask, n, user=torch.tensor([2, 2, 3, 99]))
    c, _ = m.user_interests(hist, mask, n, user=torch.tensor([1, 2, 3, 0]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1]) and torch.allclose(b[3], c[3])
    with pytest.raises(ValueError, match="pass user ids"):
        m.user_interests(hist, mask, n)


def test_config_refuses_settings_that_cannot_work():
    with pytest.raises(ValueError, match="temperature"):
        MINDConfig(n_items=10, normalize=True)
    MINDConfig(n_items=10, normalize=True, temperature=0.05)
    with pytest.raises(ValueError, match="youtube_dnn"):
        MINDConfig(n_items=10, pooling="mean")
    with pytest.raises(ValueError, match="softmax_axis"):
        MINDConfig(n_items=10, softmax_axis="items")
    with pytest.raises(ValueError, match="attention_p"):
        MINDConfig(n_items=10, attention_p="soft")
    with pytest.raises(ValueError, match="normalize"):
        MINDConfig(n_items=10, normalize="interests")
    MINDConfig(n_items=10, normalize="items")  # interest lengths are free: no temperature needed
    with pytest.raises(ValueError, match="s_init"):
        MINDConfig(n_items=10, s_init="zeros")


def test_s_init_identity_routes_the_behaviour_vectors_themselves():
    m = make(s_init="identity")
    assert torch.equal(m.S.detach(), torch.eye(m.cfg.dim))
    assert not torch.equal(make().S.detach(), torch.eye(m.cfg.dim))  # the default: xavier noise


def test_normalized_vectors_have_unit_length():
    m = make(normalize=True, temperature=0.1).eval()
    hist, mask, n = batch()
    V, valid = m.user_interests(hist, mask, n)
    assert torch.allclose(V[valid].norm(dim=-1), torch.ones(int(valid.sum())), atol=1e-5)
    assert torch.allclose(m.item_vectors(torch.tensor([1, 2])).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_normalize_items_leaves_interest_lengths_free():
    m = make(normalize="items").eval()
    hist, mask, n = batch()
    V, valid = m.user_interests(hist, mask, n)
    assert not torch.allclose(V[valid].norm(dim=-1), torch.ones(int(valid.sum())), atol=1e-3)
    assert torch.allclose(m.item_vectors(torch.tensor([1, 2])).norm(dim=-1), torch.ones(2), atol=1e-5)
    V2, _, items = m.interests_and_items(hist, mask, n, torch.tensor([1, 2]))
    assert torch.allclose(V2, V) and torch.allclose(items.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_interest_offsets_add_to_every_score_and_leave_unit_directions():
    m = make(normalize=True, temperature=0.1, interest_bias=True).eval()
    hist, mask, n = batch()
    V, valid = m.user_interests(hist, mask, n)
    assert V.shape[-1] == m.vector_dim == 9
    d, c = V[..., :8], V[..., 8]
    assert torch.allclose(d[valid].norm(dim=-1), torch.ones(int(valid.sum())), atol=1e-5)
    items = m.item_vectors(torch.tensor([1, 2, 3]))
    assert torch.equal(items[:, 8], torch.ones(3))
    assert torch.allclose(items[:, :8].norm(dim=-1), torch.ones(3), atol=1e-5)
    # an item's score from interest k: cosine + c_k
    assert torch.allclose(V @ items.T, d @ items[:, :8].T + c[..., None], atol=1e-6)
    V2, _, items2 = m.interests_and_items(hist, mask, n, torch.tensor([1, 2, 3]))
    assert torch.allclose(V2, V) and torch.allclose(items2, items)


@pytest.mark.parametrize("negative_scores", ["readout", "max"])
def test_interest_offsets_are_a_constant_for_one_interest_and_change_the_loss_for_several(negative_scores):
    # K = 1: the offset shifts a row's every logit alike, so the loss ignores it (YouTube DNN is unchanged);
    # with several interests it decides which interest scores the target and the negatives
    hist, mask, n = batch()
    b = RetrievalBatch(torch.arange(4), hist, mask, torch.tensor([7, 8, 9, 10]), n)
    for k, changes in ((1, False), (4, True)):
        m = make(n_interests=k, normalize=True, temperature=0.1, interest_bias=True).eval()
        with torch.no_grad():  # spread the interests' directions (tiny init embeddings)
            m.items.table.mul_(30)
        before = retrieval_loss(m, b, NegativeSampler(np.ones(N_ITEMS), seed=0), 20, negative_scores=negative_scores)
        with torch.no_grad():  # offsets that differ by interest: the last layer's c_k row
            m.mlp[-1].weight[-1].normal_(0, 3.0)
            m.mlp[-1].bias[-1] = 5.0
        after = retrieval_loss(m, b, NegativeSampler(np.ones(N_ITEMS), seed=0), 20, negative_scores=negative_scores)
        assert torch.isclose(before, after, atol=1e-5) != changes


@pytest.mark.parametrize("axis", ["interests", "behaviours"])
def test_global_interest_is_the_whole_history_capsule_valid_from_two_interests(axis):
    m = make(global_interest=True, softmax_axis=axis).train()
    hist, mask, n = batch()  # K'_u = 4, 1, 1, 2
    r = m.route(hist, mask, n, salt=3)
    assert r.capsules.shape == (4, 5, 8) and r.weights.shape == (4, 6, 5)
    assert r.valid[:, 4].tolist() == [True, False, False, True]  # a duplicate of the one capsule when K'_u = 1
    # the extra slot is what one interest routes (interests axis: every behaviour's whole vote) or
    # the plain mean of the behaviours (behaviours axis), through the same S and squash
    c = m.items(hist * mask) @ m.S.T  # (B, L, D)
    z = (c * mask[:, :, None]).sum(1)
    if axis == "behaviours":
        z = z / mask.sum(1, keepdim=True)
    want = squash(z) * r.valid[:, 4, None]
    assert torch.allclose(r.capsules[:, 4], want, atol=1e-6)
    if axis == "interests":  # = the capsule of a K = 1 MIND with the same weights
        one = make(n_interests=1).train()
        one.load_state_dict(m.state_dict())
        assert torch.allclose(one.route(hist, mask, n, salt=3).capsules[[0, 3], 0], r.capsules[[0, 3], 4], atol=1e-6)
    # the routed slots are the same as without the option
    plain = make(softmax_axis=axis).train()
    plain.load_state_dict(m.state_dict())
    assert torch.allclose(plain.route(hist, mask, n, salt=3).capsules, r.capsules[:, :4], atol=1e-6)
    # it trains: the loss reaches S through it, and it never surfaces for a K'_u = 1 user
    b = RetrievalBatch(user=torch.arange(4), hist=hist, hist_mask=mask, target=torch.tensor([1, 2, 3, 4]), n_events=n)
    retrieval_loss(m, b, NegativeSampler(np.ones(N_ITEMS), seed=0), 10).backward()
    assert m.S.grad.abs().sum() > 0
    V, valid = m.eval().user_interests(hist, mask, n)
    assert V.shape == (4, 5, 8) and (V[~valid] == 0).all()
    with pytest.raises(ValueError, match="global_interest"):
        MINDConfig(n_items=10, n_interests=1, global_interest=True)
