"""`facetrec report RUN_DIR...`: PNG figures and one self-contained HTML page about trained runs.

    run dirs -> RunInfo (config, metrics.json, train_log.jsonl) -> sections, each:
        figures (PNG, matplotlib Agg) + HTML (tables, numbers) + notes (what was skipped and why)
    -> out/index.html (figures embedded as base64: no network, no side files) + out/report.json

Sections (issue #8): training curves; metrics against baselines with seed spread; per-user
coupling-coefficient heatmaps and the categories each interest retrieves (with the interests'
category diversity against two nulls: random splits of the retrieved items, and random interests
made from random splits of the history); K'_u and capsule-length distributions; DIEN attention
over a history; metrics by user-activity bucket (with / without UIE); ANN recall vs latency.
A section whose inputs are missing is replaced by a note, never a crash.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from facetrec.errors import ConfigError
from facetrec.io import write_bytes, write_json
from facetrec.report.analysis import (Diversity, ann_sweep, bucket_sort_key, history_splits, interest_diversity,
                                      mean_pairwise_js, mean_std, paired, random_split_js)
from facetrec.report.explain import coupling_matrix
from facetrec.report.runs import (BASELINES, LoadedModel, MissingInput, RunInfo, group_key, group_label, load_run,
                                  primary_task)

RETRIEVAL_METRICS = ("recall@20", "recall@50", "ndcg@50", "hr@50")
RANKING_METRICS = ("auc", "gauc", "logloss")
MONITOR = {"retrieval": "recall@50", "ranking": "auc"}


def _figure(*args, **kwargs):
    """A matplotlib Figure on the Agg canvas (no pyplot global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the report needs matplotlib: pip install 'facetrec[report]'") from None
    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


@dataclass
class Section:
    key: str
    title: str
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption)
    html: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportOptions:
    """What the report samples and how much it computes."""

    sample_users: int = 3  # users shown with heatmaps
    diversity_users: int = 500  # users over which the interests' category diversity is averaged (0 = all)
    top_m: int = 50  # items retrieved per interest for the category analysis
    seed: int = 0  # which users are sampled, the random splits
    ann_results: tuple[Path, ...] = ()  # benchmark JSON files (benchmarks/index_recall.py --out)
    results_dir: Path = Path("benchmarks/results")  # where index_recall*.json are looked for when none are given


