"""Artifact versions: atomic publication, verification of every file, consistency of parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from facetrec.serving.artifacts import ArtifactError, load_manifest, resolve_version, write_version


def _writer(payload: bytes, fm: bytes = b'{"n_items": 3}'):
    def write(d):
        (d / "feature_map.json").write_bytes(fm)
        (d / "weights.bin").write_bytes(payload)
        import hashlib

        h = hashlib.sha256(fm).hexdigest()
        return {"parts": {"retrieval": {"feature_map_sha256": h}, "ranking": {"feature_map_sha256": h}}}
    return write


def test_publish_and_verify(tmp_path):
    v1 = write_version(tmp_path, _writer(b"abc"))
    assert resolve_version(tmp_path) == v1
    m = load_manifest(v1)
    assert m["files"]["weights.bin"]["bytes"] == 3
    time.sleep(0.01)
    v2 = write_version(tmp_path, _writer(b"defg"))
    assert resolve_version(tmp_path) == v2 and v1.exists()


def test_truncated_file_is_refused(tmp_path):
    v = write_version(tmp_path, _writer(b"abcdef"))
    with open(v / "weights.bin", "r+b") as f:
        f.truncate(2)
    with pytest.raises(ArtifactError, match="weights.bin is 2 bytes, the manifest says 6: truncated"):
        load_manifest(v)


def test_altered_file_is_refused(tmp_path):
    v = write_version(tmp_path, _writer(b"abcdef"))
    (v / "weights.bin").write_bytes(b"abcdeX")
    with pytest.raises(ArtifactError, match="sha256"):
        load_manifest(v)


def test_parts_from_another_feature_map_are_refused(tmp_path):
    def write(d):
        (d / "feature_map.json").write_bytes(b"{}")
        return {"parts": {"retrieval": {"feature_map_sha256": "0" * 64}}}

    v = write_version(tmp_path, write)
    with pytest.raises(ArtifactError, match="different feature map|trained against feature map"):
        load_manifest(v)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="facetrec export"):
        resolve_version(tmp_path)


def test_kill_during_export_keeps_previous_version(tmp_path):
    """kill -9 a process in the middle of writing a version: CURRENT still names a good one."""
    v1 = write_version(tmp_path, _writer(b"old"))
    script = textwrap.dedent(f"""
        import time, sys
        from pathlib import Path
        from facetrec.serving.artifacts import write_version
        def slow(d):
            (d / "feature_map.json").write_bytes(b'{{"n_items": 3}}')
            with open(d / "weights.bin", "wb") as f:
                f.write(b"x" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(30)
            return {{}}
        write_version(Path({str(tmp_path)!r}), slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert resolve_version(tmp_path) == v1
    assert load_manifest(v1)["files"]["weights.bin"]["bytes"] == 3
