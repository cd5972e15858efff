"""The cold-start ranker (PLE + UIE) served: exported as the ranking part, its chosen task orders the results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from facetrec.errors import ConfigError
from facetrec.serving.artifacts import ArtifactError
from facetrec.serving.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rated(tiny, tmp_path_factory):
    """The tiny synthetic log with ratings (tasks engaged + liked): a MIND run and a PLE + UIE run on it, exported."""
    from facetrec.config import load_config
    from facetrec.serving.export import export
    from facetrec.train.run import train

    base = tmp_path_factory.mktemp("rated")
    raw = base / "raw"
    raw.mkdir()
    df = pl.read_csv(tiny.raw / "interactions.tsv", separator="\t")
    df = df.with_columns(pl.Series("rating", np.random.default_rng(0).integers(1, 6, df.height)))
    df.write_csv(raw / "interactions.tsv", separator="\t")
    (raw / "items.tsv").write_bytes((tiny.raw / "items.tsv").read_bytes())
    old = os.environ.get("FACETREC_CACHE")
    os.environ["FACETREC_CACHE"] = str(base / "cache")
    try:
        common = [f"data.root={raw}", "data.rating=rating", "train.epochs=1", "train.max_steps=10",
                  "train.batch_size=64", "train.threads=1", "train.device=cpu"]
        cfg = ROOT / "configs" / "synthetic.yaml"
        train(load_config(cfg, common + ["model.name=mind", "model.dim=8", "model.n_interests=4", "model.hidden=[16]",
                                         "train.n_negatives=50", "train.max_eval_users=50", f"run.dir={base / 'mind'}"]),
              progress=False)
        train(load_config(cfg, common + ["model.name=ple-uie", "model.expert=[16]", "model.tower=[8]", "model.embed_dim=8",
                                         "model.uie.clusters=8", "model.uie.profile_dim=8", f"run.dir={base / 'ple'}"]),
              progress=False)
        version = export(base / "mind", base / "artifact", base / "ple", candidates=40, top_m=30, rank_task="liked")
        yield base, version
    finally:
        if old is None:
            os.environ.pop("FACETREC_CACHE", None)
        else:
            os.environ["FACETREC_CACHE"] = old


def _trained_ple(base):
    """The PLE + UIE model rebuilt from its run dir and best.pt, as `facetrec evaluate` does."""
    from facetrec.data.dataset import Prepared
    from facetrec.data.prepare import ensure_prepared
    from facetrec.train.loop import load_checkpoint
    from facetrec.train.multitask import build_ple
    from facetrec.train.run import load_run_config

    cfg = load_run_config(base / "ple")
    model = build_ple(cfg, Prepared(ensure_prepared(cfg, verbose=False)), fresh=False)
    model.load_state_dict(load_checkpoint(base / "ple" / "best.pt")["model"])
    return model.eval()


def test_a_served_ple_uie_ranker_scores_with_the_exported_task_and_the_users_memory(rated):
    from facetrec.data.batches import MultiTaskBatch

    base, version = rated
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["parts"]["ranking"]["model"] == "ple-uie" and manifest["parts"]["ranking"]["task"] == "liked"
    p = Pipeline(version)
    assert p.rank_task == "liked" and p.ranking.cfg.tasks == ("engaged", "liked")
    users = pl.read_parquet(version / "users.parquet")
    raw_user, uid = users["raw_id"][0], int(users["id"][0])
    assert p.user_id(raw_user) == uid > 0  # the ranker's UCBE memories are per user: ids are mapped
    hist = p.popular[:30][::-1].copy()  # longer than the window (max_history)
    model = _trained_ple(base)
    for user, internal in ((raw_user, uid), (None, 0)):  # a training user reads m_u; an unseen one its nearest centres
        recs = p.recommend(hist, n=8, exclude_seen=True, n_events=50, user=user)
        assert len(recs) == 8 and all(r.interest >= 0 for r in recs)
        items = torch.tensor([int(p.encode([r.item])[0]) for r in recs])
        window = torch.from_numpy(hist[-p.max_history:]).view(1, -1).expand(len(items), -1)
        N, K = len(items), 2
        b = MultiTaskBatch(user=torch.full((N,), internal), hist=window, hist_mask=torch.ones_like(window, dtype=torch.bool),
                           aux_neg=window, target=items, label=torch.zeros(N), labels=torch.zeros(N, K),
                           label_mask=torch.zeros(N, K, dtype=torch.bool), n_events=torch.full((N,), 50))
        with torch.no_grad():
            want = torch.sigmoid(model(b)[:, 1]).numpy()  # column 1: liked
        got = np.array([r.score for r in recs])
        assert np.allclose(got, want, atol=1e-5), (got, want)
        assert np.all(np.diff(got) <= 0)  # ordered by the task's probability
    # the first task when the export names none
    from facetrec.serving.export import export

    os.environ["FACETREC_CACHE"] = str(base / "cache")
    try:
        plain = Pipeline(export(base / "mind", base / "artifact2", base / "ple", candidates=40, top_m=30))
    finally:
        os.environ.pop("FACETREC_CACHE", None)
    assert plain.rank_task == "engaged"


def test_rank_task_is_checked_at_export_and_at_load(rated, tiny, tmp_path, monkeypatch):
    from facetrec.serving.export import export

    base, version = rated
    monkeypatch.setenv("FACETREC_CACHE", str(base / "cache"))
    with pytest.raises(ConfigError, match="the ranking run's tasks are engaged, liked"):
        export(base / "mind", tmp_path / "a", base / "ple", rank_task="click")
    monkeypatch.setenv("FACETREC_CACHE", str(tiny.cache))
    with pytest.raises(ConfigError, match="only a multi-task ranking run"):
        export(tiny.mind, tmp_path / "a", tiny.dien, rank_task="liked")
    d = tmp_path / "v"
    import shutil

    shutil.copytree(version, d)
    m = json.loads((d / "manifest.json").read_text())
    m["parts"]["ranking"]["task"] = "purchase"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="'purchase' is not one of the ranking model's tasks"):
        Pipeline(d)
