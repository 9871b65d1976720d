"""Stand-in of vllm.renderers.inputs (moa_local.gpusim)."""
