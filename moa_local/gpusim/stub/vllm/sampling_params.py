"""Stand-in of vllm.sampling_params (moa_local.gpusim)."""

from moa_local.gpusim.engine import RequestOutputKind, SamplingParams

__all__ = ["RequestOutputKind", "SamplingParams"]
