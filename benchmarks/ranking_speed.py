"""Ranking speed: DIEN / DIN / base-model training throughput, DIEN's achieved GFLOP/s, and serving
latency — ours and the peers' (torch-rechub DIEN, DeepCTR-Torch DIEN) in one process, on the same tensors.

    .venv/bin/python benchmarks/ranking_speed.py                 # ours only (peers are not installed there)
    .bench-venv/bin/python benchmarks/ranking_speed.py           # ours + peers, side by side
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 .bench-venv/bin/python benchmarks/ranking_speed.py
    .venv/bin/python benchmarks/ranking_speed.py --loops eager   # the time loops without TorchScript
    .venv/bin/python benchmarks/ranking_speed.py --only dien,serve --loops compile  # torch.compile'd forward loops (compiles for minutes)

The peers live in their own virtualenv so that they never touch the project's:
    python3 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.13.0 torch-rechub deepctr-torch requests pyyaml
(torch-rechub 0.9.0 and deepctr-torch 0.3.0 accept torch 2.13; deepctr-torch imports `requests`
without declaring it.) A peer that does not import is skipped with a message.

Workload: 20k items, 200 categories (one per item), histories of 50 with real lengths uniform in
5..50 (left-aligned, 0-padded), an auxiliary negative per position, D = 64 per field (so
D_b = 128 = GRU widths), batch 256, Adam(lr 1e-3), torch.set_num_threads(2). Batches are built
up front and converted to each peer's input format up front; only the training step (forward,
loss, backward, optimizer step) is timed, in rounds: each round times one window of --steps
steps per model, the models one after the other (--repeats rounds), so slow drifts of the
machine's load hit every model alike. Printed per peer: the ratio of best windows, of median
windows, and the median (and min) of the same-round ratios. Every model trains with BCE + 1.0 x its own auxiliary
loss, AUGRU evolution, output MLP (200, 80) with Dice. The models are the libraries' own, so they
differ in detail (reported, not hidden):
- ours: one extractor GRU and one AUGRU, 128 wide, over id ⊕ category; inner-product aux loss.
- torch-rechub DIEN: one GRU + AUGRU *per field* (two of each, 64 wide: half our recurrent
  FLOPs); inner-product aux loss; a 1-wide dense feature, because its model needs a non-empty
  `features` list. Its AUGRU loop runs all 50 steps with the input projections inside the loop.
- DeepCTR-Torch DIEN: GRU + AUGRU 128 wide over the concatenation like ours; its aux loss is the
  official code's MLP (100, 50, 1) scorer and its attention a DIN-style MLP (64, 16); L2
  regularisation off (its `fit` would add it).

GFLOP/s of our DIEN step: the matmul FLOPs of one step counted analytically from the batch's
real positions P (padding is never computed) and aux pairs M: forward = 2 (P D 3H + P H 3H
[extractor, input and recurrent side] + B D H + P H [attention] + P H 3H' + P H' 3H' [evolution]
+ 2 M D [aux dots] + B (in 200 + 200 x 80 + 80) [MLP]); a training step = 3 x forward
(backward: one matmul for the input gradient, one for the weight gradient). Elementwise work is
not counted. It is compared with plain matmuls timed in the same run: a 2048^3 one (the CPU's
practical peak) and one of the size of a single loop step (256 x 128 x 384).

Serving: `score_candidates` for one user (history 50, all real) and 200 candidates on ONE thread
(SPEC §7), p50 / p99 over 200 calls, at the training width and with narrower evolving GRUs
(`evolve_hidden`; the extractor stays at D_b). Peers are timed on the equivalent 200-row batch
(they have no candidate-batched path; both compute their auxiliary loss inside forward).

Measured 2026-11-23 on the 2-core VM: see the tables printed by the commands above (the numbers
quoted in the project docs come from them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from .bench-venv without installing facetrec

from facetrec.data.batches import RankingBatch  # noqa: E402
from facetrec.models import dien as dien_mod  # noqa: E402
from facetrec.models.dien import DIEN, DIN, BaseModel, DIENConfig, ranking_loss  # noqa: E402
from facetrec.train.loop import make_optimizer  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/timing.py)


# ---------------------------------------------------------------- workload


def make_batches(n: int, batch: int, hist: int, min_len: int, n_items: int, cate: torch.Tensor, seed: int) -> list[RankingBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(min_len, hist + 1, (batch,), generator=g)  # (B,)
        mask = torch.arange(hist)[None, :] < lengths[:, None]  # (B, T)
        items = torch.randint(1, n_items, (batch, hist), generator=g) * mask  # (B, T)
        aux = torch.randint(1, n_items - 1, (batch, hist), generator=g)
        aux = (aux + (aux >= items).long()) * mask  # != the clicked item
        out.append(RankingBatch(user=torch.arange(1, batch + 1), hist=items, hist_mask=mask, aux_neg=aux,
                                target=torch.randint(1, n_items, (batch,), generator=g),
                                label=torch.randint(0, 2, (batch,), generator=g).float()))
    return out


def flops_dien_step(m: DIEN, b: RankingBatch) -> float:
    """Matmul FLOPs of one DIEN training step (see the module docstring)."""
    D = m.items.dim
    H, H2 = m.extractor.hidden_size, m.evolver.hidden_size
    B = b.hist.shape[0]
    P = int(b.hist_mask.sum())
    M = int(b.hist_mask[:, 1:].sum())
    head_in = m.head[0].net[0].in_features
    mlp = [head_in] + list(m.cfg.mlp) + [1]
    fwd = (P * D * 3 * H + P * H * 3 * H + B * D * H + P * H + P * H * 3 * H2 + P * H2 * 3 * H2 + 2 * M * D
           + B * sum(a * c for a, c in zip(mlp[:-1], mlp[1:])))
    return 3 * 2 * fwd


def flops_dien_serve(m: DIEN, L: int, N: int) -> float:
    """Matmul FLOPs of `score_candidates` for one history of L and N candidates: the extractor and the
    evolving GRU's input projection once, then per candidate the attention, the AUGRU's hidden side
    over L steps (the bulk: N L H' 3H'), the target projection and the output MLP."""
    D = m.items.dim
    H, H2 = m.extractor.hidden_size, m.evolver.hidden_size
    head_in = m.head[0].net[0].in_features
    mlp = [head_in] + list(m.cfg.mlp) + [1]
    once = L * D * 3 * H + L * H * 3 * H + L * H * 3 * H2
    per = (D * H + L * H + L * H2 * 3 * H2 + (D * H2 if m.target_proj is not None else 0)
           + sum(a * c for a, c in zip(mlp[:-1], mlp[1:])))
    return 2 * (once + N * per)


def matmul_gflops(n: int, k: int, m: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, k), torch.randn(k, m)
    c = torch.empty(n, m)
    for _ in range(3):
        torch.mm(a, b, out=c)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=c)
        reps += 1
    return 2 * n * k * m * reps / (time.perf_counter() - t0) / 1e9


# ---------------------------------------------------------------- timing


OURS = "facetrec DIEN (AUGRU + aux)"


def time_calls(call: Callable[[], object], n: int, warmup: int = 10) -> dict[str, float]:
    for _ in range(warmup):
        call()
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "mean_ms": statistics.fmean(ms)}


def ours_step(model: torch.nn.Module, batches: list[RankingBatch]) -> Callable[[int], None]:
    opt = make_optimizer(model.parameters(), lr=1e-3)  # the optimizer `facetrec train` uses

    def step(i: int) -> None:
        loss, _ = ranking_loss(model, batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def use_loops(kind: str) -> None:
    """Swap the time loops: TorchScript (default), plain eager, or torch.compile'd."""
    if kind == "eager":
        dien_mod._scan_forward_c, dien_mod._scan_backward_c = dien_mod._scan_forward, dien_mod._scan_backward
        dien_mod._evolve_candidates_c = dien_mod._evolve_candidates
    elif kind == "compile":  # the backward stays scripted: torch 2.13's inductor fails on it (out= into views)
        dien_mod._scan_forward_c = torch.compile(dien_mod._scan_forward, dynamic=True)
        dien_mod._evolve_candidates_c = torch.compile(dien_mod._evolve_candidates, dynamic=True)


