"""UIE properties a reader can check (SPEC §4.2): the stream-clustering step, negative-similarity
zeroing, stop-gradient memories, unseen users, bucket-uniform sampling, centre health."""

from __future__ import annotations

import math

import pytest
import torch

from facetrec.data.batches import MultiTaskBatch
from facetrec.models.ple import PLE, PLEConfig, multitask_loss
from facetrec.models.uie import UIE, ClusterMemory, UIEConfig, activity_bucket, bucket_uniform_sample

N_ITEMS, N_CATE, N_USERS = 40, 5, 12


def features():
    g = torch.Generator().manual_seed(0)
    cate = torch.randint(1, N_CATE, (N_ITEMS, 1), generator=g)
    cate[0] = 0
    return {"cate": cate}, {"cate": N_CATE}


def small_uie(**kw) -> UIEConfig:
    return UIEConfig(**{"clusters": 6, "top_k": 2, "profile_dim": 4, "profile_tower": (8,), "generalisation": (5,),
                        "update_size": 16, "reseed_every": 0, **kw})


def make(sequence: str = "pool", **uie) -> PLE:
    torch.manual_seed(0)
    cfg = PLEConfig(n_items=N_ITEMS, tasks=("engaged", "liked"), embed_dim=4, expert=(8,), tower=(4,), sequence=sequence,
                    n_users=N_USERS, use_uie=True, uie=small_uie(**uie))
    return PLE(cfg, *features())


def batch(B: int = 8, T: int = 5, seed: int = 1, users=None) -> MultiTaskBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    hist = torch.randint(1, N_ITEMS, (B, T), generator=g) * mask
    label = (torch.arange(B) % 2 == 0).float()
    labels = torch.stack([label, label * (torch.rand(B, generator=g) > 0.5).float()], 1)
    user = torch.arange(1, B + 1) if users is None else torch.as_tensor(users)
    return MultiTaskBatch(user=user, hist=hist, hist_mask=mask, aux_neg=torch.randint(1, N_ITEMS, (B, T), generator=g),
                          target=torch.randint(1, N_ITEMS, (B,), generator=g), label=label, labels=labels,
                          label_mask=torch.ones(B, 2, dtype=torch.bool), n_events=lengths * 3)


def train_steps(m: PLE, n: int = 3) -> None:
    """A few memory updates (as the training task does after each step)."""
    m.train()
    for s in range(n):
        b = batch(seed=s)
        out = m.outputs(b, with_aux=True)
        m.uie.update(out.uie, b.user, out.hist_e, b.hist_mask, b.n_events, b.label > 0.5)


# ---------------------------------------------------------------- stream clustering


def test_one_memory_step_moves_the_nearest_centre_by_exactly_rho_times_v_minus_c():
    mem = ClusterMemory(3, 2, rho=0.25, init="random")
    mem.centres.copy_(torch.tensor([[0.0, 0.0], [4.0, 4.0], [-3.0, 1.0]]))
    before = mem.centres.clone()
    v = torch.tensor([[3.0, 5.0]])  # nearest: centre 1
    idx = mem.update(v)
    assert idx.tolist() == [1]
    assert torch.allclose(mem.centres[1], before[1] + 0.25 * (v[0] - before[1]))  # (3.75, 4.25)
    assert torch.equal(mem.centres[[0, 2]], before[[0, 2]])
    assert mem.usage.tolist() == [0, 1, 0]


def test_several_vectors_on_one_centre_move_it_toward_their_mean():
    mem = ClusterMemory(2, 2, rho=0.5, init="random")
    mem.centres.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    mem.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(mem.centres[0], torch.tensor([0.25, 0.25]))


def test_data_init_seeds_centres_from_the_first_vectors():
    mem = ClusterMemory(4, 3, rho=0.1, init="data")
    v = torch.randn(10, 3) * 5 + 20
    mem.update(v, torch.Generator().manual_seed(0))
    # every centre sits near one of the vectors (jitter 1%), far from the random init near 0
    d = torch.cdist(mem.centres, v).min(1).values
    assert bool(mem.ready) and (d < 0.1 * v.norm(dim=1).max()).all()


