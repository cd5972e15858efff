"""Retrieval training and evaluation: MIND, YouTube DNN (MIND with K = 1, mean pooling), popularity.

Evaluation goes through the ANN layer exactly as serving does: each valid interest queries the
index for its top-M items, results are merged by max over interests, history items are
excluded, and Recall / NDCG / HR @20 and @50 are computed against the user's targets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from facetrec.config import Config
from facetrec.data.batches import RetrievalBatch
from facetrec.data.dataset import (Prepared, RetrievalEvalSet, history_csr, minibatches, retrieval_batch,
                                   retrieval_eval_set, retrieval_train_samples, retrieval_window_targets)
from facetrec.errors import ConfigError
from facetrec.eval.metrics import bucket_labels, bucket_of, topn_by_bucket, topn_mean, topn_per_user
from facetrec.index.ann import ann_recall, build_index, multi_interest_search
from facetrec.models.losses import NEGATIVE_MODES, NEGATIVE_SCORES, NegativeSampler, interest_similarity, retrieval_loss
from facetrec.models.mind import MIND
from facetrec.train.build import apply_warm_start, build_model, make_config
from facetrec.train.distributed import all_gather_rows, global_shares
from facetrec.train.l2 import embed_l2_term, inverse_item_frequencies
from facetrec.train.loop import Task

KS = (20, 50)
HISTORY_EDGES = (3, 7, 15)  # test users bucketed by history events: K'_u = 1, 2, 3, 4 under SPEC §2.2's rule with K = 4


def retrieval_metrics(ranked: np.ndarray, es: RetrievalEvalSet, buckets: bool = False) -> dict[str, Any]:
    """Recall / NDCG / HR @20 and @50 of any model's top-N (U, N) on `es`; with buckets, also under
    "buckets" per bucket of history length (`HISTORY_EDGES`).

    The same users fall in the same bucket whatever the model, so MIND and its baselines compare
    bucket by bucket: does splitting a history into several interests pay where histories are long?
    """
    per = topn_per_user(ranked, es.target_offsets, es.target_items, KS)
    out: dict[str, Any] = topn_mean(per)
    if buckets:
        out["buckets"] = _history_buckets(per, es)
    return out


def _history_buckets(per: dict[str, np.ndarray], es: RetrievalEvalSet) -> dict[str, dict[str, float]]:
    out = topn_by_bucket(per, bucket_of(es.ends, HISTORY_EDGES), bucket_labels(HISTORY_EDGES))
    return {b: {k: v for k, v in m.items() if v == v} for b, m in out.items()}  # an empty bucket: its count only (no NaN in JSON)


def build_mind(cfg: Config, prep: Prepared, run_dir: Optional[Path] = None, fresh: bool = False) -> MIND:
    """MIND (or YouTube DNN: K = 1, mean pooling) from the config's model section; on a fresh
    training run, `model.warm_start` loads the matching weights of a trained run."""
    params = dict(cfg.model)
    name = params.pop("name", "mind")
    mcfg = make_config(name, params, prep.n_items)
    model = build_model(name, mcfg, prep.feature_tensors(), prep.field_vocab)
    apply_warm_start(model, mcfg.warm_start, run_dir, fresh)
    return model


@torch.no_grad()
def user_interests(model: MIND, prep: Prepared, users: np.ndarray, ends: np.ndarray, max_len: int,
                   batch_size: int = 1024, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Interest vectors (U, K, D) and validity (U, K) for histories ending before `ends`."""
    model.eval()
    vecs, valid = [], []
    for lo in range(0, len(users), batch_size):
        b = retrieval_batch(prep, users[lo:lo + batch_size], ends[lo:lo + batch_size], max_len).to(device)
        v, m = model.user_interests(b.hist, b.hist_mask, b.n_events)
        vecs.append(v.float().cpu().numpy())
        valid.append(m.cpu().numpy())
    return np.concatenate(vecs), np.concatenate(valid)


