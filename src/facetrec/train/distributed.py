"""Single process or `torchrun`: one entry point for training.

    torchrun --nproc_per_node=2 -m facetrec train configs/amazon-beauty/mind.yaml

Under torchrun the environment carries RANK / WORLD_SIZE / LOCAL_RANK: the process group is
PyTorch's own (gloo on CPU, NCCL on GPU), the model is wrapped in DistributedDataParallel by
the training loop, `train.batch_size` stays the global batch (each rank takes its slice of
every global batch), logged losses are averaged over ranks, validation runs on rank 0 and is
broadcast, and only rank 0 writes checkpoints, logs and metrics.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

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
        torch.distributed.destroy_process_group()