def test_centres_with_negative_similarity_get_zero_weight():
    mem = ClusterMemory(3, 2, rho=0.1, init="random")
    mem.centres.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]))
    r = mem.retrieve(torch.tensor([[1.0, 0.5]]), k=3)
    sim, w = r.sim[0], r.weight[0]
    assert (w[sim < 0] == 0).all() and (sim < 0).sum() == 1
    pos = sim > 0
    expect = torch.exp(sim[pos]) / torch.exp(sim[pos]).sum()  # exp-weighted, normalised over the kept ones
    assert torch.allclose(w[pos], expect)


def test_all_negative_similarities_give_a_zero_upe_mix():
    mem = ClusterMemory(2, 2, rho=0.1, init="random")
    mem.centres.copy_(torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
    r = mem.retrieve(torch.tensor([[1.0, 1.0]]), k=2)
    assert torch.equal(r.weight, torch.zeros(1, 2))


# ---------------------------------------------------------------- sampling


def test_uniform_bucket_sampling_holds_on_a_skewed_batch():
    n_events = torch.tensor([40] * 900 + [10] * 80 + [2] * 20)  # 90% dense, 8% mid, 2% sparse
    buckets = activity_bucket(n_events, (5, 20))
    assert torch.bincount(buckets).tolist() == [20, 80, 900]
    idx = bucket_uniform_sample(buckets, 30000, torch.Generator().manual_seed(0))
    share = torch.bincount(buckets[idx], minlength=3).double() / 30000
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.015), share
    # and uniform within a bucket: all 20 sparse rows are drawn about equally often
    sparse = torch.bincount(idx[buckets[idx] == 0], minlength=1000)[980:]
    assert sparse.min() > 0.6 * sparse.float().mean()


def test_bucket_edges_are_inclusive_upper_ends():
    assert activity_bucket(torch.tensor([0, 5, 6, 20, 21]), (5, 20)).tolist() == [0, 0, 1, 1, 2]


# ---------------------------------------------------------------- stop-gradient


