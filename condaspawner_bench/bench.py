"""The bench: everything the demo hub and the end-to-end tests need on a bare machine.

A Docker daemon (dockerd.py), the local conda channel (devchannel.py), the offline
base image (offlinebase.py) and JupyterHub's configurable-http-proxy (from npm), all
cached under one folder (``.bench`` by default). In production none of this is used:
the admin's Docker, conda-forge and the production base image take its place.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jupyterhub_condaspawner.baseimage import BASE_TAG
from jupyterhub_condaspawner.resolve import Resolver

from .devchannel import ChannelInfo, build_dev_channel, read_channel_info
from .dockerd import DaemonHandle, ensure_daemon
from .offlinebase import build_offline_base

PROXY_PACKAGE = "configurable-http-proxy@5.3.0"
BENCH_DIR_ENV = "CONDASPAWNER_BENCH_DIR"


class BenchError(RuntimeError):
    """A part of the bench could not be set up."""


@dataclass
class Bench:
    directory: Path
    daemon: DaemonHandle
    channel: ChannelInfo
    base_image: str
    proxy_command: list[str]

    def resolver(self) -> Resolver:
        """A resolver whose `conda-forge` is the local channel, with the bench's package cache."""
        return Resolver(channel_urls={"conda-forge": self.channel.url},
                        package_cache_dir=str(self.directory / "pkgs"))


def default_bench_dir() -> Path:
    """``$CONDASPAWNER_BENCH_DIR``, else ``.bench`` in the current directory."""
    return Path(os.environ.get(BENCH_DIR_ENV) or ".bench").resolve()


def ensure_proxy(bench_dir: Path) -> list[str]:
    """configurable-http-proxy: on PATH, else installed from npm into the bench folder."""
    found = shutil.which("configurable-http-proxy")
    if found:
        return [found]
    prefix = bench_dir / "proxy"
    command = prefix / "node_modules" / ".bin" / "configurable-http-proxy"
    if not command.exists():
        if shutil.which("npm") is None:
            raise BenchError("configurable-http-proxy needs Node.js and npm (apt-get install nodejs npm)")
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), PROXY_PACKAGE],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise BenchError(f"npm install {PROXY_PACKAGE} failed: {result.stderr.strip()[-300:]}")
    return [str(command)]


def ensure_bench(bench_dir: Path | None = None, say: Callable[[str], None] = print) -> Bench:
    """Bring up (or reuse) the daemon, channel, base image and proxy; export DOCKER_HOST."""
    directory = Path(bench_dir or default_bench_dir())
    say(f"bench: {directory}")
    daemon = ensure_daemon(directory)
    os.environ["DOCKER_HOST"] = daemon.docker_host
    say(f"bench: Docker daemon at {daemon.docker_host}")
    build_dev_channel(directory / "channel", progress=say)
    channel = read_channel_info(directory / "channel")
    if channel is None or not channel.python_available:
        reason = channel.python_skip_reason if channel else "not built"
        raise BenchError(f"the local conda channel has no python 3.9: {reason}")
    say(f"bench: conda channel {channel.url}")
    bench = Bench(directory, daemon, channel, BASE_TAG, [])
    say("bench: base image (the first time: debootstrap and pip, a few minutes)")
    asyncio.run(build_offline_base(daemon.client(), directory, bench.resolver()))
    bench.proxy_command = ensure_proxy(directory)
    say(f"bench: proxy {bench.proxy_command[0]}")
    return bench
