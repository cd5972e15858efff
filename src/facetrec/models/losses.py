"""Retrieval losses: sampled softmax over the item corpus (SPEC §2.5) and its negative sampler.

Shape legend: B batch, D dim, N sampled negatives, K interests, L history length.

    batch --MIND.user_interests--> V (B, K, D), valid (B, K)
          --label_aware(e_target)--> v_u (B, D)
          --sampled softmax: v_u·e_target vs v_u·e_neg (N shared negatives [+ B-1 in-batch])--> loss ()
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from facetrec.data.batches import RetrievalBatch
from facetrec.models.mind import MIND


NEGATIVE_MODES = ("uniform", "popularity", "all")


class NegativeSampler:
    """Draws negatives from items 1..n_items-1 (never padding), uniformly or in proportion to popularity,
    or gives every item once ("all": the sampled softmax becomes the full softmax over the catalogue).

    `log_q[i]` is log Q(i) of the proposal (for the log-Q correction); `log_freq[i]` is the log of
    the item's share of the training counts, the proposal of in-batch negatives (other rows'
    targets). For an item with count 0 both are floored at the rarest item's value, so a
    correction never becomes infinite; such items are never drawn in popularity mode.

    Args:
        item_counts: (n_items,) training event counts per item; index 0 is padding.
        mode: "uniform" | "popularity" | "all" (`sample` ignores n and returns items 1..n_items-1).
        seed: the same seed on every rank gives every rank the same negatives at each step.

    Example:
        >>> s = NegativeSampler(np.array([0, 5, 1, 1]), "popularity", seed=0)
        >>> ids, log_q = s.sample(4); bool((ids > 0).all())
        True
    """

    def __init__(self, item_counts: np.ndarray | torch.Tensor, mode: str = "uniform", seed: int = 0) -> None:
        if mode not in NEGATIVE_MODES:
            raise ValueError(f"negative sampling mode {mode!r} must be one of {', '.join(NEGATIVE_MODES)}")
        counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64).clone().clamp(min=0)  # (n_items,)
        self.n_items = len(counts)
        if counts.dim() != 1 or self.n_items < 2:
            raise ValueError(f"item_counts must be a vector over the vocabulary incl. padding 0 (got shape "
                             f"{tuple(counts.shape)}); it needs at least one real item")
        counts[0] = 0
        self.mode = mode
        if counts.sum() > 0:
            freq = counts / counts.sum()
        else:
            freq = torch.ones_like(counts)
            freq[0] = 0
            freq /= freq.sum()
        if mode != "popularity":  # uniform, and "all" (every item once: a constant log Q, which cancels)
            probs = torch.full_like(counts, 1.0 / (self.n_items - 1))
            probs[0] = 0
        else:
            if counts.sum() <= 0:
                raise ValueError("popularity negatives need item counts > 0; use mode='uniform'")
            probs = freq
        self.log_q = _floored_log(probs)  # (n_items,) float32
        self.log_freq = _floored_log(freq)  # (n_items,) float32
        self._cdf = torch.cumsum(probs, 0)  # (n_items,) float64
        self._cdf[-1] = 1.0
        self.generator = torch.Generator().manual_seed(seed)
        self._cached: tuple[torch.device, _LogQ] | None = None

    def on(self, device: torch.device | str) -> "_LogQ":
        """`log_q` and `log_freq` on `device`, copied once and kept (no host copy per step)."""
        device = torch.device(device)
        if device.type == "cpu":
            return _LogQ(self.log_q, self.log_freq)
        if self._cached is None or self._cached[0] != device:
            self._cached = (device, _LogQ(self.log_q.to(device), self.log_freq.to(device)))
        return self._cached[1]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n ids drawn with replacement (n,) long, and their log Q (n,) float32, on the CPU; in mode
        "all" every real item once, in id order."""
        if self.mode == "all":
            ids = torch.arange(1, self.n_items)
        elif self.mode == "uniform":
            ids = torch.randint(1, self.n_items, (n,), generator=self.generator)
        else:
            u = torch.rand(n, generator=self.generator, dtype=torch.float64)
            ids = torch.searchsorted(self._cdf, u, right=True).clamp_(1, self.n_items - 1)
        return ids, self.log_q[ids]


class _LogQ(NamedTuple):
    log_q: torch.Tensor
    log_freq: torch.Tensor


