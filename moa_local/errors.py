"""The one exception tree of moa-local. Every error a user can cause or meet lives here.

    MoaError                      base; its message says what went wrong *and how to fix it*
    ├── ConfigError               a recipe or model config is malformed or names something unknown
    │   ├── RecipeError
    │   └── ModelConfigError
    ├── ModelNotFoundError        weights missing on disk (run `moa-local models prepare`)
    ├── InputError                a batch input line, prompt or request body is invalid
    │   └── PromptTooLongError    the rendered prompt does not fit the model's context
    ├── PlacementError            the recipe does not fit the hardware (raised before anything loads)
    ├── EngineError               an engine could not start, died or answered garbage
    │   ├── EngineStartError
    │   └── EngineDiedError
    ├── ConversationFailed        too few proposers answered (the failure policy said stop)
    ├── ServerBusy                the server's request queue is full (HTTP 429)
    └── MissingDependencyError    an optional package is not installed (names the extra)

The CLI prints ``str(error)`` on one line and exits with ``exit_code``; tracebacks only with ``--debug``.
This module imports nothing heavy and knows nothing about engines or the CLI.
"""

from __future__ import annotations


class MoaError(Exception):
    """Base of every moa-local error."""

    exit_code: int = 1


class ConfigError(MoaError):
    """A recipe or model config is malformed or refers to something unknown."""

    exit_code = 2


class RecipeError(ConfigError):
    """A recipe is malformed, unknown, or names an unknown model."""


class ModelConfigError(ConfigError):
    """A model config YAML is malformed or missing."""


class ModelNotFoundError(MoaError):
    """A model's weights are not on disk."""

    exit_code = 3


class InputError(MoaError):
    """User input (a prompt, a batch line, a request body) is invalid."""

    exit_code = 2


class PromptTooLongError(InputError):
    """A rendered prompt plus max_tokens does not fit the model's context window."""


class PlacementError(MoaError):
    """The recipe does not fit the hardware. Raised by the planner before anything loads."""

    exit_code = 4


class EngineError(MoaError):
    """An engine failed."""

    exit_code = 5


class EngineStartError(EngineError):
    """An engine could not start (bad options, out of memory, missing package)."""


class EngineDiedError(EngineError):
    """An engine's worker died or stopped answering while requests were in flight."""


class ConversationFailed(MoaError):
    """Fewer proposers than ``min_proposers`` answered a layer of one conversation."""


class ServerBusy(MoaError):
    """The server's request queue is full; the client should retry later (HTTP 429)."""


class MissingDependencyError(MoaError):
    """An optional dependency is missing; the message names the extra to install."""

    exit_code = 3

    def __init__(self, package: str, *, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'moa-local[{extra}]'"
        )
        self.package = package
        self.extra = extra
