"""End to end, where JupyterHub's own features meet the spawner, on a real hub.

- A link (GET /hub/spawn/<user>/<server>?...) starts a server at once: it may choose a
  profile, never carry an environment.yml (its ``variables`` would reach the victim's kernel).
- Limits a pre_spawn_hook sets are kept where the profile sets none; a profile's own win.
- A server without GPUs gets NVIDIA_VISIBLE_DEVICES=void over the admin's "all".
- The environments page's Start, with no server named, starts the hub's default server.
- A hub that stops its servers on exit (JupyterHub's default) still tells a waiting start's
  owner why it ended.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
from test_e2e_failures import Spawn

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = """
def _hooked_limits(spawner):
    if spawner.user.name.startswith("hooked"):  # the usual per-group limits, by name here
        spawner.cpu_limit = 0.5
        spawner.mem_limit = "1G"


c.Spawner.pre_spawn_hook = _hooked_limits
c.Spawner.environment = {"NVIDIA_VISIBLE_DEVICES": "all"}  # as an admin's, or a CUDA image's ENV
c.JupyterHub.default_server_name = "main"
c.GpuAllocator.device_mode = "nvidia-runtime"  # no NVIDIA runtime here: the fake GPU travels as an env var
c.JupyterHub.cleanup_servers = True  # JupyterHub's default: its shutdown stops every server, pending ones too
"""
NO_LIMITS_PROFILE = """
display_name: "Python 3.9, no limits of its own"
slug: nolimits
environment: envs/python39.yml
"""
LINKED_ENV = ("channels: [conda-forge]\ndependencies: [python=3.9, ipykernel]\n"
              "variables:\n  PYTHONWARNINGS: 'ignore::antigravity.x::0'\n  BROWSER: 'sh -c \"touch /tmp/pwned\" %s'\n")


def hub_before_start(hub) -> None:
    (hub.state / "profiles" / "12-nolimits.yaml").write_text(NO_LIMITS_PROFILE)


def container_of(docker_daemon, user: str, server: str = "") -> Any:
    client = docker_daemon.client()
    (container,) = client.containers.list(filters={"label": [f"io.condaspawner.user={user}",
                                                            f"io.condaspawner.server={server}"]})
    return container


def start_and_wait(hub, user: str, options: dict, server: str = "") -> None:
    status, body = hub.spawn(user, options, server)
    assert status in (201, 202), body
    events = hub.progress(user, server, timeout=900)
    assert events[-1].get("ready"), events


def limits(container: Any) -> tuple[int, int]:
    host = container.attrs["HostConfig"]
    return host["CpuQuota"], host["Memory"]


# -- a link may choose a profile, never carry an environment.yml ---------------------------------------


@pytest.mark.parametrize("query", [
    {"profile": "python39", "environment_text": LINKED_ENV},
    {"opt-profile": "python39", "opt-environment": LINKED_ENV},
    {"environment_text": LINKED_ENV},
])
def test_a_link_carrying_an_environment_starts_nothing(hub, docker_daemon, query):
    session, _ = hub.login("linked")
    status, url, page = session.get("/hub/spawn/linked/notes?" + urllib.parse.urlencode(query))
    assert status == 400, (status, url)
    assert "A link may choose only a profile, not 'environment" in page
    assert "choose your options on this form and start from it" in page
    assert hub.server_model("linked", "notes") is None
    client = docker_daemon.client()
    assert not client.containers.list(all=True, filters={"label": "io.condaspawner.user=linked"})


def test_a_link_may_choose_a_profile_and_nothing_else_is_stored(hub):
    session, _ = hub.login("linker")
    status, url, _ = session.get("/hub/spawn/linker/chosen?profile=python39")
    assert status == 200 and "/hub/spawn-pending/linker/chosen" in url, (status, url)
    events = hub.progress("linker", "chosen", timeout=900)
    assert events[-1].get("ready"), events
    assert hub.server_model("linker", "chosen")["user_options"] == {"profile": "python39"}
    hub.stop_server("linker", "chosen")


def test_a_link_with_an_unknown_profile_is_refused_on_the_form(hub):
    session, _ = hub.login("linked")
    status, _, page = session.get("/hub/spawn/linked/other?profile=no-such-profile")
    assert status == 400 and "profile: unknown profile 'no-such-profile'" in page
    assert hub.server_model("linked", "other") is None


# -- limits: the profile's, else what the pre_spawn_hook set, else the config's -------------------------


def test_a_pre_spawn_hooks_limits_are_kept_where_the_profile_sets_none(hub, docker_daemon):
    start_and_wait(hub, "hooked1", {"profile": "python39"})
    assert limits(container_of(docker_daemon, "hooked1")) == (100_000, 2 * 2**30)  # the profile's 1 CPU, 2G
    hub.stop_server("hooked1")
    start_and_wait(hub, "hooked1", {"profile": "nolimits"})  # the last start's profile limits do not stick
    assert limits(container_of(docker_daemon, "hooked1")) == (50_000, 2**30)  # the hook's 0.5 CPU, 1G
    hub.stop_server("hooked1")


def test_without_hook_or_profile_limits_the_configs_apply_and_no_gpu_is_visible(hub, docker_daemon):
    start_and_wait(hub, "plain", {"profile": "nolimits"})
    container = container_of(docker_daemon, "plain")
    assert limits(container) == (200_000, 4 * 2**30)  # the demo config's 2 CPU, 4G
    env = container.attrs["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=void" in env and "NVIDIA_VISIBLE_DEVICES=all" not in env
    assert "CONDASPAWNER_GPUS=" in env
    hub.stop_server("plain")


# -- the environments page's Start: the hub's default server ---------------------------------------------


def call_as(hub, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"{hub.url}/hub/api/environments{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_start_with_no_server_named_starts_the_hubs_default_server(hub):
    hub.ensure_user("defaulter")
    status, token = hub.api("POST", "/users/defaulter/tokens", {"note": "default server test"})
    assert status == 201, token
    start_and_wait(hub, "defaulter", {"profile": "python39"}, server="main")
    hub.stop_server("defaulter", "main")
    status, listing = call_as(hub, token["token"], "GET", "")
    (key,) = [env["key"] for env in listing["environments"] if env["profile"] == "python39"]
    status, body = call_as(hub, token["token"], "POST", f"/{key}/start", {})
    assert status == 202, body
    assert body["progress_url"].endswith("/hub/spawn-pending/defaulter/main"), body
    events = hub.progress("defaulter", "main", timeout=600)
    assert events[-1].get("ready"), events
    assert hub.server_model("defaulter", "") is None
    hub.stop_server("defaulter", "main")


# -- cleanup_servers = True: a start waiting for a GPU ends with the hub, and its owner is told --------


def test_a_hub_that_stops_its_servers_on_exit_tells_a_waiting_start_why_it_ended(hub):
    start_and_wait(hub, "holder", {"profile": "gpu-demo"}, "main")
    waiting = Spawn(hub, "waiter", {"profile": "gpu-demo"}, "main")
    waiting.wait_for("Waiting for a GPU: you are next")
    hub.stop()  # SIGTERM: JupyterHub stops every server, the waiting start included, as it exits
    left = [path.read_text() for path in (hub.state / "builder" / "notices").glob("*.json")]
    assert len(left) == 1 and '"waiter"' in left[0], left
    hub.start()
    session, _ = hub.login("waiter")
    _, _, page = session.get("/hub/spawn/waiter/main")
    assert "was waiting for a GPU when the hub restarted" in page
    assert hub.server_model("holder", "main") is None  # stopped with the hub, as cleanup_servers says
