"""Bad requests and failing models over the real server: OpenAI's error envelope, the right status and code,
and the server still serving afterwards."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.support import (
    COLORS,
    SMOL,
    RunningServer,
    Variants,
    complete,
    post_chat,
)


def test_unknown_model_is_404(openai_client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        complete(openai_client, "no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_invalid_entry_is_400_naming_the_problem(openai_client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        complete(openai_client, "broken-entry")
    assert caught.value.code == "invalid_model_entry"
    assert "eos_to_cull" in caught.value.message


def test_missing_weights_is_a_clear_error(openai_client: Any) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        complete(openai_client, "not-downloaded")
    assert caught.value.code == "model_load_failed"
    assert "nobody/not-in-cache-GGUF" in caught.value.message and "*Q4_0.gguf" in caught.value.message


def test_hf_model_not_in_cache_is_a_clear_error(openai_client: Any) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        complete(openai_client, "hf-not-downloaded")
    assert caught.value.code == "model_load_failed"
    assert "nobody/not-in-cache" in caught.value.message and "not reachable" in caught.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_exceeded_is_400_before_any_chunk(openai_client: Any, stream: bool, variants: Variants) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        complete(openai_client, variants.small_context, max_tokens=100, stream=stream)
    assert caught.value.code == "context_length_exceeded"
    assert "128" in caught.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "model"),
        (json.dumps({"model": SMOL}), "messages"),
        (json.dumps({"model": SMOL, "messages": []}), "messages"),
        (
            json.dumps({"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}),
            "max_tokens",
        ),
        (json.dumps({"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}), "temperature"),
        (json.dumps({"model": SMOL, "messages": [{"role": "robot", "content": "hi"}]}), "messages[0].role"),
        (
            json.dumps({"model": SMOL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json.dumps(
                {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}
            ),
            "stop",
        ),
    ],
)
def test_bad_input_is_400_in_openai_shape(api_server: RunningServer, body: bytes | str, param: str | None) -> None:
    response = post_chat(api_server, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert httpx.get(f"{api_server.base_url}/health").status_code == 200  # still serving


def test_unknown_fields_are_accepted(api_server: RunningServer) -> None:
    body = {
        "model": SMOL,
        "messages": COLORS,
        "max_tokens": 2,
        "chat_template_kwargs": {"enable_thinking": False},
        "some_vendor_field": {"x": 1},
    }
    assert post_chat(api_server, json.dumps(body)).status_code == 200


def test_unknown_route_is_404_envelope(api_server: RunningServer) -> None:
    response = httpx.get(f"{api_server.base_url}/v1/nothing-here")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f", "parameters": {"type": "object"}}]),  # the deprecated form of tools
        ("prediction", {"type": "content", "content": "Red"}),
        ("logit_bias", {"50256": -100}),
    ],
)
def test_fields_we_cannot_honour_are_refused(api_server: RunningServer, field: str, value: Any) -> None:
    response = post_chat(api_server, json.dumps({"model": SMOL, "messages": COLORS, field: value}))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]
    # Their harmless values are fine.
    harmless = {"response_format": {"type": "text"}, "tool_choice": "none", "max_tokens": 1}
    assert post_chat(api_server, json.dumps({"model": SMOL, "messages": COLORS, **harmless})).status_code == 200


def test_body_over_the_limit_is_413(tmp_path: Any) -> None:
    from backends import ModelRegistry
    from proxy.settings import Settings

    with RunningServer(ModelRegistry.from_list([]), Settings.of(max_body_size=1000)) as server:
        big = json.dumps({"model": SMOL, "messages": [{"role": "user", "content": "x" * 2000}]})
        response = post_chat(server, big)
        assert response.status_code == 413
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{server.base_url}/health").status_code == 200
