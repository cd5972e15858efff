"""HTTP API (FastAPI) over the recall -> rank pipeline and the durable user-state store.

    POST /recommend            user id (history from the store) or an explicit history -> top-n with explanations
    POST /events               batch ingest; 200 only after the events are durable; repeated event ids stored once
    GET  /users/{id}/interests the user's interests and the behaviours routed to each
    GET  /healthz  /readyz  /metrics (Prometheus)

Bad input gets a 4xx that says what is wrong: 413 for a body over the limit, 415 for a body
that is not JSON, 400 for JSON that cannot be parsed, 422 for a body that does not fit the
schema (unknown fields, wrong types, NaN, ids out of range or not in the catalogue, n out of
range, timestamps zero / in the future / out of order within a user's batch).
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from facetrec.errors import FacetrecError
from facetrec.serving.pipeline import Pipeline, UnknownItems
from facetrec.serving.store import Event, UserStore

MAX_BODY_BYTES = 2 << 20  # 2 MiB: room for a 100k-item explicit history
MAX_HISTORY_IN = 100_000  # longer explicit histories are refused (413); the model reads the last max_history
MAX_EVENTS = 1000  # per /events batch
FUTURE_SKEW_S = 86_400  # timestamps more than a day ahead of the server clock are refused
INT_ID = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
STR_ID = Annotated[StrictStr, Field(min_length=1, max_length=256)]


def _models(int_ids: bool):
    """Request/response schemas; ids are integers when the dataset's raw ids are, else strings."""
    Id = INT_ID if int_ids else STR_ID
    example_item = 1 if int_ids else "B0001"

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"user_id": example_item, "n": 10}, {"history": [example_item], "n": 5, "exclude_seen": True}]})
        user_id: Optional[Id] = Field(None, description="Read the history from the store (unknown user -> cold start).")
        history: Optional[list[Id]] = Field(None, max_length=MAX_HISTORY_IN,
                                            description="Explicit history, oldest first; overrides the stored one.")
        n: StrictInt = Field(20, ge=1, description="How many items to return (at most the catalogue size).")
        exclude_seen: StrictBool = Field(True, description="Leave out items already in the history.")

        @model_validator(mode="after")
        def _one_source(self):
            if self.user_id is None and self.history is None:
                raise ValueError("give user_id (stored history) or history (explicit item ids)")
            return self

    class EventIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        event_id: STR_ID = Field(..., description="Client-chosen id; a repeated id is stored once.")
        user_id: Id
        item_id: Id
        timestamp: StrictInt = Field(..., gt=0, le=2**62, description="Unix seconds.")

    class EventsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"events": [
            {"event_id": "e-1", "user_id": example_item, "item_id": example_item, "timestamp": 1700000000}]}]})
        events: list[EventIn] = Field(..., min_length=1, max_length=MAX_EVENTS)

    return RecommendRequest, EventsRequest


class Item(BaseModel):
    item_id: Union[int, str]
    score: float
    retrieval_score: float
    interest: int = Field(..., description="Index of the interest that retrieved it; -1 = cold-start popularity.")
    because: list[Union[int, str]] = Field(..., description="Behaviours routed most strongly to that interest.")


class RecommendResponse(BaseModel):
    items: list[Item]
    path: str = Field(..., description="'personal' (recall -> rank) or 'cold_start' (no history).")
    history_used: int


class EventsResponse(BaseModel):
    stored: int
    duplicates: int
    duplicate_ids: list[str]


class InterestOut(BaseModel):
    index: int
    strength: float
    behaviours: list[Union[int, str]]
    weights: list[float]


class InterestsResponse(BaseModel):
    user_id: Union[int, str]
    history_length: int
    interests: list[InterestOut]


