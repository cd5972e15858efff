"""MIND: Multi-Interest Network with Dynamic routing (Li et al., CIKM 2019), SPEC §2.

Shape legend: B batch, L history length, K interests, D embedding dim, N items / negatives,
W attribute slots per item (1 for the id + the widths of every attribute field), P profile dim.

    hist (B, L) --item tower--> c (B, L, D)
         --B2I dynamic routing, R iterations--> capsules u (B, K, D), lengths |u| in (0, 1)
         --(+ profile) MLP--> interests V (B, K, D), valid (B, K)   [K'_u = max(1, min(K, floor(log2 |I_u|)))]
    training: label-aware attention of V on the target e_t -> v_u (B, D) -> sampled softmax (losses.py)
    serving:  each valid interest queries the ANN index; results merged by max (index/ann.py)

YouTube DNN is the same model with K = 1 and a masked mean of the behaviours instead of
routing: `MIND(youtube_dnn(cfg), ...)`.

Speed notes (the hot path is benchmarked, benchmarks/mind_throughput.py):
- routing runs on (B, L, D) with batched matmuls; behaviours are never copied K times;
- ĉ = S c is never materialised: Σ_i w_ij S c_i = S (Σ_i w_ij c_i) and u_j·(S c_i) = (u_j S)·c_i,
  so S multiplies (B, K, D) tensors instead of (B, L, D) ones;
- routing logits are kept as (B, K, L): a softmax over a length-4 trailing axis is ~10x slower
  on CPU than over the middle axis;
- on a GPU nothing in a training step waits on the host (the routing salt is a GPU counter, the
  interest MLP runs on all K slots and masks), so the training loop replays the whole step from a
  CUDA graph (facetrec.train.graphs): ~10x torch-rechub's MIND on one H200 (docs/benchmarks.md, "GPU").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from facetrec.models.layers import MLP


@dataclass(frozen=True)
class MINDConfig:
    """MIND / YouTube DNN hyper-parameters (SPEC §2).

    Example:
        >>> MINDConfig(n_items=1000, n_interests=8).routing_iters
        3
    """

    # keys only training reads (losses, initialisation, memory updates): `evaluate --set` refuses them
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("temperature", "s_init", "warm_start")

    n_items: int  # item vocabulary incl. padding id 0
    dim: int = 64  # D: item, capsule and interest vector size
    n_interests: int = 4  # K: most interests per user
    routing_iters: int = 3  # R: B2I routing iterations
    routing_sigma: float = 1.0  # std of the per-sample initial routing logits b ~ N(0, sigma^2)
    softmax_axis: str = "interests"  # "interests": each behaviour splits its vote; "behaviours": weighted means
    dynamic_k: bool = True  # K'_u = max(1, min(K, floor(log2 |I_u|))); False = all K interests for everyone
    pooling: str = "routing"  # "routing" (MIND) | "mean" (YouTube DNN: masked mean of behaviours, needs K = 1)
    hidden: tuple[int, ...] = (256,)  # ReLU layers from capsule (+ profile) to interest, then a linear map back to D
    attention_p: Union[float, str] = "hard"  # label-aware attention weights softmax(p * s); "hard" = argmax; 0 = mean
    normalize: Union[bool, str] = False  # True: L2-normalise item and interest vectors (then set a temperature < 1); "items": item vectors only, interest lengths stay free
    temperature: float = 1.0  # training logits are divided by this; with normalize, e.g. 0.05
    n_users: int = 0  # > 0: a learned user-id profile embedding (id 0 = unknown) is concatenated to each capsule
    profile_dim: int = 16  # P: size of that profile embedding
    interest_bias: bool = False  # each interest also outputs an offset c_k: score = v_k · e + c_k (vectors carry it as a D+1-th coordinate)
    global_interest: bool = False  # one more interest slot K+1: the whole-history capsule squash(Σ_i S c_i) (K = 1's), valid when K'_u >= 2
    s_init: str = "xavier"  # the bilinear map S starts as xavier-uniform noise | "identity": ĉ_i = c_i, routing starts by clustering the items themselves
    warm_start: str = ""  # training: a run dir or .pt whose matching weights initialise this model (e.g. a YouTube DNN run: same item tower and MLP)

    def __post_init__(self) -> None:
        if self.n_items < 2:
            raise ValueError(f"n_items = {self.n_items}: need padding 0 and at least one real item")
        if self.dim < 1 or self.n_interests < 1 or self.routing_iters < 1:
            raise ValueError("dim, n_interests and routing_iters must all be >= 1")
        if self.softmax_axis not in ("interests", "behaviours"):
            raise ValueError(f"softmax_axis {self.softmax_axis!r} must be 'interests' or 'behaviours'")
        if self.pooling not in ("routing", "mean"):
            raise ValueError(f"pooling {self.pooling!r} must be 'routing' or 'mean'")
        if self.pooling == "mean" and self.n_interests != 1:
            raise ValueError("mean pooling (YouTube DNN) has one interest: set n_interests: 1, or use youtube_dnn(cfg)")
        if self.routing_sigma < 0:
            raise ValueError(f"routing_sigma {self.routing_sigma} must be >= 0")
        p = self.attention_p
        if not (p == "hard" or (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < math.inf)):
            raise ValueError(f"attention_p {p!r} must be a finite number >= 0 or 'hard'")
        if not self.temperature > 0:
            raise ValueError(f"temperature {self.temperature} must be > 0")
        if not (isinstance(self.normalize, bool) or self.normalize == "items"):
            raise ValueError(f"normalize {self.normalize!r} must be true, false or 'items'")
        if self.normalize is True and self.temperature >= 1:
            raise ValueError("normalize=True puts every logit in [-1, 1]; without a temperature the softmax cannot "
                             "separate items (SPEC §2.5). Set temperature to e.g. 0.05.")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes {self.hidden} must all be >= 1")
        if self.global_interest and (self.pooling == "mean" or self.n_interests < 2):
            raise ValueError("global_interest adds the whole-history capsule to K >= 2 routed interests; "
                             "it needs pooling: routing and n_interests >= 2")
        if self.s_init not in ("xavier", "identity"):
            raise ValueError(f"s_init {self.s_init!r} must be 'xavier' or 'identity'")
        if self.n_users < 0 or (self.n_users > 0 and self.profile_dim < 1):
            raise ValueError("n_users must be >= 0 and profile_dim >= 1 when n_users > 0")


def youtube_dnn(cfg: MINDConfig) -> MINDConfig:
    """The YouTube DNN baseline (SPEC §2.7) from a MIND config: one interest, mean pooling.

    Example:
        >>> youtube_dnn(MINDConfig(n_items=10)).n_interests
        1
    """
    return dataclasses.replace(cfg, n_interests=1, pooling="mean")


class Routing(NamedTuple):
    """What B2I routing produced, for training (capsules) and for explanations (weights, lengths)."""

    capsules: torch.Tensor  # (B, K, D) squashed interest capsules; 0 for invalid interests
    weights: torch.Tensor  # (B, L, K) last-iteration routing weights; 0 for padding and invalid interests
    lengths: torch.Tensor  # (B, K) capsule lengths in [0, 1): how present each interest is (no grad)
    valid: torch.Tensor  # (B, K) bool: j < K'_u


def squash(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """MIND eq. 4: scale z to length |z|^2 / (1 + |z|^2), keeping its direction; squash(0) = 0.

    eps keeps the gradient finite at z = 0 (|z| itself has no gradient there).

    Example:
        >>> round(squash(torch.tensor([3.0, 4.0])).norm().item(), 4)  # 25 / 26
        0.9615
    """
    sq = (z * z).sum(-1, keepdim=True)  # (..., 1)
    return z * (sq / (1.0 + sq) * torch.rsqrt(sq + eps))


def interest_count(n_events: torch.Tensor, k: int, dynamic: bool = True) -> torch.Tensor:
    """K'_u = max(1, min(K, floor(log2 |I_u|))) per user: (B,) long.

    Example:
        >>> interest_count(torch.tensor([1, 3, 4, 100]), 4).tolist()
        [1, 1, 2, 4]
    """
    if not dynamic:
        return torch.full_like(n_events, k, dtype=torch.long)
    n = n_events.clamp(min=1).to(torch.float64)  # float64: log2 of a power of two is exact
    return torch.floor(torch.log2(n)).to(torch.long).clamp(min=1, max=k)


# ---------------------------------------------------------------- per-sample routing noise

_MASK32 = 0xFFFFFFFF


def _fmix32(x):
    """A 32-bit integer mixer (murmur3-style finaliser) on ints or int64 tensors holding values in [0, 2^32).

    The multipliers are < 2^31 so every product stays inside int64 (no reliance on overflow).
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def routing_noise(hist: torch.Tensor, k: int, salt: int | torch.Tensor) -> torch.Tensor:
    """N(0, 1) draws (B, K, L) that depend only on the row's own history, the slot and `salt`.

    SPEC §2.2 wants fresh per-sample initial logits. Drawing them from a counter-based hash of
    (the user's history, position, interest, salt) instead of a global RNG makes a user's routing
    independent of who else is in the batch (and of the batch size, the device and the number of
    DDP ranks), while a new salt each training step keeps them random across steps. The normal
    comes from a 23-bit uniform through the inverse CDF (tails cut at ~5.3 sigma).

    Args:
        hist: (B, L) item ids, 0 = padding.
        k: number of interests K.
        salt: any int, or a 0-dim int64 tensor on hist's device; the same salt and history give the same draws.

    Example:
        >>> h = torch.tensor([[3, 5, 0]])
        >>> torch.equal(routing_noise(h, 2, 7)[0], routing_noise(torch.cat([h, h + 1]), 2, 7)[0])
        True
    """
    L = hist.shape[1]
    pos = torch.arange(L, device=hist.device)
    # a row key from this row's real (item, position) pairs only: padding, and so the padded
    # width L, leaves it unchanged
    ids = hist.to(torch.int64)
    pairs = _fmix32((ids & _MASK32) ^ (pos * 0x9E3779B1 & _MASK32)[None, :]) * (ids > 0)  # (B, L)
    row = _fmix32((pairs.sum(1) & _MASK32) ^ _fmix32(salt & _MASK32))  # (B,)
    slot = (pos[None, :] * k + torch.arange(k, device=hist.device)[:, None]) * 0x61C88647 & _MASK32  # (K, L)
    h = _fmix32((row[:, None, None] + slot[None]) & _MASK32)  # (B, K, L) in [0, 2^32)
    return _normal_from_bits(h)


