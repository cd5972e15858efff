"""Schema-driven fuzzing of every endpoint (schemathesis, in-process over ASGI): no input gets a 5xx.

Cases come from the app's own OpenAPI schema, both valid ones (which must also match the
documented response schemas) and deliberately invalid ones (wrong types, missing or extra
fields, out-of-range values, bad path parameters). Bounded: a fixed example count per
operation and mode, and a wall-clock budget for the whole test.
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from facetrec.serving.app import create_app  # noqa: E402
from facetrec.serving.store import open_store  # noqa: E402

EXAMPLES = 120  # per operation and generation mode
BUDGET_S = 60


@pytest.mark.slow
def test_fuzz_every_endpoint_no_server_error(tiny_pipeline, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    app = create_app(tiny_pipeline, store)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {
        "POST /recommend", "POST /events", "GET /users/{user_id}/interests", "GET /items/{item_id}/similar", "GET /healthz",
        "GET /readyz", "GET /metrics"}
    t0 = time.time()
    seen: dict[str, set[int]] = {}
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            checks = [not_a_server_error] + ([response_schema_conformance] if mode is GenerationMode.POSITIVE else [])
            codes = seen.setdefault(f"{op.method.upper()} {op.path} {mode.value}", set())

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                if time.time() - t0 > BUDGET_S:
                    return
                response = case.call()
                codes.add(response.status_code)
                case.validate_response(response, checks=checks)

            try:
                run()
            except Unsatisfiable:
                if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET" and "{" not in op.path:
                    continue  # no parameters and no body: there is no invalid request to make
                raise
    store.close()
    assert time.time() - t0 < BUDGET_S + 30
    assert all(c < 500 for cs in seen.values() for c in cs), seen
    # the fuzzer reached both the happy paths and the refusals
    assert 200 in seen["POST /recommend positive"] and 200 in seen["POST /events positive"]
    assert 422 in seen["POST /recommend negative"] and 422 in seen["POST /events negative"]