@torch.no_grad()
def all_item_vectors(model: MIND, n_items: int, batch_size: int = 65536, device: torch.device | str = "cpu") -> np.ndarray:
    """Vectors of items 1..n_items-1 (row i-1 = item i)."""
    model.eval()
    out = []
    for lo in range(1, n_items, batch_size):
        ids = torch.arange(lo, min(n_items, lo + batch_size), device=device)
        out.append(model.item_vectors(ids).float().cpu().numpy())
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def evaluate_mind(model: MIND, prep: Prepared, es: RetrievalEvalSet, cfg: Config, detail: bool = False,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Recall/NDCG/HR@{20,50} through the ANN layer; with detail, also interest diagnostics and the
    metrics per history-length bucket (`retrieval_metrics`)."""
    t0 = time.perf_counter()
    items = all_item_vectors(model, prep.n_items, device=device)
    ids = np.arange(1, prep.n_items, dtype=np.int64)
    index = build_index(items, ids, kind=cfg.train.index, **cfg.train.index_params)
    interests, valid = user_interests(model, prep, es.users, es.ends, prep.max_history, device=device)
    exclude = history_csr(prep, es.users, es.ends)
    n = max(KS)
    top, scores, which = multi_interest_search(index, interests, valid, cfg.train.top_m, n, exclude)
    out = retrieval_metrics(top, es, buckets=detail)
    if not detail:
        return out
    if cfg.train.index != "exact":
        exact = build_index(items, ids, kind="exact")
        etop, _, _ = multi_interest_search(exact, interests, valid, cfg.train.top_m, n, exclude)
        out["ann_recall@50_vs_exact"] = ann_recall(top, etop)
    # the cosine of the interests' directions: an offset coordinate (model.interest_bias) is not a direction
    out["interests"] = interest_diagnostics(interests[..., :model.cfg.dim], valid, top, which, es)
    out["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def interest_diagnostics(interests: np.ndarray, valid: np.ndarray, top: np.ndarray, which: np.ndarray,
                         es: RetrievalEvalSet, k: int = 50) -> dict[str, Any]:
    """Are interests distinct? Mean pairwise cosine of a user's valid interests; share of hits per interest."""
    multi = valid.sum(1) >= 2  # users with a pair of interests to compare
    mean_cos = float(interest_similarity(torch.from_numpy(interests), torch.from_numpy(valid))) if multi.any() else float("nan")
    # share of test hits @k retrieved by each interest rank
    n_t = np.diff(es.target_offsets)
    owner = np.repeat(np.arange(len(n_t)), n_t)
    key_top = top[:, :k].astype(np.int64) + (np.arange(len(top))[:, None] * (1 << 32))
    key_t = es.target_items.astype(np.int64) + owner * (1 << 32)
    tgt = np.isin(key_top, key_t) & (top[:, :k] > 0)
    hits_by = np.bincount(which[:, :k][tgt], minlength=valid.shape[1])
    k_count = np.bincount(valid.sum(1), minlength=valid.shape[1] + 1)
    return {
        "mean_pairwise_cosine": mean_cos,
        "users_with_several_interests": float(multi.mean()),
        "hit_share_by_interest": (hits_by / max(1, hits_by.sum())).round(4).tolist(),
        "k_prime_histogram": {str(i): int(c) for i, c in enumerate(k_count) if i > 0},
    }


def popularity_topn(prep: Prepared, es: RetrievalEvalSet, n: int) -> np.ndarray:
    """Most popular training-window items, history excluded: (U, n)."""
    train_users = prep.split == 0
    train_users[0] = False
    owner = np.repeat(np.arange(prep.n_users), prep.counts)
    counts = np.bincount(prep.items[train_users[owner]], minlength=prep.n_items)
    counts[0] = -1
    order = np.argsort(-counts, kind="stable")
    off, hist = history_csr(prep, es.users, es.ends)
    width = n + int(np.diff(off).max(initial=0))
    cand = np.broadcast_to(order[:width], (len(es.users), width))
    hist_owner = np.repeat(np.arange(len(es.users)), np.diff(off))
    seen = np.isin(cand + np.arange(len(es.users))[:, None] * (1 << 32), hist.astype(np.int64) + hist_owner * (1 << 32))
    out = np.zeros((len(es.users), n), dtype=np.int64)
    for_rank = np.where(seen, np.iinfo(np.int64).max, np.arange(width)[None, :])
    pick = np.argsort(for_rank, axis=1, kind="stable")[:, :n]
    out[:] = np.take_along_axis(cand, pick, axis=1)
    return out


def retrieval_task(cfg: Config, prep: Prepared, model: MIND, device: torch.device | str = "cpu",
                   rank: int = 0, world: int = 1) -> Task:
    if cfg.train.negative_scores not in NEGATIVE_SCORES:
        raise ConfigError(f"train.negative_scores {cfg.train.negative_scores!r} must be 'readout' (the label-aware "
                          "readout, SPEC §2.5) or 'max' (each user's best valid interest, as serving merges)")
    if not cfg.train.hard_negatives >= 0:
        raise ConfigError(f"train.hard_negatives {cfg.train.hard_negatives} must be >= 0 (0 = off)")
    if cfg.train.negatives not in NEGATIVE_MODES:
        raise ConfigError(f"train.negatives {cfg.train.negatives!r} must be one of {', '.join(NEGATIVE_MODES)} "
                          "(all: every item is a negative, the full softmax)")
    if cfg.train.negatives == "all" and cfg.train.in_batch_negatives:
        raise ConfigError("train.negatives: all already scores every item; in-batch negatives would count the batch's "
                          "targets twice — set train.in_batch_negatives: false")
    if not cfg.train.interest_diversity >= 0:
        raise ConfigError(f"train.interest_diversity {cfg.train.interest_diversity} must be >= 0 (0 = off)")
    if cfg.train.target_window < 1:
        raise ConfigError(f"train.target_window {cfg.train.target_window} must be >= 1 (1 = the next event, SPEC's sample)")
    users, pos = retrieval_train_samples(prep, cfg.train.protocol, cfg.train.min_history)
    # the same negatives on every rank at every step: drawn for the global batch, shared by its rows
    sampler = NegativeSampler(prep.item_counts, mode=cfg.train.negatives, seed=cfg.train.seed)
    valid_set = retrieval_eval_set(prep, "valid", cfg.train.protocol, cfg.train.max_eval_users, seed=cfg.train.seed)
    bs = cfg.train.batch_size
    l2 = cfg.train.embed_l2
    inv_freq = None
    if l2 > 0:
        targets = prep.items[prep.offsets[users - 1] + pos]
        inv_freq = inverse_item_frequencies(prep, users, pos, targets, device)

    def batches(seed: int):
        # random streams restart from the epoch's seed: a resumed run continues like an uninterrupted one
        sampler.generator.manual_seed(seed)
        model.reseed_routing(seed)
        # the epoch's targets, drawn for every sample before the ranks take their shares
        tpos = retrieval_window_targets(prep, cfg.train.protocol, users, pos, cfg.train.target_window,
                                        np.random.default_rng([seed, 7]))
        for idx in minibatches(len(users), bs, True, seed, rank, world):
            neg_ids, neg_log_q = sampler.sample(cfg.train.n_negatives)  # drawn here: the step itself stays on the device
            yield SampledBatch(retrieval_batch(prep, users[idx], pos[idx], prep.max_history, tpos[idx]).to(device),
                               neg_ids.to(device), neg_log_q.to(device))

    def loss(step: SampledBatch):
        batch = step.batch
        (share,) = global_shares(len(batch.target))  # rows are independent given the shared negatives
        value = retrieval_loss(model, batch, sampler, cfg.train.n_negatives, in_batch=cfg.train.in_batch_negatives,
                               negatives=(step.neg_ids, step.neg_log_q), gather=all_gather_rows if world > 1 else None,
                               negative_scores=cfg.train.negative_scores, hard_negatives=cfg.train.hard_negatives,
                               diversity=cfg.train.interest_diversity)
        value = value * share
        if inv_freq is None:
            return value, {}
        reg = embed_l2_term(model.items.table, batch, l2, inv_freq)  # the table's rows 0..n_items-1 are the item ids
        return value + reg, {"l2": reg.detach()}

    return Task(model=model, batches=batches, n_batches=-(-len(users) // bs), loss=loss,
                evaluate=lambda split: evaluate_mind(model, prep, valid_set, cfg, device=device), monitor="recall@50",
                graph_safe=True)


@dataclass
class SampledBatch:
    """A retrieval training step's inputs: the batch and the sampled negatives it shares (SPEC §2.5)."""

    batch: RetrievalBatch
    neg_ids: torch.Tensor  # (N,) item ids
    neg_log_q: torch.Tensor  # (N,) their log Q under the sampler

    def __len__(self) -> int:
        return len(self.batch)
