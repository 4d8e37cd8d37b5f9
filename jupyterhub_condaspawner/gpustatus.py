"""What the GPUs are doing, for people: each GPU's state for the metrics, the status rows of
the environments page, and the `condaspawner gpus` report."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
import requests

from .gpuinventory import Gpu, GpuScan
from .gputable import Allocation, format_since

if TYPE_CHECKING:
    from .gpus import GpuAllocator


def gpu_states(scan: GpuScan, load: Mapping[str, int], idle_utilization: float) -> dict[str, str]:
    """GPU UUID (or "#index" when NVML could not read it) -> "free", "held_busy", "held_idle" or
    "unusable". ``load``: the running servers on each GPU."""
    states = {}
    for gpu in scan.gpus:
        if not gpu.usable:
            state = "unusable"
        elif not load.get(gpu.uuid):
            state = "free"
        elif gpu.utilization is not None and gpu.utilization <= idle_utilization:
            state = "held_idle"
        else:
            state = "held_busy"
        states[gpu.uuid or f"#{gpu.index}"] = state
    return states


def status_rows(scan: GpuScan, holders: Mapping[str, list[Allocation]]) -> list[dict[str, Any]]:
    """One JSON-ready dict per GPU (and per held UUID the host lacks), with its holders."""
    rows = [_status_row(gpu, holders.get(gpu.uuid, [])) for gpu in scan.gpus]
    missing = sorted(set(holders) - set(scan.by_uuid))
    rows += [_status_row(Gpu(-1, uuid, "(not on this host)", state="missing"), holders[uuid]) for uuid in missing]
    return rows


def _status_row(gpu: Gpu, holders: list[Allocation]) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "memory_used": gpu.memory_used,
        "memory_total": gpu.memory_total,
        "utilization": gpu.utilization,
        "driver_version": gpu.driver_version,
        "cuda_version": gpu.cuda_version,
        "source": gpu.source,
        "state": gpu.state,
        "reason": gpu.reason,
        "holders": [{"user": a.user, "server": a.server_name, "since": format_since(a.since),
                     "running": a.active} for a in holders],
    }


# -- the `condaspawner gpus` report --------------------------------------------------------


def status_report(allocator: GpuAllocator, connect: Callable[[], Any] | None = None) -> dict[str, Any]:
    """GPUs, their holders (from the Docker daemon's container labels) and notes, JSON-ready.

    ``connect`` returns a DockerClient (None, or no ``connect``: ``docker.from_env``); if the daemon cannot
    be reached, the GPUs are still listed, with ``holders_known`` False and a note why.
    """
    notes = list(allocator.latest_scan().notes)
    try:
        client = (connect and connect()) or docker.from_env(timeout=10)
        client.ping()
        notes += allocator.rebuild_from_containers(client)
        holders_known = True
    except (docker.errors.DockerException, requests.RequestException) as error:
        notes.append(f"holders unknown: cannot reach the Docker daemon ({error})")
        holders_known = False
    return {"summary": allocator.latest_scan().summary(), "gpus": allocator.status(), "holders_known": holders_known,
            "notes": notes}


def format_status(report: Mapping[str, Any]) -> str:
    """The report as a table, then its notes; "no GPUs: <why>" when there are none."""
    lines = []
    if report["gpus"]:
        header = ("INDEX", "NAME", "MEMORY USED/TOTAL", "UTIL", "STATE", "HOLDER", "SINCE")
        rows = [header] + [_status_cells(row, report["holders_known"]) for row in report["gpus"]]
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    else:
        lines.append(report["summary"])
    lines += [note for note in report["notes"] if note not in report["summary"]]
    return "\n".join(lines)


def _status_cells(row: Mapping[str, Any], holders_known: bool) -> tuple[str, ...]:
    memory = "-"
    if row["memory_total"] is not None:
        used = "?" if row["memory_used"] is None else f"{row['memory_used'] / 2**30:.1f}"
        memory = f"{used}/{row['memory_total'] / 2**30:.1f} GiB"
    utilization = "-" if row["utilization"] is None else f"{row['utilization']}%"
    holders = [_holder_text(holder) for holder in row["holders"]]
    since = ", ".join(holder["since"] for holder in row["holders"])
    holder = ", ".join(holders) or ("free" if holders_known else "unknown")
    index = "-" if row["index"] < 0 else str(row["index"])
    return (index, row["name"], memory, utilization, row["state"], holder, since or "-")


def _holder_text(holder: Mapping[str, Any]) -> str:
    text = holder["user"] + (f"/{holder['server']}" if holder["server"] else "")
    return text if holder["running"] else f"{text} (stopped)"
