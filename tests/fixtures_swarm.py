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
from jupyterhub_condaspawner.gpus import LABEL_USER

SWARM_DIR_ENV = "CONDASPAWNER_SWARM_DIR"
# A test module's real hub (fixtures_hub) with the conda-swarm spawner: its HUB_EXTRA_CONFIG
# begins with this, and the module uses the swarm_hub_settings fixture, which sets what it reads.
SWARM_HUB_CONFIG = """
import os
c.JupyterHub.spawner_class = "conda-swarm"
c.DockerSpawner.client_kwargs = {"base_url": os.environ["CONDASPAWNER_TEST_SWARM_MANAGER"]}
c.ImageBuilder.registry = os.environ["CONDASPAWNER_TEST_SWARM_REGISTRY"] + "/condaspawner-e2e-swarm"
c.ImageBuilder.insecure_registries = [os.environ["CONDASPAWNER_TEST_SWARM_REGISTRY"]]
c.ImageBuilder.base_image = os.environ["CONDASPAWNER_TEST_SWARM_BASE"]
c.JupyterHub.hub_ip = os.environ["CONDASPAWNER_TEST_SWARM_HOST"]
c.JupyterHub.hub_connect_ip = os.environ["CONDASPAWNER_TEST_SWARM_HOST"]
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
"""
_SWARM_HUB_ENV = ("MANAGER", "REGISTRY", "BASE", "HOST")


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


@pytest.fixture(scope="module")
def swarm_hub_settings(swarm_bench: SwarmBench, swarm_base: str) -> Iterator[None]:
    """What SWARM_HUB_CONFIG reads (set before the module's hub starts); services removed after it."""
    values = (swarm_bench.manager.docker_host, swarm_bench.registry_address, swarm_base, swarm_bench.host_address)
    for name, value in zip(_SWARM_HUB_ENV, values):
        os.environ[f"CONDASPAWNER_TEST_SWARM_{name}"] = value
    yield
    for name in _SWARM_HUB_ENV:
        os.environ.pop(f"CONDASPAWNER_TEST_SWARM_{name}", None)
    for service in swarm_bench.manager_client().services.list(filters={"label": LABEL_USER}):
        service.remove()
