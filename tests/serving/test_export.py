"""`facetrec export` writes one verified version; the server refuses versions that are damaged or do not fit together."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from facetrec.errors import ConfigError
from facetrec.serving.artifacts import ArtifactError, load_manifest, resolve_version, sha256_file
from facetrec.serving.pipeline import Pipeline


def _copy(tiny, tmp_path):
    d = tmp_path / "v"
    shutil.copytree(tiny.version, d)
    return d


def _rehash(d, name):
    """Re-sign one file in the manifest, as a hand-assembled artifact would: hashes then match but parts may not."""
    m = json.loads((d / "manifest.json").read_text())
    m["files"][name] = {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size}
    (d / "manifest.json").write_text(json.dumps(m))


def _serve_refuses(d, tmp_path, *fragments):
    r = subprocess.run([sys.executable, "-m", "facetrec", "serve", str(d), "--store", f"sqlite:///{tmp_path / 's.db'}",
                        "--port", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    for f in fragments:
        assert f in r.stderr, r.stderr


def test_export_writes_one_complete_version(tiny):
    assert resolve_version(tiny.artifact) == tiny.version
    m = load_manifest(tiny.version)
    names = {"manifest.json"} | set(m["files"])
    assert names == {p.name for p in tiny.version.iterdir()}
    assert {"feature_map.json", "items.parquet", "item_features.npz", "retrieval.config.json", "retrieval.safetensors",
            "ranking.config.json", "ranking.safetensors", "index.faiss"} <= set(m["files"])
    assert m["parts"]["retrieval"]["model"] == "mind" and m["parts"]["ranking"]["model"] == "dien"
    assert m["parts"]["retrieval"]["top_m"] == 30 and m["parts"]["ranking"]["candidates"] == 50
    assert m["index"]["items"] == json.loads((tiny.version / "feature_map.json").read_text())["n_items"] - 1
    # weights are plain tensors: safetensors, no pickle anywhere
    for part in ("retrieval", "ranking"):
        raw = (tiny.version / f"{part}.safetensors").read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # safetensors: u64 length + JSON header
        assert header and all("dtype" in v and "shape" in v for k, v in header.items() if k != "__metadata__")
    assert not [p for p in tiny.version.iterdir() if p.suffix in (".pt", ".pkl", ".pickle")]
    assert not [p for p in tiny.artifact.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cli_export_makes_a_new_current_version(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FACETREC_CACHE", str(tiny.cache))
    out = tmp_path / "art"
    r = subprocess.run([sys.executable, "-m", "facetrec", "export", "--retrieval", str(tiny.mind), "--ranking", str(tiny.dien),
                        "--out", str(out), "--index", "hnsw", "--index-param", "efSearch=64", "--candidates", "40"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    v = resolve_version(out)
    assert r.stdout.strip() == f"exported {v}"
    m = load_manifest(v)
    assert m["index"]["kind"] == "hnsw" and m["index"]["params"]["efSearch"] == 64 and "M" in m["index"]["params"]
    p = Pipeline(out)
    assert p.index.kind == "hnsw" and p.n_candidates == 40
    assert Pipeline(out, search_params={"efSearch": 500}).index.efSearch == 500  # serve --search-param
    with pytest.raises(ArtifactError, match="'nprobe' does not apply to this artifact's hnsw index; it takes efSearch"):
        Pipeline(out, search_params={"nprobe": 8})
    bad = subprocess.run([sys.executable, "-m", "facetrec", "export", "--retrieval", str(tiny.mind), "--out", str(out),
                          "--index-param", "efSearch"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    r = subprocess.run([sys.executable, "-m", "facetrec", "export", "--retrieval", str(tiny.mind), "--out", str(out),
                        "--index", "hnsw", "--index-param", "space=l2", "--index-param", "efSearch=4096"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_manifest(resolve_version(out))["index"]["params"]["space"] == "l2"
    l2 = Pipeline(out)
    assert l2.index.params["space"] == "l2" and l2.index.dim == int(l2.retrieval.cfg.dim)
    hist = l2.popular[:5].astype("int64")
    assert l2.recommend(hist, n=10)  # the lengthened graph serves like any other
    bad = subprocess.run([sys.executable, "-m", "facetrec", "export", "--retrieval", str(tiny.mind), "--out", str(out),
                          "--index", "hnsw", "--index-param", "space=cosine"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "space must be one of 'ip', 'l2'" in bad.stderr


def test_export_refuses_wrong_roles_and_unfinished_runs(tiny, tmp_path, monkeypatch):
    from facetrec.serving.export import export

    monkeypatch.setenv("FACETREC_CACHE", str(tiny.cache))
    with pytest.raises(ConfigError, match="must be mind or youtubednn"):
        export(tiny.dien, tmp_path / "a")
    with pytest.raises(ConfigError, match="must be dien, din, base, ple or ple-uie"):
        export(tiny.mind, tmp_path / "a", tiny.mind)
    with pytest.raises(ConfigError, match="not a run directory"):
        export(tmp_path, tmp_path / "a")
    half = tmp_path / "half"
    shutil.copytree(tiny.dien, half)
    (half / "best.pt").unlink()
    with pytest.raises(ConfigError, match="no best.pt"):
        export(tiny.mind, tmp_path / "a", half)


def test_export_refuses_runs_from_different_data(tiny, tmp_path, monkeypatch):
    from facetrec.serving.export import export

    monkeypatch.setenv("FACETREC_CACHE", str(tiny.cache))
    other = tmp_path / "other"
    shutil.copytree(tiny.dien, other)
    fm = json.loads((other / "feature_map.json").read_text())
    fm["n_items"] += 1
    (other / "feature_map.json").write_text(json.dumps(fm))
    with pytest.raises(ConfigError, match="feature maps differ"):
        export(tiny.mind, tmp_path / "a", other)


def test_truncated_weights_are_refused_by_pipeline_and_serve(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    size = (d / "retrieval.safetensors").stat().st_size
    with open(d / "retrieval.safetensors", "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ArtifactError, match="retrieval.safetensors is .* bytes, the manifest says .*: truncated"):
        Pipeline(d)
    _serve_refuses(d, tmp_path, "truncated", "export again")


def test_truncated_and_re_signed_weights_are_still_refused(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    data = (d / "ranking.safetensors").read_bytes()
    (d / "ranking.safetensors").write_bytes(data[: len(data) - 100])
    _rehash(d, "ranking.safetensors")
    with pytest.raises(ArtifactError, match="ranking.safetensors is not a readable safetensors file"):
        Pipeline(d)


def test_missing_file_is_refused(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    (d / "index.faiss").unlink()
    with pytest.raises(ArtifactError, match="index.faiss is listed in the manifest but missing"):
        Pipeline(d)


def test_feature_map_disagreeing_with_the_parts_is_refused(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    fm = json.loads((d / "feature_map.json").read_text())
    fm["max_history"] = 50
    (d / "feature_map.json").write_text(json.dumps(fm))
    _rehash(d, "feature_map.json")
    with pytest.raises(ArtifactError, match="trained against feature map"):
        Pipeline(d)
    _serve_refuses(d, tmp_path, "retrieval and ranking must come from one prepared dataset")


def test_index_from_another_model_is_refused(tiny, tmp_path):
    from facetrec.index.ann import build_index

    d = _copy(tiny, tmp_path)
    n = Pipeline(d).n_items - 1
    build_index(np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32), np.arange(1, n + 1)).save(d / "index.faiss")
    _rehash(d, "index.faiss")
    with pytest.raises(ArtifactError, match="index and model come from different exports"):
        Pipeline(d)


def test_weights_for_another_config_are_refused(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    spec = json.loads((d / "ranking.config.json").read_text())
    spec["config"]["embed_dim"] = 6
    (d / "ranking.config.json").write_text(json.dumps(spec))
    _rehash(d, "ranking.config.json")
    with pytest.raises(ArtifactError, match="ranking.safetensors does not fit ranking.config.json"):
        Pipeline(d)


def test_model_for_another_catalogue_is_refused(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    spec = json.loads((d / "retrieval.config.json").read_text())
    spec["config"]["n_items"] += 5
    (d / "retrieval.config.json").write_text(json.dumps(spec))
    _rehash(d, "retrieval.config.json")
    with pytest.raises(ArtifactError, match="retrieval model was trained for .* items, the artifact's catalogue has"):
        Pipeline(d)


def test_current_pointing_nowhere_is_refused(tiny, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "CURRENT").write_text("v-gone")
    with pytest.raises(ArtifactError, match="not a version"):
        Pipeline(root)
    _serve_refuses(root, tmp_path, "re-run `facetrec export`")


def test_artifact_files_are_readable_by_others(tiny):
    assert all(os.stat(p).st_mode & 0o044 == 0o044 for p in tiny.version.iterdir())

