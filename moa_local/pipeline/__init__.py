"""The MoA pipeline: layers, reference injection, failure policy, traces. Knows engines only by their interface
(through a LayerRunner), never which backend or where they live."""

from moa_local.pipeline.moa import Conversation, LayerRunner, MoAPipeline, Progress
from moa_local.pipeline.trace import LayerTrace, Response, Result

__all__ = ["Conversation", "LayerRunner", "LayerTrace", "MoAPipeline", "Progress", "Response", "Result"]