# ---------------------------------------------------------------- peers


class RechubDIEN:
    """torch-rechub's DIEN on our batches: one sequence feature per field, shared embeddings."""

    name = "torch-rechub DIEN"

    def __init__(self, n_items: int, n_cates: int, dim: int, cate: torch.Tensor) -> None:
        from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
        from torch_rechub.models.ranking.dien import DIEN as RDIEN

        self.cate = cate[:, 0]
        target = [SparseFeature("target_item", n_items, dim, padding_idx=0), SparseFeature("target_cate", n_cates, dim, padding_idx=0)]
        hist = [SequenceFeature("hist_item", n_items, dim, pooling="concat", shared_with="target_item", padding_idx=0),
                SequenceFeature("hist_cate", n_cates, dim, pooling="concat", shared_with="target_cate", padding_idx=0)]
        neg = [SequenceFeature("neg_hist_item", n_items, dim, pooling="concat", shared_with="target_item", padding_idx=0),
               SequenceFeature("neg_hist_cate", n_cates, dim, pooling="concat", shared_with="target_cate", padding_idx=0)]
        self.model = RDIEN([DenseFeature("bias")], hist, neg, target, {"dims": [200, 80]}, alpha=1.0)

    def inputs(self, b: RankingBatch) -> dict[str, torch.Tensor]:
        m = b.hist_mask
        return {"bias": torch.zeros(len(b.target)), "target_item": b.target, "target_cate": self.cate[b.target],
                "hist_item": b.hist * m, "hist_cate": self.cate[b.hist] * m,
                "neg_hist_item": b.aux_neg * m, "neg_hist_cate": self.cate[b.aux_neg] * m}

    def loss(self, x, label: torch.Tensor) -> torch.Tensor:
        pred, aux = self.model(x)
        return F.binary_cross_entropy(pred, label) + aux

    def predict(self, x) -> torch.Tensor:
        return self.model(x)[0]


