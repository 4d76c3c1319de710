"""OpenAI wire types (msgspec), named and shaped as in OpenAI's API reference.

Unknown request fields are accepted and ignored, as OpenAI-compatible clients
send extras (clembench sends ``chat_template_kwargs``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ContentPart(Struct):
    type: str
    text: str | None = None


class FunctionCall(Struct):
    name: Annotated[str, Meta(min_length=1)]
    arguments: str  # JSON, as the model wrote it


class ToolCall(Struct):
    """A call an assistant made, as OpenAI returns it and as clients send it back in the history."""

    id: Annotated[str, Meta(min_length=1)]
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Struct):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool message's: the call it answers
    reasoning_content: str | None = None  # an assistant's reasoning, sent back in the history
    reasoning: str | None = None  # the same, under vLLM's newer name


FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(Struct):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema of the arguments; none: no arguments
    strict: bool | None = None


class Tool(Struct):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(Struct):
    name: Annotated[str, Meta(min_length=1)]


class NamedToolChoice(Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class ResponseFormatText(Struct, tag_field="type", tag="text"):
    pass


class ResponseFormatJSONObject(Struct, tag_field="type", tag="json_object"):
    pass


class JSONSchemaFormat(Struct):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    schema: dict[str, Any] | None = None  # none: any JSON object
    description: str | None = None
    strict: bool | None = None


class ResponseFormatJSONSchema(Struct, tag_field="type", tag="json_schema"):
    json_schema: JSONSchemaFormat


ResponseFormat = ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema


class StreamOptions(Struct):
    include_usage: bool = False


class ChatCompletionRequest(Struct):
    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    seed: int | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None  # the template's reasoning_effort (gpt-oss: "low", "medium", "high")
    # "none": the raw text in content, reasoning and markers included (llama-server's --reasoning-format none);
    # anything else: reasoning apart, in reasoning_content
    reasoning_format: str | None = None
    # Tokens of reasoning at most, then the reasoning ends and the answer follows (llama-server's
    # --reasoning-budget; vLLM's thinking_token_budget is the same)
    reasoning_budget: Annotated[int, Meta(ge=0)] | None = None
    thinking_token_budget: Annotated[int, Meta(ge=0)] | None = None
    # OpenAI fields this server cannot honour: accepted by the decoder, refused with a 400 that says so.
    functions: Any = None
    function_call: Any = None
    logit_bias: dict[str, float] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None


class CompletionRequest(Struct):
    """The legacy ``/v1/completions`` request: a raw prompt, no chat template."""

    model: Annotated[str, Meta(min_length=1)]
    prompt: Annotated[str, Meta(min_length=1)] | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=0)] | None = 16  # OpenAI's default for this endpoint
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool = False
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    seed: int | None = None
    user: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=20)] | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


class PromptTokensDetails(Struct):
    cached_tokens: int = 0  # of the prompt, taken from the cache of an earlier request instead of computed


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = field(default_factory=PromptTokensDetails)


class ChatCompletionMessage(Struct):
    content: str | None
    role: Literal["assistant"] = "assistant"
    refusal: str | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET  # when the model called tools
    annotations: list[Any] = field(default_factory=list)  # OpenAI's (web search citations): never any here
    # A reasoning model's reasoning, apart from the answer (llama-server's and vLLM's field, and vLLM's newer name).
    reasoning_content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Choice(Struct):
    index: int
    message: ChatCompletionMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str
    object: Literal["chat.completion"] = "chat.completion"


class FunctionCallDelta(Struct):
    name: str | UnsetType = UNSET  # in a call's first chunk
    arguments: str | UnsetType = UNSET  # a piece of the arguments; "" in the first chunk


class ToolCallDelta(Struct):
    index: int
    id: str | UnsetType = UNSET  # in a call's first chunk, with its type and name
    type: Literal["function"] | UnsetType = UNSET
    function: FunctionCallDelta | UnsetType = UNSET


class Delta(Struct):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET


class ChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | UnsetType = UNSET  # only on the last chunk, when stream_options.include_usage asks


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str
    object: Literal["text_completion"] = "text_completion"
    usage: Usage | UnsetType = UNSET  # on every whole response; on a stream's last chunk with include_usage


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str
    object: Literal["model"] = "model"
    # What the registry entry says about the model (clembench's descriptive keys); OpenAI clients ignore them.
    release_date: Any | UnsetType = UNSET
    open_weight: Any | UnsetType = UNSET
    parameters: Any | UnsetType = UNSET
    languages: Any | UnsetType = UNSET
    license: Any | UnsetType = UNSET
    context_size: Any | UnsetType = UNSET


class ModelList(Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Struct):
    error: ErrorDetail


class HealthStatus(Struct):
    status: str
    models_in_registry: int
    models_loaded: int
    loaded: list[str] = field(default_factory=list)


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)
