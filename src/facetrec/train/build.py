"""Models from a name + config mapping: how runs and serving artifacts rebuild a trained model."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Optional

import torch

from facetrec.config import coerce
from facetrec.errors import ConfigError
from facetrec.io import write_json

RETRIEVAL = ("mind", "youtubednn")
RANKING = ("dien", "din", "base")
MULTITASK = ("ple", "ple-uie")  # cold start (SPEC §4): PLE, and PLE with UIE enhancement vectors


def _config_class(name: str):
    if name in RETRIEVAL:
        from facetrec.models.mind import MINDConfig

        return MINDConfig
    if name in RANKING:
        from facetrec.models.dien import DIENConfig

        return DIENConfig
    if name in MULTITASK:
        from facetrec.models.ple import PLEConfig

        return PLEConfig
    raise ConfigError(f"model {name!r} is not one of {', '.join(RETRIEVAL + RANKING + MULTITASK)}")


def training_only_keys(name: str) -> tuple[str, ...]:
    """The model.* keys of model `name` that only training reads (its config classes' TRAINING_ONLY;
    UIE's as `uie.KEY`): evaluating trained weights under another value changes nothing."""
    keys = tuple(_config_class(name).TRAINING_ONLY)
    if name == "ple-uie":
        from facetrec.models.uie import UIEConfig

        keys += tuple(f"uie.{k}" for k in UIEConfig.TRAINING_ONLY)
    return keys


def _model_class(name: str):
    if name in RETRIEVAL:
        from facetrec.models.mind import MIND

        return MIND
    if name in MULTITASK:
        from facetrec.models.ple import PLE

        return PLE
    from facetrec.models import dien

    return {"dien": dien.DIEN, "din": dien.DIN, "base": dien.BaseModel}[name]


def make_config(name: str, params: dict[str, Any], n_items: int):
    """Typed model config from the `model:` section (minus `name`), with n_items from the data."""
    cls = _config_class(name)
    params = dict(params)
    if name == "youtubednn":
        params.setdefault("n_interests", 1)
        params.setdefault("pooling", "mean")
    if name == "ple-uie":
        params.setdefault("use_uie", True)
    if "n_items" in params:
        raise ConfigError(f"model.n_items is taken from the prepared data ({n_items} here, padding included); "
                          "remove it from the model section")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ConfigError(f"unknown model key(s) {', '.join('model.' + k for k in unknown)} for {name}; "
                          f"valid: {', '.join(sorted(names - {'n_items'}))}")
    params["n_items"] = n_items
    hints = typing.get_type_hints(cls)
    for k, v in params.items():
        params[k] = coerce(hints[k], v, f"model.{k}")  # types checked as for the other sections
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model section for {name}: {e}") from None


def build_model(name: str, model_cfg, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> torch.nn.Module:
    """The model around a typed config; a config that does not fit the prepared data (an item field it
    does not have, a size that disagrees) is a ConfigError naming the model section."""
    try:
        return _model_class(name)(model_cfg, item_features, field_vocab)
    except ValueError as e:
        raise ConfigError(f"model section for {name} does not fit the prepared data: {e}") from None


def model_spec(name: str, model_cfg) -> dict[str, Any]:
    """JSON-able description: enough to rebuild the model around saved weights."""
    return {"name": name, "config": dataclasses.asdict(model_cfg)}


def model_from_spec(spec: dict[str, Any], item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> torch.nn.Module:
    cfg = dict(spec["config"])
    n_items = cfg.pop("n_items")
    name = spec["name"]
    mcfg = make_config(name if name != "youtubednn" else "mind", cfg, n_items)
    return build_model(name, mcfg, item_features, field_vocab)


def warm_start(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Copy every tensor of a trained checkpoint whose name and shape match (run dir -> its best.pt)."""
    from facetrec.train.loop import load_checkpoint

    ck = path / "best.pt" if path.is_dir() else path
    if not ck.exists():
        raise ConfigError(f"model.warm_start {path}: no checkpoint at {ck}; give a finished run dir or a .pt file")
    saved = load_checkpoint(ck)["model"]
    own = model.state_dict()
    take = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise ConfigError(f"model.warm_start {ck}: no tensor matches this model by name and shape; "
                          f"is it a run of the same model family?")
    model.load_state_dict(take, strict=False)
    return {"from": str(ck), "loaded": len(take), "skipped": sorted(set(own) - set(take))}


def apply_warm_start(model: torch.nn.Module, source: str, run_dir: Optional[Path], fresh: bool) -> None:
    """`model.warm_start` on a fresh run (a resumed one keeps its own weights): load, say so, and
    leave `warm_start.json` in the run dir."""
    if not (fresh and source):
        return
    report = warm_start(model, Path(source))
    print(f"warm start from {source}: {report['loaded']} tensors loaded, {len(report['skipped'])} kept fresh")
    if run_dir is not None:
        write_json(Path(run_dir) / "warm_start.json", report)
