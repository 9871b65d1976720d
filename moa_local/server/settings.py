"""Settings of the OpenAI-compatible server: where it listens, who may call it, how it gathers requests.
Pure data (pydantic, closed); the CLI's `serve` options and their help come from these fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ServerSettings(BaseModel):
    """How `moa-local serve` listens and batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to bind; loopback unless you mean to expose the server.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_key: str | None = Field(
        None, repr=False, description="Require 'Authorization: Bearer <key>' on /v1/* (or set MOA_LOCAL_API_KEY)."
    )
    window: int | None = Field(
        None, ge=1, le=65536,
        description="Conversations running at once (each enters the scheduler as it arrives); default: from the "
        "engines' capacity.")
    max_queue: int = Field(256, ge=0, le=1_000_000, description="Requests that may wait beyond the window; more are refused with 429.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond).")

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("an empty or blank API key would let anyone in: give a real key, or leave --api-key and "
                             "MOA_LOCAL_API_KEY unset")
        if value != value.strip() or not all(33 <= ord(c) < 127 for c in value):
            raise ValueError("the API key must be printable ASCII without spaces (what an HTTP header can carry)")
        return value
