"""The HTTP API in-process: happy paths, and a clear 4xx (never a 500) for each kind of bad input.

The answers tested here are the table in facetrec/serving/app.py's docstring.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from facetrec.serving.app import MAX_BODY_BYTES, MAX_EVENTS, MAX_EXCLUDE, MAX_HISTORY_IN, MAX_N, create_app
from facetrec.serving.store import open_store

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    s = open_store(f"sqlite:///{tmp_path_factory.mktemp('app') / 'state.db'}")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(tiny_pipeline, store):
    with TestClient(create_app(tiny_pipeline, store), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def items(tiny_pipeline):
    return tiny_pipeline.raw_items[1:]


def _user() -> int:
    return uuid.uuid4().int % 10**12 + 10**6  # not a training user


def _event(user, item, ts, eid=None):
    return {"event_id": eid or uuid.uuid4().hex, "user_id": user, "item_id": item, "timestamp": ts}


def _raw(client, path, body: bytes, headers=JSON):
    return client.post(path, content=body, headers=headers)


def _is_error(r, status, *fragments):
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    text = json.dumps(body)
    for f in fragments:
        assert f in text, text
    return body


# ------------------------------------------------------------------ happy paths


def test_events_then_recommend_by_user(client, items, tiny_pipeline):
    u, now = _user(), int(time.time())
    hist = items[:12]
    r = client.post("/events", json={"events": [_event(u, it, now - 100 + k) for k, it in enumerate(hist)]})
    assert r.status_code == 200 and r.json() == {"stored": 12, "duplicates": 0, "duplicate_ids": []}
    rec = client.post("/recommend", json={"user_id": u, "n": 10}).json()
    assert rec["path"] == "personal" and rec["history_used"] == 12 and rec["artifact"] == tiny_pipeline.version
    assert len(rec["items"]) == 10 and not {i["item_id"] for i in rec["items"]} & set(hist)
    for it in rec["items"]:
        assert it["interest"] >= 0 and set(it["because"]) <= set(hist) and 0 <= it["score"] <= 1
    # the same history sent explicitly gives the same answer
    assert client.post("/recommend", json={"history": hist, "n": 10}).json()["items"] == rec["items"]
    got = client.get(f"/users/{u}/interests").json()
    assert got["user_id"] == u and got["history_length"] == 12
    assert [i["index"] for i in got["interests"]] == list(range(3))  # K'_u = floor(log2 12) = 3
    assert {i["interest"] for i in rec["items"]} <= {i["index"] for i in got["interests"]}


def test_health_ready_metrics(client, tiny_pipeline):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["items"] == tiny_pipeline.n_items - 1
    client.post("/recommend", json={"history": [], "n": 1})
    text = client.get("/metrics").text
    assert 'facetrec_requests_total{endpoint="/recommend",status="200"}' in text
    assert 'facetrec_recommend_path_total{path="cold_start"}' in text
    assert "facetrec_request_seconds_bucket" in text


def test_readyz_is_503_when_the_store_is_gone(tiny_pipeline, tmp_path):
    s = open_store(f"sqlite:///{tmp_path / 's.db'}")
    with TestClient(create_app(tiny_pipeline, s), raise_server_exceptions=False) as c:
        s.close()
        _is_error(c.get("/readyz"), 503, "store")


def test_a_store_that_fails_mid_request_is_503_and_nothing_is_stored(tiny_pipeline, items, tmp_path):
    s = open_store(f"sqlite:///{tmp_path / 's.db'}")
    c = TestClient(create_app(tiny_pipeline, s), raise_server_exceptions=False)
    s.close()  # the database goes away under a running app
    ev = {"events": [_event(7, items[0], 1_700_000_000, "lost")]}
    for r in (c.post("/recommend", json={"user_id": 7, "n": 3}), c.post("/events", json=ev), c.get("/users/7/interests")):
        _is_error(r, 503, "user-state store not reachable", "retry")
    assert c.post("/recommend", json={"history": items[:3], "n": 3}).status_code == 200  # needs no store
    again = open_store(f"sqlite:///{tmp_path / 's.db'}")
    assert again.count("7") == 0  # the refused event was not stored
    again.close()


def test_a_redis_store_that_goes_away_is_503(tiny_pipeline, items, redis_url):
    import socket

    import redis

    from facetrec.serving.store import _APPEND_LUA, RedisStore

    s = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # the server goes away under a running app (no retries: the client's default backoff only slows the test)
    s._r = redis.Redis(port=dead, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    s._append = s._r.register_script(_APPEND_LUA)
    c = TestClient(create_app(tiny_pipeline, s), raise_server_exceptions=False)
    _is_error(c.post("/events", json={"events": [_event(7, items[0], 1_700_000_000)]}), 503, "ConnectionError")
    _is_error(c.post("/recommend", json={"user_id": 7, "n": 3}), 503, "not reachable")
    _is_error(c.get("/readyz"), 503, "store")


def test_openapi_has_examples_that_work(client):
    spec = client.get("/openapi.json").json()
    assert {"/recommend", "/events", "/users/{user_id}/interests", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for name, path in (("RecommendRequest", "/recommend"), ("EventsRequest", "/events")):
        examples = schemas[name]["examples"]
        assert examples
        for ex in examples:
            if path == "/events":
                ex = {"events": [{**e, "event_id": uuid.uuid4().hex} for e in ex["events"]]}
            assert client.post(path, json=ex).status_code == 200, ex
    assert {"413", "415", "422"} <= set(spec["paths"]["/recommend"]["post"]["responses"])


# ------------------------------------------------------------------ bad input, one case each


def test_unknown_user_takes_the_cold_path(client, tiny_pipeline):
    r = client.post("/recommend", json={"user_id": 987_654_321_012, "n": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["path"] == "cold_start" and body["history_used"] == 0
    assert [i["item_id"] for i in body["items"]] == [tiny_pipeline.raw_items[int(i)] for i in tiny_pipeline.popular[:5]]
    assert all(i["interest"] == -1 for i in body["items"])
    assert client.get("/users/987654321012/interests").json() == {"user_id": 987654321012, "history_length": 0,
                                                                  "interests": []}


def test_exclude_keeps_items_out_on_every_path(client, items, tiny_pipeline):
    hist = items[:5]
    first = {x["item_id"]: x["score"] for x in client.post("/recommend", json={"history": hist, "n": 10}).json()["items"]}
    top = list(first)[:6]
    r = client.post("/recommend", json={"history": hist, "n": 10, "exclude": top})
    again = {x["item_id"]: x["score"] for x in r.json()["items"]}
    assert r.status_code == 200 and len(again) == 10 and not set(again) & set(top)
    assert set(list(first)[6:]) <= set(again)  # the rest stay, with their scores
    assert all(again[i] == pytest.approx(first[i]) for i in list(first)[6:])
    cold = [tiny_pipeline.raw_items[int(i)] for i in tiny_pipeline.popular[:3]]  # cold start: popularity without them
    r = client.post("/recommend", json={"user_id": _user(), "n": 5, "exclude": cold})
    assert r.json()["path"] == "cold_start" and not {x["item_id"] for x in r.json()["items"]} & set(cold)
    everything = list(items)  # nothing left to recommend: an empty list, not an error
    r = client.post("/recommend", json={"history": hist, "n": 5, "exclude": everything})
    assert r.status_code == 200 and r.json()["items"] == []
    _is_error(client.post("/recommend", json={"history": hist, "exclude": [10**12]}), 422, "not in the catalogue")
    _is_error(client.post("/recommend", json={"history": hist, "exclude": [items[0]] * (MAX_EXCLUDE + 1)}), 422, "exclude")


def test_similar_items_are_the_nearest_in_the_item_space(client, items, tiny_pipeline):
    import numpy as np
    import torch

    p = tiny_pipeline
    item = items[3]
    r = client.get(f"/items/{item}/similar", params={"n": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    got = [x["item_id"] for x in body["items"]]
    assert body["item_id"] == item and body["artifact"] == p.version and len(got) == 7 and item not in got
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    with torch.no_grad():  # brute force over the catalogue (the tiny artifact's index is exact)
        E = p.retrieval.item_vectors(torch.arange(1, p.n_items)).numpy()
    q = E[int(p.encode([item])[0]) - 1]
    order = [k + 1 for k in np.argsort(-(E @ q), kind="stable") if k + 1 != int(p.encode([item])[0])][:7]
    assert got == [p.raw_items[k] for k in order] and np.allclose(scores, (E @ q)[np.array(order) - 1], atol=1e-5)
    assert client.get(f"/items/{item}/similar").json()["items"][:7] == body["items"]  # default n = 10
    _is_error(client.get("/items/999999999/similar"), 404, "not in the catalogue")
    for n in (0, -1, MAX_N + 1, p.n_items):
        _is_error(client.get(f"/items/{item}/similar", params={"n": n}), 422, "n = ")
    _is_error(client.get(f"/items/{item}/similar", params={"n": "ten"}), 422)


def test_empty_history_takes_the_cold_path(client):
    body = client.post("/recommend", json={"history": [], "n": 3}).json()
    assert body["path"] == "cold_start" and len(body["items"]) == 3


def test_huge_history_is_truncated_to_the_model_window(client, items):
    hist = [items[k % len(items)] for k in range(MAX_HISTORY_IN)]
    r = client.post("/recommend", json={"history": hist, "n": 5})
    assert r.status_code == 200, r.text
    assert r.json()["history_used"] == 20 and r.json()["path"] == "personal"


def test_history_over_the_limit_is_422(client, items):
    _is_error(client.post("/recommend", json={"history": [items[0]] * (MAX_HISTORY_IN + 1)}), 422, "history")


def test_body_over_the_size_limit_is_413(client):
    big = b'{"history": [' + b"1," * (MAX_BODY_BYTES // 2) + b'1]}'
    _is_error(_raw(client, "/recommend", big), 413, str(MAX_BODY_BYTES))
    # no Content-Length (chunked): the limit still holds
    r = client.post("/recommend", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]), headers=JSON)
    _is_error(r, 413)
    _is_error(_raw(client, "/events", b"{}", {**JSON, "content-length": "99999999999"}), 413)


def test_item_out_of_vocabulary_is_422(client, items, store):
    _is_error(client.post("/recommend", json={"history": [items[0], 10**9]}), 422, "not in the catalogue", "1000000000")
    u = _user()
    r = client.post("/events", json={"events": [_event(u, items[0], 1_700_000_000), _event(u, 10**9, 1_700_000_001)]})
    _is_error(r, 422, "unknown_item_ids")
    assert store.count(str(u)) == 0  # nothing of a refused batch is stored


@pytest.mark.parametrize("bad", [-1, 2**63, 2**64, -(2**63)])
def test_negative_or_too_large_ids_are_422(client, bad):
    _is_error(client.post("/recommend", json={"user_id": bad}), 422, "user_id")
    _is_error(client.post("/recommend", json={"history": [bad]}), 422, "history")
    _is_error(client.post("/events", json={"events": [_event(1, bad, 1_700_000_000)]}), 422, "item_id")
    _is_error(client.get(f"/users/{bad}/interests"), 422)


def test_largest_valid_id_is_just_unknown(client):
    _is_error(client.post("/recommend", json={"history": [2**63 - 1]}), 422, "not in the catalogue")
    assert client.post("/recommend", json={"user_id": 2**63 - 1, "n": 1}).json()["path"] == "cold_start"


@pytest.mark.parametrize("bad", [1.0, 1.5, "1", "abc", True, False, [1], {"id": 1}])
def test_ids_of_the_wrong_type_are_422(client, bad):
    _is_error(client.post("/recommend", json={"user_id": bad}), 422, "user_id")
    _is_error(client.post("/recommend", json={"history": [bad]}), 422, "history")
    _is_error(client.post("/events", json={"events": [_event(1, bad, 1_700_000_000)]}), 422, "item_id")


def test_null_ids(client, items):
    _is_error(client.post("/recommend", json={"user_id": None}), 422, "give user_id")  # null = absent
    _is_error(client.post("/recommend", json={"history": [items[0], None]}), 422, "history")
    _is_error(client.post("/events", json={"events": [_event(None, items[0], 1_700_000_000)]}), 422, "user_id")
    _is_error(client.post("/events", json={"events": [{**_event(1, items[0], 1), "event_id": None}]}), 422, "event_id")
    _is_error(client.get("/users/abc/interests"), 422, "user_id")


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_400(client, token):
    _is_error(_raw(client, "/recommend", b'{"user_id": 1, "n": ' + token + b"}"), 400, "not allowed")
    _is_error(_raw(client, "/events", b'{"events": [{"event_id": "x", "user_id": 1, "item_id": 1, "timestamp": '
                   + token + b"}]}"), 400, "not allowed")


@pytest.mark.parametrize("n", [0, -1, MAX_N + 1, 2**63, 5.0, "5", True, None])
def test_bad_n_is_422(client, n):
    _is_error(client.post("/recommend", json={"user_id": 1, "n": n}), 422, "n")


def test_n_larger_than_the_catalogue_is_422(tiny_pipeline, store):
    assert tiny_pipeline.n_items - 1 < MAX_N  # the tiny catalogue is smaller than the global cap
    with TestClient(create_app(tiny_pipeline, store)) as c:
        _is_error(c.post("/recommend", json={"user_id": 1, "n": tiny_pipeline.n_items}), 422, "larger than the catalogue")
        everything = c.post("/recommend", json={"user_id": _user(), "n": tiny_pipeline.n_items - 1}).json()["items"]
        assert len({i["item_id"] for i in everything}) == tiny_pipeline.n_items - 1


def test_duplicate_items_in_a_history_are_accepted(client, items):
    hist = [items[0], items[1], items[0], items[0], items[2]]
    body = client.post("/recommend", json={"history": hist, "n": 10}).json()
    assert body["history_used"] == 5
    assert not {i["item_id"] for i in body["items"]} & set(hist)
    assert all(len(i["because"]) == len(set(i["because"])) for i in body["items"])


def test_timestamps_out_of_order_within_a_batch_are_422(client, items, store):
    u = _user()
    r = client.post("/events", json={"events": [_event(u, items[0], 1_700_000_010), _event(u, items[1], 1_700_000_000)]})
    _is_error(r, 422, "go backwards")
    assert store.count(str(u)) == 0
    # other users' events may interleave; an event older than stored ones is accepted in arrival order
    v = _user()
    ok = client.post("/events", json={"events": [_event(u, items[0], 1_700_000_010), _event(v, items[1], 1_700_000_000)]})
    assert ok.status_code == 200
    assert client.post("/events", json={"events": [_event(u, items[2], 1_600_000_000)]}).status_code == 200
    assert store.history(str(u), 10) == [(str(items[0]), 1_700_000_010), (str(items[2]), 1_600_000_000)]


def test_timestamps_in_the_future_are_422(client, items):
    _is_error(client.post("/events", json={"events": [_event(1, items[0], int(time.time()) + 3 * 86_400)]}), 422,
              "in the future")
    assert client.post("/events", json={"events": [_event(_user(), items[0], int(time.time()) + 60)]}).status_code == 200


@pytest.mark.parametrize("ts", [0, -5, 2**63, 1.7e9])
def test_zero_negative_or_non_integer_timestamps_are_422(client, items, ts):
    _is_error(client.post("/events", json={"events": [_event(1, items[0], ts)]}), 422, "timestamp")


@pytest.mark.parametrize("body", [b"{", b'{"user_id": 1,}', b"", b"\xff\xfe", b'{"user_id": 1} trailing', b"'single'"])
def test_malformed_json_is_400(client, body):
    _is_error(_raw(client, "/recommend", body), 400, "not valid JSON")


def test_deeply_nested_json(client):
    _is_error(_raw(client, "/recommend", b"[" * 200_000 + b"]" * 200_000), 400, "nested too deeply")
    # nesting the parser accepts still does not fit the schema
    nested = b'{"user_id": 1, "extra": ' + b"[" * 500 + b"]" * 500 + b"}"
    _is_error(_raw(client, "/recommend", nested), 422, "extra")
    _is_error(_raw(client, "/recommend", b'{"history": ' + b"[" * 50 + b"1" + b"]" * 50 + b"}"), 422, "history")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", None])
def test_wrong_content_type_is_415(client, ctype):
    headers = {"content-type": ctype} if ctype else {}
    _is_error(client.post("/recommend", content=b'{"user_id": 1}', headers=headers), 415, "application/json")
    _is_error(client.post("/events", content=b'{"events": []}', headers=headers), 415)
    ok = client.post("/recommend", content=b'{"user_id": 1}', headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_unknown_fields_are_422(client, items):
    _is_error(client.post("/recommend", json={"user_id": 1, "N": 5}), 422, "N", "extra")
    _is_error(client.post("/events", json={"events": [{**_event(1, items[0], 1_700_000_000), "rating": 5}]}), 422, "rating")
    _is_error(client.post("/events", json={"events": [], "batch": 1}), 422)


def test_not_json_objects(client):
    for body in (b"[]", b"1", b'"x"', b"null"):
        _is_error(_raw(client, "/recommend", body), 422)
        _is_error(_raw(client, "/events", body), 422)


def test_repeated_event_id_is_stored_once(client, items, store):
    u = _user()
    e1, e2 = _event(u, items[0], 1_700_000_000, "dup-" + uuid.uuid4().hex), _event(u, items[1], 1_700_000_001)
    assert client.post("/events", json={"events": [e1]}).json() == {"stored": 1, "duplicates": 0, "duplicate_ids": []}
    again = client.post("/events", json={"events": [e1, e2, e2]})
    assert again.status_code == 200
    assert again.json() == {"stored": 1, "duplicates": 2, "duplicate_ids": [e1["event_id"], e2["event_id"]]}
    assert store.history(str(u), 10) == [(str(items[0]), 1_700_000_000), (str(items[1]), 1_700_000_001)]


def test_event_batch_size_bounds(client, items):
    _is_error(client.post("/events", json={"events": []}), 422, "events")
    many = [_event(_user(), items[0], 1_700_000_000) for _ in range(MAX_EVENTS + 1)]
    _is_error(client.post("/events", json={"events": many}), 422, "events")
    _is_error(client.post("/events", json={"events": [{**_event(1, items[0], 1), "event_id": ""}]}), 422, "event_id")
    _is_error(client.post("/events", json={"events": [{**_event(1, items[0], 1), "event_id": "x" * 257}]}), 422)


def test_wrong_method_and_path(client):
    r = client.get("/recommend")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"} and "POST" in r.headers["allow"]
    r = client.post("/nowhere", json={})
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
