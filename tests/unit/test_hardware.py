"""Hardware specs: the --gpus/--nodes/--cpu-memory grammars, the card catalog and local detection (faked)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from moa_local.errors import InputError
from moa_local.placement import hardware as hw
from moa_local.placement.hardware import (
    CARD_CATALOG_MIB,
    GIB,
    MIB,
    Hardware,
    NodeSpec,
    build_hardware,
    card_spec,
    detect_cpu_cores,
    detect_cpu_memory,
    detect_gpus,
    detect_hardware,
    parse_gpus,
    parse_memory,
    parse_nodes,
)


def test_catalog_has_the_common_cards_in_nvidia_smi_mib() -> None:
    for name in ("A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L40S-48GB", "RTX4090-24GB",
                 "RTX3090-24GB", "A10-24GB", "L4-24GB", "A6000-48GB", "V100-32GB"):  # fmt: skip
        assert name in CARD_CATALOG_MIB
    assert card_spec("H100-80GB").memory_gib == pytest.approx(79.65, abs=0.01)


@pytest.mark.parametrize(
    ("text", "count", "name", "gib"),
    [
        ("8xH100-80GB", 8, "H100-80GB", 79.65),
        ("H100", 1, "H100-80GB", 79.65),
        ("h100-80gb", 1, "H100-80GB", 79.65),
        ("2x24GiB", 2, "24GiB", 24.0),
        ("4 x RTX4090", 4, "RTX4090-24GB", 23.99),
        ("1xA100-80GB", 1, "A100-80GB", 80.0),
        ("3*L4", 3, "L4-24GB", 22.49),
    ],
)
def test_parse_gpus_forms(text: str, count: int, name: str, gib: float) -> None:
    gpus = parse_gpus(text)
    assert len(gpus) == count
    assert {g.name for g in gpus} == {name}
    assert gpus[0].memory_gib == pytest.approx(gib, abs=0.01)


def test_parse_gpus_mixed_and_none() -> None:
    gpus = parse_gpus("1xH100-80GB,2xRTX4090-24GB")
    assert [g.name for g in gpus] == ["H100-80GB", "RTX4090-24GB", "RTX4090-24GB"]
    assert parse_gpus("none") == [] and parse_gpus("0") == []
    assert parse_gpus("2x80GB")[0].memory_bytes == 80 * 1000**3


@pytest.mark.parametrize("bad", ["8xH1000", "x", "2x", "0xH100", "8xH100-80GB,,", "H100:8", "-1xH100"])
def test_bad_gpu_strings_show_the_accepted_forms(bad: str) -> None:
    with pytest.raises(InputError, match="Accepted forms") as err:
        parse_gpus(bad)
    assert "8xH100-80GB" in str(err.value)


def test_ambiguous_cards_name_both_options() -> None:
    with pytest.raises(InputError, match="A100-40GB or A100-80GB"):
        parse_gpus("4xA100")


def test_parse_nodes() -> None:
    nodes = parse_nodes("2x8xH100-80GB")
    assert len(nodes) == 2 and all(len(n.gpus) == 8 for n in nodes)
    mixed = parse_nodes("1x8xH100-80GB,1x4xA100-80GB")
    assert [len(n.gpus) for n in mixed] == [8, 4]
    assert mixed[1].gpus[0].name == "A100-80GB"
    for bad in ("8xH100", "2x8x", "0x8xH100", "two"):
        with pytest.raises(InputError, match="--nodes"):
            parse_nodes(bad)


@pytest.mark.parametrize(
    ("text", "n_bytes"),
    [("24GiB", 24 * GIB), ("24G", 24 * GIB), ("64GB", 64 * 1000**3), ("512MiB", 512 * MIB), ("1.5TiB", 1536 * GIB),
     ("16", 16 * GIB)],
)  # fmt: skip
def test_parse_memory(text: str, n_bytes: int) -> None:
    assert parse_memory(text) == n_bytes


@pytest.mark.parametrize("bad", ["lots", "24 parsecs", "", "0GiB", "-3GiB"])
def test_bad_memory_strings_raise(bad: str) -> None:
    with pytest.raises(InputError):
        parse_memory(bad)


def test_slots_number_gpus_globally_across_nodes() -> None:
    hardware = Hardware(nodes=parse_nodes("2x2x24GiB"), cpu_memory_bytes=64 * GIB, cpu_cores=4)
    slots = hardware.slots()
    assert [(s.index, s.node, s.local_index) for s in slots] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert hardware.has_gpus and "node 1" in hardware.describe()
    assert not Hardware(cpu_memory_bytes=GIB, cpu_cores=1).has_gpus


def test_build_hardware_from_cli_strings_without_detection() -> None:
    h = build_hardware(gpus="2xRTX4090", cpu_memory="128GiB", cpu_cores=16, detect=False)
    assert len(h.slots()) == 2 and h.cpu_memory_bytes == 128 * GIB and h.core_ids() == list(range(16))
    n = build_hardware(nodes="2x8xH100-80GB", detect=False)
    assert len(n.nodes) == 2 and len(n.slots()) == 16
    with pytest.raises(InputError, match="not both"):
        build_hardware(gpus="H100", nodes="2x8xH100-80GB", detect=False)


def _fake_smi(output: str) -> Any:
    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert cmd[0] == "nvidia-smi" and "--format=csv,noheader,nounits" in cmd
        return subprocess.CompletedProcess(cmd, 0, stdout=output, stderr="")

    return run


SMI = "0, GPU-aaa, NVIDIA H100 80GB HBM3, 81559\n1, GPU-bbb, NVIDIA H100 80GB HBM3, 81559\n"


def test_detect_gpus_reads_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hw.subprocess, "run", _fake_smi(SMI))
    gpus = detect_gpus()
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert gpus[0].memory_bytes == CARD_CATALOG_MIB["H100-80GB"] * MIB  # detected and catalog agree


def test_detect_gpus_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hw.subprocess, "run", _fake_smi(SMI))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert len(detect_gpus()) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb")
    assert len(detect_gpus()) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []


def test_detect_gpus_tolerates_a_missing_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: Any, **kwargs: Any) -> None:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(hw.subprocess, "run", missing)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert detect_gpus() == []


def test_detect_gpus_uses_torch_only_when_already_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    class Props:
        total_memory = 24 * GIB

    class Cuda:
        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def device_count() -> int:
            return 1

        @staticmethod
        def get_device_name(i: int) -> str:
            return "Fake GPU"

        @staticmethod
        def get_device_properties(i: int) -> Props:
            return Props()

    class FakeTorch:
        cuda = Cuda()

    monkeypatch.setattr(hw.subprocess, "run", _fake_smi(""))
    monkeypatch.setitem(sys.modules, "torch", FakeTorch())
    assert [(g.name, g.memory_bytes) for g in detect_gpus()] == [("Fake GPU", 24 * GIB)]


def test_local_detection_returns_a_valid_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hw.subprocess, "run", _fake_smi(""))
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert detect_cpu_memory() > 256 * MIB
    cores, ids = detect_cpu_cores()
    assert cores >= 1 and len(ids) == cores
    h = detect_hardware()
    assert h.nodes == [NodeSpec()] and h.cpu_cores == cores
