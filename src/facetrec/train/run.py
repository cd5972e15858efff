"""`train(cfg)` and `evaluate(run_dir)`: the whole job behind `facetrec train` / `facetrec evaluate`.

    config -> prepared data (cached) -> model -> fit (checkpoints, early stopping) -> test metrics
           -> run_dir/metrics.json  {"model", "dataset", "protocol", "valid", "test", "train", ...}
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from facetrec.config import Config, TrainConfig, _build, apply_overrides, dump_config
from facetrec.data.dataset import Prepared, retrieval_eval_set
from facetrec.data.prepare import ensure_prepared
from facetrec.errors import ConfigError
from facetrec.io import write_json
from facetrec.train.build import MULTITASK, RANKING, RETRIEVAL, training_only_keys
from facetrec.train.loop import FitResult, fit, load_checkpoint

ALL_MODELS = ("popularity", *RETRIEVAL, *RANKING, *MULTITASK)


def model_name(cfg: Config) -> str:
    name = cfg.model.get("name")
    if name not in ALL_MODELS:
        raise ConfigError(f"model.name {name!r} must be one of {', '.join(ALL_MODELS)}; e.g. --set model.name=mind")
    if cfg.train.history_cut and name not in MULTITASK:
        raise ConfigError(f"train.history_cut={cfg.train.history_cut} is read by the multi-task trainer only "
                          f"({', '.join(MULTITASK)}); model {name!r} would ignore it: remove it or set it to 0")
    return name


# train.* keys read by one family of trainers only; every other train key is read by all of them
FAMILY_TRAIN_KEYS: dict[str, tuple[str, ...]] = {
    "retrieval": ("n_negatives", "negatives", "in_batch_negatives", "negative_scores", "hard_negatives", "interest_diversity",
                  "protocol", "min_history", "target_window", "top_m", "index", "index_params", "max_eval_users"),
    "ranking": ("resample_negatives", "aux_negatives", "positions"),
    "multi-task": ("resample_negatives", "aux_negatives", "history_cut", "history_cut_max"),
}


def model_family(name: str) -> str:
    return "retrieval" if name in ("popularity", *RETRIEVAL) else "multi-task" if name in MULTITASK else "ranking"


# within a family, keys only some of its models read
MODEL_TRAIN_KEYS: dict[str, tuple[str, ...]] = {"aux_negatives": ("dien", *MULTITASK)}


def ignored_train_settings(cfg: Config, name: str) -> dict[str, Any]:
    """train.* keys set away from their defaults that model `name`'s trainer never reads: key -> value."""
    mine = set(FAMILY_TRAIN_KEYS[model_family(name)]) - {k for k, models in MODEL_TRAIN_KEYS.items() if name not in models}
    others = {k for keys in FAMILY_TRAIN_KEYS.values() for k in keys} - mine
    default = TrainConfig()
    return {k: getattr(cfg.train, k) for k in sorted(others) if getattr(cfg.train, k) != getattr(default, k)}


def _readers(key: str) -> str:
    if key in MODEL_TRAIN_KEYS:
        return ", ".join(MODEL_TRAIN_KEYS[key])
    return " and ".join(f for f, keys in FAMILY_TRAIN_KEYS.items() if key in keys) + " models"