def _floored_log(p: torch.Tensor) -> torch.Tensor:
    floor = p[p > 0].min()
    return torch.log(torch.where(p > 0, p, floor)).to(torch.float32)


NEGATIVE_SCORES = ("readout", "max")  # retrieval_loss's ways to score a negative


class BestInterestScores:
    """max_k V_k · c over each user's valid interests, for a set of columns c (`negative_scores: max`).

    On the CPU the users are grouped by their number of valid interests and each group's valid
    slots alone are multiplied: with K = 4 and most users at K'_u = 2 (amazon-beauty) that halves
    the product, the largest one of MIND's step under this loss. On a GPU (where the product is
    cheap and a CUDA-graph-captured step cannot branch on data) all K slots are multiplied and the
    invalid ones masked. Both give the same values and gradients (`tests/models/test_losses.py`).

    Args:
        V: (B, K, D) interests.
        valid: (B, K) bool, at least one True per row (a row without any scores -inf).
        grouped: True / False force either way; None = grouped on the CPU (`cpu_grouped`), dense on a GPU.
    """

    cpu_grouped = True  # the default on the CPU (benchmarks/max_scores_speed.py times both ways)

    def __init__(self, V: torch.Tensor, valid: torch.Tensor, grouped: bool | None = None) -> None:
        self.V, self.valid = V, valid
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (rows, their valid slots) per count
        if grouped is None:
            grouped = self.cpu_grouped and not V.is_cuda
        if grouped:
            n = valid.sum(1)
            slots = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # (B, K): valid slots first
            self.groups = []
            for c in torch.unique(n).tolist():
                if c > 0:
                    rows = (n == c).nonzero().squeeze(1)
                    self.groups.append((rows, slots[rows, :c]))
            self.rows = torch.cat([r for r, _ in self.groups]) if self.groups else n.new_zeros(0)

    def __call__(self, cols: torch.Tensor) -> torch.Tensor:
        """(M, D) -> (B, M)."""
        if self.groups is None:
            s = torch.matmul(self.V, cols.T)  # (B, K, M)
            return s.masked_fill(~self.valid[:, :, None], -math.inf).amax(1)
        parts = [torch.matmul(self.V[rows[:, None], slots], cols.T).amax(1)  # (n_c, c, D) -> (n_c, M)
                 for rows, slots in self.groups]
        out = self.V.new_full((len(self.V), len(cols)), -math.inf)
        return out.index_copy(0, self.rows, torch.cat(parts)) if parts else out