def _error(status: int, message: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(status_code=status, content=body)


def create_app(pipeline: Pipeline, store: UserStore) -> FastAPI:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    int_ids = pipeline.raw_int
    RecommendRequest, EventsRequest = _models(int_ids)
    registry = CollectorRegistry()
    requests = Counter("facetrec_requests_total", "Requests by endpoint and status", ["endpoint", "status"], registry=registry)
    latency = Histogram("facetrec_request_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 1, 2.5))
    events_total = Counter("facetrec_events_stored_total", "Events durably stored", registry=registry)

    app = FastAPI(title="facetrec", version="1", description=__doc__)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                return _count(_error(413, f"body over {MAX_BODY_BYTES} bytes; send fewer events or a shorter history"), path)
            body = await request.body()  # also bounds chunked bodies without a length
            if len(body) > MAX_BODY_BYTES:
                return _count(_error(413, f"body over {MAX_BODY_BYTES} bytes"), path)
            ctype = request.headers.get("content-type", "")
            if ctype.split(";")[0].strip().lower() != "application/json":
                return _count(_error(415, f"content-type must be application/json, got {ctype or 'none'!r}"), path)
            try:
                json.loads(body, parse_constant=_reject_constant)
            except RecursionError:
                return _count(_error(400, "JSON nested too deeply"), path)
            except ValueError as e:
                return _count(_error(400, f"body is not valid JSON: {e}"), path)
        response = await call_next(request)
        latency.labels(path if path in KNOWN else "other").observe(time.perf_counter() - t0)
        return _count(response, path)

    KNOWN = {"/recommend", "/events", "/healthz", "/readyz", "/metrics"}

    def _count(response, path):
        requests.labels(path if path in KNOWN else ("/users/{id}/interests" if path.startswith("/users/") else "other"),
                        str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        return _error(422, "request does not match the schema; see detail and /docs", errs)

    @app.exception_handler(UnknownItems)
    async def _unknown(request: Request, exc: UnknownItems):
        return _error(422, str(exc), {"unknown_item_ids": exc.ids[:100]})

    @app.exception_handler(FacetrecError)
    async def _bad(request: Request, exc: FacetrecError):
        return _error(422, str(exc))

    @app.post("/recommend", response_model=RecommendResponse)
    def recommend(req: RecommendRequest) -> RecommendResponse:  # type: ignore[valid-type]
        if req.n > pipeline.n_items - 1:
            return _error(422, f"n = {req.n} is larger than the catalogue ({pipeline.n_items - 1} items)")
        if req.history is not None:
            raw = req.history
        else:
            raw = [item for item, _ in store.history(_key(req.user_id), pipeline.max_history)]
        raw = raw[-pipeline.max_history:]  # the model reads the most recent behaviours
        hist = pipeline.encode(raw) if raw else np.zeros(0, dtype=np.int64)
        recs = pipeline.recommend(hist, req.n, req.exclude_seen)
        return RecommendResponse(items=[Item(item_id=r.item, score=_finite(r.score), retrieval_score=_finite(r.retrieval_score),
                                             interest=r.interest, because=r.because) for r in recs],
                                 path="personal" if len(hist) else "cold_start", history_used=len(hist))

    @app.post("/events", response_model=EventsResponse)
    def events(req: EventsRequest) -> EventsResponse:  # type: ignore[valid-type]
        now = time.time()
        last: dict[str, int] = {}
        for k, e in enumerate(req.events):
            if e.timestamp > now + FUTURE_SKEW_S:
                return _error(422, f"events[{k}].timestamp {e.timestamp} is in the future (server time {int(now)})")
            u = _key(e.user_id)
            if e.timestamp < last.get(u, 0):
                return _error(422, f"events[{k}]: timestamps of user {e.user_id} go backwards within the batch; send them in time order")
            last[u] = e.timestamp
        pipeline.encode([e.item_id for e in req.events])  # unknown items -> 422 before anything is stored
        res = store.append([Event(e.event_id, _key(e.user_id), _key(e.item_id), e.timestamp) for e in req.events])
        events_total.inc(res.stored)
        return EventsResponse(stored=res.stored, duplicates=res.duplicates, duplicate_ids=list(res.duplicate_ids))

    id_type = int if int_ids else str

    @app.get("/users/{user_id}/interests", response_model=InterestsResponse)
    def interests(user_id: id_type) -> InterestsResponse:  # type: ignore[valid-type]
        if int_ids and not 0 <= user_id < 2**63:
            return _error(422, "user_id must be in [0, 2^63)")
        raw = [item for item, _ in store.history(_key(user_id), pipeline.max_history)]
        hist = pipeline.encode(raw) if raw else np.zeros(0, dtype=np.int64)
        out = [InterestOut(index=i.index, strength=_finite(i.strength), behaviours=i.behaviours, weights=i.weights)
               for i in pipeline.interests(hist)]
        return InterestsResponse(user_id=user_id, history_length=len(hist), interests=out)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        if not store.ping():
            return _error(503, "user-state store not reachable")
        return {"status": "ready", "artifact": pipeline.manifest["version"], "items": pipeline.n_items - 1}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    def _key(x: Any) -> str:
        return str(x)

    return app


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON bodies")


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


def app_from_env() -> FastAPI:
    """uvicorn factory for `facetrec serve` (each worker process builds its own app)."""
    import os

    import torch

    from facetrec.serving.store import open_store

    torch.set_num_threads(1)  # one thread per worker: two showed multi-second p99 stalls (SPEC §7)
    pipeline = Pipeline(os.environ["FACETREC_ARTIFACT"])
    store = open_store(os.environ.get("FACETREC_STORE", "sqlite:///runs/state.db"))
    return create_app(pipeline, store)
