"""The rest of the API over the real server: legacy text completions, request ids in the access log, and
the Prometheus metrics."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support import (
    SMOL,
    RunningServer,
    Variants,
    complete,
    schema_validator,
)


def test_legacy_completions(openai_client: Any, openai_schemas: dict[str, Any], variants: Variants) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    response = openai_client.completions.create(
        model=variants.plain, prompt=prompts, n=2, max_tokens=8, temperature=0, logprobs=2
    )
    validator = schema_validator(openai_schemas, "CreateCompletionResponse")
    validator.validate(response.model_dump(exclude_unset=True))
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy: n copies of one answer per prompt
    assert response.choices[2].text.startswith(" 4")  # the count goes on
    for choice in response.choices:
        assert "".join(choice.logprobs.tokens) == choice.text
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    single = [
        openai_client.completions.create(model=variants.plain, prompt=p, max_tokens=8, temperature=0) for p in prompts
    ]
    assert response.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)  # each prompt counted once
    assert [s.choices[0].text for s in single] == [response.choices[0].text, response.choices[2].text]

    chunks = list(
        openai_client.completions.create(
            model=variants.plain,
            prompt=prompts[0],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == response.choices[0].text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    validator.validate(finishing[0].model_dump(exclude_unset=True))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

    echoed = openai_client.completions.create(model=variants.plain, prompt=prompts[0], max_tokens=3, echo=True)
    assert echoed.choices[0].text.startswith(prompts[0])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": SMOL}, "prompt"),
        ({"model": SMOL, "prompt": ""}, "prompt"),
        ({"model": SMOL, "prompt": "hi", "best_of": 3}, "best_of"),
        ({"model": SMOL, "prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"model": "no-such-model", "prompt": "hi"}, "model"),
    ],
)
def test_legacy_completions_errors(api_server: RunningServer, body: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{api_server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code in (400, 404)
    assert response.json()["error"]["param"] == param


def test_request_ids_are_echoed_and_logged(api_server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    made = httpx.get(f"{api_server.base_url}/health")
    assert len(made.headers["x-request-id"]) == 32  # one is made when the client sends none
    with caplog.at_level("INFO", logger="clemproxy.access"):
        kept = httpx.get(f"{api_server.base_url}/v1/models", headers={"x-request-id": "run-42.turn-3"})
        refused = httpx.get(f"{api_server.base_url}/health", headers={"x-request-id": "bad id\\n"})
    assert kept.headers["x-request-id"] == "run-42.turn-3"
    assert refused.headers["x-request-id"] != "bad id\\n"
    assert any(
        "path=/v1/models status=200" in r.message and "request_id=run-42.turn-3" in r.message for r in caplog.records
    )


def test_prometheus_metrics(api_server: RunningServer, openai_client: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{api_server.base_url}/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    before = samples()
    complete(openai_client, max_tokens=5)
    after = samples()
    ok = ("clemproxy_requests_total", (("model", SMOL), ("route", "/v1/chat/completions"), ("status", "200")))
    assert after[ok] == before.get(ok, 0) + 1
    tokens = ("clemproxy_generated_tokens_total", (("model", SMOL),))
    assert after[tokens] - before.get(tokens, 0) == 5
    assert after[("clemproxy_model_loaded", (("model", SMOL),))] == 1
    assert after[("clemproxy_model_bytes", (("model", SMOL),))] > 0
    assert after[("clemproxy_queued_requests", (("model", SMOL),))] == 0
    ttft = ("clemproxy_time_to_first_token_seconds_count", (("model", SMOL),))
    assert after[ttft] == before.get(ttft, 0) + 1
    legacy = openai_client.completions.create(model=SMOL, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert legacy.usage is not None
    latest = samples()  # the legacy endpoint is counted the same way
    assert latest[ttft] == after[ttft] + 1
    assert latest[tokens] - after[tokens] == legacy.usage.completion_tokens
    assert after[("clemproxy_model_load_seconds_count", (("model", SMOL),))] >= 1
    failure = ("clemproxy_model_load_failures_total", (("model", "not-downloaded"),))
    body = {"model": "not-downloaded", "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(f"{api_server.base_url}/v1/chat/completions", json=body, timeout=60).status_code == 500
    assert samples()[failure] == latest.get(failure, 0) + 1  # weights that are not there: a failed load
