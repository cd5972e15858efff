"""UIE: User Interest Enhancement (Tencent; stream clustering + memory networks), SPEC §4.2.

Users with little history get three enhancement vectors borrowed from clusters of similar users,
items and sequences; they join the PLE input (`facetrec.models.ple`).

Shape legend: B batch, T history length, C centres per memory, k retrieved centres,
D item width, Dp profile width, Ds sequence width, U users.

    profile (B, 2D+1) --sg--> tower --> p_u (B, Dp) --top-k1 centres, exp(sim) weights--> mix (B, Dp)
                                        [mix, p_u] --generalisation MLP--> UPE (B, G)
    e_target (B, D) on positives --sg--> item memory --top-k2--> c_k  ;  m_u <- m_u - η ∇ α Σ_k ‖m_u - c_k‖²
                                        UCBE = m_u (B, D) looked up by user id (unseen users: their history's centres)
    seq (B, Ds) --sg--> sequence memory --top-k3--> target attention over c_k --> UCSE (B, Ds)

Choices where the paper and the notes are vague (SPEC §4.2 states the rest):
- UIE reads the main model's embeddings and sequence vectors stop-gradient everywhere (also the
  UCSE attention query), so it never pulls on the shared model; its own layers learn from the main loss.
- Every memory is a buffer. Centres move only by stream clustering
  (`c <- c + ρ (mean of the vectors assigned to c - c)`: one SGD step on the mean of ‖v - c‖²; with
  one vector that is exactly `c + ρ (v - c)`); no optimiser sees them and no gradient leaves them.
- Assignment for the update is by Euclidean distance (the loss it descends); retrieval is by
  cosine similarity, so "negative similarity" and `exp(sim)` are scale-free and cannot overflow.
- Training never reads m_u (see `UIE.ucbe`: it would leak later targets into earlier samples);
  it feeds the model the history's centres, which is what m_u holds at that point in time.
- The per-user memory m_u is trained on its own loss α Σ_k ‖m_u - c_k‖² · label with plain SGD
  (step `user_lr`), outside the main optimiser: the main loss never reaches it (the reference code
  returns `stop_gradient(pumn)`), so this is the whole of its training. A user's memory starts,
  the first time the user is seen, from the centres nearest to the user's history — the same vector
  an unseen user gets at inference.
- The vectors that update a memory are drawn uniformly over user-activity buckets first, then
  uniformly within the bucket (`bucket_uniform_sample`), so dense users do not own the centres.
- Centre health: centres start from data (the first batch's vectors) unless `init: random`;
  centres that no vector chose for `reseed_every` steps are re-seeded at a random recent vector.
  `health()` reports the usage histogram, the share of centres in use and the re-seed count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from facetrec.models.layers import MLP


@dataclass(frozen=True)
class UIEConfig:
    """Hyper-parameters of the three enhancement vectors and their memories.

    Example:
        >>> UIEConfig(clusters=16).top_k
        3
    """

    # keys only training reads (losses, initialisation, memory updates): `evaluate --set` refuses them
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("rho", "ucbe_alpha", "user_lr", "update_size", "buckets", "init", "reseed_every", "reseed_noise", "seed")

    clusters: int = 64  # C, centres in each memory
    rho: float = 0.05  # stream-clustering rate: c <- c + rho (v - c)
    top_k: int = 3  # k1 = k2 = k3: centres retrieved per vector
    profile_dim: int = 32  # Dp, width of the auxiliary profile tower's output p_u
    profile_tower: tuple[int, ...] = (64,)  # hidden sizes of the profile tower
    generalisation: tuple[int, ...] = (32,)  # the UPE generalisation MLP (its last size is the UPE width)
    ucbe_alpha: float = 0.05  # α of the per-user memory loss α Σ_k ‖m_u - c_k‖² · label
    user_lr: float = 1.0  # SGD step of the per-user memories on that loss
    memory_at_eval: bool = True  # evaluation / serving read the per-user memory m_u (training always uses the history's centres)
    update_size: int = 128  # vectors drawn (uniformly over activity buckets) per memory and batch
    buckets: tuple[int, ...] = (5, 20)  # activity bucket edges for the sampling: <=5, 6-20, >20 events
    init: str = "data"  # data (first batch's vectors) | random
    reseed_every: int = 100  # steps between re-seeds of unused centres (0 = never)
    reseed_noise: float = 0.01  # relative noise added to a re-seeded centre
    upe: bool = True  # ablations: switch one vector off
    ucbe: bool = True  # ablations: as upe
    ucse: bool = True  # ablations: as upe
    seed: int = 0  # sampling and seeding generator

    def __post_init__(self) -> None:
        if self.clusters < 1 or self.top_k < 1 or self.top_k > self.clusters:
            raise ValueError(f"uie.clusters {self.clusters} must be >= 1 and uie.top_k {self.top_k} in 1..clusters")
        if not 0 < self.rho <= 1:
            raise ValueError(f"uie.rho {self.rho} must be in (0, 1]: the share of the way a centre moves toward a vector")
        if self.ucbe_alpha < 0 or self.user_lr < 0:
            raise ValueError("uie.ucbe_alpha and uie.user_lr must be >= 0")
        if 2 * self.ucbe_alpha * self.user_lr * self.top_k > 1:
            raise ValueError(f"uie: 2 * ucbe_alpha * user_lr * top_k = {2 * self.ucbe_alpha * self.user_lr * self.top_k:.3g} > 1 "
                             "makes the per-user memory overshoot its centres; lower uie.user_lr or uie.ucbe_alpha")
        if self.init not in ("data", "random"):
            raise ValueError(f"uie.init {self.init!r} must be 'data' or 'random'")
        if self.update_size < 1 or self.reseed_every < 0 or self.profile_dim < 1 or not self.generalisation:
            raise ValueError("uie.update_size and profile_dim must be >= 1, reseed_every >= 0, generalisation non-empty")
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"uie.buckets {self.buckets} must be increasing bucket edges, e.g. [5, 20]")
        if not (self.upe or self.ucbe or self.ucse):
            raise ValueError("uie: at least one of upe, ucbe, ucse must be on (or use model ple without UIE)")


def activity_bucket(n_events: torch.Tensor, edges: tuple[int, ...]) -> torch.Tensor:
    """Bucket index per sample: 0 for n <= e_1, 1 for e_1 < n <= e_2, ..., len(edges) for n > e_last."""
    return torch.bucketize(n_events, torch.tensor(edges, device=n_events.device, dtype=n_events.dtype), right=False)


def bucket_uniform_sample(buckets: torch.Tensor, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices of n draws: a bucket uniformly among the non-empty ones, then a row uniformly inside it.

    Args:
        buckets: (N,) bucket of each candidate row.
        n: draws (with replacement).

    Returns:
        (n,) row indices; empty if there are no rows.

    Example:
        >>> idx = bucket_uniform_sample(torch.tensor([0] * 98 + [1, 2]), 3000, torch.Generator().manual_seed(0))
        >>> torch.bincount(torch.tensor([0] * 98 + [1, 2])[idx]).tolist()  # ~1000 each, not 2940 / 30 / 30
        [995, 1022, 983]
    """
    if len(buckets) == 0:
        return torch.zeros(0, dtype=torch.long, device=buckets.device)
    _, inv, counts = torch.unique(buckets, return_inverse=True, return_counts=True)
    p = 1.0 / (len(counts) * counts[inv].double())  # (N,): every bucket's rows sum to 1 / n_buckets
    return torch.multinomial(p.float(), n, replacement=True, generator=generator)


