"""DIEN: Deep Interest Evolution Network (Zhou et al., AAAI 2019), SPEC §3, with DIN (Zhou et al.,
KDD 2018) and the embedding + MLP base model as baselines in the same code.

Shape legend: B batch, T history length, P real (non-padding) history positions in a batch,
D item embedding width D_b (id ⊕ category), H extractor GRU width, H' evolving GRU width,
N candidates, U user embedding width.

    hist (B, T) -> e_b (B, T, D) --GRU--> h (B, T, H)             interest extractor (+ auxiliary loss, §3.2)
    target (B,) -> e_a (B, D);  a_t = softmax_t(h_t W e_a)         attention over the real steps (§3.3)
    h, a --AUGRU | AGRU | AIGRU--> h'_T (B, H')                    interest evolving (§3.3)
    [h'_T, e_a, h'_T ∘ e_a, Σ_t e_b, user] --MLP (200, 80)--> logit  (§3.4)

Speed (the time loops are the hot path, SPEC §3.3 / §7; benchmarks/ranking_speed.py):
- Histories are *packed*: rows sorted by length, real positions laid out step by step
  (`(P, ·)`, the `PackedSequence` layout). Embeddings, input-side gate projections (one matmul
  for all steps and all 3 gates), attention scores and the auxiliary loss touch the P real
  positions only, and step t of a loop multiplies only the rows still running. Padding is never
  computed, so it cannot leak, and a row's state after its last step is its output.
- Each loop step is one (rows, H) x (H, 3H) matmul plus a few elementwise ops. The backward
  pass is written by hand (`_GatedScan`): BPTT with one matmul per step for the state gradient
  and one for the weight gradient, instead of autograd replaying ~20 recorded ops per step.
- The loops are TorchScript functions (`_scan_forward`, `_scan_backward`, `_evolve_candidates`):
  measured on the 2-core CPU at B = 256, T = 50, H = 128, scripting the loops beats running
  them eagerly, and torch.compile recompiles for every new length profile of a batch.
- Serving (`DIEN.score_candidates`): the extractor runs once per request; the evolving GRU's
  input projection is shared by all N candidates and the loop runs batched over them.
- On a GPU (`layout` auto -> "padded"): every row runs all T steps, a padding step keeps the state
  (a = 0), so shapes are fixed and nothing waits on the host, and the training loop replays the
  whole step from a CUDA graph (`facetrec.train.graphs`; under capture the plain Python loops are
  recorded). Same values as the packed layout (tests/models/test_gpu_paths.py); on one H200 the
  graphed step trains 21-38x faster than the peers' DIEN (docs/benchmarks.md, "GPU").

The plain step-by-step versions (`reference_extract`, `reference_evolve`) are the SPEC's
formulas written out with masks; the tests hold the fast paths to them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from facetrec.data.batches import RankingBatch
from facetrec.models.layers import MLP

EVOLUTIONS = ("augru", "agru", "aigru")


@dataclass(frozen=True)
class DIENConfig:
    """Hyper-parameters of DIEN and of its DIN / base-model baselines (SPEC §3).

    Item attribute vocabularies are not part of the config: they come with the item feature
    tables (`field_vocab`) from the feature map, so one config fits any catalogue.

    Example:
        >>> DIENConfig(n_items=1000).evolution
        'augru'
    """

    # keys only training reads (losses, initialisation, memory updates): `evaluate --set` refuses them
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("aux_alpha", "aux_detach", "aux_shared_negatives", "aux_horizon")

    n_items: int  # item vocabulary incl. padding id 0
    embed_dim: int = 32  # per field: the item embedding is E_id[i] ⊕ E_cat[c(i)], so D = 2 * embed_dim
    category_field: str = ""  # item field used as the category (its first value); "" = "cate" if present, else the first field; none -> id only (D = embed_dim)
    item_fields: tuple[str, ...] = ()  # further item fields (e.g. "attrs": brand + category path), each E_f averaged over the item's values, appended to e_i (D grows by embed_dim each)
    hidden: int = 0  # H, interest extractor GRU width; 0 = D. The aux loss's h_t · e_b needs H = D, else a learned linear map H -> D is used
    evolve_hidden: int = 0  # H', interest evolving GRU width; 0 = H. Narrower serves faster; h'_T ∘ e_a then uses a learned map of e_a to H'
    evolution: str = "augru"  # augru | agru | aigru (SPEC §3.3)
    aux_alpha: float = 1.0  # weight α of the auxiliary loss (SPEC §3.2); 0 disables it (the "no aux" ablation)
    mlp: tuple[int, ...] = (200, 80)  # output MLP hidden sizes, then a linear layer to the logit
    activation: str = "dice"  # dice | prelu, in the output MLP and DIN's attention MLP
    attention_mlp: tuple[int, ...] = (80, 40)  # DIN only: the attention unit's hidden sizes
    n_users: int = 0  # > 0: a user-id embedding (embed_dim wide) enters the output MLP; ids >= n_users count as unknown (0)
    attention: str = "bilinear"  # DIEN: a_t ∝ exp(h_t · W e_a) (paper) | "mlp": DIN's unit over [q, h_t, q − h_t, q ∘ h_t], q = W e_a (official TF code)
    attention_pooling: bool = False  # DIEN: Σ a_t e_b and its product with e_a also enter the output MLP (DIN's view, with DIEN's attention)
    aux_net: str = "dot"  # DIEN auxiliary scorer: "dot" = h_t · e (paper, SPEC §3.2) | "mlp" = MLP (100, 50, sigmoid) over [h_t, e] (official TF code)
    aux_detach: bool = False  # DIEN: the auxiliary loss trains the extractor GRU only (e_b[t+1], ê_b[t+1] enter it as constants)
    aux_shared_negatives: int = 0  # DIEN: 0 = SPEC §3.2's binary loss (one negative per step); n > 0 = a sampled softmax of h_t · e_b[t+1] against the auxiliary negatives of the batch's first n rows' second event (shared by every step)
    aux_horizon: int = 1  # DIEN: h_t scores each of the next n real behaviours e_b[t+k], k = 1..n, against the negative drawn for step t+k (1 = SPEC §3.2); one mean over all pairs
    pooled_product: bool = True  # DIEN: Σ e_b ∘ e_a also enters the output MLP (as in the official TF code; the base model's feature)

    def __post_init__(self) -> None:
        if self.n_items < 2:
            raise ValueError(f"n_items = {self.n_items}: need padding 0 and at least one real item")
        if self.embed_dim < 1 or self.hidden < 0 or self.evolve_hidden < 0 or self.n_users < 0:
            raise ValueError("embed_dim must be >= 1; hidden, evolve_hidden and n_users >= 0 (0 = default / off)")
        if self.aux_net not in ("dot", "mlp"):
            raise ValueError(f"aux_net {self.aux_net!r} must be 'dot' (paper) or 'mlp' (official code)")
        if self.attention not in ("bilinear", "mlp"):
            raise ValueError(f"attention {self.attention!r} must be 'bilinear' or 'mlp'")
        if self.evolution not in EVOLUTIONS:
            raise ValueError(f"evolution {self.evolution!r} must be one of {', '.join(EVOLUTIONS)}")
        if self.activation not in ("dice", "prelu"):
            raise ValueError(f"activation {self.activation!r} must be 'dice' or 'prelu'")
        if not self.aux_alpha >= 0:
            raise ValueError(f"aux_alpha {self.aux_alpha} must be >= 0 (0 switches the auxiliary loss off)")
        if self.aux_shared_negatives < 0 or (self.aux_shared_negatives > 0 and self.aux_net != "dot"):
            raise ValueError(f"aux_shared_negatives {self.aux_shared_negatives} must be >= 0, and > 0 needs aux_net: dot "
                             "(the softmax scores every state against every shared negative by inner product)")
        if self.aux_horizon < 1 or (self.aux_horizon > 1 and self.aux_shared_negatives > 0):
            raise ValueError(f"aux_horizon {self.aux_horizon} must be >= 1 (1 = SPEC §3.2's next step), and > 1 needs "
                             "aux_shared_negatives: 0 (the binary loss)")


# ---------------------------------------------------------------- item and user embeddings


def _category_field(cfg: DIENConfig, item_features: dict[str, torch.Tensor]) -> Optional[str]:
    if cfg.category_field:
        if cfg.category_field not in item_features:
            raise ValueError(f"category_field {cfg.category_field!r} is not an item field; have {sorted(item_features)} "
                             "(set category_field: '' to pick one automatically)")
        return cfg.category_field
    if "cate" in item_features:
        return "cate"
    return sorted(item_features)[0] if item_features else None


class ItemEmbedding(nn.Module):
    """Item vectors e_i = E_id[i] ⊕ E_cat[c(i)] (SPEC §3.1), shared by DIEN, DIN and the base model.

    The category of each item is looked up in a buffer table, the first value of the
    category field (an item with several categories uses its first one). Without any item
    field the vector is E_id[i] alone. Padding id 0 and an item without category give zeros
    in the respective half. Each field named in `cfg.item_fields` (multi-valued, e.g. brand +
    category path) adds mean_v E_f[v] over the item's non-zero values (zeros if it has none).

    Args:
        cfg: the model config (n_items, embed_dim, category_field).
        item_features: field -> (n_items, W) int ids, 0-padded.
        field_vocab: field -> vocabulary size incl. padding 0.

    Example:
        >>> emb = ItemEmbedding(DIENConfig(n_items=10, embed_dim=4), {"cate": torch.randint(1, 3, (10, 1))}, {"cate": 3})
        >>> emb(torch.tensor([[1, 2, 0]])).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, cfg: DIENConfig, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> None:
        super().__init__()
        self.id_emb = nn.Embedding(cfg.n_items, cfg.embed_dim, padding_idx=0)
        self.field = _category_field(cfg, item_features)
        self.cate_emb: Optional[nn.Embedding] = None
        if self.field is not None:
            cate = item_features[self.field]
            cate = (cate[:, 0] if cate.dim() == 2 else cate).to(torch.long)  # (n_items,)
            if cate.shape[0] != cfg.n_items:
                raise ValueError(f"item field {self.field!r} has {cate.shape[0]} rows; n_items is {cfg.n_items}")
            if self.field not in field_vocab:
                raise ValueError(f"field_vocab has no size for item field {self.field!r}; have {sorted(field_vocab)}")
            self.register_buffer("cate", cate, persistent=False)
            self.cate_emb = nn.Embedding(field_vocab[self.field], cfg.embed_dim, padding_idx=0)
        self.extra = nn.ModuleList()
        for k, field in enumerate(cfg.item_fields):
            if field not in item_features or field not in field_vocab:
                raise ValueError(f"model.item_fields names {field!r}, which is not an item field; have {sorted(item_features)}")
            vals = item_features[field].to(torch.long)
            vals = vals[:, None] if vals.dim() == 1 else vals
            if vals.shape[0] != cfg.n_items:
                raise ValueError(f"item field {field!r} has {vals.shape[0]} rows; n_items is {cfg.n_items}")
            n = (vals > 0).sum(1, keepdim=True).clamp(min=1).to(torch.float32)
            self.register_buffer(f"field{k}", vals, persistent=False)
            self.register_buffer(f"field{k}_w", (vals > 0).to(torch.float32) / n, persistent=False)  # mean over the values
            self.extra.append(nn.Embedding(field_vocab[field], cfg.embed_dim, padding_idx=0))
        self.dim = cfg.embed_dim * (1 + (self.cate_emb is not None) + len(self.extra))
        for emb in (self.id_emb, self.cate_emb, *self.extra):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.05)  # small: h_t · e_b of the aux loss starts near 0
                with torch.no_grad():
                    emb.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., D)."""
        ids = ids.long()
        e = self.id_emb(ids)
        parts = [e]
        if self.cate_emb is not None:
            parts.append(self.cate_emb(self.cate[ids]))
        for k, emb in enumerate(self.extra):
            vals, w = getattr(self, f"field{k}")[ids], getattr(self, f"field{k}_w")[ids]  # (..., W)
            parts.append((emb(vals) * w.unsqueeze(-1)).sum(-2))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else e


def _user_embedding(cfg: DIENConfig) -> Optional[nn.Embedding]:
    return nn.Embedding(cfg.n_users, cfg.embed_dim, padding_idx=0) if cfg.n_users > 0 else None


def _user_vectors(emb: Optional[nn.Embedding], user: torch.Tensor) -> List[torch.Tensor]:
    """[] without a user embedding, else [(B, U)]; users unseen in training (id >= n_users) -> 0."""
    if emb is None:
        return []
    user = user.long()
    return [emb(torch.where(user < emb.num_embeddings, user, torch.zeros_like(user)))]


def _output_mlp(cfg: DIENConfig, in_dim: int) -> nn.Sequential:
    """MLP (200, 80; Dice or PReLU) -> linear -> logit (SPEC §3.4)."""
    mlp = MLP(in_dim, cfg.mlp, cfg.activation)
    return nn.Sequential(mlp, nn.Linear(mlp.out_dim, 1))


# ---------------------------------------------------------------- packing
#
# A batch of left-aligned histories is laid out like torch's PackedSequence: rows sorted by
# length (longest first), then the real positions step by step, so step t's rows are the
# prefix `batch_sizes[t]` of the running rows and occupy one contiguous block of P.


class Packed(NamedTuple):
    """Real history positions of a batch, step-major (see the layout note above)."""

    order: torch.Tensor  # (B,) row of the batch at each sorted position (longest history first)
    mask: torch.Tensor  # (T, B) bool, sorted rows, time-major; T = the batch's longest history (>= 1)
    batch_sizes: List[int]  # (T,) rows still running at each step
    row: torch.Tensor  # (P,) sorted row of each packed position
    final_rows: torch.Tensor  # (B,) row of each sorted row's last state in a scan's S (B + P, H) (see gated_scan)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """Packed view of a (B, T_in, ...) input: (P, ...) in step-major order."""
        T = self.mask.shape[0]
        return x[self.order, :T].transpose(0, 1)[self.mask]

    def pairs(self, horizon: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Packed indices (t, t + k) of every position t and k = 1..horizon whose step t + k is real too:
        (M,), (M,), k = 1's pairs first, then k = 2's, ..."""
        T, B = self.mask.shape
        pos = torch.full((T, B), -1, dtype=torch.long, device=self.mask.device)
        pos[self.mask] = torch.arange(len(self.row), device=self.mask.device)
        src, dst = [], []
        for k in range(1, min(horizon, T - 1) + 1):
            nxt = self.mask[k:]  # (T-k, B): t + k real implies t real (left-aligned)
            src.append(pos[:-k][nxt])
            dst.append(pos[k:][nxt])
        if not src:
            empty = pos.new_empty(0)
            return empty, empty
        return torch.cat(src), torch.cat(dst)


