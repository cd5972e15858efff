"""DIEN / DIN / base-model properties a reader can check (SPEC §3): gate limits, padding, aux loss,
fast loops against the literal formulas, attention, serving path, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facetrec.data.batches import RankingBatch
from facetrec.models import dien as dien_mod
from facetrec.models.dien import (BLEND, DIEN, DIN, EVOLUTIONS, UPDATE, BaseModel, DIENConfig, gated_scan, masked_softmax, pack,
                                  ranking_loss, reference_evolve, reference_extract)

N_ITEMS, N_CATE = 40, 5


def features(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    g = torch.Generator().manual_seed(seed)
    cate = torch.randint(1, N_CATE, (N_ITEMS, 2), generator=g)  # multi-valued: the first value is the category
    cate[0] = 0
    return {"cate": cate}, {"cate": N_CATE}


def make(cls=DIEN, **kw) -> nn.Module:
    torch.manual_seed(0)
    kw = {"embed_dim": 4, "mlp": (8,), "activation": "prelu", **kw}
    return cls(DIENConfig(n_items=N_ITEMS, **kw), *features())


def batch(lengths=(3, 7, 1, 7, 5, 2), T=7, seed=1, junk=False) -> RankingBatch:
    """Left-aligned histories; with junk, padded positions hold random ids instead of 0."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    hist = torch.randint(1, N_ITEMS, (B, T), generator=g)
    aux = torch.randint(1, N_ITEMS, (B, T), generator=g)
    if not junk:
        hist, aux = hist * mask, aux * mask
    return RankingBatch(user=torch.arange(1, B + 1), hist=hist, hist_mask=mask, aux_neg=aux,
                        target=torch.randint(1, N_ITEMS, (B,), generator=g), label=torch.randint(0, 2, (B,), generator=g).float())


def padded(b: RankingBatch, T: int, seed: int = 7) -> RankingBatch:
    """The same batch padded to T with random junk ids in the new padding."""
    g = torch.Generator().manual_seed(seed)
    extra = T - b.hist.shape[1]
    junk = lambda x: torch.cat([x, torch.randint(1, N_ITEMS, (x.shape[0], extra), generator=g)], 1)
    return RankingBatch(b.user, junk(b.hist), F.pad(b.hist_mask, (0, extra)), junk(b.aux_neg), b.target, b.label)


def literal(m: DIEN, b: RankingBatch):
    """SPEC §3.2-3.4 written out: dense, unsorted, step by step, explicit masks and a Python loop for the aux loss."""
    mask = b.hist_mask
    e_b = m.items(b.hist * mask)  # (B, T, D)
    h = reference_extract(e_b, mask, m.extractor)  # (B, T, H)
    e_a = m.items(b.target)
    att = masked_softmax(torch.einsum("bth,bh->bt", h, m.att_w(e_a)), mask)  # (B, T)
    h_T = reference_evolve(h, att, mask, m.evolver, m.cfg.evolution)
    logits = m._logits(h_T, e_a, (e_b * mask[..., None]).sum(1), [])
    terms = []
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1] - 1):
            if mask[i, t + 1]:
                ht = h[i, t] if m.aux_proj is None else m.aux_proj(h[i, t])
                terms.append(F.logsigmoid(ht @ m.items(b.hist[i, t + 1])) + F.logsigmoid(-(ht @ m.items(b.aux_neg[i, t + 1]))))
    return logits, -torch.stack(terms).mean(), att, h


def grads(loss: torch.Tensor, m: nn.Module) -> list[torch.Tensor]:
    ps = [p for p in m.parameters() if p.requires_grad]
    return [torch.zeros_like(p) if g is None else g for p, g in zip(ps, torch.autograd.grad(loss, ps, allow_unused=True))]


# ---------------------------------------------------------------- gates (SPEC §3.3)


def cell_and_steps(H=5, seed=0):
    torch.manual_seed(seed)
    cell = nn.GRUCell(H, H)
    x = torch.randn(2, 2, H)  # (B, T=2 steps, H)
    return cell, x


