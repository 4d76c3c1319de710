"""The Responses API's wire types (msgspec), named and shaped as in OpenAI's API reference.

Requests are decoded loosely where OpenAI's unions are wide (input items, content parts, tools, formats): a part
or tool of a kind this server cannot honour gets a 400 that names it (``proxy.responses.serving``), rather than
the decoder's "no union member matched". Unknown fields are accepted and ignored, as on the other endpoints.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from msgspec import UNSET, Meta, Struct, UnsetType, field

from proxy.protocol import FunctionName

# --- the request ---------------------------------------------------------------------------------------------


class ContentPart(Struct):
    """A part of an input message: ``input_text``, or an earlier answer's ``output_text`` or ``refusal``."""

    type: str
    text: str | None = None
    refusal: str | None = None


class InputItem(Struct):
    """One item of ``input``: a message (``type`` may be left out), a ``function_call`` an earlier answer
    made, or a ``function_call_output`` answering one."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None
    id: str | None = None
    status: str | None = None
    call_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None  # a call's and its output's
    name: str | None = None  # a call's function
    arguments: str | None = None  # a call's, JSON
    output: str | list[ContentPart] | None = None  # a call's output
    summary: list[Any] | None = None  # a reasoning item's (an earlier answer's, given back)


class FunctionTool(Struct):
    """A tool in ``tools``: a function (``type: function``); other kinds (built-in tools) are refused."""

    type: str
    name: FunctionName | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceObject(Struct):
    """``tool_choice`` as an object: ``{"type": "function", "name": ...}`` is the kind honoured here."""

    type: str
    name: str | None = None


class TextFormat(Struct):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its name and schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextParam(Struct):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class CreateResponse(Struct):
    model: Annotated[str, Meta(min_length=1)]
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    tools: Annotated[list[FunctionTool], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    seed: int | None = None  # not OpenAI's: reproducible sampling, as on chat completions
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    max_tool_calls: Annotated[int, Meta(ge=1)] | None = None  # bounds built-in tools' calls, of which there are none
    reasoning: ReasoningConfig | None = None
    # OpenAI fields this server cannot honour: accepted by the decoder, refused with a 400 that says so.
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None

    # What the shared sampling path reads that the Responses API does not have.
    n: ClassVar[None] = None
    stop: ClassVar[None] = None
    presence_penalty: ClassVar[None] = None
    frequency_penalty: ClassVar[None] = None


# --- the response --------------------------------------------------------------------------------------------


class TopLogProb(Struct):
    token: str
    logprob: float
    bytes: list[int]


class LogProb(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogProb]


class OutputText(Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = field(default_factory=list)
    logprobs: list[LogProb] = field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(Struct, tag_field="type", tag="message"):
    """An assistant message: an answer's text, or an earlier one given back as input."""

    id: str
    status: ItemStatus
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCall(Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningText(Struct, tag_field="type", tag="reasoning_text"):
    text: str


class ReasoningItem(Struct, tag_field="type", tag="reasoning"):
    """A reasoning model's reasoning, as it wrote it, before the answer's items (no summaries here)."""

    id: str
    status: ItemStatus
    content: list[ReasoningText]
    summary: list[Any] = field(default_factory=list)


OutputItem = OutputMessage | FunctionCall | ReasoningItem


class ToolEcho(Struct, tag_field="type", tag="function"):
    """A function tool as a response repeats it."""

    name: str
    parameters: dict[str, Any] | None
    strict: bool | None
    description: str | None = None


class NamedFunctionChoice(Struct, tag_field="type", tag="function"):
    name: str


class FormatText(Struct, tag_field="type", tag="text"):
    pass


class FormatJSONObject(Struct, tag_field="type", tag="json_object"):
    pass


class FormatJSONSchema(Struct, tag_field="type", tag="json_schema"):
    name: str
    schema: dict[str, Any]
    strict: bool | None = None
    description: str | UnsetType = UNSET


class TextConfig(Struct):
    format: FormatText | FormatJSONObject | FormatJSONSchema = field(default_factory=FormatText)
    verbosity: str = "medium"


class InputTokensDetails(Struct):
    cached_tokens: int = 0  # taken from the engine's cache of an earlier request instead of computed
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = field(default_factory=OutputTokensDetails)


class ResponseError(Struct):
    code: str  # one of OpenAI's ResponseErrorCode values: "server_error" here
    message: str


class IncompleteDetails(Struct):
    reason: Literal["max_output_tokens", "content_filter"]


ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]


class ReasoningConfig(Struct):
    """``reasoning`` of a request and its response: the effort reaches the template as ``reasoning_effort``."""

    effort: str | None = None
    summary: str | None = None


class Response(Struct):
    id: str
    created_at: int
    model: str
    status: ResponseStatus
    output: list[OutputItem]
    instructions: str | None
    tools: list[ToolEcho]
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    metadata: dict[str, str]
    text: TextConfig
    max_output_tokens: int | None
    previous_response_id: str | None
    store: bool
    top_logprobs: int
    truncation: str = "disabled"
    usage: ResponseUsage | UnsetType = UNSET  # once the answer is whole
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    completed_at: int | None = None
    background: bool = False
    reasoning: ReasoningConfig | None = None
    service_tier: str = "default"
    # Required by the Open Responses specification (null allowed): echoed from the request where it has them.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tool_calls: int | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    user: str | UnsetType = UNSET  # a string when the request sent one
    object: Literal["response"] = "response"


class DeletedResponse(Struct):
    id: str
    deleted: bool = True
    object: Literal["response"] = "response"


class ItemList(Struct):
    """A page of a stored response's input items (messages, function calls and their outputs, as sent)."""

    data: list[dict[str, Any]]
    first_id: str
    last_id: str
    has_more: bool
    object: Literal["list"] = "list"


# --- stream events -------------------------------------------------------------------------------------------
# ``sequence_number`` is set as each event is written (``ResponsesService.frame``).


class ResponseEvent(Struct):
    """``response.created``, ``.in_progress``, ``.completed``, ``.incomplete`` and ``.failed``."""

    type: str
    response: Response
    sequence_number: int = 0


class OutputItemEvent(Struct):
    """``response.output_item.added`` and ``.done``."""

    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem
    sequence_number: int = 0


class ContentPartEvent(Struct):
    """``response.content_part.added`` and ``.done``."""

    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int = 0


class OutputTextDeltaEvent(Struct):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[LogProb]
    sequence_number: int = 0
    type: Literal["response.output_text.delta"] = "response.output_text.delta"


class OutputTextDoneEvent(Struct):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[LogProb]
    sequence_number: int = 0
    type: Literal["response.output_text.done"] = "response.output_text.done"


class ReasoningTextDeltaEvent(Struct):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    sequence_number: int = 0
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"


class ReasoningTextDoneEvent(Struct):
    item_id: str
    output_index: int
    content_index: int
    text: str
    sequence_number: int = 0
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"


class FunctionCallArgumentsDeltaEvent(Struct):
    item_id: str
    output_index: int
    delta: str
    sequence_number: int = 0
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"


class FunctionCallArgumentsDoneEvent(Struct):
    item_id: str
    output_index: int
    name: str
    arguments: str
    sequence_number: int = 0
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
