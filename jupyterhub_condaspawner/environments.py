"""The environments page's data: JSON-ready views over the builder's cache, the usage log,
the images and the GPUs. Reads only; the page's handlers (envpage.py) do the HTTP.

Where things come from: a key's build status, lock (``lock.json``) and build log live in
the builder's cache folder (``builds/<key>/``); who started which key is the usage log
(usage.py); sizes and creation times are the images' on the daemon; GPU holders are the
allocator's table, the GPU queue the hub's own.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from . import envdiff, swarmgpus
from .builder import ImageBuilder
from .builderrors import BuildError
from .buildmodel import CUSTOM_ENV_NAME, LABEL_CREATED, LABEL_ENV_NAME, LABEL_KEY, LABEL_SPEC
from .buildrecords import BuildRecord
from .specmodel import EnvironmentSpec
from .swarm import SwarmState, since_text
from .swarmgpus import GpuReading
from .usage import UsageLog, Use

if TYPE_CHECKING:
    from .culler import GpuIdleCuller
    from .gpus import GpuAllocator

KEY_CHARS = frozenset("0123456789abcdef")


def is_key(text: str) -> bool:
    """A full build key (64 hex digits): the only key text that ever reaches a path."""
    return len(text) == 64 and set(text) <= KEY_CHARS


def read_lock(builder: ImageBuilder, key: str) -> dict[str, Any] | None:
    """The key's lock (platform, channels, packages with URLs and sha256), or None."""
    try:
        lock = json.loads((builder.key_dir(key) / "lock.json").read_text())
    except (OSError, ValueError):
        return None
    return lock if isinstance(lock, dict) else None


def previous_profile_key(builder: ImageBuilder, env_name: str, key: str) -> str | None:
    """The latest successful build of the same profile (env_name) other than ``key``."""
    if env_name in ("", CUSTOM_ENV_NAME):
        return None
    current = builder.build_record(key)
    before = current.started if current and current.started else "9999"
    earlier = [record for record in builder.builds() if record.env_name == env_name and record.key != key
               and record.status == "built" and record.started < before]
    return max(earlier, key=lambda record: record.started).key if earlier else None


def previous_key(builder: ImageBuilder, usage: UsageLog, user: str, key: str, env_name: str,
                 identity: str | None = None) -> str | None:
    """What ``key`` is compared with: the profile's previous build, or the user's previous own environment."""
    if env_name != CUSTOM_ENV_NAME:
        return previous_profile_key(builder, env_name, key)
    previous = usage.previous_own(user, key, identity)
    return previous.key if previous else None


def change(builder: ImageBuilder, old_key: str | None, new_key: str) -> envdiff.Diff | None:
    """What changed from ``old_key``'s lock to ``new_key``'s; None when either lock is missing."""
    if old_key is None:
        return None
    old, new = read_lock(builder, old_key), read_lock(builder, new_key)
    if old is None or new is None:
        return None
    packages = envdiff.diff(old.get("packages", []), new.get("packages", []))
    old_spec, new_spec = recorded_spec(builder.build_record(old_key)), recorded_spec(builder.build_record(new_key))
    return envdiff.spec_changes(packages, old_spec, new_spec) if old_spec and new_spec else packages


def recorded_spec(record: BuildRecord | None) -> EnvironmentSpec | None:
    """The spec a key's build recorded (its normalized JSON), or None (an older or damaged record)."""
    if record is None or not record.spec:
        return None
    try:
        return EnvironmentSpec.from_normalized(json.loads(record.spec))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def image_facts(builder: ImageBuilder, key: str) -> dict[str, Any]:
    """Size and creation time of the key's image on the daemon (None when it is not there)."""
    try:
        image = builder.find_image(key)
    except Exception:  # no daemon: the page still shows what the cache folder knows
        return {"present": None, "size": None, "created": None}
    if image is None:
        return {"present": False, "size": None, "created": None}
    return {"present": True, "size": image.attrs.get("Size"), "created": image.labels.get(LABEL_CREATED)}