def _normal_from_bits(h: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit hashes -> N(0, 1) float32 through the inverse CDF, always finite.

    23 bits so that every step is exact in float32 and u stays strictly inside (-1, 1)
    (with 24 bits the top value rounds to 1 and erfinv(1) = inf).
    """
    u = ((h >> 9).to(torch.float32) + 0.5) * (2.0 / (1 << 23)) - 1.0
    return torch.erfinv(u) * math.sqrt(2.0)


# ---------------------------------------------------------------- item tower


class _MeanGather(torch.autograd.Function):
    """out[n] = Σ_s weight[n, s] · table[slots[n, s]]: (N, D), where a row's weights are 1/count on its
    real slots and 0 on its padding slots (which point at table row 0).

    The item tower's hot path. Forward is embedding_bag's fused gather + weighted sum (no
    (N, W, D) temporary; its padding_idx option is 4x slower, the zero weights do the same).
    Backward scales the incoming gradient once by 1/count and index_adds it once per slot into
    a dense table gradient — several times faster on CPU than the backward of embedding_bag or
    F.embedding (both sort the indices) — then zeroes the padding row, which so never learns.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slots, weight[:, 0])  # slot 0 is the id: its weight is the row's 1/count
        ctx.n_rows = table.shape[0]
        return F.embedding_bag(slots, table, mode="sum", per_sample_weights=weight.to(table.dtype))  # (N, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slots, inv = ctx.saved_tensors
        g = grad * inv.to(grad.dtype)[:, None]  # (N, D)
        g_table = grad.new_zeros(ctx.n_rows, grad.shape[-1])  # (rows, D)
        for s in range(slots.shape[1]):
            g_table.index_add_(0, slots[:, s], g)
        g_table[0].zero_()  # padding slots all point here (in place: `= 0` would copy a host scalar, refused under CUDA-graph capture)
        return g_table, None, None