def test_memories_are_buffers_and_leave_the_main_models_gradients_unchanged():
    m = make()
    train_steps(m, 2)
    memory_names = {n for n, _ in m.named_buffers() if n.startswith("uie.")}
    assert {"uie.item_memory.centres", "uie.user_memory", "uie.seq_memory.centres", "uie.profile_memory.centres"} <= memory_names
    assert not any(n in memory_names for n, _ in m.named_parameters())

    b = batch(seed=5)
    m.train()
    out = m.outputs(b, with_aux=True)
    loss, _ = multitask_loss(m, b, out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.uie.update(out.uie, b.user, out.hist_e, b.hist_mask, b.n_events, b.label > 0.5)  # the memory step
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
        assert (p.grad is None and n not in grads) or torch.equal(p.grad, grads[n]), n


@pytest.mark.parametrize("sequence", ["pool", "dien"])
def test_enhancement_vectors_do_not_pull_on_the_shared_embeddings_or_the_sequence_encoder(sequence):
    m = make(sequence)
    train_steps(m, 2)
    b = batch(seed=3)
    out = m.outputs(b, with_aux=False)
    (out.uie.vectors ** 2).sum().backward()
    main = [(n, p) for n, p in m.named_parameters() if not n.startswith("uie.")]
    assert main and all(p.grad is None or not p.grad.any() for n, p in main if not n.startswith(("levels", "towers")))
    # while the UIE's own trainable parts (profile tower, generalisation MLP, UCSE query) do learn
    assert m.uie.profile_tower[1].weight.grad.abs().sum() > 0
    assert m.uie.seq_query.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- UCBE


def test_an_unseen_user_gets_a_finite_non_zero_ucbe_vector():
    m = make()
    train_steps(m, 3)
    m.eval()
    b = batch(B=3, seed=9, users=[0, N_USERS + 5, 0])
    b.hist_mask[2] = False  # and one with no history at all: the centres in use
    b.hist[2] = 0
    e = m.items(b.hist)
    v = m.uie.ucbe(b.user, e, b.hist_mask)
    assert v.shape == (3, m.items.dim)
    assert torch.isfinite(v).all() and (v.norm(dim=1) > 0).all()
    # an unseen user's vector is the (positive-similarity) mean of its history's item centres
    assert torch.allclose(v[0], m.uie.history_centres(e[:1], b.hist_mask[:1])[0])


def test_user_memory_trains_on_positives_only_and_moves_toward_the_centres():
    m = make()
    train_steps(m, 3)
    uie = m.uie
    user = torch.tensor([3])
    e = m.items(torch.tensor([[5, 6, 0]])).detach()
    mask = torch.tensor([[True, True, False]])
    target = uie.item_memory.centres[1:2] * 1.1  # an item vector with positively similar centres
    uie.user_memory_step(user, target, e, mask)  # first sight: starts from its history's centres
    start = uie.user_memory[3].clone()
    # a batch whose only sample of user 3 is negative leaves the memory alone
    out = m.outputs(batch(B=2, seed=1, users=[3, 4]), with_aux=False)
    neg = torch.tensor([False, True])
    uie.update(out.uie, torch.tensor([3, 4]), out.hist_e, batch(B=2, seed=1).hist_mask, torch.tensor([2, 2]), neg)
    assert torch.equal(uie.user_memory[3], start)
    losses = [uie.user_memory_step(user, target, e, mask) for _ in range(5)]
    assert losses[0] > 0 and losses[-1] < 0.8 * losses[0]


def test_first_sight_memory_equals_the_unseen_user_vector():
    m = make(ucbe_alpha=0.0)  # no pull toward the target's centres: only the start value shows
    train_steps(m, 2)
    uie = m.uie
    e = m.items(torch.tensor([[5, 6, 9]])).detach()
    mask = torch.ones(1, 3, dtype=torch.bool)
    m.eval()
    cold = uie.ucbe(torch.tensor([0]), e, mask)
    fresh = int(torch.nonzero(~uie.user_seen[1:])[0]) + 1
    uie.user_memory_step(torch.tensor([fresh]), m.items(torch.tensor([7])).detach(), e, mask)
    assert bool(uie.user_seen[fresh])
    assert torch.allclose(uie.ucbe(torch.tensor([fresh]), e, mask), cold)


def test_training_never_reads_the_per_user_memory_but_evaluation_does():
    m = make()
    train_steps(m, 2)
    uie = m.uie
    b = batch(B=4, seed=2)
    e = m.items(b.hist).detach()
    uie.user_memory[b.user] = 123.0  # a memory holding later targets must not reach training samples
    uie.user_seen[b.user] = True
    m.train()
    assert torch.allclose(uie.ucbe(b.user, e, b.hist_mask), uie.history_centres(e, b.hist_mask))
    m.eval()
    assert torch.equal(uie.ucbe(b.user, e, b.hist_mask), torch.full((4, m.items.dim), 123.0))
    m2 = make(memory_at_eval=False)
    m2.load_state_dict(m.state_dict())
    m2.eval()
    assert torch.allclose(m2.uie.ucbe(b.user, e, b.hist_mask), m2.uie.history_centres(e, b.hist_mask))


# ---------------------------------------------------------------- centre health


def test_reseeding_revives_dead_centres_and_health_reports_usage():
    mem = ClusterMemory(4, 2, rho=0.1, init="random")
    mem.centres.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
    pool = torch.randn(32, 2) * 0.1
    mem.update(pool)  # everything lands on centre 0: 3 dead centres
    h = mem.health()
    assert h["in_use"] == 0.25 and h["usage"] == [32, 0, 0, 0]
    assert mem.reseed(pool, 0.01, torch.Generator().manual_seed(0)) == 3
    assert (mem.centres.abs() < 5).all() and int(mem.reseeded) == 3
    mem.usage.zero_()
    mem.update(torch.cat([pool, mem.centres[1:] + 0.001]))
    assert mem.health()["in_use"] > 0.25


def test_uie_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="rho"):
        UIEConfig(rho=0.0)
    with pytest.raises(ValueError, match="overshoot"):
        UIEConfig(ucbe_alpha=0.5, user_lr=1.0, top_k=3)
    with pytest.raises(ValueError, match="init"):
        UIEConfig(init="zeros")
    with pytest.raises(ValueError, match="unknown uie key"):
        PLEConfig(n_items=10, tasks=("click",), use_uie=True, uie={"centers": 8})


def test_health_entropy_is_one_for_even_use():
    mem = ClusterMemory(2, 1, rho=0.1, init="random")
    mem.centres.copy_(torch.tensor([[0.0], [10.0]]))
    mem.update(torch.tensor([[0.1], [9.9]]))
    assert math.isclose(mem.health()["usage_entropy"], 1.0)
