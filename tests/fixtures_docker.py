"""Bench fixtures: a real Docker daemon and the Debian rootfs image built on it.

The daemon is the one ``DOCKER_HOST`` points at, or a private dockerd started
under the bench directory (``<repo>/.bench``, or ``$CONDASPAWNER_BENCH_DIR``),
which later runs reuse. Without a daemon the tests that need one are skipped,
except under CI (``CI=true``), where they fail: CI must not pass by skipping.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from condaspawner_bench.dockerd import (
    BenchDaemonError,
    DaemonHandle,
    ensure_daemon,
)
from condaspawner_bench.offlinebase import (
    ROOTFS_TAG,
    build_offline_base,
    build_rootfs_image,
)
from jupyterhub_condaspawner.baseimage import BASE_TAG, ImageBuildError
from jupyterhub_condaspawner.resolve import Resolver

REPO = Path(__file__).resolve().parents[1]


def bench_dir() -> Path:
    return Path(os.environ.get("CONDASPAWNER_BENCH_DIR") or REPO / ".bench")


def bench_unavailable(reason: str) -> None:
    """Skip for want of the bench, or fail under CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the bench is required)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DaemonHandle]:
    """A Docker daemon that answers; ``DOCKER_HOST`` points at it for the session."""
    try:
        handle = ensure_daemon(bench_dir())
    except BenchDaemonError as error:
        bench_unavailable(f"no Docker daemon for the bench: {error}")
    previous_host = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = handle.docker_host
    try:
        yield handle
    finally:
        _restore_env("DOCKER_HOST", previous_host)
        if handle.owned:
            handle.stop()


@pytest.fixture(scope="session")
def rootfs_image(docker_daemon: DaemonHandle) -> str:
    """The tag of the Debian bookworm rootfs image (built once, then cached)."""
    try:
        build_rootfs_image(docker_daemon.client(), bench_dir(), tag=ROOTFS_TAG)
    except (ImageBuildError, BenchDaemonError) as error:  # debootstrap missing, non-root
        bench_unavailable(f"cannot build the rootfs image: {error}")
    return ROOTFS_TAG


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture(scope="session")
def base_image(docker_daemon: DaemonHandle, rootfs_image: str, dev_python_channel) -> str:
    """The offline base image (conda Python 3.9 + the single-user server), built once, then cached."""
    resolver = Resolver(
        channel_urls={"conda-forge": dev_python_channel.url},
        package_cache_dir=str(bench_dir() / "pkgs"),
    )
    asyncio.run(build_offline_base(docker_daemon.client(), bench_dir(), resolver))
    return BASE_TAG


def remove_repo_images(client, repo: str) -> None:
    """Delete a test session's environment images, so repeated runs don't fill the bench's disk."""
    for image in client.images.list(name=repo):
        try:
            client.images.remove(image.id, force=True)
        except docker.errors.APIError:  # still used by a container someone kept: leave it
            pass
