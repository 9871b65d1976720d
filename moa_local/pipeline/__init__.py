"""The MoA pipeline: layers, reference injection, failure policy, traces, and the scheduler that feeds the engines.
Knows engines only by their interface (a Runner), never which backend or where they live."""

from moa_local.engines.base import Runner
from moa_local.pipeline.moa import LayerRunner, MoAPipeline, Streamed, failure_error
from moa_local.pipeline.scheduler import (
           Conversation,
           FlowScheduler,
           Listener,
           RoleEvent,
           Schedule,
           StageScheduler,
)
from moa_local.pipeline.trace import LayerTrace, Response, Result

__all__ = ["Conversation", "FlowScheduler", "LayerRunner", "LayerTrace", "Listener", "MoAPipeline", "Response",
           "Result", "RoleEvent", "Runner", "Schedule", "StageScheduler", "Streamed", "failure_error"]
