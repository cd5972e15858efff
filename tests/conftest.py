"""Shared fixtures: where the real data is, and tiny prepared datasets built on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FACETREC_DATA", ROOT.parent / "shared" / "data"))


def real_data(name: str) -> Path:
    """Path to a dataset in ../shared/data; in CI a missing folder fails, elsewhere it skips."""
    path = SHARED_DATA / name
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI: ../shared/data must sit beside the checkout")
        pytest.skip(f"real data {path} not present (set FACETREC_DATA or put ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def synth_prepared(tmp_path_factory):
    """A small synthetic log, prepared: (Prepared dir, synth dir)."""
    from facetrec.config import load_config
    from facetrec.data.prepare import prepare
    from facetrec.data.synth import SynthConfig, synth

    base = tmp_path_factory.mktemp("synth")
    synth(SynthConfig(n_users=400, n_items=600, n_categories=20, seed=1), base / "raw", progress=False)
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", [f"data.root={base / 'raw'}", f"run.dir={base / 'prep'}"])
    prepare(cfg, verbose=False)
    return base / "prep", base / "raw"
