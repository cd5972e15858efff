"""Versioned serving artifacts: one directory per exported pipeline, verified on load.

    ARTIFACT_ROOT/
      CURRENT                 name of the live version (replaced atomically)
      v20261123T031500-ab12/  one export
        manifest.json         format, created, parts, sha256 + size of every file
        feature_map.json      the contract between training and serving
        items.parquet         raw item id <-> internal id (+ popularity)
        <part>.config.json    model config of each part (retrieval, ranking)
        <part>.safetensors    weights (no pickle)
        index.faiss           ANN index over the retrieval item vectors

An export is written into a hidden temp folder, every file fsynced, the folder renamed into
place and only then CURRENT switched: a crash at any point leaves the previous version live.
`load_manifest` refuses a version whose files are missing, truncated or altered, or whose
parts were trained against a different feature map.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from facetrec.errors import FacetrecError
from facetrec.io import atomic_write

FORMAT = "facetrec-artifact/1"


class ArtifactError(FacetrecError):
    """An artifact directory is missing, incomplete, corrupt or inconsistent."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(root: str | Path, write_files: Callable[[Path], dict[str, Any]]) -> Path:
    """Create a new version: `write_files(tmp_dir)` writes the parts and returns manifest extras.

    Returns the new version's directory, already live (CURRENT points at it).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    name = f"v{stamp}-{os.urandom(2).hex()}"
    tmp = root / f".{name}.tmp"
    tmp.mkdir()
    try:
        extra = write_files(tmp)
        files = {}
        for p in sorted(tmp.iterdir()):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {"format": FORMAT, "version": name, "created": time.time(), "files": files, **extra}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        with open(tmp / "manifest.json", "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        final = root / name
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / "CURRENT", lambda f: f.write(name.encode()))
    return final


def resolve_version(path: str | Path) -> Path:
    """An artifact root (follows CURRENT) or a version directory."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return path
    current = path / "CURRENT"
    if current.exists():
        name = current.read_text().strip()
        if not name or not (path / name).is_dir():
            raise ArtifactError(f"{current} names {name!r}, which is not a version in {path}; re-run `facetrec export`")
        return path / name
    raise ArtifactError(f"{path} is neither an artifact root (no CURRENT) nor a version (no manifest.json); "
                        f"create one with `facetrec export`")


def load_manifest(version_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and verify a version's manifest: every file present with its size and hash."""
    version_dir = Path(version_dir)
    mpath = version_dir / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{mpath} is missing: {version_dir} is not a complete export") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the export is damaged — export again") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format {manifest.get('format')!r}, this facetrec reads {FORMAT!r}")
    if verify:
        for name, meta in manifest["files"].items():
            p = version_dir / name
            if not p.exists():
                raise ArtifactError(f"{p} is listed in the manifest but missing; export again")
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise ArtifactError(f"{p} is {size} bytes, the manifest says {meta['bytes']}: truncated or replaced; export again")
            if sha256_file(p) != meta["sha256"]:
                raise ArtifactError(f"{p} does not match its sha256 in the manifest: altered or corrupt; export again")
    fm_hash = manifest["files"].get("feature_map.json", {}).get("sha256")
    for part, info in manifest.get("parts", {}).items():
        if info.get("feature_map_sha256") != fm_hash:
            raise ArtifactError(f"part {part!r} was trained against feature map {info.get('feature_map_sha256')}, "
                                f"but this artifact ships {fm_hash}: retrieval and ranking must come from one prepared dataset")
    return manifest
