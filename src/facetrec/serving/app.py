"""HTTP API (FastAPI) over the recall -> rank pipeline and the durable user-state store (SPEC §5).

    POST /recommend             user id (history from the store) or an explicit history -> top-n with explanations
    POST /events                batch ingest; 200 only once the events are durable; a repeated event id is stored once
    GET  /users/{id}/interests  the user's interests and the behaviours routed to each
    GET  /items/{id}/similar    items nearest to one item in the retrieval model's item space ("more like this")
    GET  /healthz               the process is up
    GET  /readyz                artifact loaded and the store reachable (503 otherwise); names the version served
                                and, when a newer export failed to load, why (`reload_error`)
    GET  /metrics               Prometheus text format (per worker process)

What each kind of input gets (every case has a test in tests/serving/test_app.py; never a 500):

    input                                              answer
    -------------------------------------------------  ---------------------------------------------------------------
    unknown user_id (no stored events)                 200, cold-start path: most popular items ("path": "cold_start")
    explicit empty history []                          200, cold-start path
    history longer than max_history (up to 100,000)    200; the models read the most recent max_history items, K'_u
                                                       counts them all, the last 1000 distinct are excluded as seen
    history over 100,000 items                         422
    body over 2 MiB (Content-Length or actual bytes)   413
    item id not in the catalogue                       422 listing the unknown ids (for /events: nothing is stored)
    id < 0 or >= 2^63 (integer catalogues)             422
    id of the wrong JSON type (float, bool, null in a  422; ids are integers when the dataset's raw ids all are,
      list, string for an int catalogue, or vice versa) else strings of 1-256 characters; "user_id": null = absent
    NaN / Infinity / -Infinity tokens                  400 (they are not JSON)
    n <= 0, n > 1000 or n > catalogue size             422
    "exclude" over 10,000 items, or naming an item      422 (an item never to return must be in the catalogue)
      not in the catalogue
    duplicate items in a history                       accepted: repeated behaviours are real signal
    event timestamp <= 0                               422
    event timestamp > 1 day ahead of the server clock  422
    one user's events out of time order in a batch     422 (send them oldest first); an event older than what is
                                                       already stored is accepted and appended in arrival order
    malformed JSON, or nested deeper than the parser   400
      allows
    Content-Type other than application/json           415
    unknown fields                                     422
    neither user_id nor history                        422
    repeated event id (in one batch or across batches) 200; stored once; listed in "duplicate_ids"
    empty events list, or more than 1000 events        422
    the user-state store fails mid-request (closed,    503, nothing stored: retry (a request with an explicit
      locked past its timeout, redis down)              history does not touch the store and is answered)

A 4xx body is {"error": "<what is wrong and what to do>", "detail": ...}.
"""

# no `from __future__ import annotations`: FastAPI must see the request classes built in _models()
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from facetrec.errors import FacetrecError
from facetrec.serving.pipeline import STORE_READ, Pipeline, UnknownItems, stored_history
from facetrec.serving.store import STORE_ERRORS, Event, UserStore

log = logging.getLogger("facetrec.serving")

MAX_BODY_BYTES = 2 << 20  # 2 MiB: room for a 100k-item explicit history
MAX_HISTORY_IN = 100_000  # longer explicit histories are refused; the model reads the last max_history
MAX_N = 1000  # most results per request: the ranker scores max(n, candidates) items
MAX_EVENTS = 1000  # per /events batch
MAX_EXCLUDE = 10_000  # items a request may rule out
FUTURE_SKEW_S = 86_400  # timestamps more than a day ahead of the server clock are refused
MAX_ERRORS_SHOWN = 20
INT_ID = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
STR_ID = Annotated[StrictStr, Field(min_length=1, max_length=256)]



