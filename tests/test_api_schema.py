"""Schema-based fuzzing of the HTTP API with schemathesis, against the server's own OpenAPI
document (/openapi.json): requests generated from the document (and deliberately invalid ones) go
to a real server on a loopback port, running the shipped model. No answer may be a 5xx, every
answer must match the document (status, content type, body schema, headers), and invalid requests
must be refused with a 4xx. Most generated requests name the served model, so that generation runs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # schemathesis, a few minutes
schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (in the test extra)")
from hypothesis import HealthCheck, settings  # noqa: E402 (after the skip)
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,  # noqa: E402
                                 response_headers_conformance, response_schema_conformance, status_code_conformance)

import ternlm  # noqa: E402
from ternlm.server import ServerOptions, create_app, serving_in_thread  # noqa: E402

MODEL_ID = "ternlm-default"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]


MODEL = ternlm.load(threads=1, n_ctx=64)  # short generations: the examples are many
APP = create_app(MODEL, MODEL_ID, ServerOptions(max_batch=4, max_waiting=16))
schema = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def url():
    with serving_in_thread(APP) as url:
        yield url


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_as_documented(case, url):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL_ID
    case.call_and_validate(base_url=url, checks=CHECKS, timeout=120)
