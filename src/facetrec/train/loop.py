"""Model-agnostic training: fit / evaluate / checkpoint / resume / early stopping.

A model family hands the loop a `Task` (its model, its batches, its loss, its evaluation);
the loop owns the optimiser, the progress bar, the JSONL log, the checkpoints (written
atomically) and early stopping on the task's monitored validation metric.

Run directory:
  config.yaml        the resolved config
  train_log.jsonl    one line per logged step window and per validation
  last.pt            model + optimiser + loop state (+ the weight average) after the last finished epoch (resume)
  best.pt            model weights with the best validation metric (the averaged weights under train.ema)
"""

from __future__ import annotations

import io
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from facetrec.config import TrainConfig
from facetrec.errors import ConfigError
from facetrec.io import atomic_write
from facetrec.train.graphs import CudaGraphStep, graphs_setting, graphs_wanted


@dataclass
class Task:
    """What a model family provides to the loop."""

    model: nn.Module
    batches: Callable[[int], Iterable[Any]]  # epoch -> training batches (reshuffled per epoch)
    n_batches: int  # batches per epoch (for the progress bar)
    loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]  # batch -> (loss, parts to log)
    evaluate: Callable[[str], dict[str, float]]  # split ("valid" | "test") -> metrics
    monitor: str  # validation metric to maximise, e.g. "recall@50" or "auc"
    graph_safe: bool = False  # the step has no host sync on a GPU: a CUDA graph can capture it (train.cuda_graphs)


@dataclass
class FitResult:
    best_valid: dict[str, float]
    best_epoch: int
    epochs: int
    seconds: float
    steps: int
    graph_replays: int = 0  # steps replayed from a CUDA graph (train.cuda_graphs; 0 on the CPU)
    graph_failed: str | None = None  # why capture failed, when it was tried and failed


class _LossModule(nn.Module):
    """The task's loss as a module, so DistributedDataParallel can wrap it (its forward is the step)."""

    def __init__(self, model: nn.Module, loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(batch)


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average logged values over all ranks (each rank saw its own slice of the global batch)."""
    if not _distributed():
        return values
    keys = sorted(values)
    on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


def _on_rank0(fn: Callable[[], dict[str, float]], rank: int) -> dict[str, float]:
    """Run an evaluation on rank 0 only and give every rank its result (same early-stopping decisions)."""
    if not _distributed():
        return fn()
    box = [fn() if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_optimizer(params, lr: float, weight_decay: float = 0.0, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam as `facetrec train` runs it: the fused kernel (one pass per parameter; about +30%
    samples/s for MIND on CPU, benchmarks/mind_throughput.py --fused-adam), plain Adam where the
    fused one is not available. Same update rule either way. `capturable`: the step counter stays
    on the GPU, as a CUDA-graph-captured step needs (`train.cuda_graphs`)."""
    params = list(params)
    extra = {"capturable": True} if capturable else {}
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):  # a device / dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **extra)


