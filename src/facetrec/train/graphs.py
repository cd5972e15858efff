"""CUDA-graph replay of a training step (`train.cuda_graphs`, GPU only).

On a GPU, a step of MIND or DIEN at batch 256 is hundreds to a thousand small kernels: the time
goes to launching them from Python, not to running them (SPEC §7). A CUDA graph records the
whole step once — forward, loss, backward and the optimiser's update — and replays it with one
launch; a replay reads its inputs from fixed ("static") tensors, so each step copies the new
batch into them first.

What a captured step needs (the models' GPU paths keep to it, see `graph_safe` on the tasks):
fixed input shapes (the loop captures one graph for the full batch shape and runs any other
shape, e.g. an epoch's last batch, eagerly); no host synchronisation inside the step (no
`.item()`, no data-dependent shapes such as boolean indexing, no copies from host memory);
random draws made outside the step and passed in (the retrieval negatives are part of the
batch); an optimiser built with `capturable=True` (its step counter lives on the GPU).

The first `warmup` steps of a shape run eagerly on a side stream (real training steps: the
optimiser state and cuBLAS get allocated there, as capture requires); the next step of that
shape is captured and then replayed, so no step is run twice or skipped and a graphed run
follows the eager run's trajectory (benchmarks/gpu_check.py compares them).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """The tensors of a batch: a tensor, a dataclass of tensors, or a tuple / list of those, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensors_of(getattr(obj, f.name))]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in tensors_of(x)]
    if obj is None:
        return []
    raise TypeError(f"a batch for a CUDA graph holds tensors, dataclasses of tensors and tuples; got {type(obj).__name__}")


def signature(obj: Any) -> tuple:
    """Shapes and dtypes of a batch's tensors: batches with one signature share a graph."""
    return tuple((tuple(t.shape), t.dtype) for t in tensors_of(obj))


class CudaGraphStep:
    """Runs `step(batch) -> (loss, parts)` (loss and parts: tensors; the step does the backward and
    the optimiser update itself) eagerly or from a CUDA graph.

    Args:
        step: one training step on a batch; must be capture-safe for batches of the captured shape.
        enabled: False runs every step eagerly (the CPU, DDP, models with host syncs).
        warmup: eager steps of a shape before its graph is captured.
        max_graphs: shapes that get a graph; others always run eagerly.
        strict: a failed capture raises (train.cuda_graphs=on) instead of going on eagerly with a warning.

    Returns the step's (loss, parts); after a replay they are the graph's static outputs, which the
    next replay overwrites: read (or accumulate) them before the next call.
    """

    def __init__(self, step: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]], enabled: bool,
                 warmup: int = 3, max_graphs: int = 1, strict: bool = False) -> None:
        self.step = step
        self.strict = strict
        self.enabled = enabled
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]] = {}
        self.replays = 0
        self.failed: str | None = None
        self._side: torch.cuda.Stream | None = None

    def __call__(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.enabled:
            return self.step(batch)
        sig = signature(batch)
        graph = self.graphs.get(sig)
        if graph is not None:
            g, static_in, out = graph
            for dst, src in zip(static_in, tensors_of(batch)):
                dst.copy_(src, non_blocking=True)
            g.replay()
            self.replays += 1
            return out
        n = self.seen.get(sig, 0)
        self.seen[sig] = n + 1
        if n < self.warmup or len(self.graphs) >= self.max_graphs:
            return self._eager_on_side_stream(batch)
        try:
            return self._capture(sig, batch)
        except RuntimeError as e:  # a host sync or an unsupported op inside the step
            self.enabled = False
            self.failed = " ".join(str(e).split())[-800:]  # TorchScript puts the cause last
            if self.strict:
                raise RuntimeError(f"train.cuda_graphs=on, but the training step could not be captured: {self.failed}; "
                                   "use train.cuda_graphs=auto (trains eagerly after a failed capture)") from e
            warnings.warn(f"CUDA graph capture of the training step failed ({self.failed}); training continues "
                          "without graphs (set train.cuda_graphs=off to skip the attempt)", RuntimeWarning, stacklevel=2)
            torch.cuda.synchronize()
            return self.step(batch)

    def _eager_on_side_stream(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # capture wants the warm-up iterations off the default stream
        if self._side is None:
            self._side = torch.cuda.Stream()
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            out = self.step(batch)
        torch.cuda.current_stream().wait_stream(self._side)
        return out

    def _capture(self, sig: tuple, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        static_in = [t.clone() for t in tensors_of(batch)]
        static_batch = _rebuild(batch, iter(static_in))
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self.step(static_batch)
        self.graphs[sig] = (g, static_in, out)
        g.replay()  # capture records the step without running it: this replay is the step for `batch`
        self.replays += 1
        return out


def _rebuild(obj: Any, it) -> Any:
    """`obj` with its tensors taken, in `tensors_of` order, from the iterator `it`."""
    if isinstance(obj, torch.Tensor):
        return next(it)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: _rebuild(getattr(obj, f.name), it) for f in dataclasses.fields(obj)})
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rebuild(x, it) for x in obj)
    return obj


# YAML 1.1 reads a bare on / off as true / false: `--set train.cuda_graphs=off` arrives as "False"
_YAML_BOOL = {"False": "off", "false": "off", "True": "on", "true": "on"}


def graphs_setting(value: Any) -> str:
    """`train.cuda_graphs` as auto | on | off (YAML's true / false read as on / off)."""
    from facetrec.errors import ConfigError

    setting = _YAML_BOOL.get(str(value), str(value))
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"train.cuda_graphs {value!r} must be auto, on or off")
    return setting


def graphs_wanted(setting: str, device: torch.device, task_safe: bool, distributed: bool) -> bool:
    """Whether `train.cuda_graphs` (auto | on | off) captures the training step here.

    auto: on a CUDA device for a capture-safe task in one process. on: the same, but a task or a
    setting that cannot be captured is an error instead of eager training. off: never."""
    from facetrec.errors import ConfigError

    setting = graphs_setting(setting)
    if setting == "off":
        return False
    why = ("the device is not a GPU" if device.type != "cuda" else
           "this model / these train settings have host syncs in the step (see facetrec.train.graphs)" if not task_safe
           else "DistributedDataParallel runs the step" if distributed else None)
    if why is None:
        return True
    if setting == "on":
        raise ConfigError(f"train.cuda_graphs=on, but {why}; use train.cuda_graphs=auto or off")
    return False