class ItemTower(nn.Module):
    """e_i = mean of the item's id embedding and the embeddings of its non-padding attribute values (SPEC §2.1).

    All embeddings live in one table so that one fused lookup serves every field. Row layout:
    row 0 is padding (kept at zero), rows 1..n_items-1 are item ids, then each field's values
    1..vocab-1 follow in sorted field order (`field_row`). `slots` (n_items, W) holds each
    item's table rows (0 = padding) and `slot_weight` (n_items, W) the averaging weights
    1 / #non-padding slots (0 on padding slots and for item 0). Both are non-persistent
    buffers rebuilt from the feature map, so saved weights do not depend on them.

    Args:
        n_items: item vocabulary incl. padding 0.
        dim: D.
        item_features: field -> (n_items, W_f) or (n_items,) long attribute ids, 0 = padding.
        field_vocab: field -> vocabulary size incl. padding.

    Example:
        >>> t = ItemTower(4, 8, {"cate": torch.tensor([0, 1, 1, 2])}, {"cate": 3})
        >>> t(torch.tensor([[1, 0]])).shape
        torch.Size([1, 2, 8])
    """

    def __init__(self, n_items: int, dim: int, item_features: dict[str, torch.Tensor],
                 field_vocab: dict[str, int]) -> None:
        super().__init__()
        self.fields = sorted(item_features)
        self.field_offset: dict[str, int] = {}
        cols = [torch.arange(n_items, dtype=torch.long)[:, None]]  # (n_items, 1): the id slot
        n_rows = n_items
        for f in self.fields:
            if f not in field_vocab:
                raise ValueError(f"item feature {f!r} has no vocabulary size; field_vocab has {sorted(field_vocab)}")
            feats = torch.as_tensor(item_features[f])
            feats = feats[:, None] if feats.dim() == 1 else feats
            if feats.dim() != 2 or feats.shape[0] != n_items:
                raise ValueError(f"item feature {f!r} has shape {tuple(feats.shape)}; expected (n_items={n_items}, W)")
            feats = feats.to(torch.long)
            if feats.numel() and (int(feats.min()) < 0 or int(feats.max()) >= field_vocab[f]):
                raise ValueError(f"item feature {f!r} has values in [{int(feats.min())}, {int(feats.max())}] but its "
                                 f"vocabulary size is {field_vocab[f]}; rebuild the feature map (0 = padding)")
            self.field_offset[f] = n_rows - 1  # value v > 0 lives at row n_rows + v - 1
            cols.append(torch.where(feats > 0, feats + (n_rows - 1), torch.zeros_like(feats)))
            n_rows += field_vocab[f] - 1
        slots = torch.cat(cols, dim=1)  # (n_items, W)
        slots[0] = 0  # the padding item has no attributes, whatever the table says
        real = (slots > 0).to(torch.float32)  # (n_items, W); the padding item has no real slot
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("slot_weight", real / real.sum(1, keepdim=True).clamp(min=1.0), persistent=False)
        self.table = nn.Parameter(torch.randn(n_rows, dim) * 0.05)  # (rows, D)
        with torch.no_grad():
            self.table[0].zero_()

    def id_row(self, item: int) -> int:
        """Table row of an item id's own embedding."""
        return item

    def field_row(self, field: str, value: int) -> int:
        """Table row of a field value's embedding (value > 0)."""
        return self.field_offset[field] + value

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., D); padding ids give a zero vector."""
        flat = ids.reshape(-1)  # (N,)
        slots, weight = self.slots.index_select(0, flat), self.slot_weight.index_select(0, flat)  # (N, W), (N, W)
        e = _MeanGather.apply(self.table, slots, weight)  # (N, D)
        return e.view(*ids.shape, e.shape[-1])


# ---------------------------------------------------------------- the model


def _masked(hist: torch.Tensor, hist_mask: torch.Tensor) -> torch.Tensor:
    """hist with every masked position set to padding id 0: (B, L)."""
    if hist.shape != hist_mask.shape or hist.dim() != 2:
        raise ValueError(f"hist {tuple(hist.shape)} and hist_mask {tuple(hist_mask.shape)} must both be (B, L)")
    return hist * (hist_mask & (hist > 0))


class MIND(nn.Module):
    """Multi-interest user tower + item tower with shared embeddings (SPEC §2).

    Args:
        cfg: MINDConfig (YouTube DNN: `youtube_dnn(cfg)`).
        item_features: field -> (n_items, W) long attribute ids, 0 = padding (row 0 all zeros).
        field_vocab: field -> vocabulary size incl. padding.

    Example:
        >>> cate = torch.randint(1, 4, (10, 1)); cate[0] = 0
        >>> m = MIND(MINDConfig(n_items=10, dim=8), {"cate": cate}, {"cate": 4}).eval()
        >>> hist = torch.randint(1, 10, (2, 5)); mask = torch.ones(2, 5, dtype=torch.bool)
        >>> V, valid = m.user_interests(hist, mask, torch.tensor([5, 16]))
        >>> V.shape, valid.sum(1).tolist()
        (torch.Size([2, 4, 8]), [2, 4])
    """

    def __init__(self, cfg: MINDConfig, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.items = ItemTower(cfg.n_items, D, item_features, field_vocab)
        self.S = nn.Parameter(torch.empty(D, D))  # shared bilinear map: ĉ_i = S c_i
        if cfg.s_init == "identity":
            nn.init.eye_(self.S)
        else:
            nn.init.xavier_uniform_(self.S)
        # mean pooling (YouTube DNN) never uses S: frozen, so DDP does not wait for its gradient (kept in the
        # state dict, so checkpoints and artifacts of either model keep one layout)
        self.S.requires_grad_(cfg.pooling != "mean")
        self.profile = nn.Embedding(cfg.n_users, cfg.profile_dim, padding_idx=0) if cfg.n_users > 0 else None
        in_dim = D + (cfg.profile_dim if self.profile is not None else 0)
        hidden = MLP(in_dim, cfg.hidden, "relu")  # H ReLU layers
        # with interest_bias the last layer also gives each interest its offset c_k (one more output)
        self.mlp = nn.Sequential(hidden, nn.Linear(hidden.out_dim, D + int(cfg.interest_bias)))
        # a plain counter, not a buffer: DDP would broadcast a buffer every step, and the draws
        # only need to differ between steps (every rank counts the same steps)
        self._routing_calls = 0
        # the same counter as a GPU tensor, advanced in place by each training forward on CUDA, so
        # that the replays of a CUDA-graph-captured step draw fresh salts too (train.cuda_graphs)
        self._salt_gpu: torch.Tensor | None = None

    def reseed_routing(self, seed: int) -> None:
        """Restart the training-time routing salts (one per forward pass) from a hash of `seed`.

        Training tasks call it at the start of every epoch with the epoch's seed, so that a run
        resumed from a checkpoint draws the same routing logits as one never interrupted.
        """
        self._routing_calls = _fmix32(seed & _MASK32)
        if self._salt_gpu is not None:
            self._salt_gpu.fill_(self._routing_calls)  # in place: a captured graph holds this tensor

    def _next_salt(self, device: torch.device) -> int | torch.Tensor:
        """The training forward's routing salt: the counter's value, then the counter + 1.
        On CUDA the value is a 0-dim tensor (no host round trip, so the step can be captured)."""
        salt = self._routing_calls
        self._routing_calls += 1
        if device.type != "cuda":
            return salt
        if self._salt_gpu is None or self._salt_gpu.device != device:
            self._salt_gpu = torch.tensor(salt, dtype=torch.int64, device=device)
        out = self._salt_gpu.clone()
        self._salt_gpu.add_(1)
        return out

    # ------------------------------------------------------------ item side

    @property
    def vector_dim(self) -> int:
        """Size of the interest and item vectors the index and the loss see: D, or D + 1 with
        `interest_bias` (interests end with their offset c_k, items with a 1, so v · e adds c_k)."""
        return self.cfg.dim + int(self.cfg.interest_bias)

    def _item_side(self, e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=-1) if self.cfg.normalize else e  # True or "items"
        return F.pad(e, (0, 1), value=1.0) if self.cfg.interest_bias else e

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors for the ANN index and the loss: ids (...) -> (..., vector_dim)."""
        return self._item_side(self.items(ids))

    # ------------------------------------------------------------ user side

    def route(self, hist: torch.Tensor, hist_mask: torch.Tensor, n_events: torch.Tensor | None = None,
              salt: int | None = None) -> Routing:
        """B2I dynamic routing (SPEC §2.2), or the masked mean for YouTube DNN; also the explanation data.

        Args:
            hist: (B, L) item ids, 0 = padding.
            hist_mask: (B, L) bool, True = real behaviour (positions with id 0 count as padding too).
            n_events: (B,) |I_u| for K'_u; None = the number of real behaviours in hist.
            salt: seed of the initial routing logits. None: a fresh salt per call in training mode,
                0 in eval mode (so serving is deterministic per history).

        Returns:
            Routing(capsules (B, K, D), weights (B, L, K), lengths (B, K), valid (B, K)); K + 1 slots with
            `global_interest` (the last is the whole-history capsule).

        Example:
            >>> m = MIND(MINDConfig(n_items=10, dim=8), {}, {}).eval()
            >>> r = m.route(torch.tensor([[1, 2, 0]]), torch.tensor([[True, True, False]]), torch.tensor([4]))
            >>> r.weights[0, 2].tolist(), r.valid.tolist()
            ([0.0, 0.0, 0.0, 0.0], [[True, True, False, False]])
        """
        hist = _masked(hist, hist_mask)  # (B, L)
        return self._route(self.items(hist), hist, n_events, salt)

    def _route(self, c: torch.Tensor, hist: torch.Tensor, n_events: torch.Tensor | None, salt: int | None) -> Routing:
        """Routing from behaviour vectors c (B, L, D) of `hist` (B, L), padding already 0 in both."""
        cfg = self.cfg
        K = cfg.n_interests
        mask = hist > 0  # (B, L)
        if n_events is None:
            n_events = mask.sum(1)
        k_user = interest_count(n_events, K, cfg.dynamic_k)  # (B,)
        valid = torch.arange(K, device=hist.device)[None, :] < k_user[:, None]  # (B, K)
        m = mask.to(c.dtype)[:, None, :]  # (B, 1, L)
        if cfg.pooling == "mean":
            w = m / m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1, L)
            z = torch.bmm(w, c)  # (B, 1, D)
            return Routing(z, w.transpose(1, 2), z.detach().norm(dim=-1), valid)

        if salt is None:
            salt = self._next_salt(hist.device) if self.training else 0
        b = routing_noise(hist, K, salt).to(c.dtype)  # (B, K, L): per sample, never learned
        if cfg.routing_sigma != 1.0:
            b = b * cfg.routing_sigma
        if cfg.softmax_axis == "interests":
            # each behaviour splits its vote among the user's valid interests
            bias = torch.zeros_like(valid, dtype=c.dtype).masked_fill(~valid, -math.inf)[:, :, None]  # (B, K, 1)
            axis = 1
        else:
            # each interest averages the real behaviours; a finite bias keeps empty histories NaN-free
            bias = torch.zeros_like(m).masked_fill(m == 0, torch.finfo(c.dtype).min)  # (B, 1, L)
            axis = 2
        S = self.S
        with torch.no_grad():  # no gradient through b, nor through ĉ before the last iteration
            cd, Sd = c.detach(), S.detach()
            for _ in range(cfg.routing_iters - 1):
                w = torch.softmax(b + bias, dim=axis)  # (B, K, L)
                u = squash(torch.bmm(w, cd) @ Sd.T)  # (B, K, D): z_j = Σ_i w_ij S c_i
                # b_ij += u_j · S c_i (logits accumulate); computed as (B, L, K) so that the big
                # operand c is not transposed (a transposed (B, D, L) copy costs more than the bmm)
                a = (u @ Sd).transpose(1, 2).contiguous()  # (B, D, K); bmm is ~2x slower on the transposed view
                b = b + torch.bmm(cd, a).transpose(1, 2)  # (B, K, L)
            w = torch.softmax(b + bias, dim=axis)  # (B, K, L)
            if cfg.softmax_axis == "behaviours":
                w = w * valid[:, :, None]
        z = torch.bmm(w, c)  # (B, K, D): the last iteration carries the gradient
        if cfg.global_interest:
            # the whole-history capsule: every behaviour's full vote (the sum of the K capsules' z under the
            # interests axis, = K = 1's capsule; the mean under the behaviours axis); a duplicate when K'_u = 1
            g = m if cfg.softmax_axis == "interests" else m / m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1, L)
            w = torch.cat([w, g], dim=1)  # (B, K + 1, L)
            z = torch.cat([z, torch.bmm(g, c)], dim=1)
            valid = torch.cat([valid, (k_user >= 2)[:, None]], dim=1)  # (B, K + 1)
        u = squash(z @ S.T)  # (B, K(+1), D)
        u = u * valid[:, :, None].to(u.dtype)
        weights = (w * m).transpose(1, 2)  # (B, L, K(+1))
        return Routing(u, weights, u.detach().norm(dim=-1), valid)

    def interests_from_capsules(self, capsules: torch.Tensor, valid: torch.Tensor,
                                user: torch.Tensor | None = None) -> torch.Tensor:
        """Capsules (B, K, D) (+ user profile) -> interest vectors V (B, K, vector_dim), SPEC §2.3; invalid
        interests are 0 (with `interest_bias` each ends with its offset c_k).

        The MLP runs on the valid capsules only (users with few events have K'_u < K).
        """
        x = capsules
        if self.profile is not None:
            if user is None:
                raise ValueError("this MIND has a user profile embedding (n_users > 0): pass user ids (0 = unknown)")
            user = torch.where((user >= 0) & (user < self.cfg.n_users), user, torch.zeros_like(user))
            p = self.profile(user)  # (B, P)
            x = torch.cat([x, p[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)  # (B, K, D + P)
        if x.is_cuda:  # all K slots, then zeroed: no data-dependent shape (host sync) on the GPU
            v = self._interest_side(self.mlp(x))  # (B, K, vector_dim)
            return v * valid[:, :, None].to(v.dtype)
        v = self._interest_side(self.mlp(x[valid]))  # (n_valid, vector_dim): on the CPU invalid slots are not computed
        return capsules.new_zeros(*valid.shape, v.shape[-1]).index_put((valid,), v)  # (B, K, vector_dim)

    def _interest_side(self, v: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalize is not True:
            return v
        if not self.cfg.interest_bias:
            return F.normalize(v, dim=-1)
        d, c = v.split([self.cfg.dim, 1], dim=-1)  # normalise the direction only; the offset c_k stays last
        return torch.cat([F.normalize(d, dim=-1), c], dim=-1)

    def user_interests(self, hist: torch.Tensor, hist_mask: torch.Tensor, n_events: torch.Tensor | None = None,
                       user: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Interest vectors V (B, K, vector_dim) and their validity (B, K) bool (j < K'_u) for training and serving.

        Example:
            >>> m = MIND(MINDConfig(n_items=10, dim=8), {}, {})
            >>> V, valid = m.user_interests(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool))
            >>> V.shape, valid.tolist()
            (torch.Size([1, 4, 8]), [[True, False, False, False]])
        """
        r = self.route(hist, hist_mask, n_events)
        return self.interests_from_capsules(r.capsules, r.valid, user), r.valid

    def interests_and_items(self, hist: torch.Tensor, hist_mask: torch.Tensor, n_events: torch.Tensor | None,
                            item_ids: torch.Tensor, user: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`user_interests(...)` and `item_vectors(item_ids)` from one item-tower pass (the training hot path).

        Same values as the two calls; one pass means one dense embedding gradient per step
        instead of two (allocating and summing a table-sized gradient is a visible share of a
        CPU step).

        Args:
            hist, hist_mask, n_events, user: as in `user_interests`.
            item_ids: (N,) items to embed, e.g. targets then sampled negatives.

        Returns:
            V (B, K, D), valid (B, K) bool, item vectors (N, D).

        Example:
            >>> m = MIND(MINDConfig(n_items=10, dim=8), {}, {}).eval()
            >>> h, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)
            >>> V, valid, items = m.interests_and_items(h, mask, None, torch.tensor([4, 5]))
            >>> torch.allclose(V, m.user_interests(h, mask)[0])
            True
            >>> torch.allclose(items, m.item_vectors(torch.tensor([4, 5])))
            True
        """
        hist = _masked(hist, hist_mask)  # (B, L)
        B, L = hist.shape
        ids = torch.cat([hist.reshape(-1), item_ids.reshape(-1)])  # (B * L + N,)
        # split, not two slices: its backward builds one gradient buffer instead of two
        c, items = self.items(ids).split([B * L, len(ids) - B * L])  # (B * L, D), (N, D)
        r = self._route(c.view(B, L, -1), hist, n_events, None)
        return self.interests_from_capsules(r.capsules, r.valid, user), r.valid, self._item_side(items)

    def label_aware(self, V: torch.Tensor, valid: torch.Tensor, target_vec: torch.Tensor) -> torch.Tensor:
        """Label-aware attention (SPEC §2.4, training only): one user vector per target, (B, D).

        Scores s_j = V_j · e_t; weights softmax(p * s) over the valid interests. p = 0 is the mean of
        the valid interests; p = "hard" takes the best-matching valid interest (gradient reaches it only).

        Args:
            V: (B, K, D) interests; valid: (B, K) bool; target_vec: (B, D) target item vectors.

        Example:
            >>> m = MIND(MINDConfig(n_items=10, dim=2), {}, {})
            >>> V = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
            >>> m.label_aware(V, torch.tensor([[True, True]]), torch.tensor([[0.0, 2.0]])).tolist()
            [[0.0, 1.0]]
        """
        if self.cfg.attention_p == "hard":
            with torch.no_grad():
                s = torch.bmm(V, target_vec[:, :, None]).squeeze(-1)  # (B, K)
                best = s.masked_fill(~valid, -math.inf).argmax(-1)  # (B,)
            return V.gather(1, best[:, None, None].expand(-1, 1, V.shape[-1])).squeeze(1)  # (B, D)
        s = torch.bmm(V, target_vec[:, :, None]).squeeze(-1)  # (B, K)
        w = torch.softmax((float(self.cfg.attention_p) * s).masked_fill(~valid, -math.inf), dim=-1)  # (B, K)
        return torch.bmm(w[:, None, :], V).squeeze(1)  # (B, D)