def environment_summary(builder: ImageBuilder, use: Use) -> dict[str, Any]:
    """One environment of a user, as the list shows it."""
    record = builder.build_record(use.key)
    lock = read_lock(builder, use.key)
    in_progress = any(build.key == use.key for build in builder.in_progress())
    return {
        "key": use.key,
        "name": use.name,
        "profile": use.profile,
        "own": use.own,
        "status": "building" if in_progress else (record.status if record else "unknown"),
        "phase": record.phase if record else "",
        "cause": record.cause if record else "",
        "built": record.finished if record and record.status == "built" else "",
        "first_used": _iso(use.first_used),
        "last_used": _iso(use.last_used),
        "packages": len(lock["packages"]) if lock else None,
        **image_facts(builder, use.key),
    }


def environment_detail(builder: ImageBuilder, usage: UsageLog, use: Use) -> dict[str, Any]:
    """One environment with its packages and what changed against the one before it."""
    summary = environment_summary(builder, use)
    lock = read_lock(builder, use.key)
    env_name = CUSTOM_ENV_NAME if use.own else use.profile
    previous = previous_key(builder, usage, use.user, use.key, env_name, use.identity or None)
    diff = change(builder, previous, use.key)
    return {
        **summary,
        "spec": use.spec,
        "packages": lock["packages"] if lock else [],
        "platform": lock.get("platform", "") if lock else "",
        "previous": previous,
        "diff": diff.as_dict() if diff else None,
        "diff_summary": diff.summary() if diff else "",
        "start": {"profile": use.profile, **({"environment": use.spec} if use.own else {})},
    }


def admin_images(builder: ImageBuilder, usage: UsageLog, running: dict[str, list[str]]) -> dict[str, Any]:
    """Every environment image of this installation: key, profiles and users using it, size,
    created, last used, running servers (``running``: key -> "user" or "user/server"), and
    where it is (``location``: "daemon", or "registry" for a built key only the registry has).

    Images without a usage record are listed too (built by ``condaspawner build``, or before the
    usage log began). ``users_known`` is False for an image made before the usage log began: who
    started it then is not known (the page says "unknown"), only who started it since.
    ``notes``: one line when the registry could not be asked (the daemon's images still show).
    """
    users: dict[str, set[str]] = {}
    profiles: dict[str, set[str]] = {}
    for use in usage.all_uses():
        users.setdefault(use.key, set()).add(use.user)
        profiles.setdefault(use.key, set()).add(use.profile)
    since = usage.since()

    def row(key: str, labels: dict[str, str], size: int | None, location: str) -> dict[str, Any]:
        record = builder.build_record(key)
        env_name = (record.env_name if record else "") or labels.get(LABEL_ENV_NAME, "")
        named = profiles.get(key, set()) | ({env_name} if env_name and env_name != CUSTOM_ENV_NAME else set())
        created = labels.get(LABEL_CREATED) or ""
        last_used = builder.last_used(key)
        return {
            "key": key, "tag": builder.tag_for(key), "location": location,
            "name": (record.name if record else "") or _spec_name(labels) or env_name,
            "profiles": sorted(named), "users": sorted(users.get(key, ())),
            "users_known": since is not None and _epoch(created) >= int(since),  # labels keep whole seconds
            "size": size, "created": created, "last_used": _iso(last_used) if last_used else "",
            "running": sorted(running.get(key, ())),
        }

    rows = [row(image.labels[LABEL_KEY], image.labels, image.attrs.get("Size"), "daemon")
            for image in builder.images()]
    notes: list[str] = []
    if builder.registry:  # built here, pushed, and no longer (or never) on this daemon
        listed = {entry["key"] for entry in rows}
        try:
            for record in builder.builds():
                remote = None if record.status != "built" or record.key in listed else builder.find_pushed(record.key)
                if remote is not None:
                    rows.append(row(record.key, remote.labels, remote.size, "registry"))
        except BuildError as error:
            notes.append(f"images only in the registry are not listed: {error}")
    return {"images": sorted(rows, key=lambda entry: entry["last_used"], reverse=True), "notes": notes}


def _spec_name(labels: dict[str, str]) -> str:
    """The ``name:`` of the spec an image's label carries ("" if none)."""
    try:
        spec = json.loads(labels.get(LABEL_SPEC) or "{}")
    except ValueError:
        return ""
    name = spec.get("name") if isinstance(spec, dict) else None
    return name if isinstance(name, str) else ""


