"""The offline base image, and a resolved env running inside it at its in-image path."""

from __future__ import annotations

import pytest
from kernel_script import kernel_round_trip

from condaspawner_bench.offlinebase import BASE_RECIPE_LABEL
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.spec import SpecPolicy

pytestmark = pytest.mark.docker
ENV_PREFIX = "/opt/conda/envs/demo"



def run_in(client, image: str, command: list[str], **kwargs) -> str:
    output = client.containers.run(image, command, network_mode="host", remove=True, **kwargs)
    return output.decode().strip()


def test_base_runs_the_single_user_server_as_jovyan(docker_daemon, base_image):
    client = docker_daemon.client()
    image = client.images.get(base_image)
    assert image.labels[BASE_RECIPE_LABEL]
    assert image.attrs["Config"]["User"] == "jovyan"
    out = run_in(client, base_image, ["sh", "-c", "id -u; jupyterhub-singleuser --version; python --version"])
    uid, singleuser_version, python_version = out.splitlines()
    assert uid == "1000"
    assert singleuser_version.startswith("5.5.")
    assert python_version.startswith("Python 3.9.")
    assert run_in(client, base_image, ["sh", "-c", "test -d /opt/conda/envs && echo yes"]) == "yes"


async def test_resolved_env_runs_a_kernel_at_its_image_path(docker_daemon, base_image, dev_python_channel, tmp_path):
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url}, package_cache_dir=str(tmp_path / "pkgs"))
    spec = SpecPolicy().parse("channels: [conda-forge]\ndependencies: [python=3.9, ipykernel]")
    staging = tmp_path / "demo"
    await resolver.install(await resolver.solve(spec), staging, ENV_PREFIX)

    client = docker_daemon.client()
    mount = {str(staging): {"bind": ENV_PREFIX, "mode": "ro"}}
    python = f"{ENV_PREFIX}/bin/python"
    version = run_in(client, base_image, [python, "-c", "import sys, ssl, sqlite3; print(sys.version_info[:2])"], volumes=mount)
    assert version == "(3, 9)"
    reply = run_in(client, base_image, [python, "-c", kernel_round_trip("import sys; sys.prefix")], volumes=mount)
    assert reply.splitlines()[-1] == f"ok '{ENV_PREFIX}'"


def test_offline_base_is_cached(docker_daemon, base_image, dev_python_channel):
    import asyncio
    import time

    from fixtures_docker import bench_dir

    from condaspawner_bench.offlinebase import build_offline_base

    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url}, package_cache_dir=str(bench_dir() / "pkgs"))
    started = time.monotonic()
    image_id = asyncio.run(build_offline_base(docker_daemon.client(), bench_dir(), resolver))
    assert image_id == docker_daemon.client().images.get(base_image).id
    print(f"cached offline base lookup: {time.monotonic() - started:.2f} s")