def sampled_softmax_loss(user_vec: torch.Tensor, target_vec: torch.Tensor, target_ids: torch.Tensor,
                         neg_vec: torch.Tensor, neg_ids: torch.Tensor, neg_log_q: torch.Tensor | None = None,
                         target_log_q: torch.Tensor | None = None, in_batch: bool = False,
                         temperature: float = 1.0, batch_vec: torch.Tensor | None = None,
                         batch_ids: torch.Tensor | None = None, batch_log_q: torch.Tensor | None = None,
                         neg_interests: tuple[torch.Tensor, torch.Tensor] | None = None,
                         hard_negatives: float = 0.0) -> torch.Tensor:
    """Mean softmax cross-entropy of each row's target against shared sampled negatives.

    Logits are dot products divided by `temperature`; the log-Q correction then subtracts log Q of
    each candidate (target_log_q from the positive and from the in-batch columns, neg_log_q from
    the sampled columns). A negative equal to the row's target gets logit -inf, so with every item
    sampled once (uniform, no log-Q) this is exactly the full softmax over the catalogue.

    Args:
        user_vec: (B, D) user vectors (after label-aware attention).
        target_vec: (B, D) target item vectors.
        target_ids: (B,) target item ids.
        neg_vec: (N, D) sampled negative vectors, shared by the batch.
        neg_ids: (N,) their ids.
        neg_log_q: (N,) log Q of the negatives, or None for no correction.
        target_log_q: (B,) log Q of the targets, or None.
        in_batch: also use the other rows' targets as negatives (equal ids masked).
        temperature: > 0; needed (e.g. 0.05) when vectors are L2-normalised.
        batch_vec, batch_ids, batch_log_q: the in-batch columns when they are not this batch's own
            targets: the global batch's under several processes (`all_gather_rows`); their log Q
            (None = no correction). Default: target_vec, target_ids, target_log_q.
        neg_interests: (V (B, K, D), valid (B, K)): score every negative (sampled and in-batch) by
            its best valid interest, max_k V_k · e_n, as serving's merge does, instead of by
            user_vec; None = by user_vec (SPEC §2.5).
        hard_negatives: β >= 0 of hardness-weighted negatives (REMI's interest-aware hard negatives,
            Xie et al. 2023): the negatives' sum in the softmax's denominator is estimated under a
            proposal ∝ exp(β · logit) instead of the drawn one, i.e. negative n is weighted by
            w_n = M exp(β s_n) / Σ_m exp(β s_m) over the row's M negative columns (weights not
            differentiated). 0 = off: the plain sampled softmax.

    Example:
        >>> u = torch.tensor([[1.0, 0.0]]); items = torch.eye(2)
        >>> loss = sampled_softmax_loss(u, items[:1], torch.tensor([1]), items[1:], torch.tensor([2]))
        >>> round(loss.item(), 4)  # -log(e / (e + 1))
        0.3133
    """
    if not temperature > 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    if not hard_negatives >= 0:
        raise ValueError(f"hard_negatives {hard_negatives} must be >= 0 (0 = off)")
    inv_t = 1.0 / temperature
    pos = (user_vec * target_vec).sum(-1, keepdim=True) * inv_t  # (B, 1)

    best = None if neg_interests is None else BestInterestScores(*neg_interests)

    def scores(cols: torch.Tensor) -> torch.Tensor:  # (M, D) -> (B, M) logits before log-Q
        if best is None:
            return (user_vec @ cols.T) * inv_t
        return best(cols) * inv_t

    neg = scores(neg_vec)  # (B, N)
    if target_log_q is not None:
        pos = pos - target_log_q[:, None]
    if neg_log_q is not None:
        neg = neg - neg_log_q[None, :]
    neg = neg.masked_fill(neg_ids[None, :] == target_ids[:, None], -math.inf)
    logits = [pos, neg]
    if in_batch:
        if batch_vec is None:
            batch_vec, batch_ids, batch_log_q = target_vec, target_ids, target_log_q
        ib = scores(batch_vec)  # (B, B'): column k is the batch's k-th target
        if batch_log_q is not None:
            ib = ib - batch_log_q[None, :]
        logits.append(ib.masked_fill(batch_ids[None, :] == target_ids[:, None], -math.inf))  # incl. the row's own
    all_logits = torch.cat(logits, dim=1)  # (B, 1 + N [+ B])
    if hard_negatives > 0:
        negs = all_logits[:, 1:]
        with torch.no_grad():  # log w_n = β s_n − log(Σ_m exp(β s_m) / M), masked columns keep −inf
            h = negs * hard_negatives
            m = torch.isfinite(negs).sum(1, keepdim=True).clamp(min=1)
            log_w = h - (torch.logsumexp(h, dim=1, keepdim=True) - torch.log(m.to(h.dtype)))
        all_logits = torch.cat([all_logits[:, :1], negs + log_w], dim=1)
    return F.cross_entropy(all_logits, torch.zeros(len(all_logits), dtype=torch.long, device=all_logits.device))


