"""Bench fixtures: a real registry (Debian's docker-registry) on 127.0.0.1.

Installed when missing (as root, with apt-get) and started on a free port with its
storage under the session's tmp folder. Without it the tests that need it are skipped,
except under CI (``CI=true``), where they fail: CI must not pass by skipping.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fixtures_docker import bench_unavailable

from condaspawner_bench.registry import BenchRegistryError, RegistryServer, start_registry


@pytest.fixture(scope="session")
def registry_server(tmp_path_factory) -> Iterator[RegistryServer]:
    """An open registry (no auth) at ``registry_server.host``, for the session."""
    try:
        server = start_registry(tmp_path_factory.mktemp("registry"))
    except BenchRegistryError as error:
        bench_unavailable(f"no registry for the bench: {error}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def auth_registry_server(registry_server: RegistryServer, tmp_path_factory) -> Iterator[RegistryServer]:
    """A second registry that asks for htpasswd basic auth (user ``hub``) and serves the open one's
    storage: what is pushed to one is in the other, so auth tests need no second upload."""
    try:
        server = start_registry(tmp_path_factory.mktemp("auth-registry"), users={"hub": "hub-s3cret"},
                                storage=registry_server.storage)
    except BenchRegistryError as error:
        bench_unavailable(f"no registry with basic auth for the bench: {error}")
    try:
        yield server
    finally:
        server.stop()