class ErrorBody(BaseModel):
    """Every 4xx / 503 body: what is wrong and what to do, plus machine-readable detail where there is some."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": "1 item id(s) not in the catalogue: 'B000XXXX'", "detail": {"unknown_item_ids": ["B000XXXX"]}}]})
    error: str
    detail: Optional[Any] = None


ERRORS: dict[Union[int, str], dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Body is not valid JSON (includes NaN / Infinity, too deep nesting)."},
    413: {"model": ErrorBody, "description": f"Body over {MAX_BODY_BYTES} bytes."},
    415: {"model": ErrorBody, "description": "Content-Type is not application/json."},
    422: {"model": ErrorBody, "description": "Body does not fit the schema, or names items not in the catalogue."},
}


def _models(int_ids: bool, example_item: Any, example_user: Any):
    """Request schemas; ids are integers when the dataset's raw ids are, else strings."""
    Id = INT_ID if int_ids else STR_ID

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"user_id": example_user, "n": 10},
            {"history": [example_item], "n": 5, "exclude_seen": True},
        ]})
        user_id: Optional[Id] = Field(None, description="Read the history from the store (unknown user -> cold start).")
        history: Optional[list[Id]] = Field(None, max_length=MAX_HISTORY_IN,
                                            description="Explicit history, oldest first; overrides the stored one.")
        n: StrictInt = Field(20, ge=1, le=MAX_N, description="How many items to return (at most the catalogue size).")
        exclude_seen: StrictBool = Field(True, description="Leave out items already in the history.")
        exclude: Optional[list[Id]] = Field(None, max_length=MAX_EXCLUDE,
                                            description="Items never to return (e.g. in the basket, or already shown).")

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
            {"event_id": "e-1", "user_id": example_user, "item_id": example_item, "timestamp": 1700000000}]}]})
        events: list[EventIn] = Field(..., min_length=1, max_length=MAX_EVENTS)

    return RecommendRequest, EventsRequest


class Item(BaseModel):
    item_id: Union[int, str]
    score: float = Field(..., description="Click probability from the ranker (retrieval score without one; 0 for popularity fill).")
    retrieval_score: float
    interest: int = Field(..., description="Index of the interest that retrieved it; -1 = cold-start popularity.")
    because: list[Union[int, str]] = Field(..., description="Behaviours routed most strongly to that interest.")


class SimilarItem(BaseModel):
    item_id: Union[int, str]
    score: float = Field(..., description="e_i · e_j in the retrieval model's item space (cosine when it normalises).")


class SimilarResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "item_id": "B0001", "items": [{"item_id": "B0002", "score": 0.91}], "artifact": "v20261123T031500-ab12"}]})
    item_id: Union[int, str]
    items: list[SimilarItem]
    artifact: str


class RecommendResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [{"item_id": "B0002", "score": 0.83, "retrieval_score": 4.1, "interest": 1, "because": ["B0001"]}],
        "path": "personal", "history_used": 1, "artifact": "v20261123T031500-ab12"}]})
    items: list[Item]
    path: str = Field(..., description="'personal' (recall -> rank) or 'cold_start' (no history).")
    history_used: int = Field(..., description="Behaviours the models read (the most recent max_history).")
    artifact: str


class EventsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"stored": 1, "duplicates": 0, "duplicate_ids": []}]})
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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