class WeightAverage:
    """`train.ema`: an exponential moving average of the trainable parameters,
    ā <- d_t ā + (1 - d_t) θ after every optimiser step t = 1, 2, ..., from ā = θ at the start, with
    the decay warmed up as d_t = min(d, (1 + t) / (10 + t)): a short run (a smoke test, the demo's
    200 steps) averages its recent steps, not its random start; from t ≈ 10 / (1 - d) on it is
    the plain average of decay d. Validation, best.pt and so the final model use the averaged
    weights (buffers, e.g. UIE's memories, stay the live ones); the optimiser keeps stepping the
    live weights.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> avg = WeightAverage(lin, 0.5)
        >>> for _ in range(2):  # two steps of +2; d_1 = 2/11, d_2 = 3/12
        ...     with torch.no_grad():
        ...         _ = lin.weight.add_(2.0)
        ...     avg.update()
        >>> with avg.swapped():
        ...     lag = float((avg.live[0] - lin.weight.detach()).abs().max())
        >>> round(lag, 4)  # live - (w + 4 - 0.25 · (2 + 2 · 2 / 11))
        0.5909
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.steps = 0
        self.live: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.average, self.params, 1.0 - d)  # no_grad: the parameters are read, not recorded

    @contextmanager
    def swapped(self):
        """The model holds the averaged weights inside the block (`live` keeps the trained ones)."""
        with torch.no_grad():
            self.live = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, x in zip(self.params, self.live):
                    p.copy_(x)
            self.live = []

    def state(self) -> dict[str, Any]:
        return {"average": [a.cpu() for a in self.average], "steps": self.steps}

    def load(self, saved: dict[str, Any]) -> None:
        if len(saved["average"]) != len(self.average):
            raise ConfigError(f"checkpoint holds {len(saved['average'])} averaged tensors, the model has {len(self.average)} "
                             "trainable ones: it was written by another model or facetrec version (e.g. a YouTube DNN "
                             "before its unused S was frozen); resume with that version or start a new run dir")
        with torch.no_grad():
            for a, x in zip(self.average, saved["average"]):
                a.copy_(x)
        self.steps = int(saved["steps"])


def fit(task: Task, cfg: TrainConfig, run_dir: Path, rank: int = 0, log_every: int = 50,
        progress: bool = True) -> FitResult:
    """Train with early stopping on `task.monitor`; resume from run_dir/last.pt when present."""
    model = task.model
    step_module: nn.Module = _LossModule(model, task.loss)
    if _distributed():
        from torch.nn.parallel import DistributedDataParallel

        from facetrec.train.distributed import global_batchnorm

        global_batchnorm(model)  # batch statistics of the global batch, not of this rank's slice
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        # buffers stay broadcast from rank 0 before every forward (DDP's default): for MIND / DIEN
        # they are constants or global-batch statistics, alike on every rank anyway, but models
        # with memories updated in training (UIE's cluster centres) would otherwise drift apart
        step_module = DistributedDataParallel(step_module, device_ids=device_ids)
    graph_setting = graphs_setting(cfg.cuda_graphs)
    graphs = graphs_wanted(graph_setting, model_device(model), task.graph_safe, _distributed())
    opt = make_optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=graphs)

    def train_step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        opt.zero_grad(set_to_none=True)
        loss, parts = step_module(batch)
        loss.backward()
        opt.step()
        return loss.detach(), parts

    run_step = CudaGraphStep(train_step, enabled=graphs, strict=graph_setting == "on")
    if not 0 <= cfg.ema < 1:
        raise ConfigError(f"train.ema {cfg.ema} must be in [0, 1): the decay of the weight average (0 = off, e.g. 0.999)")
    avg = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
    state = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": 0, "bad": 0, "seconds": 0.0, "best_valid": {}}
    last = run_dir / "last.pt"
    if last.exists():
        ck = load_checkpoint(last)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        state.update(json.loads(ck["state"]))
        if avg is not None:
            if "ema" not in ck:
                raise ConfigError(f"{last} was written without train.ema; resume with the same train.ema, or start a new run dir")
            avg.load(ck["ema"])
        if rank == 0:
            print(f"resuming {run_dir} after epoch {state['epoch']} (best {task.monitor} {state['best']:.4f})")
    log = open(run_dir / "train_log.jsonl", "a") if rank == 0 else None
    t_start = time.perf_counter() - state["seconds"]
    stop = state["bad"] >= cfg.patience
    try:
        while state["epoch"] < cfg.epochs and not stop:
            epoch = state["epoch"] + 1
            model.train()
            total = task.n_batches if not cfg.max_steps else max(0, min(task.n_batches, cfg.max_steps - state["step"]))
            bar = tqdm(task.batches(cfg.seed * 1000 + epoch), total=total, desc=f"epoch {epoch}",  # max_steps: the bar ends where training does
                       disable=not progress or rank != 0, leave=False, mininterval=1.0)
            window: dict[str, float] = {}
            n_window = 0

            def log_window() -> None:
                # the sums stay on the device between windows: no host sync per step
                means = _mean_across_ranks({k: float(v) / n_window for k, v in window.items()})
                if not math.isfinite(means["loss"]):
                    raise FloatingPointError(f"loss became {means['loss']} in the {n_window} steps up to step "
                                             f"{state['step']}; lower train.lr")
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                if log:
                    log.write(json.dumps({"epoch": epoch, "step": state["step"], **means}) + "\n")

            for batch in bar:
                loss, parts = run_step(batch)
                if avg is not None:
                    avg.update()
                state["step"] += 1
                n_window += 1
                for k, v in {"loss": loss, **parts}.items():
                    window[k] = window.get(k, 0.0) + v  # a new tensor: a graph's replay overwrites `loss`
                if n_window == log_every:
                    log_window()
                    window, n_window = {}, 0
                if cfg.max_steps and state["step"] >= cfg.max_steps:
                    stop = True
                    break
            if n_window:  # the epoch's last, shorter window (every rank has the same steps)
                log_window()
            bar.close()
            state["epoch"] = epoch
            if epoch % cfg.eval_every == 0 or stop or epoch == cfg.epochs:
                with avg.swapped() if avg is not None else nullcontext():  # validate (and keep) the averaged weights
                    valid = _on_rank0(lambda: task.evaluate("valid"), rank)
                    score = valid[task.monitor]
                    improved = score > state["best"]
                    if improved and rank == 0:
                        buf = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                        save_checkpoint(run_dir / "best.pt", {"model": buf})
                if improved:
                    state.update(best=score, best_epoch=epoch, bad=0, best_valid=valid)
                else:
                    state["bad"] += 1
                    stop = stop or state["bad"] >= cfg.patience
                if rank == 0:
                    print(f"epoch {epoch}: valid " + " ".join(f"{k} {v:.4f}" for k, v in valid.items())
                          + ("  *" if improved else ""))
                    if log:
                        log.write(json.dumps({"epoch": epoch, "step": state["step"], "valid": valid}) + "\n")
            state["seconds"] = time.perf_counter() - t_start
            if rank == 0:
                ck = {"model": model.state_dict(), "optim": opt.state_dict(), "state": json.dumps(state)}
                if avg is not None:
                    ck["ema"] = avg.state()
                save_checkpoint(last, ck)
            if log:
                log.flush()
    finally:
        if log:
            log.close()
    if _distributed():
        torch.distributed.barrier()  # rank 0 may still be writing best.pt
    best = run_dir / "best.pt"
    if best.exists():
        model.load_state_dict(load_checkpoint(best)["model"])
    return FitResult(state["best_valid"], state["best_epoch"], state["epoch"], time.perf_counter() - t_start, state["step"],
                     run_step.replays, run_step.failed)
