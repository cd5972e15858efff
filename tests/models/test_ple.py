"""PLE properties (SPEC §4.1) and the cold-start pipeline end to end: softmax gates, task labels
from the data, config errors, a tiny train that writes the metrics.json shape."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from facetrec.data.batches import MultiTaskBatch
from facetrec.errors import ConfigError, DataError
from facetrec.models.ple import CGC, PLE, PLEConfig, multitask_loss
from facetrec.train.multitask import task_labels
from tests.conftest import ROOT

N_ITEMS, N_CATE = 30, 4


def features():
    g = torch.Generator().manual_seed(0)
    cate = torch.randint(1, N_CATE, (N_ITEMS, 1), generator=g)
    cate[0] = 0
    return {"cate": cate}, {"cate": N_CATE}


def make(tasks=("engaged", "liked"), **kw) -> PLE:
    torch.manual_seed(0)
    kw = {"embed_dim": 4, "expert": (8,), "tower": (4,), **kw}
    return PLE(PLEConfig(n_items=N_ITEMS, tasks=tasks, **kw), *features())


def batch(B=6, T=4, K=2, seed=0) -> MultiTaskBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    hist = torch.randint(1, N_ITEMS, (B, T), generator=g) * mask
    labels = torch.randint(0, 2, (B, K), generator=g).float()
    return MultiTaskBatch(user=torch.arange(1, B + 1), hist=hist, hist_mask=mask, aux_neg=torch.randint(1, N_ITEMS, (B, T), generator=g),
                          target=torch.randint(1, N_ITEMS, (B,), generator=g), label=labels[:, 0], labels=labels,
                          label_mask=torch.ones(B, K, dtype=torch.bool), n_events=lengths)


@pytest.mark.parametrize("levels", [1, 3])
def test_gates_are_softmax_over_their_experts(levels):
    m = make(levels=levels, task_experts=2, shared_experts=3)
    gates = m.gates(batch())
    assert len(gates) == levels
    for i, level in enumerate(gates):
        task_gates = level[:2]
        for g in task_gates:
            assert g.shape == (6, 2 + 3)  # own experts + shared experts
        if i < levels - 1:
            assert len(level) == 3 and level[2].shape == (6, 2 * 2 + 3)  # the shared gate sees every expert
        else:
            assert len(level) == 2  # no shared path out of the last level
        for g in level:
            assert (g >= 0).all() and torch.allclose(g.sum(-1), torch.ones(6))


def test_a_task_output_is_the_gate_weighted_sum_of_its_experts():
    cfg = PLEConfig(n_items=5, tasks=("click", "purchase"), expert=(3,), task_experts=1, shared_experts=2)
    cgc = CGC(4, 2, cfg, shared_gate=False)
    x = torch.randn(5, 4)
    outs, shared, gates = cgc([x, x], x)
    experts = torch.stack([cgc.task_experts[1][0](x), cgc.shared_experts[0](x), cgc.shared_experts[1](x)], 1)  # (B, 3, H)
    assert shared is None
    assert torch.allclose(outs[1], (gates[1][..., None] * experts).sum(1), atol=1e-6)


@pytest.mark.parametrize("sequence", ["pool", "dien"])
def test_logits_per_task_and_the_loss_parts(sequence):
    m = make(sequence=sequence)
    b = batch()
    assert m(b).shape == (6, 2)
    total, parts = multitask_loss(m, b)
    assert set(parts) == ({"bce/engaged", "bce/liked", "aux"} if sequence == "dien" else {"bce/engaged", "bce/liked"})
    total.backward()
    assert m.towers[1][1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sequence", ["pool", "dien"])
def test_item_fields_reach_the_ple_item_vectors(sequence):
    feats, vocab = features()
    attrs = torch.randint(0, 6, (N_ITEMS, 3), generator=torch.Generator().manual_seed(1))
    attrs[0] = 0
    torch.manual_seed(0)
    m = PLE(PLEConfig(n_items=N_ITEMS, tasks=("engaged", "liked"), embed_dim=4, expert=(8,), tower=(4,), sequence=sequence,
                      item_fields=("attrs",)), {**feats, "attrs": attrs}, {**vocab, "attrs": 6})
    assert m.items.dim == 12 and m(batch()).shape == (6, 2)
    total, _ = multitask_loss(m, batch())
    total.backward()
    assert m.items.extra[0].weight.grad.abs().sum() > 0


def test_user_id_embedding_joins_the_input_and_unknown_users_get_the_zero_row():
    m = make(user_dim=3, n_users=5)
    b = batch()  # users 1..6; ids 5 and 6 are past n_users = 5: unknown
    out = m(b)
    swapped = dataclasses.replace(b, user=torch.tensor([2, 1, 3, 4, 0, 6]))
    other = m(swapped)  # rows 0 and 1 swap known users; row 4 goes from unknown (5) to unknown (0)
    assert not torch.allclose(out[0], other[0]) and not torch.allclose(out[1], other[1])
    assert torch.allclose(out[2:], other[2:], atol=1e-6)
    multitask_loss(m, b)[0].backward()
    assert m.user.weight.grad[1:5].abs().sum() > 0 and (m.user.weight.grad[0] == 0).all()
    with pytest.raises(ValueError, match="user_dim"):
        PLEConfig(n_items=10, tasks=("click",), user_dim=-1)


def test_masked_task_samples_do_not_count():
    m = make()
    b = batch()
    total, parts = multitask_loss(m, b)
    b.label_mask[:, 1] = torch.tensor([True, False, False, False, False, False])
    flipped = b.labels.clone()
    flipped[1:, 1] = 1 - flipped[1:, 1]  # change only the masked-out labels
    b2 = MultiTaskBatch(**{**b.__dict__, "labels": flipped})
    assert torch.allclose(multitask_loss(m, b)[1]["bce/liked"], multitask_loss(m, b2)[1]["bce/liked"])


def test_task_labels_come_from_the_data():
    df = pl.DataFrame({"user": [1, 1, 2, 2, 3, 3], "label": [1, 0, 1, 0, 1, 0],
                       "rating": [5.0, 0.0, 3.0, 0.0, 4.0, 0.0],
                       "behavior": pl.Series(["pv", None, "buy", None, "cart", None], dtype=pl.Utf8)})
    y, mask = task_labels(df, PLEConfig(n_items=5, tasks=("engaged", "liked")))
    assert y[:, 0].tolist() == [1, 0, 1, 0, 1, 0]
    assert y[:, 1].tolist() == [1, 0, 0, 0, 1, 0]  # rating >= 4; negatives 0
    assert mask.all()
    y, mask = task_labels(df, PLEConfig(n_items=5, tasks=("click", "purchase"), task_scope={"purchase": "positives"}))
    assert y[:, 1].tolist() == [0, 0, 1, 0, 0, 0]
    assert mask[:, 1].tolist() == [True, False, True, False, True, False]
    y, _ = task_labels(df, PLEConfig(n_items=5, tasks=("click", "purchase"), purchase_behaviors=("buy", "cart")))
    assert y[:, 1].tolist() == [0, 0, 1, 0, 1, 0]
    with pytest.raises(DataError, match="data.rating"):
        task_labels(df.drop("rating"), PLEConfig(n_items=5, tasks=("engaged", "liked")))
    with pytest.raises(DataError, match="data.behavior"):
        task_labels(df.drop("behavior"), PLEConfig(n_items=5, tasks=("click", "purchase")))


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="choose from"):
        PLEConfig(n_items=5, tasks=("clicks",))
    with pytest.raises(ValueError, match="first task"):
        PLEConfig(n_items=5, tasks=("liked", "engaged"))
    with pytest.raises(ValueError, match="one weight per task"):
        PLEConfig(n_items=5, tasks=("click",), task_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="sequence"):
        PLEConfig(n_items=5, tasks=("click",), sequence="gru")
    with pytest.raises(ValueError, match="task_scope"):
        PLEConfig(n_items=5, tasks=("click",), task_scope={"liked": "positives"})


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def rated_log(tmp_path_factory, synth_prepared):
    """The synthetic log with a rating column (1-5), so two tasks exist: engaged and liked."""
    _, raw = synth_prepared
    base = tmp_path_factory.mktemp("rated")
    df = pl.read_csv(raw / "interactions.tsv", separator="\t")
    rng = np.random.default_rng(0)
    df = df.with_columns(pl.Series("rating", rng.integers(1, 6, df.height)))
    df.write_csv(base / "interactions.tsv", separator="\t")
    (base / "items.tsv").write_bytes((raw / "items.tsv").read_bytes())
    return base


def _cfg(raw, run_dir, name, extra=()):
    from facetrec.config import load_config

    return load_config(ROOT / "configs" / "synthetic.yaml", [
        f"data.root={raw}", "data.rating=rating", f"run.dir={run_dir}", f"model.name={name}", "model.expert=[16]",
        "model.tower=[8]", "model.embed_dim=8", "train.epochs=1", "train.max_steps=15", "train.batch_size=128",
        "train.threads=1", "model.uie.clusters=8", "model.uie.profile_dim=8", *extra])


def test_tiny_ple_uie_train_writes_the_metrics_shape(rated_log, tmp_path, monkeypatch):
    from facetrec.train.run import evaluate, train

    monkeypatch.setenv("FACETREC_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "ple-uie"
    m = train(_cfg(rated_log, run, "ple-uie", ["model.uie.reseed_every=5"]), progress=False)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["tasks"] == ["engaged", "liked"]  # derived from the data: it has ratings
    for task in ("engaged", "liked"):
        assert 0 <= saved["test"][task]["auc"] <= 1 and 0 <= saved["test"][task]["gauc"] <= 1
        for bucket in ("<=5", "6-20", ">20"):
            assert task in saved["buckets"][bucket]
        for k in ("1", "2", "3", "5"):
            assert 0 <= saved["cold_start"][k][task]["auc"] <= 1
    assert any("auc" in saved["buckets"][b]["engaged"] for b in saved["buckets"])
    health = json.loads((run / "centres.json").read_text())
    for mem in ("profile", "item", "sequence"):
        assert health[mem]["centres"] == 8 and len(health[mem]["usage"]) == 8 and 0 < health[mem]["in_use"] <= 1
        assert saved["centres"][mem]["in_use"] == health[mem]["in_use"]
    assert health["users_with_memory"] > 0
    again = evaluate(run, progress=False)  # rebuild from the run dir and best.pt
    assert again["test"]["engaged"]["auc"] == pytest.approx(m["test"]["engaged"]["auc"])
    # the command prints the per-task numbers (it printed a bare "test " for multi-task runs before)
    from typer.testing import CliRunner

    from facetrec.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(run)])
    assert res.exit_code == 0, res.output
    assert f"engaged/auc {again['test']['engaged']['auc']:.4f}" in res.output and "liked/gauc" in res.output
    # scored under an evaluation setting: metrics to --out, the run's own files untouched; the truncated-history
    # slices treat every user as unseen, so reading m_u or not leaves them as they were
    before = {f: (run / f).read_bytes() for f in ("metrics.json", "centres.json")}
    alt = tmp_path / "no-memory.json"
    res = CliRunner().invoke(app, ["evaluate", str(run), "--set", "model.uie.memory_at_eval=false", "--out", str(alt)])
    assert res.exit_code == 0, res.output
    scored = json.loads(alt.read_text())
    assert scored["evaluated_with"] == ["model.uie.memory_at_eval=false"]
    assert scored["cold_start"] == again["cold_start"] and "auc" in scored["test"]["engaged"]
    assert {f: (run / f).read_bytes() for f in before} == before
    # refused: overrides without --out, --out without overrides, an override that changes the weights' shapes
    for args in (["--set", "model.uie.memory_at_eval=false"], ["--out", str(alt)],
                 ["--set", "model.uie.rho=0.5", "--out", str(tmp_path / "x.json")],
                 ["--set", "model.dropout=0.3", "--out", str(tmp_path / "x.json")],
                 ["--set", "model.embed_dim=16", "--out", str(tmp_path / "x.json")]):
        res = CliRunner().invoke(app, ["evaluate", str(run), *args])
        assert res.exit_code == 2 and "error:" in res.output, (args, res.output)
        assert "read only by training" in res.output or args[1] != "model.uie.rho=0.5", res.output
    assert "changes the model's shape" in res.output and not (tmp_path / "x.json").exists()

    # warm start: a PLE + UIE run from the trained one loads every tensor (memories included)
    warm = tmp_path / "warm"
    train(_cfg(rated_log, warm, "ple-uie", ["train.max_steps=2", f"model.warm_start={run}"]), progress=False)
    report = json.loads((warm / "warm_start.json").read_text())
    assert report["loaded"] > 0 and report["skipped"] == []

    # benchmarks/uie_probe.py reads this run (a smoke test: a call-site change in src/ broke it once unseen)
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "uie_probe.py"), str(run), "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "FACETREC_CACHE": str(tmp_path / "cache")})
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"as trained", "every user unseen (UCBE = centres)", "upe zeroed", "ucbe zeroed", "ucse zeroed"}
    assert rows["as trained"]["engaged"] == pytest.approx(m["test"]["engaged"]["auc"], abs=1e-6)
    assert all(r["mean_abs_dprob"] > 0 for name, r in rows.items() if name != "as trained")


def test_tiny_ple_without_uie_and_a_wrong_task_for_the_data(synth_prepared, tmp_path, monkeypatch):
    from facetrec.train.run import train

    monkeypatch.setenv("FACETREC_CACHE", str(tmp_path / "cache"))
    _, raw = synth_prepared
    cfg = _cfg(raw, tmp_path / "ple", "ple", ["data.rating=", "train.max_steps=5", "train.embed_l2=1.0"])
    m = train(cfg, progress=False)
    assert m["tasks"] == ["click"] and "centres" not in m and set(m["buckets"]) == {"<=5", "6-20", ">20"}
    logged = [json.loads(x) for x in (tmp_path / "ple" / "train_log.jsonl").read_text().splitlines()]
    assert all(x["l2"] > 0 for x in logged if "loss" in x)  # train.embed_l2 enters the multitask loss too
    with pytest.raises(DataError, match="rating"):
        train(_cfg(raw, tmp_path / "bad", "ple", ["data.rating=", "model.tasks=[engaged, liked]"]), progress=False)
    with pytest.raises(ConfigError, match="warm_start"):
        train(_cfg(raw, tmp_path / "bad2", "ple", ["data.rating=", "model.warm_start=/nonexistent/run"]), progress=False)


def test_multitask_negatives_are_redrawn_each_epoch_when_asked(synth_prepared):
    """train.resample_negatives in the multi-task trainer: each epoch seed gives new negative targets
    (never one of the user's items) and new auxiliary negatives; positives, labels and histories stay."""
    from facetrec.data.dataset import Prepared
    from facetrec.train.multitask import build_ple, multitask_task

    prep_dir, raw = synth_prepared
    prep = Prepared(prep_dir)
    seen = set(zip(np.repeat(np.arange(1, prep.n_users), prep.counts[1:]).tolist(), prep.items.tolist()))

    def first_batches(resample: bool, seed: int):
        cfg = _cfg(raw, prep_dir / "unused", "ple", ["data.rating=", f"train.resample_negatives={str(resample).lower()}"])
        task = multitask_task(cfg, prep, build_ple(cfg, prep, fresh=False))
        return [b for _, b in zip(range(3), task.batches(seed))]

    fixed, a, a2, b = first_batches(False, 1), first_batches(True, 1), first_batches(True, 2), first_batches(True, 1)
    for f, x, y in zip(fixed, a, b):
        neg = x.label == 0
        assert torch.equal(x.labels, f.labels) and torch.equal(x.hist, f.hist) and torch.equal(x.user, f.user)
        assert torch.equal(x.target[~neg], f.target[~neg]) and (x.target[neg] != f.target[neg]).float().mean() > 0.9
        assert torch.equal(x.target, y.target) and torch.equal(x.aux_neg, y.aux_neg)  # seeded
        assert ((x.aux_neg != f.aux_neg) & x.hist_mask).any() and not ((x.aux_neg == x.hist) & x.hist_mask).any()
        assert not any((u, i) in seen for u, i in zip(x.user[neg].tolist(), x.target[neg].tolist()))
    assert any(not torch.equal(x.target, z.target) for x, z in zip(a, a2))


def test_user_id_rows_take_the_mini_batch_l2(synth_prepared):
    """train.embed_l2 with model.user_dim: the batch's user rows join the L2, each weighted by
    1 / that user's training samples (the item rows' form), so the logged term grows by exactly that."""
    from facetrec.data.dataset import Prepared
    from facetrec.train.l2 import embed_l2_term, inverse_item_frequencies
    from facetrec.train.multitask import build_ple, multitask_samples, multitask_task

    prep_dir, raw = synth_prepared
    prep = Prepared(prep_dir)
    cfg = _cfg(raw, prep_dir / "unused", "ple", ["data.rating=", "train.embed_l2=0.5", "model.user_dim=4"])
    model = build_ple(cfg, prep, fresh=False)
    task = multitask_task(cfg, prep, model)
    b = next(iter(task.batches(1)))
    _, logs = task.loss(b)
    train = multitask_samples(prep, "train", model.cfg)
    items = embed_l2_term(model.items.id_emb.weight.detach(), b, 0.5, inverse_item_frequencies(prep, train.user, train.pos, train.target, "cpu"))
    n_u = np.bincount(train.user, minlength=prep.n_users)
    u = torch.unique(b.user[b.user > 0])
    users = 0.5 * (model.user.weight.detach()[u].pow(2).sum(1) / torch.from_numpy(n_u[u.numpy()]).float()).sum()
    assert float(users) > 0 and logs["l2"] == pytest.approx(float(items + users), rel=1e-5)


def _epoch_batches(prep_dir, raw, name, extra, seed=1):
    """One training epoch's batches of a tiny `name` run (PLE / PLE + UIE) on the synthetic log."""
    from facetrec.data.dataset import Prepared
    from facetrec.train.multitask import build_ple, multitask_task

    prep = Prepared(prep_dir)
    cfg = _cfg(raw, prep_dir / "unused", name, ["data.rating=", "train.batch_size=512", *extra])
    return list(multitask_task(cfg, prep, build_ple(cfg, prep, fresh=False)).batches(seed))


def test_history_cut_keeps_a_share_of_samples_last_events(synth_prepared):
    """train.history_cut: about that share of a training epoch's samples keep only their last k <= max
    events (the same events, at the end of the full window), n_events says k, the user id stays;
    the rest are untouched; the draw follows the epoch seed."""
    prep_dir, raw = synth_prepared

    def batches(extra, seed=1):
        return _epoch_batches(prep_dir, raw, "ple", extra, seed)

    full, cut, cut2 = batches([]), batches(["train.history_cut=0.4", "train.history_cut_max=3"]), batches(["train.history_cut=0.4", "train.history_cut_max=3"], 2)
    n_cut = n_all = 0
    for f, c in zip(full, cut):
        assert torch.equal(f.user, c.user) and torch.equal(f.target, c.target) and torch.equal(f.labels, c.labels)
        lf, lc = f.hist_mask.sum(1), c.hist_mask.sum(1)
        changed = lc < lf
        assert (lc <= lf).all() and (lc[changed] <= 3).all() and (lc[changed] >= 1).all()
        assert torch.equal(c.n_events[changed], lc[changed]) and torch.equal(c.n_events[~changed], f.n_events[~changed])
        for r in changed.nonzero().squeeze(-1).tolist():  # the kept events are the full window's last ones
            k, n = int(lc[r]), int(lf[r])
            assert torch.equal(c.hist[r, :k], f.hist[r, n - k:n]) and not c.hist_mask[r, k:].any()
        n_cut += int(changed.sum())
        n_all += len(f.user)
    assert 0.2 < n_cut / n_all < 0.4  # 0.4 drawn; samples with <= k events are unchanged by a cut
    assert any(not torch.equal(a.hist_mask, b.hist_mask) for a, b in zip(cut, cut2))
    with pytest.raises(ConfigError, match="history_cut"):
        batches(["train.history_cut=1.5"])
    from facetrec.train.run import model_name  # only the multi-task trainer reads it: elsewhere it is refused, not ignored
    assert model_name(_cfg(raw, prep_dir / "unused", "ple-uie", ["train.history_cut=0.3"])) == "ple-uie"
    with pytest.raises(ConfigError, match="multi-task trainer only.*'dien'"):
        model_name(_cfg(raw, prep_dir / "unused", "ple", ["model.name=dien", "train.history_cut=0.3"]))