def lengths_of(mask: torch.Tensor) -> torch.Tensor:
    """History lengths (B,) of a left-aligned bool mask (B, T); raises if the mask has holes."""
    mask = mask.bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]):
        raise ValueError("hist_mask must be left-aligned (real behaviours first, then padding) as RankingBatch "
                         "promises; shift each row's real positions to the front")
    return lengths


def pack(hist_mask: torch.Tensor) -> Packed:
    """Packing of a (B, T) left-aligned mask: rows sorted by length, real positions step-major.

    Example:
        >>> p = pack(torch.tensor([[True, False, False], [True, True, True]]))
        >>> p.order.tolist(), p.batch_sizes
        ([1, 0], [2, 1, 1])
    """
    lengths = lengths_of(hist_mask)  # (B,)
    order = torch.argsort(lengths, descending=True, stable=True)  # (B,)
    sorted_len = lengths[order]
    T = max(1, int(sorted_len[0])) if len(order) else 1
    mask = torch.arange(T, device=hist_mask.device)[:, None] < sorted_len[None, :]  # (T, B)
    sizes = mask.sum(1)  # (T,)
    B = len(order)
    rows = torch.arange(B, device=hist_mask.device)
    row = rows.expand(T, -1)[mask]  # (P,)
    offsets = torch.cumsum(sizes, 0) - sizes  # (T,) first packed position of each step
    last = offsets[(sorted_len - 1).clamp(min=0)] + rows  # (B,) packed position of each row's last step
    final_rows = torch.where(sorted_len > 0, B + last, rows)  # an empty history keeps the zero initial state
    return Packed(order, mask, sizes.tolist(), row, final_rows)