def scan_final(cell: nn.GRUCell, x: torch.Tensor, att: torch.Tensor, evolution: str) -> torch.Tensor:
    """The production path (packed scan) for full-length rows: x (B, T, H), att (B, T) -> (B, H)."""
    B, T, _ = x.shape
    xs, am = x.transpose(0, 1).reshape(B * T, -1), att.t().reshape(-1)  # step-major packing
    if evolution == "aigru":
        S = gated_scan(F.linear(xs * am[:, None], cell.weight_ih, cell.bias_ih), cell.weight_hh, cell.bias_hh, None, [B] * T, UPDATE)
    else:
        kind = UPDATE if evolution == "augru" else BLEND
        S = gated_scan(F.linear(xs, cell.weight_ih, cell.bias_ih), cell.weight_hh, cell.bias_hh, am, [B] * T, kind)
    return S[-B:]


def candidates_final(cell: nn.GRUCell, x: torch.Tensor, att: torch.Tensor, evolution: str) -> torch.Tensor:
    """The serving loop, one history x (T, H) for N candidates with att (N, T) -> (N, H)."""
    return dien_mod._evolve_candidates_c(x @ cell.weight_ih.T, cell.bias_ih, cell.weight_hh, cell.bias_hh, att.t().contiguous(),
                                         EVOLUTIONS.index(evolution))


@pytest.mark.parametrize("path", ["scan", "reference"])
def test_augru_attention_0_keeps_the_state_and_1_is_a_gru_step(path):
    cell, x = cell_and_steps()
    a1 = torch.rand(2, 1)
    run = (lambda att: scan_final(cell, x, att, "augru")) if path == "scan" else \
        (lambda att: reference_evolve(x, att, torch.ones(2, 2, dtype=torch.bool), cell, "augru"))
    h_first = scan_final(cell, x[:, :1], a1, "augru") if path == "scan" else \
        reference_evolve(x[:, :1], a1, torch.ones(2, 1, dtype=torch.bool), cell, "augru")  # the state after step 1
    # a second step with a = 0 keeps the state; not bit-exact against h_first, which comes from a
    # one-step run whose batched input matmul (T = 1 vs 2) may round differently on some CPUs
    assert torch.allclose(run(torch.cat([a1, torch.zeros(2, 1)], 1)), h_first, rtol=0, atol=1e-7)
    h2 = run(torch.cat([a1, torch.ones(2, 1)], 1))  # second step with a = 1
    assert torch.allclose(h2, cell(x[:, 1], h_first), atol=1e-6)


def test_serving_loop_has_the_same_gate_limits():
    cell, x = cell_and_steps()
    hist = x[0]  # (T=2, H): one user's interest states
    a = torch.tensor([[0.3, 0.0], [0.3, 1.0]])  # two candidates
    h = candidates_final(cell, hist, a, "augru")
    h_first = candidates_final(cell, hist[:1], a[:1, :1], "augru")
    assert torch.allclose(h[0], h_first[0], atol=1e-7)  # a = 0 keeps the state
    assert torch.allclose(h[1], cell(hist[1:], h_first)[0], atol=1e-6)  # a = 1 is a GRU step


@pytest.mark.parametrize("path", ["scan", "reference", "serving"])
def test_agru_interpolates_between_the_state_and_the_candidate(path):
    cell, x = cell_and_steps()
    with torch.no_grad():  # z = 0 makes a GRU step return the candidate state h̃
        H = cell.hidden_size
        cell.weight_ih[H:2 * H] = 0
        cell.weight_hh[H:2 * H] = 0
        cell.bias_ih[H:2 * H] = -1e4
    if path == "serving":
        x = x[:1].expand(2, -1, -1)
    h0 = torch.zeros(2, H)
    cand = cell(x[:, 0], h0)  # h̃ of the first step from zero state
    for a in (0.0, 0.4, 1.0):
        att = torch.full((2, 1), a)
        if path == "scan":
            h = scan_final(cell, x[:, :1], att, "agru")
        elif path == "reference":
            h = reference_evolve(x[:, :1], att, torch.ones(2, 1, dtype=torch.bool), cell, "agru")
        else:
            h = candidates_final(cell, x[0, :1], att, "agru")
        assert torch.allclose(h, (1 - a) * h0 + a * cand, atol=1e-6)


def test_aigru_is_a_gru_over_attention_scaled_inputs():
    cell, x = cell_and_steps()
    att = torch.rand(2, 2)
    h = scan_final(cell, x, att, "aigru")
    expect = cell(att[:, 1:] * x[:, 1], cell(att[:, :1] * x[:, 0], torch.zeros(2, 5)))
    assert torch.allclose(h, expect, atol=1e-6)


