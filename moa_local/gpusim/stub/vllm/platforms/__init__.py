"""Stand-in of vllm.platforms (moa_local.gpusim): a CUDA platform."""

from moa_local.gpusim.engine import current_platform

__all__ = ["current_platform"]
