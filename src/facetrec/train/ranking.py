"""Ranking (CTR) training and evaluation: DIEN (AUGRU / AGRU / AIGRU, with or without the
auxiliary loss), DIN and the base model, on the DIEN protocol samples from `prepare`.

Metrics: AUC, GAUC (per-user AUC weighted by the user's samples), logloss, overall and per
user-activity bucket (history length at the sample: <=5, 6-20, >20).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from facetrec.config import Config
from facetrec.data.dataset import Prepared, RankingSamples, last_positions, minibatches, ranking_batch, ranking_samples
from facetrec.data.prepare import sample_aux_negatives, sample_negatives_for_users
from facetrec.errors import ConfigError
from facetrec.eval.metrics import auc, bucket_of, gauc, logloss
from facetrec.models import dien as dien_mod
from facetrec.train.build import build_model, make_config
from facetrec.train.distributed import global_shares
from facetrec.train.l2 import embed_l2_term, inverse_item_frequencies
from facetrec.train.loop import Task

BUCKET_EDGES = (5, 20)


def ranking_model(cfg: Config, prep: Prepared) -> torch.nn.Module:
    """DIEN, DIN or the base model from the config's model section."""
    params = dict(cfg.model)
    name = params.pop("name", "dien")
    return build_model(name, make_config(name, params, prep.n_items), prep.feature_tensors(), prep.field_vocab)


@torch.no_grad()
def predict(model: torch.nn.Module, prep: Prepared, s: RankingSamples, batch_size: int = 2048,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Click probabilities for every sample, in order."""
    model.eval()
    out = []
    for idx in minibatches(len(s), batch_size, shuffle=False, seed=0):
        b = ranking_batch(prep, s, idx, prep.max_history).to(device)
        out.append(torch.sigmoid(model(b).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def ranking_metrics(s: RankingSamples, probs: np.ndarray) -> dict[str, Any]:
    """AUC / GAUC / logloss overall (flat keys) and per activity bucket (under "buckets")."""
    out: dict[str, Any] = {"auc": auc(s.label, probs), "gauc": gauc(s.user, s.label, probs), "logloss": logloss(s.label, probs)}
    buckets = bucket_of(s.pos, BUCKET_EDGES)
    out["buckets"] = {}
    for b in dict.fromkeys(buckets.tolist()):
        m = buckets == b
        if len(np.unique(s.label[m])) < 2:
            continue
        out["buckets"][b] = {"auc": auc(s.label[m], probs[m]), "gauc": gauc(s.user[m], s.label[m], probs[m]),
                             "logloss": logloss(s.label[m], probs[m]), "samples": int(m.sum())}
    return out


def redraw_negative_targets(prep: Prepared, user: np.ndarray, target: np.ndarray, negative: np.ndarray,
                            seed: int) -> np.ndarray:
    """A copy of `target` with the `negative` samples' targets redrawn by prepare's rule: an item
    the user never interacted with. The other targets are kept."""
    target = target.copy()
    target[negative] = sample_negatives_for_users(np.random.default_rng(seed), user[negative], prep.n_items,
                                                  prep.pair_keys())
    return target


def fresh_negatives(prep: Prepared, s: RankingSamples, seed: int) -> RankingSamples:
    """`s` with every negative (label 0) target redrawn (`redraw_negative_targets`). Positives,
    histories and the sample order are unchanged."""
    return RankingSamples(s.user, s.pos, redraw_negative_targets(prep, s.user, s.target, s.label == 0, seed), s.label)


def epoch_negatives(cfg: Config, prep: Prepared, seed: int) -> np.ndarray | None:
    """DIEN's auxiliary negatives for the epoch of `seed` under `train.resample_negatives` (one per
    event, the same draw on every rank; `train.aux_negatives` uniform or by popularity), else None
    (prepare's, uniform)."""
    mode = cfg.train.aux_negatives
    if mode not in ("uniform", "popularity"):
        raise ConfigError(f"train.aux_negatives {mode!r} must be 'uniform' or 'popularity'")
    if not cfg.train.resample_negatives:
        if mode != "uniform":
            raise ConfigError("train.aux_negatives=popularity needs train.resample_negatives=true (prepare's "
                              "auxiliary negatives are uniform)")
        return None
    probs = prep.aux_negative_probs() if mode == "popularity" else None
    return sample_aux_negatives(np.random.default_rng([seed, 1]), prep.items, prep.n_items, probs)


def training_positions(cfg: Config, s: RankingSamples) -> RankingSamples:
    """`train.positions`: every position's samples (SPEC §1.3), or each user's last only."""
    mode = cfg.train.positions
    if mode not in ("all", "last"):
        raise ConfigError(f"train.positions {mode!r} must be 'all' (every position, SPEC §1.3) or 'last' "
                          f"(each user's last training position)")
    return last_positions(s) if mode == "last" else s


def ranking_task(cfg: Config, prep: Prepared, model: torch.nn.Module, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1) -> Task:
    train = training_positions(cfg, ranking_samples(prep, "train"))
    valid = ranking_samples(prep, "valid")
    bs = cfg.train.batch_size
    l2 = cfg.train.embed_l2
    inv_freq = inverse_item_frequencies(prep, train.user, train.pos, train.target, device) if l2 > 0 else None

    def batches(seed: int):
        # fresh negatives per epoch seed, for the targets and DIEN's auxiliary loss: the same draw on every rank
        epoch = fresh_negatives(prep, train, seed) if cfg.train.resample_negatives else train
        aux = epoch_negatives(cfg, prep, seed)
        for idx in minibatches(len(epoch), bs, True, seed, rank, world):
            yield ranking_batch(prep, epoch, idx, prep.max_history, aux).to(device)

    def loss(batch):
        bce_share, aux_share = 1.0, 1.0
        if world > 1:  # samples, and auxiliary-loss positions (t whose t + 1 is real; histories are left-aligned)
            bce_share, aux_share = global_shares(len(batch.label), int(batch.hist_mask[:, 1:].sum()))
        total, parts = dien_mod.ranking_loss(model, batch, bce_scale=bce_share, aux_scale=aux_share)
        if inv_freq is not None:
            reg = embed_l2_term(model.items.id_emb.weight, batch, l2, inv_freq)
            total = total + reg
            parts["l2"] = reg.detach()
        return total, parts  # detached tensors: the loop reads them once per log window

    def evaluate(split: str) -> dict[str, float]:
        m = ranking_metrics(valid, predict(model, prep, valid, device=device))
        return {k: v for k, v in m.items() if k != "buckets"}

    # DIEN (padded on the GPU) and the base model have no host sync in a step; DIN gathers the real positions
    safe = isinstance(model, dien_mod.BaseModel) or (isinstance(model, dien_mod.DIEN) and model.att_mlp is None)
    return Task(model=model, batches=batches, n_batches=-(-len(train) // bs), loss=loss, evaluate=evaluate,
                monitor="auc", graph_safe=safe)
