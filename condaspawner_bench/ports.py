"""Loopback ports for the bench's servers (hubs, proxies, registries, test servers).

A port the kernel hands out with ``bind(0)`` comes from its ephemeral range, the range
it also gives every outgoing connection: between choosing such a port and a server
listening on it (or while a hub restarts on it), a client's connection may take it. So
ports here come from below that range, where only an explicit bind can land, and each
pytest-xdist worker draws from its own slice so that two workers never choose alike.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

LOWEST = 10000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now, outside the ephemeral range, and
    not handed out before by this process."""
    first, span = _slice()
    if span >= 100:
        for _ in range(500):
            port = random.randrange(first, first + span)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    with socket.socket() as probe:  # no room below the ephemeral range: what the kernel gives
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _slice() -> tuple[int, int]:
    """(first port, how many) of this process's share of the ports below the ephemeral range."""
    try:
        ephemeral_low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % workers
    span = max(0, ephemeral_low - LOWEST) // workers
    return LOWEST + worker * span, span


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
