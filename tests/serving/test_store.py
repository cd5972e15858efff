"""Both store backends through one suite: durability semantics, de-duplication, order, memories."""

from __future__ import annotations

import threading
import uuid

import pytest

from facetrec.errors import ConfigError
from facetrec.serving.store import Event, RedisStore, SQLiteStore, open_store


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    else:
        url = request.getfixturevalue("redis_url")
        s = RedisStore(url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield s
    s.close()


def test_append_and_history_in_order(store):
    r = store.append([Event("e1", "u", "a", 10), Event("e2", "u", "b", 20), Event("e3", "v", "c", 5)])
    assert (r.stored, r.duplicates) == (3, 0)
    assert store.history("u", 10) == [("a", 10), ("b", 20)]
    assert store.history("u", 1) == [("b", 20)]
    assert store.count("u") == 2 and store.count("nobody") == 0 and store.history("nobody", 5) == []


def test_repeated_event_id_is_stored_once(store):
    store.append([Event("x1", "u", "a", 1)])
    r = store.append([Event("x1", "u", "a", 1), Event("x2", "u", "b", 2)])
    assert (r.stored, r.duplicates, r.duplicate_ids) == (1, 1, ("x1",))
    assert store.history("u", 10) == [("a", 1), ("b", 2)]
    assert store.count("u") == 2  # the duplicate is not counted


def test_memories_round_trip(store):
    assert store.get_memory("u") is None
    store.set_memory("u", b"\x00\x01")
    store.set_memory("u", b"\x02")
    assert store.get_memory("u") == b"\x02"


def test_concurrent_appends_lose_nothing(store):
    def worker(k):
        for i in range(50):
            store.append([Event(f"w{k}-{i}", "u", f"i{k}-{i}", i)])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count("u") == 200 and store.ping()


def test_sqlite_survives_reopen(tmp_path):
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    s.append([Event("e1", "u", "a", 1)])
    s.close()
    s2 = SQLiteStore(path)
    assert s2.history("u", 5) == [("a", 1)]
    assert s2._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s2._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    s2.close()


def test_sqlite_counts_match_the_events_and_old_databases_get_them(tmp_path):
    """count() reads the per-user counter the append transaction keeps; a database written before the counter
    table existed gets it filled from its events on opening, once, whoever opens it first."""
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    s.append([Event(f"a{i}", "u", "x", i) for i in range(5)] + [Event("b0", "v", "y", 1), Event("a0", "u", "x", 0)])
    s.append([Event("a1", "u", "x", 1), Event("c0", "w", "z", 2)])  # one duplicate, one new user

    def counted(db):
        return dict(db.execute("SELECT user, COUNT(*) FROM events GROUP BY user").fetchall())

    assert {u: s.count(u) for u in ("u", "v", "w", "nobody")} == {**counted(s._db), "nobody": 0} == {"u": 5, "v": 1, "w": 1, "nobody": 0}
    s._db.execute("DROP TABLE counts")  # as a database from before the table
    s.close()
    s2, s3 = SQLiteStore(path), SQLiteStore(path)  # the second opening finds the table and leaves it
    assert [s2.count(u) for u in ("u", "v", "w")] == [s3.count(u) for u in ("u", "v", "w")] == [5, 1, 1]
    s3.append([Event("d0", "u", "x", 9)])
    assert s2.count("u") == 6 == counted(s2._db)["u"]
    s2.close()
    s3.close()


def test_two_processes_share_redis(redis_url):
    a, b = RedisStore(redis_url, prefix="shared"), RedisStore(redis_url, prefix="shared")
    a.append([Event("s1", "u", "a", 1)])
    assert b.history("u", 5) == [("a", 1)]


def test_bad_store_url():
    with pytest.raises(ConfigError, match="sqlite:///"):
        open_store("postgres://x")


def test_events_lists_every_users_events_in_arrival_order(store):
    store.append([Event("e1", "u", "a", 10), Event("e2", "v", "c", 5), Event("e3", "u", "b", 20)])
    store.append([Event("e4", "u:events", "d", 7), Event("e5", "u", "old", 3), Event("e1", "u", "a", 10)])
    store.set_memory("u", b"\x00")  # a memory is not an event
    got = list(store.events(chunk=2))  # chunks smaller than a user's list
    by_user: dict[str, list] = {}
    for user, item, ts in got:
        by_user.setdefault(user, []).append((item, ts))
    assert by_user == {"u": [("a", 10), ("b", 20), ("old", 3)], "v": [("c", 5)], "u:events": [("d", 7)]}
    users = [u for u, _, _ in got]
    runs = [u for k, u in enumerate(users) if k == 0 or users[k - 1] != u]
    assert len(got) == 5 and len(runs) == len(set(users))  # one user's events come together


def test_dump_events_writes_the_tsv_data_extra_events_reads(store, tmp_path):
    from facetrec.serving.store import dump_events

    store.append([Event("e1", "u1", "i1", 10), Event("e2", "u1", "i2", 20), Event("e3", "u\t2", "i1", 5),
                  Event("e4", "u3", "i3", 30)])
    out = tmp_path / "served" / "events.tsv"
    assert dump_events(store, out) == (3, 2, 1)  # the id with a tab cannot be written: skipped and counted
    lines = out.read_text().splitlines()
    assert lines[0] == "user_id\titem_id\ttimestamp"
    assert sorted(lines[1:]) == ["u1\ti1\t10", "u1\ti2\t20", "u3\ti3\t30"]
    assert not [p for p in out.parent.iterdir() if p.name != "events.tsv"]  # no temp file left


def test_store_count_benchmark_runs(tmp_path):
    """benchmarks/store_count.py, for real on small sizes."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "count.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "store_count.py"), "--sizes", "20", "200", "--repeats", "3",
                        "--appends", "5", "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [x["user_events"] for x in res["count"] if x["user"] == "heavy"] == [20, 200]
    assert res["single_event_append"]["appends"] == 5
