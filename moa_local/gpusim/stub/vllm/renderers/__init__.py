"""Stand-in of vllm.renderers (moa_local.gpusim)."""
