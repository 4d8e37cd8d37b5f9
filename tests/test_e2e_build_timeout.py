"""End to end: a build past ImageBuilder.build_timeout ends the spawn with one line and a 503.

The environment's pip section asks a loopback index for a package whose page never
comes while the test runs, so the build cannot end within the limit.
"""

from __future__ import annotations

import os
import uuid

import pytest
from pip_index import PipIndex
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


def slow_environment() -> str:
    return ("channels: [conda-forge]\ndependencies: [python=3.9, ipykernel, pip, {pip: [cs-slow==1.0]}]\n"
            f"variables: {{RUN: {uuid.uuid4().hex}}}\n")  # a new key: the spawn must build


def test_a_build_past_its_timeout_is_a_503_in_one_line(hub):
    spawn = Spawn(hub, "tim", {"profile": "python39", "environment": slow_environment()})

    message = failure_message(hub, spawn)
    assert spawn.status in (503, 202), spawn.body  # 503 on the POST when the failure came within 10 s
    assert message.startswith("Building this environment took too long: build took longer than 3 s "
                              "(ImageBuilder.build_timeout); ask the hub admin to prebuild it"), message
    assert_one_clean_line(message)
    assert_progress_page_says(hub, "tim", message)


def test_the_spawn_form_shows_the_same_line(hub):
    page = form_failure_page(hub, "tim-form", {"profile": "python39", "environment_text": slow_environment()})
    line = next(line for line in page.splitlines() if "Building this environment took too long" in line)
    message = line[line.index("Building this"):].split("<", 1)[0].strip()
    assert message.endswith("ask the hub admin to prebuild it (`condaspawner build`)"), message
    assert_page_says(page, message)
