"""The training loop's weight average (`train.ema`): what is validated and kept, and resume."""

from __future__ import annotations

import pytest
import torch

from facetrec.config import TrainConfig
from facetrec.errors import ConfigError
from facetrec.train.loop import Task, WeightAverage, fit, load_checkpoint


def _task(seen: list):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)) for _ in range(4)]

    @torch.no_grad()
    def evaluate(split):
        seen.append(model.weight.detach().clone())
        return {"neg_mse": -float(sum(((model(x) - y) ** 2).mean() for x, y in data))}

    return Task(model=model, batches=lambda seed: data, n_batches=len(data),
                loss=lambda b: (((model(b[0]) - b[1]) ** 2).mean(), {}), evaluate=evaluate, monitor="neg_mse")


def test_ema_validates_and_keeps_the_average_and_trains_the_live_weights(tmp_path):
    """The loop validates the averaged weights, writes them as best.pt, ends on them, but its
    optimiser keeps stepping the live weights (last.pt), which differ from the average."""
    seen: list = []
    task = _task(seen)
    fit(task, TrainConfig(epochs=3, lr=0.05, ema=0.9), tmp_path, progress=False)
    last = load_checkpoint(tmp_path / "last.pt")
    best = load_checkpoint(tmp_path / "best.pt")["model"]
    ema = last["ema"]
    avg = ema["average"][0]  # the weight's average after the last epoch
    assert ema["steps"] == 12
    assert not torch.allclose(avg, last["model"]["weight"])  # the average lags the live weights
    assert torch.allclose(seen[-1], avg)  # validation saw the average
    assert torch.equal(task.model.weight.detach(), best["weight"])  # the model ends on best.pt = an average
    assert any(torch.equal(best["weight"], w) for w in seen)

    # off: validation sees the live weights, and last.pt has no average
    seen_off: list = []
    (tmp_path / "off").mkdir()
    fit(_task(seen_off), TrainConfig(epochs=3, lr=0.05), tmp_path / "off", progress=False)
    off = load_checkpoint(tmp_path / "off" / "last.pt")
    assert "ema" not in off and torch.equal(seen_off[-1], off["model"]["weight"])


def test_ema_resumes_from_last_and_refuses_a_mismatch(tmp_path):
    """Two epochs then one more from last.pt give the same average as three at once."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    fit(_task([]), TrainConfig(epochs=3, lr=0.05, ema=0.9, patience=10), a, progress=False)
    fit(_task([]), TrainConfig(epochs=2, lr=0.05, ema=0.9, patience=10), b, progress=False)
    fit(_task([]), TrainConfig(epochs=3, lr=0.05, ema=0.9, patience=10), b, progress=False)
    ea, eb = load_checkpoint(a / "last.pt")["ema"], load_checkpoint(b / "last.pt")["ema"]
    assert ea["steps"] == eb["steps"] == 12 and all(torch.allclose(x, y) for x, y in zip(ea["average"], eb["average"]))
    c = tmp_path / "c"
    c.mkdir()
    fit(_task([]), TrainConfig(epochs=1, lr=0.05), c, progress=False)
    with pytest.raises(ConfigError, match="train.ema"):  # c's last.pt has no average to resume
        fit(_task([]), TrainConfig(epochs=2, lr=0.05, ema=0.9), c, progress=False)
    with pytest.raises(ConfigError, match="train.ema"):
        fit(_task([]), TrainConfig(ema=1.0), tmp_path, progress=False)
    saved = load_checkpoint(a / "last.pt")["ema"]  # an average of another model's trainable tensors
    with pytest.raises(ConfigError, match="start a new run dir"):
        WeightAverage(_task([]).model, 0.9).load({**saved, "average": saved["average"] + saved["average"][:1]})


def test_a_non_finite_loss_stops_training_with_the_step_and_a_fix(tmp_path):
    """The loss is read once per log window (no host sync per step); a NaN there stops the run."""
    task = _task([])
    model = task.model
    task.loss = lambda b: ((model(b[0]) - b[1]).pow(2).mean() * float("nan"), {})
    with pytest.raises(FloatingPointError, match=r"up to step 2; lower train.lr"):
        fit(task, TrainConfig(epochs=1), tmp_path, log_every=2, progress=False)
    assert not (tmp_path / "last.pt").exists()  # stopped inside the first epoch, before any checkpoint
