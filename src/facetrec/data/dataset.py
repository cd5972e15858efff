"""Prepared data in memory, and the samples and batches each protocol trains and evaluates on.

The event log is held as flat numpy arrays in CSR order (user u's events are
`offsets[u-1]:offsets[u]`, time-sorted); a sample is just (user, position), and a batch's
histories are gathered with one vectorised index — no Python object per event or sample.

Protocols (SPEC §1.3):
  user_split      train users: every position t >= 1 predicts event t from events < t.
                  valid/test users: first `history_frac` of events = history, the rest = targets.
  leave_last_out  every user: last event = test target, second-to-last = valid target,
                  positions before those train.
  ranking         ranking.parquet from prepare: (user, pos, target, label, split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch

from facetrec.data.batches import RankingBatch, RetrievalBatch
from facetrec.data.prepare import aux_negative_probs, pair_keys
from facetrec.errors import DataError

SPLITS = ("train", "valid", "test")


class Prepared:
    """Everything `prepare` wrote, loaded as arrays.

    Attributes:
        items, times, aux_neg: (E,) per-event arrays in CSR order
        offsets:               (U+1,) user u's events are offsets[u-1]:offsets[u]; u in 1..U
        counts:                (U+1,) events per user (index 0 = padding, 0)
        split:                 (U+1,) 0/1/2 = train/valid/test user (index 0 unused)
        item_counts:           (n_items,) training-log popularity (index 0 = 0)
        item_features:         field -> (n_items, W) int64 attribute ids, 0 = padding
        field_vocab:           field -> vocab size incl. padding
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fm_path = self.path / "feature_map.json"
        if not fm_path.exists():
            raise DataError(f"{self.path} holds no feature_map.json; run `facetrec prepare CONFIG` first")
        self.feature_map = json.loads(fm_path.read_text())
        self.n_users: int = self.feature_map["n_users"]
        self.n_items: int = self.feature_map["n_items"]
        self.max_history: int = self.feature_map["max_history"]
        self.history_frac: float = self.feature_map["prepare"]["history_frac"]
        ev = pl.read_parquet(self.path / "events.parquet", columns=["user", "item", "time", "aux_neg"])
        self.items = ev["item"].to_numpy().astype(np.int64)
        self.times = ev["time"].to_numpy()
        self.aux_neg = ev["aux_neg"].to_numpy().astype(np.int64)
        users = ev["user"].to_numpy()
        self.counts = np.bincount(users, minlength=self.n_users).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts[1:])]).astype(np.int64)
        u = pl.read_parquet(self.path / "users.parquet", columns=["id", "split"])
        self.split = np.zeros(self.n_users, dtype=np.int8)
        self.split[u["id"].to_numpy()] = u["split"].replace_strict({"train": 0, "valid": 1, "test": 2}, return_dtype=pl.Int8).to_numpy()
        self.item_counts = np.bincount(self.items, minlength=self.n_items).astype(np.int64)
        with np.load(self.path / "item_features.npz", allow_pickle=False) as z:
            self.item_features = {k: z[k].astype(np.int64) for k in z.files}
        self.field_vocab = {k: int(v["vocab"]) for k, v in self.feature_map["item_fields"].items()}
        self._pair_keys: np.ndarray | None = None
        self._aux_probs: np.ndarray | None = None

    def pair_keys(self) -> np.ndarray:
        """Sorted user * n_items + item over all events: `data.prepare.sample_negatives_for_users`' membership test."""
        if self._pair_keys is None:
            self._pair_keys = pair_keys(np.repeat(np.arange(self.n_users), self.counts), self.items, self.n_items)
        return self._pair_keys

    def aux_negative_probs(self) -> np.ndarray:
        """`data.prepare.aux_negative_probs` over this log (computed once): DIEN's popularity-drawn auxiliary negatives."""
        if self._aux_probs is None:
            self._aux_probs = aux_negative_probs(self.items, self.offsets, self.n_items)
        return self._aux_probs

    def feature_tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.item_features.items()}

    def users_of(self, split: str) -> np.ndarray:
        users = np.nonzero(self.split == SPLITS.index(split))[0].astype(np.int64)
        return users[users > 0]

    def user_items(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user - 1]:self.offsets[user]]

    def windows(self, users: np.ndarray, ends: np.ndarray, max_len: int,
                arrays: tuple[np.ndarray, ...] | None = None,
                keep: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """The last `max_len` events before position `ends` of each user, left-aligned, 0-padded.
        `keep` (B,) > 0 caps a row's window further, to its last `keep` events.

        Returns ([gathered array per input array] each (B, L), mask (B, L) bool).
        """
        arrays = arrays if arrays is not None else (self.items,)
        ends = np.asarray(ends, dtype=np.int64)
        width = max_len if keep is None else np.where(keep > 0, np.minimum(keep, max_len), max_len)
        start = np.maximum(ends - width, 0)
        length = ends - start
        steps = np.arange(max_len)
        mask = steps[None, :] < length[:, None]
        idx = np.where(mask, (self.offsets[users - 1] + start)[:, None] + steps[None, :], 0)
        return [np.where(mask, a[idx], 0) for a in arrays], mask


# ---------------------------------------------------------------- retrieval


@dataclass
class RetrievalEvalSet:
    """Users to evaluate, where their history ends, and their targets (CSR)."""

    users: np.ndarray  # (U,)
    ends: np.ndarray  # (U,) history = events [0, end)
    target_offsets: np.ndarray  # (U+1,)
    target_items: np.ndarray  # (sum,)


def retrieval_train_samples(prep: Prepared, protocol: str, min_history: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(user, position) pairs: predict the event at `position` from the events before it, for every
    position with at least `min_history` events before it."""
    if min_history < 1:
        raise DataError(f"train.min_history {min_history} must be >= 1 (a training sample needs a history)")
    if protocol == "user_split":
        users = prep.users_of("train")
        reserve = 0
    elif protocol == "leave_last_out":
        users = np.arange(1, prep.n_users, dtype=np.int64)
        reserve = 2
    else:
        raise DataError(f"train.protocol {protocol!r} must be 'user_split' or 'leave_last_out'")
    n_pos = np.maximum(prep.counts[users] - min_history - reserve, 0)  # positions min_history .. count-1-reserve
    su = np.repeat(users, n_pos)
    pos = np.arange(len(su)) - np.repeat(np.cumsum(n_pos) - n_pos, n_pos) + min_history
    return su, pos.astype(np.int64)


def retrieval_window_targets(prep: Prepared, protocol: str, users: np.ndarray, pos: np.ndarray, window: int,
                             rng: np.random.Generator) -> np.ndarray:
    """Where each training sample's target is: uniform over the next `window` events after its history
    (`pos`, `pos + 1`, ...), never past the events the protocol leaves to training. `window` 1 is the
    next event, SPEC's sample; a wider one asks the history to predict a later event too, as the user
    split's evaluation does (its targets are a user's last 20% of events, not only the next one)."""
    if window < 1:
        raise DataError(f"train.target_window {window} must be >= 1 (1 = the next event)")
    if window == 1:
        return pos
    reserve = 2 if protocol == "leave_last_out" else 0
    span = np.minimum(window, prep.counts[users] - reserve - pos)  # >= 1: pos is a trainable position
    return pos + (rng.random(len(pos)) * span).astype(np.int64)


def retrieval_eval_set(prep: Prepared, split: str, protocol: str, max_users: int = 0, seed: int = 0) -> RetrievalEvalSet:
    """Evaluation users with history cut-offs and targets for `split` in `protocol`."""
    if protocol == "user_split":
        users = prep.users_of(split)
        users = users[prep.counts[users] >= 2]  # a history and at least one target
        c = prep.counts[users]
        ends = np.clip(np.floor(c * prep.history_frac).astype(np.int64), 1, c - 1)
        n_t = c - ends
    elif protocol == "leave_last_out":
        users = np.arange(1, prep.n_users, dtype=np.int64)
        c = prep.counts[users]
        ends = c - (2 if split == "valid" else 1)
        keep = ends >= 1
        users, ends, c = users[keep], ends[keep], c[keep]
        n_t = np.ones(len(users), dtype=np.int64)
    else:
        raise DataError(f"protocol {protocol!r} must be 'user_split' or 'leave_last_out'")
    if max_users and len(users) > max_users:
        pick = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
        users, ends, n_t = users[pick], ends[pick], n_t[pick]
    t_off = np.concatenate([[0], np.cumsum(n_t)]).astype(np.int64)
    idx = np.repeat(prep.offsets[users - 1] + ends, n_t) + (np.arange(t_off[-1]) - np.repeat(t_off[:-1], n_t))
    return RetrievalEvalSet(users, ends, t_off, prep.items[idx])


def retrieval_batch(prep: Prepared, users: np.ndarray, ends: np.ndarray, max_len: int,
                    targets: np.ndarray | None = None) -> RetrievalBatch:
    """Histories ending before `ends`; target = the event at `targets` (default `ends`, the next one;
    valid only for training samples)."""
    (hist,), mask = prep.windows(users, ends, max_len)
    tgt_idx = np.minimum(prep.offsets[users - 1] + (ends if targets is None else targets), len(prep.items) - 1)
    return RetrievalBatch(
        user=torch.from_numpy(users), hist=torch.from_numpy(hist), hist_mask=torch.from_numpy(mask),
        target=torch.from_numpy(prep.items[tgt_idx]), n_events=torch.from_numpy(ends.astype(np.int64)),
    )


def history_csr(prep: Prepared, users: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All items before `ends` for each user (to exclude from retrieval results)."""
    off = np.concatenate([[0], np.cumsum(ends)]).astype(np.int64)
    idx = np.repeat(prep.offsets[users - 1], ends) + (np.arange(off[-1]) - np.repeat(off[:-1], ends))
    return off, prep.items[idx]


# ---------------------------------------------------------------- ranking


@dataclass
class RankingSamples:
    user: np.ndarray
    pos: np.ndarray
    target: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def ranking_samples(prep: Prepared, split: str) -> RankingSamples:
    df = pl.read_parquet(prep.path / "ranking.parquet").filter(pl.col("split") == split)
    return RankingSamples(df["user"].to_numpy().astype(np.int64), df["pos"].to_numpy().astype(np.int64),
                          df["target"].to_numpy().astype(np.int64), df["label"].to_numpy().astype(np.float32))


def last_positions(s: RankingSamples) -> RankingSamples:
    """The samples at each user's last position only (its positive and that position's negatives):
    one training example per user, as the official DIEN code builds its Amazon data (`train.positions: last`).

    Example:
        >>> s = RankingSamples(np.array([1, 1, 1, 1, 2, 2]), np.array([1, 1, 2, 2, 1, 1]),
        ...                    np.array([5, 6, 7, 8, 9, 3]), np.array([1, 0, 1, 0, 1, 0], np.float32))
        >>> last_positions(s).target.tolist()
        [7, 8, 9, 3]
    """
    if len(s) == 0:
        return s
    last = np.full(int(s.user.max()) + 1, -1, dtype=np.int64)
    np.maximum.at(last, s.user, s.pos)
    keep = s.pos == last[s.user]
    return RankingSamples(s.user[keep], s.pos[keep], s.target[keep], s.label[keep])


def ranking_batch(prep: Prepared, s: RankingSamples, idx: np.ndarray, max_len: int,
                  aux_neg: np.ndarray | None = None) -> RankingBatch:
    """Samples `idx` of `s` with their histories; `aux_neg` (one per event) replaces prepare's auxiliary negatives."""
    users = s.user[idx]
    aux_neg = prep.aux_neg if aux_neg is None else aux_neg
    (hist, aux), mask = prep.windows(users, s.pos[idx], max_len, (prep.items, aux_neg))
    return RankingBatch(
        user=torch.from_numpy(users), hist=torch.from_numpy(hist), hist_mask=torch.from_numpy(mask),
        aux_neg=torch.from_numpy(aux), target=torch.from_numpy(s.target[idx]), label=torch.from_numpy(s.label[idx]),
    )


def minibatches(n: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1) -> Iterator[np.ndarray]:
    """Index batches over n samples. `batch_size` is the global batch: with world > 1 every rank
    takes its slice of each global batch, so N ranks step like one process with the same global
    batch and the same seed (the order depends on the seed only, never on the world size).

    The last, shorter global batch is split as evenly as it goes (slices then differ in size by
    one: weight each rank's loss with `train.distributed.global_shares`). Only when it has fewer
    samples than there are ranks is it dropped — a rank with an empty slice could not run a
    step — so one process then takes one more, tiny, step per epoch than N ranks do."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    if world == 1:
        for lo in range(0, n, batch_size):
            yield order[lo:lo + batch_size]
        return
    if batch_size % world:
        raise ValueError(f"train.batch_size {batch_size} must be divisible by the {world} processes")
    for lo in range(0, n - world + 1, batch_size):
        yield np.array_split(order[lo:lo + batch_size], world)[rank]
