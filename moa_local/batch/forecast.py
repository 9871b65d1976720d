"""The forecast of a batch job on the engines that run it: what `run --input` prints before the job starts, and sets
beside the measured wall time at the end.

Made in two halves so that it never delays the job: ``start_forecast`` counts the job's prompt tokens (one streaming
pass over the input and a tokenized sample, placement/workload.py; loading a tokenizer takes a second or two) in a
background thread while the engines load, and ``PendingForecast.finish`` plays the job on the plan the engines were
started with, under the window and schedule the run uses (placement/forecast.py; a fraction of a second). Never
raises: a job that cannot be forecast (the fake backend, engines on a Ray cluster, a CPU without calibration, a card
without throughput data) gets a one-line reason instead. Never prints, never starts an engine.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa_local.config.recipe import Recipe
from moa_local.errors import MoaError
from moa_local.placement.forecast import Forecast

READY_TIMEOUT_S = 2.0
"""How long ``finish`` waits for the token count once the engines are up; past it the job starts unforecast."""


@dataclass(frozen=True)
class BatchForecast:
    """The forecast of the job (``forecast``) or why there is none (``reason``); an uncalibrated CPU has both: the
    token counts without times, and the reason."""

    forecast: Forecast | None
    reason: str | None = None

    @property
    def run_s(self) -> float | None:
        """The forecast of the job's ``wall_s`` (engines up to last record written), or None."""
        return self.forecast.run_s if self.forecast is not None else None


class PendingForecast:
    """A forecast whose token counting runs while the engines load."""

    def __init__(self, recipe: Recipe, input: Path, *, conversations: int, backend: str,
                 hardware: Callable[[], Any] | None = None) -> None:
        self.recipe = recipe
        self.conversations = conversations
        self.reason: str | None = None
        self._result: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        if conversations < 1:
            self.reason = "nothing left to run"
        elif backend == "fake":
            self.reason = "the fake backend has no speed model"
        else:
            self._thread = threading.Thread(target=self._count, args=(input, hardware), name="forecast-workload",
                                            daemon=True)
            self._thread.start()

    def _count(self, input: Path, hardware: Callable[[], Any] | None) -> None:
        from moa_local.placement.workload import build_workload

        try:
            self._result["workload"] = build_workload(self.recipe, prompts=self.conversations, input=input)
            if hardware is not None:
                self._result["hardware"] = hardware()
        except MoaError as exc:
            self._result["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a forecast never breaks a run: the reason is printed instead
            self._result["error"] = f"{type(exc).__name__}: {exc}"

    def finish(self, moa: Any, *, timeout: float = READY_TIMEOUT_S) -> BatchForecast:
        """The forecast on ``moa``'s plan (an api.MoA, engines up), with its recipe (sampling overrides applied),
        schedule and window. Waits at most ``timeout`` seconds for the token count."""
        if self.reason is not None:
            return BatchForecast(None, self.reason)
        plan = getattr(moa, "plan", None)
        if plan is None:
            return BatchForecast(None, "the engines run on a Ray cluster, which has no plan to forecast on")
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return BatchForecast(None, f"the prompts were still being counted {timeout:g} s after the engines were up")
        if "error" in self._result:
            return BatchForecast(None, self._result["error"])
        try:
            return self._play(moa, plan)
        except MoaError as exc:
            return BatchForecast(None, str(exc))
        except Exception as exc:  # noqa: BLE001 - a forecast never breaks a run: the reason is printed instead
            return BatchForecast(None, f"{type(exc).__name__}: {exc}")

    def _play(self, moa: Any, plan: Any) -> BatchForecast:
        from moa_local.placement.calibration import load_calibration
        from moa_local.placement.forecast import forecast
        from moa_local.placement.workload import bound_outputs

        recipe: Recipe = moa.recipe
        pipeline = moa.pipeline
        # the outputs at the bound of the recipe as loaded (--max-tokens applies to every role)
        workload = dataclasses.replace(self._result["workload"], outputs=bound_outputs(recipe))
        fc = forecast(recipe, plan, workload, hardware=self._result.get("hardware"),
                      calibration=load_calibration() if plan.device == "cpu" else None,
                      schedule=pipeline.schedule, window=pipeline.window)
        if fc.run_s is None:
            return BatchForecast(fc, fc.notes[0] if fc.notes else "no engine speed is known")
        return BatchForecast(fc)


def start_forecast(recipe: Recipe, input: Path, *, conversations: int, backend: str,
                   hardware: Callable[[], Any] | None = None) -> PendingForecast:
    """Start counting the prompt tokens of ``conversations`` records of ``input`` for ``recipe`` (see the module
    doc). ``backend``: as the run resolves it (fake: no forecast); ``hardware``: builds the Hardware the engines are
    planned on (GPU plans read their cards from it)."""
    return PendingForecast(recipe, input, conversations=conversations, backend=backend, hardware=hardware)
