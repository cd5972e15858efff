"""Multi-task ranking for cold start (SPEC §4): PLE and PLE + UIE on the DIEN-protocol samples.

    ranking.parquet (user, pos, target, label, + rating / behavior)
        -> task labels (B, K): click / engaged = label; liked = rating >= like_threshold;
           purchase = behaviour in purchase_behaviors (negatives are 0; scope "positives"
           scores a task on engaged samples only)
        -> PLE (+ UIE; memories updated after every step) -> fit (early stopping on the mean valid AUC)
        -> metrics: per task AUC / GAUC / logloss; per activity bucket (history events at the
           sample: <=5, 6-20, >20) per task; simulated cold start (test histories cut to their
           last 1, 2, 3, 5 events, users treated as unseen); centre health (centres.json)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import polars as pl
import torch

from facetrec.config import Config
from facetrec.data.batches import MultiTaskBatch
from facetrec.data.dataset import Prepared, minibatches
from facetrec.errors import ConfigError, DataError
from facetrec.eval.metrics import auc, bucket_labels, bucket_of, gauc, logloss, ranking_by_bucket
from facetrec.io import write_json
from facetrec.models.ple import PLE, PLEConfig, multitask_loss
from facetrec.train.build import apply_warm_start, build_model, make_config
from facetrec.train.loop import Task
from facetrec.train.l2 import embed_l2_term, inverse_item_frequencies, mini_batch_l2
from facetrec.train.ranking import epoch_negatives, redraw_negative_targets

BUCKET_EDGES = (5, 20)
TRUNCATIONS = (1, 2, 3, 5)


def default_tasks(prep: Prepared) -> tuple[str, ...]:
    """Tasks the data supports: ratings -> engaged + liked; a buy behaviour -> click + purchase; else click."""
    if prep.feature_map.get("has_rating"):
        return ("engaged", "liked")
    if "buy" in prep.feature_map.get("behaviors", []):
        return ("click", "purchase")
    return ("click",)


@dataclass
class MultiTaskSamples:
    user: np.ndarray  # (S,)
    pos: np.ndarray  # (S,) history events before the target
    target: np.ndarray  # (S,)
    labels: np.ndarray  # (S, K) float32
    mask: np.ndarray  # (S, K) bool: the sample counts for the task
    clicked: np.ndarray  # (S,) bool: a positive sample (label 1); negatives are 0 for every task

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, keep: np.ndarray) -> "MultiTaskSamples":
        return MultiTaskSamples(self.user[keep], self.pos[keep], self.target[keep], self.labels[keep], self.mask[keep],
                                self.clicked[keep])

    def with_targets(self, target: np.ndarray) -> "MultiTaskSamples":
        return MultiTaskSamples(self.user, self.pos, target, self.labels, self.mask, self.clicked)


def task_labels(df: pl.DataFrame, cfg: PLEConfig, where: str = "ranking.parquet") -> tuple[np.ndarray, np.ndarray]:
    """Labels (S, K) and masks (S, K) of the config's tasks from ranking samples (user, label, rating?, behavior?)."""
    clicked = df["label"].to_numpy() == 1
    labels, masks = [], []
    for task in cfg.tasks:
        scope = cfg.scope(task)
        if task in ("click", "engaged"):
            if scope != "all":
                raise ConfigError(f"task_scope of {task!r} must be 'all': it is the positive-vs-negative task")
            y = clicked
        elif task == "liked":
            if "rating" not in df.columns:
                raise DataError(f"task 'liked' needs ratings but {where} has no rating column; set data.rating to the "
                                f"rating column (and re-prepare), or choose tasks without 'liked'")
            y = clicked & (df["rating"].to_numpy() >= cfg.like_threshold)
        elif task == "purchase":
            if "behavior" not in df.columns:
                raise DataError(f"task 'purchase' needs behaviours but {where} has no behavior column; set data.behavior "
                                f"(Taobao logs have it), or choose tasks without 'purchase'")
            y = clicked & df["behavior"].cast(pl.Utf8).is_in(list(cfg.purchase_behaviors)).fill_null(False).to_numpy()
        else:  # PLEConfig validated the names
            raise ConfigError(f"unknown task {task!r}")
        labels.append(y.astype(np.float32))
        masks.append(clicked if scope == "positives" else np.ones(len(df), dtype=bool))
    return np.stack(labels, 1), np.stack(masks, 1)


def multitask_samples(prep: Prepared, split: str, cfg: PLEConfig) -> MultiTaskSamples:
    df = pl.read_parquet(prep.path / "ranking.parquet").filter(pl.col("split") == split)
    y, m = task_labels(df, cfg, str(prep.path / "ranking.parquet"))
    return MultiTaskSamples(df["user"].to_numpy().astype(np.int64), df["pos"].to_numpy().astype(np.int64),
                            df["target"].to_numpy().astype(np.int64), y, m, df["label"].to_numpy() == 1)


