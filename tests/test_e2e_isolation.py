"""End to end: homes are per user and never shared; server containers run hardened.

A real hub on the demo config (its own home-volume template), real containers, kernels
over the websocket. The users erin (server "one"), erino (server "ne") and erinone are
the names that shared one volume under the old "{username}{servername}" template.
"""

from __future__ import annotations

import urllib.parse
import uuid

import pytest
from fixtures_hub import VOLUME_PREFIX

from jupyterhub_condaspawner.gpus import LABEL_SERVER, LABEL_USER
from jupyterhub_condaspawner.owners import LABEL_IDENTITY

pytestmark = pytest.mark.docker

PROFILE = {"profile": "python39"}
KERNEL = "python39"
LIST_HOME = "import os; print(' '.join(sorted(f for f in os.listdir('/home/jovyan') if f.endswith('.secret'))))"


def spawn_ready(hub, user: str, server: str = "") -> None:
    status, body = hub.spawn(user, PROFILE, server)
    assert status in (201, 202), body
    events = hub.progress(user, server)
    assert events[-1].get("ready"), events[-1]


def running_container(client, user: str, server: str = ""):
    (container,) = [c for c in client.containers.list(filters={"label": f"{LABEL_USER}={user}"})
                    if c.labels.get(LABEL_SERVER) == server]
    return container


def home_of(container) -> str:
    (mount,) = [m for m in container.attrs["Mounts"] if m["Destination"] == "/home/jovyan"]
    return mount["Name"]


async def write_secret(hub, user: str, server: str = "") -> str:
    name = f"{user}-{server or 'default'}.secret"
    await hub.execute(user, KERNEL, f"open('/home/jovyan/{name}', 'w').write({uuid.uuid4().hex!r})", server)
    return name


async def secrets_seen(hub, user: str, server: str = "") -> list[str]:
    return (await hub.execute(user, KERNEL, LIST_HOME, server)).split()


async def test_users_whose_names_run_together_get_separate_homes(hub, docker_daemon):
    client = docker_daemon.client()
    spawn_ready(hub, "erin", "one")
    erins = await write_secret(hub, "erin", "one")
    # The reported attack: erino's server "ne" while erin's server "one" runs.
    spawn_ready(hub, "erino", "ne")
    assert await secrets_seen(hub, "erino", "ne") == []
    erinos = await write_secret(hub, "erino", "ne")
    assert await secrets_seen(hub, "erin", "one") == [erins]
    homes = {home_of(running_container(client, "erin", "one")), home_of(running_container(client, "erino", "ne"))}
    hub.stop_server("erino", "ne")
    spawn_ready(hub, "erinone")
    assert await secrets_seen(hub, "erinone") == []
    homes.add(home_of(running_container(client, "erinone")))
    hub.stop_server("erinone")
    hub.stop_server("erin", "one")

    assert homes == {VOLUME_PREFIX + "home-" + name for name in ("erin", "erino", "erinone")}
    for user in ("erin", "erino", "erinone"):  # each home is labelled with its one owner: name and identity
        labels = client.volumes.get(VOLUME_PREFIX + "home-" + user).attrs["Labels"]
        assert labels[LABEL_USER] == user and "@" in labels[LABEL_IDENTITY]
    assert erinos != erins


async def test_a_name_with_control_characters_does_not_get_joses_home(hub, docker_daemon):
    # DockerSpawner's own escaping wrote both names as "jos-c3-a9".
    client = docker_daemon.client()
    victim, attacker = "josé", "jos\x0c3\n9"
    in_url = {name: urllib.parse.quote(name) for name in (victim, attacker)}  # as the REST API names them
    spawn_ready(hub, in_url[victim])
    await write_secret(hub, in_url[victim])
    spawn_ready(hub, in_url[attacker])
    assert await secrets_seen(hub, in_url[attacker]) == []
    homes = {home_of(running_container(client, name)) for name in (victim, attacker)}
    for name in (attacker, victim):
        hub.stop_server(in_url[name])
    assert homes == {VOLUME_PREFIX + "home-jos-c3-a9", VOLUME_PREFIX + "home-jos-0c3-0a9"}