def test_the_extractor_scan_equals_torch_gru():
    torch.manual_seed(0)
    gru = nn.GRU(4, 6, batch_first=True)
    cell = nn.GRUCell(4, 6)
    with torch.no_grad():
        for a, b in ((cell.weight_ih, gru.weight_ih_l0), (cell.weight_hh, gru.weight_hh_l0), (cell.bias_ih, gru.bias_ih_l0),
                     (cell.bias_hh, gru.bias_hh_l0)):
            a.copy_(b)
    x = torch.randn(3, 5, 4)
    b = RankingBatch(torch.zeros(3), torch.ones(3, 5), torch.ones(3, 5, dtype=torch.bool), torch.ones(3, 5), torch.ones(3), torch.ones(3))
    p = pack(b.hist_mask)
    S = gated_scan(F.linear(p.take(x), cell.weight_ih, cell.bias_ih), cell.weight_hh, cell.bias_hh, None, p.batch_sizes, UPDATE)
    assert torch.allclose(dien_mod.unpack(S[3:], p, 5), gru(x)[0], atol=1e-6)


# ---------------------------------------------------------------- fast paths = the literal formulas


@pytest.mark.parametrize("evolution", EVOLUTIONS)
@pytest.mark.parametrize("widths", [(0, 0), (6, 3)])
def test_compiled_loops_match_the_reference_values_and_gradients(evolution, widths):
    m = make(evolution=evolution, hidden=widths[0], evolve_hidden=widths[1])
    b = batch()
    logits, aux = m.logits_and_aux(b)
    ref_logits, ref_aux, _, _ = literal(m, b)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(aux, ref_aux, atol=1e-5)
    for g, r in zip(grads(logits.sum() + aux, m), grads(ref_logits.sum() + ref_aux, m)):
        assert torch.allclose(g, r, atol=1e-5)


def test_hand_written_backward_passes_gradcheck():
    torch.manual_seed(0)
    bs, H = [4, 3, 3, 1], 3
    P = sum(bs)
    for kind, with_att in ((UPDATE, False), (UPDATE, True), (BLEND, True)):
        gi = torch.randn(P, 3 * H, dtype=torch.double, requires_grad=True)
        w = torch.randn(3 * H, H, dtype=torch.double, requires_grad=True)
        b = torch.randn(3 * H, dtype=torch.double, requires_grad=True)
        am = torch.rand(P, dtype=torch.double, requires_grad=True) if with_att else None
        assert torch.autograd.gradcheck(lambda gi, w, b, am: gated_scan(gi, w, b, am, bs, kind), (gi, w, b, am))


def test_scripted_and_plain_python_loops_agree():
    torch.manual_seed(0)
    bs, H = [5, 4, 2], 4
    gi, w, bias, am = torch.randn(11, 3 * H), torch.randn(3 * H, H), torch.randn(3 * H), torch.rand(11)
    for kind in (UPDATE, BLEND):
        out = dien_mod._scan_forward(gi, w, bias, am, bs, kind, 6)
        out_c = dien_mod._scan_forward_c(gi, w, bias, am, bs, kind, 6)
        assert all(torch.allclose(a, c, atol=1e-6) for a, c in zip(out, out_c))
        grad = torch.randn(6 + 11, H)
        back = dien_mod._scan_backward(grad, w, am, bs, kind, 6, *out)
        back_c = dien_mod._scan_backward_c(grad, w, am, bs, kind, 6, *out)
        assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(back, back_c))


# ---------------------------------------------------------------- padding and sequence ends


@pytest.mark.parametrize("evolution", EVOLUTIONS)
def test_steps_past_a_sequence_end_change_nothing(evolution):
    m = make(evolution=evolution)
    b = batch()
    longer = padded(b, 12)  # more padding, filled with junk ids
    logits, aux = m.logits_and_aux(b)
    logits2, aux2 = m.logits_and_aux(longer)
    assert torch.allclose(logits, logits2, atol=1e-6) and torch.allclose(aux, aux2, atol=1e-6)
    assert torch.allclose(m.attention(longer)[:, :7], m.attention(b), atol=1e-6)
    assert torch.allclose(m.interest_states(longer)[:, :7], m.interest_states(b), atol=1e-6)