def interest_similarity(V: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine of each user's valid interests, averaged over the users with two or more
    (the `mean_pairwise_cosine` the evaluation reports); 0 when no user has two. The penalty of
    `train.interest_diversity`.

    Example:
        >>> V = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
        >>> float(interest_similarity(V, torch.tensor([[True, True, False]])))
        0.0
    """
    v = F.normalize(V, dim=-1)
    cos = v @ v.transpose(1, 2)  # (B, K, K)
    eye = torch.eye(V.shape[1], dtype=torch.bool, device=V.device)
    pair = valid[:, :, None] & valid[:, None, :] & ~eye  # (B, K, K)
    n_pairs = pair.sum((1, 2))  # (B,)
    multi = n_pairs > 0
    per_user = (cos * pair).sum((1, 2)) / n_pairs.clamp(min=1)
    return (per_user * multi).sum() / multi.sum().clamp(min=1)


def retrieval_loss(model: MIND, batch: RetrievalBatch, sampler: NegativeSampler, n_neg: int,
                   in_batch: bool = False, log_q: bool = True,
                   negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                   gather: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                   negative_scores: str = "readout", hard_negatives: float = 0.0,
                   diversity: float = 0.0) -> torch.Tensor:
    """MIND / YouTube DNN training loss: interests -> label-aware attention -> sampled softmax (SPEC §2.4-2.5).

    Args:
        model: a MIND (or YouTube DNN) model.
        batch: RetrievalBatch.
        sampler: NegativeSampler; draws `n_neg` negatives shared by the batch.
        n_neg: number of sampled negatives N (a sampler in mode "all" gives every item instead).
        in_batch: also use the other rows' targets as negatives.
        log_q: apply the log-Q correction where the proposal is not uniform: popularity
            negatives (log Q = sampler.log_q) and in-batch negatives (log Q = sampler.log_freq).
            Uniform negatives alone need none (a constant shift).
        negatives: (ids (n_neg,), log Q (n_neg,)) drawn beforehand by `sampler.sample(n_neg)` and
            already on the batch's device, instead of drawing them here (a CUDA-graph-captured step
            must not copy from host memory; `train.cuda_graphs`).
        gather: with in_batch under several processes, (target vectors, ids) -> the global batch's
            (`facetrec.train.distributed.all_gather_rows`); None = this batch's own.
        negative_scores: "readout" scores the negatives with the label-aware readout (SPEC §2.5);
            "max" with each user's best valid interest, the score serving's merge ranks them by
            (a negative that any interest ranks high is pushed down; the same for K = 1).
        hard_negatives: β of hardness-weighted negatives (`sampled_softmax_loss`); 0 = off.
        diversity: λ of a penalty on the mean pairwise cosine of each user's valid interests
            (`interest_similarity`): λ > 0 pushes a user's interests apart; 0 = off (SPEC).

    Example:
        >>> from facetrec.models.mind import MINDConfig
        >>> m = MIND(MINDConfig(n_items=10, dim=8), {}, {})
        >>> hist = torch.tensor([[1, 2], [3, 0]])
        >>> b = RetrievalBatch(torch.arange(2), hist, hist > 0, torch.tensor([4, 5]), torch.tensor([2, 1]))
        >>> retrieval_loss(m, b, NegativeSampler(np.ones(10)), 5).shape
        torch.Size([])
    """
    if negative_scores not in NEGATIVE_SCORES:
        raise ValueError(f"negative_scores {negative_scores!r}: expected one of {NEGATIVE_SCORES}")
    user = batch.user if model.cfg.n_users > 0 else None
    neg_ids, neg_log_q = sampler.sample(n_neg) if negatives is None else negatives
    device = batch.target.device
    neg_ids = neg_ids.to(device)
    n_neg = len(neg_ids)  # = n_neg, or the whole catalogue for a sampler in mode "all"
    B = len(batch.target)
    ids = torch.cat([batch.target, neg_ids])  # (B + N,)
    # (B, K, D), (B, K), (B + N, D) from one item-tower pass
    V, valid, vecs = model.interests_and_items(batch.hist, batch.hist_mask, batch.n_events, ids, user)
    target_vec, neg_vec = vecs.split([B, n_neg])  # (B, D), (N, D)
    user_vec = model.label_aware(V, valid, target_vec)  # (B, D)
    # log Q of the targets (and in-batch columns): the proposal's for popularity negatives; for in-batch
    # negatives with uniform ones, the data's (the uniform sampled columns share one constant log Q)
    table = None
    if log_q and sampler.mode == "popularity":
        table = sampler.on(device).log_q
    elif log_q and in_batch:
        table = sampler.on(device).log_freq
    neg_log_q = None if table is None else neg_log_q.to(device)
    target_log_q = None if table is None else table[batch.target]
    batch_vec = batch_ids = batch_log_q = None
    if in_batch and gather is not None:
        batch_vec, batch_ids = gather(target_vec, batch.target)
        batch_log_q = None if table is None else table[batch_ids]
    loss = sampled_softmax_loss(user_vec, target_vec, batch.target, neg_vec, neg_ids, neg_log_q=neg_log_q,
                                target_log_q=target_log_q, in_batch=in_batch, temperature=model.cfg.temperature,
                                batch_vec=batch_vec, batch_ids=batch_ids, batch_log_q=batch_log_q,
                                neg_interests=(V, valid) if negative_scores == "max" else None,
                                hard_negatives=hard_negatives)
    if diversity:
        # the interests' directions only: an offset coordinate (model.interest_bias) is not one
        loss = loss + diversity * interest_similarity(V[..., :model.cfg.dim], valid)
    return loss
