"""The OpenAI chat-completions wire format: request body, responses, stream chunks and the error shape, as closed
pydantic models. Pure data: never touches HTTP, engines or the pipeline.

The request accepts the usual OpenAI fields, strictly typed (``"stream": "yes"`` or ``"max_tokens": "64"`` are
400s, not guesses); anything else is a 400 (``extra="forbid"``), so a client never believes an option took effect
when it did not. Options this server does not implement are accepted only at the value that changes nothing, the
value common clients send by default (``logprobs: false``, ``presence_penalty: 0``, ``response_format: {type:
text}``, ``tool_choice: "none"``, an assistant ``content: null``, ...). ``moa_trace`` and ``moa_events`` are this
server's extensions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# -- request ------------------------------------------------------------------------------------------------------


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Closed):
    """One part of a multi-part message content; only text parts are supported."""

    type: Literal["text"] = Field(description="Only 'text' parts are supported.")
    text: str = Field(description="The text of this part.")


class ChatMessage(_Closed):
    """One message of the conversation."""

    role: Literal["system", "developer", "user", "assistant"] = Field(description="'developer' is read as 'system'.")
    content: str | list[TextPart] | None = Field(
        description="The text, or a list of text parts that are joined; null only for an assistant turn (read as '').")
    name: str | None = Field(None, description="Accepted and ignored.")
    tool_calls: list[Any] | None = Field(None, description="Only an empty list or null: tools are not supported.")
    refusal: str | None = Field(None, description="Accepted and ignored (assistant turns echoed back by clients).")

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content of a {self.role} message must be a string or a list of text parts, not null")
        if self.tool_calls:
            raise ValueError("tool_calls are not supported by this server")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Closed):
    include_usage: bool = Field(False, description="Send a last chunk with the usage before [DONE].")


class ChatCompletionRequest(_Closed):
    """POST /v1/chat/completions."""

    model: str = Field(description="The recipe name (the MoA pipeline) or the id of one loaded model (that model alone).")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation; it must end with a user message.")
    max_tokens: int | None = Field(None, gt=0, le=131072, description="Most tokens of the answer.")
    max_completion_tokens: int | None = Field(None, gt=0, le=131072, description="Alias of max_tokens.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; MoA: applies to every role.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass; MoA: applies to every role.")
    seed: int | None = Field(None, description="Sampling seed; MoA: every role (Self-MoA samples stay distinct).")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings; MoA: the aggregator's answer only.")
    stream: bool = Field(False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true.")
    n: int = Field(1, description="Only one choice is supported.")
    user: str | None = Field(None, description="Accepted and ignored.")
    # Options this server does not implement, accepted only at their no-op value (what clients send by default).
    logprobs: bool | None = Field(None, description="Only false: log probabilities are not returned.")
    top_logprobs: int | None = Field(None, description="Only 0.")
    presence_penalty: float | None = Field(None, description="Only 0.")
    frequency_penalty: float | None = Field(None, description="Only 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Only an empty object.")
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')
    tools: list[Any] | None = Field(None, description="Only an empty list.")
    tool_choice: str | None = Field(None, description='Only "none".')
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Only false: nothing is stored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    moa_trace: bool = Field(False, description="Extension: add every proposer's answer (the trace) to the response.")
    moa_events: bool = Field(False, description="Extension (with stream=true): also stream every role's events "
                             "(data lines with \"object\": \"moa.event\"), so a client can show each layer live.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop strings are supported")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _no_ops(self) -> ChatCompletionRequest:
        if self.n != 1 or isinstance(self.n, bool):
            raise ValueError("n: only 1 choice is supported")
        unsupported = {
            "logprobs": self.logprobs not in (None, False),
            "top_logprobs": self.top_logprobs not in (None, 0),
            "presence_penalty": self.presence_penalty not in (None, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "logit_bias": bool(self.logit_bias),
            "response_format": self.response_format not in (None, {"type": "text"}),
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none"),
            "store": self.store not in (None, False),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not supported by this server; leave it out or send its default "
                             "(logprobs false, penalties 0, response_format text, no tools, tool_choice none)")
        return self

    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# -- responses ----------------------------------------------------------------------------------------------------


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(0, description="MoA: tokens the proposers wrote (hidden work, like reasoning).")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    moa_trace: dict[str, Any] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    moa_trace: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moa-local"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    """The OpenAI error shape: ``{"error": {"message", "type", "code"}}``."""

    error: ErrorDetail
