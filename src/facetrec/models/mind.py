"""MIND: Multi-Interest Network with Dynamic routing (Li et al., CIKM 2019), SPEC §2.

Shape legend: B batch, L history length, K interests, D embedding dim, N items.

    hist (B, L) --item tower--> c (B, L, D) --S--> ĉ (B, L, D)
         --B2I dynamic routing (R iterations)--> capsules u (B, K, D), lengths |u| in (0, 1)
         --(+ profile) MLP--> interests V (B, K, D), valid (B, K)   [K'_u = max(1, min(K, floor(log2 |I_u|)))]
    training: label-aware attention over V with the target e_t -> v_u (B, D) -> sampled softmax
    serving:  each valid interest queries the ANN index; results merged by max

YouTube DNN is the same model with K = 1 and mean pooling instead of routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MINDConfig:
    n_items: int  # item vocabulary incl. padding 0
    dim: int = 64  # D: item and interest vector size
    n_interests: int = 4  # K: most interests per user
    routing_iters: int = 3  # R
    routing_sigma: float = 1.0  # std of the per-sample initial routing logits
    softmax_axis: str = "interests"  # interests (each behaviour splits its vote) | behaviours
    dynamic_k: bool = True  # K'_u = max(1, min(K, floor(log2 |I_u|)))
    pooling: str = "routing"  # routing (MIND) | mean (YouTube DNN)
    hidden: tuple[int, ...] = (256,)  # ReLU layers from capsule (+ profile) to interest; then a linear map to D
    attention_p: Union[float, str] = "hard"  # label-aware attention: softmax(p * s); "hard" = argmax
    normalize: bool = False  # L2-normalise user and item vectors (then temperature matters)
    temperature: float = 1.0  # logits are divided by this
    n_users: int = 0  # > 0: a learned user-id profile embedding is concatenated to each capsule
    profile_dim: int = 16  # size of that profile embedding

    def __post_init__(self) -> None:
        if self.softmax_axis not in ("interests", "behaviours"):
            raise ValueError(f"softmax_axis {self.softmax_axis!r} must be 'interests' or 'behaviours'")
        if self.pooling not in ("routing", "mean"):
            raise ValueError(f"pooling {self.pooling!r} must be 'routing' or 'mean'")
        if self.n_interests < 1 or self.routing_iters < 1:
            raise ValueError("n_interests and routing_iters must be >= 1")
        if not (self.attention_p == "hard" or isinstance(self.attention_p, (int, float))):
            raise ValueError(f"attention_p {self.attention_p!r} must be a number or 'hard'")
        if self.pooling == "mean" and self.n_interests != 1:
            raise ValueError("mean pooling (YouTube DNN) has one interest: set n_interests: 1")


class Routing(NamedTuple):
    capsules: torch.Tensor  # (B, K, D) squashed interest capsules
    weights: torch.Tensor  # (B, L, K) final routing weights (0 for padding and invalid interests)
    lengths: torch.Tensor  # (B, K) capsule lengths in (0, 1)
    valid: torch.Tensor  # (B, K) bool: j < K'_u


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """MIND eq. 4: scale z to length |z|^2 / (1 + |z|^2), keeping its direction."""
    sq = (z * z).sum(-1, keepdim=True)
    return z * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


def interest_count(n_events: torch.Tensor, k: int, dynamic: bool = True) -> torch.Tensor:
    """K'_u = max(1, min(K, floor(log2 |I_u|))) per user (B,)."""
    if not dynamic:
        return torch.full_like(n_events, k)
    n = n_events.clamp(min=1).to(torch.float64)
    return torch.floor(torch.log2(n)).to(torch.long).clamp(min=1, max=k)


_P = 2147483647  # 2^31 - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A few rounds of multiply-xorshift modulo 2^31 - 1 (all products stay inside int64)."""
    for m in (48271, 69621, 16807):
        x = (x * m) % _P
        x = x ^ (x >> 13)
    return x


