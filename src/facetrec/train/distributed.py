"""Single process or `torchrun`: one entry point for training.

    torchrun --nproc_per_node=2 -m facetrec train configs/amazon-beauty/mind.yaml

Under torchrun the environment carries RANK / WORLD_SIZE / LOCAL_RANK: the process group is
PyTorch's own (gloo on CPU, NCCL on GPU), the model is wrapped in DistributedDataParallel by
the training loop, `train.batch_size` stays the global batch (each rank takes its slice of
every global batch), logged losses are averaged over ranks, validation runs on rank 0 and is
broadcast, and only rank 0 writes checkpoints, logs and metrics.

N processes train like one process with the same global batch (tests/train/test_distributed.py
checks it to float32 rounding): the sample order, the sampled negatives and MIND's routing
logits depend on the seed and the epoch only; each rank's mean loss is weighted by its share of
the global batch (`global_shares`); batch norms (Dice) use global-batch statistics
(`GlobalBatchNorm`); the mini-batch-aware L2 counts each distinct id of the global batch once
(`owned_distinct_ids`); in-batch negatives are the global batch's targets (`all_gather_rows`,
differentiable: each rank's target vectors get the gradients of every rank's rows). Dropout draws
differ per rank. A run that dies is resumed by launching the same command again: every
rank loads run.dir/last.pt (the last finished epoch) and the epoch is replayed exactly.
"""

from __future__ import annotations

import gc
import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from facetrec.config import Config


def launch(cfg: Config, progress: bool = True) -> dict[str, Any]:
    from facetrec.train.run import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return train(cfg, progress=progress)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        cfg = replace(cfg, train=replace(cfg.train, device=f"cuda:{local}"))
    else:
        cfg = replace(cfg, train=replace(cfg.train, device="cpu"))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        return train(cfg, progress=progress, rank=rank, world=world)
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy the default process group once nothing else holds it.

    The autograd node of a differentiable collective (`all_gather_rows`) keeps a reference to
    the group; if a graph through one outlives `destroy_process_group` (a reference cycle, or a
    tensor still in scope), the gloo group is freed later, at garbage collection or exit, and
    aborts the process ("terminate called without an active exception", 1 exit in 3 in
    tests/train/test_distributed.py before this). So: drop such tensors first, then call this,
    which collects the cycles before tearing the group down.
    """
    gc.collect()
    torch.distributed.destroy_process_group()


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_gather_rows(vec: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows in rank order: vectors (n, D) -> (N, D) and ids (n,) -> (N,) of the global batch.

    The vectors stay in the autograd graph: the gradient a rank's loss puts on another rank's rows
    is summed back to that rank (`torch.distributed.nn.functional.all_gather`), so in-batch
    negatives train like one process. Slices may differ in size (an epoch's last batch): rows are
    padded to the largest slice for the collective and the padding dropped. Identity in one process.

    Example:
        >>> v, i = all_gather_rows(torch.ones(2, 3), torch.tensor([4, 5]))  # one process
        >>> v.shape, i.tolist()
        (torch.Size([2, 3]), [4, 5])
    """
    if not is_distributed():
        return vec, ids
    from torch.distributed.nn.functional import all_gather

    world = torch.distributed.get_world_size()
    n = torch.tensor([len(ids)], dtype=torch.int64, device=ids.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    pad = max(sizes) - len(ids)
    vec_p = torch.cat([vec, vec.new_zeros(pad, vec.shape[1])]) if pad else vec
    ids_p = torch.cat([ids, ids.new_zeros(pad)]) if pad else ids
    vecs = all_gather(vec_p)  # tuple of (max n, D), differentiable
    id_parts = [torch.empty_like(ids_p) for _ in range(world)]
    torch.distributed.all_gather(id_parts, ids_p)
    return (torch.cat([v[:k] for v, k in zip(vecs, sizes)]), torch.cat([i[:k] for i, k in zip(id_parts, sizes)]))


def global_shares(*counts: int) -> list[float]:
    """Weights that turn this rank's mean losses into its share of the global-batch means.

    DistributedDataParallel averages gradients over the ranks. A rank whose slice holds n_r of
    the N terms of a global batch must therefore scale its mean over those terms by
    world * n_r / N: the ranks' average is then the mean over all N terms, as in one process.
    Slices differ in size for the last batch of an epoch, and always for losses over a
    variable number of positions (DIEN's auxiliary loss). One all-reduce for all counts;
    1.0 each in a single process; a term with N = 0 anywhere gets 1.0 (its loss is 0).

    Example:
        >>> global_shares(32, 7)  # one process
        [1.0, 1.0]
    """
    if not is_distributed():
        return [1.0] * len(counts)
    on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
    t = torch.tensor(counts, dtype=torch.int64, device="cuda" if on_gpu else "cpu")
    torch.distributed.all_reduce(t)
    world = torch.distributed.get_world_size()
    return [world * n / int(total) if total > 0 else 1.0 for n, total in zip(counts, t.tolist())]


def owned_distinct_ids(ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The distinct non-zero ids of the *global* batch that this rank owns (id % world == rank), and
    the factor (world) that undoes DDP's gradient averaging. A penalty over distinct ids (the
    mini-batch-aware L2) summed over these, times the factor, is then the one-process penalty:
    each id of the global batch counted once, whichever ranks' slices hold it. One all-reduce and
    one all-gather; in a single process the ids' distinct values and 1.0.

    Example:
        >>> owned_distinct_ids(torch.tensor([3, 0, 3, 5]))  # one process
        (tensor([3, 5]), 1.0)
    """
    j = torch.unique(ids)
    j = j[j > 0]
    if not is_distributed():
        return j, 1.0
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    n = torch.tensor([len(j)], dtype=torch.int64, device=ids.device)
    torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    padded = torch.zeros(int(n), dtype=j.dtype, device=ids.device)  # 0 = padding, dropped below
    padded[:len(j)] = j
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    j = torch.unique(torch.cat(parts))
    j = j[j > 0]
    return j[j % world == rank], float(world)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with a gradient: d(Σ_r x_r)/dx_s = 1, so the backward sums the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, on any device.

    What torch's SyncBatchNorm does, which accepts GPU tensors only: under DDP every rank holds a
    slice of the global batch, and a plain BatchNorm would normalise each slice with its own
    mean and variance (and keep rank-local running statistics) — so N ranks would not compute
    what one process computes (Dice, DIN/DIEN's activation, is a batch norm). Here the sums go
    through autograd-aware all-reduces (mean first, then the centred squares, as torch's own
    two-pass variance), so the gradient also flows through the other ranks' statistics.
    Slices may differ in size (or be empty). In eval mode, or outside a process group, it is a
    plain batch norm on the running statistics. The state dict is BatchNorm's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected a (N, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        dims = [0, *range(2, x.dim())]  # every axis but the channel's
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / max(1, x.shape[1])])
        total = all_reduce(torch.cat([x.sum(dims), count]))  # (C + 1,)
        n = total[-1].detach()
        mean = total[:-1] / n  # (C,)
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n  # (C,) biased, for normalising
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / max(float(n) - 1.0, 1.0), momentum)  # unbiased, as torch
        return y


def global_batchnorm(model: nn.Module) -> nn.Module:
    """Swap every BatchNorm inside `model` for one with global-batch statistics (in place, same
    parameters and buffers): torch's SyncBatchNorm on GPU, `GlobalBatchNorm` elsewhere."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, (GlobalBatchNorm, nn.SyncBatchNorm)):
            cls = nn.SyncBatchNorm if child.running_mean is not None and child.running_mean.is_cuda else GlobalBatchNorm
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            global_batchnorm(child)
    return model
