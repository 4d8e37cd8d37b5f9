"""The multi-node bench fixture: a real Docker Swarm in network namespaces (condaspawner_bench.swarm).

One per session: a manager and two workers with two fake GPUs each, a registry on the
manager, the host on the same private subnet. Its state lives in ``<repo>/.swarm-bench``
(or ``$CONDASPAWNER_SWARM_DIR``), so a crashed run's leftovers are cleaned by the next
one; the registry's storage (``cache/`` in it) is kept between runs. It needs root: it
installs what is missing with apt, like the single-host bench, and fails under CI=true
rather than skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_docker import REPO, bench_unavailable

from condaspawner_bench.dockerd import BenchDaemonError, ensure_debian_packages
from condaspawner_bench.swarm import SWARM_PACKAGES, SwarmBench

SWARM_DIR_ENV = "CONDASPAWNER_SWARM_DIR"


def swarm_dir() -> Path:
    return Path(os.environ.get(SWARM_DIR_ENV) or REPO / ".swarm-bench")


def require_swarm_prerequisites() -> None:
    """Skip (fail under CI) where the bench cannot run at all: not root, packages unavailable."""
    if os.geteuid() != 0:
        bench_unavailable("the multi-node bench needs root (network namespaces, dockerd)")
    try:
        ensure_debian_packages(SWARM_PACKAGES)
    except BenchDaemonError as error:
        bench_unavailable(f"the multi-node bench cannot install what it needs: {error}")
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        bench_unavailable("the multi-node bench needs unshare and nsenter (util-linux)")


@pytest.fixture(scope="session")
def swarm_bench() -> Iterator[SwarmBench]:
    """A running 3-node swarm (manager, worker1, worker2); torn down at the end of the session."""
    require_swarm_prerequisites()
    bench = SwarmBench.start(swarm_dir(), say=print)
    try:
        yield bench
    finally:
        bench.stop()


@pytest.fixture(scope="session")
def swarm_base(swarm_bench: SwarmBench, docker_daemon, base_image: str) -> str:
    """The single-host bench's base image, seeded into the swarm's registry and pulled onto the
    manager (whose daemon builds the environment images of the conda-swarm tests)."""
    reference = swarm_bench.seed_image(docker_daemon.client(), base_image)
    swarm_bench.pull(reference, ["manager"])
    return reference
