"""`facetrec serve` as real processes: kill -9 mid-ingest loses nothing acknowledged; servers share a Redis store."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import pytest

N_EVENTS = 10_000
BATCH = 50
N_USERS = 100


def _events(items, lo: int, hi: int) -> list[dict]:
    """Events lo..hi-1: user i % N_USERS, timestamps increasing per user."""
    return [{"event_id": f"crash-{i}", "user_id": 10**7 + i % N_USERS, "item_id": items[i % len(items)],
             "timestamp": 1_700_000_000 + i} for i in range(lo, hi)]


@pytest.mark.slow
def test_kill_9_mid_stream_loses_no_acknowledged_event(tiny, tiny_pipeline, start_server, tmp_path):
    items = tiny_pipeline.raw_items[1:]
    db = tmp_path / "state.db"
    store = f"sqlite:///{db}"
    server = start_server(tiny.artifact, store)
    acked: list[str] = []
    t0 = time.time()
    killed_at: list[int] = []

    def killer():  # SIGKILL while requests are in flight, once about half the stream is acknowledged
        while len(acked) < N_EVENTS // 2:
            time.sleep(0.001)
        killed_at.append(len(acked))
        server.kill()

    threading.Thread(target=killer, daemon=True).start()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for lo in range(0, N_EVENTS, BATCH):
            batch = _events(items, lo, lo + BATCH)
            try:
                r = c.post("/events", json={"events": batch})
            except httpx.HTTPError:
                break  # the server is gone: this batch was never acknowledged
            assert r.status_code == 200, r.text
            assert r.json()["stored"] + r.json()["duplicates"] == len(batch)
            acked.extend(e["event_id"] for e in batch)
    assert killed_at and N_EVENTS // 2 <= len(acked) < N_EVENTS, "the kill must land mid-stream"

    # every acknowledged event is on disk exactly once, before any restart
    with sqlite3.connect(db) as con:
        rows = dict(con.execute("SELECT event_id, COUNT(*) FROM events GROUP BY event_id").fetchall())
    assert all(rows.get(e) == 1 for e in acked), [e for e in acked if rows.get(e) != 1][:5]

    # restart on the same store and replay the whole stream: acknowledged events come back as duplicates
    server2 = start_server(tiny.artifact, store)
    dup_ids: set[str] = set()
    with httpx.Client(base_url=server2.url, timeout=10) as c:
        for lo in range(0, N_EVENTS, BATCH * 4):
            r = c.post("/events", json={"events": _events(items, lo, lo + BATCH * 4)})
            assert r.status_code == 200, r.text
            dup_ids.update(r.json()["duplicate_ids"])
        assert set(acked) <= dup_ids
        u = 10**7 + 7
        interests = c.get(f"/users/{u}/interests").json()
        assert interests["history_length"] == N_EVENTS // N_USERS
    server2.stop()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events").fetchone() == (N_EVENTS, N_EVENTS)
        order = [r[0] for r in con.execute("SELECT ts FROM events WHERE user = ? ORDER BY seq", (str(u),))]
    assert sorted(order) == order  # replayed events slot in after the acknowledged ones without reordering those
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_two_servers_share_one_redis_store(tiny, tiny_pipeline, redis_url, start_server):
    items = tiny_pipeline.raw_items[1:]
    a = start_server(tiny.artifact, redis_url, wait=False)
    b = start_server(tiny.artifact, redis_url, wait=False)
    a.wait_ready()
    b.wait_ready()
    user = 424_242_424
    hist = items[:8]
    with httpx.Client(timeout=10) as c:
        assert c.post(f"{b.url}/recommend", json={"user_id": user, "n": 5}).json()["path"] == "cold_start"
        events = [{"event_id": f"redis-{user}-{k}", "user_id": user, "item_id": it, "timestamp": 1_700_000_000 + k}
                  for k, it in enumerate(hist)]
        assert c.post(f"{a.url}/events", json={"events": events[:4]}).json()["stored"] == 4
        assert c.post(f"{b.url}/events", json={"events": events}).json() == {
            "stored": 4, "duplicates": 4, "duplicate_ids": [e["event_id"] for e in events[:4]]}
        via_a = c.post(f"{a.url}/recommend", json={"user_id": user, "n": 5}).json()
        via_b = c.post(f"{b.url}/recommend", json={"user_id": user, "n": 5}).json()
        assert via_a["path"] == "personal" and via_a["history_used"] == 8
        assert via_a["items"] == via_b["items"]  # same artifact, same shared history -> same answer
        assert c.get(f"{a.url}/users/{user}/interests").json() == c.get(f"{b.url}/users/{user}/interests").json()
        assert c.get(f"{b.url}/users/{user}/interests").json()["history_length"] == 8


@pytest.mark.parametrize("store, message", [("redis://127.0.0.1:1/0", "cannot be opened"),
                                            ("postgres://db/x", "use sqlite:///path/to/state.db or redis://")])
def test_serve_refuses_a_store_it_cannot_open(tiny, store, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "facetrec", "serve", str(tiny.artifact), "--store", store, "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_serve_refuses_a_port_another_server_holds(tiny, tmp_path, start_server):
    import subprocess
    import sys

    first = start_server(tiny.artifact, f"sqlite:///{tmp_path / 'a.db'}")
    r = subprocess.run([sys.executable, "-m", "facetrec", "serve", str(tiny.artifact), "--store",
                        f"sqlite:///{tmp_path / 'b.db'}", "--port", str(first.port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{first.port}" in r.stderr and "--port" in r.stderr, r.stderr
