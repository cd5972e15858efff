"""`facetrec recommend`: offline recommendations for many users, each line what POST /recommend answers that user."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
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
    # two worker processes: the same lines in the same order (their one model thread each may sum floats
    # in another order than this process's threads: scores to 1e-6)
    out2 = tmp_path / "recs2.jsonl"
    r = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(tiny.artifact), "--store", f"sqlite:///{db}",
                        "--out", str(out2), "--n", "7", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    one, two = ([json.loads(x) for x in f.read_text().splitlines()] for f in (out, out2))
    assert [(x["user_id"], x["path"], [(i["item_id"], i["interest"]) for i in x["items"]]) for x in two] == \
        [(x["user_id"], x["path"], [(i["item_id"], i["interest"]) for i in x["items"]]) for x in one]
    for a, b in zip(one, two):
        assert [i["score"] for i in b["items"]] == pytest.approx([i["score"] for i in a["items"]], abs=1e-6)
    # a list of users: unknown ones take the cold-start path
    ids = tmp_path / "users.txt"
    ids.write_text("8\n\n12345\n")
    r = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(tiny.artifact), "--store", f"sqlite:///{db}",
                        "--out", str(out), "--users", str(ids)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["user_id"], x["path"], len(x["items"])) for x in got] == [(8, "personal", 20), (12345, "cold_start", 20)]
    for args, msg in ((["--n", "0"], "--n 0 must be in"), (["--users", str(tmp_path / "none.txt")], "no such file"),
                      (["--workers", "0"], "--workers 0 must be >= 1")):
        r = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(tiny.artifact), "--store", f"sqlite:///{db}",
                            "--out", str(out), *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "facetrec", "recommend", str(tiny.artifact), "--store",
                        f"sqlite:///{tmp_path / 'missing.db'}", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr
    store.close()


def test_workers_write_the_users_in_the_order_they_are_read(tiny_pipeline, tmp_path):
    """One user per chunk over two spawned workers: chunks finish in any order, lines come out in the store's."""
    from facetrec.serving.batch import batch_recommend

    p = tiny_pipeline
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    raw = p.raw_items[1:]
    store.append([Event(f"e{u}-{k}", str(u), str(raw[(u * 7 + k) % len(raw)]), 100 + k)
                  for u in range(1, 13) for k in range(u % 5 + 1)])
    serial, parallel = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    s1 = batch_recommend(p, store, serial, n=5, progress=False)
    s2 = batch_recommend(p, store, parallel, n=5, progress=False, workers=2, chunk=1)
    assert s1["users"] == s2["users"] == 12 and s2["personal"] == 12
    one, two = ([json.loads(x) for x in f.read_text().splitlines()] for f in (serial, parallel))
    assert [x["user_id"] for x in two] == [x["user_id"] for x in one]
    assert [[i["item_id"] for i in x["items"]] for x in two] == [[i["item_id"] for i in x["items"]] for x in one]
    with pytest.raises(ValueError, match="workers 0"):
        batch_recommend(p, store, serial, workers=0)
    store.close()


def test_batch_speed_benchmark_runs(tiny, tmp_path):
    """benchmarks/batch_recommend_speed.py, for real on the tiny artifact (one round, 1 and 2 workers)."""
    from tests.conftest import ROOT

    db = tmp_path / "state.db"
    store = open_store(f"sqlite:///{db}")
    store.append([Event(f"e{u}-{k}", str(u), str(k + 1), 100 + k) for u in range(1, 6) for k in range(4)])
    store.close()
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "batch_recommend_speed.py"), "--artifact", str(tiny.artifact),
                        "--store", f"sqlite:///{db}", "--users", "5", "--workers", "1", "2", "--rounds", "1", "--n", "3",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["users"] == 5 and res["same_items_every_run"] and set(res["speedup_vs_first"]) == {"1", "2"}