class DeepCTRDIEN:
    """DeepCTR-Torch's DIEN (AUGRU, negative sampling) on our batches."""

    name = "DeepCTR-Torch DIEN"

    def __init__(self, n_items: int, n_cates: int, dim: int, cate: torch.Tensor, hist: int, device: str = "cpu") -> None:
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
        from deepctr_torch.models import DIEN as DDIEN

        self.cate = cate[:, 0]
        cols = [SparseFeat("item_id", n_items, embedding_dim=dim), SparseFeat("cate_id", n_cates, embedding_dim=dim)]
        for prefix in ("hist_", "neg_hist_"):
            cols += [VarLenSparseFeat(SparseFeat(prefix + "item_id", n_items, embedding_dim=dim, embedding_name="item_id"),
                                      maxlen=hist, length_name="seq_length"),
                     VarLenSparseFeat(SparseFeat(prefix + "cate_id", n_cates, embedding_dim=dim, embedding_name="cate_id"),
                                      maxlen=hist, length_name="seq_length")]
        self.model = DDIEN(cols, ["item_id", "cate_id"], gru_type="AUGRU", use_negsampling=True, alpha=1.0,
                           dnn_hidden_units=(200, 80), dnn_activation="prelu", l2_reg_embedding=0.0, device=device)

    def inputs(self, b: RankingBatch) -> torch.Tensor:
        m = b.hist_mask
        cols = {"item_id": b.target[:, None], "cate_id": self.cate[b.target][:, None],
                "hist_item_id": b.hist * m, "hist_cate_id": self.cate[b.hist] * m,
                "neg_hist_item_id": b.aux_neg * m, "neg_hist_cate_id": self.cate[b.aux_neg] * m,
                "seq_length": m.sum(1, keepdim=True)}
        width = max(e for _, e in self.model.feature_index.values())
        X = torch.zeros(len(b.target), width)
        for name, (s, e) in self.model.feature_index.items():
            X[:, s:e] = cols[name].float()
        return X

    def loss(self, X, label: torch.Tensor) -> torch.Tensor:
        pred = self.model(X).squeeze(-1)
        return F.binary_cross_entropy(pred, label) + self.model.aux_loss.squeeze()

    def predict(self, X) -> torch.Tensor:
        return self.model(X)


