"""Run directories as the report reads them: config, metrics, training log, and the trained model.

    run_dir/ config.yaml  feature_map.json  train_log.jsonl  metrics.json  best.pt  (last.pt)

A run still training (no metrics.json yet) or a baseline without weights (popularity) is still
a `RunInfo`; each report section says which inputs it needs and skips runs that lack them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facetrec.config import Config
from facetrec.errors import ConfigError, FacetrecError

RETRIEVAL = ("mind", "youtubednn", "popularity")
BASELINES = ("popularity", "youtubednn", "base", "din")


class MissingInput(Exception):
    """A report section cannot be drawn from the runs given; the message says what it needs."""


@dataclass
class RunInfo:
    """What the report knows about one run directory."""

    path: Path
    cfg: Config
    name: str  # model name: mind | youtubednn | popularity | dien | din | base (| uie variants)
    dataset: str
    seed: int
    metrics: dict[str, Any] | None  # metrics.json, None while training
    log: list[dict[str, Any]] = field(default_factory=list)  # train_log.jsonl lines

    @property
    def task(self) -> str:
        return "retrieval" if self.name in RETRIEVAL else "ranking"

    @property
    def uie(self) -> bool:
        """Whether the run uses UIE enhancement vectors (by model name or a truthy `model.uie`)."""
        return "uie" in self.name or bool(self.cfg.model.get("uie"))

    @property
    def model_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.cfg.model.items() if k != "name"}

    @property
    def test(self) -> dict[str, float]:
        """Test metrics, flat (multi-task runs: their primary task's, see `primary_task`)."""
        return primary_task((self.metrics or {}).get("test") or {})

    @property
    def buckets(self) -> dict[str, dict[str, float]]:
        """Test metrics per activity bucket, flat per bucket; {} when metrics.json has none."""
        return {b: primary_task(m) for b, m in ((self.metrics or {}).get("buckets") or {}).items()}

    @property
    def label(self) -> str:
        """Run directory name, e.g. "mind-s0"."""
        return self.path.name


def primary_task(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flat metrics {name: value}: as given, or for a multi-task run ({task: {name: value}}) the
    "click" task's (else the first task's), which is what single-task rankers are compared on.

    Example:
        >>> primary_task({"like": {"auc": 0.6}, "click": {"auc": 0.7}})
        {'auc': 0.7}
    """
    tasks = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    if not tasks:
        return dict(metrics)
    return dict(tasks.get("click", next(iter(tasks.values()))))


def load_run(path: str | Path) -> RunInfo:
    """Read a run directory written by `facetrec train` (checkpoints are loaded later, on demand)."""
    from facetrec.train.run import load_run_config

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass run directories written by `facetrec train`")
    cfg = load_run_config(path)
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    log = []
    log_path = path / "train_log.jsonl"
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    log.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written right now by a running job
                    continue
    name = str(cfg.model.get("name", ""))
    return RunInfo(path, cfg, name, cfg.data.name, int(cfg.train.seed), metrics, log)


def _without_seeds(x: Any) -> Any:
    """A config mapping with every `seed` / `*_seed` key removed, at any depth (e.g. model.uie.seed)."""
    if isinstance(x, dict):
        return {k: _without_seeds(v) for k, v in x.items() if not (k == "seed" or str(k).endswith("_seed"))}
    if isinstance(x, (list, tuple)):
        return [_without_seeds(v) for v in x]
    return x


def group_key(run: RunInfo) -> tuple[str, str, str]:
    """Runs that differ only in seeds (train.seed, any model.*.seed) and run.dir share a key:
    (dataset, model, model section without seeds)."""
    return run.dataset, run.name, json.dumps(_without_seeds(run.model_params), sort_keys=True, default=str)


def group_label(run: RunInfo, runs: list[RunInfo]) -> str:
    """The model name, plus the model keys that tell it apart from same-named groups among `runs`."""
    others = [r for r in runs if r.name == run.name and r.dataset == run.dataset and group_key(r) != group_key(run)]
    if not others:
        return run.name
    mine = _without_seeds(run.model_params)
    keys = sorted({k for r in others for theirs in [_without_seeds(r.model_params)]
                   for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k)})
    return run.name + " (" + ", ".join(f"{k}={mine.get(k, '-')}" for k in keys) + ")" if keys else run.name


def strip_seed(label: str) -> str:
    """"mind-s0" -> "mind" (for legends that overlay several seeds)."""
    return re.sub(r"[-_]s(eed)?\d+$", "", label)


class LoadedModel:
    """A run's model with best weights and its prepared data, in eval mode."""

    def __init__(self, run: RunInfo) -> None:
        from facetrec.data.dataset import Prepared
        from facetrec.data.prepare import ensure_prepared
        from facetrec.train.loop import load_checkpoint

        weights = run.path / "best.pt"
        if not weights.exists():
            raise MissingInput(f"{run.path} has no best.pt (still training, or a model without weights)")
        self.run = run
        try:
            self.prep = Prepared(ensure_prepared(run.cfg, verbose=False))
        except (FacetrecError, OSError) as e:  # raw data gone and no cached preparation: report what is left
            raise MissingInput(f"{run.path}: its prepared data cannot be loaded or rebuilt ({e})") from None
        if run.task == "retrieval":
            from facetrec.train.retrieval import build_mind

            model = build_mind(run.cfg, self.prep)
        else:
            from facetrec.train.ranking import ranking_model

            model = ranking_model(run.cfg, self.prep)
        model.load_state_dict(load_checkpoint(weights)["model"])
        self.model = model.eval()

    def raw_items(self) -> list[str]:
        """Raw item id (as text) of each internal id; index 0 is padding ("")."""
        import polars as pl

        items = pl.read_parquet(self.prep.path / "items.parquet", columns=["id", "raw_id"]).sort("id")
        out = [""] * self.prep.n_items
        for i, r in zip(items["id"].to_list(), items["raw_id"].to_list()):
            out[i] = str(r)
        return out

    def category_field(self) -> str:
        """The item field used as "category": `cate` when present, else the first single-valued field."""
        fields = self.prep.item_features
        if "cate" in fields:
            return "cate"
        single = [f for f, v in self.prep.feature_map["item_fields"].items() if not v.get("multi")]
        if not single:
            raise MissingInput(f"{self.run.path}: the items have no category field (fields: {sorted(fields)})")
        return sorted(single)[0]

    def item_categories(self) -> tuple[Any, int, str]:
        """(n_items,) first category id of each item (0 = none), the vocabulary size, the field name."""
        f = self.category_field()
        table = self.prep.item_features[f]
        cate = table[:, 0] if table.ndim == 2 else table
        return cate, int(self.prep.field_vocab[f]), f
