"""OpenAI's published schemas, checked against every body and stream event the suite's openai client gets."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "openai" / "openai-schemas.json"


class SchemaCheckingTransport(httpx.HTTPTransport):
    """An httpx transport that checks every body the server sends against OpenAI's schemas: whole JSON
    responses, and each SSE event of a stream, as the client reads them. A mismatch fails the test that made
    the request, so every response the suite's openai client gets is validated, not only where a test asks."""

    def __init__(self, schemas: dict[str, Any]) -> None:
        super().__init__()
        completion_chunk = json.loads(json.dumps(schemas["$defs"]["CreateCompletionResponse"]))
        finish = completion_chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
        # OpenAI streams "finish_reason": null until a choice ends; its schema only lists the final values.
        completion_chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
            "anyOf": [finish, {"type": "null"}]
        }
        defs = {**schemas["$defs"], "CompletionChunk": completion_chunk}
        self.checked: collections.Counter[str] = collections.Counter()  # bodies or events validated, by schema
        self.validators = {
            name: schema_validator({"$defs": defs}, name)
            for name in (
                "CreateChatCompletionResponse",
                "CreateChatCompletionStreamResponse",
                "CreateCompletionResponse",
                "CompletionChunk",
                "ListModelsResponse",
                "Model",
                "ErrorResponse",
                "Response",
                "ResponseStreamEvent",
                "ResponseItemList",
            )
        }

    def schema_for(self, method: str, path: str, status: int, streamed: bool) -> str | None:
        if status >= 400:
            return "ErrorResponse"
        if "/responses" in path:
            if path.endswith("/input_items"):
                return "ResponseItemList"
            if method == "DELETE":
                return None  # the SDK reads no body, and the schemas have none for it
            return "ResponseStreamEvent" if streamed else "Response"
        if path.endswith("/chat/completions"):
            return "CreateChatCompletionStreamResponse" if streamed else "CreateChatCompletionResponse"
        if path.endswith("/completions"):
            return "CompletionChunk" if streamed else "CreateCompletionResponse"
        if path.endswith("/models"):
            return "ListModelsResponse"
        if "/models/" in path:
            return "Model"
        return None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        name = self.schema_for(request.method, request.url.path, response.status_code, streamed)
        if name is None:
            return response
        validator, error_validator = self.validators[name], self.validators["ErrorResponse"]
        upstream, checked = response.stream, self.checked

        def check_event(text: str) -> None:
            named = None  # the Responses API names each event; its data's type must say the same
            for line in text.splitlines():
                if line.startswith("event: "):
                    named = line[7:]
                elif line.startswith("data: {"):
                    event = json.loads(line[6:])
                    is_error = isinstance(event.get("error"), dict)  # an error envelope, as chat streams end
                    kind = "ErrorResponse" if is_error else name
                    (error_validator if is_error else validator).validate(event)
                    assert named is None or event["type"] == named, f"event {named!r} holds a {event['type']!r}"
                    checked[kind] += 1
                else:
                    assert line in ("", "data: [DONE]"), f"unexpected SSE line {line!r}"

        class Checked(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                received = b""
                for part in upstream:
                    received += part
                    if streamed:  # check each event as it arrives: clients stop reading at [DONE]
                        *events, received = received.split(b"\n\n")
                        for event in events:
                            check_event(event.decode())
                    yield part
                if streamed:
                    check_event(received.decode())
                else:
                    validator.validate(json.loads(received))
                    checked[name] += 1

            def close(self) -> None:
                upstream.close()

        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=Checked(),
            request=request,
            extensions=response.extensions,
        )


def schema_validator(schemas: dict[str, Any], name: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": schemas["$defs"]})