def multitask_batch(prep: Prepared, s: MultiTaskSamples, idx: np.ndarray, max_len: int, truncate: int = 0,
                    aux_neg: Optional[np.ndarray] = None, cut: Optional[np.ndarray] = None) -> MultiTaskBatch:
    """A batch of samples `idx`. truncate > 0: simulated cold start — only the last `truncate` history
    events are kept and the user counts as unseen (id 0: no per-user memory, no user embedding).
    `aux_neg` (one per event) replaces prepare's auxiliary negatives. `cut` (one per sample, 0 = none;
    training's `train.history_cut`) keeps only a sample's last `cut` events, the user id stays."""
    users = s.user[idx]
    width = min(truncate, max_len) if truncate else max_len
    aux_neg = prep.aux_neg if aux_neg is None else aux_neg
    keep = None if cut is None else cut[idx]
    (hist, aux), mask = prep.windows(users, s.pos[idx], width, (prep.items, aux_neg), keep)
    n_events = np.minimum(s.pos[idx], truncate) if truncate else s.pos[idx]
    if keep is not None:
        n_events = np.where(keep > 0, np.minimum(n_events, keep), n_events)
    shown = np.zeros_like(users) if truncate else users
    return MultiTaskBatch(
        user=torch.from_numpy(shown), hist=torch.from_numpy(hist), hist_mask=torch.from_numpy(mask),
        aux_neg=torch.from_numpy(aux), target=torch.from_numpy(s.target[idx]), label=torch.from_numpy(s.labels[idx, 0].copy()),
        labels=torch.from_numpy(s.labels[idx]), label_mask=torch.from_numpy(s.mask[idx]), n_events=torch.from_numpy(n_events),
    )


def model_config(cfg: Config, prep: Prepared) -> tuple[str, PLEConfig]:
    params = dict(cfg.model)
    name = params.pop("name")
    if not params.get("tasks"):
        params["tasks"] = list(default_tasks(prep))
    if name == "ple-uie" or params.get("user_dim"):  # UCBE's memories, the user-id embedding
        params.setdefault("n_users", prep.n_users)
    return name, make_config(name, params, prep.n_items)


def build_ple(cfg: Config, prep: Prepared, run_dir: Optional[Path] = None, fresh: bool = True) -> PLE:
    """PLE / PLE + UIE from the config; on a fresh run, `model.warm_start` loads the matching weights of a trained run."""
    name, mcfg = model_config(cfg, prep)
    model = build_model(name, mcfg, prep.feature_tensors(), prep.field_vocab)
    apply_warm_start(model, mcfg.warm_start, run_dir, fresh)
    return model


def history_cuts(n: int, share: float, longest: int, seed: int) -> np.ndarray:
    """`train.history_cut`: per sample the number of history events to keep (0 = all): a share of the
    samples, drawn afresh per epoch seed (the same on every rank), keep their last k, k uniform in
    1..longest. Training on such samples teaches the model what a sparse user looks like.

    Example:
        >>> cut = history_cuts(10_000, 0.3, 5, seed=0)
        >>> round(float((cut > 0).mean()), 2), int(cut.max())
        (0.3, 5)
    """
    rng = np.random.default_rng([seed, 0x6375])
    chosen = rng.random(n) < share
    return np.where(chosen, rng.integers(1, longest + 1, n), 0).astype(np.int64)