def unpack(x: torch.Tensor, p: Packed, T_out: int) -> torch.Tensor:
    """Packed (P, ...) -> (B, T_out, ...) in the batch's row order, zeros at padding."""
    T, B = p.mask.shape
    dense = x.new_zeros((T, B) + x.shape[1:])
    dense[p.mask] = x
    dense = dense.transpose(0, 1)  # (B, T, ...) sorted rows
    out = x.new_zeros((B, T_out) + x.shape[1:])
    out[p.order, :T] = dense
    return out


# ---------------------------------------------------------------- gated GRU scans
#
# Gates follow torch.nn.GRU's layout (r, z, n); the paper's update gate is u = 1 - z:
#   GRU:   h' = h + (1 - z) (n - h)              (= (1 - z) n + z h)
#   AUGRU: h' = h + a (1 - z) (n - h)            (SPEC §3.3: ũ = a·u; a = 0 keeps h, a = 1 is a GRU step)
#   AGRU:  h' = h + a (n - h)                    (z is computed but unused)
#   AIGRU: a GRU step on the input a · h_t       (the caller scales the input projection)
# `gi` holds the input-side projections x_t W_ih^T + b_ih of all packed positions, made by one
# matmul before the loop; `am` is the attention a per packed position (None = 1).
#
# The loops write into preallocated (P, ·) buffers (out=) instead of allocating and
# concatenating per step, and the backward's weight gradient is one (3H, P) x (P, H) matmul
# after the loop: per step there is one matmul and a handful of elementwise ops.
#
# State rows: S (B + P, H); rows 0..B-1 are the zero initial state, step t's states follow the
# packed layout (row B + off_t + i). Step t reads its previous state at the rows of step t - 1,
# whose first batch_sizes[t] rows are exactly the rows still running.

UPDATE, BLEND = 0, 1  # scan kinds: u = am (1 - z) (GRU, AUGRU, AIGRU) | u = am (AGRU)


