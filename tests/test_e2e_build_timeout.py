"""End to end: a build past ImageBuilder.build_timeout ends the spawn with one line and a 503.

The environment's pip section asks a loopback index for a package whose page never
comes while the test runs, so the build cannot end within the limit.
"""

from __future__ import annotations

import os
import uuid

import pytest
from pip_index import PipIndex
from test_e2e_failures import Spawn, assert_one_clean_line, failure_message

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = """
import os
c.ImageBuilder.build_timeout = 3
c.ImageBuilder.pip_config = {"index-url": os.environ["CONDASPAWNER_TEST_SLOW_PIP_INDEX"], "trusted-host": "127.0.0.1"}
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 10}  # the failure answers the POST itself
"""


@pytest.fixture(scope="module", autouse=True)
def slow_index():
    with PipIndex() as index:
        gate = index.add("cs-slow", gated=True)
        os.environ["CONDASPAWNER_TEST_SLOW_PIP_INDEX"] = index.url
        yield index
        gate.set()
    os.environ.pop("CONDASPAWNER_TEST_SLOW_PIP_INDEX", None)


def test_a_build_past_its_timeout_is_a_503_in_one_line(hub):
    environment = ("channels: [conda-forge]\ndependencies: [python=3.9, ipykernel, pip, {pip: [cs-slow==1.0]}]\n"
                   f"variables: {{RUN: {uuid.uuid4().hex}}}\n")  # a new key: the spawn must build
    spawn = Spawn(hub, "tim", {"profile": "python39", "environment": environment})

    message = failure_message(hub, spawn)
    assert spawn.status in (503, 202), spawn.body  # 503 on the POST when the failure came within 10 s
    assert message.startswith("Building this environment took too long: build took longer than 3 s "
                              "(ImageBuilder.build_timeout); ask the hub admin to prebuild it"), message
    assert_one_clean_line(message)
    events = hub.progress("tim")
    assert events[-1]["failed"] and events[-1]["message"] == f"Spawn failed: {message}"
