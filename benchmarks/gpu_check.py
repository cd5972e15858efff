"""GPU check (issue #7): MIND and DIEN on CUDA — graphed steps against eager ones, training throughput
side by side with the peers on the same GPU (the workloads of retrieval_speed.py and ranking_speed.py,
batch 256), the batch that saturates the GPU, DIEN serving latency, and `facetrec train` on CUDA.

    python3 benchmarks/gpu_check.py --out gpu.json                    # on the GPU machine
    .bench-venv/bin/python benchmarks/gpu_check.py --device cpu --quick # dry run of the same code on the CPU

The peers (torch-rechub, DeepCTR-Torch) are imported when installed (see ranking_speed.py); facetrec
is imported from this checkout's src/. Parts (--only): validate, mind, dien, saturate, serve, train, models.
Every part catches its own failure and records it, so one broken part does not hide the others.

Ours runs two ways: eager (the model's GPU path: DIEN's padded layout, MIND's all-slot MLP; a
host sync-free step) and graphed (the same step replayed from a CUDA graph, facetrec.train.graphs,
as `facetrec train` does on a GPU with train.cuda_graphs=auto). The peers run their own eager
code. Timing: interleaved windows (timing.py) with torch.cuda.synchronize() around each window.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ranking_speed as rk  # noqa: E402
import retrieval_speed as rs  # noqa: E402
from facetrec.models.dien import DIEN, DIENConfig, ranking_loss  # noqa: E402
from facetrec.models.losses import NegativeSampler, retrieval_loss  # noqa: E402
from facetrec.models.mind import MIND, MINDConfig  # noqa: E402
from facetrec.train.graphs import CudaGraphStep  # noqa: E402
from facetrec.train.loop import make_optimizer  # noqa: E402
from timing import interleaved  # noqa: E402

RES: dict = {}


def part(name: str):
    def wrap(fn):
        def run(args):
            t0 = time.perf_counter()
            print(f"\n=== {name}", flush=True)
            try:
                RES[name] = fn(args)
            except Exception as e:  # record and go on: the other parts still report
                traceback.print_exc()
                RES[name] = {"error": f"{type(e).__name__}: {e}"}
            RES.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
            save(args)
        run.part = name
        return run
    return wrap


def save(args) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(RES, indent=2, default=str))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- our steps


def mind_model(a, dev, batch_seed=1, n_batches=8, batch=None):
    cate = torch.randint(1, a.cates, (a.items, 1), generator=torch.Generator().manual_seed(0))
    cate[0] = 0
    torch.manual_seed(0)
    model = MIND(MINDConfig(n_items=a.items, dim=64, n_interests=4, n_users=a.users, profile_dim=16),
                 {"cate": cate}, {"cate": a.cates}).to(dev).train()
    bs = rs.make_batches(n_batches, batch or a.batch, 50, 5, a.items, a.users, seed=batch_seed)
    return model, [b.to(dev) for b in bs]


def mind_step(model, batches, dev, graphs: bool, n_neg=1000):
    """`facetrec train`'s MIND step: negatives drawn on the host per step, then loss, backward, Adam."""
    sampler = NegativeSampler(np.ones(model.cfg.n_items), "uniform", seed=0)
    graphs = graphs and dev.type == "cuda"  # a CPU dry run runs the "graphed" step eagerly
    opt = make_optimizer(model.parameters(), lr=1e-3, capturable=graphs)

    def train_step(sb):
        opt.zero_grad(set_to_none=True)
        loss = retrieval_loss(model, sb[0], sampler, n_neg, negatives=(sb[1], sb[2]))
        loss.backward()
        opt.step()
        return loss.detach(), {}

    runner = CudaGraphStep(train_step, enabled=graphs)

    def step(i):
        ids, lq = sampler.sample(n_neg)
        return runner((batches[i % len(batches)], ids.to(dev, non_blocking=True), lq.to(dev, non_blocking=True)))[0]

    step.runner = runner
    return step


