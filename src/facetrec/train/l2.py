"""The DIN paper's mini-batch-aware L2 (§4.3.1) on item-id embeddings, for every trainer
(`train.embed_l2`): ranking, multi-task (PLE) and retrieval."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from facetrec.data.dataset import Prepared
from facetrec.train.distributed import is_distributed, owned_distinct_ids


def item_frequencies(prep: Prepared, user: np.ndarray, pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """n_j >= 1 per item: how often item j is a training sample's target (candidate) or in its
    history window (the user's events before `pos`)."""
    n = np.bincount(target, minlength=prep.n_items).astype(np.float64)
    (hist,), _ = prep.windows(user, pos, prep.max_history, (prep.items,))
    n += np.bincount(hist.ravel(), minlength=prep.n_items)[:prep.n_items]
    return np.maximum(n, 1.0)


def inverse_item_frequencies(prep: Prepared, user: np.ndarray, pos: np.ndarray, target: np.ndarray,
                             device: torch.device | str) -> torch.Tensor:
    """1 / n_j (`item_frequencies`) as the float tensor `mini_batch_l2` weighs rows with."""
    return torch.from_numpy(1.0 / item_frequencies(prep, user, pos, target)).float().to(device)


def mini_batch_l2(table: torch.Tensor, ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Σ_j ||w_j||² / n_j over the distinct non-padding ids of a batch (DIN paper, eq. 4): only the
    rows a batch touches are regularised, rare ones more per appearance, so over an epoch every
    row gets about one full L2 step whatever its frequency. Under DDP over the global batch's
    distinct ids, each once (`owned_distinct_ids`)."""
    if ids.is_cuda and not is_distributed():
        return mini_batch_l2_dense(table, ids, inv_freq)
    j, scale = owned_distinct_ids(ids)
    return scale * (table[j].pow(2).sum(1) * inv_freq[j]).sum()


def mini_batch_l2_dense(table: torch.Tensor, ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`mini_batch_l2` in one process without `unique`: an indicator of the touched rows over the
    whole id range. No data-dependent shape, so no host sync (the GPU path; a CUDA graph can
    capture it); a pass over all item rows instead of the touched ones, cheap on a GPU."""
    n = len(inv_freq)
    touched = torch.zeros(n, dtype=table.dtype, device=ids.device).index_fill_(0, ids.reshape(-1), 1.0)
    touched[0].zero_()  # padding (in place: `= 0` copies a host scalar, which CUDA-graph capture refuses)
    return (table[:n].pow(2).sum(1) * (inv_freq * touched)).sum()


def embed_l2_term(table: torch.Tensor, batch: Any, l2: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """`train.embed_l2`'s term for one batch: λ · mini_batch_l2 of the item-id rows of `table`
    (row = item id) over the batch's history and target (candidate) ids — any batch with `hist`
    and `target` (ranking, multi-task, retrieval).

    Sampled negatives (DIEN's auxiliary ones, retrieval's sampled-softmax ones) are left out: they
    are drawn uniformly, so a rare item (large 1 / n_j) would be decayed at every random draw —
    measured on amazon-beauty (DIEN, seed 0, α = 0.1) that over-regularisation turned the
    auxiliary loss from a gain (test AUC 0.8459) into a cost (0.8413; no aux loss 0.8445)."""
    return l2 * mini_batch_l2(table, torch.cat([batch.hist.ravel(), batch.target.ravel()]), inv_freq)
