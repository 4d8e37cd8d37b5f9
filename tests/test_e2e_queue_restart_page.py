"""End to end, in a browser: a user watching a start wait for a GPU when the hub restarts.

The hub's restart ends the queued start (the queue lives in the hub process). The progress
page's stream then gets JupyterHub's "not starting" answer: the page must not keep saying
"Waiting for a GPU" for ever, but end on the spawn form that tells what became of the start.
"""

from __future__ import annotations

import pytest
from test_screenshots import browser, by_css, chromium, one, press, wait_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = """
c.GpuAllocator.device_mode = "nvidia-runtime"  # no NVIDIA runtime here: the fake GPU travels as an env var
"""


def test_a_progress_page_waiting_for_a_gpu_tells_the_user_when_the_hub_restarted(chromium, hub, browser):  # noqa: F811
    status, body = hub.spawn("restart-holder", {"profile": "gpu-demo"})  # the only GPU
    assert status in (201, 202), body
    assert hub.progress("restart-holder")[-1].get("ready")

    driver = browser
    driver.get(f"{hub.url}/hub/login")
    one(driver, "#username_input").send_keys("restart-waiter")
    press(driver, one(driver, "#login_submit"))
    wait_for(lambda: "/hub/login" not in driver.current_url, 30, "the login to go through")
    status, body = hub.spawn("restart-waiter", {"profile": "gpu-demo"})
    assert status in (201, 202), body
    driver.get(f"{hub.url}/hub/spawn-pending/restart-waiter")
    wait_for(lambda: "Waiting for a GPU" in one(driver, "#progress-message").text, 120, "the wait for a GPU")

    hub.stop()
    hub.start()
    wait_for(lambda: "/hub/spawn-pending/" not in driver.current_url, 120, "the page to leave the progress page")
    notice = ("Your last start of Fake A100 (CUDA 12.4) was waiting for a GPU when the hub restarted, and did not "
              "go on: start it again")
    wait_for(lambda: notice in one(driver, "body").text, 30, "the notice on the spawn form")
    assert by_css(driver, "[data-testid=condaspawner-form]")
    hub.stop_server("restart-holder")
