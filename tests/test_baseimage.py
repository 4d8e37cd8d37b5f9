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


def test_the_server_imports_without_compiling_or_building_grammars(docker_daemon, base_image):
    # Servers run as jovyan, who cannot write __pycache__: a module without its .pyc is
    # compiled on every start. rfc3987-syntax (an optional jsonschema format checker)
    # compiled ~40 grammars at import, most of a server's boot.
    script = (
        "import importlib.util, os, sys\n"
        "import jupyterhub.singleuser, jupyter_server.serverapp, jupyterlab.labapp\n"
        "files = [getattr(m, '__file__', None) or '' for m in list(sys.modules.values())]\n"
        "missing = [f for f in files if f.endswith('.py') and not os.path.exists(importlib.util.cache_from_source(f))]\n"
        "print(len(files), len(missing), 'rfc3987_syntax' in sys.modules, *missing[:5])\n"
    )
    loaded, missing, grammars, *examples = run_in(docker_daemon.client(), base_image,
                                                   ["python", "-B", "-c", script]).split()
    assert int(loaded) > 500  # the server's real import graph was loaded
    assert (missing, grammars) == ("0", "False"), examples