@pytest.mark.parametrize("aux_net", ["dot", "mlp"])
def test_aux_loss_ignores_padding_and_alpha_0_removes_it(aux_net):
    m = make(aux_net=aux_net)
    b, junk = batch(), batch(junk=True)  # same real positions, junk ids in the padding
    assert torch.equal(b.hist * b.hist_mask, junk.hist * junk.hist_mask)
    aux = m.auxiliary_loss(b, m.interest_states(b))
    assert torch.allclose(aux, m.auxiliary_loss(junk, m.interest_states(junk)), atol=1e-7)
    assert torch.allclose(aux, m.logits_and_aux(junk)[1], atol=1e-6)  # packed and dense forms agree
    total, parts = ranking_loss(m, junk)
    assert torch.allclose(total, parts["bce"] + 1.0 * parts["aux"])
    m0 = make(aux_alpha=0.0)
    total0, parts0 = ranking_loss(m0, b)
    assert "aux" not in parts0
    assert torch.equal(total0, F.binary_cross_entropy_with_logits(m0(b), b.label))


@pytest.mark.parametrize("attention", ["bilinear", "mlp"])
def test_attention_sums_to_one_over_real_steps_and_is_zero_on_padding(attention):
    m = make(attention=attention)
    b = batch(lengths=(3, 7, 1, 0, 5))  # an empty history too
    a = m.attention(b)
    assert torch.all(a[~b.hist_mask] == 0)
    assert torch.allclose(a.sum(1), (b.hist_mask.sum(1) > 0).float(), atol=1e-6)
    assert torch.all(a >= 0)


def test_empty_history_rows_get_the_zero_state_and_finite_logits():
    m = make()
    b = batch(lengths=(0, 4, 0))
    logits, aux = m.logits_and_aux(b)
    assert torch.isfinite(logits).all() and torch.isfinite(aux)
    assert torch.all(m.interest_states(b)[0] == 0)
    all_empty = batch(lengths=(0, 0))
    assert torch.isfinite(m(all_empty)).all() and m.logits_and_aux(all_empty)[1] == 0


def test_a_mask_with_holes_is_refused_with_a_hint():
    m = make()
    b = batch()
    b.hist_mask[1, 2] = False
    with pytest.raises(ValueError, match="left-aligned"):
        m(b)


# ---------------------------------------------------------------- serving


@pytest.mark.parametrize("evolution,attention,att_pool", [(e, "bilinear", False) for e in EVOLUTIONS]
                         + [("augru", "mlp", False), ("augru", "bilinear", True)])
def test_score_candidates_equals_forward_on_the_repeated_batch(evolution, attention, att_pool):
    m = make(evolution=evolution, attention=attention, attention_pooling=att_pool, activation="dice", n_users=10).eval()  # eval: Dice uses its running statistics
    hist = torch.tensor([5, 9, 2, 31, 7, 0, 0])
    cands = torch.tensor([1, 4, 9, 33, 17])
    b = RankingBatch(user=torch.full((5,), 3), hist=hist.expand(5, -1), hist_mask=(hist > 0).expand(5, -1),
                     aux_neg=torch.ones(5, 7, dtype=torch.long), target=cands, label=torch.zeros(5))
    for h, mask in ((hist, hist > 0), (hist[None], (hist > 0)[None])):
        assert torch.allclose(m.score_candidates(h, mask, cands, user=3), m(b), atol=1e-5)
    empty = torch.zeros(7, dtype=torch.long)
    assert torch.isfinite(m.score_candidates(empty, empty > 0, cands)).all()


def test_din_and_base_serve_the_same_as_forward():
    for cls in (DIN, BaseModel):
        m = make(cls).eval()
        hist = torch.tensor([5, 9, 2, 0])
        cands = torch.tensor([1, 4, 9])
        b = RankingBatch(torch.zeros(3, dtype=torch.long), hist.expand(3, -1), (hist > 0).expand(3, -1), hist.expand(3, -1),
                         cands, torch.zeros(3))
        assert torch.allclose(m.score_candidates(hist, hist > 0, cands), m(b), atol=1e-6)


# ---------------------------------------------------------------- gradients and baselines


@pytest.mark.parametrize("attention,att_pool,aux_net", [("bilinear", False, "dot"), ("mlp", False, "dot"), ("bilinear", True, "dot"),
                                                        ("bilinear", False, "mlp")])
