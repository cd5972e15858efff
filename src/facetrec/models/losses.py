"""Retrieval losses: sampled softmax over the item corpus (SPEC §2.5) and its negative sampler.

Shape legend: B batch, D dim, N sampled negatives.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from facetrec.data.batches import RetrievalBatch


class NegativeSampler:
    """Draws negatives from items 1..n-1 (never padding), uniformly or in proportion to popularity.

    Args:
        item_counts: (n_items,) training counts; index 0 is padding.
        mode: "uniform" | "popularity" (log-Q correction is then applied by the loss).
        seed: the same seed on every rank gives every rank the same negatives at each step.

    Example:
        >>> s = NegativeSampler(np.array([0, 5, 1, 1]), "popularity", seed=0)
        >>> ids, log_q = s.sample(4); bool((ids > 0).all())
        True
    """

    def __init__(self, item_counts: np.ndarray | torch.Tensor, mode: str = "uniform", seed: int = 0) -> None:
        if mode not in ("uniform", "popularity"):
            raise ValueError(f"negatives {mode!r} must be 'uniform' or 'popularity'")
        counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64).clone()
        self.n_items = len(counts)
        if self.n_items < 2:
            raise ValueError("need at least one real item to sample negatives")
        counts[0] = 0
        if mode == "uniform":
            probs = torch.ones_like(counts)
            probs[0] = 0
        else:
            probs = counts.clamp(min=0)
            if probs.sum() <= 0:
                raise ValueError("popularity negatives need item counts > 0")
        probs = probs / probs.sum()
        self.mode = mode
        self.log_q = torch.log(probs.clamp(min=1e-30)).to(torch.float32)  # (n_items,)
        self.cdf = torch.cumsum(probs, 0).to(torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (n,), log Q(ids) (n,))."""
        if self.mode == "uniform":
            ids = torch.randint(1, self.n_items, (n,), generator=self.generator)
        else:
            u = torch.rand(n, generator=self.generator, dtype=torch.float64)
            ids = torch.searchsorted(self.cdf, u, right=True).clamp(1, self.n_items - 1)
        return ids, self.log_q[ids]


def sampled_softmax_loss(user_vec: torch.Tensor, target_vec: torch.Tensor, target_ids: torch.Tensor,
                         neg_vec: torch.Tensor, neg_ids: torch.Tensor, neg_log_q: torch.Tensor | None = None,
                         target_log_q: torch.Tensor | None = None, in_batch: bool = False,
                         temperature: float = 1.0) -> torch.Tensor:
    """Softmax cross-entropy of the target against sampled negatives.

    Args:
        user_vec: (B, D) user vectors (after label-aware attention).
        target_vec: (B, D) target item vectors; target_ids: (B,).
        neg_vec: (N, D) shared sampled negatives; neg_ids: (N,).
        neg_log_q / target_log_q: log sampling probabilities, subtracted from the logits
            (log-Q correction) when given.
        in_batch: also use the other rows' targets as negatives.
        temperature: logits are divided by it (needed with L2-normalised vectors).

    A negative equal to the row's target is masked out, so with every item sampled (uniform,
    no log-Q) this equals the full softmax over the catalogue.
    """
    pos = (user_vec * target_vec).sum(-1, keepdim=True) / temperature  # (B, 1)
    neg = user_vec @ neg_vec.T / temperature  # (B, N)
    if neg_log_q is not None:
        neg = neg - neg_log_q[None, :]
        if target_log_q is not None:
            pos = pos - target_log_q[:, None]
    minus_inf = torch.finfo(neg.dtype).min
    neg = neg.masked_fill(neg_ids[None, :] == target_ids[:, None], minus_inf)
    logits = [pos, neg]
    if in_batch:
        ib = user_vec @ target_vec.T / temperature  # (B, B)
        if target_log_q is not None:
            ib = ib - target_log_q[None, :]
        same = target_ids[None, :] == target_ids[:, None]  # includes the diagonal
        logits.append(ib.masked_fill(same, minus_inf))
    logits = torch.cat(logits, dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def retrieval_loss(model, batch: RetrievalBatch, sampler: NegativeSampler, n_negatives: int,
                   in_batch: bool = False) -> torch.Tensor:
    """MIND / YouTube DNN training loss: interests -> label-aware attention -> sampled softmax."""
    V, valid = model.user_interests(batch.hist, batch.hist_mask, batch.n_events)  # (B, K, D), (B, K)
    target_vec = model.item_vectors(batch.target)  # (B, D)
    user_vec = model.label_aware(V, valid, target_vec)  # (B, D)
    neg_ids, neg_log_q = sampler.sample(n_negatives)
    neg_ids = neg_ids.to(batch.target.device)
    neg_vec = model.item_vectors(neg_ids)  # (N, D)
    correct = sampler.mode == "popularity"
    return sampled_softmax_loss(
        user_vec, target_vec, batch.target, neg_vec, neg_ids,
        neg_log_q=neg_log_q.to(user_vec.device) if correct else None,
        target_log_q=sampler.log_q.to(user_vec.device)[batch.target] if correct else None,
        in_batch=in_batch, temperature=model.cfg.temperature,
    )