class BodyGuard:
    """ASGI middleware in front of the routes: size limit, content type, well-formed JSON; counts requests.

    Checked before FastAPI sees the body, so that an oversized, non-JSON or pathological body
    gets a precise 4xx (413 / 415 / 400) and never reaches the validators. The body is read at
    most MAX_BODY_BYTES + 1 bytes far, whether or not Content-Length was sent.
    """

    def __init__(self, app, limit: int, observe) -> None:
        self.app, self.limit, self.observe = app, limit, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                rejected, receive = await self._check(scope, receive)
                if rejected is not None:
                    return await rejected(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.observe(scope["path"], status["code"], time.perf_counter() - t0)

    async def _check(self, scope, receive):
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return _error(413, f"body over {self.limit} bytes; send fewer events or a shorter history"), receive
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if ctype.split(";")[0].strip().lower() != "application/json":
            return _error(415, f"Content-Type must be application/json, got {ctype or 'none'!r}"), receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _error(400, "client disconnected before sending the body"), receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return _error(413, f"body over {self.limit} bytes; send fewer events or a shorter history"), receive
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            json.loads(body, parse_constant=_reject_constant)
        except RecursionError:
            return _error(400, "JSON nested too deeply"), receive
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity, ints over 4300 digits
            return _error(400, f"body is not valid JSON: {e}"), receive
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay


def reload_version(version: Any, live: Pipeline, pause: float = 0.005, **kwargs: Any) -> Pipeline:
    """Load a new version while `live` answers requests in this process. It is warmed up only when its
    models differ from the live version's (`Pipeline.model_specs`), with `pause` seconds between the
    warm-up's calls. With the same models this process has already run every shape once, so the new
    version's first calls are as fast as later ones; the warm-up would only cost about 0.14 s of CPU
    per worker while requests are being answered (`benchmarks/reload_cost.py`)."""
    p = Pipeline(version, **kwargs)
    if p.model_specs() != live.model_specs():
        p.warm_up(pause=pause)
    return p


class LivePipeline:
    """The pipeline a worker serves, switched to a new export when its artifact root's CURRENT changes.

    `check()` looks at CURRENT once: a version other than the one loaded is loaded and verified in
    full (as `facetrec serve` does at start, warm-up included) while the old one keeps answering,
    then swapped in by one assignment. Each request reads `pipeline` once, so it runs on one version
    from start to end. A version that fails to load is reported (`error`, /readyz, /metrics, the
    log) and not tried again until CURRENT names another one; the old version stays live.
    `start()` runs `check()` every `every` seconds on a daemon thread.

    Args:
        pipeline: the version loaded at start.
        root: the artifact root whose CURRENT is watched (None: never reload).
        load: version directory -> ready Pipeline (raises on a broken or inconsistent version).
        every: seconds between looks at CURRENT (0 = only when `check()` is called).
    """

    def __init__(self, pipeline: Pipeline, root: Optional[Any] = None, load: Optional[Any] = None,
                 every: float = 0.0) -> None:
        self.pipeline = pipeline
        self.root = root
        self.every = float(every)
        self.error: Optional[str] = None
        self.reloads = {"ok": 0, "failed": 0}
        self._load = load or Pipeline
        self._failed: Optional[str] = None

    def check(self) -> bool:
        """Load and swap in the version CURRENT names, if it is new; True when one was swapped in."""
        from facetrec.serving.artifacts import resolve_version

        if self.root is None:
            return False
        try:
            version = resolve_version(self.root)
        except (FacetrecError, OSError) as e:
            self.error = f"{e} (still serving {self.pipeline.version})"
            return False
        if Path(version).resolve() == Path(self.pipeline.version_dir).resolve():
            self.error, self._failed = None, None  # CURRENT names the version served (again): nothing to report
            return False
        if str(version) == self._failed:
            return False
        try:
            new = self._load(version)
            if new.raw_int != self.pipeline.raw_int:
                raise FacetrecError(f"its ids are {'integers' if new.raw_int else 'strings'}, the running server's "
                                    f"request schema takes {'integers' if self.pipeline.raw_int else 'strings'}: "
                                    f"restart the server to switch")
        except Exception as e:  # any failure keeps the old version live
            self._failed = str(version)
            self.error = f"version {Path(version).name} not loaded: {e} (still serving {self.pipeline.version})"
            self.reloads["failed"] += 1
            log.error(self.error)
            return False
        self.pipeline, self.error, self._failed = new, None, None
        self.reloads["ok"] += 1
        return True

    def start(self) -> None:
        """Look at CURRENT every `every` seconds on a daemon thread (nothing when every <= 0 or no root)."""
        if self.root is None or self.every <= 0:
            return

        def loop() -> None:
            try:  # Linux: a thread has its own nice value; loading a version must not starve the requests
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            except (AttributeError, OSError):  # elsewhere the watcher runs at the workers' priority
                pass
            while True:
                time.sleep(self.every)
                try:
                    self.check()
                except Exception:  # the watcher must outlive anything one look runs into
                    log.exception("looking for a new export failed; trying again in %s s", self.every)

        threading.Thread(target=loop, name="facetrec-reload", daemon=True).start()


def create_app(pipeline: Union[Pipeline, LivePipeline], store: UserStore) -> FastAPI:
    """The FastAPI app over one loaded pipeline and one store (each worker process builds its own).

    With a LivePipeline the app serves whichever version it holds when a request starts."""
    live = pipeline if isinstance(pipeline, LivePipeline) else LivePipeline(pipeline)
    pipeline = live.pipeline  # the request schema (id type, examples) comes from the version loaded at start
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    int_ids = pipeline.raw_int
    example_item = pipeline.raw_items[int(pipeline.popular[0])]
    example_user = 1 if int_ids else "A1B2C3"
    RecommendRequest, EventsRequest = _models(int_ids, example_item, example_user)
    registry = CollectorRegistry()
    requests = Counter("facetrec_requests_total", "Requests by endpoint and status", ["endpoint", "status"], registry=registry)
    latency = Histogram("facetrec_request_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 1, 2.5))
    events_total = Counter("facetrec_events_stored_total", "Events durably stored", registry=registry)
    dups_total = Counter("facetrec_events_duplicate_total", "Events whose id was already stored", registry=registry)
    paths = Counter("facetrec_recommend_path_total", "Recommendations by path", ["path"], registry=registry)

    class Reloads:  # read from the LivePipeline at each scrape
        def collect(self):
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

            c = CounterMetricFamily("facetrec_artifact_reloads", "New exports loaded (ok) or refused (failed) while serving",
                                    labels=["result"])
            for result, n in live.reloads.items():
                c.add_metric([result], n)
            yield c
            g = GaugeMetricFamily("facetrec_artifact_info", "The artifact version this worker serves (value 1)",
                                  labels=["version"])
            g.add_metric([live.pipeline.version], 1)
            yield g

    registry.register(Reloads())
    known = {"/recommend", "/events", "/healthz", "/readyz", "/metrics"}

    def observe(path: str, status: int, seconds: float) -> None:
        endpoint = path if path in known else ("/users/{id}/interests" if path.startswith("/users/") else
                                               "/items/{id}/similar" if path.startswith("/items/") else "other")
        requests.labels(endpoint, str(status)).inc()
        latency.labels(endpoint).observe(seconds)

    app = FastAPI(title="facetrec", version="1", description=__doc__)
    app.add_middleware(BodyGuard, limit=MAX_BODY_BYTES, observe=observe)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        shown = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                 for e in errs[:MAX_ERRORS_SHOWN]]
        more = f" ({len(errs)} errors, first {MAX_ERRORS_SHOWN} shown)" if len(errs) > MAX_ERRORS_SHOWN else ""
        return _error(422, "request does not match the schema; see detail and /docs" + more, shown)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # the framework's own 4xx (unknown path, wrong method) in the same {"error": ...} shape as ours
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response

    @app.exception_handler(UnknownItems)
    async def _unknown(request: Request, exc: UnknownItems):
        return _error(422, str(exc), {"unknown_item_ids": exc.ids[:100]})

    @app.exception_handler(FacetrecError)
    async def _bad(request: Request, exc: FacetrecError):
        return _error(422, str(exc))

    async def _store_down(request: Request, exc: Exception):
        # the store failed mid-request (database closed or locked past its timeout, redis gone): nothing was
        # acknowledged, so the client may retry; a 503, never a 500
        log.error("user-state store failed on %s: %s", request.url.path, exc)
        return _error(503, f"user-state store not reachable ({type(exc).__name__}: {str(exc)[:200]}); nothing was "
                           f"stored or read, retry later")

    for exc_type in STORE_ERRORS:
        app.add_exception_handler(exc_type, _store_down)

    def _key(x: Any) -> str:
        return str(x)

    @app.post("/recommend", response_model=RecommendResponse, responses=ERRORS)
    def recommend(req: RecommendRequest) -> RecommendResponse:  # type: ignore[valid-type]
        """Top-n items: recall with each of the user's interests, rank the merged candidates, explain each."""
        pipeline = live.pipeline  # one version for the whole request
        if req.n > pipeline.n_items - 1:
            return _error(422, f"n = {req.n} is larger than the catalogue ({pipeline.n_items - 1} items)")
        if req.history is not None:
            hist = pipeline.encode(req.history)  # unknown items -> 422
            n_events = len(hist)
        else:
            stored = [item for item, _ in store.history(_key(req.user_id), STORE_READ)]
            # items a newer catalogue dropped are skipped; they were valid when ingested
            hist, n_events = stored_history(pipeline, stored, store.count(_key(req.user_id)))
        exclude = pipeline.encode(req.exclude) if req.exclude else None  # unknown items -> 422
        recs = pipeline.recommend(hist, req.n, req.exclude_seen, n_events=n_events, user=req.user_id, exclude=exclude)
        path = "personal" if len(hist) else "cold_start"
        paths.labels(path).inc()
        return RecommendResponse(items=[Item(item_id=r.item, score=_finite(r.score), retrieval_score=_finite(r.retrieval_score),
                                             interest=r.interest, because=r.because) for r in recs],
                                 path=path, history_used=min(len(hist), pipeline.max_history), artifact=pipeline.version)

    @app.post("/events", response_model=EventsResponse, responses=ERRORS)
    def events(req: EventsRequest) -> EventsResponse:  # type: ignore[valid-type]
        """Append behaviours to users' sequences; answers only after they are durable."""
        pipeline = live.pipeline
        now = time.time()
        last: dict[str, int] = {}
        for k, e in enumerate(req.events):
            if e.timestamp > now + FUTURE_SKEW_S:
                return _error(422, f"events[{k}].timestamp {e.timestamp} is in the future (server time {int(now)}); "
                                   f"send Unix seconds")
            u = _key(e.user_id)
            if e.timestamp < last.get(u, 0):
                return _error(422, f"events[{k}]: timestamps of user {e.user_id!r} go backwards within the batch; "
                                   f"send each user's events oldest first")
            last[u] = e.timestamp
        pipeline.encode([e.item_id for e in req.events])  # unknown items -> 422 before anything is stored
        res = store.append([Event(e.event_id, _key(e.user_id), _key(e.item_id), e.timestamp) for e in req.events])
        events_total.inc(res.stored)
        dups_total.inc(res.duplicates)
        return EventsResponse(stored=res.stored, duplicates=res.duplicates, duplicate_ids=list(res.duplicate_ids))

    id_type = int if int_ids else str

    @app.get("/users/{user_id}/interests", response_model=InterestsResponse, responses={422: ERRORS[422]})
    def interests(user_id: id_type) -> InterestsResponse:  # type: ignore[valid-type]
        """The user's K'_u interests: strength (capsule length) and the behaviours routed most strongly to each."""
        pipeline = live.pipeline
        if int_ids and not 0 <= user_id < 2**63:
            return _error(422, f"user_id {user_id} must be in [0, 2^63)")
        if not int_ids and not 1 <= len(user_id) <= 256:
            return _error(422, "user_id must be 1-256 characters")
        stored = [item for item, _ in store.history(_key(user_id), pipeline.max_history)]
        hist, n_events = stored_history(pipeline, stored, store.count(_key(user_id)))
        n_events = n_events if len(hist) else 0
        out = [InterestOut(index=i.index, strength=_finite(i.strength), behaviours=i.behaviours, weights=i.weights)
               for i in pipeline.interests(hist, n_events)]
        return InterestsResponse(user_id=user_id, history_length=n_events, interests=out)

    @app.get("/items/{item_id}/similar", response_model=SimilarResponse,
             responses={404: {"model": ErrorBody, "description": "The item is not in the catalogue."},
                        422: ERRORS[422]})
    def similar(item_id: id_type, n: int = 10) -> SimilarResponse:  # type: ignore[valid-type]
        """Items nearest to this one in the retrieval model's item space ("more like this"), best first."""
        pipeline = live.pipeline
        if not 1 <= n <= min(MAX_N, pipeline.n_items - 2):
            return _error(422, f"n = {n} must be in [1, {min(MAX_N, pipeline.n_items - 2)}]")
        internal = pipeline.item_index.get(str(item_id), 0)
        if not internal:
            return _error(404, f"item {item_id!r} is not in the catalogue")
        out = [SimilarItem(item_id=i, score=_finite(sc)) for i, sc in pipeline.similar(internal, n)]
        return SimilarResponse(item_id=item_id, items=out, artifact=pipeline.version)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody, "description": "The user-state store is not reachable."}})
    def readyz():
        """Readiness: artifact loaded and verified, store reachable."""
        try:
            ok = store.ping()
        except Exception:  # a broken store connection must read as not ready, not as a crash
            ok = False
        if not ok:
            return _error(503, "user-state store not reachable")
        p = live.pipeline
        out = {"status": "ready", "artifact": p.version, "items": p.n_items - 1}
        if live.error is not None:  # a newer export failed to load; this one still serves
            out["reload_error"] = live.error
        return out

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        """Prometheus metrics of this worker process."""
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


def app_from_env() -> FastAPI:
    """uvicorn factory for `facetrec serve` (each worker process builds its own app)."""
    import os

    import json

    from facetrec.serving.pipeline import one_model_thread
    from facetrec.serving.store import open_store

    one_model_thread()

    params = json.loads(os.environ.get("FACETREC_SEARCH_PARAMS", "{}"))
    device = os.environ.get("FACETREC_DEVICE", "cpu")

    first = Pipeline(os.environ["FACETREC_ARTIFACT"], search_params=params, device=device)
    first.warm_up()
    live = LivePipeline(first, root=os.environ.get("FACETREC_ARTIFACT_ROOT") or None,
                        load=lambda v: reload_version(v, live.pipeline, search_params=params, device=device),
                        every=float(os.environ.get("FACETREC_RELOAD_EVERY", "0")))
    live.start()
    store = open_store(os.environ.get("FACETREC_STORE", "sqlite:///runs/state.db"))
    return create_app(live, store)
