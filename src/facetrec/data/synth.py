"""Synthetic logs with planted, drifting interests (`facetrec synth`).

Each item belongs to one category (an interest cluster); within a category items have Zipf
popularity. Each user has 1-6 planted interests (categories). Their weights drift over the
user's history: a start mixture w0 (Dirichlet) moves linearly to an end mixture w1, so the
interest that dominates late may not be the one that dominated early — what DIEN models.
Each event picks an interest by the current weights, then an item of that category.

Written in the `generic` format (interactions.tsv + items.tsv, like amazon-beauty), so the
same reader and config serve both. The planted truth goes to truth.parquet (user, interest
rank, category, w0, w1) for tests that check what models recover.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm


@dataclass(frozen=True)
class SynthConfig:
    n_users: int = 2000
    n_items: int = 5000
    n_categories: int = 50
    min_interests: int = 1
    max_interests: int = 6
    min_events: int = 10  # events per user drawn log-uniformly in [min_events, max_events]
    max_events: int = 60
    zipf: float = 1.1  # within-category popularity exponent
    concentration: float = 0.5  # Dirichlet concentration of the interest mixtures
    seed: int = 0
    chunk_users: int = 200_000  # users generated per chunk (bounds memory for large logs)


def synth(cfg: SynthConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Write interactions.tsv, items.tsv, truth.parquet and synth.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.n_categories < cfg.max_interests:
        raise ValueError(f"n_categories ({cfg.n_categories}) must be >= max_interests ({cfg.max_interests})")
    if not 1 <= cfg.min_interests <= cfg.max_interests:
        raise ValueError("need 1 <= min_interests <= max_interests")
    rng = np.random.default_rng(cfg.seed)

    # items: category assignment and within-category popularity (Zipf over a random order)
    item_cat = rng.integers(0, cfg.n_categories, size=cfg.n_items)
    order = np.argsort(item_cat, kind="stable")
    cat_sizes = np.bincount(item_cat, minlength=cfg.n_categories)
    cat_start = np.concatenate([[0], np.cumsum(cat_sizes)[:-1]])
    rank_in_cat = np.empty(cfg.n_items, dtype=np.int64)
    rank_in_cat[order] = np.arange(cfg.n_items) - np.repeat(cat_start, cat_sizes)
    weight = 1.0 / (1.0 + rank_in_cat) ** cfg.zipf
    # per-category cumulative distribution over its items (items laid out in `order`)
    w_sorted = weight[order]
    cum = np.cumsum(w_sorted)
    cat_total = np.add.reduceat(w_sorted, cat_start) if cfg.n_items else np.zeros(0)
    cum_before = np.concatenate([[0.0], cum])[cat_start]

    pl.DataFrame({"item_id": np.arange(1, cfg.n_items + 1), "cate": item_cat + 1}).write_csv(out / "items.tsv", separator="\t")

    tmp = out / "interactions.tsv.tmp"
    truth_parts = []
    n_events_total = 0
    t_base = 1_500_000_000
    with open(tmp, "wb") as f:
        f.write(b"user_id\titem_id\ttimestamp\tcate\n")
        starts = range(0, cfg.n_users, cfg.chunk_users)
        for lo in tqdm(starts, desc="synth", unit="chunk", disable=not progress or len(starts) < 2):
            hi = min(cfg.n_users, lo + cfg.chunk_users)
            u = np.arange(lo, hi)
            n_u = len(u)
            k = rng.integers(cfg.min_interests, cfg.max_interests + 1, size=n_u)
            # planted categories: a random distinct set of size k per user (first k of a permutation)
            perms = np.argsort(rng.random((n_u, cfg.n_categories)), axis=1)[:, : cfg.max_interests]
            alive = np.arange(cfg.max_interests)[None, :] < k[:, None]
            w0 = rng.gamma(cfg.concentration, size=(n_u, cfg.max_interests)) * alive
            w1 = rng.gamma(cfg.concentration, size=(n_u, cfg.max_interests)) * alive
            w0 = (w0 + 1e-9 * alive) / (w0 + 1e-9 * alive).sum(1, keepdims=True)
            w1 = (w1 + 1e-9 * alive) / (w1 + 1e-9 * alive).sum(1, keepdims=True)
            n_ev = np.exp(rng.uniform(np.log(cfg.min_events), np.log(cfg.max_events + 1), size=n_u)).astype(np.int64)
            n_ev = np.clip(n_ev, cfg.min_events, cfg.max_events)
            ev_user = np.repeat(np.arange(n_u), n_ev)
            pos = np.arange(len(ev_user)) - np.repeat(np.cumsum(n_ev) - n_ev, n_ev)
            s = (pos / np.maximum(n_ev[ev_user] - 1, 1))[:, None]
            w = (1 - s) * w0[ev_user] + s * w1[ev_user]  # (E, max_interests)
            pick = (np.cumsum(w, 1) < rng.random((len(ev_user), 1))).sum(1)
            pick = np.minimum(pick, k[ev_user] - 1)
            cat = perms[ev_user, pick]
            r = cum_before[cat] + rng.random(len(ev_user)) * cat_total[cat]
            item = order[np.minimum(np.searchsorted(cum, r, side="right"), cfg.n_items - 1)]
            ts = t_base + np.repeat(rng.integers(0, 86400 * 30, size=n_u), n_ev) + pos * 3600
            chunk = pl.DataFrame({"user_id": ev_user + lo + 1, "item_id": item + 1, "timestamp": ts, "cate": item_cat[item] + 1})
            chunk.write_csv(f, separator="\t", include_header=False)
            n_events_total += len(ev_user)
            rank = np.broadcast_to(np.arange(cfg.max_interests), (n_u, cfg.max_interests))
            truth_parts.append(pl.DataFrame({
                "user_id": np.repeat(u + 1, cfg.max_interests)[alive.ravel()],
                "interest": rank[alive],
                "cate": perms[alive] + 1,
                "w0": w0[alive], "w1": w1[alive],
            }))
    os.replace(tmp, out / "interactions.tsv")
    pl.concat(truth_parts).write_parquet(out / "truth.parquet")
    meta = {"config": asdict(cfg), "events": int(n_events_total)}
    (out / "synth.json").write_text(json.dumps(meta, indent=2))
    return meta


def synth_data_config(root: str | Path, name: str = "synthetic") -> dict:
    """The `data:` section that reads a synth output (same layout as amazon-beauty)."""
    return {"name": name, "format": "generic", "root": str(root), "interactions": "interactions.tsv", "sep": "\t",
            "user": "user_id", "item": "item_id", "time": "timestamp", "item_fields": {"cate": "cate"}}
