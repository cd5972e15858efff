"""`facetrec export`: trained runs -> one versioned, verified serving artifact.

    facetrec export --retrieval runs/amazon-beauty/mind --ranking runs/amazon-beauty/dien --out artifacts/amazon-beauty

What goes in (artifacts.py has the layout): the prepared data's feature map, item and user id
maps and item attribute tables; each model's typed config as JSON and its weights as
safetensors (no pickle); the ANN index over the retrieval model's item vectors; a manifest
with the sha256 and size of every file. Both runs must come from one prepared dataset (their
feature maps are compared byte for byte). The version is written into a temp folder and
renamed into place (`write_version`), so a crash mid-export leaves the previous version live.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from facetrec.data.dataset import Prepared
from facetrec.data.prepare import ensure_prepared
from facetrec.errors import ConfigError
from facetrec.io import write_json
from facetrec.serving.artifacts import write_version
from facetrec.train.build import MULTITASK, model_spec
from facetrec.train.loop import load_checkpoint
from facetrec.train.run import build_run_model, load_run_config, model_name


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_run(run_dir: Path, prep: Prepared | None = None):
    cfg = load_run_config(run_dir)
    name = model_name(cfg)
    best = run_dir / "best.pt"
    if not (run_dir / "feature_map.json").exists():
        raise ConfigError(f"{run_dir} has no feature_map.json: it is not a finished `facetrec train` run")
    if not best.exists():
        raise ConfigError(f"{run_dir} has no best.pt: train it first (facetrec train ... --set run.dir={run_dir})")
    prep = prep or Prepared(ensure_prepared(cfg, verbose=False))
    model = build_run_model(cfg, prep)
    model.load_state_dict(load_checkpoint(best)["model"])
    model.eval()
    return cfg, name, model.cfg, model, prep


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    os.chmod(path, 0o644)  # safetensors writes 0600; the server may run as another user


def export(retrieval_run: str | Path, out: str | Path, ranking_run: str | Path | None = None,
           index_kind: str | None = None, index_params: dict[str, Any] | None = None, candidates: int = 200, top_m: int | None = None,
           rank_task: str | None = None) -> Path:
    """Write a new artifact version under `out` and make it current; returns its directory.

    Args:
        retrieval_run, ranking_run: run directories of `facetrec train` (mind | youtubednn; dien | din | base,
            or the multi-task ple | ple-uie).
        index_kind, index_params: ANN index (default: the retrieval run's train.index / index_params).
        candidates: how many merged retrieval candidates the ranker scores per request.
        top_m: candidates per interest from the ANN index (default: the retrieval run's train.top_m).
    """
    from facetrec.index.ann import build_index
    from facetrec.train.retrieval import all_item_vectors

    retrieval_run = Path(retrieval_run)
    rcfg, rname, rmcfg, rmodel, prep = _load_run(retrieval_run)
    if rname not in ("mind", "youtubednn"):
        raise ConfigError(f"--retrieval {retrieval_run} is a {rname} run; it must be mind or youtubednn")
    fm_hash = _sha(prep.path / "feature_map.json")
    if _sha(retrieval_run / "feature_map.json") != fm_hash:
        raise ConfigError(f"{retrieval_run} was trained on a feature map that differs from today's prepared data "
                          f"{prep.path} (the raw data or prepare settings changed): retrain, then export")
    ranking = None
    if ranking_run is not None:
        ranking_run = Path(ranking_run)
        if not (ranking_run / "feature_map.json").exists():
            raise ConfigError(f"{ranking_run} has no feature_map.json: it is not a finished `facetrec train` run")
        if _sha(ranking_run / "feature_map.json") != fm_hash:
            raise ConfigError(f"{ranking_run} was trained on other prepared data than {retrieval_run} "
                              f"(feature maps differ); train both from the same data config")
        ranking = _load_run(ranking_run, prep)
        if ranking[1] not in ("dien", "din", "base", *MULTITASK):
            raise ConfigError(f"--ranking {ranking_run} is a {ranking[1]} run; it must be dien, din, base, ple or ple-uie")
    tasks = list(ranking[2].tasks) if ranking is not None and ranking[1] in MULTITASK else []
    if rank_task is not None and rank_task not in tasks:
        raise ConfigError(f"--rank-task {rank_task}: " + (f"the ranking run's tasks are {', '.join(tasks)}" if tasks else
                          "only a multi-task ranking run (ple, ple-uie) has tasks to choose from"))
    if top_m is not None and top_m < 1 or candidates < 1:
        raise ConfigError(f"top_m ({top_m}) and candidates ({candidates}) must be >= 1")
    kind = index_kind or rcfg.train.index
    params = index_params if index_params is not None else dict(rcfg.train.index_params)
    vectors = all_item_vectors(rmodel, prep.n_items)
    ids = torch.arange(1, prep.n_items).numpy()

    def write(d: Path) -> dict[str, Any]:
        for name in ("feature_map.json", "items.parquet", "users.parquet", "item_features.npz"):
            shutil.copyfile(prep.path / name, d / name)
        write_json(d / "retrieval.config.json", model_spec(rname, rmcfg))
        _save_weights(rmodel, d / "retrieval.safetensors")
        index = build_index(vectors, ids, kind=kind, **params)
        index.save(d / "index.faiss")
        parts: dict[str, Any] = {"retrieval": {"model": rname, "run": str(retrieval_run), "feature_map_sha256": fm_hash,
                                               "top_m": int(top_m or rcfg.train.top_m)}}
        if ranking is not None:
            _, kname, kmcfg, kmodel, _ = ranking
            write_json(d / "ranking.config.json", model_spec(kname, kmcfg))
            _save_weights(kmodel, d / "ranking.safetensors")
            parts["ranking"] = {"model": kname, "run": str(ranking_run), "feature_map_sha256": fm_hash,
                                "candidates": candidates}
            if tasks:
                parts["ranking"]["task"] = rank_task or tasks[0]
        return {"parts": parts, "index": {"kind": kind, "params": dict(index.params), "items": int(len(ids)), "dim": int(vectors.shape[1])},
                "dataset": prep.feature_map.get("dataset")}

    return write_version(out, write)