def test_gradients_reach_every_dien_parameter_but_not_the_padding_rows(attention, att_pool, aux_net):
    m = make(n_users=10, attention=attention, attention_pooling=att_pool, aux_net=aux_net)
    total, _ = ranking_loss(m, batch(junk=True))
    total.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.all(m.items.id_emb.weight.grad[0] == 0) and torch.all(m.items.cate_emb.weight.grad[0] == 0)


def test_din_and_base_shapes_and_din_attention_on_padding():
    b = batch()
    for cls in (DIN, BaseModel):
        m = make(cls, n_users=10)
        out = m(b)
        assert out.shape == (6,)
        total, parts = ranking_loss(m, b)
        total.backward()
        assert set(parts) == {"bce"} and m.items.id_emb.weight.grad.abs().sum() > 0
    w = make(DIN).attention(batch(junk=True))
    assert w.shape == (6, 7) and torch.all(w[~b.hist_mask] == 0)


def test_item_embedding_is_id_concat_first_category():
    m = make()
    ids = torch.tensor([3, 0])
    e = m.items(ids)
    cate = features()[0]["cate"][:, 0]
    assert e.shape == (2, 8)
    assert torch.equal(e[0], torch.cat([m.items.id_emb.weight[3], m.items.cate_emb.weight[cate[3]]]))
    assert torch.all(e[1] == 0)  # padding


def test_item_fields_append_the_mean_of_the_items_values():
    feats, vocab = features()
    attrs = torch.zeros(N_ITEMS, 3, dtype=torch.long)
    attrs[3] = torch.tensor([2, 5, 0])  # two values, one padding slot
    attrs[4] = torch.tensor([7, 0, 0])
    feats, vocab = {**feats, "attrs": attrs}, {**vocab, "attrs": 8}
    torch.manual_seed(0)
    m = DIEN(DIENConfig(n_items=N_ITEMS, embed_dim=4, mlp=(8,), item_fields=("attrs",)), feats, vocab)
    assert m.items.dim == 12
    e = m.items(torch.tensor([3, 4, 5, 0]))
    w = m.items.extra[0].weight
    assert torch.allclose(e[0, 8:], (w[2] + w[5]) / 2) and torch.allclose(e[1, 8:], w[7])
    assert torch.all(e[2, 8:] == 0) and torch.all(e[3] == 0)  # an item without values; padding
    total, _ = ranking_loss(m, batch())
    total.backward()
    assert w.grad[w.grad.abs().sum(1) > 0].shape[0] > 0 and torch.all(w.grad[0] == 0)
    with pytest.raises(ValueError, match="item_fields"):
        DIEN(DIENConfig(n_items=N_ITEMS, item_fields=("brand",)), feats, vocab)


def test_aux_detach_keeps_the_aux_loss_but_not_its_embedding_gradient():
    b = batch()
    m, md = make(aux_alpha=1.0), make(aux_alpha=1.0, aux_detach=True)
    md.load_state_dict(m.state_dict())
    _, aux = m.logits_and_aux(b)
    _, aux_d = md.logits_and_aux(b)
    assert torch.allclose(aux, aux_d)
    g = torch.autograd.grad(aux_d, [md.items.id_emb.weight, md.extractor.weight_hh], allow_unused=True)
    g_full = torch.autograd.grad(aux, [m.items.id_emb.weight], allow_unused=True)[0]
    # detached: only the rows feeding the GRU (behaviours at t) get a gradient, never a t + 1 target alone
    assert g[1].abs().sum() > 0 and g_full.abs().sum() > g[0].abs().sum()
    only_next = set(b.aux_neg[:, 1:][b.hist_mask[:, 1:]].tolist()) - set(b.hist[b.hist_mask].tolist())
    assert only_next
    for j in only_next:
        assert torch.all(g[0][j] == 0) and g_full[j].abs().sum() > 0


def test_config_and_feature_errors_say_what_to_do():
    with pytest.raises(ValueError, match="augru"):
        DIENConfig(n_items=10, evolution="lstm")
    with pytest.raises(ValueError, match="official"):
        DIENConfig(n_items=10, aux_net="bilinear")
    with pytest.raises(ValueError, match="dice"):
        DIENConfig(n_items=10, activation="relu")
    with pytest.raises(ValueError, match="category_field"):
        DIEN(DIENConfig(n_items=N_ITEMS, category_field="brand"), *features())
    m = DIEN(DIENConfig(n_items=N_ITEMS, embed_dim=4, mlp=(8,)), {}, {})  # no item fields: id embedding only
    assert m.items.dim == 4 and m(batch()).shape == (6,)


