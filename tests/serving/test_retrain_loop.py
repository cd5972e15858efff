"""Events in, model out: what the service stored is dumped (`facetrec dump-events`) and read back into the
log for retraining (`data.extra_events`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient

from facetrec.errors import DataError
from facetrec.serving.app import create_app
from facetrec.serving.store import open_store

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tiny, run_dir, *extra):
    from facetrec.config import load_config

    return load_config(ROOT / "configs" / "synthetic.yaml", [f"data.root={tiny.raw}", f"run.dir={run_dir}", *extra])


def test_served_events_are_dumped_and_read_back_for_retraining(tiny, tiny_pipeline, tmp_path, monkeypatch):
    from facetrec.data.prepare import ensure_prepared, prepared_key
    from facetrec.train.run import train

    monkeypatch.setenv("FACETREC_CACHE", str(tmp_path / "cache"))
    log = pl.read_csv(tiny.raw / "interactions.tsv", separator="\t", infer_schema=False)
    user = log["user_id"][0]
    mine = log.filter(pl.col("user_id") == user)
    last = int(mine["timestamp"].cast(pl.Int64).max())
    items = [i for i in tiny_pipeline.raw_items[1:] if str(i) not in set(mine["item_id"])][:3]
    db = tmp_path / "state.db"
    store = open_store(f"sqlite:///{db}")
    client = TestClient(create_app(tiny_pipeline, store), raise_server_exceptions=False)
    events = [{"event_id": f"n{k}", "user_id": int(user), "item_id": i, "timestamp": last + 10 + k} for k, i in enumerate(items)]
    # one event the log already holds (a store preloaded with the training histories): dropped on the way back
    events.insert(0, {"event_id": "old", "user_id": int(user), "item_id": int(mine["item_id"][0]),
                      "timestamp": int(mine["timestamp"][0])})
    assert client.post("/events", json={"events": events}).json()["stored"] == 4
    store.close()

    out = tmp_path / "served.tsv"
    r = subprocess.run([sys.executable, "-m", "facetrec", "dump-events", "--store", f"sqlite:///{db}", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"wrote 4 events of 1 users to {out}" in r.stdout and "data.extra_events" in r.stdout

    base, more = _cfg(tiny, tmp_path / "a"), _cfg(tiny, tmp_path / "b", f"data.extra_events=[{out}]")
    assert prepared_key(base) != prepared_key(more)
    b, m = ensure_prepared(base, verbose=False), ensure_prepared(more, verbose=False)
    summary = json.loads((m / "summary.json").read_text())
    assert summary["skipped_by_reason"] == {"served event already in the log": 1}
    users_b = pl.read_parquet(b / "users.parquet").filter(pl.col("raw_id") == user)
    users_m = pl.read_parquet(m / "users.parquet").filter(pl.col("raw_id") == user)
    n_b, n_m = int(users_b["n_events"][0]), int(users_m["n_events"][0])
    assert n_m == n_b + 3  # the three new events, after the user's own (the log's last events are kept in order)
    ev = pl.read_parquet(m / "events.parquet")
    items_m = pl.read_parquet(m / "items.parquet")
    raw_of = dict(zip(items_m["id"].to_list(), items_m["raw_id"].to_list()))
    tail = [raw_of[i] for i in ev.filter(pl.col("user") == int(users_m["id"][0]))["item"].to_list()[-3:]]
    assert tail == [str(i) for i in items]
    # and a model trains on it
    metrics = train(_cfg(tiny, tmp_path / "mind", f"data.extra_events=[{out}]", "model.name=mind", "model.dim=8",
                         "model.hidden=[16]", "train.epochs=1", "train.max_steps=3", "train.n_negatives=20",
                         "train.threads=1", "train.max_eval_users=20"), progress=False)
    assert 0 <= metrics["test"]["recall@50"] <= 1


def test_extra_events_errors_name_the_file_and_the_fix(tiny, tmp_path, monkeypatch):
    from facetrec.data.readers import read_log

    monkeypatch.setenv("FACETREC_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("user_id\titem_id\ttimestamp\nu1\ti1\tyesterday\n")
    with pytest.raises(DataError, match=rf"{bad}, line 2: timestamp 'yesterday' is not a number"):
        read_log(_cfg(tiny, tmp_path / "x", f"data.extra_events=[{bad}]").data)
    cols = tmp_path / "cols.tsv"
    cols.write_text("user\titem\ttime\nu1\ti1\t5\n")
    with pytest.raises(DataError, match="user_id"):
        read_log(_cfg(tiny, tmp_path / "x", f"data.extra_events=[{cols}]").data)
    rated = tmp_path / "rated"
    rated.mkdir()
    df = pl.read_csv(tiny.raw / "interactions.tsv", separator="\t").with_columns(pl.lit(5).alias("rating"))
    df.write_csv(rated / "interactions.tsv", separator="\t")
    ok = tmp_path / "ok.tsv"
    ok.write_text("user_id\titem_id\ttimestamp\nu1\ti1\t5\n")
    cfg = _cfg(tiny, tmp_path / "x", f"data.root={rated}", "data.rating=rating", f"data.extra_events=[{ok}]")
    with pytest.raises(DataError, match="served events carry no rating"):
        read_log(cfg.data)