def dien_model(a, dev, batch=None, n_batches=8, layout="auto"):
    cate = torch.randint(1, a.cates, (a.items, 1), generator=torch.Generator().manual_seed(0))
    cate[0] = 0
    torch.manual_seed(0)
    model = DIEN(DIENConfig(n_items=a.items, embed_dim=64, aux_alpha=1.0), {"cate": cate}, {"cate": a.cates}).to(dev).train()
    model.layout = layout
    bs = rk.make_batches(n_batches, batch or a.batch, 50, 5, a.items, cate, seed=1)
    return model, cate, [b.to(dev) for b in bs]


def dien_step(model, batches, graphs: bool):
    graphs = graphs and batches[0].hist.is_cuda
    opt = make_optimizer(model.parameters(), lr=1e-3, capturable=graphs)

    def train_step(b):
        opt.zero_grad(set_to_none=True)
        loss, _ = ranking_loss(model, b)
        loss.backward()
        opt.step()
        return loss.detach(), {}

    runner = CudaGraphStep(train_step, enabled=graphs)

    def step(i):
        return runner(batches[i % len(batches)])[0]

    step.runner = runner
    return step


def rates_summary(windows: dict, ours: str) -> dict:
    out = {"train": {k: {"best": max(v), "median": statistics.median(v), "all": v} for k, v in windows.items()}, "ratio": {}}
    for name, v in windows.items():
        if name == ours:
            continue
        pairs = [x / y for x, y in zip(windows[ours], v)]
        out["ratio"][name] = {"best": max(windows[ours]) / max(v), "median": statistics.median(windows[ours]) / statistics.median(v),
                              "paired_median": statistics.median(pairs), "paired_min": min(pairs)}
    for name, r in out["train"].items():
        print(f"  {name:<34} samples/s best {r['best']:>10,.0f}  median {r['median']:>10,.0f}", flush=True)
    for name, r in out["ratio"].items():
        print(f"  ratio {ours} / {name}: best {r['best']:.2f}x  median {r['median']:.2f}x  paired median "
              f"{r['paired_median']:.2f}x (min {r['paired_min']:.2f}x)", flush=True)
    return out


def side_by_side(runs: dict, ours: str, a) -> dict:
    """Interleaved training windows of every run at batch a.batch; rates, ratios against `ours`, its graph replays."""
    w = interleaved(runs, a.batch, a.warmup, a.steps, a.repeats, sync=lambda: sync(a.dev))
    out = rates_summary(w, ours)
    out["graph_replays"] = runs[ours].runner.replays
    return out


# ---------------------------------------------------------------- parts