def test_aux_shared_negatives_is_a_sampled_softmax_the_same_in_every_layout():
    """`aux_shared_negatives` n: each pair (t, t + 1) scores its next item against the auxiliary negatives of the
    second event of the batch's first n rows, its own next item among them left out; written out pair by pair."""
    b = batch()  # lengths 3, 7, 1, 7, 5, 2: row 2 has no second event
    b.aux_neg[3, 1] = b.hist[1, 1]  # a shared negative that is row 1's next item at t = 0
    for n in (4, 6, 100):
        m = make(aux_shared_negatives=n, hidden=6)  # H != D: through aux_proj
        h = m.interest_states(b)
        shared = [int(b.aux_neg[i, 1]) for i in range(min(n, len(b.hist))) if b.hist_mask[i, 1]]
        assert len(shared) == (3 if n == 4 else 5) and (int(b.hist[1, 1]) in shared) == (n > 3)
        terms = []
        for i in range(len(b.hist)):
            for t in range(b.hist.shape[1] - 1):
                if b.hist_mask[i, t + 1]:
                    q = m.aux_proj(h[i, t])
                    pos = int(b.hist[i, t + 1])
                    logits = [q @ m.items(torch.tensor(pos))] + [q @ m.items(torch.tensor(j)) for j in shared if j != pos]
                    terms.append(torch.log_softmax(torch.stack(logits), 0)[0])
        want = -torch.stack(terms).mean()
        assert torch.allclose(m.auxiliary_loss(b, h), want, atol=1e-6)
        assert torch.allclose(m.logits_and_aux(b)[1], want, atol=1e-6)  # packed (the CPU's training pass)
        m.layout = "padded"  # the GPU's
        assert torch.allclose(m.logits_and_aux(padded(b, 9))[1], want, atol=1e-6)
    total, parts = ranking_loss(m, b)
    assert parts["aux"] > 0 and torch.allclose(total, parts["bce"] + parts["aux"])
    with pytest.raises(ValueError, match="aux_shared_negatives"):
        DIENConfig(n_items=10, aux_shared_negatives=4, aux_net="mlp")


def test_aux_horizon_scores_each_of_the_next_n_behaviours_the_same_in_every_layout():
    """`aux_horizon` n: h_t against e_b[t+k] and the negative drawn for step t + k, for k = 1..n and every t + k
    real; one mean over all pairs. Written out pair by pair; n = 1 is SPEC §3.2's loss."""
    b = batch()  # lengths 3, 7, 1, 7, 5, 2
    for n in (1, 2, 3, 20):
        m = make(aux_alpha=1.0, aux_horizon=n, hidden=6)  # H != D: through aux_proj
        h = m.interest_states(b)
        terms = []
        for i in range(len(b.hist)):
            for t in range(b.hist.shape[1]):
                for k in range(1, n + 1):
                    if t + k < b.hist.shape[1] and b.hist_mask[i, t + k]:
                        q = m.aux_proj(h[i, t])
                        pos, neg = m.items(b.hist[i, t + k]), m.items(b.aux_neg[i, t + k])
                        terms.append(F.logsigmoid(q @ pos) + F.logsigmoid(-(q @ neg)))
        assert len(terms) == sum(max(0, int(L) - k) for L in b.hist_mask.sum(1) for k in range(1, n + 1))
        want = -torch.stack(terms).mean()
        assert torch.allclose(m.auxiliary_loss(b, h), want, atol=1e-6)
        assert torch.allclose(m.logits_and_aux(b)[1], want, atol=1e-6)  # packed (the CPU's training pass)
        m.layout = "padded"  # the GPU's
        assert torch.allclose(m.logits_and_aux(padded(b, 9))[1], want, atol=1e-6)
    with pytest.raises(ValueError, match="aux_horizon"):
        DIENConfig(n_items=10, aux_horizon=0)
    with pytest.raises(ValueError, match="aux_horizon"):
        DIENConfig(n_items=10, aux_horizon=2, aux_shared_negatives=8)
