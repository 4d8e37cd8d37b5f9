"""End to end: a hub whose Docker daemon cannot be reached answers a spawn with one line and a 503."""

from __future__ import annotations

import pytest
from test_e2e_failures import Spawn, assert_one_clean_line, failure_message

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = """
c.DockerSpawner.client_kwargs = {"base_url": "unix:///nonexistent/condaspawner-test/docker.sock"}
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 3}  # quick failures answer the POST itself
"""


def test_an_unreachable_daemon_is_a_503_in_one_line_worth_retrying(hub):
    log_start = len(hub.log())
    spawn = Spawn(hub, "dana", {"profile": "python39"})

    assert spawn.status == 503, spawn.body
    message = failure_message(hub, spawn)
    assert message == "The Docker daemon cannot be reached: try again in a minute, or tell the hub admin"
    assert_one_clean_line(message)
    events = hub.progress("dana")
    assert events[-1]["failed"] and events[-1]["message"] == f"Spawn failed: {message}"
    assert "/nonexistent/condaspawner-test/docker.sock" in hub.log()[log_start:]  # the details are in the log
