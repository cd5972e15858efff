"""MIND training throughput (samples/s) on a synthetic workload — a self-check of our hot path only.

    .venv/bin/python benchmarks/mind_throughput.py
    .venv/bin/python benchmarks/mind_throughput.py --softmax-axis behaviours --n-neg 1000 --steps 100
    .venv/bin/python benchmarks/mind_throughput.py --pooling mean           # YouTube DNN

Workload (defaults): 20k items with one category field (200 values), histories of up to 50
behaviours (lengths uniform in 5..50), D = 64, K = 4, R = 3, batch 256, N shared uniform
negatives, Adam, torch.set_num_threads(2). Batches are made up front so that only the
training step (forward, loss, backward, optimizer) is timed. Peers (torch-rechub) are not
run here; compare under the same allocator settings, which the script prints (SPEC §7:
glibc's MALLOC_* thresholds alone move CPU throughput by up to 2x).

Measured 2026-11-23 on the shared 2-core VM (other jobs running: +-10%), samples/s, best of 3x50 steps:

    command                                          glibc defaults   MALLOC_MMAP_THRESHOLD_=1073741824
                                                                      MALLOC_TRIM_THRESHOLD_=4294967296
    mind_throughput.py                               8,500 - 10,300   9,400
    mind_throughput.py --fused-adam                  12,000 - 13,200  12,800
    mind_throughput.py --softmax-axis behaviours     9,000            10,700
    mind_throughput.py --pooling mean  (YouTube DNN) 12,000           16,000
    previous facetrec MIND (commit f4364f2), same script: 6,600 - 7,900

Plain Adam over the 20k x 64 embedding table is ~30% of a step; `--fused-adam` shows what
torch.optim.Adam(fused=True) in the training loop would give.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from facetrec.data.batches import RetrievalBatch
from facetrec.models.losses import NegativeSampler, retrieval_loss
from facetrec.models.mind import MIND, MINDConfig


def make_batches(n_items: int, n_batches: int, batch: int, max_len: int, seed: int) -> list[RetrievalBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(5, max_len + 1, (batch,), generator=g)  # (B,)
        mask = torch.arange(max_len)[None, :] < lengths[:, None]  # (B, L)
        hist = torch.randint(1, n_items, (batch, max_len), generator=g) * mask  # (B, L)
        out.append(RetrievalBatch(user=torch.arange(batch), hist=hist, hist_mask=mask,
                                  target=torch.randint(1, n_items, (batch,), generator=g),
                                  n_events=lengths + torch.randint(0, 100, (batch,), generator=g)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--cates", type=int, default=200)
    ap.add_argument("--hist", type=int, default=50)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-neg", type=int, default=1000)
    ap.add_argument("--softmax-axis", default="interests", choices=["interests", "behaviours"])
    ap.add_argument("--pooling", default="routing", choices=["routing", "mean"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="timed windows; the best and median are printed")
    ap.add_argument("--fused-adam", action="store_true", help="torch.optim.Adam(fused=True): one pass per parameter")
    ap.add_argument("--out", type=str, default=None, help="also write the result as JSON here")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of 10 steps")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cate = torch.randint(1, args.cates, (args.items, 1))
    cate[0] = 0
    k = 1 if args.pooling == "mean" else args.k
    cfg = MINDConfig(n_items=args.items, dim=args.dim, n_interests=k, softmax_axis=args.softmax_axis,
                     pooling=args.pooling)
    model = MIND(cfg, {"cate": cate}, {"cate": args.cates}).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=args.fused_adam or None)
    sampler = NegativeSampler(np.ones(args.items), "uniform", seed=0)
    batches = make_batches(args.items, 16, args.batch, args.hist, seed=1)

    def step(i: int) -> float:
        loss = retrieval_loss(model, batches[i % len(batches)], sampler, args.n_neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for i in range(args.warmup):
        step(i)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(10):
                step(i)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(i)
        rates.append(args.steps * args.batch / (time.perf_counter() - t0))
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults"
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"allocator env: {malloc}")
    print(f"MIND {args.pooling} axis={args.softmax_axis} items={args.items} L={args.hist} D={args.dim} K={k} "
          f"B={args.batch} negatives={args.n_neg} optimizer=Adam{'(fused)' if args.fused_adam else ''}")
    print(f"samples/s: best {max(rates):,.0f}  median {sorted(rates)[len(rates) // 2]:,.0f}  "
          f"(steps/s best {max(rates) / args.batch:.1f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "allocator_env": malloc,
                       "samples_per_s": rates, "best": max(rates)}, f, indent=2)


if __name__ == "__main__":
    main()
