"""Single process or `torchrun`: one entry point for training.

Under `torchrun --nproc_per_node=N -m facetrec train CONFIG` the environment carries RANK /
WORLD_SIZE; each rank then trains on its share of every epoch's batches.
"""

from __future__ import annotations

import os
from typing import Any

from facetrec.config import Config


def launch(cfg: Config, progress: bool = True) -> dict[str, Any]:
    from facetrec.train.run import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise NotImplementedError("multi-process training (torchrun) is not implemented yet; run one process")
    return train(cfg, progress=progress)
