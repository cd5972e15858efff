"""Mini-batch containers shared by the datasets, the models and the training loop.

All id tensors are int64 with 0 = padding; masks are bool with True = a real position.
Item attributes (category, brand, ...) are not carried in batches: the models hold the
item -> attribute tables (from the feature map) as buffers and look them up themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class _Batch:
    def to(self, device: torch.device | str):
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return int(getattr(self, fields(self)[0].name).shape[0])


@dataclass
class RetrievalBatch(_Batch):
    """One retrieval training step: a user's recent history and the next item.

    user:      (B,)   user ids
    hist:      (B, L) item ids, left-aligned, 0-padded; most recent events kept
    hist_mask: (B, L) bool, True = real behaviour
    target:    (B,)   the item to predict
    n_events:  (B,)   |I_u|, the full number of the user's history events (for K'_u)
    """

    user: torch.Tensor
    hist: torch.Tensor
    hist_mask: torch.Tensor
    target: torch.Tensor
    n_events: torch.Tensor


@dataclass
class RankingBatch(_Batch):
    """One ranking (CTR) step: history, one candidate, its label.

    user:      (B,)   user ids
    hist:      (B, T) item ids in time order, left-aligned, 0-padded
    hist_mask: (B, T) bool
    aux_neg:   (B, T) for each history position an item != the clicked one (DIEN aux loss)
    target:    (B,)   candidate item
    label:     (B,)   float 1 = clicked, 0 = sampled negative
    """

    user: torch.Tensor
    hist: torch.Tensor
    hist_mask: torch.Tensor
    aux_neg: torch.Tensor
    target: torch.Tensor
    label: torch.Tensor


@dataclass
class MultiTaskBatch(RankingBatch):
    """A ranking step with one label per task (PLE, SPEC §4.1); `label` stays the engaged/click label.

    labels:     (B, K) float 0/1, one column per task (K tasks, in the model's task order)
    label_mask: (B, K) bool, False = this sample does not count for that task
    n_events:   (B,)   the user's history length at the sample (activity; not capped at T)
    """

    labels: torch.Tensor
    label_mask: torch.Tensor
    n_events: torch.Tensor