class Retrieved(NamedTuple):
    centres: torch.Tensor  # (..., k, D)
    sim: torch.Tensor  # (..., k) cosine similarity
    weight: torch.Tensor  # (..., k) exp(sim) where sim > 0, else 0; normalised to sum 1 (0 when none is positive)


class ClusterMemory(nn.Module):
    """C centres updated by stream clustering; retrieval of the top-k most similar centres.

    Args:
        n_centres: C.
        dim: D, the width of the vectors it clusters.
        rho: rate of `update`.
        init: "data" (seed from the first update's vectors) or "random".

    Example:
        >>> mem = ClusterMemory(4, 3, rho=0.5)
        >>> _ = mem.update(torch.randn(8, 3))
        >>> mem.retrieve(torch.randn(2, 3), k=2).centres.shape
        torch.Size([2, 2, 3])
    """

    def __init__(self, n_centres: int, dim: int, rho: float, init: str = "data") -> None:
        super().__init__()
        self.rho = rho
        self.register_buffer("centres", torch.randn(n_centres, dim) / math.sqrt(dim))  # (C, D)
        self.register_buffer("ready", torch.tensor(init == "random"))  # seeded yet
        self.register_buffer("usage", torch.zeros(n_centres, dtype=torch.long))  # assignments this epoch
        self.register_buffer("window", torch.zeros(n_centres, dtype=torch.long))  # since the last re-seed check
        self.register_buffer("total", torch.zeros(n_centres, dtype=torch.long))  # over the whole training
        self.register_buffer("reseeded", torch.zeros((), dtype=torch.long))

    def retrieve(self, v: torch.Tensor, k: int) -> Retrieved:
        """Top-k centres by cosine similarity to v (..., D); negative-similarity centres get weight 0."""
        c = self.centres.detach()
        sim_all = F.normalize(v, dim=-1) @ F.normalize(c, dim=-1).T  # (..., C)
        sim, idx = sim_all.topk(k, dim=-1)  # (..., k)
        w = torch.where(sim > 0, torch.exp(sim), torch.zeros_like(sim))
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        return Retrieved(c[idx], sim, w)

    def nearest(self, v: torch.Tensor) -> torch.Tensor:
        """Index (N,) of the centre nearest (Euclidean) to each vector v (N, D)."""
        c = self.centres
        return ((c * c).sum(-1)[None, :] - 2 * v @ c.T).argmin(-1)

    @torch.no_grad()
    def update(self, v: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Stream clustering step: each centre moves by ρ toward the mean of the vectors (N, D) nearest to it.
        Returns each vector's centre (N,)."""
        v = v.detach().to(self.centres.dtype)
        if len(v) == 0:
            return torch.zeros(0, dtype=torch.long, device=v.device)
        if not bool(self.ready):
            self._seed_from(v, generator)
        idx = self.nearest(v)  # (N,)
        C = self.centres.shape[0]
        n = torch.bincount(idx, minlength=C)  # (C,)
        sums = torch.zeros_like(self.centres).index_add_(0, idx, v)  # (C, D)
        hit = n > 0
        mean = sums[hit] / n[hit, None].to(v.dtype)
        self.centres[hit] += self.rho * (mean - self.centres[hit])
        for counter in (self.usage, self.window, self.total):
            counter += n
        return idx

    @torch.no_grad()
    def _seed_from(self, v: torch.Tensor, generator: Optional[torch.Generator]) -> None:
        C = self.centres.shape[0]
        pick = torch.randperm(len(v), generator=generator, device="cpu")[:C].to(v.device)
        if len(pick) < C:  # fewer vectors than centres: repeat some, jittered apart
            extra = torch.randint(len(v), (C - len(pick),), generator=generator, device="cpu").to(v.device)
            pick = torch.cat([pick, extra])
        self.centres.copy_(self._jitter(v[pick], 0.01, generator))
        self.ready.fill_(True)

    def _jitter(self, x: torch.Tensor, scale: float, generator: Optional[torch.Generator]) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        return x + scale * x.norm(dim=-1, keepdim=True).clamp_min(1e-6) * noise / math.sqrt(x.shape[-1])

    @torch.no_grad()
    def reseed(self, pool: torch.Tensor, noise: float, generator: Optional[torch.Generator] = None) -> int:
        """Move every centre that no vector chose since the last call to a random vector of `pool` (N, D).
        Returns how many were re-seeded."""
        dead = (self.window == 0).nonzero().squeeze(-1)
        self.window.zero_()
        if len(dead) == 0 or len(pool) == 0:
            return 0
        pick = torch.randint(len(pool), (len(dead),), generator=generator, device="cpu").to(pool.device)
        self.centres[dead] = self._jitter(pool.detach()[pick].to(self.centres.dtype), noise, generator)
        self.reseeded += len(dead)
        return int(len(dead))

    def health(self) -> dict:
        """Usage histogram (this epoch's assignments per centre, most used first), share in use, re-seeds."""
        usage = self.usage.cpu()
        total = self.total.cpu()
        p = usage.double() / max(1, int(usage.sum()))
        ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(p))) if len(p) > 1 else 0.0
        return {
            "centres": int(len(usage)),
            "in_use": float((usage > 0).double().mean()),  # share chosen by at least one vector this epoch
            "in_use_ever": float((total > 0).double().mean()),
            "usage_entropy": round(ent, 4),  # 1 = perfectly even use of all centres
            "reseeded": int(self.reseeded),
            "usage": sorted(usage.tolist(), reverse=True),
        }