class Report:
    """Builds the sections from run directories into `out`; `write()` assembles the page."""

    def __init__(self, run_dirs: Sequence[str | Path], out: str | Path, opts: ReportOptions = ReportOptions()) -> None:
        if not run_dirs:
            raise ConfigError("give at least one run directory, e.g. facetrec report runs/amazon-beauty/mind")
        self.runs = [load_run(p) for p in run_dirs]
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        _remove_previous_figures(self.out)
        self.opts = opts
        self.numbers: dict[str, Any] = {}  # -> report.json
        self._loaded: dict[Path, LoadedModel] = {}

    # ------------------------------------------------------------ helpers

    def _save(self, fig, name: str) -> Path:
        path = self.out / name
        fig.savefig(path, dpi=100)
        return path

    def _load(self, run: RunInfo) -> LoadedModel:
        if run.path not in self._loaded:
            self._loaded[run.path] = LoadedModel(run)
        return self._loaded[run.path]

    def _first(self, names: Sequence[str]) -> RunInfo:
        """The first run given of one of these models that has trained weights."""
        for r in self.runs:
            if r.name in names and (r.path / "best.pt").exists():
                return r
        raise MissingInput(f"needs a trained {' / '.join(names)} run (with best.pt) among the run directories")

    # ------------------------------------------------------------ 1. training curves

    def curves(self) -> Section:
        s = Section("curves", "Training curves")
        for task in ("retrieval", "ranking"):
            runs = [r for r in self.runs if r.task == task and r.log]
            if not runs:
                s.notes.append(f"no {task} run with a train_log.jsonl: {task} curves skipped")
                continue
            monitor = MONITOR[task]
            fig = _figure(figsize=(11, 4), layout="constrained")
            ax_loss, ax_valid = fig.subplots(1, 2)
            for r in runs:
                steps = [(e["step"], e["loss"]) for e in r.log if "loss" in e]
                valid = [(e["epoch"], v[monitor]) for e in r.log if "valid" in e
                         for v in [primary_task(e["valid"])] if monitor in v]
                if steps:
                    ax_loss.plot(*zip(*steps), label=r.label)
                if valid:
                    ax_valid.plot(*zip(*valid), marker="o", label=r.label)
            ax_loss.set(xlabel="step", ylabel="training loss (window mean)", title=f"{task}: loss")
            ax_valid.set(xlabel="epoch", ylabel=f"valid {monitor}", title=f"{task}: valid {monitor}")
            for ax in (ax_loss, ax_valid):
                ax.grid(alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
            s.figures.append((self._save(fig, f"curves_{task}.png"),
                              f"{task} runs: training loss per logged step window and validation {monitor} per epoch"))
        return s

    # ------------------------------------------------------------ 2. metrics against baselines

    def _groups(self, runs: list[RunInfo]) -> list[tuple[str, list[RunInfo]]]:
        groups: dict[tuple, list[RunInfo]] = {}
        for r in runs:
            groups.setdefault(group_key(r), []).append(r)
        return [(group_label(rs[0], runs), rs) for rs in groups.values()]

    def metrics(self) -> Section:
        s = Section("metrics", "Test metrics against baselines (mean ± std over seeds)")
        done = [r for r in self.runs if r.test]
        for r in self.runs:
            if r not in done:
                s.notes.append(f"{r.path}: no metrics.json yet (still training?) — left out of the table")
        if not done:
            raise MissingInput("no run has a metrics.json with test metrics")
        tables = {}
        fig = _figure(figsize=(11, 4), layout="constrained")
        tasks = [t for t in ("retrieval", "ranking") if any(r.task == t for r in done)]
        axes = np.atleast_1d(fig.subplots(1, len(tasks)))
        for ax, task in zip(axes, tasks):
            names = RETRIEVAL_METRICS if task == "retrieval" else RANKING_METRICS
            rows = []
            for label, rs in self._groups([r for r in done if r.task == task]):
                stats = {m: mean_std([r.test.get(m, float("nan")) for r in rs]) for m in names}
                rows.append({"model": label, "dataset": rs[0].dataset, "baseline": rs[0].name in BASELINES,
                             "seeds": sorted(r.seed for r in rs), "runs": [str(r.path) for r in rs],
                             **{m: {"mean": v[0], "std": v[1], "n": v[2]} for m, v in stats.items()}})
            tables[task] = rows
            s.html += _metrics_table(task, rows, names)
            monitor = MONITOR[task]
            x = np.arange(len(rows))
            means = [row[monitor]["mean"] for row in rows]
            stds = [0.0 if math.isnan(row[monitor]["std"]) else row[monitor]["std"] for row in rows]
            colors = ["#9e9e9e" if row["baseline"] else "#1f77b4" for row in rows]
            ax.bar(x, means, yerr=stds, capsize=4, color=colors)
            ax.set_xticks(x, [f"{row['model']}\n(n={row[monitor]['n']})" for row in rows], fontsize=8)
            ax.set(ylabel=f"test {monitor}", title=f"{task}: test {monitor} (grey = baseline; bars = ± std)")
            ax.grid(axis="y", alpha=0.3)
        self.numbers["metrics"] = tables
        s.figures.append((self._save(fig, "metrics.png"), "main test metric per model; error bars: std across seeds"))
        return s

    # ------------------------------------------------------------ 3 + 4. interests

    @torch.no_grad()
    def _routing_all(self, lm: LoadedModel) -> tuple[Any, np.ndarray, np.ndarray]:
        """Route every test user's evaluation history (as evaluation does).

        Returns the RetrievalEvalSet, valid (U, K) bool and capsule lengths (U, K).
        """
        from facetrec.data.dataset import retrieval_batch, retrieval_eval_set

        es = retrieval_eval_set(lm.prep, "test", lm.run.cfg.train.protocol)
        if len(es.users) == 0:
            raise MissingInput(f"{lm.run.path}: no test users to sample")
        valid, lengths = [], []
        for lo in range(0, len(es.users), 1024):
            b = retrieval_batch(lm.prep, es.users[lo:lo + 1024], es.ends[lo:lo + 1024], lm.prep.max_history)
            r = lm.model.route(b.hist, b.hist_mask, b.n_events)
            valid.append(r.valid.numpy())
            lengths.append(r.lengths.float().numpy())
        return es, np.concatenate(valid), np.concatenate(lengths)

    @torch.no_grad()
    def _retrieve_per_interest(self, lm: LoadedModel, users: np.ndarray, ends: np.ndarray,
                               index) -> tuple[Any, Any, list[list[np.ndarray]]]:
        """Each valid interest's own top-M items (before the merge over interests), history excluded.

        Returns the RetrievalBatch, its Routing, and per user a list of item-id arrays, one per valid interest.
        """
        from facetrec.data.dataset import retrieval_batch

        b = retrieval_batch(lm.prep, users, ends, lm.prep.max_history)
        routing = lm.model.route(b.hist, b.hist_mask, b.n_events)
        V = lm.model.interests_from_capsules(routing.capsules, routing.valid, b.user).float().numpy()  # (U, K, D)
        valid = routing.valid.numpy()
        owner = np.repeat(np.arange(len(users)), valid.sum(1))
        found = self._top_unseen(lm, index, V[valid], owner, users, ends)
        per_user: list[list[np.ndarray]] = [[] for _ in users]
        for u, items in zip(owner, found):
            per_user[u].append(items)
        return b, routing, per_user

    def _top_unseen(self, lm: LoadedModel, index, queries: np.ndarray, owner: np.ndarray, users: np.ndarray,
                    ends: np.ndarray) -> list[np.ndarray]:
        """Top-M items of each query (Q, D), without the items its owner (index into users) has seen."""
        from facetrec.data.dataset import history_csr

        off, seen_items = history_csr(lm.prep, users, ends)
        m = self.opts.top_m
        k = int(min(index.ntotal, m + np.diff(off).max(initial=0)))
        _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)  # (Q, k)
        return [row[(row > 0) & ~np.isin(row, seen_items[off[u]:off[u + 1]])][:m] for row, u in zip(ids, owner)]

    def _history_split_js(self, lm: LoadedModel, b, routing, users: np.ndarray, ends: np.ndarray, index,
                          items: np.ndarray, cate: np.ndarray, n_cate: int, repeats: int = 5) -> list[float]:
        """Per user, the interests' measure for random interests: the routed history split at random into
        K'_u groups, each group's mean item vector retrieving its own top-M (NaN for users with K'_u < 2)."""
        rng = np.random.default_rng(self.opts.seed)
        queries, owner, key = [], [], []
        for i in range(len(users)):
            hist = b.hist[i][b.hist_mask[i]].numpy()
            k = int(routing.valid[i].sum())
            if k < 2 or len(hist) < k:
                continue
            for r, split in enumerate(history_splits(hist, k, rng, repeats)):
                for g in split:
                    queries.append(items[g - 1].mean(0))  # row i - 1 holds item i
                    owner.append(i)
                    key.append(r)
        out = [float("nan")] * len(users)
        if not queries:
            return out
        found = self._top_unseen(lm, index, np.stack(queries), np.array(owner), users, ends)
        groups: dict[tuple[int, int], list[np.ndarray]] = {}
        for u, r, g in zip(owner, key, found):
            groups.setdefault((u, r), []).append(cate[g])
        per_user: dict[int, list[float]] = {}
        for (u, _), gs in groups.items():
            per_user.setdefault(u, []).append(mean_pairwise_js(gs, n_cate))
        for u, vals in per_user.items():
            out[u] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        return out

    def interests(self) -> list[Section]:
        s3 = Section("interests", "Interests of sample users: coupling coefficients and what each interest retrieves")
        s4 = Section("kprime", "Interest counts K'_u and capsule lengths")
        try:
            run = self._first(("mind",))
            lm = self._load(run)
            es, valid_all, lengths_all = self._routing_all(lm)
        except MissingInput as e:
            s3.notes.append(str(e))
            s4.notes.append(str(e))
            return [s3, s4]
        s4.notes.append(f"from run {run.path}: {len(es.users):,} test users")
        self._distributions(s4, valid_all, lengths_all)

        s3.notes.append(f"from run {run.path} (test users, each with the history evaluation uses)")
        k_user = valid_all.sum(1)
        multi = np.flatnonzero(k_user >= 2)
        if len(multi) == 0:
            s3.notes.append("no test user has two or more interests (K'_u >= 2): nothing to compare")
            return [s3, s4]
        from facetrec.index.ann import build_index
        from facetrec.train.retrieval import all_item_vectors

        cate, n_cate, cate_field = lm.item_categories()
        items = all_item_vectors(lm.model, lm.prep.n_items)
        index = build_index(items, np.arange(1, lm.prep.n_items, dtype=np.int64), kind="exact")
        rng = np.random.default_rng(self.opts.seed)

        # diversity over many users
        n_div = len(multi) if self.opts.diversity_users <= 0 else min(self.opts.diversity_users, len(multi))
        pick = np.sort(rng.choice(multi, n_div, replace=False))
        b, routing, retrieved = self._retrieve_per_interest(lm, es.users[pick], es.ends[pick], index)
        div = interest_diversity(es.users[pick], retrieved, cate, n_cate, self.opts.top_m, seed=self.opts.seed)
        # second null: random interests (the routed history split at random, each group's mean vector retrieving)
        hist_js = self._history_split_js(lm, b, routing, es.users[pick], es.ends[pick], index, items, cate, n_cate)
        by_user = dict(zip(es.users[pick].tolist(), hist_js))
        hdiv = paired([(u, a, by_user[u]) for u, a, _ in div.per_user], self.opts.top_m)
        # the same measure one step earlier: the history behaviours each interest's routing holds most strongly
        rdiv = interest_diversity(es.users[pick], _routed_groups(b, routing), cate, n_cate, 0, seed=self.opts.seed)
        for key, d in (("interest_diversity", div), ("history_split_diversity", hdiv), ("routing_diversity", rdiv)):
            self.numbers[key] = {"run": str(run.path), "verdict": d.verdict,
                                 **{k: v for k, v in asdict(d).items() if k != "per_user"}}
        s3.html += _diversity_html(div, hdiv, rdiv, cate_field)
        if div.users:
            s3.figures.append((self._diversity_figure(div, cate_field),
                               "per user: how far apart the interests' retrieved categories are, against random splits"))

        # a few users in detail, among those with the most interests
        top_k = np.flatnonzero(k_user == k_user.max())
        sample = np.sort(rng.choice(top_k, min(self.opts.sample_users, len(top_k)), replace=False))
        b, routing, retrieved = self._retrieve_per_interest(lm, es.users[sample], es.ends[sample], index)
        hist_js = self._history_split_js(lm, b, routing, es.users[sample], es.ends[sample], index, items, cate, n_cate)
        raw = lm.raw_items()
        rows = []
        for i, u in enumerate(es.users[sample]):
            w, pos, ks = coupling_matrix(routing, i)
            hist = b.hist[i].numpy()[pos]
            labels = [f"{raw[h][:14]} · c{cate[h]}" for h in hist]
            shares, cats = _category_shares(retrieved[i], cate)
            fig = self._user_figure(int(u), w, labels, ks, routing.lengths[i].numpy(), shares, cats, cate_field)
            s3.figures.append((fig, f"user {u}: history items (raw id · category) routed to each interest, and the "
                                    f"categories each interest retrieves (history excluded)"))
            groups = [cate[g] for g in retrieved[i]]
            rows.append((int(u), len(pos), len(ks), mean_pairwise_js(groups, n_cate),
                         random_split_js(groups, n_cate, np.random.default_rng(self.opts.seed)), hist_js[i]))
        names = ("user", "behaviours", "k_prime", "interest_js", "random_js", "history_split_js")
        self.numbers["sample_users"] = [dict(zip(names, r)) for r in rows]
        s3.html += ("<table><tr><th>sample user</th><th>behaviours</th><th>K'_u</th>"
                    "<th>interests' mean pairwise JS distance</th><th>null 1: random splits of the retrieved items</th>"
                    "<th>null 2: random history splits</th></tr>"
                    + "".join(f"<tr><td>{u}</td><td>{n}</td><td>{k}</td><td>{js:.3f}</td><td>{rs:.3f}</td>"
                              f"<td>{hs:.3f}</td></tr>" for u, n, k, js, rs, hs in rows) + "</table>")
        return [s3, s4]

    def _distributions(self, s: Section, valid: np.ndarray, lengths: np.ndarray) -> None:
        """K'_u histogram and capsule lengths per interest slot (valid interests only)."""
        K = valid.shape[1]
        counts = np.bincount(valid.sum(1), minlength=K + 1)[1:]
        fig = _figure(figsize=(11, 4), layout="constrained")
        ax_k, ax_len = fig.subplots(1, 2)
        ax_k.bar(np.arange(1, K + 1), counts)
        ax_k.set(xlabel="K'_u = max(1, min(K, floor(log2 |I_u|)))", ylabel="users", title=f"interest counts (K = {K})",
                 xticks=np.arange(1, K + 1))
        bins = np.linspace(0, 1, 41)
        for j in range(K):
            ln = lengths[valid[:, j], j]
            if len(ln):
                ax_len.hist(ln, bins=bins, histtype="step", linewidth=1.5, label=f"interest {j} (n={len(ln)})")
        ax_len.set(xlabel="capsule length |u_j|", ylabel="users", title="capsule lengths of valid interests")
        ax_len.legend(fontsize=8)
        for ax in (ax_k, ax_len):
            ax.grid(alpha=0.3)
        s.figures.append((self._save(fig, "interest_counts.png"),
                          "left: K'_u over test users; right: lengths of valid capsules per interest slot"))
        ln = lengths[valid]
        self.numbers["k_prime"] = {"histogram": {str(i + 1): int(c) for i, c in enumerate(counts)},
                                   "capsule_length_mean": float(ln.mean()), "capsule_length_std": float(ln.std())}
        s.html = (f"<p>K'_u histogram: {', '.join(f'{i + 1}: {c:,}' for i, c in enumerate(counts))}. "
                  f"Capsule length of valid interests: mean {ln.mean():.3f}, std {ln.std():.3f}.</p>")

    def _diversity_figure(self, div: Diversity, cate_field: str) -> Path:
        fig = _figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        bins = np.linspace(0, 1, 31)
        ax.hist([p[2] for p in div.per_user], bins=bins, alpha=0.6, label=f"random splits (mean {div.random_js:.3f})")
        ax.hist([p[1] for p in div.per_user], bins=bins, alpha=0.6, label=f"interests (mean {div.interest_js:.3f})")
        ax.set(xlabel=f"mean pairwise Jensen–Shannon distance of {cate_field} distributions", ylabel="users",
               title=f"{div.users} users, top-{div.top_m} items per interest")
        ax.legend(fontsize=8)
        return self._save(fig, "interest_diversity.png")

    def _user_figure(self, user: int, w: np.ndarray, labels: list[str], ks: np.ndarray, strength: np.ndarray,
                     shares: np.ndarray, cats: list[int], cate_field: str) -> Path:
        """Left: coupling coefficients (behaviours x interests); right: category shares of each interest's items."""
        fig = _figure(figsize=(11, max(3.5, 0.28 * len(labels) + 1.5)), layout="constrained")
        ax_w, ax_c = fig.subplots(1, 2, width_ratios=(1, 1.4))
        im = ax_w.imshow(w, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax_w.set_yticks(np.arange(len(labels)), labels, fontsize=7)
        ax_w.set_xticks(np.arange(len(ks)), [f"{j}\n|u|={strength[j]:.2f}" for j in ks], fontsize=8)
        ax_w.set(xlabel="interest", title=f"user {user}: coupling coefficients w_ij")
        fig.colorbar(im, ax=ax_w, shrink=0.8)
        im2 = ax_c.imshow(shares, aspect="auto", cmap="magma_r", vmin=0, vmax=1)
        ax_c.set_xticks(np.arange(len(cats)), [f"c{c}" if c >= 0 else "other" for c in cats], fontsize=7, rotation=60)
        ax_c.set_yticks(np.arange(len(ks)), [f"interest {j}" for j in ks], fontsize=8)
        ax_c.set(title=f"{cate_field} of each interest's top-{self.opts.top_m} retrieved items (share)")
        for (r, c), v in np.ndenumerate(shares):
            if v >= 0.05:
                ax_c.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
        fig.colorbar(im2, ax=ax_c, shrink=0.8)
        return self._save(fig, f"interests_user{user}.png")

    # ------------------------------------------------------------ 5. DIEN attention

    @torch.no_grad()
    def attention(self) -> Section:
        s = Section("attention", "DIEN attention over the history for a sample candidate")
        try:
            run = self._first(("dien",))
        except MissingInput:
            run = self._first(("dien", "din"))  # DIN's attention weights when no DIEN run is given
        lm = self._load(run)
        from facetrec.data.dataset import ranking_batch, ranking_samples

        samples = ranking_samples(lm.prep, "test")
        if len(samples) == 0:
            raise MissingInput(f"{run.path}: no test ranking samples")
        T = lm.prep.max_history
        cate, _, cate_field = lm.item_categories()
        idx = self._attention_sample(lm, samples, cate)
        b = ranking_batch(lm.prep, samples, idx, T)
        att = lm.model.attention(b).float().numpy()  # (n, T)
        prob = torch.sigmoid(lm.model(b).float()).numpy()
        n = int(b.hist_mask[0].sum())
        hist = b.hist[0].numpy()[:n]
        fig = _figure(figsize=(11, 4), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(idx)
        for i in range(len(idx)):
            tgt = int(b.target[i])
            label = "clicked" if samples.label[idx[i]] == 1 else "sampled negative"
            same = cate[hist] == cate[tgt]
            bars = ax.bar(np.arange(n) + (i - (len(idx) - 1) / 2) * width, att[i, :n], width,
                          label=f"{label} candidate (c{cate[tgt]}), p(click) = {prob[i]:.2f}")
            for bar, hit in zip(bars, same):
                if hit:
                    bar.set_edgecolor("black")
                    bar.set_linewidth(1.5)
        ax.set_xticks(np.arange(n), [f"t{t}\nc{cate[h]}" for t, h in enumerate(hist)], fontsize=7)
        kind = "softmax over the real steps" if run.name == "dien" else "raw DIN weights"
        ax.set(xlabel=f"history position (oldest first) and {cate_field}", ylabel=f"attention a_t ({kind})",
               title=f"user {int(b.user[0])}: attention of each candidate over the history (black edge: same {cate_field})")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        s.figures.append((self._save(fig, "dien_attention.png"), f"from run {run.path}"))
        same_share = [float(att[i, :n][cate[hist] == cate[int(b.target[i])]].sum() / max(att[i, :n].sum(), 1e-12))
                      for i in range(len(idx))]
        self.numbers["dien_attention"] = {"run": str(run.path), "user": int(b.user[0]), "history": n,
                                          "attention_on_same_category": same_share}
        s.html = ("<p>Share of attention on history items of the candidate's own category: "
                  + ", ".join(f"{'clicked' if samples.label[idx[i]] == 1 else 'negative'} {v:.2f}"
                              for i, v in enumerate(same_share)) + ".</p>")
        return s

    def _attention_sample(self, lm: LoadedModel, samples, cate: np.ndarray) -> np.ndarray:
        """Rows of one test history with a clicked and a negative candidate: among a random draw of
        such histories, one whose history mixes categories and contains the clicked item's category
        (so the plot can show whether attention picks out the related behaviours)."""
        rng = np.random.default_rng(self.opts.seed)
        key = samples.user * (1 << 32) + samples.pos
        both = np.intersect1d(key[samples.label == 1], key[samples.label == 0])
        if len(both) == 0:
            return np.array([int(rng.integers(len(samples)))])
        best, best_score = None, None
        for k_ in rng.choice(both, min(200, len(both)), replace=False):
            rows = np.flatnonzero(key == k_)
            pos_row = rows[samples.label[rows] == 1][0]
            (hist,), mask = lm.prep.windows(samples.user[[pos_row]], samples.pos[[pos_row]], lm.prep.max_history)
            h = hist[0][mask[0]]
            cats = cate[h]
            score = (bool((cats == cate[samples.target[pos_row]]).any()), min(len(np.unique(cats)), 4), len(h))
            if best_score is None or score > best_score:
                best, best_score = np.array([pos_row, rows[samples.label[rows] == 0][0]]), score
        return best

    # ------------------------------------------------------------ 6. by activity bucket (ranking: cold start; retrieval: history length)

    def buckets(self) -> Section:
        s = Section("buckets", "By user activity: ranking AUC (cold start) and retrieval recall by history length")
        runs = [r for r in self.runs if r.buckets]
        if not runs:
            raise MissingInput("no run's metrics.json has \"buckets\" (ranking and retrieval runs write them)")
        if any(r.task == "ranking" for r in runs) and not any(r.uie for r in runs):
            s.notes.append("no UIE run among the inputs: buckets are shown without UIE only "
                           "(pass a UIE run directory to compare)")
        fig = _figure(figsize=(11, 4), layout="constrained")
        tasks = [t for t in ("ranking", "retrieval") if any(r.task == t for r in runs)]
        axes = np.atleast_1d(fig.subplots(1, len(tasks)))
        table: dict[str, Any] = {}
        for ax, task in zip(axes, tasks):
            metric = MONITOR[task]
            groups = self._groups([r for r in runs if r.task == task])
            labels = sorted({b for _, rs in groups for r in rs for b, m in r.buckets.items()
                             if m.get("samples", m.get("users", 1))}, key=bucket_sort_key)  # empty buckets left out
            width = 0.8 / len(groups)
            for g, (name, rs) in enumerate(groups):
                stats = [mean_std([r.buckets.get(b, {}).get(metric, float("nan")) for r in rs]) for b in labels]
                uie = rs[0].uie
                if task == "ranking":  # retrieval buckets are history lengths (K'_u), not a UIE comparison
                    name = f"{name} ({'with' if uie else 'without'} UIE)"
                ax.bar(np.arange(len(labels)) + (g - (len(groups) - 1) / 2) * width, [m for m, _, _ in stats], width,
                       yerr=[0 if math.isnan(sd) else sd for _, sd, _ in stats], capsize=3, label=name,
                       hatch="//" if uie else None)
                size = {b: rs[0].buckets.get(b, {}).get("samples", rs[0].buckets.get(b, {}).get("users")) for b in labels}
                table[name] = {b: {"mean": m, "std": sd, "n": n, "samples": size[b]} for b, (m, sd, n) in zip(labels, stats)}
            ax.set_xticks(np.arange(len(labels)), [f"{b} events" for b in labels])
            ax.set(ylabel=f"test {metric}", title=f"{task}: {metric} by user activity")
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            lo = np.nanmin([v["mean"] for d in table.values() for v in d.values()] or [0])
            if metric == "auc" and np.isfinite(lo):
                ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        self.numbers["buckets"] = table
        s.figures.append((self._save(fig, "buckets.png"), "test metric per activity bucket; error bars: std across seeds"))
        s.html = _bucket_table(table)
        return s

    # ------------------------------------------------------------ 7. ANN recall vs latency

    def ann(self) -> Section:
        s = Section("ann", "ANN recall against latency")
        series: list[tuple[str, str, list[dict[str, Any]]]] = []  # (source, recall key, rows)
        files = list(self.opts.ann_results) + sorted(p for r in self.runs for p in r.path.glob("index_recall*.json"))
        if not files and self.opts.results_dir.is_dir():
            files = sorted(self.opts.results_dir.glob("index_recall*.json"))
        for f in files:
            try:
                data = json.loads(Path(f).read_text())
                series.append((f"{Path(f).name} ({data.get('source', '?')}, n={data.get('n', '?')})",
                               f"recall@{data['k']}", data["rows"]))
            except (OSError, ValueError, KeyError) as e:
                s.notes.append(f"{f}: not a benchmarks/index_recall.py result ({e}); ignored")
        if not series:
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise MissingInput("no benchmark JSON given and faiss is not installed to run a sweep "
                                   "(pip install 'facetrec[ann]')") from None
            run = self._first(("mind", "youtubednn"))
            lm = self._load(run)
            from facetrec.train.retrieval import all_item_vectors, user_interests
            from facetrec.data.dataset import retrieval_eval_set

            items = all_item_vectors(lm.model, lm.prep.n_items)
            es = retrieval_eval_set(lm.prep, "test", run.cfg.train.protocol, max_users=500, seed=self.opts.seed)
            V, valid = user_interests(lm.model, lm.prep, es.users, es.ends, lm.prep.max_history)
            rows = ann_sweep(items, np.ascontiguousarray(V[valid]), k=50)
            s.notes.append(f"no benchmark JSON (--ann-results, index_recall*.json in a run directory or in "
                           f"{self.opts.results_dir}): "
                           f"swept index settings on {run.path}'s {len(items):,} item vectors, queries = "
                           f"{int(valid.sum()):,} interest vectors of test users")
            series.append((f"{run.label} item vectors (n={len(items)})", "recall@50", rows))
        fig = _figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        markers = {"exact": "s", "hnsw": "o", "ivf": "^", "ivfpq": "v"}
        for source, rk, rows in series:
            for kind in dict.fromkeys(r["index"] for r in rows):
                pts = [r for r in rows if r["index"] == kind]
                ax.plot([r["p50_ms"] for r in pts], [r[rk] for r in pts], marker=markers.get(kind, "x"),
                        label=f"{kind} — {source}"[:80])
                for r in pts:
                    p = r.get("params", {})
                    tag = p.get("efSearch", p.get("nprobe"))
                    if kind != "exact" and tag is not None:
                        ax.annotate(str(tag), (r["p50_ms"], r[rk]), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set(xlabel="p50 latency per query, ms (1 thread, log scale)", ylabel=series[0][1] + " vs exact",
               title="ANN recall vs latency (labels: efSearch / nprobe)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        s.figures.append((self._save(fig, "ann_recall_latency.png"), "recall of each index setting against exact search"))
        self.numbers["ann"] = [{"source": src, "rows": rows} for src, _, rows in series]
        return s

    # ------------------------------------------------------------ assemble

    def build(self) -> list[Section]:
        sections: list[Section] = []
        steps: list[tuple[str, str, Callable[[], Section | list[Section]]]] = [
            ("curves", "Training curves", self.curves),
            ("metrics", "Test metrics against baselines", self.metrics),
            ("interests", "Interests", self.interests),
            ("attention", "DIEN attention over the history", self.attention),
            ("buckets", "By user activity: ranking AUC (cold start) and retrieval recall by history length", self.buckets),
            ("ann", "ANN recall against latency", self.ann),
        ]
        for key, title, step in steps:
            try:
                out = step()
            except MissingInput as e:
                out = Section(key, title, notes=[f"skipped: {e}"])
            sections.extend(out if isinstance(out, list) else [out])
        return sections

    def write(self) -> Path:
        sections = self.build()
        page = _page(self.runs, sections)
        path = self.out / "index.html"
        write_bytes(path, page.encode())
        write_json(self.out / "report.json", _finite({"runs": [str(r.path) for r in self.runs],
                                                      "figures": [p.name for s in sections for p, _ in s.figures],
                                                      "skipped": {s.key: s.notes for s in sections if not s.figures},
                                                      **self.numbers}))
        return path


def write_report(run_dirs: Sequence[str | Path], out: str | Path, opts: ReportOptions = ReportOptions()) -> Path:
    """Write out/index.html (+ PNGs and report.json) for the given run directories; returns the page's path."""
    return Report(run_dirs, out, opts).write()


def _remove_previous_figures(out: Path) -> None:
    """Delete the figures an earlier report listed in out/report.json (its sample users may differ),
    so the folder holds exactly what the new page shows. Nothing else in `out` is touched."""
    try:
        names = json.loads((out / "report.json").read_text()).get("figures", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in names:
        path = out / str(name)
        if path.suffix == ".png" and path.parent == out and path.is_file():
            path.unlink()


def _finite(obj: Any) -> Any:
    """NaN / inf -> None, so report.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------- HTML pieces


def _fmt(stat: dict[str, Any]) -> str:
    m, sd = stat["mean"], stat["std"]
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "—"
    return f"{m:.4f}" + ("" if sd is None or math.isnan(sd) else f" ± {sd:.4f}")


def _metrics_table(task: str, rows: list[dict[str, Any]], names: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in names)
    best = {m: max((r[m]["mean"] for r in rows if not math.isnan(r[m]["mean"])), default=None) for m in names}
    if "logloss" in names:
        best["logloss"] = min((r["logloss"]["mean"] for r in rows if not math.isnan(r["logloss"]["mean"])), default=None)
    body = ""
    for r in rows:
        cells = "".join(("<td><b>{}</b></td>" if r[m]["mean"] == best[m] else "<td>{}</td>").format(_fmt(r[m]))
                        for m in names)
        body += (f"<tr><td>{html.escape(r['model'])}{' (baseline)' if r['baseline'] else ''}</td>"
                 f"<td>{html.escape(r['dataset'])}</td><td>{len(r['runs'])} ({', '.join(map(str, r['seeds']))})</td>"
                 f"{cells}</tr>")
    return (f"<h3>{task}</h3><table><tr><th>model</th><th>dataset</th><th>runs (seeds)</th>{head}</tr>{body}</table>"
            "<p class='small'>mean ± sample std over seeds (no ± with one seed); best per column in bold.</p>")


def _diversity_html(d: Diversity, hist: Diversity, routed: Diversity, cate_field: str) -> str:
    if not d.users:
        return "<p>No user with two or more non-empty interests: diversity not measured.</p>"
    field = f"<code>{html.escape(cate_field)}</code>"

    def ci(x: Diversity) -> str:
        return (f"95% interval of the mean difference {x.diff_ci[0]:+.3f} to {x.diff_ci[1]:+.3f}; "
                f"{x.share_above:.0%} of users above")

    out = (f"<p class='result'><b>Interest diversity.</b> Over {d.users:,} test users with K'_u ≥ 2, each valid "
           f"interest retrieves its own top-{d.top_m} items (exact search, history excluded). The mean pairwise "
           f"Jensen–Shannon distance (log base 2: 0 = same distribution, 1 = disjoint) between the interests' "
           f"{field} distributions is <b>{d.interest_js:.3f}</b>.<br>"
           f"Null 1, random splits of each user's retrieved items into groups of the same sizes (20 shuffles per "
           f"user): <b>{d.random_js:.3f}</b> — interests are <b>{d.verdict}</b> random splits ({ci(d)}).")
    if hist.users:
        out += (f"<br>Null 2, random interests: the user's routed history split at random into K'_u groups, each "
                f"group's mean item vector retrieving its own top-{hist.top_m} (5 splits per user): "
                f"<b>{hist.random_js:.3f}</b> — interests are <b>{hist.verdict}</b> random history splits "
                f"({ci(hist)}).")
    out += "</p>"
    if routed.users:
        out += (f"<p>One step earlier, in the routing: grouping each user's history behaviours by the interest "
                f"that holds them most strongly (argmax<sub>j</sub> w<sub>ij</sub>), the groups' {field} distributions "
                f"are {routed.interest_js:.3f} apart, random splits of the history {routed.random_js:.3f} "
                f"({routed.verdict} random splits; {routed.users:,} users with ≥ 2 non-empty groups).</p>")
    return out


def _bucket_table(table: dict[str, Any]) -> str:
    labels = list(dict.fromkeys(b for d in table.values() for b in d))
    head = "".join(f"<th>{html.escape(b)} events</th>" for b in labels)
    body = "".join(f"<tr><td>{html.escape(name)}</td>"
                   + "".join(f"<td>{_fmt(d[b]) if b in d else '—'}</td>" for b in labels)
                   + "</tr>" for name, d in table.items())
    return f"<table><tr><th>model</th>{head}</tr>{body}</table>"


def _routed_groups(b, routing) -> list[list[np.ndarray]]:
    """Per user, per valid interest: the history items whose strongest coupling is to that interest."""
    out = []
    for i in range(len(b.hist)):
        w, pos, ks = coupling_matrix(routing, i)
        hist = b.hist[i].numpy()[pos]
        best = w.argmax(1) if len(pos) else np.zeros(0, dtype=np.int64)
        out.append([hist[best == c] for c in range(len(ks))])
    return out


def _category_shares(groups: list[np.ndarray], cate: np.ndarray, top: int = 3,
                     most: int = 12) -> tuple[np.ndarray, list[int]]:
    """(K', C + 1) share of each interest's items per category, for the union of each interest's top
    categories (at most `most`), plus an "other" column (category -1)."""
    hists = [np.bincount(cate[g], minlength=int(cate.max()) + 1) for g in groups]
    cats: list[int] = []
    for h in hists:
        for c in np.argsort(-h, kind="stable")[:top]:
            if h[c] > 0 and int(c) not in cats:
                cats.append(int(c))
    cats = cats[:most]
    shares = np.zeros((len(groups), len(cats) + 1))
    for i, h in enumerate(hists):
        total = max(h.sum(), 1)
        shares[i, :len(cats)] = h[cats] / total
        shares[i, -1] = 1 - shares[i, :len(cats)].sum()
    return shares, cats + [-1]


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .small { font-size: .85em; color: #555; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: .4em .8em; font-size: .9em; }
.result { background: #eef6ff; border-left: 4px solid #1f77b4; padding: .5em .8em; }
code { background: #f4f4f4; padding: 0 .2em; }
"""

# Reports a figure the browser could not decode as a console error (the headless-Chromium test
# fails on console errors), so a broken embed cannot pass unnoticed.
_CHECK_IMAGES = """
window.addEventListener("load", function () {
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) { console.error("figure failed to load: " + img.alt); }
  }
});
"""


def _page(runs: list[RunInfo], sections: list[Section]) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>facetrec report</title>"
             f"<style>{_STYLE}</style><script>{_CHECK_IMAGES}</script></head><body><h1>facetrec report</h1>"]
    parts.append("<p>Runs: " + ", ".join(f"<code>{html.escape(str(r.path))}</code> ({html.escape(r.name)}, "
                                         f"{html.escape(r.dataset)}, seed {r.seed})" for r in runs) + "</p>")
    parts.append("<ul>" + "".join(f"<li><a href='#{s.key}'>{html.escape(s.title)}</a></li>" for s in sections) + "</ul>")
    for s in sections:
        parts.append(f"<section id='{s.key}'><h2>{html.escape(s.title)}</h2>")
        parts.extend(f"<p class='note'>{html.escape(n)}</p>" for n in s.notes)
        parts.append(s.html)
        for path, caption in s.figures:
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(path.name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(path.name)}: {html.escape(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
