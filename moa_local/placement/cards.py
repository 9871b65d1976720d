"""GPU card performance: memory bandwidth and dense tensor-core compute per card, with their sources. Pure data.

Owns the numbers the throughput model (throughput.py) needs per card: HBM/GDDR bandwidth, dense bf16 (fp16 where
the card has no bf16) and dense fp8 compute, and vLLM's default cap on running sequences for the card. Datasheets
quote tensor throughput "with sparsity"; every figure here is the dense one (half of it). Memory sizes stay in
hardware.py's catalog, which this module never edits; it only matches the names hardware.py produces (catalog keys)
or ``nvidia-smi`` reports ("NVIDIA H100 80GB HBM3"). Never imports torch, never places anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from moa_local.placement.hardware import GIB, GpuSpec

TB = 1e12
"""Bytes or FLOP per second in a TB/s or TFLOPS (powers of 1000, as datasheets count)."""


@dataclass(frozen=True)
class CardPerf:
    """What one GPU can do at most: the roofline's two ceilings."""

    name: str
    memory_bandwidth: float
    """Bytes per second (datasheet peak)."""
    bf16_flops: float
    """Dense bf16 tensor FLOP/s (fp16 for cards without bf16: V100, T4)."""
    fp8_flops: float | None
    """Dense fp8 tensor FLOP/s; None when the card has no fp8 tensor cores (Ampere and older: vLLM then runs fp8
    checkpoints through weight-only kernels, so compute stays at the bf16 rate)."""
    source: str
    """Where the numbers come from."""

    def flops(self, *, fp8: bool) -> float:
        """Dense tensor throughput for fp8 weights and activations (W8A8) or else bf16."""
        return self.fp8_flops if fp8 and self.fp8_flops else self.bf16_flops


_H100 = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), dense = sparse / 2"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), dense figures"
_ADA = "NVIDIA Ada GPU architecture whitepaper, appendix (GeForce RTX 4090: FP32-accumulate tensor rates)"

CARD_PERF: dict[str, CardPerf] = {
    "H100-80GB": CardPerf("H100-80GB (SXM5)", 3.35 * TB, 989.4 * TB, 1978.9 * TB, _H100),
    "H100-PCIE": CardPerf("H100 PCIe 80GB", 2.0 * TB, 756.0 * TB, 1513.0 * TB, _H100),
    "H100-94GB": CardPerf("H100 NVL 94GB", 3.9 * TB, 835.5 * TB, 1670.5 * TB, _H100),
    "H200-141GB": CardPerf("H200 SXM 141GB", 4.8 * TB, 989.4 * TB, 1978.9 * TB,
                           "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200), dense = sparse / 2"),
    "A100-80GB": CardPerf("A100-80GB (SXM4)", 2.039 * TB, 312.0 * TB, None, _A100),
    "A100-80GB-PCIE": CardPerf("A100 80GB PCIe", 1.935 * TB, 312.0 * TB, None, _A100),
    "A100-40GB": CardPerf("A100-40GB (SXM4)", 1.555 * TB, 312.0 * TB, None, _A100),
    "L40S-48GB": CardPerf("L40S", 0.864 * TB, 362.05 * TB, 733.0 * TB,
                          "NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s), dense figures"),
    "A40-48GB": CardPerf("A40", 0.696 * TB, 149.7 * TB, None, "NVIDIA A40 datasheet, dense = sparse / 2"),
    "A6000-48GB": CardPerf("RTX A6000", 0.768 * TB, 154.8 * TB, None, "NVIDIA RTX A6000 datasheet, dense = sparse / 2"),
    "RTX6000ADA-48GB": CardPerf("RTX 6000 Ada", 0.96 * TB, 364.2 * TB, 728.5 * TB,
                                "NVIDIA RTX 6000 Ada datasheet (FP8 1,457 TFLOPS with sparsity), dense = sparse / 2"),
    "RTX4090-24GB": CardPerf("GeForce RTX 4090", 1.008 * TB, 165.2 * TB, 330.3 * TB, _ADA),
    "RTX3090-24GB": CardPerf("GeForce RTX 3090", 0.936 * TB, 71.0 * TB, None,
                             "NVIDIA Ampere GA102 whitepaper (FP32-accumulate tensor rate)"),
    "A10-24GB": CardPerf("A10", 0.6 * TB, 125.0 * TB, None, "NVIDIA A10 datasheet, dense = sparse / 2"),
    "L4-24GB": CardPerf("L4", 0.3 * TB, 121.0 * TB, 242.5 * TB, "NVIDIA L4 datasheet, dense = sparse / 2"),
    "V100-16GB": CardPerf("V100 SXM2 16GB", 0.9 * TB, 125.0 * TB, None, "NVIDIA V100 datasheet (SXM2, fp16 tensor)"),
    "V100-32GB": CardPerf("V100 SXM2 32GB", 0.9 * TB, 125.0 * TB, None, "NVIDIA V100 datasheet (SXM2, fp16 tensor)"),
    "T4-16GB": CardPerf("T4", 0.32 * TB, 65.0 * TB, None, "NVIDIA T4 datasheet (fp16 tensor)"),
}
"""Per card (hardware.py catalog names, plus PCIe variants that only detection produces)."""

_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("H100", "PCIE"), "H100-PCIE"),
    (("H100", "NVL"), "H100-94GB"),
    (("H100", "94GB"), "H100-94GB"),
    (("H100",), "H100-80GB"),
    (("H200",), "H200-141GB"),
    (("A100", "PCIE"), "A100-80GB-PCIE"),
    (("A100", "40GB"), "A100-40GB"),
    (("A100",), "A100-80GB"),
    (("L40S",), "L40S-48GB"),
    (("A40",), "A40-48GB"),
    (("6000", "ADA"), "RTX6000ADA-48GB"),
    (("A6000",), "A6000-48GB"),
    (("4090",), "RTX4090-24GB"),
    (("3090",), "RTX3090-24GB"),
    (("L4",), "L4-24GB"),
    (("A10",), "A10-24GB"),
    (("V100", "32GB"), "V100-32GB"),
    (("V100",), "V100-16GB"),
    (("T4",), "T4-16GB"),
)


def card_perf(gpu: GpuSpec) -> CardPerf | None:
    """The performance entry of a catalog or detected card; None for cards known only by size ('24GiB')."""
    key = gpu.name.upper().replace(" ", "").replace("_", "-")
    if key in CARD_PERF:
        return CARD_PERF[key]
    flat = key.replace("-", "")
    for needles, name in _PATTERNS:
        if all(n in flat for n in needles):
            if name == "A100-80GB" and gpu.memory_bytes < 60 * GIB:  # an A100 named without its size
                return CARD_PERF["A100-40GB"]
            return CARD_PERF[name]
    return None


def vllm_max_num_seqs(gpu: GpuSpec) -> int:
    """vLLM's default cap on running sequences for an offline ``LLM`` on this card: 1024 on cards of 70 GiB or
    more other than A100 (H100, H200), else 256 (vllm/engine/arg_utils.py, ``_get_default_max_num_seqs...``)."""
    if gpu.memory_bytes >= 70 * GIB and "A100" not in gpu.name.upper():
        return 1024
    return 256