async def test_one_users_servers_share_one_home(hub, docker_daemon):
    client = docker_daemon.client()
    spawn_ready(hub, "nora")
    spawn_ready(hub, "nora", "two")
    written = await write_secret(hub, "nora")
    assert await secrets_seen(hub, "nora", "two") == [written]
    assert home_of(running_container(client, "nora")) == home_of(running_container(client, "nora", "two"))
    hub.stop_server("nora", "two")
    hub.stop_server("nora")


async def test_the_server_runs_hardened_and_its_kernel_still_works(hub, docker_daemon):
    spawn_ready(hub, "hardy")
    container = running_container(docker_daemon.client(), "hardy")
    host = container.attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd") and not host["Privileged"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PidsLimit"] == 4096
    assert host["Memory"] == host["MemorySwap"] == 2 * 2**30  # the profile's 2G, and no swap beyond it
    code = (
        "import os, subprocess\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "pids = [p for p in ('/sys/fs/cgroup/pids.max', '/sys/fs/cgroup/pids/pids.max') if os.path.exists(p)]\n"
        "print(os.getuid(), status['CapEff'].strip(), status['CapBnd'].strip(), status['NoNewPrivs'].strip(),\n"
        "      open(pids[0]).read().strip(), subprocess.run(['id', '-u'], capture_output=True, text=True).stdout.strip(),\n"
        "      6 * 7)\n"
    )
    output = await hub.execute("hardy", KERNEL, code)
    assert output.split() == ["1000", "0" * 16, "0" * 16, "1", "4096", "1000", "42"], output
    hub.stop_server("hardy")


def test_a_home_volume_another_user_owns_is_refused_with_one_line(hub, docker_daemon):
    client = docker_daemon.client()
    client.volumes.create(VOLUME_PREFIX + "home-mallet", labels={LABEL_USER: "someone-else"})
    status, body = hub.spawn("mallet", PROFILE)
    assert status in (201, 202, 500), body
    events = hub.progress("mallet") if status != 500 else [{"failed": True, "message": body["message"]}]
    assert events[-1].get("failed"), events[-1]
    message = events[-1]["message"]
    assert f"volume {VOLUME_PREFIX}home-mallet belongs to another user" in message and "\n" not in message
    assert "someone-else" not in message
    assert not client.containers.list(all=True, filters={"label": f"{LABEL_USER}=mallet"})
    model = hub.server_model("mallet")
    assert model is None or not model["ready"]


def spawn_failure(hub, user: str) -> str:
    """The one-line message of a start that must fail."""
    status, body = hub.spawn(user, PROFILE)
    assert status in (201, 202, 500), body
    events = hub.progress(user) if status != 500 else [{"failed": True, "message": body["message"]}]
    assert events[-1].get("failed"), events[-1]
    return events[-1]["message"]


async def test_a_user_deleted_and_created_again_does_not_get_the_old_home(hub, docker_daemon):
    client = docker_daemon.client()
    spawn_ready(hub, "delia")
    await write_secret(hub, "delia")
    hub.stop_server("delia")
    assert hub.api("DELETE", "/users/delia")[0] == 204  # the hub calls delete_forever
    hub.ensure_user("delia")  # a new user of the same name
    message = spawn_failure(hub, "delia")
    assert f"volume {VOLUME_PREFIX}home-delia belongs to an earlier user of your name" in message
    assert "\n" not in message
    assert not client.containers.list(filters={"label": f"{LABEL_USER}=delia"})
    # The admin backs the old home up and removes it (README): the new delia gets an empty home.
    client.volumes.get(VOLUME_PREFIX + "home-delia").remove()
    spawn_ready(hub, "delia")
    assert await secrets_seen(hub, "delia") == []
    hub.stop_server("delia")
