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
    # IVF-PQ in two shards, parameters as faiss names them; evaluation reports its recall against exact search
    pq = evaluate_mind(model, prep, es, cfg("train.index=ivfpq", "train.index_params={m: 4, nbits: 6, nprobe: 2, shards: 2}"),
                       detail=True)
    assert 0.0 < pq["ann_recall@50_vs_exact"] < 1.0
    with pytest.raises(ConfigError, match="unknown ivfpq index parameter.*'efSearch'"):
        evaluate_mind(model, prep, es, cfg("train.index=ivfpq", "train.index_params={efSearch: 64}"))