def multitask_task(cfg: Config, prep: Prepared, model: PLE, device: torch.device | str = "cpu",
                   rank: int = 0, world: int = 1) -> Task:
    share, longest = cfg.train.history_cut, cfg.train.history_cut_max
    if not 0 <= share <= 1 or longest < 1:
        raise ConfigError(f"train.history_cut {share} must be in [0, 1] and train.history_cut_max {longest} >= 1 "
                          f"(e.g. history_cut: 0.2, history_cut_max: 5)")
    train = multitask_samples(prep, "train", model.cfg)
    valid = multitask_samples(prep, "valid", model.cfg)
    bs = cfg.train.batch_size
    l2 = cfg.train.embed_l2
    inv_freq = inverse_item_frequencies(prep, train.user, train.pos, train.target, device) if l2 > 0 else None
    # the user-id rows (model.user_dim) take the same L2, each weighted 1 / its training samples
    user_inv_freq = None
    if l2 > 0 and model.user is not None:
        n_u = np.bincount(train.user, minlength=model.user.num_embeddings)[:model.user.num_embeddings]
        user_inv_freq = torch.from_numpy(1.0 / np.maximum(n_u, 1.0)).float().to(device)

    def batches(seed: int):
        if model.uie is not None:
            model.uie.start_epoch()
        # train.resample_negatives: fresh negative targets (labels and masks stay: a negative is 0
        # for every task) and auxiliary negatives per epoch seed, the same draw on every rank
        epoch = train
        if cfg.train.resample_negatives:
            epoch = train.with_targets(redraw_negative_targets(prep, train.user, train.target, ~train.clicked, seed))
        aux = epoch_negatives(cfg, prep, seed)
        cut = history_cuts(len(epoch), share, longest, seed) if share > 0 else None
        for idx in minibatches(len(epoch), bs, True, seed, rank, world):
            yield multitask_batch(prep, epoch, idx, prep.max_history, aux_neg=aux, cut=cut).to(device)

    def loss(batch: MultiTaskBatch):
        out = model.outputs(batch, with_aux=True)
        total, parts = multitask_loss(model, batch, out)
        logs = {k: float(v) for k, v in parts.items()}
        if inv_freq is not None:
            reg = embed_l2_term(model.items.id_emb.weight, batch, l2, inv_freq)
            if user_inv_freq is not None:
                u = batch.user.long()
                reg = reg + l2 * mini_batch_l2(model.user.weight, u[u < len(user_inv_freq)], user_inv_freq)
            total = total + reg
            logs["l2"] = float(reg.detach())
        if model.uie is not None and model.training:
            # after the forward: this step's vectors were enhanced by the memories as they were
            logs.update(model.uie.update(out.uie, batch.user, out.hist_e, batch.hist_mask.bool(), batch.n_events,
                                         batch.label > 0.5))
        return total, logs

    def evaluate(split: str) -> dict[str, float]:
        m = task_metrics(valid, predict(model, prep, valid, device=device), model.cfg.tasks)
        flat = {f"{t}/{k}": v[k] for t, v in m.items() for k in ("auc", "gauc")}
        return {"auc": float(np.mean([m[t]["auc"] for t in model.cfg.tasks])), **flat}

    return Task(model=model, batches=batches, n_batches=-(-len(train) // bs), loss=loss, evaluate=evaluate, monitor="auc")


@torch.no_grad()
def predict(model: PLE, prep: Prepared, s: MultiTaskSamples, truncate: int = 0, batch_size: int = 2048,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Probabilities (S, K) for every sample and task, in order."""
    model.eval()
    out = []
    for idx in minibatches(len(s), batch_size, shuffle=False, seed=0):
        b = multitask_batch(prep, s, idx, prep.max_history, truncate).to(device)
        out.append(torch.sigmoid(model(b).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.cfg.tasks)), dtype=np.float32)


def task_metrics(s: MultiTaskSamples, probs: np.ndarray, tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{task: {auc, gauc, logloss, samples}} over the samples that count for each task."""
    out = {}
    for k, task in enumerate(tasks):
        m = s.mask[:, k]
        y, p = s.labels[m, k], probs[m, k]
        row: dict[str, float] = {"samples": int(m.sum()), "positives": int(y.sum())}
        if 0 < row["positives"] < row["samples"]:
            row.update(auc=auc(y, p), gauc=gauc(s.user[m], y, p), logloss=logloss(y, p))
        else:
            row.update(auc=float("nan"), gauc=float("nan"))
        out[task] = row
    return out


def bucket_metrics(s: MultiTaskSamples, probs: np.ndarray, tasks: tuple[str, ...]) -> dict[str, dict[str, dict[str, float]]]:
    """{bucket: {task: {auc, gauc, logloss, samples, positives}}}; buckets by history events at the sample."""
    names = bucket_labels(BUCKET_EDGES)
    buckets = bucket_of(s.pos, BUCKET_EDGES)
    out: dict[str, dict[str, dict[str, float]]] = {b: {} for b in names}
    for k, task in enumerate(tasks):
        m = s.mask[:, k]
        per = ranking_by_bucket(s.user[m], s.labels[m, k], probs[m, k], buckets[m], order=names)
        for b in names:
            out[b][task] = per[b]
    return out


def multitask_metrics(cfg: Config, prep: Prepared, model: PLE, device: torch.device | str = "cpu",
                      run_dir: Optional[Path] = None) -> dict[str, Any]:
    """valid / test per task, test by activity bucket, simulated cold start, centre health."""
    tasks = model.cfg.tasks
    out: dict[str, Any] = {"tasks": list(tasks)}
    for split in ("valid", "test"):
        s = multitask_samples(prep, split, model.cfg)
        probs = predict(model, prep, s, device=device)
        out[split] = task_metrics(s, probs, tasks)
        if split == "test":
            out["buckets"] = bucket_metrics(s, probs, tasks)
            cold = {}
            for k in TRUNCATIONS:
                sub = s.subset(s.pos >= k)  # every sample keeps exactly k history events
                m = task_metrics(sub, predict(model, prep, sub, truncate=k, device=device), tasks)
                cold[str(k)] = m
            out["cold_start"] = cold
    if model.uie is not None:
        health = model.uie.health()
        out["centres"] = {k: {f: v[f] for f in ("centres", "in_use", "in_use_ever", "usage_entropy", "reseeded")}
                          if isinstance(v, dict) else v for k, v in health.items()}
        if run_dir is not None:
            write_json(Path(run_dir) / "centres.json", health)
    return out