def warn_ignored_settings(cfg: Config, name: str) -> dict[str, Any]:
    """Warn once per key that `name` ignores (a typo'd family, or a shared override file); returns them."""
    ignored = ignored_train_settings(cfg, name)
    for k, v in ignored.items():
        warnings.warn(f"train.{k}={v!r} is read by {_readers(k)} only; model {name!r} ({model_family(name)}) "
                      f"ignores it", stacklevel=3)
    return ignored


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """auto | cpu | cuda -> a torch device; `option` names the setting in the error (e.g. serve's --device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} is 'cuda' but no CUDA device is visible; use {option}=auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_resume(cfg: Config, run_dir: Path) -> None:
    saved = run_dir / "config.yaml"
    if (run_dir / "last.pt").exists() and saved.exists():
        old = yaml.safe_load(saved.read_text())
        new = cfg.to_dict()
        for d in (old, new):
            d["train"].pop("epochs", None)  # extending a run's epochs is a valid resume
        if old != new:
            raise ConfigError(f"{run_dir} holds a run with a different config; resume needs the same config — "
                              f"choose a new run.dir (--set run.dir=...) or delete {run_dir}")


def train(cfg: Config, progress: bool = True, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Train the configured model and write run.dir/metrics.json; returns the metrics."""
    name = model_name(cfg)
    ignored = warn_ignored_settings(cfg, name) if rank == 0 else {}
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(cfg, run_dir)
    if rank == 0:
        dump_config(cfg, run_dir / "config.yaml")
    if world > 1 and rank != 0:
        torch.distributed.barrier()  # rank 0 prepares (or finds the cache) first
    prep_dir = ensure_prepared(cfg, verbose=progress and rank == 0)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    if rank == 0:
        shutil.copyfile(prep_dir / "feature_map.json", run_dir / "feature_map.json")
    prep = Prepared(prep_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)

    if name == "popularity":
        result = FitResult({}, 0, 0, 0.0, 0)
        metrics = _retrieval_metrics(cfg, prep, None, device)
    elif name in ("mind", "youtubednn"):
        from facetrec.train.retrieval import build_mind, retrieval_task

        model = build_mind(cfg, prep, run_dir if rank == 0 else None, fresh=not (run_dir / "last.pt").exists()).to(device)
        result = fit(retrieval_task(cfg, prep, model, device, rank, world), cfg.train, run_dir, rank=rank, progress=progress)
        metrics = _retrieval_metrics(cfg, prep, model, device)
    elif name in MULTITASK:
        from facetrec.train.multitask import build_ple, multitask_metrics, multitask_task

        model = build_ple(cfg, prep, run_dir if rank == 0 else None, fresh=not (run_dir / "last.pt").exists()).to(device)
        result = fit(multitask_task(cfg, prep, model, device, rank, world), cfg.train, run_dir, rank=rank, progress=progress)
        metrics = multitask_metrics(cfg, prep, model, device, run_dir if rank == 0 else None)
    else:
        from facetrec.train.ranking import ranking_model, ranking_task

        model = ranking_model(cfg, prep).to(device)
        result = fit(ranking_task(cfg, prep, model, device, rank, world), cfg.train, run_dir, rank=rank, progress=progress)
        metrics = _ranking_metrics(prep, model, device)
    out = {
        "model": name,
        "dataset": cfg.data.name,
        "protocol": cfg.train.protocol if name in ("mind", "youtubednn", "popularity") else "dien",
        **metrics,
        "train": {"epochs": result.epochs, "best_epoch": result.best_epoch, "steps": result.steps,
                  "seconds": round(result.seconds, 1), "best_valid": result.best_valid, "device": str(device),
                  "cuda_graph_replays": result.graph_replays,
                  **({"cuda_graph_failed": result.graph_failed} if result.graph_failed else {}),
                  **({"ignored_settings": ignored} if ignored else {})},
    }
    if rank == 0:
        write_json(run_dir / "metrics.json", out)
        if progress:
            print(f"{name} on {cfg.data.name}: {format_test_metrics(out)}")
            print(f"wrote {run_dir / 'metrics.json'}")
    return out


def _retrieval_metrics(cfg: Config, prep: Prepared, model, device) -> dict[str, Any]:
    from facetrec.train.retrieval import KS, evaluate_mind, popularity_topn, retrieval_metrics

    out: dict[str, Any] = {}
    for split in ("valid", "test"):
        es = retrieval_eval_set(prep, split, cfg.train.protocol)
        test = split == "test"
        if model is None:
            m = retrieval_metrics(popularity_topn(prep, es, max(KS)), es, buckets=test)
        else:
            m = evaluate_mind(model, prep, es, cfg, detail=test, device=device)
        if test:
            out["buckets"] = m.pop("buckets")
            if model is not None:
                out["interests"] = m.pop("interests")
                out["eval"] = {k: m.pop(k) for k in list(m) if not k.startswith(("recall", "ndcg", "hr"))}
        out[split] = m
    return out


def _ranking_metrics(prep: Prepared, model, device) -> dict[str, Any]:
    from facetrec.data.dataset import ranking_samples
    from facetrec.train.ranking import predict, ranking_metrics

    out: dict[str, Any] = {}
    for split in ("valid", "test"):
        s = ranking_samples(prep, split)
        m = ranking_metrics(s, predict(model, prep, s, device=device))
        if split == "test":
            out["buckets"] = m.pop("buckets")
        else:
            m.pop("buckets")
        out[split] = m
    return out


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the run.dir of a `facetrec train`")
    return _build(Config, apply_overrides(yaml.safe_load(path.read_text()), list(overrides or [])), "")


def format_test_metrics(metrics: dict[str, Any]) -> str:
    """One line of a metrics.json's test numbers: its scalars, and AUC / GAUC per task of a multi-task run.

    Example:
        >>> format_test_metrics({"test": {"auc": 0.81, "click": {"auc": 0.8, "gauc": 0.7, "samples": 10}}})
        'test auc 0.8100 click/auc 0.8000 click/gauc 0.7000'
    """
    test = {k: v for k, v in metrics["test"].items() if isinstance(v, float)}
    test.update({f"{k}/{m}": v[m] for k, v in metrics["test"].items() if isinstance(v, dict) for m in ("auc", "gauc") if m in v})
    return "test " + " ".join(f"{k} {v:.4f}" for k, v in test.items())


# train.* keys that evaluation reads: the only ones `evaluate --set` may change (the rest shape training alone)
EVAL_TRAIN_KEYS = ("top_m", "index", "index_params", "max_eval_users", "threads", "device")
# prepare.* keys that leave every id as it was (the others change which users and items exist, or their ids)
EVAL_PREPARE_KEYS = ("max_history",)


