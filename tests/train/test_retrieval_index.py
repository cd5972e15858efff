"""The ANN index of retrieval evaluation comes from the config: kind, faiss-named params, shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facetrec.config import load_config
from facetrec.data.dataset import Prepared, retrieval_eval_set
from facetrec.errors import ConfigError

pytest.importorskip("faiss")

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "synthetic.yaml"


def test_index_kind_params_and_shards_come_from_the_config(synth_prepared):
    from facetrec.train.retrieval import build_mind, evaluate_mind

    prep = Prepared(synth_prepared[0])
    es = retrieval_eval_set(prep, "valid", "user_split")

    def cfg(*sets: str):
        return load_config(CONFIG, ["model.name=mind", "model.dim=16", "model.hidden=[16]", *sets])

    torch.manual_seed(0)
    model = build_mind(cfg(), prep)
    exact = evaluate_mind(model, prep, es, cfg())
    # exact shards merge to the exact top-k: the same metrics
    assert evaluate_mind(model, prep, es, cfg("train.index_params={shards: 3}")) == exact
    # the exact search without faiss (the numpy fallback), picked in the config: the same metrics
    assert evaluate_mind(model, prep, es, cfg("train.index_params={backend: numpy}")) == exact
    with pytest.raises(ConfigError, match="backend must be one of 'auto', 'faiss', 'numpy', got 'blas'"):
        evaluate_mind(model, prep, es, cfg("train.index_params={backend: blas}"))
    # IVF-PQ in two shards, parameters as faiss names them; evaluation reports its recall against exact search
    pq = evaluate_mind(model, prep, es, cfg("train.index=ivfpq", "train.index_params={m: 4, nbits: 6, nprobe: 2, shards: 2}"),
                       detail=True)
    assert 0.0 < pq["ann_recall@50_vs_exact"] < 1.0
    with pytest.raises(ConfigError, match="unknown ivfpq index parameter.*'efSearch'"):
        evaluate_mind(model, prep, es, cfg("train.index=ivfpq", "train.index_params={efSearch: 64}"))


def test_retrieval_loss_takes_the_mini_batch_l2_on_history_and_target_ids(synth_prepared):
    """train.embed_l2 in retrieval: λ Σ_j ||E[j]||² / n_j over the batch's history + target ids, added to the
    sampled-softmax loss and logged; the sampled negatives' rows get no L2 gradient."""
    from facetrec.data.dataset import retrieval_train_samples
    from facetrec.train.l2 import item_frequencies
    from facetrec.train.retrieval import build_mind, retrieval_task

    prep = Prepared(synth_prepared[0])
    sets = ["model.name=youtubednn", "model.n_interests=1", "model.dim=8", "model.hidden=[8]", "train.batch_size=32"]
    cfg, cfg0 = load_config(CONFIG, [*sets, "train.embed_l2=0.5"]), load_config(CONFIG, sets)
    torch.manual_seed(0)
    model = build_mind(cfg, prep)

    def grad_of(c):  # loss and table gradient of the first batch (both tasks draw the same negatives)
        task = retrieval_task(c, prep, model)
        step = next(iter(task.batches(0)))
        model.zero_grad()
        loss, parts = task.loss(step)
        loss.backward()
        return step.batch, parts, model.items.table.grad.clone()

    batch, parts, g = grad_of(cfg)
    _, parts0, g0 = grad_of(cfg0)
    ids = torch.cat([batch.hist[batch.hist_mask], batch.target]).unique()
    u, p = retrieval_train_samples(prep, cfg.train.protocol)
    n = torch.from_numpy(item_frequencies(prep, u, p, prep.items[prep.offsets[u - 1] + p])).float()
    with torch.no_grad():
        expected = 0.5 * (model.items.table[ids].pow(2).sum(1) / n[ids]).sum()
    assert "l2" not in parts0 and parts["l2"] == pytest.approx(float(expected), rel=1e-5)
    # the L2's gradient 2 λ E[j] / n_j lands on exactly the batch's id rows
    diff = g - g0
    touched = diff.abs().sum(1) > 0
    assert touched[ids].all() and int(touched.sum()) == len(ids)
    with torch.no_grad():
        want = 2 * 0.5 * model.items.table[ids] / n[ids, None]
    assert torch.allclose(diff[ids], want, atol=1e-6)


@pytest.mark.parametrize("setting, message", [("train.negative_scores=mean", "train.negative_scores 'mean' must be 'readout'"),
                                              ("train.target_window=0", "train.target_window 0 must be >= 1"),
                                              ("train.negatives=everything", "train.negatives 'everything' must be one of uniform, popularity, all"),
                                              ("train.interest_diversity=-1", "train.interest_diversity -1.0 must be >= 0"),
                                              ("train.negatives=all train.in_batch_negatives=true",
                                               "train.negatives: all already scores every item")])
def test_a_bad_retrieval_loss_setting_is_refused_before_training(synth_prepared, setting, message):
    from facetrec.train.retrieval import build_mind, retrieval_task

    prep = Prepared(synth_prepared[0])
    cfg = load_config(CONFIG, ["model.name=mind", "model.dim=8", "model.hidden=[8]", *setting.split()])
    with pytest.raises(ConfigError, match=message):
        retrieval_task(cfg, prep, build_mind(cfg, prep))


def test_mind_warm_starts_from_a_youtube_dnn_checkpoint(synth_prepared, tmp_path):
    """model.warm_start: a fresh MIND takes every tensor of a YouTube DNN run that fits it by name and shape
    (item tower, MLP, S), says so in warm_start.json; a resumed run (fresh=False) keeps its own weights."""
    import json

    from facetrec.train.loop import save_checkpoint
    from facetrec.train.retrieval import build_mind

    prep = Prepared(synth_prepared[0])
    sets = ["model.dim=8", "model.hidden=[8]"]
    torch.manual_seed(0)
    ytb = build_mind(load_config(CONFIG, ["model.name=youtubednn", "model.n_interests=1", *sets]), prep)
    save_checkpoint(tmp_path / "ytb" / "best.pt", {"model": ytb.state_dict()})
    cfg = load_config(CONFIG, ["model.name=mind", *sets, f"model.warm_start={tmp_path / 'ytb'}"])
    torch.manual_seed(1)
    mind = build_mind(cfg, prep, tmp_path / "run", fresh=True)
    for k, v in ytb.state_dict().items():
        assert torch.equal(mind.state_dict()[k], v), k
    report = json.loads((tmp_path / "run" / "warm_start.json").read_text())
    assert report["loaded"] == len(ytb.state_dict()) and report["skipped"] == []
    torch.manual_seed(1)
    resumed = build_mind(cfg, prep, tmp_path / "run2", fresh=False)
    assert not torch.equal(resumed.items.table, ytb.items.table) and not (tmp_path / "run2").exists()
    with pytest.raises(ConfigError, match="no checkpoint"):
        build_mind(load_config(CONFIG, ["model.name=mind", *sets, f"model.warm_start={tmp_path / 'none'}"]), prep,
                   fresh=True)
