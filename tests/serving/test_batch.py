"""`facetrec recommend`: offline recommendations for many users, each line what POST /recommend answers that user."""

from __future__ import annotations

import json
import subprocess
import sys

from fastapi.testclient import TestClient

from facetrec.serving.app import create_app
from facetrec.serving.store import Event, open_store


def test_batch_lines_are_what_the_api_answers(tiny, tiny_pipeline, tmp_path):
    p = tiny_pipeline
    db = tmp_path / "state.db"
    store = open_store(f"sqlite:///{db}")
    raw = p.raw_items[1:]
    events = [Event(f"a{k}", "7", str(raw[k]), 100 + k) for k in range(30)]  # longer than the model window
    events += [Event(f"b{k}", "8", str(raw[50 + k]), 100 + k) for k in range(3)]
    events += [Event("c0", "9", "not-in-the-catalogue-any-more", 100)]  # skipped, as the API skips it
    store.append(events)
    client = TestClient(create_app(p, store), raise_server_exceptions=False)
    out = tmp_path / "recs.jsonl"
    r = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(tiny.artifact), "--store", f"sqlite:///{db}",
                        "--out", str(out), "--n", "7"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: 3 users (2 personal, 1 cold start)" in r.stdout
    lines = {x["user_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {7, 8, 9}  # an integer catalogue: ids as integers, as the API takes them
    for u in (7, 8, 9):
        api = client.post("/recommend", json={"user_id": u, "n": 7}).json()
        assert lines[u]["path"] == api["path"] and len(lines[u]["items"]) == 7
        assert [(x["item_id"], x["interest"]) for x in lines[u]["items"]] == [(x["item_id"], x["interest"]) for x in api["items"]]
        assert [x["score"] for x in lines[u]["items"]] == [x["score"] for x in api["items"]]
    # a list of users: unknown ones take the cold-start path
    ids = tmp_path / "users.txt"
    ids.write_text("8\n\n12345\n")
    r = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(tiny.artifact), "--store", f"sqlite:///{db}",
                        "--out", str(out), "--users", str(ids)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["user_id"], x["path"], len(x["items"])) for x in got] == [(8, "personal", 20), (12345, "cold_start", 20)]
    for args, msg in ((["--n", "0"], "--n 0 must be in"), (["--users", str(tmp_path / "none.txt")], "no such file")):
        r = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(tiny.artifact), "--store", f"sqlite:///{db}",
                            "--out", str(out), *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(tiny.artifact), "--store",
                        f"sqlite:///{tmp_path / 'missing.db'}", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr
    store.close()
