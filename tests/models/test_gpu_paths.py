"""The GPU paths, checked on the CPU: DIEN's padded layout (fixed shapes, no host sync) against
the packed one, the sync-free mini-batch L2, the retrieval loss with negatives drawn beforehand,
and when `train.cuda_graphs` captures a step. The capture itself needs a GPU:
benchmarks/gpu_check.py replays graphed steps against eager ones there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrec.errors import ConfigError
from facetrec.models.dien import DIEN, ranking_loss
from facetrec.train.graphs import CudaGraphStep, graphs_wanted, signature
from facetrec.train.l2 import mini_batch_l2, mini_batch_l2_dense
from tests.models.test_dien import batch, make


def _loss_and_grads(model: DIEN, b, layout: str):
    model.layout = layout
    model.zero_grad()
    logits, aux = model.logits_and_aux(b)
    total, _ = ranking_loss(model, b)
    total.backward()
    return logits.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("evolution", ["augru", "agru", "aigru"])
@pytest.mark.parametrize("kw", [{}, {"attention_pooling": True, "aux_detach": True}, {"hidden": 6, "evolve_hidden": 3}])
def test_dien_padded_layout_matches_packed(evolution, kw):
    """Padded (every row all T steps, padding keeps the state) gives the packed layout's logits,
    auxiliary loss and gradients, with empty and full-length rows in the batch."""
    model = make(evolution=evolution, aux_alpha=0.5, **kw).train()
    b = batch(lengths=(3, 7, 0, 7, 5, 1, 2))
    lp, ap, gp = _loss_and_grads(model, b, "packed")
    ld, ad, gd = _loss_and_grads(model, b, "padded")
    assert torch.allclose(lp, ld, atol=1e-5) and torch.allclose(ap, ad, atol=1e-6)
    assert gp.keys() == gd.keys()
    for name in gp:
        assert torch.allclose(gp[name], gd[name], atol=1e-5), name


def test_dien_layout_auto_is_packed_on_cpu_and_padded_refuses_mlp_attention():
    model = make(aux_alpha=0.5)
    b = batch()
    assert model.layout == "auto" and not model.padded(b)
    model.layout = "padded"
    assert model.padded(b)
    mlp = make(attention="mlp")
    mlp.layout = "padded"
    with pytest.raises(ValueError, match="attention"):
        mlp.padded(b)


def test_dense_mini_batch_l2_equals_the_distinct_ids_one():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(30, 4, generator=g)
    inv = torch.rand(25, generator=g) + 0.1  # the table may hold rows past the item ids (MIND's field rows)
    ids = torch.randint(0, 25, (40,), generator=g)  # with repeats and padding 0
    assert torch.allclose(mini_batch_l2(table, ids, inv), mini_batch_l2_dense(table, ids, inv), rtol=1e-6)


def test_retrieval_loss_with_negatives_drawn_beforehand_equals_drawing_inside():
    from facetrec.data.batches import RetrievalBatch
    from facetrec.models.losses import NegativeSampler, retrieval_loss
    from facetrec.models.mind import MIND, MINDConfig

    torch.manual_seed(0)
    m = MIND(MINDConfig(n_items=30, dim=8), {}, {}).train()
    hist = torch.randint(1, 30, (6, 5))
    b = RetrievalBatch(torch.arange(6), hist, hist > 0, torch.randint(1, 30, (6,)), torch.full((6,), 5))
    for mode in ("uniform", "popularity"):
        counts = np.arange(30)
        m.reseed_routing(3)
        inside = retrieval_loss(m, b, NegativeSampler(counts, mode, seed=1), 7)
        m.reseed_routing(3)
        negs = NegativeSampler(counts, mode, seed=1).sample(7)
        before = retrieval_loss(m, b, NegativeSampler(counts, mode, seed=9), 7, negatives=negs)
        assert torch.allclose(inside, before), mode


def test_cuda_graphs_setting():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not graphs_wanted("auto", cpu, True, False)
    assert graphs_wanted("auto", gpu, True, False)
    assert not graphs_wanted("auto", gpu, False, False) and not graphs_wanted("auto", gpu, True, True)
    assert not graphs_wanted("off", gpu, True, False)
    assert not graphs_wanted("False", gpu, True, False)  # YAML reads `--set train.cuda_graphs=off` as false
    with pytest.raises(ConfigError, match="not a GPU"):
        graphs_wanted("on", cpu, True, False)
    with pytest.raises(ConfigError, match="host syncs"):
        graphs_wanted("on", gpu, False, False)
    with pytest.raises(ConfigError, match="auto, on or off"):
        graphs_wanted("yes", gpu, True, False)


def test_graph_step_disabled_runs_the_step_and_signatures_see_nested_tensors():
    calls = []
    step = CudaGraphStep(lambda b: (calls.append(b) or torch.tensor(1.0), {}), enabled=False)
    assert float(step("x")[0]) == 1.0 and calls == ["x"]
    b = batch()
    assert signature((b, torch.zeros(3))) == signature((batch(seed=5), torch.ones(3)))
    assert signature(b) != signature(batch(T=5))


HOST_OPS = {"lift_fresh", "_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select"}


def test_dien_gpu_step_has_no_host_copy_or_sync():
    """What a CUDA graph cannot capture — a tensor made from host values (`x[0] = 0`, torch.tensor(list)),
    a host read (.item()), a data-dependent shape (boolean indexing, unique) — is absent from DIEN's
    padded-layout training step with the sync-free L2 (`facetrec train`'s step on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bad: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            bool_index = name in ("index", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
            if name in HOST_OPS or bool_index:
                self.bad.append(name)
            return func(*args, **(kwargs or {}))

    model = make(aux_alpha=0.3, attention_pooling=True).train()
    model.layout = "padded"
    b = batch(lengths=(3, 7, 0, 7, 5))
    inv = torch.rand(40) + 0.1
    with Spy() as spy:
        total, _ = ranking_loss(model, b)
        total = total + mini_batch_l2_dense(model.items.id_emb.weight, torch.cat([b.hist.ravel(), b.target]), inv)
        total.backward()
    assert spy.bad == []