def hashed_normal(keys: torch.Tensor, k: int, salt: int) -> torch.Tensor:
    """N(0, 1) draws (B, L, k) that depend only on each behaviour's key, the interest index and salt.

    Used for the routing logits so that a user's routing never depends on who else is in the batch
    (SPEC §2.2: per-sample logits), while staying random across training steps (salt = step).
    """
    j = torch.arange(k, device=keys.device)
    base = (keys.to(torch.int64)[..., None] % _P) * 31 + j * 1000003 + (salt % _P) * 7919  # (B, L, k)
    u1 = (_mix(base + 1) + 1).to(torch.float32) / (_P + 1)
    u2 = _mix(base + 2).to(torch.float32) / _P
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


class ItemTower(nn.Module):
    """e_i = mean of the item's id embedding and its attribute embeddings (padding excluded), SPEC §2.1."""

    def __init__(self, n_items: int, dim: int, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> None:
        super().__init__()
        self.id_emb = nn.Embedding(n_items, dim, padding_idx=0)
        self.fields = sorted(item_features)
        self.field_emb = nn.ModuleDict({f: nn.Embedding(field_vocab[f], dim, padding_idx=0) for f in self.fields})
        for f in self.fields:
            feats = item_features[f]
            if feats.dim() == 1:
                feats = feats[:, None]
            if feats.shape[0] != n_items:
                raise ValueError(f"item feature {f!r} has {feats.shape[0]} rows, expected n_items = {n_items}")
            self.register_buffer(f"feat_{f}", feats.to(torch.long), persistent=False)
        for emb in (self.id_emb, *self.field_emb.values()):
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., D); padding ids give a zero vector."""
        total = self.id_emb(ids)  # (..., D)
        count = (ids > 0).to(total.dtype).unsqueeze(-1)  # (..., 1)
        for f in self.fields:
            vals = getattr(self, f"feat_{f}")[ids]  # (..., W)
            total = total + self.field_emb[f](vals).sum(-2)
            count = count + (vals > 0).to(total.dtype).sum(-1, keepdim=True)
        return total / count.clamp(min=1.0)


class MIND(nn.Module):
    """Multi-interest user tower + item tower sharing embeddings.

    Args:
        cfg: MINDConfig.
        item_features: field -> (n_items, W) long attribute ids (0 = padding).
        field_vocab: field -> vocabulary size incl. padding.

    Example:
        >>> m = MIND(MINDConfig(n_items=10, dim=8), {"cate": torch.randint(1, 4, (10, 1))}, {"cate": 4})
        >>> v, valid = m.user_interests(torch.randint(1, 10, (2, 5)), torch.ones(2, 5, dtype=torch.bool), torch.tensor([5, 16]))
        >>> v.shape, valid.sum(1).tolist()
        (torch.Size([2, 4, 8]), [2, 4])
    """

    def __init__(self, cfg: MINDConfig, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.items = ItemTower(cfg.n_items, D, item_features, field_vocab)
        self.S = nn.Parameter(torch.empty(D, D))  # shared bilinear map ĉ = S c
        nn.init.xavier_uniform_(self.S)
        self.profile = nn.Embedding(cfg.n_users, cfg.profile_dim) if cfg.n_users > 0 else None
        in_dim = D + (cfg.profile_dim if self.profile is not None else 0)
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        layers.append(nn.Linear(in_dim, D))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)

    # ------------------------------------------------------------ item side

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors for serving / sampled softmax: ids (...) -> (..., D)."""
        e = self.items(ids)
        return F.normalize(e, dim=-1) if self.cfg.normalize else e

    # ------------------------------------------------------------ user side

    def route(self, hist: torch.Tensor, hist_mask: torch.Tensor, n_events: torch.Tensor) -> Routing:
        """B2I dynamic routing (SPEC §2.2) — or masked mean pooling for YouTube DNN."""
        cfg = self.cfg
        K = cfg.n_interests
        mask = hist_mask & (hist > 0)  # (B, L)
        c = self.items(hist)  # (B, L, D)
        k_user = interest_count(n_events, K, cfg.dynamic_k)  # (B,)
        valid = torch.arange(K, device=hist.device)[None, :] < k_user[:, None]  # (B, K)
        m = mask.to(c.dtype)
        if cfg.pooling == "mean":
            w = (m / m.sum(1, keepdim=True).clamp(min=1.0)).unsqueeze(-1)  # (B, L, 1)
            z = torch.bmm(w.transpose(1, 2), c)  # (B, 1, D)
            return Routing(z, w, z.norm(dim=-1), valid)
        chat = c @ self.S.T  # (B, L, D): ĉ_i = S c_i, one shared S
        chat_fixed = chat.detach()  # gradient flows through ĉ only in the last iteration
        salt = int(self.step) if self.training else 0
        if self.training:
            self.step += 1
        keys = hist * 1024 + torch.arange(hist.shape[1], device=hist.device)[None, :]  # behaviour identity: item, position
        b = cfg.routing_sigma * hashed_normal(keys, K, salt).to(c.dtype)  # (B, L, K), per sample, never learned
        neg = torch.finfo(c.dtype).min
        for r in range(cfg.routing_iters):
            x = chat if r == cfg.routing_iters - 1 else chat_fixed
            if cfg.softmax_axis == "interests":
                w = torch.softmax(b.masked_fill(~valid[:, None, :], neg), dim=-1) * m[..., None]  # (B, L, K)
            else:
                w = torch.softmax(b.masked_fill(~mask[..., None], neg), dim=1) * m[..., None] * valid[:, None, :]
            z = torch.bmm(w.transpose(1, 2), x)  # (B, K, D)
            u = squash(z)  # (B, K, D)
            if r < cfg.routing_iters - 1:
                b = b + torch.bmm(chat_fixed, u.detach().transpose(1, 2))  # (B, L, K): logits accumulate
        u = u * valid[..., None].to(u.dtype)
        return Routing(u, w.detach(), u.detach().norm(dim=-1), valid)

    def interests_from_capsules(self, capsules: torch.Tensor, user: torch.Tensor | None = None) -> torch.Tensor:
        """Capsules (B, K, D) (+ profile) -> interest vectors (B, K, D), SPEC §2.3."""
        x = capsules
        if self.profile is not None:
            if user is None:
                raise ValueError("this MIND has a user profile embedding: pass user ids")
            p = self.profile(user.clamp(max=self.profile.num_embeddings - 1))  # (B, P)
            x = torch.cat([x, p[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
        v = self.mlp(x)
        return F.normalize(v, dim=-1) if self.cfg.normalize else v

    def user_interests(self, hist: torch.Tensor, hist_mask: torch.Tensor, n_events: torch.Tensor,
                       user: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Interest vectors V (B, K, D) and validity (B, K) bool."""
        r = self.route(hist, hist_mask, n_events)
        return self.interests_from_capsules(r.capsules, user), r.valid

    def label_aware(self, V: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Label-aware attention (SPEC §2.4): weights softmax(p * V·e_t) over valid interests -> (B, D).

        p = 0 is the mean of the valid interests; p = "hard" takes the best-matching one.
        """
        s = (V * target[:, None, :]).sum(-1)  # (B, K)
        s = s.masked_fill(~valid, torch.finfo(s.dtype).min)
        if self.cfg.attention_p == "hard":
            w = F.one_hot(s.argmax(-1), V.shape[1]).to(V.dtype)  # (B, K)
        else:
            w = torch.softmax(float(self.cfg.attention_p) * s, dim=-1) * valid.to(V.dtype)
            w = w / w.sum(-1, keepdim=True)
        return (w.unsqueeze(-1) * V).sum(1)  # (B, D)
