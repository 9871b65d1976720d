"""Stand-in of vllm.renderers.inputs.preprocess (moa_local.gpusim)."""

from moa_local.gpusim.engine import parse_model_prompt

__all__ = ["parse_model_prompt"]
