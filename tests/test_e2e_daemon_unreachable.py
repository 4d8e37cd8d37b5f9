"""End to end: a hub whose Docker daemon cannot be reached answers a spawn with one line and a 503."""

from __future__ import annotations

import pytest
from test_e2e_failures import (
    Spawn,
    assert_one_clean_line,
    assert_page_says,
    assert_progress_page_says,
    failure_message,
    form_failure_page,
)

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = """
c.DockerSpawner.client_kwargs = {"base_url": "unix:///nonexistent/condaspawner-test/docker.sock"}
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 3}  # quick failures answer the POST itself
"""
MESSAGE = "The Docker daemon cannot be reached: try again in a minute, or tell the hub admin"


def test_an_unreachable_daemon_is_a_503_in_one_line_worth_retrying(hub):
    log_start = len(hub.log())
    spawn = Spawn(hub, "dana", {"profile": "python39"})

    assert spawn.status == 503, spawn.body
    message = failure_message(hub, spawn)
    assert message == MESSAGE
    assert_one_clean_line(message)
    assert_progress_page_says(hub, "dana", message)
    assert "/nonexistent/condaspawner-test/docker.sock" in hub.log()[log_start:]  # the details are in the log


def test_the_spawn_form_shows_the_same_line(hub):
    assert_page_says(form_failure_page(hub, "dana-form", {"profile": "python39"}), MESSAGE)