def check_eval_overrides(overrides: list[str], model: str | None = None) -> None:
    """Refuse `evaluate --set` keys that cannot change what evaluation computes (train.* settings that only
    training reads: they would be recorded in `evaluated_with` and change nothing; run.*; with the run's
    model name, its model.* keys that only training reads, `training_only_keys`), and keys that
    change the data under the weights (data.*, and prepare.* but max_history: the ids the weights were
    trained for would mean other items)."""
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        section, _, name = key.partition(".")
        name = name.split(".")[0]
        if section == "run" or (section == "train" and name not in EVAL_TRAIN_KEYS):
            raise ConfigError(f"--set {o}: {key} is not read when a trained run is evaluated, so it would change "
                              f"nothing; evaluation reads {', '.join('train.' + k for k in EVAL_TRAIN_KEYS)}, "
                              f"prepare.max_history and the model.* settings that leave the weights' shapes alone "
                              f"(retrain with facetrec train CONFIG --set {o} to change training)")
        if section == "model" and model in RETRIEVAL + RANKING + MULTITASK:
            sub = key.split(".")[1:3]
            dotted = ".".join(sub if sub[:1] == ["uie"] else sub[:1])
            if dotted in training_only_keys(model):
                raise ConfigError(f"--set {o}: model.{dotted} is read only by training (the loss, the initialisation "
                                  f"or the memory updates), so the trained weights would score the same under it; "
                                  f"retrain to see its effect (facetrec train CONFIG --set {o})")
        if section == "data" or (section == "prepare" and name not in EVAL_PREPARE_KEYS):
            raise ConfigError(f"--set {o}: {key} changes the prepared data, so the run's item and user ids would "
                              f"name other items and users than the ones its weights were trained on; retrain on "
                              f"that data instead (facetrec train CONFIG --set {o})")


def build_run_model(cfg: Config, prep: Prepared) -> torch.nn.Module:
    """The untrained model of a run's config, shaped as training built it (its checkpoint's weights fit it;
    the multi-task models' tasks and user count come from the data). Its typed config is `model.cfg`."""
    name = model_name(cfg)
    if name in RETRIEVAL:
        from facetrec.train.retrieval import build_mind

        return build_mind(cfg, prep)
    if name in MULTITASK:
        from facetrec.train.multitask import build_ple

        return build_ple(cfg, prep, fresh=False)
    from facetrec.train.ranking import ranking_model

    return ranking_model(cfg, prep)


def evaluate(run_dir: str | Path, progress: bool = True, overrides: list[str] | None = None,
             out_path: str | Path | None = None) -> dict[str, Any]:
    """Recompute metrics.json of a finished run from its config and best weights.

    With `overrides` (e.g. an evaluation setting: `model.uie.memory_at_eval=false`, `train.top_m=100`)
    the best weights are scored under the changed config and the metrics go to `out_path` (required
    then): the run's own metrics.json and centres.json stay as trained. An override that changes the
    model's shape is refused: the weights do not fit it.
    """
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    if overrides and out_path is None:
        raise ConfigError("evaluating with overrides writes elsewhere than the run's metrics.json: give an output "
                          "file too (facetrec evaluate RUN_DIR --set KEY=VALUE --out FILE.json)")
    cfg = load_run_config(run_dir, overrides)
    name = model_name(cfg)
    check_eval_overrides(overrides, name)
    prep = Prepared(ensure_prepared(cfg, verbose=progress))
    device = resolve_device(cfg.train.device)
    old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    if name == "popularity":
        metrics = _retrieval_metrics(cfg, prep, None, device)
    else:
        best = run_dir / "best.pt"
        if not best.exists():
            raise ConfigError(f"{run_dir} has no best.pt; train first (facetrec train CONFIG --set run.dir={run_dir})")
        model = build_run_model(cfg, prep)
        try:
            model.load_state_dict(load_checkpoint(best)["model"])
        except RuntimeError as e:
            if not overrides:
                raise
            raise ConfigError(f"{best} does not fit the model of {run_dir}'s config with --set {' '.join(overrides)}: "
                              f"an override changes the model's shape; only settings that leave the weights' shapes "
                              f"alone can change at evaluation ({str(e).splitlines()[0]})") from None
        model.to(device)
        if name in MULTITASK:
            from facetrec.train.multitask import multitask_metrics

            metrics = multitask_metrics(cfg, prep, model, device, None if overrides else run_dir)
        else:
            metrics = (_retrieval_metrics(cfg, prep, model, device) if name in ("mind", "youtubednn")
                       else _ranking_metrics(prep, model, device))
    out = {**old, "model": name, "dataset": cfg.data.name, **metrics}
    if overrides:
        out["evaluated_with"] = overrides
    write_json(Path(out_path) if out_path is not None else run_dir / "metrics.json", out)
    return out
