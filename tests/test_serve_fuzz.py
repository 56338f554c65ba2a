"""Fuzzing `rlkv serve` from its own OpenAPI schema (schemathesis): a real server process on 127.0.0.1,
a bounded number of generated requests per operation, valid ones (within the schema) and invalid ones
(outside it). No request may get a server error, the engine never restarts, and afterwards the server is
healthy and holds no request, stream or KV page. Derandomized, so CI sees the same cases every run.
"""

from collections import Counter

import pytest
import schemathesis
from conftest import saved_tiny_model
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from test_serve import NAME, Server, _wait_idle

EXAMPLES = 50  # per operation and mode: about 15 s on 2 CPU cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = saved_tiny_model(tmp_path_factory.mktemp("tiny-fuzz"), "llama")
    # a short context keeps every generated request short: at most 256 tokens in all
    started = Server(
        model, tmp_path_factory.mktemp("logs") / "fuzz.log", "--max-model-len", "256", "--default-max-tokens", "16"
    )
    try:
        started.wait_ready(120)
        yield started
    finally:
        started.close(15)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_server_error(server, mode):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    answers = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to get wrong: no parameters, no body

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing case is in the message
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            answer = case.call(base_url=server.url, timeout=60)
            answers[case.operation.label, answer.status_code] += 1
            assert answer.status_code < 500, (case.as_curl_command(), answer.status_code, answer.text[:500])

        call()
    assert answers["POST /v1/completions", 400] > 0 and answers["POST /v1/chat/completions", 400] > 0
    if mode == GenerationMode.POSITIVE:
        assert answers["POST /v1/completions", 200] > 0, answers
    idle = _wait_idle(server)
    assert idle["rlkv_open_streams"] == 0 and idle["rlkv_engine_restarts_total"] == 0 and idle["rlkv_engine_up"] == 1
    assert server.client.completions.create(model=NAME, prompt="still here", max_tokens=2).choices
