"""End to end: a hub whose base image is missing tells the user in one line: REST, the form, the progress page."""

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
c.ImageBuilder.base_image = "condaspawner-base:no-such-tag"
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 3}  # quick failures answer the POST itself
"""
MESSAGE = ("The hub's base image is missing: condaspawner-base:no-such-tag is not on the Docker host "
           "(an admin builds it with `condaspawner base`); tell the hub admin")


def test_a_missing_base_image_is_a_500_in_one_line_for_the_admin(hub):
    spawn = Spawn(hub, "basil", {"profile": "python39"})

    assert spawn.status == 500, spawn.body
    message = failure_message(hub, spawn)
    assert message == MESSAGE
    assert_one_clean_line(message)
    assert_progress_page_says(hub, "basil", message)
    assert not (hub.server_model("basil") or {}).get("ready")


def test_the_spawn_form_shows_the_same_line(hub):
    assert_page_says(form_failure_page(hub, "basil-form", {"profile": "python39"}), MESSAGE)
