"""PLE: Progressive Layered Extraction (Tang et al., RecSys 2020) for multi-task ranking, SPEC §4.1,
optionally enhanced by UIE (SPEC §4.2, `facetrec.models.uie`).

Shape legend: B batch, T history length, D item embedding width, F PLE input width,
K tasks, E_t experts per task, E_s shared experts, H expert output width, G gate width (E_t + E_s).

    hist (B, T), target (B,) -> sequence features x (B, F)
        pool:  [mean e_b, e_a, mean e_b ∘ e_a, log(1 + n)]
        dien:  [h'_T, e_a, h'_T ∘ e_a, mean e_b, log(1 + n)]       (DIEN's evolved interest state, + aux loss)
    (+ UIE: x ⊕ UPE ⊕ UCBE ⊕ UCSE)
    level 1..L (CGC): task k's experts and the shared experts on their own inputs;
        task gate g_k = softmax(W_k x_k) over E_t + E_s experts        -> x_k' = Σ g_k · experts (B, H)
        shared gate g_s = softmax(W_s x_s) over all experts (not on the last level) -> x_s'
    tower_k(x_k) -> logit_k                                              -> (B, K)

The model returns logits; `multitask_loss` holds the loss (masked BCE per task, weighted, plus
DIEN's auxiliary loss when the sequence part is DIEN).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from facetrec.data.batches import MultiTaskBatch, RankingBatch
from facetrec.models.dien import DIEN, EVOLUTIONS, UPDATE, DIENConfig, ItemEmbedding, gated_scan, pack
from facetrec.models.layers import MLP
from facetrec.models.uie import UIE, UIEConfig, UIEOutput

# Task names and what their labels mean (train/multitask.py derives them from the prepared data).
TASKS = {
    "click": "positive target vs sampled negative",
    "engaged": "positive target (a review) vs sampled negative",
    "liked": "positive target with rating >= like_threshold",
    "purchase": "positive target whose behaviour is in purchase_behaviors",
}
SEQUENCES = ("pool", "dien")


@dataclass(frozen=True)
class PLEConfig:
    """Hyper-parameters of PLE (and of UIE when `use_uie`).

    Example:
        >>> PLEConfig(n_items=100, tasks=("engaged", "liked")).levels
        2
    """

    # keys only training reads (losses, initialisation, memory updates): `evaluate --set` refuses them
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("aux_alpha", "dropout", "task_weights", "warm_start")

    n_items: int  # item vocabulary incl. padding 0
    tasks: tuple[str, ...] = ()  # task names (see TASKS); the first is the engaged/click task. () = from the data
    embed_dim: int = 32  # per field: e_i = E_id[i] ⊕ E_cat[c(i)] as in DIEN
    category_field: str = ""  # as DIENConfig.category_field
    item_fields: tuple[str, ...] = ()  # as DIENConfig.item_fields: further item fields averaged into e_i
    sequence: str = "pool"  # pool | dien: DIEN's interest state is the sequence input (and UCSE's sequence vector)
    hidden: int = 0  # dien: extractor GRU width (0 = D)
    evolve_hidden: int = 0  # dien: evolving GRU width (0 = hidden)
    evolution: str = "augru"  # dien: augru | agru | aigru
    aux_alpha: float = 1.0  # dien: weight of DIEN's auxiliary loss
    levels: int = 2  # CGC levels stacked (progressive extraction)
    task_experts: int = 2  # E_t, experts per task per level
    shared_experts: int = 2  # E_s, shared experts per level
    expert: tuple[int, ...] = (128, 64)  # expert MLP sizes (last = H)
    tower: tuple[int, ...] = (32,)  # per-task tower hidden sizes, then a linear layer to the logit
    activation: str = "relu"  # relu | prelu | dice in experts and towers
    dropout: float = 0.0  # dropout in experts and towers
    task_weights: tuple[float, ...] = ()  # loss weight per task (() = all 1)
    like_threshold: float = 4.0  # liked: rating >= this
    purchase_behaviors: tuple[str, ...] = ("buy",)  # purchase: these behaviours count (e.g. add cart, fav)
    task_scope: dict[str, str] = field(default_factory=dict)  # task -> "all" (default: negatives are 0) | "positives" (only engaged samples count)
    n_users: int = 0  # users with a UCBE memory or a user-id embedding (filled from the data by training)
    user_dim: int = 0  # > 0: a learned user-id embedding this wide joins the input (id 0 and ids >= n_users: unknown, zeros); train.embed_l2 covers its rows
    use_uie: bool = False  # model "ple-uie" sets it
    uie: Any = field(default_factory=dict)  # UIEConfig or its fields as a mapping
    warm_start: str = ""  # training: a run dir or .pt whose matching weights initialise this model

    def __post_init__(self) -> None:
        if self.n_items < 2:
            raise ValueError(f"n_items = {self.n_items}: need padding 0 and at least one real item")
        tasks = tuple(self.tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks {unknown} unknown; choose from {', '.join(TASKS)} (e.g. tasks: [engaged, liked])")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks {list(tasks)} repeat a name")
        if tasks and tasks[0] not in ("click", "engaged"):
            raise ValueError(f"the first task must be click or engaged (the positive-vs-negative task), got {tasks[0]!r}")
        if self.task_weights and len(self.task_weights) != len(tasks):
            raise ValueError(f"task_weights {list(self.task_weights)} must have one weight per task {list(tasks)}")
        bad_scope = {k: v for k, v in dict(self.task_scope).items() if k not in tasks or v not in ("all", "positives")}
        if bad_scope:
            raise ValueError(f"task_scope {bad_scope}: keys must be tasks of this model, values 'all' or 'positives'")
        if self.sequence not in SEQUENCES:
            raise ValueError(f"sequence {self.sequence!r} must be one of {', '.join(SEQUENCES)}")
        if self.evolution not in EVOLUTIONS:
            raise ValueError(f"evolution {self.evolution!r} must be one of {', '.join(EVOLUTIONS)}")
        if self.levels < 1 or self.task_experts < 1 or self.shared_experts < 0 or not self.expert:
            raise ValueError("levels and task_experts must be >= 1, shared_experts >= 0, expert non-empty")
        if self.activation not in ("relu", "prelu", "dice"):
            raise ValueError(f"activation {self.activation!r} must be relu, prelu or dice")
        if self.user_dim < 0:
            raise ValueError(f"user_dim {self.user_dim} must be >= 0 (0 = no user-id embedding)")
        uie = self.uie
        if isinstance(uie, dict):
            hints = {f.name for f in dataclasses.fields(UIEConfig)}
            bad = sorted(set(uie) - hints)
            if bad:
                raise ValueError(f"unknown uie key(s) {', '.join('uie.' + k for k in bad)}; valid: {', '.join(sorted(hints))}")
            uie = UIEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in uie.items()})
        elif not isinstance(uie, UIEConfig):
            raise ValueError(f"uie must be a mapping of UIE settings, got {uie!r}")
        object.__setattr__(self, "uie", uie)
        object.__setattr__(self, "tasks", tasks)

    def scope(self, task: str) -> str:
        return dict(self.task_scope).get(task, "all")


class CGC(nn.Module):
    """One Customized Gate Control level (PLE §4.2-4.3): task experts, shared experts, softmax gates.

    Args:
        in_dim: input width of every path.
        n_tasks: K.
        cfg: expert counts and sizes.
        shared_gate: also build the shared path's gate (every level but the last).

    Example:
        >>> cgc = CGC(6, 2, PLEConfig(n_items=5, expert=(4,)), shared_gate=True)
        >>> outs, shared, gates = cgc([torch.randn(3, 6)] * 2, torch.randn(3, 6))
        >>> [o.shape for o in outs], shared.shape, gates[0].shape, gates[-1].shape
        ([torch.Size([3, 4]), torch.Size([3, 4])], torch.Size([3, 4]), torch.Size([3, 4]), torch.Size([3, 6]))
    """

    def __init__(self, in_dim: int, n_tasks: int, cfg: PLEConfig, shared_gate: bool) -> None:
        super().__init__()
        expert = lambda: MLP(in_dim, cfg.expert, cfg.activation, cfg.dropout)
        self.task_experts = nn.ModuleList([nn.ModuleList([expert() for _ in range(cfg.task_experts)]) for _ in range(n_tasks)])
        self.shared_experts = nn.ModuleList([expert() for _ in range(cfg.shared_experts)])
        self.task_gates = nn.ModuleList([nn.Linear(in_dim, cfg.task_experts + cfg.shared_experts) for _ in range(n_tasks)])
        n_all = n_tasks * cfg.task_experts + cfg.shared_experts
        self.shared_gate = nn.Linear(in_dim, n_all) if shared_gate else None
        self.out_dim = cfg.expert[-1]

    def forward(self, task_in: List[torch.Tensor], shared_in: torch.Tensor
                ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], List[torch.Tensor]]:
        """task_in: K x (B, F), shared_in (B, F) -> K x (B, H), shared (B, H) or None, gates [K x (B, G)] (+ shared (B, E))."""
        B = shared_in.shape[0]
        shared = [e(shared_in) for e in self.shared_experts]  # E_s x (B, H)
        outs, gates, all_experts = [], [], []
        for k, experts in enumerate(self.task_experts):
            mine = [e(task_in[k]) for e in experts]  # E_t x (B, H)
            all_experts += mine
            stack = torch.stack(mine + shared, 1)  # (B, G, H)
            g = torch.softmax(self.task_gates[k](task_in[k]), -1)  # (B, G)
            outs.append(torch.einsum("bg,bgh->bh", g, stack))  # (B, H)
            gates.append(g)
        shared_out = None
        if self.shared_gate is not None:
            stack = torch.stack(all_experts + shared, 1)  # (B, K E_t + E_s, H)
            g = torch.softmax(self.shared_gate(shared_in), -1)
            shared_out = torch.einsum("bg,bgh->bh", g, stack)
            gates.append(g)
        assert all(o.shape[0] == B for o in outs)
        return outs, shared_out, gates


class PLEOutput(NamedTuple):
    logits: torch.Tensor  # (B, K)
    aux: torch.Tensor  # DIEN auxiliary loss (scalar; 0 without DIEN or with aux_alpha 0)
    gates: List[List[torch.Tensor]]  # per level: K task gates (B, E_t + E_s) (+ the shared gate)
    uie: Optional[UIEOutput]
    hist_e: torch.Tensor  # (B, T, D) history embeddings (what UIE's memories read, stop-gradient)


class PLE(nn.Module):
    """PLE multi-task ranker over DIEN-style inputs, with optional UIE enhancement vectors.

    Args:
        cfg: hyper-parameters (tasks, sequence part, levels, experts, towers, UIE).
        item_features: field -> (n_items, W) int ids; the category field gives c(i).
        field_vocab: field -> vocabulary size incl. padding.

    Example:
        >>> cfg = PLEConfig(n_items=20, tasks=("engaged", "liked"), embed_dim=4, expert=(8,), tower=(4,))
        >>> m = PLE(cfg, {"cate": torch.randint(1, 3, (20, 1))}, {"cate": 3})
        >>> hist = torch.tensor([[3, 5, 7], [2, 0, 0]])
        >>> b = RankingBatch(torch.tensor([1, 2]), hist, hist > 0, hist, torch.tensor([4, 9]), torch.tensor([1.0, 0.0]))
        >>> m(b).shape
        torch.Size([2, 2])
    """

    def __init__(self, cfg: PLEConfig, item_features: dict[str, torch.Tensor], field_vocab: dict[str, int]) -> None:
        super().__init__()
        if not cfg.tasks:
            raise ValueError("PLEConfig.tasks is empty; name the tasks (e.g. tasks: [click]) or train through "
                             "`facetrec train`, which derives them from the data")
        self.cfg = cfg
        self.dien: Optional[DIEN] = None
        if cfg.sequence == "dien":
            dcfg = DIENConfig(n_items=cfg.n_items, embed_dim=cfg.embed_dim, category_field=cfg.category_field,
                              item_fields=cfg.item_fields, hidden=cfg.hidden,
                              evolve_hidden=cfg.evolve_hidden, evolution=cfg.evolution, aux_alpha=cfg.aux_alpha, mlp=(1,), pooled_product=False,
                              activation="prelu")
            self.dien = DIEN(dcfg, item_features, field_vocab)
            self.dien.head = nn.Identity()  # PLE replaces DIEN's output MLP
            self.items = self.dien.items
            D = self.items.dim
            H = dcfg.hidden or D
            H2 = dcfg.evolve_hidden or H
            seq_in, seq_dim = 2 * H2 + 2 * D + 1, H  # UCSE reads the extractor's last state (target-free)
        else:
            self.items = ItemEmbedding(DIENConfig(n_items=cfg.n_items, embed_dim=cfg.embed_dim, category_field=cfg.category_field,
                                                  item_fields=cfg.item_fields), item_features, field_vocab)
            D = self.items.dim
            seq_in, seq_dim = 3 * D + 1, D  # UCSE reads the mean history embedding
        self.uie = UIE(cfg.uie, D, seq_dim, cfg.n_users) if cfg.use_uie else None
        self.user: Optional[nn.Embedding] = None
        if cfg.user_dim > 0:
            self.user = nn.Embedding(max(cfg.n_users, 1), cfg.user_dim, padding_idx=0)
            nn.init.normal_(self.user.weight, std=0.05)  # small, as the item rows: a rarely seen user stays near unknown
            with torch.no_grad():
                self.user.weight[0].zero_()
        in_dim = seq_in + (self.uie.out_dim if self.uie is not None else 0) + cfg.user_dim
        K = len(cfg.tasks)
        levels, d = [], in_dim
        for level in range(cfg.levels):
            levels.append(CGC(d, K, cfg, shared_gate=level < cfg.levels - 1))
            d = levels[-1].out_dim
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleList([nn.Sequential(MLP(d, cfg.tower, cfg.activation, cfg.dropout),
                                                   nn.Linear(cfg.tower[-1] if cfg.tower else d, 1)) for _ in range(K)])

    # ---------------------------------------------------------------- sequence part

    def _pool_features(self, batch: RankingBatch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = batch.hist_mask.bool()
        hist_e = self.items(batch.hist * mask)  # (B, T, D)
        e_a = self.items(batch.target)  # (B, D)
        m = mask.to(hist_e.dtype)[..., None]
        mean = (hist_e * m).sum(1) / m.sum(1).clamp_min(1)  # (B, D)
        act = torch.log1p(_n_events(batch).to(hist_e.dtype))[:, None]  # (B, 1)
        x = torch.cat([mean, e_a, mean * e_a, act], -1)  # (B, 3D + 1)
        return x, hist_e, mean, e_a, hist_e.new_zeros(())

    def _dien_features(self, batch: RankingBatch, with_aux: bool):
        """DIEN's extractor + attention + evolution (its own code paths), without its output MLP."""
        d = self.dien
        assert d is not None
        mask = batch.hist_mask.bool()
        p = pack(mask)
        ids = [p.take(batch.hist), batch.target[p.order]]
        if with_aux:
            src, dst = p.pairs()
            ids.append(p.take(batch.aux_neg).index_select(0, dst))
        parts = d.items(torch.cat(ids)).split([len(x) for x in ids])
        e, e_a = parts[0], parts[1]  # (P, D), (B, D) in sorted order
        h = d._extract(e, p)  # (P, H)
        att = d._attend(h, e_a, p)  # (P,)
        h_T = d._evolve(h, att, p)  # (B, H')
        B = len(p.order)
        last = torch.cat([h.new_zeros(B, h.shape[1]), h]).index_select(0, p.final_rows)  # (B, H) extractor's last state
        e_q = e_a if d.target_proj is None else d.target_proj(e_a)
        n = torch.zeros_like(p.order).index_add_(0, p.row, torch.ones_like(p.row)).clamp_min(1)  # (B,) sorted
        mean = e.new_zeros(e_a.shape).index_add(0, p.row, e) / n[:, None].to(e.dtype)  # (B, D)
        act = torch.log1p(_n_events(batch)[p.order].to(e.dtype))[:, None]
        x = torch.cat([h_T, e_a, h_T * e_q, mean, act], -1)
        unsort = lambda t: torch.empty_like(t).index_copy(0, p.order, t)  # back to batch order
        aux = d._aux(h, src, e.index_select(0, dst), parts[2], ids[0].index_select(0, dst), ids[2], p) if with_aux \
            else x.new_zeros(())
        hist_e = d.items(batch.hist * mask)  # (B, T, D) for UIE (stop-gradient there)
        return unsort(x), hist_e, unsort(last), unsort(e_a), aux

    # ---------------------------------------------------------------- public

    def outputs(self, batch: RankingBatch, with_aux: bool = False) -> PLEOutput:
        """Logits (B, K) and what training needs besides: DIEN's aux loss, the gates, UIE's vectors."""
        if self.dien is not None:
            x, hist_e, seq, e_a, aux = self._dien_features(batch, with_aux and self.cfg.aux_alpha > 0)
        else:
            x, hist_e, seq, e_a, aux = self._pool_features(batch)
        uie_out = None
        if self.uie is not None:
            uie_out = self.uie(batch.user, hist_e, batch.hist_mask.bool(), _n_events(batch), seq, e_a)
            x = torch.cat([x, uie_out.vectors], -1)  # (B, F)
        if self.user is not None:
            u = batch.user.long()
            u = torch.where((u > 0) & (u < self.user.num_embeddings), u, torch.zeros_like(u))
            x = torch.cat([x, self.user(u)], -1)  # unknown users: the zero row
        task_in, shared_in, all_gates = [x] * len(self.cfg.tasks), x, []
        for level in self.levels:
            task_in, shared_out, gates = level(task_in, shared_in)
            shared_in = shared_out if shared_out is not None else shared_in
            all_gates.append(gates)
        logits = torch.cat([tower(t) for tower, t in zip(self.towers, task_in)], -1)  # (B, K)
        return PLEOutput(logits, aux, all_gates, uie_out, hist_e)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """Logits (B, K), one column per task in `cfg.tasks` order (sigmoid for probabilities)."""
        return self.outputs(batch).logits

    def gates(self, batch: RankingBatch) -> List[List[torch.Tensor]]:
        """Gate weights per level: K task gates (B, E_t + E_s), then the shared gate (all but the last level)."""
        return self.outputs(batch).gates

    @torch.no_grad()
    def score_candidates(self, hist: torch.Tensor, hist_mask: torch.Tensor, candidates: torch.Tensor,
                         user: Optional[int] = None, n_events: Optional[int] = None) -> torch.Tensor:
        """Serving: logits (N, K) of N candidates for one history (T,) or (1, T).

        `n_events` is the user's whole history length (the activity feature and UIE's bucket read it,
        as training's samples give it, not capped at T); default: the real positions of `hist`."""
        N = candidates.shape[0]
        dev = candidates.device
        h = hist.reshape(1, -1).expand(N, -1)
        m = hist_mask.reshape(1, -1).bool().expand(N, -1)
        n = int(m[0].sum()) if n_events is None else int(n_events)
        b = MultiTaskBatch(user=torch.full((N,), 0 if user is None else int(user), dtype=torch.long, device=dev),
                           hist=h, hist_mask=m, aux_neg=h, target=candidates, label=torch.zeros(N, device=dev),
                           labels=torch.zeros(N, len(self.cfg.tasks), device=dev),
                           label_mask=torch.zeros(N, len(self.cfg.tasks), dtype=torch.bool, device=dev),
                           n_events=torch.full((N,), n, dtype=torch.long, device=dev))
        return self(b)