def _epoch(iso: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (0 when it is missing or not one)."""
    try:
        moment = datetime.fromisoformat(iso[:-1] + "+00:00" if iso.endswith("Z") else iso)  # "Z": 3.11+ only
    except ValueError:
        return 0.0
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def admin_builds(builder: ImageBuilder, failed: list[dict[str, Any]]) -> dict[str, Any]:
    """Builds in progress (with their last event), the build queue, and the recent failures
    (``failed``: :func:`recent_failures`, which reads every key's status: in a thread)."""
    running: list[dict[str, Any]] = []
    queued: list[dict[str, Any]] = []
    for build in builder.in_progress():
        last = build.events[-1] if build.events else {"phase": "queued", "progress": 0, "message": "starting"}
        row = {"key": build.key, "name": build.name, "profile": build.env_name, "since": _iso(build.since),
               "phase": last["phase"], "progress": last["progress"], "message": last["message"]}
        (queued if last["phase"] == "queued" else running).append(row)
    return {"running": running, "queued": queued, "failed": failed,
            "max_concurrent_builds": builder.max_concurrent_builds}


def recent_failures(builder: ImageBuilder) -> list[dict[str, Any]]:
    """The 20 latest failed or interrupted builds (every key's status.json is read)."""
    return [{"key": record.key, "name": record.name, "phase": record.phase, "cause": record.cause,
             "finished": record.finished} for record in builder.failed_builds()[:20]]


def gpu_map(allocator: GpuAllocator, waiting: list[dict[str, Any]], culler: GpuIdleCuller) -> dict[str, Any]:
    """Every GPU (host, index, model, memory, utilization, state, holders with held since and
    idle for) and ``waiting``, the spawns in the GPU queue (:meth:`GpuQueue.waiting`, read on
    the event loop, which changes the queue: this runs in a thread, NVML may rescan)."""
    states = allocator.gpu_states()
    rows = []
    for row in allocator.status():
        uuid = row["uuid"]
        holders = [{**holder, "idle_seconds": _rounded(culler.idle_for(holder["user"], holder["server"]))}
                   for holder in row["holders"]]
        rows.append({
            "host": socket.gethostname(), "index": row["index"], "uuid": uuid, "model": row["name"],
            "memory_used": row["memory_used"], "memory_total": row["memory_total"],
            "utilization": row["utilization"], "state": states.get(uuid or f"#{row['index']}", row["state"]),
            "holders": holders,
        })
    return {"gpus": rows, "queue": waiting}


def swarm_gpu_map(state: SwarmState, readings: Mapping[str, GpuReading], idle_utilization: float,
                  culler: GpuIdleCuller, now: float | None = None,
                  waiting: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The GPU map of a swarm: every node's GPUs (the node, index, model, utilization and memory
    from its dcgm-exporter, state, holder from Swarm's tasks) and the servers waiting for GPUs
    (Swarm's pending tasks, oldest first, then ``waiting``, the hub's own queue:
    :meth:`GpuQueue.waiting`), in the rows :func:`gpu_map` gives on one host."""
    holders = state.holders()
    states = swarmgpus.gpu_states(state, readings, idle_utilization)
    rows = []
    for node in sorted(state.nodes, key=lambda node: node.hostname):
        for index, uuid in enumerate(node.gpus):
            task, reading = holders.get(uuid), readings.get(uuid)
            rows.append({
                "host": node.hostname, "node_state": node.state, "index": index, "uuid": uuid,
                "model": node.gpu_model or "", "memory_used": reading.memory_used if reading else None,
                "memory_total": reading.memory_total if reading else None, "utilization": reading.utilization if reading else None,
                "state": states.get(uuid, "free"),
                "holders": [] if task is None else [{
                    "user": task.user, "server": task.server_name, "since": since_text(task.created),
                    "running": task.state == "running",
                    "idle_seconds": _rounded(culler.idle_for(task.user, task.server_name))}],
            })
    now = time.time() if now is None else now
    pending = sorted((task for task in state.tasks if task.live and task.gpus_requested and not task.gpus),
                     key=lambda task: task.created)
    queue = [{"user": task.user, "server": task.server_name, "gpus": task.gpus_requested, "model": "",
              "profile": "", "position": position, "reason": task.reason,
              "waited_seconds": max(0, round(now - _epoch(since_text(task.created))))}
             for position, task in enumerate(pending)]
    queue += [{**entry, "position": entry["position"] + len(pending), "reason": "in the hub's queue"}
              for entry in waiting]
    return {"gpus": rows, "queue": queue}


def _rounded(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))

