"""End to end, where JupyterHub's own features meet the spawner, on a real hub.

- A link (GET /hub/spawn/<user>/<server>?...) starts a server at once: it may choose a
  profile, never carry an environment.yml (its ``variables`` would reach the victim's kernel).
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.docker

LINKED_ENV = ("channels: [conda-forge]\ndependencies: [python=3.9, ipykernel]\n"
              "variables:\n  PYTHONWARNINGS: 'ignore::antigravity.x::0'\n  BROWSER: 'sh -c \"touch /tmp/pwned\" %s'\n")


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
