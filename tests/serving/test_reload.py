"""A running server picks up a new export (the artifact root's CURRENT) without a restart; a broken one is refused
and the old version keeps serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from facetrec.serving.app import LivePipeline, create_app
from facetrec.serving.artifacts import resolve_version
from facetrec.serving.pipeline import Pipeline
from facetrec.serving.store import open_store


@pytest.fixture
def root(tiny, tmp_path, monkeypatch):
    """A copy of the tiny artifact root (CURRENT + one version) that the tests may export into."""
    monkeypatch.setenv("FACETREC_CACHE", str(tiny.cache))
    r = tmp_path / "artifact"
    shutil.copytree(tiny.artifact, r)
    return r


def _export(tiny, root, candidates):
    from facetrec.serving.export import export

    return export(tiny.mind, root, tiny.dien, candidates=candidates, top_m=30)


def _broken(root):
    """A version whose weights are truncated, made current."""
    bad = root / "vbroken"
    shutil.copytree(resolve_version(root), bad)
    w = bad / "ranking.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    (root / "CURRENT").write_text("vbroken")
    return bad


def test_check_swaps_in_a_new_export_and_keeps_the_old_one_when_the_new_one_is_broken(tiny, root, tmp_path):
    first = resolve_version(root)
    live = LivePipeline(Pipeline(root), root=root, load=Pipeline)
    assert live.pipeline.version_dir == first and not live.check()  # nothing new
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    client = TestClient(create_app(live, store), raise_server_exceptions=False)
    hist = [live.pipeline.raw_items[int(i)] for i in live.pipeline.popular[:5]]
    assert client.post("/recommend", json={"history": hist, "n": 5}).json()["artifact"] == first.name

    second = _export(tiny, root, candidates=20)
    assert live.check() and live.pipeline.version_dir == second and live.pipeline.n_candidates == 20
    assert not live.check() and live.error is None and live.reloads == {"ok": 1, "failed": 0}
    r = client.post("/recommend", json={"history": hist, "n": 5})
    assert r.status_code == 200 and r.json()["artifact"] == second.name
    assert client.get("/readyz").json() == {"status": "ready", "artifact": second.name, "items": live.pipeline.n_items - 1}

    _broken(root)
    assert not live.check() and live.pipeline.version_dir == second  # refused: the old version serves on
    assert "version vbroken not loaded" in live.error and f"still serving {second.name}" in live.error
    assert not live.check() and live.reloads == {"ok": 1, "failed": 1}  # not retried until CURRENT changes
    ready = client.get("/readyz").json()
    assert ready["artifact"] == second.name and "ranking.safetensors" in ready["reload_error"]
    assert client.post("/recommend", json={"history": hist, "n": 5}).status_code == 200
    metrics = client.get("/metrics").text
    assert 'facetrec_artifact_reloads_total{result="failed"} 1.0' in metrics
    assert f'facetrec_artifact_info{{version="{second.name}"}} 1.0' in metrics and first.name not in metrics

    (root / "CURRENT").write_text(second.name)  # CURRENT back on the version served: nothing left to report
    assert not live.check() and live.error is None and "reload_error" not in client.get("/readyz").json()
    (root / "CURRENT").write_text("vbroken")  # named again after another version: tried again, refused again
    assert not live.check() and live.reloads["failed"] == 2

    (root / "CURRENT").write_text(first.name)  # a rollback is a reload too
    assert live.check() and live.pipeline.version_dir == first and live.error is None
    (root / "CURRENT").write_text("nowhere")
    assert not live.check() and "not a version" in live.error and live.pipeline.version_dir == first
    store.close()


def test_reload_every_needs_the_artifact_root(tiny, tmp_path):
    r = subprocess.run([sys.executable, "-m", "facetrec", "serve", str(tiny.version), "--store",
                        f"sqlite:///{tmp_path / 's.db'}", "--reload-every", "5", "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "the artifact root (the folder with CURRENT)" in r.stderr, r.stderr


def test_a_running_server_switches_to_a_new_export_without_failing_a_request(tiny, root, tmp_path, start_server):
    server = start_server(root, f"sqlite:///{tmp_path / 'state.db'}", extra=("--reload-every", "0.5"))
    p = Pipeline(root)
    hist = [p.raw_items[int(i)] for i in p.popular[:5]]
    seen, statuses, stop = set(), [], threading.Event()

    def traffic():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{server.url}/recommend", json={"history": hist, "n": 5})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    seen.add(r.json()["artifact"])

    t = threading.Thread(target=traffic)
    t.start()
    try:
        second = _export(tiny, root, candidates=20).name
        deadline = time.time() + 60
        while httpx.get(f"{server.url}/readyz").json()["artifact"] != second:
            assert time.time() < deadline, "the server did not pick up the new export in 60 s"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert statuses and set(statuses) == {200} and second in seen
    _broken(root)
    time.sleep(2)
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["artifact"] == second and "vbroken" in ready["reload_error"], json.dumps(ready)


def test_a_version_with_the_live_models_is_not_warmed_up_again(tiny, root, monkeypatch):
    """reload_version: the same models (another export of them) skip the warm-up, whose shapes this process has
    already run; other models (here: no ranker) are warmed up, with the pause between calls."""
    from facetrec.serving.app import reload_version
    from facetrec.serving.export import export

    live = Pipeline(root)
    calls = []
    monkeypatch.setattr(Pipeline, "warm_up", lambda self, pause=0.0: calls.append((self.version_dir, pause)))
    same = _export(tiny, root, candidates=20)
    p = reload_version(same, live)
    assert p.version_dir == same and p.model_specs() == live.model_specs() and calls == []
    other = export(tiny.mind, root, None, top_m=30)  # recall only
    p = reload_version(other, live, pause=0.01)
    assert p.model_specs() != live.model_specs() and calls == [(other, 0.01)]


def test_reload_cost_benchmark_runs(tiny, tmp_path):
    """benchmarks/reload_cost.py, for real on the tiny artifact (one round)."""
    from tests.conftest import ROOT

    out = tmp_path / "cost.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reload_cost.py"), "--artifact", str(tiny.artifact),
                        "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["new_version_same_models_no_warm_up"]["calls"] == res["history_lengths"] > 1
    assert res["warm_up_seconds"]["cpu_median"] > 0 and res["load_seconds"]["cpu_median"] > 0
