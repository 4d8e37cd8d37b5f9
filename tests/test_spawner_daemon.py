"""One Docker daemon: the builder builds where DockerSpawner runs the servers, with its settings.

CondaSpawners run in-process with a stand-in user against the bench daemon (as in
test_spawner_failures.py). DockerSpawner caches one API client per class: each test
starts without one.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from jupyterhub.objects import Hub
from test_spawner_failures import StandInUser, failed_start, spawner_for
from traitlets.config import Config

from jupyterhub_condaspawner.failures import StartFailure
from jupyterhub_condaspawner.gpus import LABEL_USER
from jupyterhub_condaspawner.hubservices import hub_services
from jupyterhub_condaspawner.spawner import CondaSpawner


@pytest.fixture(autouse=True)
def no_cached_client(monkeypatch):
    monkeypatch.setattr(CondaSpawner, "_client", None)


@pytest.mark.docker
def test_the_builder_uses_the_spawners_daemon_settings(tmp_path, monkeypatch, docker_daemon):
    # DOCKER_HOST names no daemon: only DockerSpawner's client_kwargs lead to the bench's.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/not-a-daemon.sock")
    config = Config()
    config.DockerSpawner.client_kwargs = {"base_url": docker_daemon.docker_host, "timeout": 77}
    spawner = CondaSpawner(user=StandInUser("one-daemon"), hub=Hub(), config=config)

    builder = hub_services(spawner).builder

    assert builder.client.ping()
    assert builder.client.api.base_url == spawner.client.base_url
    assert builder.client.api.timeout == spawner.client.timeout == 77
    assert builder.daemon_url == docker_daemon.docker_host


def test_tls_settings_of_the_spawner_reach_the_builder(tmp_path):
    config = Config()
    config.DockerSpawner.tls_config = {"verify": False}
    config.DockerSpawner.client_kwargs = {"base_url": "tcp://docker.example.edu:2376"}
    spawner = CondaSpawner(user=StandInUser("tls"), hub=Hub(), config=config)

    settings = hub_services(spawner).builder.client_settings()

    assert settings["base_url"] == "tcp://docker.example.edu:2376" and settings["tls"].verify is False


@pytest.mark.docker
async def test_a_build_host_without_a_registry_is_refused_in_one_line(tmp_path, docker_daemon, dev_python_channel):
    spawner = spawner_for(tmp_path, dev_python_channel.url, ImageBuilder__docker_host=docker_daemon.docker_host)

    failure, _ = await failed_start(spawner, {"profile": "py"})

    assert (failure.status_code, failure.reason) == (500, "config")
    assert failure.message == (
        f"The hub's image settings do not fit together: images built on {docker_daemon.docker_host} "
        "(ImageBuilder.docker_host) can reach the servers only through a registry (ImageBuilder.registry); "
        "tell the hub admin")


@pytest.mark.docker
async def test_coroutine_extra_create_kwargs_and_extra_host_config(docker_daemon, base_image):
    seen = []

    async def create_kwargs(spawner):
        await asyncio.sleep(0)
        seen.append("create")
        return {"labels": {"lab.example/owner": spawner.user.name}, "working_dir": "/tmp"}

    async def host_config(spawner):
        await asyncio.sleep(0)
        seen.append("host")
        return {"pids_limit": 512, "cap_add": ["NET_BIND_SERVICE"]}

    config = Config()
    config.DockerSpawner.extra_create_kwargs = create_kwargs
    config.DockerSpawner.extra_host_config = host_config
    config.DockerSpawner.network_name = "host"
    name = f"async-{uuid.uuid4().hex[:8]}"
    spawner = CondaSpawner(user=StandInUser(name), hub=Hub(), config=config)
    spawner.image = base_image
    spawner._extra_labels = {LABEL_USER: name}  # what a start sets before DockerSpawner creates the container

    created = await spawner.create_object()
    try:
        container = spawner.client.inspect_container(created["Id"])
    finally:
        spawner.client.remove_container(created["Id"], force=True)

    assert sorted(seen) == ["create", "host"]
    labels = container["Config"]["Labels"]
    assert labels["lab.example/owner"] == name and labels[LABEL_USER] == name  # the admin's and ours
    assert container["Config"]["WorkingDir"] == "/tmp"
    host = container["HostConfig"]
    assert host["PidsLimit"] == 512  # the admin's single value wins over the hardening default
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["NET_BIND_SERVICE"]
    assert "no-new-privileges" in host["SecurityOpt"]
    # The admin's callables are left as they were for the next start.
    assert spawner.extra_create_kwargs is create_kwargs and spawner.extra_host_config is host_config


async def test_a_bad_setting_keeps_running_servers_and_refuses_starts_in_one_line(tmp_path):
    # A hub restarted with a typo in static_gpus: poll raised the TraitError, JupyterHub took
    # every server for stopped and forgot it while its container ran on.
    spawner = spawner_for(tmp_path, (tmp_path / "channel").as_uri(), GpuInventory__static_gpus=[{"name": "A100"}])

    assert await spawner.poll() is None

    with pytest.raises(StartFailure) as refusal:
        spawner.apply_choice({"profile": "py"})
    assert (refusal.value.status_code, refusal.value.reason) == (500, "config")
    assert refusal.value.message == ("This hub's configuration has an error: tell the hub admin (the hub's log names "
                                     "the setting)")
    assert refusal.value.log_message == ("a setting in the hub's config: static_gpus[0]: 'uuid' must be the GPU's "
                                         "UUID, e.g. 'GPU-5d6f...' (nvidia-smi -L)")


@pytest.mark.docker
async def test_a_stop_under_a_bad_setting_still_stops_the_container(tmp_path, docker_daemon, base_image):
    # JupyterHub forgets a server whatever its stop raises: a stop that raised the bad setting
    # left the container running, out of the hub's sight.
    spawner = spawner_for(tmp_path, (tmp_path / "channel").as_uri(), GpuInventory__static_gpus=[{"name": "A100"}])
    container = docker_daemon.client().containers.run(base_image, ["sleep", "600"], name=spawner.object_name,
                                                      detach=True, init=True)
    try:
        await spawner.get_object()  # the container id, as a restored server's state gives it

        await spawner.stop()

        container.reload()
        assert container.status == "exited"
    finally:
        container.remove(force=True)
