"""GPU utilization on a swarm: each node's GPUs, read from NVIDIA's dcgm-exporter, for the GPU
metrics and GPU-aware idle culling of the conda-swarm spawner.

On one host the hub reads NVML itself (gpus.py). On a swarm the GPUs are on the nodes, so
the hub scrapes what runs there: **dcgm-exporter** (NVIDIA's Prometheus exporter of DCGM,
the usual way sites already watch their GPUs; as a global Swarm service it is one per node).
Chosen over a service of our own that would read NVML on each node: nothing of ours has to
run on the nodes, and sites that monitor GPUs run it already. Each sample the hub reads, from
every ready node with GPUs, ``GET http://<node address>:9400/metrics``
(``CondaSwarmSpawner.gpu_metrics_url``) and takes, per GPU UUID, ``DCGM_FI_DEV_GPU_UTIL``
(percent), ``DCGM_FI_DEV_FB_USED`` and ``DCGM_FI_DEV_FB_FREE`` (MiB in use, and free: their sum
is the GPU's memory; both are among the exporter's default counters). Swarm's GPU ids are the UUIDs the nodes
declare (``NVIDIA-GPU=GPU-5d6f...``), so readings and holders meet on the UUID.

Who holds which GPU comes from Swarm's task state (swarm.py), as everywhere on a swarm. A
node that does not answer gives no readings: its held GPUs count as busy (never culled on
a guess), as on one host a GPU without a reading is never idle.

:class:`UtilizationSource` is the seam: :class:`DcgmExporterSource` in production, any
object with the same ``read`` in tests.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

import requests
from prometheus_client.parser import text_string_to_metric_families

from . import metrics
from .gpus import Allocation
from .swarm import NodeInfo, SwarmState, TaskInfo

DEFAULT_URL = "http://{address}:9400/metrics"  # dcgm-exporter's default port and path
UTILIZATION = "DCGM_FI_DEV_GPU_UTIL"  # percent
MEMORY_USED = "DCGM_FI_DEV_FB_USED"  # MiB
MEMORY_FREE = "DCGM_FI_DEV_FB_FREE"  # MiB
SCRAPE_TIMEOUT_S = 3.0
Key = tuple[str, str]  # user, server name


@dataclass(frozen=True)
class GpuReading:
    """One GPU as its node's exporter last reported it."""

    utilization: float | None  # percent
    memory_used: int | None = None  # bytes
    memory_total: int | None = None  # bytes (used + free)


class UtilizationSource(Protocol):
    """Where per-node GPU readings come from."""

    def read(self, nodes: Sequence[NodeInfo]) -> dict[str, GpuReading]:
        """GPU UUID -> its reading, for the GPUs of ``nodes`` that could be read."""
        ...


def parse_dcgm(text: str) -> dict[str, GpuReading]:
    """dcgm-exporter's Prometheus text -> GPU UUID -> reading (GPUs without a utilization sample are left out)."""
    utilization: dict[str, float] = {}
    memory: dict[str, int] = {}
    free: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            uuid = sample.labels.get("UUID")
            if not uuid:
                continue
            if sample.name == UTILIZATION:
                utilization[uuid] = float(sample.value)
            elif sample.name == MEMORY_USED:
                memory[uuid] = int(sample.value * 2**20)
            elif sample.name == MEMORY_FREE:
                free[uuid] = int(sample.value * 2**20)
    return {uuid: GpuReading(value, memory.get(uuid),
                             memory[uuid] + free[uuid] if uuid in memory and uuid in free else None)
            for uuid, value in utilization.items()}


