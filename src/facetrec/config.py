"""Typed configuration: frozen dataclasses loaded from YAML, with `--set dotted.key=value` overrides.

Two keys are a fixed contract that users and scripts rely on:
  data.root  the directory holding the raw dataset's files
  run.dir    where a command writes its outputs (summary.json, metrics.json, checkpoints)

Model hyper-parameters live in each model's own config class (`MINDConfig`, `DIENConfig`, ...);
here they are kept as a plain mapping under `model` and validated by the model's class when
training builds it, so an unknown model key is reported with the model's valid keys.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_args, get_origin, get_type_hints

import yaml

from facetrec.errors import ConfigError

# Where relative data roots in shipped configs point: ../shared/data beside the project,
# or $FACETREC_DATA when set.
DATA_ENV = "FACETREC_DATA"


@dataclass(frozen=True)
class ItemTable:
    """A side table of item attributes.

    Two layouts: `wide` (one row per item; each field a column, multi-valued fields hold
    `multi_sep`-separated values) and `long` (one row per item-value pair, e.g.
    `amazon-hin/item_category.dat`; the same item repeats for a multi-valued attribute).
    """

    file: str  # path relative to data.root
    key: str = "item_id"  # column holding the raw item id (or its position for header-less files)
    fields: dict[str, str] = field(default_factory=dict)  # field name -> column
    multi: tuple[str, ...] = ()  # fields that hold several values
    multi_sep: str = ","  # separator inside a multi-valued cell (wide layout)
    layout: str = "wide"  # wide | long
    sep: str = "\t"  # column separator (tab by default)
    header: bool = True  # the first line names the columns
    columns: tuple[str, ...] = ()  # names for a header-less file's columns


@dataclass(frozen=True)
class DataConfig:
    """Where the raw log is and how to read it."""

    name: str = "dataset"  # shown in summaries and metrics.json
    format: str = "generic"  # generic | amazon | movielens | taobao
    root: str = "../shared/data/amazon-beauty"  # directory with the raw files (contract key)
    interactions: str = "interactions.tsv"  # file name inside root
    sep: str = "\t"  # column separator (tab by default)
    header: bool = True  # the first line names the columns
    columns: tuple[str, ...] = ()  # names for a header-less file's columns (generic)
    user: str = "user_id"  # column holding the user id
    item: str = "item_id"  # column holding the item id
    time: str = "timestamp"  # column holding the event time (integer or float seconds)
    rating: str = ""  # optional rating column
    behavior: str = ""  # optional behaviour column (pv / cart / fav / buy)
    item_fields: dict[str, str] = field(default_factory=dict)  # item attributes carried in the log: field -> column
    item_tables: tuple[ItemTable, ...] = ()  # side tables of item attributes (the data.item_tables[] section)
    behaviors: tuple[str, ...] = ()  # keep only these behaviours (empty = all)
    metadata: str = ""  # amazon: optional metadata file (JSON lines with asin + categories)
    movies: str = ""  # movielens: optional movies.dat / movies.csv with genres
    extra_events: tuple[str, ...] = ()  # served events to add to the log: TSVs written by `facetrec dump-events` (user_id, item_id, timestamp); a row the log already holds is dropped


@dataclass(frozen=True)
class PrepareConfig:
    """Filtering, id mapping and splits (SPEC §1.2-1.3)."""

    min_user_events: int = 5  # k-core: users need at least this many events
    min_item_events: int = 5  # k-core: items need at least this many events
    max_history: int = 20  # longest history fed to a model (20 for Amazon, 50 for Taobao)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / valid / test users
    history_frac: float = 0.8  # valid/test users: this share of their events is the history
    seed: int = 2026  # seeds the user split and the sampled negatives written with the data (ranking targets, DIEN auxiliary)
    lenient: bool = False  # skip and count bad rows instead of failing


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation settings shared by every model."""

    epochs: int = 20  # most passes over the training samples (early stopping may end sooner)
    batch_size: int = 256  # samples per step (the global batch under DDP)
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay on every parameter (embed_l2 is the per-row alternative)
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and kept as best.pt (0 = off; the retrieval configs use 0.998)
    patience: int = 3  # early stopping: epochs without a better valid metric
    eval_every: int = 1  # epochs between validations
    n_negatives: int = 1000  # retrieval: sampled negatives per batch
    negatives: str = "uniform"  # retrieval: uniform | popularity (n_negatives drawn per batch, shared) | all (every item: the full softmax; n_negatives unused)
    in_batch_negatives: bool = False  # retrieval: the batch's other targets are negatives too (log-Q corrected by their data frequency)
    negative_scores: str = "readout"  # retrieval: a negative's logit from the label-aware readout (SPEC §2.5) | max (its best valid interest, as serving's merge scores it)
    hard_negatives: float = 0.0  # retrieval: β of hardness-weighted negatives (REMI's IHN): a negative counts ∝ exp(β · its logit) in the softmax (0 = off, SPEC)
    interest_diversity: float = 0.0  # retrieval: λ of a penalty on the mean pairwise cosine of each user's valid interests (0 = off, SPEC)
    embed_l2: float = 0.0  # ranking / PLE / retrieval: λ of the mini-batch-aware L2 (DIN paper §4.3.1) on the item-id embeddings of a batch's histories and candidates (targets), each weighted 1 / its training frequency (PLE's user-id rows too, model.user_dim, each 1 / its user's training samples)
    resample_negatives: bool = False  # ranking and multi-task (PLE): draw the training negatives (targets' and DIEN's auxiliary ones) afresh every epoch
    aux_negatives: str = "uniform"  # DIEN's auxiliary negatives under resample_negatives: uniform | popularity (∝ training count^0.75, word2vec's smoothing)
    positions: str = "all"  # ranking: training samples at every position of a user's sequence (SPEC §1.3) | last (each user's last training position only, the official DIEN code's Amazon data)
    history_cut: float = 0.0  # multi-task (PLE) only, refused for other models: share of training samples per epoch whose history is cut to its last k events, k uniform in 1..history_cut_max (simulated sparse users)
    history_cut_max: int = 5  # multi-task (PLE): the longest history a cut leaves
    protocol: str = "user_split"  # retrieval: user_split | leave_last_out
    min_history: int = 1  # retrieval: train only on positions with at least this many events before them
    target_window: int = 1  # retrieval: a sample's target is drawn each epoch from the next this-many events after its history (1 = the next event, SPEC)
    top_m: int = 200  # retrieval eval: candidates per interest
    index: str = "exact"  # exact | hnsw | ivf | ivfpq
    index_params: dict[str, Any] = field(default_factory=dict)  # the index kind's parameters, e.g. {M: 32, efSearch: 256} for hnsw (facetrec.index.ann)
    threads: int = 0  # torch threads (0 = leave torch's default)
    device: str = "auto"  # auto | cpu | cuda
    cuda_graphs: str = "auto"  # auto | on | off: replay the training step from a CUDA graph on a GPU (MIND, YouTube DNN, DIEN, base model; facetrec.train.graphs)
    seed: int = 0  # seeds initialisation, sampling and shuffling (benchmarks vary it for the seed spread)
    max_steps: int = 0  # stop after this many steps (0 = no limit; for smoke runs)
    max_eval_users: int = 0  # cap users evaluated (0 = all)


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # where outputs go (contract key)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: dict[str, Any] = field(default_factory=dict)  # validated by the model's own config class
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def data_root(self) -> Path:
        return resolve_data_root(self.data.root)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def resolve_data_root(root: str) -> Path:
    """Expand `~` and env vars; a root under `../shared/data` follows $FACETREC_DATA when set."""
    root = os.path.expandvars(os.path.expanduser(root))
    env = os.environ.get(DATA_ENV)
    marker = "shared/data"
    if env and marker in root:
        tail = root.split(marker, 1)[1].lstrip("/")
        return Path(env) / tail
    return Path(root)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking keys and coercing simple types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` (from YAML or a --set override) as type `tp`, or a ConfigError naming `key`."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = get_args(tp)
        inner = args[0] if args else Any
        return tuple(coerce(inner, v, key) for v in value)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-6 as a string: it needs 1.0e-6
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        return str(value)
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` strings; values are parsed as YAML (so 3 is int, true is bool)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.epochs=3")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, return a typed Config.

    A config may name a `base:` file (relative to itself) whose keys it extends.

    Example:
        >>> cfg = load_config(None, ["run.dir=runs/x", "train.epochs=2"])
        >>> cfg.train.epochs
        2
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    raw = apply_overrides(raw, list(overrides or []))
    return _build(Config, raw, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} not found; pass a YAML file such as configs/amazon-beauty.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, prepare, model, train, run)")
    base = raw.pop("base", None)
    if base:
        merged = _read_yaml((path.parent / base).resolve())
        return _merge(merged, raw)
    return raw


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
