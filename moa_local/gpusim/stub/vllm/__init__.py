"""Stand-in ``vllm`` of the simulated GPU server (moa_local.gpusim); never the real engine."""

from moa_local.gpusim.engine import LLM, SamplingParams

__version__ = "0.32.0+gpusim"
__all__ = ["LLM", "SamplingParams"]
