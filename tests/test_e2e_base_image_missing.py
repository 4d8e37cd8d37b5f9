"""End to end: a hub whose base image is missing tells the user in one line, on REST and the progress page."""

from __future__ import annotations

import pytest
from test_e2e_failures import Spawn, assert_one_clean_line, failure_message

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = """
c.ImageBuilder.base_image = "condaspawner-base:no-such-tag"
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 3}  # quick failures answer the POST itself
"""


def test_a_missing_base_image_is_a_500_in_one_line_for_the_admin(hub):
    spawn = Spawn(hub, "basil", {"profile": "python39"})

    assert spawn.status == 500, spawn.body
    message = failure_message(hub, spawn)
    assert message == ("The hub's base image is missing: condaspawner-base:no-such-tag is not on the Docker host "
                       "(an admin builds it with `condaspawner base`); tell the hub admin")
    assert_one_clean_line(message)
    events = hub.progress("basil")
    assert events[-1]["failed"] and events[-1]["message"] == f"Spawn failed: {message}"
    assert not (hub.server_model("basil") or {}).get("ready")