def _scan_forward(gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, am: Optional[torch.Tensor],
                  batch_sizes: List[int], kind: int, B: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed gated-GRU loop: gi (P, 3H) -> states S (B + P, H), plus what the backward needs:
    X (P, 3H) = [r, z, gh_n] (the gates and the hidden-side n pre-activation), the candidates
    n (P, H) and the update u (P, H) (AUGRU only; a GRU's u is 1 - z, AGRU's is am).

    Per step: one in-place matmul X[t] += h W_hh^T (X was filled with gi_rz + b_hh_rz and b_hh_n
    before the loop, so the r, z sums need no pass of their own) and four elementwise ops.
    tanh(x) is computed as 2 σ(2x) - 1 (the factor 2 folded into gi_n and the multiply-add):
    torch's CPU tanh is 4-5x slower than its sigmoid on these shapes."""
    H = w_hh.shape[1]
    P = gi.shape[0]
    S = gi.new_empty(B + P, H)
    S[:B].zero_()
    X = gi.new_empty(P, 3 * H)
    torch.add(gi[:, :2 * H], b_hh[:2 * H], out=X[:, :2 * H])
    X[:, 2 * H:] = b_hh[2 * H:]
    gi_n2 = gi[:, 2 * H:] * 2.0  # (P, H)
    w_t = w_hh.t()  # (H, 3H)
    NN = gi.new_empty(P, H)
    U = gi.new_empty(P if kind == 0 and am is not None else 0, H)
    minus_one = gi.new_full((1, 1), -1.0)
    ones = gi.new_ones(1, 1)
    a_all = ones if am is None else am.unsqueeze(1)  # (P, 1)
    prev = 0
    off = 0
    for bt in batch_sizes:
        e = off + bt
        hp = S[prev:prev + bt]  # (bt, H): the previous state of the running rows
        x = X[off:e].addmm_(hp, w_t)  # [r, z pre-activations, gh_n]: the only matmul in the loop
        rz = x[:, :2 * H].sigmoid_()
        s = torch.addcmul(gi_n2[off:e], rz[:, :H], x[:, 2 * H:], value=2.0).sigmoid_()  # σ(2 (gi_n + r gh_n))
        n = torch.add(minus_one, s, alpha=2.0, out=NN[off:e])  # = tanh(gi_n + r gh_n)
        out = S[B + off:B + e]
        if kind == 0 and am is None:  # GRU: h = hp + (1 - z) (n - hp) = n + z (hp - n)
            torch.lerp(n, hp, rz[:, H:], out=out)
        elif kind == 0:  # AUGRU: u = a (1 - z)
            a = a_all[off:e]
            torch.lerp(hp, n, torch.addcmul(a, a, rz[:, H:], value=-1.0, out=U[off:e]), out=out)
        else:  # BLEND: u = a
            torch.lerp(hp, n, ones if am is None else a_all[off:e], out=out)
        prev = B + off
        off = e
    return S, X, NN, U


def _scan_backward(grad: torch.Tensor, w_hh: torch.Tensor, am: Optional[torch.Tensor], batch_sizes: List[int],
                   kind: int, B: int, S: torch.Tensor, X: torch.Tensor, NN: torch.Tensor,
                   U: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """BPTT for `_scan_forward`: grad = d S (B + P, H).
    Returns d gi (P, 3H), d w_hh (3H, H), d b_hh (3H,), d am (P,) (None when am is None).

    Given the forward values, every gradient of a step is linear in the gradient d reaching its
    state: d gh = d ∘ K and d hp = d gh W_hh + d ∘ (1 - u), where K depends on the forward only.
    So K and 1 - u are computed for all positions at once before the loop, and the loop does one
    multiply, one matmul and one fused multiply-add per step:
        K_r = u (1 - n²) gh_n r (1 - r),  K_z = (hp - n) a z (1 - z) = (hp - n) u z,  K_n = u (1 - n²) r
    (K_z = 0 for BLEND, whose update does not use z)."""
    H = w_hh.shape[1]
    P = NN.shape[0]
    offs: List[int] = []
    prevs: List[int] = []
    off = 0
    prev = 0
    for bt in batch_sizes:
        offs.append(off)
        prevs.append(prev)
        prev = B + off
        off += bt
    # the previous state of every packed position (P, H)
    if batch_sizes[0] == batch_sizes[-1]:  # every row runs every step (the padded layout): step t's previous
        HP = S[:P]  # states are step t - 1's rows, so the whole block is S shifted by one step; no host copy
    else:
        sizes = torch.tensor(batch_sizes, dtype=torch.long, device=S.device)
        shift = torch.tensor(prevs, dtype=torch.long, device=S.device) - torch.tensor(offs, dtype=torch.long, device=S.device)
        HP = S.index_select(0, torch.arange(P, device=S.device) + torch.repeat_interleave(shift, sizes))
    R, Z = X[:, :H], X[:, H:2 * H]
    ones = NN.new_ones(1, 1)
    if kind == 0:
        u = (1.0 - Z) if am is None else U  # (P, H)
    else:
        u = ones if am is None else am.unsqueeze(1)  # (P, 1)
    UT = torch.addcmul(ones, NN, NN, value=-1.0).mul_(u)  # u (1 - n²) = d pre_n / d h'
    HPN = HP - NN
    K = NN.new_empty(P, 3 * H)  # d gh = d ∘ K, per gate
    torch.addcmul(R, R, R, value=-1.0, out=K[:, :H]).mul_(UT).mul_(X[:, 2 * H:])
    if kind == 0:
        torch.mul(HPN, u, out=K[:, H:2 * H]).mul_(Z)
    else:
        K[:, H:2 * H].zero_()
    torch.mul(UT, R, out=K[:, 2 * H:])
    OMU = Z if kind == 0 and am is None else 1.0 - u  # 1 - u (a GRU's is z)
    K3 = K.view(P, 3, H)
    dS = grad.clone()  # receives each step's gradient to the previous state
    dGH = NN.new_empty(P, 3 * H)
    dGH3 = dGH.view(P, 3, H)
    for t in range(len(batch_sizes) - 1, -1, -1):
        bt = batch_sizes[t]
        off = offs[t]
        e = off + bt
        d = dS[B + off:B + e]  # (bt, H): complete once step t + 1 has been processed
        torch.mul(K3[off:e], d.unsqueeze(1), out=dGH3[off:e])
        dp = dS[prevs[t]:prevs[t] + bt]
        dp.addmm_(dGH[off:e], w_hh)
        dp.addcmul_(d, OMU if kind == 1 and am is None else OMU[off:e])
    D = dS[B:]  # (P, H): the full gradient of every state
    d_w = dGH.t().mm(HP)
    d_b = dGH.sum(0)
    d_am: Optional[torch.Tensor] = None
    if am is not None:
        Q = D * HPN  # = -d u
        if kind == 0:  # d a = d u (1 - z)
            d_am = torch.addcmul(Q, Q, Z, value=-1.0).sum(1).neg_()
        else:
            d_am = Q.sum(1).neg_()
    torch.mul(D, UT, out=dGH[:, 2 * H:])  # d gi: the r, z parts equal d gh's, the n part is d ∘ UT
    return dGH, d_w, d_b, d_am


def _evolve_candidates(proj: torch.Tensor, b_ih: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                       att: torch.Tensor, evolution: int) -> torch.Tensor:
    """Serving loop: one history, N candidates. proj (T, 3H) = h W_ih^T (shared), att (T, N) -> (N, H).

    evolution: 0 AUGRU, 1 AGRU, 2 AIGRU (whose input a_t h_t gives a_t (h_t W_ih^T), so the
    projection stays shared and only the scaling is per candidate). The r, z pre-activations
    come out of one matmul that starts from the (shared) input side, biases folded in; the n
    pre-activation carries a factor 2 so that tanh(x) = 2 σ(2x) - 1 (as in `_scan_forward`)."""
    H = w_hh.shape[1]
    N = att.shape[1]
    w_rz = w_hh[:2 * H].t().contiguous()  # (H, 2H)
    w_n = w_hh[2 * H:].t().contiguous()  # (H, H)
    b_rz = b_ih[:2 * H] + b_hh[:2 * H]
    gi_rz = proj[:, :2 * H] + b_rz  # (T, 2H)
    gi_n2 = (proj[:, 2 * H:] + b_ih[2 * H:]) * 2.0  # (T, H)
    minus_one = proj.new_full((1, 1), -1.0)
    h = proj.new_zeros(N, H)
    for t in range(att.shape[0]):
        a = att[t].unsqueeze(1)  # (N, 1)
        if evolution == 2:
            g_rz = torch.addcmul(b_rz, a, proj[t, :2 * H].unsqueeze(0))  # (N, 2H)
            g_n2 = torch.addcmul(b_ih[2 * H:], a, proj[t, 2 * H:].unsqueeze(0)).mul_(2.0)  # (N, H)
        else:
            g_rz = gi_rz[t].unsqueeze(0)  # (1, 2H), broadcast over candidates
            g_n2 = gi_n2[t].unsqueeze(0)
        rz = torch.addmm(g_rz, h, w_rz).sigmoid_()  # (N, 2H)
        s = torch.addcmul(g_n2, rz[:, :H], torch.addmm(b_hh[2 * H:], h, w_n), value=2.0).sigmoid_()  # (N, H)
        n = torch.add(minus_one, s, alpha=2.0)  # tanh
        if evolution == 0:
            u = torch.addcmul(a, a, rz[:, H:], value=-1.0)  # a (1 - z)
            h = torch.lerp(h, n, u)
        elif evolution == 1:
            h = torch.lerp(h, n, a)
        else:
            h = torch.lerp(n, h, rz[:, H:])  # h + (1 - z) (n - h)
    return h


def _script(fn):
    # torch.jit.script is deprecated in favour of torch.compile, but torch.compile specialises on
    # the Python loop (one graph per length profile of a batch) while TorchScript runs the loop
    # as is; see the module docstring for the measurement.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(fn)


_scan_forward_c = _script(_scan_forward)
_scan_backward_c = _script(_scan_backward)
_evolve_candidates_c = _script(_evolve_candidates)


class _GatedScan(torch.autograd.Function):
    """The packed gated-GRU loop with a hand-written backward (BPTT)."""

    @staticmethod
    def forward(ctx, gi, w_hh, b_hh, am, batch_sizes, kind, rows):  # type: ignore[override]
        # under CUDA-graph capture the plain Python loops run: they are recorded once, so the
        # interpreter's speed does not matter there, and TorchScript's profiling executor may
        # specialise or compile while the stream is being captured (which capture refuses)
        ctx.capturing = gi.is_cuda and torch.cuda.is_current_stream_capturing()
        S, *saved = (_scan_forward if ctx.capturing else _scan_forward_c)(gi, w_hh, b_hh, am, batch_sizes, kind, rows)
        ctx.save_for_backward(w_hh, am, S, *saved)
        ctx.batch_sizes, ctx.kind, ctx.rows = batch_sizes, kind, rows
        return S

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w_hh, am, *saved = ctx.saved_tensors
        scan_backward = _scan_backward if ctx.capturing else _scan_backward_c
        d_gi, d_w, d_b, d_am = scan_backward(grad, w_hh, am, ctx.batch_sizes, ctx.kind, ctx.rows, *saved)
        return d_gi, d_w, d_b, d_am, None, None, None


def gated_scan(gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, am: Optional[torch.Tensor],
               batch_sizes: List[int], kind: int, rows: int = 0) -> torch.Tensor:
    """Run the packed gated GRU (see the table above): gi (P, 3H) -> states S (B + P, H).

    Rows 0..B-1 of S are the zero initial state; `S[B:]` are the packed states (P, H) and
    `S[B + last]` is each row's state after its last step (`Packed.final_rows`).

    Args:
        gi: input projections x W_ih^T + b_ih of the packed positions, step-major.
        w_hh, b_hh: hidden-side weights (3H, H) and bias (3H,), torch's (r, z, n) layout.
        am: (P,) attention per position, or None for a = 1 (plain GRU).
        batch_sizes: rows running at each step (non-increasing).
        kind: UPDATE (u = a (1 - z)) or BLEND (u = a).
        rows: B, the batch's rows incl. empty histories (0 = batch_sizes[0]).

    Example:
        >>> cell = nn.GRUCell(4, 3)
        >>> gated_scan(torch.randn(5, 9), cell.weight_hh, cell.bias_hh, None, [2, 2, 1], UPDATE).shape
        torch.Size([7, 3])
    """
    rows = rows or batch_sizes[0]
    tensors = (gi, w_hh, b_hh) + (() if am is None else (am,))
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return _GatedScan.apply(gi, w_hh, b_hh, am, batch_sizes, kind, rows)
    return _scan_forward_c(gi, w_hh, b_hh, am, batch_sizes, kind, rows)[0]


# ---------------------------------------------------------------- reference loops (for tests)


def _cell_gates(x: torch.Tensor, h: torch.Tensor, cell: nn.GRUCell) -> Tuple[torch.Tensor, torch.Tensor]:
    """One GRU cell's update gate u = 1 - z and candidate state h̃, written out."""
    H = cell.hidden_size
    gi = x @ cell.weight_ih.T + cell.bias_ih
    gh = h @ cell.weight_hh.T + cell.bias_hh
    r = torch.sigmoid(gi[:, :H] + gh[:, :H])
    z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    return 1 - z, n


def reference_extract(e_b: torch.Tensor, mask: torch.Tensor, cell: nn.GRUCell) -> torch.Tensor:
    """Interest extractor, step by step: e_b (B, T, D), mask (B, T) -> h (B, T, H), zeros at padding."""
    h = e_b.new_zeros(e_b.shape[0], cell.hidden_size)
    out = []
    for t in range(e_b.shape[1]):
        u, n = _cell_gates(e_b[:, t], h, cell)
        m = mask[:, t:t + 1]
        h = torch.where(m, (1 - u) * h + u * n, h)
        out.append(h * m)
    return torch.stack(out, 1)


def reference_evolve(x: torch.Tensor, att: torch.Tensor, mask: torch.Tensor, cell: nn.GRUCell, evolution: str) -> torch.Tensor:
    """Interest evolving, SPEC §3.3 literally: x (B, T, H), att / mask (B, T) -> state after the last real step (B, H')."""
    h = x.new_zeros(x.shape[0], cell.hidden_size)
    for t in range(x.shape[1]):
        a = att[:, t:t + 1]
        if evolution == "aigru":
            u, n = _cell_gates(a * x[:, t], h, cell)
            new = (1 - u) * h + u * n
        elif evolution == "augru":
            u, n = _cell_gates(x[:, t], h, cell)
            ut = a * u
            new = (1 - ut) * h + ut * n
        else:
            _, n = _cell_gates(x[:, t], h, cell)
            new = (1 - a) * h + a * n
        h = torch.where(mask[:, t:t + 1], new, h)  # past a sequence's end the state does not change
    return h


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the True positions of `mask`; 0 elsewhere (and for rows with none)."""
    s = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(s, dim=dim) * mask.to(scores.dtype)


# ---------------------------------------------------------------- DIEN


class DIEN(nn.Module):
    """DIEN: interest extractor GRU + auxiliary loss, target attention, AUGRU / AGRU / AIGRU interest
    evolving, output MLP (SPEC §3). Returns click logits; `ranking_loss` adds the losses.

    Args:
        cfg: hyper-parameters (evolution kind, widths, α, MLP).
        item_features: field -> (n_items, W) int ids (0 = none); the category field gives c(i).
        field_vocab: field -> vocabulary size incl. padding.

    Example:
        >>> cfg = DIENConfig(n_items=20, embed_dim=4, mlp=(8,))
        >>> m = DIEN(cfg, {"cate": torch.randint(1, 3, (20, 1))}, {"cate": 3})
        >>> hist = torch.tensor([[3, 5, 7], [2, 0, 0]])
        >>> b = RankingBatch(user=torch.tensor([1, 2]), hist=hist, hist_mask=hist > 0, aux_neg=torch.randint(1, 20, (2, 3)),
        ...                  target=torch.tensor([4, 9]), label=torch.tensor([1.0, 0.0]))
        >>> m(b).shape, m.interest_states(b).shape, m.attention(b).shape
        (torch.Size([2]), torch.Size([2, 3, 8]), torch.Size([2, 3]))
        >>> m.score_candidates(hist[0], hist[0] > 0, torch.tensor([4, 9, 11])).shape
        torch.Size([3])
    """

    def __init__(self, cfg: DIENConfig, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = ItemEmbedding(cfg, item_features, field_vocab)
        D = self.items.dim
        H = cfg.hidden or D
        H2 = cfg.evolve_hidden or H
        # GRUCells hold the weights in torch's layout; the packed scans run them
        self.extractor = nn.GRUCell(D, H)
        self.aux_proj = nn.Linear(H, D, bias=False) if H != D and cfg.aux_alpha > 0 and cfg.aux_net == "dot" else None
        self.aux_mlp: Optional[nn.Module] = None
        if cfg.aux_alpha > 0 and cfg.aux_net == "mlp":
            unit = MLP(H + D, (100, 50), "sigmoid")
            self.aux_mlp = nn.Sequential(unit, nn.Linear(unit.out_dim, 1))
        self.att_w = nn.Linear(D, H, bias=False)  # a_t ∝ exp(h_t · W e_a)
        self.att_mlp: Optional[nn.Module] = None
        if cfg.attention == "mlp":
            unit = MLP(4 * H, cfg.attention_mlp, cfg.activation)
            self.att_mlp = nn.Sequential(unit, nn.Linear(unit.out_dim, 1))
        self.evolver = nn.GRUCell(H, H2)
        self.target_proj = nn.Linear(D, H2, bias=False) if H2 != D else None  # e_a in H' for h'_T ∘ e_a
        self.user = _user_embedding(cfg)
        self.head = _output_mlp(cfg, 2 * H2 + (3 if cfg.pooled_product else 2) * D + (2 * D if cfg.attention_pooling else 0)
                                + (cfg.embed_dim if self.user is not None else 0))
        self._evolution = EVOLUTIONS.index(cfg.evolution)
        # how training / forward lays out the histories: "packed" (real positions only; the CPU
        # path), "padded" (all B x T positions, padding steps keep the state: fixed shapes and no
        # host sync, so a CUDA graph can capture the step) or "auto" (padded on a GPU)
        self.layout = "auto"

    # ---------------------------------------------------------------- parts, on packed histories

    def _extract(self, e: torch.Tensor, p: Packed) -> torch.Tensor:
        """Interest extractor GRU (SPEC §3.2): packed e_b (P, D) -> h (P, H)."""
        c = self.extractor
        gi = F.linear(e, c.weight_ih, c.bias_ih)  # (P, 3H): input side of every step in one matmul
        return gated_scan(gi, c.weight_hh, c.bias_hh, None, p.batch_sizes, UPDATE, len(p.order))[len(p.order):]  # (P, H)

    def _attend(self, h: torch.Tensor, e_a: torch.Tensor, p: Packed) -> torch.Tensor:
        """a_t = softmax_t(h_t W e_a) over real steps (SPEC §3.3): h (P, H), e_a (B, D) sorted -> (P,)."""
        s = self._scores(h, self.att_w(e_a).index_select(0, p.row))  # (P,)
        dense = s.new_full(p.mask.shape, torch.finfo(s.dtype).min).masked_scatter(p.mask, s)  # (T, B)
        return torch.softmax(dense, dim=0)[p.mask]

    def _scores(self, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Attention logits of states h (..., H) against matching queries q = W e_a (..., H) -> (...)."""
        if self.att_mlp is None:
            return (h * q).sum(-1)
        x = torch.cat([q, h, q - h, q * h], dim=-1)
        return self.att_mlp(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])

    def _evolve(self, h: torch.Tensor, att: torch.Tensor, p: Packed) -> torch.Tensor:
        """Interest evolving (SPEC §3.3): h (P, H), att (P,) -> state after each row's last step (B, H')."""
        c = self.evolver
        if self.cfg.evolution == "aigru":
            gi = F.linear(h * att[:, None], c.weight_ih, c.bias_ih)  # (P, 3H')
            S = gated_scan(gi, c.weight_hh, c.bias_hh, None, p.batch_sizes, UPDATE, len(p.order))  # (B + P, H')
        else:
            gi = F.linear(h, c.weight_ih, c.bias_ih)  # (P, 3H')
            kind = UPDATE if self.cfg.evolution == "augru" else BLEND
            S = gated_scan(gi, c.weight_hh, c.bias_hh, att, p.batch_sizes, kind, len(p.order))  # (B + P, H')
        return S.index_select(0, p.final_rows)  # past a row's end its state does not change

    def _logits(self, h_T: torch.Tensor, e_a: torch.Tensor, pooled: torch.Tensor, users: List[torch.Tensor],
                att_pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Output MLP over [h'_T, e_a, h'_T ∘ e_a, Σ e_b, (Σ e_b ∘ e_a,) (Σ a_t e_b, Σ a_t e_b ∘ e_a,) user]
        (SPEC §3.4) -> (B,)."""
        e_q = e_a if self.target_proj is None else self.target_proj(e_a)  # (B, H')
        parts = [h_T, e_a, h_T * e_q, pooled] + ([pooled * e_a] if self.cfg.pooled_product else [])
        if att_pooled is not None:
            parts += [att_pooled, att_pooled * e_a]
        return self.head(torch.cat(parts + users, dim=-1)).squeeze(-1)

    def _aux(self, h: torch.Tensor, src: torch.Tensor, e_next: torch.Tensor, e_neg: torch.Tensor,
             next_ids: torch.Tensor, neg_ids: torch.Tensor, p: Packed) -> torch.Tensor:
        """SPEC §3.2 on packed tensors: h (P, H); for the M positions t (src) whose t + 1 is real, the
        embeddings of the behaviour at t + 1 and of its negative (M, D) and their ids (M,) -> scalar."""
        if len(src) == 0:
            return h.sum() * 0.0
        shared = None
        if self.cfg.aux_shared_negatives > 0:
            k = p.batch_sizes[1]  # the pairs (0, 1) come first (time order): one per row with two events
            shared = (e_neg[:k], neg_ids[:k], p.order[:k] < self.cfg.aux_shared_negatives)
        return -self._aux_terms(h.index_select(0, src), e_next, e_neg, next_ids, shared).mean()

    def _aux_terms(self, hs: torch.Tensor, e_next: torch.Tensor, e_neg: torch.Tensor, next_ids: torch.Tensor,
                   shared: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Per pair log-likelihood: states (M, H), embeddings (M, D), next ids (M,) -> (M,).

        SPEC §3.2: log σ(h_t · e_b[t+1]) + log(1 − σ(h_t · ê_b[t+1])). With `aux_shared_negatives` n > 0, the
        log softmax of h_t · e_b[t+1] among it and h_t · ê_j for the shared negatives (embeddings (S, D), ids
        (S,), in use (S,) bool): the auxiliary negatives of the second event of the batch's first n rows, each
        a uniform draw, so a sample of the catalogue every step scores against; one that is the pair's own
        next item is left out. The caller picks them so that every layout shares the same set.
        """
        if self.cfg.aux_detach:
            e_next, e_neg = e_next.detach(), e_neg.detach()
        if shared is None:
            return F.logsigmoid(self._aux_logit(hs, e_next)) + F.logsigmoid(-self._aux_logit(hs, e_neg))  # log(1 - σ(x)) = log σ(-x)
        e_s, ids_s, use = shared
        if self.cfg.aux_detach:
            e_s = e_s.detach()
        q = hs if self.aux_proj is None else self.aux_proj(hs)  # (M, D)
        pos = (q * e_next).sum(-1, keepdim=True)  # (M, 1)
        neg = (q @ e_s.t()).masked_fill(~use[None, :] | (ids_s[None, :] == next_ids[:, None]), -math.inf)  # (M, S)
        return pos.squeeze(-1) - torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1)

    def _aux_logit(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Auxiliary score of states h (M, H) against next-behaviour embeddings e (M, D) -> (M,)."""
        if self.aux_mlp is not None:
            return self.aux_mlp(torch.cat([h, e], dim=-1)).squeeze(-1)
        h = h if self.aux_proj is None else self.aux_proj(h)  # (M, D)
        return (h * e).sum(-1)

    def padded(self, batch: RankingBatch) -> bool:
        """Whether `batch` runs on the padded layout (see `layout`)."""
        if self.layout not in ("auto", "packed", "padded"):
            raise ValueError(f"DIEN.layout {self.layout!r} must be auto, packed or padded")
        if self.layout == "packed" or (self.layout == "auto" and not batch.hist.is_cuda):
            return False
        if self.att_mlp is not None:  # its Dice would take batch statistics over the padding positions too
            if self.layout == "padded":
                raise ValueError("DIEN's padded layout needs the dot-product attention (model.attention: dot)")
            return False
        return True

    def _run(self, batch: RankingBatch, with_aux: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.padded(batch):
            return self._run_padded(batch, with_aux)
        p = pack(batch.hist_mask)
        ids = [p.take(batch.hist), batch.target[p.order]]  # (P,), (B,)
        if with_aux:
            src, dst = p.pairs(self.cfg.aux_horizon)  # (M,), (M,): t and t + k of the same row, both real
            ids += [p.take(batch.aux_neg).index_select(0, dst)]  # (M,)
        # one lookup for all ids: one dense embedding gradient per step instead of three
        parts = self.items(torch.cat(ids)).split([len(x) for x in ids])
        e, e_a = parts[0], parts[1]  # (P, D), (B, D)
        h = self._extract(e, p)  # (P, H)
        att = self._attend(h, e_a, p)  # (P,)
        h_T = self._evolve(h, att, p)  # (B, H')
        pooled = e.new_zeros(e_a.shape).index_add(0, p.row, e)  # (B, D): Σ over real behaviours
        att_pooled = e.new_zeros(e_a.shape).index_add(0, p.row, att[:, None] * e) if self.cfg.attention_pooling else None
        logits = self._logits(h_T, e_a, pooled, _user_vectors(self.user, batch.user[p.order]), att_pooled)
        logits = torch.empty_like(logits).index_copy(0, p.order, logits)  # back to batch order
        aux = self._aux(h, src, e.index_select(0, dst), parts[2], ids[0].index_select(0, dst), ids[2], p) if with_aux \
            else logits.new_zeros(())
        return logits, aux

    def _run_padded(self, batch: RankingBatch, with_aux: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """`_run` on the padded layout: positions time-major (T B), every row runs all T steps and a
        padding step leaves the state as it is (a = 0 in the gated update: the extractor runs as an
        AUGRU with a = the mask, the AUGRU / AGRU with the attention, which is 0 there). So the final
        state is each row's state after its last real step, the attention is a softmax over the real
        steps, and the auxiliary loss a weighted mean over the pairs (t, t + 1) whose t + 1 is real:
        the packed layout's values, with fixed shapes and no host sync (tests hold them equal)."""
        mask = batch.hist_mask.bool()
        B, T = mask.shape
        ids = [batch.hist.t().reshape(-1), batch.target]  # (T B,), (B,)
        if with_aux:
            ids.append(batch.aux_neg[:, 1:].t().reshape(-1))  # ((T-1) B,): the negative of each step t + 1
        parts = self.items(torch.cat(ids)).split([len(x) for x in ids])
        e, e_a = parts[0], parts[1]  # (T B, D), (B, D)
        m = mask.t().reshape(-1).to(e.dtype)  # (T B,)
        steps = [B] * T
        c = self.extractor
        h = gated_scan(F.linear(e, c.weight_ih, c.bias_ih), c.weight_hh, c.bias_hh, m, steps, UPDATE, B)[B:]  # (T B, H)
        s = (h.view(T, B, -1) * self.att_w(e_a)).sum(-1)  # (T, B)
        att = masked_softmax(s, mask.t(), dim=0).reshape(-1)  # (T B,): 0 on padding
        c2 = self.evolver
        if self.cfg.evolution == "aigru":
            S = gated_scan(F.linear(h * att[:, None], c2.weight_ih, c2.bias_ih), c2.weight_hh, c2.bias_hh, m, steps,
                           UPDATE, B)
        else:
            kind = UPDATE if self.cfg.evolution == "augru" else BLEND
            S = gated_scan(F.linear(h, c2.weight_ih, c2.bias_ih), c2.weight_hh, c2.bias_hh, att, steps, kind, B)
        h_T = S[-B:]  # (B, H'): the last step's states
        e3 = e.view(T, B, -1)
        pooled = (e3 * m.view(T, B, 1)).sum(0)  # (B, D)
        att_pooled = (att.view(T, B, 1) * e3).sum(0) if self.cfg.attention_pooling else None
        logits = self._logits(h_T, e_a, pooled, _user_vectors(self.user, batch.user), att_pooled)
        if not with_aux:
            return logits, logits.new_zeros(())
        w = m[B:]  # ((T-1) B,): step t + 1 is real (and so t, histories being left-aligned)
        shared = None
        if self.cfg.aux_shared_negatives > 0 and T > 1:  # step 1 of each row (the first B pairs), batch order
            use = (w[:B] > 0) & (torch.arange(B, device=w.device) < self.cfg.aux_shared_negatives)
            shared = (parts[2][:B], ids[2][:B], use)
        total, count = h.new_zeros(()), w.new_zeros(())
        for k in range(1, min(self.cfg.aux_horizon, T - 1) + 1):  # pairs (t, t + k): step t + k's negative
            wk = m[k * B:]  # ((T-k) B,)
            terms = self._aux_terms(h[:len(wk)], e[k * B:], parts[2][(k - 1) * B:], ids[0][k * B:], shared)
            total, count = total + (terms * wk).sum(), count + wk.sum()
        return logits, -total / count.clamp(min=1.0)

    # ---------------------------------------------------------------- public

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """Click logits (B,) (apply a sigmoid for the CTR)."""
        return self._run(batch, with_aux=False)[0]

    def logits_and_aux(self, batch: RankingBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits (B,) and the auxiliary loss (scalar) from one pass (the extractor runs once)."""
        return self._run(batch, with_aux=True)

    def interest_states(self, batch: RankingBatch) -> torch.Tensor:
        """Interest extractor states h (B, T, H) in the batch's order; zeros at padding."""
        p = pack(batch.hist_mask)
        return unpack(self._extract(self.items(p.take(batch.hist)), p), p, batch.hist.shape[1])

    def auxiliary_loss(self, batch: RankingBatch, h: torch.Tensor) -> torch.Tensor:
        """SPEC §3.2: −mean[log σ(h_t · e_b[t+1]) + log(1 − σ(h_t · ê_b[t+1]))] over t whose t + 1 is real
        (with `aux_horizon` n: over the pairs (t, t + k), k = 1..n, whose t + k is real, ê_b[t+k] the negative).

        Args:
            batch: the batch h was computed from (its history and aux_neg give e_b and ê_b).
            h: interest states (B, T, H), e.g. `interest_states(batch)`.
        """
        mask = batch.hist_mask.bool()
        horizon = range(1, min(self.cfg.aux_horizon, mask.shape[1] - 1) + 1)
        if not mask[:, 1:].any():
            return h.sum() * 0.0
        nxt = [mask[:, k:] for k in horizon]  # (B, T-k): t + k real implies t real (left-aligned)
        ht = torch.cat([h[:, :-k][n] for k, n in zip(horizon, nxt)])  # (M, H)
        nid = torch.cat([batch.hist[:, k:][n] for k, n in zip(horizon, nxt)])  # (M,)
        neg_id = torch.cat([batch.aux_neg[:, k:][n] for k, n in zip(horizon, nxt)])  # (M,)
        shared = None
        if self.cfg.aux_shared_negatives > 0:
            ids_s = batch.aux_neg[:, 1]  # (B,): each row's second event's negative
            use = mask[:, 1] & (torch.arange(len(ids_s), device=ids_s.device) < self.cfg.aux_shared_negatives)
            shared = (self.items(ids_s), ids_s, use)
        return -self._aux_terms(ht, self.items(nid), self.items(neg_id), nid, shared).mean()

    def attention(self, batch: RankingBatch) -> torch.Tensor:
        """Attention a_t of each row's candidate over its history (B, T): sums to 1 over real steps, 0 on padding.
        For explanations and plots."""
        p = pack(batch.hist_mask)
        h = self._extract(self.items(p.take(batch.hist)), p)
        att = self._attend(h, self.items(batch.target[p.order]), p)  # (P,)
        return unpack(att, p, batch.hist.shape[1])

    @torch.no_grad()
    def score_candidates(self, hist: torch.Tensor, hist_mask: torch.Tensor, candidates: torch.Tensor,
                         user: Optional[int] = None) -> torch.Tensor:
        """Serving: logits (N,) of N candidates for one user, equal to `forward` on the batch that
        repeats the history N times. The extractor runs once; the evolving GRU's input projection
        is shared; the evolution runs batched over the candidates.

        Args:
            hist: (T,) or (1, T) item ids, left-aligned.
            hist_mask: same shape, bool.
            candidates: (N,) item ids.
            user: user id (None or unseen = unknown).

        Example: see the class docstring.
        """
        mask = hist_mask.reshape(1, -1).bool()
        L = int(lengths_of(mask)[0])
        ids = hist.reshape(-1)[:L]  # (L,)
        N = candidates.shape[0]
        e_a = self.items(candidates)  # (N, D)
        D = e_a.shape[1]
        c1, c2 = self.extractor, self.evolver
        if L == 0:
            h_T = e_a.new_zeros(N, c2.hidden_size)
            pooled = e_a.new_zeros(N, D)
            att_pooled = e_a.new_zeros(N, D) if self.cfg.attention_pooling else None
        else:
            e = self.items(ids)  # (L, D)
            h = gated_scan(F.linear(e, c1.weight_ih, c1.bias_ih), c1.weight_hh, c1.bias_hh, None, [1] * L, UPDATE)[1:]  # (L, H)
            q = self.att_w(e_a)  # (N, H)
            scores = q @ h.T if self.att_mlp is None else self._scores(h.expand(N, -1, -1), q[:, None].expand(-1, L, -1))
            att = torch.softmax(scores, dim=1)  # (N, L)
            proj = h @ c2.weight_ih.T  # (L, 3H'): shared by every candidate
            h_T = _evolve_candidates_c(proj, c2.bias_ih, c2.weight_hh, c2.bias_hh, att.t().contiguous(), self._evolution)
            pooled = e.sum(0).expand(N, -1)  # (N, D)
            att_pooled = att @ e if self.cfg.attention_pooling else None  # (N, D)
        users = _user_vectors(self.user, torch.full((N,), 0 if user is None else int(user), dtype=torch.long,
                                                    device=e_a.device))
        return self._logits(h_T, e_a, pooled, users, att_pooled)


# ---------------------------------------------------------------- DIN and the base model


class DIN(nn.Module):
    """DIN: target attention pooling of the history with an MLP over [e_a, e_b, e_a − e_b, e_a ∘ e_b]
    (SPEC §3.5). As in the paper the weights are the raw MLP outputs (no softmax); padding gets 0
    and is never fed to the attention MLP (so Dice's batch statistics see real behaviours only).
    The output MLP sees [pooled, e_a, pooled ∘ e_a, Σ e_b, user], DIEN's head with the pooled
    history in place of h'_T.

    Args:
        cfg: hyper-parameters (attention_mlp, mlp, activation, embed_dim).
        item_features, field_vocab: as for `DIEN`.

    Example:
        >>> m = DIN(DIENConfig(n_items=20, embed_dim=4, mlp=(8,)), {"cate": torch.randint(1, 3, (20, 1))}, {"cate": 3})
        >>> hist = torch.tensor([[3, 5, 7], [2, 0, 0]])
        >>> b = RankingBatch(torch.tensor([1, 2]), hist, hist > 0, hist, torch.tensor([4, 9]), torch.tensor([1.0, 0.0]))
        >>> m(b).shape, m.attention(b).shape
        (torch.Size([2]), torch.Size([2, 3]))
    """

    def __init__(self, cfg: DIENConfig, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = ItemEmbedding(cfg, item_features, field_vocab)
        D = self.items.dim
        att = MLP(4 * D, cfg.attention_mlp, cfg.activation)
        self.att = nn.Sequential(att, nn.Linear(att.out_dim, 1))
        self.user = _user_embedding(cfg)
        self.head = _output_mlp(cfg, 4 * D + (cfg.embed_dim if self.user is not None else 0))

    def _weights(self, e: torch.Tensor, e_a: torch.Tensor) -> torch.Tensor:
        """Attention unit: e_b (P, D), matching e_a (P, D) -> raw weights (P,)."""
        return self.att(torch.cat([e_a, e, e_a - e, e_a * e], dim=-1)).squeeze(-1)

    def _pooled(self, batch: RankingBatch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = batch.hist_mask.bool()
        row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (P,)
        e = self.items(batch.hist[mask])  # (P, D): real behaviours only
        e_a = self.items(batch.target)  # (B, D)
        w = self._weights(e, e_a[row])  # (P,)
        pooled = e.new_zeros(e_a.shape).index_add(0, row, w[:, None] * e)  # (B, D)
        total = e.new_zeros(e_a.shape).index_add(0, row, e)  # (B, D)
        return pooled, total, e_a, w

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """Click logits (B,)."""
        pooled, total, e_a, _ = self._pooled(batch)
        users = _user_vectors(self.user, batch.user)
        return self.head(torch.cat([pooled, e_a, pooled * e_a, total] + users, dim=-1)).squeeze(-1)

    def attention(self, batch: RankingBatch) -> torch.Tensor:
        """Raw attention weights (B, T), 0 at padding."""
        w = self._pooled(batch)[3]
        return w.new_zeros(batch.hist_mask.shape).masked_scatter(batch.hist_mask.bool(), w)

    @torch.no_grad()
    def score_candidates(self, hist: torch.Tensor, hist_mask: torch.Tensor, candidates: torch.Tensor,
                         user: Optional[int] = None) -> torch.Tensor:
        """Serving: logits (N,) of N candidates for one history (T,) or (1, T)."""
        return self(_repeat(hist, hist_mask, candidates, user))


class BaseModel(nn.Module):
    """Base model (SPEC §3.5): embedding + MLP over [Σ e_b, e_a, Σ e_b ∘ e_a, user]; no attention, no GRU.

    Args:
        cfg: hyper-parameters (mlp, activation, embed_dim).
        item_features, field_vocab: as for `DIEN`.

    Example:
        >>> m = BaseModel(DIENConfig(n_items=20, embed_dim=4, mlp=(8,)), {"cate": torch.randint(1, 3, (20, 1))}, {"cate": 3})
        >>> hist = torch.tensor([[3, 5, 7], [2, 0, 0]])
        >>> m(RankingBatch(torch.tensor([1, 2]), hist, hist > 0, hist, torch.tensor([4, 9]), torch.tensor([1.0, 0.0]))).shape
        torch.Size([2])
    """

    def __init__(self, cfg: DIENConfig, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = ItemEmbedding(cfg, item_features, field_vocab)
        D = self.items.dim
        self.user = _user_embedding(cfg)
        self.head = _output_mlp(cfg, 3 * D + (cfg.embed_dim if self.user is not None else 0))

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """Click logits (B,)."""
        total = (self.items(batch.hist) * batch.hist_mask[..., None]).sum(1)  # (B, D)
        e_a = self.items(batch.target)  # (B, D)
        users = _user_vectors(self.user, batch.user)
        return self.head(torch.cat([total, e_a, total * e_a] + users, dim=-1)).squeeze(-1)

    @torch.no_grad()
    def score_candidates(self, hist: torch.Tensor, hist_mask: torch.Tensor, candidates: torch.Tensor,
                         user: Optional[int] = None) -> torch.Tensor:
        """Serving: logits (N,) of N candidates for one history (T,) or (1, T)."""
        return self(_repeat(hist, hist_mask, candidates, user))


def _repeat(hist: torch.Tensor, hist_mask: torch.Tensor, candidates: torch.Tensor, user: Optional[int]) -> RankingBatch:
    """The batch that pairs one history with each of N candidates."""
    N, dev = candidates.shape[0], candidates.device
    hist = hist.reshape(1, -1).expand(N, -1)
    return RankingBatch(user=torch.full((N,), 0 if user is None else int(user), dtype=torch.long, device=dev), hist=hist,
                        hist_mask=hist_mask.reshape(1, -1).bool().expand(N, -1), aux_neg=hist, target=candidates,
                        label=torch.zeros(N, device=dev))


# ---------------------------------------------------------------- loss


def ranking_loss(model: nn.Module, batch: RankingBatch, bce_scale: float = 1.0,
                 aux_scale: float = 1.0) -> Tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss: BCE on the click label, plus α · auxiliary loss for DIEN with α > 0 (SPEC §3.2).

    Returns the total and its parts (detached): {"bce", "aux"} for DIEN with α > 0, else {"bce"}.
    `bce_scale` / `aux_scale` multiply the two means (and their parts): under DDP each rank's
    share of the global batch's samples / auxiliary positions (`train.distributed.global_shares`).

    Example:
        >>> cfg = DIENConfig(n_items=20, embed_dim=4, mlp=(8,))
        >>> m = DIEN(cfg, {"cate": torch.randint(1, 3, (20, 1))}, {"cate": 3})
        >>> hist = torch.tensor([[3, 5, 7], [2, 6, 0]])
        >>> b = RankingBatch(torch.tensor([1, 2]), hist, hist > 0, torch.randint(1, 20, (2, 3)), torch.tensor([4, 9]),
        ...                  torch.tensor([1.0, 0.0]))
        >>> total, parts = ranking_loss(m, b)
        >>> sorted(parts)
        ['aux', 'bce']
    """
    if isinstance(model, DIEN) and model.cfg.aux_alpha > 0:
        logits, aux = model.logits_and_aux(batch)
        bce = F.binary_cross_entropy_with_logits(logits, batch.label.to(logits.dtype)) * bce_scale
        aux = aux * aux_scale
        return bce + model.cfg.aux_alpha * aux, {"bce": bce.detach(), "aux": aux.detach()}
    logits = model(batch)
    bce = F.binary_cross_entropy_with_logits(logits, batch.label.to(logits.dtype)) * bce_scale
    return bce, {"bce": bce.detach()}
