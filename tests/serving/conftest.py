"""Serving fixtures: a real redis-server (free loopback port, fsync-always AOF) and a tiny trained pipeline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it with apt-get")
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    port = _free_port()
    work = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--appendonly", "yes",
                             "--appendfsync", "always", "--save", "", "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@dataclass(frozen=True)
class Tiny:
    """A tiny trained pipeline: synthetic raw log, MIND and DIEN runs, one exported artifact."""

    base: Path
    raw: Path
    cache: Path  # FACETREC_CACHE the runs were prepared under (set it to export them again)
    mind: Path
    dien: Path
    artifact: Path  # artifact root (CURRENT -> version)
    version: Path


def _train_tiny(base: Path) -> Tiny:
    from facetrec.config import load_config
    from facetrec.data.synth import SynthConfig, synth
    from facetrec.serving.export import export
    from facetrec.train.run import train

    synth(SynthConfig(n_users=300, n_items=400, n_categories=10, seed=1), base / "raw", progress=False)
    common = [f"data.root={base / 'raw'}", "train.epochs=1", "train.max_steps=5", "train.batch_size=64",
              "train.threads=1", "train.device=cpu"]
    cfg = ROOT / "configs" / "synthetic.yaml"
    # K = 8 so that K'_u = floor(log2 |I_u|) can exceed what the 20-item window alone would give (4)
    train(load_config(cfg, common + ["model.name=mind", "model.dim=8", "model.n_interests=8", "model.hidden=[16]",
                                     "train.n_negatives=50", "train.max_eval_users=50", f"run.dir={base / 'mind'}"]), progress=False)
    train(load_config(cfg, common + ["model.name=dien", "model.embed_dim=4", "model.mlp=[8]",
                                     f"run.dir={base / 'dien'}"]), progress=False)
    version = export(base / "mind", base / "artifact", base / "dien", candidates=50, top_m=30)
    return Tiny(base, base / "raw", base / "cache", base / "mind", base / "dien", base / "artifact", version)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """Tiny MIND (K = 8, D = 8) + tiny DIEN trained for 5 steps on a synthetic log, exported (a few seconds)."""
    base = tmp_path_factory.mktemp("tiny")
    old = os.environ.get("FACETREC_CACHE")
    os.environ["FACETREC_CACHE"] = str(base / "cache")
    try:
        return _train_tiny(base)
    finally:
        if old is None:
            os.environ.pop("FACETREC_CACHE", None)
        else:
            os.environ["FACETREC_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_pipeline(tiny):
    from facetrec.serving.pipeline import Pipeline

    return Pipeline(tiny.artifact)


class Server:
    """`facetrec serve` as a subprocess on a free loopback port (its own process group)."""

    def __init__(self, artifact: Path, store: str, log: Path, extra: tuple[str, ...] = ()) -> None:
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "facetrec", "serve", str(artifact), "--store", store,
                                      "--port", str(self.port), *extra], stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait_ready(self, timeout: float = 90) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s; see {self._log.name}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs."""
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def start_server(tmp_path):
    """start_server(artifact, store_url[, extra CLI args]) -> a ready Server; all are stopped at teardown."""
    started: list[Server] = []

    def start(artifact: Path, store: str, wait: bool = True, extra: tuple[str, ...] = ()) -> Server:
        s = Server(artifact, store, tmp_path / f"server{len(started)}.log", extra)
        started.append(s)
        if wait:
            s.wait_ready()
        return s

    yield start
    for s in started:
        s.stop()
