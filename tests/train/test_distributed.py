"""Two processes under the torch elastic launcher (gloo, CPU) train like one process with the same
global batch; only rank 0 writes; a run whose rank dies resumes and ends where an uninterrupted one does.

Tolerance. The ranks compute their half-batch gradients and DDP sums them, so float32 sums run
in a different order than in one process: the two runs differ by a few ulps per step (measured
on the runs below: losses by < 1e-7 relative, parameters typically by < 1e-7 absolute). Adam
divides by sqrt(v) + 1e-8, so a coordinate whose gradient almost cancels gets a step whose size
depends on those ulps: the worst parameter measured differs by 1.5e-6 (5e-5 relative, one
embedding row of DIEN). So: logged losses within 1e-6 relative; parameters within
1e-5 + 1e-5 |x|. A run that is not equivalent — rank-local batch norm statistics, an unweighted
mean of DIEN's per-rank auxiliary losses, other negatives or other samples per rank — moves
parameters by ~1e-3 (lr 1e-3) and fails by two orders of magnitude.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facetrec.data.dataset import minibatches

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "synthetic.yaml"
CRASH_ONCE = Path(__file__).with_name("crash_once.py")
LOSS_RTOL = 1e-6
PARAM_RTOL = PARAM_ATOL = 1e-5

# tiny models, one thread per process (the CI machine has 2 cores); MIND: 8354 training samples,
# 16 full global batches + 162; DIEN: 19324 samples, 9 full global batches + 892 (uneven aux counts)
MIND = ["model.name=mind", "model.dim=16", "model.hidden=[32]", "train.batch_size=512", "train.n_negatives=64",
        "train.epochs=2"]
DIEN = ["model.name=dien", "model.embed_dim=8", "model.mlp=[16,8]", "train.batch_size=2048", "train.epochs=1",
        "train.embed_l2=1.0"]  # the mini-batch L2 over the global batch's distinct ids, whichever rank holds them


@pytest.fixture(scope="module")
def launch(synth_prepared, tmp_path_factory):
    """Run `facetrec train` in fresh processes: launch(run_dir, overrides, nproc=1, crash_at=0) -> output.
    With crash_at, rank 1 dies at that optimiser step and the launch must fail."""
    raw = synth_prepared[1]
    env = {**os.environ, "FACETREC_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning"}

    def run(run_dir: Path, overrides: list[str], nproc: int = 1, crash_at: int = 0) -> str:
        sets = [f"data.root={raw}", f"run.dir={run_dir}", "train.threads=1", "train.device=cpu", *overrides]
        args = ["train", str(CONFIG), "--quiet", *[a for s in sets for a in ("--set", s)]]
        if nproc == 1:
            cmd = [sys.executable, "-m", "facetrec", *args]
        else:
            # --standalone: a rendezvous on a free local port (other runs may hold the default one)
            elastic = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                       "--monitor_interval", "0.1"]
            cmd = elastic + ([str(CRASH_ONCE), str(crash_at)] if crash_at else ["-m", "facetrec"]) + args
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        out = p.stdout + p.stderr
        if crash_at:
            assert p.returncode != 0 and "exitcode: 17" in out, out[-4000:]
        else:
            assert p.returncode == 0, out[-4000:]
        return out

    return run


def _losses(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [x for x in lines if "valid" not in x]


def assert_same_training(one: Path, many: Path) -> None:
    """Same logged losses (same windows, same steps) and the same final parameters."""
    a, b = _losses(one), _losses(many)
    assert [(x["epoch"], x["step"], sorted(x)) for x in a] == [(x["epoch"], x["step"], sorted(x)) for x in b]
    assert a, "no loss was logged"
    for x, y in zip(a, b):
        for k in x:
            if k not in ("epoch", "step"):
                assert math.isclose(x[k], y[k], rel_tol=LOSS_RTOL), (k, x, y)
    pa = torch.load(one / "last.pt", weights_only=True)["model"]
    pb = torch.load(many / "last.pt", weights_only=True)["model"]
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=lambda m, k=k: f"{k}: {m}")
    assert json.loads(torch.load(one / "last.pt", weights_only=True)["state"])["step"] == \
        json.loads(torch.load(many / "last.pt", weights_only=True)["state"])["step"]


@pytest.mark.slow
def test_two_processes_train_dien_like_one(launch, tmp_path):
    """DIEN: auxiliary loss over a different number of positions per rank, Dice's batch norm,
    the mini-batch-aware L2 (ids shared by the ranks' slices counted once)."""
    launch(tmp_path / "one", DIEN)
    launch(tmp_path / "two", DIEN, nproc=2)
    assert_same_training(tmp_path / "one", tmp_path / "two")
    # rank 0 alone writes: each record once, one set of outputs, no leftovers of atomic writes
    assert len((tmp_path / "two" / "train_log.jsonl").read_text().splitlines()) == \
        len((tmp_path / "one" / "train_log.jsonl").read_text().splitlines())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["youtubednn", "mind"])
