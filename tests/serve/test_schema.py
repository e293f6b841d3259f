"""Schemathesis against the live /openapi.json: generated requests never get a server error, and responses
match the documented status codes, content types and schemas (positive mode, like vLLM's schema test)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serve.conftest import KEYS, Server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SKIP = {("GET", "/v1/videos/{video_id}/events")}  # an SSE stream runs until its job ends; test_api covers it


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("schema") / "data", "--queue-limit", "4", "--image-timeout", "30",
               "--log-level", "warning", step_seconds=0.001, name="schema")
    s.start()
    yield s
    s.stop()


def test_no_server_errors_on_generated_requests(live):
    config = schemathesis.config.SchemathesisConfig.from_dict({"generation": {"allow-x00": False}})
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json", config=config)
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/videos"),
                                                                     ("POST", "/v1/images/generations")}
    tested = 0
    for op in operations:
        if (op.method.upper(), op.path) in SKIP:
            continue

        @given(case=op.as_strategy())
        @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                         HealthCheck.too_slow])
        def run(case):
            case.call_and_validate(base_url=live.url, headers=headers, timeout=30, checks=CHECKS)

        run()
        tested += 1
    assert tested == len(operations) - len(SKIP)