def load_peers(args, cate: torch.Tensor, device: str = "cpu") -> list:
    peers = []
    for make in (lambda: RechubDIEN(args.items, args.cates, args.dim, cate),
                 lambda: DeepCTRDIEN(args.items, args.cates, args.dim, cate, args.hist, device)):
        try:
            peers.append(make())
        except ImportError as e:
            print(f"peer skipped ({e}); install it in .bench-venv, see this script's docstring")
    return peers


def peer_step(peer, inputs: list, labels: list[torch.Tensor]) -> Callable[[int], None]:
    opt = torch.optim.Adam(peer.model.parameters(), lr=1e-3)

    def step(i: int) -> None:
        loss = peer.loss(inputs[i % len(inputs)], labels[i % len(labels)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--cates", type=int, default=200)
    ap.add_argument("--hist", type=int, default=50)
    ap.add_argument("--min-len", type=int, default=5)
    ap.add_argument("--dim", type=int, default=64, help="embedding width per field (D_b = 2 x dim)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of timed windows (one per model, alternating); "
                    "best, median and the median of same-round ratios are printed")
    ap.add_argument("--only", default="dien,din,base,peers,serve", help="comma list of parts to run")
    ap.add_argument("--loops", default="script", choices=["script", "eager", "compile"],
                    help="how DIEN's time loops run: TorchScript (the library's choice), plain eager, torch.compile")
    ap.add_argument("--serve-calls", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--widths", default="64,32", help="narrower evolving-GRU widths to time at serving")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    parts = set(args.only.split(","))

    use_loops(args.loops)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cate = torch.randint(1, args.cates, (args.items, 1))
    cate[0] = 0
    feats, vocab = {"cate": cate}, {"cate": args.cates}
    batches = make_batches(8, args.batch, args.hist, args.min_len, args.items, cate, seed=1)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults"
    print(f"torch {torch.__version__}, {args.threads} threads for training, {platform.machine()}, allocator env: {malloc}, "
          f"loops: {args.loops}")
    print(f"workload: items={args.items} cates={args.cates} T={args.hist} (lengths {args.min_len}..{args.hist}) "
          f"D={args.dim}/field B={args.batch} Adam, {args.repeats}x{args.steps} steps after {args.warmup} warm-up")
    res: dict = {"args": vars(args), "torch": torch.__version__, "allocator_env": malloc, "train": {}, "serve": {}}

    def report(name: str, rates: list[float]) -> None:
        res["train"][name] = {"best": max(rates), "median": statistics.median(rates), "all": rates}
        print(f"  {name:<28} samples/s  best {max(rates):>8,.0f}   median {statistics.median(rates):>8,.0f}", flush=True)

    print("training throughput")
    cfg = DIENConfig(n_items=args.items, embed_dim=args.dim)
    steps: dict[str, Callable[[int], None]] = {}  # name -> one training step; timed in alternating windows
    dien = None
    if "dien" in parts:
        torch.manual_seed(0)
        dien = DIEN(cfg, feats, vocab).train()
        steps[OURS] = ours_step(dien, batches)
    for name, cls in (("din", DIN), ("base", BaseModel)):
        if name in parts:
            torch.manual_seed(0)
            steps[f"facetrec {'DIN' if name == 'din' else 'base model'}"] = ours_step(cls(cfg, feats, vocab).train(), batches)
    peers = load_peers(args, cate) if "peers" in parts else []
    labels = [b.label for b in batches]
    for peer in peers:
        torch.manual_seed(0)
        peer.model.train()
        steps[peer.name] = peer_step(peer, [peer.inputs(b) for b in batches], labels)
    windows = interleaved(steps, args.batch, args.warmup, args.steps, args.repeats)
    for name, rates in windows.items():
        report(name, rates)
    if OURS in windows:
        res["ratio"] = {}
        for peer in peers:
            # windows of one round are adjacent in time and share the machine's load: their ratio
            # is the least noisy comparison; best / median compare each model's own extremes
            pairs = [a / b for a, b in zip(windows[OURS], windows[peer.name])]
            ours, r = res["train"][OURS], res["train"][peer.name]
            res["ratio"][peer.name] = {"best": ours["best"] / r["best"], "median": ours["median"] / r["median"],
                                       "paired_median": statistics.median(pairs), "paired_min": min(pairs),
                                       "paired": pairs}
            print(f"  ratio facetrec DIEN / {peer.name}: {ours['best'] / r['best']:.2f}x (best), "
                  f"{ours['median'] / r['median']:.2f}x (median), {statistics.median(pairs):.2f}x (median of "
                  f"same-round ratios, min {min(pairs):.2f}x)")

    if dien is not None:
        flops = statistics.fmean(flops_dien_step(dien, b) for b in batches)
        step_s = args.batch / res["train"][OURS]["best"]
        peak = matmul_gflops(2048, 2048, 2048)
        small = matmul_gflops(256, 128, 384)
        res["gflops"] = {"dien_step_gflop": flops / 1e9, "dien_gflops": flops / step_s / 1e9,
                         "matmul_2048_gflops": peak, "matmul_256x128x384_gflops": small}
        print(f"DIEN step: {flops / 1e9:.2f} GFLOP (matmuls, analytic) in {step_s * 1e3:.0f} ms = "
              f"{flops / step_s / 1e9:.0f} GFLOP/s; plain matmul in this run: 2048^3 {peak:.0f} GFLOP/s, "
              f"256x128x384 {small:.0f} GFLOP/s -> {flops / step_s / 1e9 / peak:.0%} of the 2048^3 rate")

    if "serve" in parts:
        torch.set_num_threads(1)
        print(f"serving: {args.candidates} candidates, history {args.hist}, 1 thread, {args.serve_calls} calls")
        hist = torch.randint(1, args.items, (args.hist,), generator=torch.Generator().manual_seed(3))
        mask = torch.ones(args.hist, dtype=torch.bool)
        cands = torch.randint(1, args.items, (args.candidates,), generator=torch.Generator().manual_seed(4))
        D_b = 2 * args.dim
        peak1 = matmul_gflops(2048, 2048, 2048)
        res["serve_matmul_2048_gflops_1thread"] = peak1
        print(f"  plain matmul on 1 thread in this run: 2048^3 {peak1:.0f} GFLOP/s")
        for w in [0] + [int(x) for x in args.widths.split(",") if x]:
            torch.manual_seed(0)
            m = DIEN(DIENConfig(n_items=args.items, embed_dim=args.dim, evolve_hidden=w), feats, vocab).eval()
            name = f"facetrec DIEN H'={w or D_b}"
            r = time_calls(lambda: m.score_candidates(hist, mask, cands), args.serve_calls)
            flops = flops_dien_serve(m, args.hist, args.candidates)
            r["gflop"], r["gflops_at_p50"] = flops / 1e9, flops / (r["p50_ms"] / 1e3) / 1e9
            res["serve"][name] = r
            print(f"  {name:<28} p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms   {r['gflop']:.2f} GFLOP "
                  f"-> {r['gflops_at_p50']:.0f} GFLOP/s at p50", flush=True)
        one = RankingBatch(user=torch.ones(args.candidates, dtype=torch.long), hist=hist.expand(args.candidates, -1),
                           hist_mask=mask.expand(args.candidates, -1),
                           aux_neg=torch.randint(1, args.items, (args.candidates, args.hist)), target=cands,
                           label=torch.zeros(args.candidates))
        for peer in peers:
            peer.model.eval()
            x = peer.inputs(one)
            with torch.no_grad():
                r = time_calls(lambda: peer.predict(x), args.serve_calls)
            res["serve"][peer.name] = r
            print(f"  {peer.name:<28} p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms", flush=True)
        base = res["serve"].get(f"facetrec DIEN H'={D_b}")
        for peer in peers:
            print(f"  ratio {peer.name} / facetrec DIEN p50: {res['serve'][peer.name]['p50_ms'] / base['p50_ms']:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