def test_two_processes_train_with_in_batch_negatives_like_one(launch, tmp_path, model):
    """In-batch negatives under two processes are the global batch's targets: each rank gathers the
    other's target vectors (with their gradients), so the run matches one process. MIND scores them
    (and the sampled ones) by each user's best interest (train.negative_scores=max, its config's)."""
    sets = [f"model.name={model}", "model.dim=16", "model.hidden=[32]", "train.batch_size=512", "train.n_negatives=64",
            "train.epochs=1", "train.in_batch_negatives=true"] + (["train.negative_scores=max"] if model == "mind" else [])
    launch(tmp_path / "one", sets)
    launch(tmp_path / "two", sets, nproc=2)
    assert_same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_two_processes_resume_after_a_rank_dies_and_train_mind_like_one(launch, tmp_path):
    """MIND: shared sampled negatives and per-sample routing logits. Rank 1 dies in epoch 2
    (step 17 + 8), the launcher stops the run; the same command again resumes from epoch 1's
    checkpoint. (torchrun's own --max_restarts does the same relaunch, but its gloo re-connection
    fails now and then on a loaded machine: a second launch keeps this test deterministic.)"""
    launch(tmp_path / "one", MIND)
    launch(tmp_path / "two", MIND, nproc=2, crash_at=25)
    state = json.loads(torch.load(tmp_path / "two" / "last.pt", weights_only=True)["state"])
    assert (state["epoch"], state["step"]) == (1, 17) and not (tmp_path / "two" / "metrics.json").exists()
    out = launch(tmp_path / "two", MIND, nproc=2)
    assert "resuming" in out, out[-4000:]
    assert_same_training(tmp_path / "one", tmp_path / "two")
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 34 and metrics["train"]["epochs"] == 2


def test_rank1_writes_nothing(tmp_path):
    """The loop's rank gating: a non-zero rank trains but writes no log, checkpoint or best weights."""
    from facetrec.config import TrainConfig
    from facetrec.train.loop import Task, fit

    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    task = Task(model=model, batches=lambda seed: [(x, y)] * 2, n_batches=2,
                loss=lambda b: (((model(b[0]) - b[1]) ** 2).mean(), {}), evaluate=lambda split: {"neg_mse": 0.0},
                monitor="neg_mse")
    before = model.weight.detach().clone()
    for rank, run_dir in ((1, tmp_path / "r1"), (0, tmp_path / "r0")):
        run_dir.mkdir()
        fit(task, TrainConfig(epochs=2), run_dir, rank=rank, progress=False)
        assert not torch.equal(model.weight.detach(), before)  # it did train
    assert list((tmp_path / "r1").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "r0").iterdir()) == ["best.pt", "last.pt", "train_log.jsonl"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [32, 33, 34, 36, 37, 38, 39, 41])
def test_rank_slices_make_up_the_single_process_batches(n, world):
    """Rank slices of each global batch concatenate to one process's batch (same seed); the last,
    shorter batch is split too, and dropped only when it has fewer samples than there are ranks."""
    bs = 16 if world == 2 else 18
    one = list(minibatches(n, bs, True, seed=7))
    ranks = [list(minibatches(n, bs, True, seed=7, rank=r, world=world)) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every rank takes the same number of steps
    for step, parts in enumerate(zip(*ranks)):
        assert np.array_equal(np.concatenate(parts), one[step])
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    tail = n % bs
    assert len(ranks[0]) == len(one) - (0 < tail < world)


def _owned_ids_worker(rank: int, world: int, init: str, out: str) -> None:
    from facetrec.train.distributed import close_process_group, owned_distinct_ids

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        slices = [torch.tensor([5, 0, 3, 3, 9]), torch.tensor([9, 12, 0, 0]), torch.tensor([2, 5, 6, 7, 8, 11, 1])]
        owned, scale = owned_distinct_ids(slices[rank])
        torch.save({"owned": owned, "scale": scale}, f"{out}.{rank}")
    finally:
        close_process_group()


def test_owned_distinct_ids_split_the_global_batch_ids_once_over_the_ranks(tmp_path):
    """The mini-batch L2 under DDP: ranks own disjoint shares of the global batch's distinct ids
    (an id in several slices, or in another rank's slice only, is counted once), scale = world."""
    import torch.multiprocessing as mp

    world = 3
    mp.spawn(_owned_ids_worker, args=(world, f"file://{tmp_path / 'store'}", str(tmp_path / "out")), nprocs=world)
    got = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(world)]
    owned = [set(g["owned"].tolist()) for g in got]
    assert all(g["scale"] == world for g in got)
    assert set().union(*owned) == {1, 2, 3, 5, 6, 7, 8, 9, 11, 12}
    assert sum(map(len, owned)) == 10  # disjoint
    assert all(j % world == r for r in range(world) for j in owned[r])


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    from facetrec.train.distributed import all_gather_rows, close_process_group

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = 3 if rank == 0 else 2  # slices of different sizes, as in an epoch's last batch
        vec = (torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 10 * rank).requires_grad_()
        ids = torch.arange(n) + 100 * rank
        got_vec, got_ids = all_gather_rows(vec, ids)
        (got_vec.sum() * (rank + 1)).backward()  # rank r's loss weighs every global row by r + 1
        torch.save({"vec": got_vec.detach(), "ids": got_ids, "grad": vec.grad}, f"{out}/rank{rank}.pt")
        del got_vec  # its graph holds the group (close_process_group's docstring)
    finally:
        close_process_group()


def test_all_gather_rows_joins_uneven_slices_and_returns_every_ranks_gradient(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    want_ids = [0, 1, 2, 100, 101]
    want_vec = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(4.0).reshape(2, 2) + 10])
    for rank, n in ((0, 3), (1, 2)):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["ids"].tolist() == want_ids and torch.equal(got["vec"], want_vec)  # padding dropped, rank order
        assert torch.equal(got["grad"], torch.full((n, 2), 3.0))  # 1 from rank 0's loss + 2 from rank 1's
