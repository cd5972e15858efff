"""What a trained PLE + UIE run reads from its enhancement vectors: its test AUC as trained, with
every test user shown as unseen (UCBE from the history's centres instead of the user's own
memory, as the truncated-history evaluation shows them), and with one UIE part (UPE, UCBE, UCSE)
replaced by zeros; with the mean absolute change of the predicted probabilities.

    .venv/bin/python benchmarks/uie_probe.py runs/cs-ema/amazon-beauty-ple-uie-s0 --out benchmarks/results/uie_probe_beauty_s0.json

Zeroing a part the model was never trained without shows how much the model leans on it, not
what it is worth (a retrained model without it could do as well); "every user unseen" is an input
the model can meet in serving.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished `facetrec train` run of ple-uie")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from facetrec.data.dataset import Prepared
    from facetrec.data.prepare import ensure_prepared
    from facetrec.train import multitask as mt
    from facetrec.train.loop import load_checkpoint
    from facetrec.train.run import load_run_config

    torch.set_num_threads(1)
    cfg = load_run_config(args.run_dir)
    prep = Prepared(ensure_prepared(cfg, verbose=False))
    model = mt.build_ple(cfg, prep, fresh=False)
    model.load_state_dict(load_checkpoint(args.run_dir / "best.pt")["model"])
    model.eval()
    if model.uie is None:
        raise SystemExit(f"{args.run_dir} is a {cfg.model['name']} run; give a ple-uie run")
    test = mt.multitask_samples(prep, "test", model.cfg)

    @torch.no_grad()
    def probs(unseen: bool = False) -> np.ndarray:
        out = []
        for lo in range(0, len(test.user), 4096):
            batch = mt.multitask_batch(prep, test, np.arange(lo, min(lo + 4096, len(test.user))), prep.max_history)
            if unseen:  # user id 0: no per-user memory, UCBE from the history's centres
                batch = dataclasses.replace(batch, user=torch.zeros_like(batch.user))
            out.append(torch.sigmoid(model(batch).float()).numpy())
        return np.concatenate(out)

    rows = {}

    def row(name: str, p: np.ndarray, base: np.ndarray | None) -> None:
        m = mt.task_metrics(test, p, model.cfg.tasks)
        rows[name] = {**{t: round(v["auc"], 6) for t, v in m.items()},
                      "mean_abs_dprob": None if base is None else round(float(np.abs(p - base).mean()), 6)}
        print(f"{name:36s} " + " ".join(f"{t} AUC {v['auc']:.4f}" for t, v in m.items())
              + ("" if base is None else f"   mean |dp| {np.abs(p - base).mean():.4f}"), flush=True)

    base = probs()
    row("as trained", base, None)
    row("every user unseen (UCBE = centres)", probs(True), base)
    for part in ("upe", "ucbe", "ucse"):
        if not getattr(model.uie.cfg, part):
            continue
        real = getattr(model.uie, part)
        setattr(model.uie, part, lambda *a, _real=real: torch.zeros_like(_real(*a)))
        row(f"{part} zeroed", probs(), base)
        delattr(model.uie, part)  # the method again
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run": str(args.run_dir), "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