class UIEOutput(NamedTuple):
    vectors: torch.Tensor  # (B, F): UPE ⊕ UCBE ⊕ UCSE (those switched on), to concatenate to the PLE input
    profile: torch.Tensor  # (B, Dp) p_u, stop-gradient
    seq: torch.Tensor  # (B, Ds) the sequence vector, stop-gradient
    target: torch.Tensor  # (B, D) target item vector, stop-gradient


class UIE(nn.Module):
    """The three enhancement vectors (SPEC §4.2) and their memories.

    Args:
        cfg: UIE hyper-parameters.
        item_dim: D, width of the main model's item embedding.
        seq_dim: Ds, width of the sequence vector the main model hands over.
        n_users: U, users with a per-user memory (ids 1..U-1; 0 and ids >= U are unseen).

    Example:
        >>> uie = UIE(UIEConfig(clusters=8, profile_dim=4, profile_tower=(8,), generalisation=(6,)), item_dim=5, seq_dim=7, n_users=10)
        >>> hist_e, mask = torch.randn(2, 3, 5), torch.tensor([[True, True, False], [True, False, False]])
        >>> out = uie(torch.tensor([1, 12]), hist_e, mask, torch.tensor([2, 1]), torch.randn(2, 7), torch.randn(2, 5))
        >>> out.vectors.shape  # 6 (UPE) + 5 (UCBE) + 7 (UCSE)
        torch.Size([2, 18])
    """

    def __init__(self, cfg: UIEConfig, item_dim: int, seq_dim: int, n_users: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_dim, self.seq_dim = item_dim, seq_dim
        C = cfg.clusters
        tower = MLP(2 * item_dim + 1, cfg.profile_tower, "relu")
        self.profile_tower = nn.Sequential(tower, nn.Linear(tower.out_dim, cfg.profile_dim))  # auxiliary tower -> p_u
        self.profile_memory = ClusterMemory(C, cfg.profile_dim, cfg.rho, cfg.init)
        self.generalisation = MLP(2 * cfg.profile_dim, cfg.generalisation, "relu")
        self.item_memory = ClusterMemory(C, item_dim, cfg.rho, cfg.init)
        self.register_buffer("user_memory", torch.zeros(max(n_users, 1), item_dim))  # (U, D) m_u
        self.register_buffer("user_seen", torch.zeros(max(n_users, 1), dtype=torch.bool))
        self.seq_memory = ClusterMemory(C, seq_dim, cfg.rho, cfg.init)
        self.seq_query = nn.Linear(item_dim, seq_dim, bias=False)  # UCSE target attention: c_k · W e_a
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.generator: Optional[torch.Generator] = None  # made lazily on the memories' device
        self.out_dim = (self.generalisation.out_dim if cfg.upe else 0) + (item_dim if cfg.ucbe else 0) + (seq_dim if cfg.ucse else 0)

    def memories(self) -> dict[str, ClusterMemory]:
        return {"profile": self.profile_memory, "item": self.item_memory, "sequence": self.seq_memory}

    # ---------------------------------------------------------------- the three vectors

    def profile(self, hist_e: torch.Tensor, mask: torch.Tensor, n_events: torch.Tensor) -> torch.Tensor:
        """p_u (B, Dp) from the stop-gradient history (mean and last item) and activity: the tower
        learns from the main loss, the shared embeddings do not."""
        hist_e = hist_e.detach()
        m = mask.to(hist_e.dtype)[..., None]  # (B, T, 1)
        n = m.sum(1).clamp_min(1)  # (B, 1)
        mean = (hist_e * m).sum(1) / n  # (B, D)
        last_idx = (mask.sum(1) - 1).clamp_min(0)  # (B,)
        last = hist_e[torch.arange(len(hist_e), device=hist_e.device), last_idx] * (mask.sum(1, keepdim=True) > 0)  # (B, D)
        act = torch.log1p(n_events.to(hist_e.dtype))[:, None]  # (B, 1)
        return self.profile_tower(torch.cat([mean, last, act], -1))  # (B, Dp)

    def upe(self, p_u: torch.Tensor) -> torch.Tensor:
        """UPE: top-k1 profile centres, exp(sim)-weighted (negatives 0), ⊕ p_u -> generalisation MLP (B, G)."""
        r = self.profile_memory.retrieve(p_u.detach(), self.cfg.top_k)
        mix = (r.weight[..., None] * r.centres).sum(-2)  # (B, Dp)
        return self.generalisation(torch.cat([mix, p_u], -1))

    def history_centres(self, hist_e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The cold-start UCBE vector (B, D): mean of the positively similar top-k2 item centres of the
        history's items; with none (empty history), the mean of the centres in use."""
        r = self.item_memory.retrieve(hist_e.detach(), self.cfg.top_k)  # centres (B, T, k, D)
        valid = (r.sim > 0) & mask[..., None]  # (B, T, k)
        w = valid.to(hist_e.dtype)
        n = w.sum((1, 2))  # (B,)
        mix = (w[..., None] * r.centres).sum((1, 2)) / n.clamp_min(1)[:, None]  # (B, D)
        c = self.item_memory.centres
        used = (self.item_memory.total > 0).to(c.dtype)
        fallback = (used[:, None] * c).sum(0) / used.sum() if bool(used.sum() > 0) else c.mean(0)  # (D,)
        return torch.where(n[:, None] > 0, mix, fallback.expand_as(mix))

    def ucbe(self, user: torch.Tensor, hist_e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """UCBE (B, D): the per-user memory m_u for users seen in training, else the history's centres.

        In training mode every row takes the history's centres: training samples of one user come in
        shuffled order, so m_u already holds the centres of later targets (this very sample's
        included, from earlier epochs) — a label leak the model learns to lean on and cannot use at
        test time (measured: -0.01 AUC on sparse users). The history's centres are what the memory
        held from the events before the sample. With `memory_at_eval`, evaluation and serving read
        m_u, which there holds past events only; else they use the history's centres too.
        """
        if self.training or not self.cfg.memory_at_eval:
            return self.history_centres(hist_e, mask)
        user = user.long()
        U = self.user_memory.shape[0]
        known = (user > 0) & (user < U)
        safe = torch.where(known, user, torch.zeros_like(user))
        known = known & self.user_seen[safe]
        if bool(known.all()):
            return self.user_memory[safe]
        return torch.where(known[:, None], self.user_memory[safe], self.history_centres(hist_e, mask))

    def ucse(self, seq: torch.Tensor, e_a: torch.Tensor) -> torch.Tensor:
        """UCSE (B, Ds): target attention (query W e_a) over the top-k3 sequence centres with sim > 0."""
        r = self.seq_memory.retrieve(seq.detach(), self.cfg.top_k)  # centres (B, k, Ds)
        scores = (r.centres * self.seq_query(e_a.detach())[:, None, :]).sum(-1)  # (B, k); W learns, the embeddings do not
        ok = r.sim > 0
        a = torch.softmax(scores.masked_fill(~ok, torch.finfo(scores.dtype).min), -1) * ok
        return (a[..., None] * r.centres).sum(1)  # (B, Ds)

    def forward(self, user: torch.Tensor, hist_e: torch.Tensor, mask: torch.Tensor, n_events: torch.Tensor,
                seq: torch.Tensor, e_a: torch.Tensor) -> UIEOutput:
        """Enhancement vectors for a batch.

        Args:
            user: (B,) ids (0 / >= n_users = unseen).
            hist_e: (B, T, D) history item embeddings of the main model (used stop-gradient).
            mask: (B, T) bool, True = real behaviour.
            n_events: (B,) the user's history length at the sample (activity).
            seq: (B, Ds) the main model's sequence vector (used stop-gradient for the memory).
            e_a: (B, D) the target item embedding (the UCSE attention query, stop-gradient: UIE reads the
                shared embeddings and never updates them).
        """
        p_u = self.profile(hist_e, mask, n_events)  # (B, Dp)
        parts = []
        if self.cfg.upe:
            parts.append(self.upe(p_u))  # (B, G)
        if self.cfg.ucbe:
            parts.append(self.ucbe(user, hist_e, mask))  # (B, D)
        if self.cfg.ucse:
            parts.append(self.ucse(seq, e_a))  # (B, Ds)
        return UIEOutput(torch.cat(parts, -1), p_u.detach(), seq.detach(), e_a.detach())

    # ---------------------------------------------------------------- training-time memory updates

    def _gen(self) -> torch.Generator:
        """The CPU generator of the sampling and seeding (indices move to the memories' device)."""
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.cfg.seed)
        return self.generator

    @torch.no_grad()
    def update(self, out: UIEOutput, user: torch.Tensor, hist_e: torch.Tensor, mask: torch.Tensor,
               n_events: torch.Tensor, positive: torch.Tensor) -> dict[str, float]:
        """One training step of the memories (no gradient anywhere): stream clustering of each memory
        on bucket-uniform samples, the per-user memories' SGD step, periodic re-seeding.

        Args:
            out: this batch's `forward` output.
            user, hist_e, mask, n_events: as for `forward`.
            positive: (B,) bool, positive (engaged / clicked) samples: only they update the item
                memory and the per-user memories.

        Returns:
            {"ucbe": the per-user memory loss before the step (mean over positives)}.
        """
        g = self._gen()
        buckets = activity_bucket(n_events.long(), self.cfg.buckets)  # (B,)
        n = self.cfg.update_size
        cpu = lambda x: x.cpu()
        pools: dict[str, torch.Tensor] = {}
        if self.cfg.upe:
            pick = bucket_uniform_sample(cpu(buckets), n, g).to(buckets.device)
            pools["profile"] = out.profile[pick]
            self.profile_memory.update(pools["profile"], g)
        if self.cfg.ucse:
            pick = bucket_uniform_sample(cpu(buckets), n, g).to(buckets.device)
            pools["sequence"] = out.seq[pick]
            self.seq_memory.update(pools["sequence"], g)
        parts: dict[str, float] = {}
        pos = positive.bool().nonzero().squeeze(-1)  # (P,)
        if self.cfg.ucbe and len(pos):
            pick = pos[bucket_uniform_sample(cpu(buckets[pos]), n, g).to(pos.device)]
            pools["item"] = out.target[pick]
            self.item_memory.update(pools["item"], g)
            parts["ucbe"] = self.user_memory_step(user[pos], out.target[pos], hist_e[pos], mask[pos])
        self.steps += 1
        every = self.cfg.reseed_every
        if every and int(self.steps) % every == 0:
            for name, pool in pools.items():
                self.memories()[name].reseed(pool, self.cfg.reseed_noise, g)
        return parts

    @torch.no_grad()
    def user_memory_step(self, user: torch.Tensor, e_pos: torch.Tensor, hist_e: torch.Tensor, mask: torch.Tensor) -> float:
        """SGD on α Σ_k ‖m_u - c_k‖² over the positive samples' top-k2 item centres (sim > 0 only).
        Users seen for the first time start from their history's centres. Returns the loss before the step."""
        user = user.long()
        U = self.user_memory.shape[0]
        ok = (user > 0) & (user < U)
        user, e_pos, hist_e, mask = user[ok], e_pos[ok], hist_e[ok], mask[ok]
        if len(user) == 0:
            return 0.0
        new = ~self.user_seen[user]
        if bool(new.any()):
            self.user_memory[user[new]] = self.history_centres(hist_e[new], mask[new])
            self.user_seen[user[new]] = True
        r = self.item_memory.retrieve(e_pos.detach(), self.cfg.top_k)  # centres (P, k, D)
        w = (r.sim > 0).to(e_pos.dtype)  # (P, k): negatively similar centres do not pull
        m = self.user_memory[user]  # (P, D)
        diff = m[:, None, :] - r.centres  # (P, k, D)
        loss = self.cfg.ucbe_alpha * (w[..., None] * diff * diff).sum((1, 2))  # (P,)
        grad = 2 * self.cfg.ucbe_alpha * (w[..., None] * diff).sum(1)  # (P, D)
        times = torch.bincount(user, minlength=U)[user].to(grad.dtype)[:, None]  # a user's samples share one step
        self.user_memory.index_add_(0, user, -self.cfg.user_lr * grad / times)
        return float(loss.mean())

    def start_epoch(self) -> None:
        """Reset the per-epoch usage counters (the usage reported is the last epoch's)."""
        for mem in self.memories().values():
            mem.usage.zero_()

    def health(self) -> dict:
        """Per memory: usage histogram, share of centres in use, re-seeds; per-user memories seen."""
        on = {"profile": self.cfg.upe, "item": self.cfg.ucbe, "sequence": self.cfg.ucse}
        out = {name: mem.health() for name, mem in self.memories().items() if on[name]}
        out["users_with_memory"] = int(self.user_seen.sum())
        return out