def _n_events(batch: RankingBatch) -> torch.Tensor:
    """History length at the sample: the batch's own count when it has one, else the mask's."""
    n = getattr(batch, "n_events", None)
    return n if n is not None else batch.hist_mask.sum(1)


def multitask_loss(model: PLE, batch: MultiTaskBatch, out: Optional[PLEOutput] = None) -> Tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k w_k · BCE_k over the samples that count for task k, + α · DIEN aux loss (sequence: dien).

    Returns the total and its parts (detached): {"bce/<task>", ("aux")}.

    Example:
        >>> cfg = PLEConfig(n_items=20, tasks=("click",), embed_dim=4, expert=(8,), tower=(4,))
        >>> m = PLE(cfg, {"cate": torch.randint(1, 3, (20, 1))}, {"cate": 3})
        >>> hist = torch.tensor([[3, 5, 7], [2, 0, 0]])
        >>> b = MultiTaskBatch(torch.tensor([1, 2]), hist, hist > 0, hist, torch.tensor([4, 9]), torch.tensor([1.0, 0.0]),
        ...                    torch.tensor([[1.0], [0.0]]), torch.ones(2, 1, dtype=torch.bool), torch.tensor([3, 1]))
        >>> sorted(multitask_loss(m, b)[1])
        ['bce/click']
    """
    out = out if out is not None else model.outputs(batch, with_aux=True)
    cfg = model.cfg
    weights = cfg.task_weights or (1.0,) * len(cfg.tasks)
    total = out.logits.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    mask = batch.label_mask.to(out.logits.dtype)  # (B, K)
    bce = F.binary_cross_entropy_with_logits(out.logits, batch.labels.to(out.logits.dtype), reduction="none")  # (B, K)
    for k, task in enumerate(cfg.tasks):
        loss_k = (bce[:, k] * mask[:, k]).sum() / mask[:, k].sum().clamp_min(1)
        total = total + weights[k] * loss_k
        parts[f"bce/{task}"] = loss_k.detach()
    if model.dien is not None and cfg.aux_alpha > 0:
        total = total + cfg.aux_alpha * out.aux
        parts["aux"] = out.aux.detach()
    return total, parts
