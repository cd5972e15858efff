"""`facetrec train` whose rank 1 dies (as if killed) at a given optimiser step (of torchrun's first attempt).

For the resume test: the launcher then stops every rank; launched again, the run must resume
from the last checkpoint and end where an uninterrupted run ends.

    python -m torch.distributed.run --nproc_per_node=2 tests/train/crash_once.py STEP train CONFIG ...
"""

import os
import sys

from torch.optim.optimizer import register_optimizer_step_pre_hook

from facetrec.cli import main

if __name__ == "__main__":
    crash_at = int(sys.argv.pop(1))
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        steps = [0]

        def _die(optimizer, args, kwargs):
            steps[0] += 1
            if steps[0] == crash_at:
                os._exit(17)  # no cleanup, no exception handling: like a SIGKILL

        register_optimizer_step_pre_hook(_die)
    main()