class DcgmExporterSource:
    """Scrapes dcgm-exporter on each node, in parallel; a node that fails is logged once until it answers."""

    def __init__(self, url_template: str = DEFAULT_URL, timeout: float = SCRAPE_TIMEOUT_S,
                 log: logging.Logger | None = None):
        """``url_template``: ``{address}`` (the node's swarm address) and ``{hostname}`` are filled in."""
        self.url_template = url_template
        self.timeout = timeout
        self.log = log or logging.getLogger(__name__)
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def url(self, node: NodeInfo) -> str:
        return self.url_template.format(address=node.address, hostname=node.hostname)

    def read(self, nodes: Sequence[NodeInfo]) -> dict[str, GpuReading]:
        if not nodes:
            return {}
        readings: dict[str, GpuReading] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(nodes), 16)) as pool:
            for found in pool.map(self._read_node, nodes):
                readings.update(found)
        return readings

    def _read_node(self, node: NodeInfo) -> dict[str, GpuReading]:
        url = self.url(node)
        try:
            response = requests.get(url, timeout=self.timeout)
            response.raise_for_status()
            readings = parse_dcgm(response.text)
        except (requests.RequestException, ValueError) as error:
            with self._lock:
                first = node.hostname not in self._failing
                self._failing.add(node.hostname)
            if first:
                self.log.warning("No GPU utilization from node %s (%s): %s; its GPUs count as busy until it answers",
                                 node.hostname, url, error)
            return {}
        with self._lock:
            if node.hostname in self._failing:
                self._failing.discard(node.hostname)
                self.log.info("GPU utilization from node %s (%s) again", node.hostname, url)
        return readings


def task_since(task: TaskInfo, default: float) -> float:
    """Epoch seconds since the task's last state change (its start, for a running task)."""
    for text in (task.updated, task.created):
        try:
            return datetime.fromisoformat(text[:19]).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    return default


class SwarmGpuSampler:
    """One hub's samples of a swarm's GPUs: states for the metrics, idle GPU-seconds, and what each
    running server holds, for the idle culler (culler.GpuIdleCuller.observe)."""

    def __init__(self, read_state: Callable[[], SwarmState], source: UtilizationSource,
                 idle_utilization: float, clock: Callable[[], float] = time.time):
        self._read_state = read_state
        self.source = source
        self.idle_utilization = idle_utilization
        self._clock = clock
        self._sampled_at: float | None = None

    def sample(self) -> tuple[dict[str, str], dict[Key, Allocation]]:
        """(GPU UUID -> "free" / "held_busy" / "held_idle" / "unusable", (user, server) -> its GPUs).

        Blocking (the manager's API and the nodes' exporters): call it off the event loop.
        """
        state = self._read_state()
        readings = self.source.read([node for node in state.nodes if node.gpus and node.ready])
        now = self._clock()
        holdings = {(task.user, task.server_name): Allocation(task.user, task.server_name, task.gpus,
                                                               task_since(task, now))
                    for task in state.tasks if task.live and task.state == "running" and task.gpus}
        states = gpu_states(state, readings, self.idle_utilization)
        previous, self._sampled_at = self._sampled_at, now
        if previous is not None:
            metrics.record_gpu_idle(idle_seconds(states, holdings.values(), previous, now))
        metrics.record_gpu_states(states.values())
        return states, holdings


def gpu_states(state: SwarmState, readings: Mapping[str, GpuReading], idle_utilization: float) -> dict[str, str]:
    """Every GPU of the swarm's nodes: unusable (its node is not ready, or, not held, on a node that takes
    no new servers: drained or paused), free, held_idle (a reading at or below ``idle_utilization``) or
    held_busy (above it, or no reading)."""
    holders = state.holders()
    states = {}
    for node in state.nodes:
        for gpu in node.gpus:
            reading = readings.get(gpu)
            if not node.ready:
                states[gpu] = "unusable"
            elif gpu not in holders:
                states[gpu] = "free" if node.schedulable else "unusable"
            elif reading is not None and reading.utilization is not None \
                    and reading.utilization <= idle_utilization:
                states[gpu] = "held_idle"
            else:
                states[gpu] = "held_busy"
    return states


def idle_seconds(states: Mapping[str, str], holdings: Iterable[Allocation], previous: float, now: float) -> float:
    """GPU-seconds held idle between two samples: each GPU held idle now counts since the previous
    sample, or since its server started, if later (as on one host: GpuAllocator.sample)."""
    since = {gpu: allocation.since for allocation in holdings for gpu in allocation.uuids}
    return sum(max(0.0, now - max(previous, since.get(gpu, previous)))
               for gpu, state in states.items() if state == "held_idle")
