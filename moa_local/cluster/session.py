"""A connection to a Ray cluster and what the cluster holds. Owns ``ray.init`` / ``ray.shutdown`` for moa-local and
the hardware probe (one tiny task per node runs moa-local's own detection there). Never creates engines.

Addresses: ``auto`` (the cluster this machine joined with ``ray start``), ``ray://host:10001`` (Ray Client),
``host:6379`` (a GCS address), ``local`` (a private one-machine cluster, started here and stopped on close). When
this process is already connected (``ray.init`` done by the caller, e.g. a test cluster) the connection is reused
and left open on close. ray is imported lazily: without it, :func:`require_ray` raises MissingDependencyError.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from moa_local.errors import MissingDependencyError, PlacementError

PROBE_TIMEOUT_S = 120.0
"""How long the hardware probe waits for its task on each node."""


def require_ray() -> Any:
    """The ``ray`` module, or MissingDependencyError naming the extra."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", extra="ray", purpose="Running on a Ray cluster (--ray-address)") from None
    return ray


@dataclass
class RaySession:
    """This process's connection to a cluster. ``close()`` disconnects (and stops a ``local`` cluster) only when
    this session made the connection."""

    address: str
    owned: bool
    client: bool = False
    """Connected through Ray Client (ray://): streaming generators are not used there."""

    def close(self) -> None:
        if not self.owned:
            return
        self.owned = False
        ray = require_ray()
        if ray.is_initialized():
            ray.shutdown()


def connect(address: str) -> RaySession:
    """Connect this process to the cluster at ``address`` (see the module docstring)."""
    ray = require_ray()
    if not address:
        raise PlacementError("empty Ray address; use 'auto', 'ray://host:10001', 'host:6379' or 'local'")
    if ray.is_initialized():
        return RaySession(address=address, owned=False, client=_is_client(ray))
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address == "local":
            ray.init(**kwargs)
        else:
            kwargs.pop("include_dashboard")
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PlacementError(
            f"cannot connect to the Ray cluster at '{address}': {exc}. Start one with `ray start --head` (then use "
            "--ray-address auto), or use --ray-address local for a one-machine cluster."
        ) from exc
    return RaySession(address=address, owned=True, client=address.startswith("ray://"))


def _is_client(ray: Any) -> bool:
    try:
        return bool(ray.util.client.ray.is_connected())
    except Exception:  # noqa: BLE001 - an old or new ray without the client module: not a client
        return False


# -- the hardware probe -------------------------------------------------------------------------------------------


def _probe() -> dict[str, Any]:
    """Runs on one node: its host name, boot id, cores, memory and GPUs (moa-local's own detection)."""
    from moa_local.placement.hardware import detect_cpu_cores, detect_cpu_memory, detect_gpus

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # a task without GPUs must still see the node's cards
    cores, ids = detect_cpu_cores()
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return {
        "host": f"{socket.gethostname()}/{boot}",
        "cores": cores,
        "core_ids": ids,
        "memory_bytes": detect_cpu_memory(),
        "gpus": [g.model_dump() for g in detect_gpus()],
    }


@dataclass(frozen=True)
class ClusterHardware:
    """The cluster as the planner sees it, and which Ray node each plan node is."""

    hardware: Any
    """moa_local.placement.Hardware"""
    node_ids: list[str] = field(default_factory=list)
    """Plan node index -> Ray node id."""


def _card_from_resources(resources: dict[str, float]) -> str | None:
    for key in resources:
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    return None


def cluster_hardware(*, timeout_s: float = PROBE_TIMEOUT_S) -> ClusterHardware:
    """Probe every alive node. GPUs: what nvidia-smi reports there, at most the node's Ray ``GPU`` resource (a Ray
    node started with --num-gpus=N offers N); when a node offers GPUs that cannot be probed, its
    ``accelerator_type:*`` resource names the card. CPU-only clusters are planned as one machine with the sum of
    their cores and of their hosts' memory (the engines land wherever Ray finds the cores)."""
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from moa_local.placement.hardware import GpuSpec, Hardware, NodeSpec, card_spec

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    nodes.sort(key=lambda n: (not n.get("Resources", {}).get("node:__internal_head__"), n["NodeID"]))
    if not nodes:
        raise PlacementError("the Ray cluster has no alive nodes")
    probe = ray.remote(num_cpus=0)(_probe)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)).remote()
        for n in nodes
    ]
    try:
        found = ray.get(refs, timeout=timeout_s)
    except Exception as exc:
        raise PlacementError(f"could not probe the Ray cluster's nodes within {timeout_s:.0f} s: {exc}") from exc

    specs: list[NodeSpec] = []
    for node, info in zip(nodes, found, strict=True):
        offered = int(node["Resources"].get("GPU", 0))
        gpus = [GpuSpec.model_validate(g) for g in info["gpus"]][:offered]
        if len(gpus) < offered:
            card = _card_from_resources(node["Resources"])
            if card is None:
                raise PlacementError(
                    f"Ray node {node['NodeID'][:12]} ({node.get('NodeManagerAddress')}) offers {offered} GPUs but "
                    f"nvidia-smi there shows {len(gpus)}; start it with the right --num-gpus"
                )
            gpus += [card_spec(card)] * (offered - len(gpus))
        specs.append(NodeSpec(gpus=gpus))

    cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes]
    if any(s.gpus for s in specs):
        with_gpus = [i for i, s in enumerate(specs) if s.gpus]
        memory = min(found[i]["memory_bytes"] for i in with_gpus)
        cores = max(1, min(cpus[i] for i in with_gpus))
        core_ids = None
    else:
        hosts: dict[str, int] = {}
        for info in found:
            hosts[info["host"]] = max(hosts.get(info["host"], 0), info["memory_bytes"])
        memory = sum(hosts.values())
        cores = max(1, sum(cpus))
        one_host = len(hosts) == 1 and cores <= len(found[0]["core_ids"])
        core_ids = sorted(found[0]["core_ids"])[:cores] if one_host else None
    hardware = Hardware(nodes=specs, cpu_memory_bytes=memory, cpu_cores=cores, cpu_core_ids=core_ids)
    return ClusterHardware(hardware=hardware, node_ids=[n["NodeID"] for n in nodes])
