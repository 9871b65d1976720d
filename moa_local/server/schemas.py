"""The OpenAI chat-completions wire format: request body, responses, stream chunks and the error shape, as closed
pydantic models. Pure data: never touches HTTP, engines or the pipeline.

The request accepts the usual OpenAI fields; anything else is a 400 (``extra="forbid"``), so a client never
believes an option took effect when it did not. ``moa_trace`` is this server's one extension.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# -- request ------------------------------------------------------------------------------------------------------


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Closed):
    """One part of a multi-part message content; only text parts are supported."""

    type: Literal["text"] = Field(description="Only 'text' parts are supported.")
    text: str = Field(description="The text of this part.")


class ChatMessage(_Closed):
    """One message of the conversation."""

    role: Literal["system", "developer", "user", "assistant"] = Field(description="'developer' is read as 'system'.")
    content: str | list[TextPart] = Field(description="The text, or a list of text parts that are joined.")
    name: str | None = Field(None, description="Accepted and ignored.")

    def text(self) -> str:
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
    n: Literal[1] = Field(1, description="Only one choice is supported.")
    user: str | None = Field(None, description="Accepted and ignored.")
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