@part("validate")
def validate(a):
    """Graphed steps against eager ones from the same start; DIEN's padded layout against packed on the device."""
    dev = a.dev
    out = {}
    for name, build, make_step in (("mind", lambda: mind_model(a, dev), mind_step),
                                   ("dien", lambda: dien_model(a, dev)[::2], None)):
        runs = {}
        for graphs in (False, True):
            model, batches = build()
            if name == "mind":
                step = mind_step(model, batches, dev, graphs)
            else:
                step = dien_step(model, batches, graphs)
            losses = [float(step(i)) for i in range(a.validate_steps)]
            runs[graphs] = (losses, {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
                            getattr(step.runner, "replays", 0), getattr(step.runner, "failed", None))
        (le, pe, _, _), (lg, pg, replays, failed) = runs[False], runs[True]
        dl = max(abs(x - y) for x, y in zip(le, lg))
        dp = max(float((pe[k] - pg[k]).abs().max()) for k in pe if pe[k].is_floating_point())
        out[name] = {"steps": a.validate_steps, "graph_replays": replays, "capture_failed": failed,
                     "max_abs_loss_diff": dl, "max_abs_param_diff": dp, "loss_first_last": [le[0], le[-1]]}
        print(f"  {name}: {a.validate_steps} steps, {replays} replayed from the graph (capture failed: {failed}); "
              f"max |loss eager - graphed| {dl:.2e}, max |param diff| {dp:.2e}; loss {le[0]:.4f} -> {le[-1]:.4f}", flush=True)
    model, cate, batches = dien_model(a, dev)
    model.eval()
    with torch.no_grad():
        b = batches[0]
        model.layout = "padded"
        lp, ap = model.logits_and_aux(b)
        model.layout = "packed"
        lk, ak = model.logits_and_aux(b)
        cpu = DIEN(model.cfg, {"cate": cate}, {"cate": a.cates})
        cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        cpu.eval().layout = "packed"
        lc, ac = cpu.logits_and_aux(b.to("cpu"))
    out["dien_layouts"] = {"padded_vs_packed_logits": float((lp - lk).abs().max()), "padded_vs_packed_aux": float((ap - ak).abs()),
                           "device_vs_cpu_logits": float((lp.cpu() - lc).abs().max())}
    print(f"  DIEN on {dev}: padded vs packed logits max diff {out['dien_layouts']['padded_vs_packed_logits']:.2e}, aux "
          f"{out['dien_layouts']['padded_vs_packed_aux']:.2e}; vs the CPU {out['dien_layouts']['device_vs_cpu_logits']:.2e}")
    return out


@part("mind")
def mind_speed(a):
    dev = a.dev
    runs = {}
    m1, b1 = mind_model(a, dev)
    runs["facetrec MIND (graphed)"] = mind_step(m1, b1, dev, True)
    m2, b2 = mind_model(a, dev)
    runs["facetrec MIND (eager)"] = mind_step(m2, b2, dev, False)
    peer = rs.load_peer(argparse.Namespace(items=a.items, users=a.users, dim=64, profile_dim=16, hist=50, k=4))
    if peer is not None:
        peer.model.to(dev).train()
        g = torch.Generator().manual_seed(2)
        cpu_batches = rs.make_batches(8, a.batch, 50, 5, a.items, a.users, seed=1)
        inputs = [{k: v.to(dev) for k, v in peer.inputs(b, torch.randint(1, a.items, (a.batch, 3), generator=g)).items()}
                  for b in cpu_batches]
        runs[peer.name] = peer.train_step(inputs)
    return side_by_side(runs, "facetrec MIND (graphed)", a)


@part("dien")
def dien_speed(a):
    dev = a.dev
    runs = {}
    m1, cate, b1 = dien_model(a, dev)
    runs["facetrec DIEN (graphed)"] = dien_step(m1, b1, True)
    m2, _, b2 = dien_model(a, dev)
    runs["facetrec DIEN (eager)"] = dien_step(m2, b2, False)
    m3, _, b3 = dien_model(a, dev, layout="packed")
    runs["facetrec DIEN (eager, packed)"] = dien_step(m3, b3, False)
    cpu_batches = rk.make_batches(8, a.batch, 50, 5, a.items, cate, seed=1)
    for peer in rk.load_peers(argparse.Namespace(items=a.items, cates=a.cates, dim=64, hist=50), cate, str(dev)):
        peer.model.to(dev).train()
        if hasattr(peer, "cate"):
            peer.cate = peer.cate.cpu()
        xs = []
        for b in cpu_batches:
            x = peer.inputs(b)
            xs.append({k: v.to(dev) for k, v in x.items()} if isinstance(x, dict) else x.to(dev))
        runs[peer.name] = rk.peer_step(peer, xs, [b.label.to(dev) for b in cpu_batches])
    return side_by_side(runs, "facetrec DIEN (graphed)", a)


@part("saturate")
def saturate(a):
    dev = a.dev
    out = {}
    for name in ("mind", "dien"):
        out[name] = {}
        for bs in [a.batch] + a.big:
            try:
                if name == "mind":
                    m, b = mind_model(a, dev, n_batches=4, batch=bs)
                    step = mind_step(m, b, dev, True)
                else:
                    m, _, b = dien_model(a, dev, batch=bs, n_batches=4)
                    step = dien_step(m, b, True)
                r = interleaved({name: step}, bs, a.warmup, max(3, a.steps // 2), 3, sync=lambda: sync(dev))[name]
                out[name][bs] = max(r)
                print(f"  {name} graphed, batch {bs:>6}: {max(r):>12,.0f} samples/s", flush=True)
                del m, b, step
            except torch.OutOfMemoryError as e:
                out[name][bs] = f"out of memory: {e}"
                break
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return out


@part("serve")
def serve(a):
    dev = a.dev
    model, _, _ = dien_model(a, dev, n_batches=1)
    model.eval()
    hist = torch.randint(1, a.items, (50,), generator=torch.Generator().manual_seed(3)).to(dev)
    mask = torch.ones(50, dtype=torch.bool, device=dev)
    out = {}
    for n in (200, 2000):
        cands = torch.randint(1, a.items, (n,), generator=torch.Generator().manual_seed(4)).to(dev)

        def call():
            model.score_candidates(hist, mask, cands)
            sync(dev)

        r = rk.time_calls(call, a.serve_calls)
        out[f"dien_{n}_candidates"] = r
        print(f"  DIEN score_candidates, history 50, {n} candidates on {dev}: p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")
    return out


@part("train")
def train(a):
    """`facetrec prepare` + `facetrec train` (MIND, DIEN) on amazon-beauty on the device, 1 epoch each, with evaluation."""
    if not a.data:
        return {"skipped": "no --data (the amazon-beauty folder)"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    runs = Path(a.runs)
    common = [f"data.root={a.data}", f"train.device={a.dev.type}", f"train.epochs={a.epochs}"]
    out = {}
    for label, cfg, extra in (("prepare", "configs/amazon-beauty.yaml", []),
                              ("mind", "configs/amazon-beauty/mind.yaml", []),
                              ("dien", "configs/amazon-beauty/dien.yaml", []),
                              ("mind_nographs", "configs/amazon-beauty/mind.yaml", ["train.cuda_graphs=off"]),
                              ("dien_nographs", "configs/amazon-beauty/dien.yaml", ["train.cuda_graphs=off"])):
        if label.endswith("nographs") and a.quick:
            continue
        cmd = [sys.executable, "-m", "facetrec", "prepare" if label == "prepare" else "train", cfg] + ([] if label == "prepare" else ["--quiet"])
        sets = common[:1] + ([] if label == "prepare" else common[1:] + extra) + [f"run.dir={runs / label}"]
        if label == "prepare":
            sets[-1] = f"run.dir={runs / 'mind'}"
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.train_timeout)
        secs = time.perf_counter() - t0
        tail = (p.stdout + p.stderr)[-1500:]
        print(f"  {' '.join(cmd[3:5])} {' '.join(sets[1:])}: rc {p.returncode}, {secs:.1f} s\n{tail}", flush=True)
        rec = {"rc": p.returncode, "seconds": round(secs, 1), "tail": tail}
        metrics = runs / label / "metrics.json"
        if metrics.exists():
            rec["metrics"] = json.loads(metrics.read_text())
            t = rec["metrics"].get("train", {})
            print(f"  fit {t.get('seconds')} s for {t.get('steps')} steps, {t.get('cuda_graph_replays')} replayed from a "
                  f"CUDA graph; capture failed: {t.get('cuda_graph_failed')}", flush=True)
        out[label] = rec
    return out


def _flat(d: dict, depth: int = 2) -> dict:
    """Scalars of a metrics dict, one level of nesting kept (the multi-task models report per task)."""
    return {k: (_flat(v, depth - 1) if isinstance(v, dict) else v) for k, v in d.items()
            if not isinstance(v, list) and (not isinstance(v, dict) or depth > 1)}


@part("models")
def models(a):
    """Every model trained and evaluated by `facetrec train` on the device (a short run: --steps-per-model
    steps), then MIND + DIEN exported and served by `Pipeline(device=...)`, against the same artifact on the CPU."""
    if not a.data:
        return {"skipped": "no --data (the amazon-beauty folder)"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    runs = Path(a.runs) / "models"
    out = {}
    for name in ("mind", "youtubednn", "dien", "din", "base", "ple", "ple-uie"):
        cmd = [sys.executable, "-m", "facetrec", "train", f"configs/amazon-beauty/{name}.yaml", "--quiet"]
        for kv in (f"data.root={a.data}", f"train.device={a.dev.type}", "train.epochs=1",
                   f"train.max_steps={a.steps_per_model}", f"run.dir={runs / name}"):
            cmd += ["--set", kv]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.train_timeout)
        rec = {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1), "tail": (p.stdout + p.stderr)[-600:]}
        metrics = runs / name / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            rec["device"], rec["test"] = m.get("train", {}).get("device"), _flat(m.get("test", {}))
            rec["cuda_graph_replays"] = m.get("train", {}).get("cuda_graph_replays")
            rec["cuda_graph_failed"] = m.get("train", {}).get("cuda_graph_failed")
        out[name] = rec
        print(f"  {name}: rc {p.returncode}, {rec['seconds']} s, device {rec.get('device')}, graph replays "
              f"{rec.get('cuda_graph_replays')} (failed: {rec.get('cuda_graph_failed')}), test {rec.get('test')}"
              + ("" if p.returncode == 0 else "\n" + rec["tail"]), flush=True)
    cmd = [sys.executable, "-m", "facetrec", "export", "--retrieval", str(runs / "mind"), "--ranking", str(runs / "dien"),
           "--out", str(runs / "artifact"), "--index", "exact"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.train_timeout)
    out["export"] = {"rc": p.returncode, "tail": (p.stdout + p.stderr)[-600:]}
    print(f"  export: rc {p.returncode} {(p.stdout + p.stderr)[-300:]}", flush=True)
    from facetrec.serving.pipeline import Pipeline

    pipes = {d: Pipeline(runs / "artifact", device=d) for d in ("cpu", str(a.dev))}
    hist = pipes["cpu"].popular[:30].astype(np.int64)
    res = {d: pp.recommend(hist, n=20) for d, pp in pipes.items()}
    same = [r.item for r in res["cpu"]] == [r.item for r in res[str(a.dev)]]
    diff = max(abs(x.score - y.score) for x, y in zip(res["cpu"], res[str(a.dev)]))
    out["pipeline"] = {"same_items": same, "max_score_diff": diff, "latency": {}}
    for d, pp in pipes.items():
        pp.warm_up()
        out["pipeline"]["latency"][d] = rk.time_calls(lambda: pp.recommend(hist, n=20), a.serve_calls)
    print(f"  Pipeline.recommend on {a.dev} vs cpu: same top-20 {same}, max score diff {diff:.2e}; p50 "
          + ", ".join(f"{d} {v['p50_ms']:.1f} ms" for d, v in out["pipeline"]["latency"].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default="validate,mind,dien,saturate,serve,train")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--cates", type=int, default=200)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--big", default="1024,4096,16384", help="larger batches for the saturation part")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--validate-steps", type=int, default=12)
    ap.add_argument("--serve-calls", type=int, default=100)
    ap.add_argument("--data", default="", help="amazon-beauty raw folder for the train part")
    ap.add_argument("--runs", default="runs/gpu")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-timeout", type=int, default=240)
    ap.add_argument("--steps-per-model", type=int, default=200, help="models part: training steps per model")
    ap.add_argument("--quick", action="store_true", help="small sizes (a CPU dry run)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.quick:
        a.items, a.users, a.batch, a.big, a.warmup, a.steps, a.repeats, a.validate_steps, a.serve_calls = 2000, 500, 64, "128", 2, 3, 2, 5, 5
    a.big = [int(x) for x in str(a.big).split(",") if x]
    a.dev = torch.device(a.device)
    RES["env"] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(a.dev),
                  "gpu": torch.cuda.get_device_name(0) if a.dev.type == "cuda" else None,
                  "cuda": torch.version.cuda, "cpus": os.cpu_count(), "args": {k: str(v) for k, v in vars(a).items()}}
    print(json.dumps(RES["env"]), flush=True)
    parts = {f.part: f for f in (validate, mind_speed, dien_speed, saturate, serve, train, models)}
    for name in a.only.split(","):
        parts[name](a)
    save(a)


if __name__ == "__main__":
    main()
