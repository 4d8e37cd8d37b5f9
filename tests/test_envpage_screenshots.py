"""The environments page as a person sees it: headless Chromium, screenshots.

A user opens the page from the hub's navigation bar and reads what changed between their two
environments; the hub admin prebuilds a profile from the admin page and watches its build log
arrive live (server-sent events: the builds table and the log, no reload) while a GPU server
holds the hub's fake A100. Screenshots go to ``test-artifacts/screenshots/environments-*.png``
(or ``$CONDASPAWNER_ARTIFACTS``).
"""

from __future__ import annotations

import uuid

import pytest
from fixtures_hub import FAKE_GPU
from pip_index import HUB_PIP_CONFIG, served_to_hubs
from test_e2e_envpage import own_env, spawn_and_wait
from test_screenshots import (  # noqa: F401 (chromium, browser, artifacts: fixtures)
    artifacts,
    browser,
    by_css,
    chromium,
    full_page_screenshot,
    one,
    page_errors,
    press,
    wait_for,
)

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = HUB_PIP_CONFIG + """
c.GpuAllocator.device_mode = "nvidia-runtime"  # no NVIDIA runtime here: the fake GPU travels as an env var
"""
GATED = "gated-envpage"
RUN = uuid.uuid4().hex
GATED_PROFILE = """
display_name: "Gated build (live log)"
slug: gated
environment: envs/gated.yml
"""


@pytest.fixture(scope="module", autouse=True)
def pip_index():
    with served_to_hubs() as index:
        yield index


def log_in(driver, hub, user: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{hub.url}/hub/login")
    one(driver, "#username_input").send_keys(user)
    press(driver, one(driver, "#login_submit"))
    wait_for(lambda: "/hub/login" not in driver.current_url, 30, "the login to go through")


def test_a_users_page_with_a_diff_and_the_admin_page_with_gpus_and_a_live_build(
        chromium, hub, browser, artifacts, pip_index):  # noqa: F811 (the fixtures imported above)
    driver = browser
    # carol's two environments (the second upgrades cs-alpha, drops cs-beta and cs-gamma);
    # dave's GPU server holds the fake A100.
    spawn_and_wait(hub, "carol", {"profile": "python39", "environment": own_env("cs-alpha=1.1", "cs-gamma")})
    hub.stop_server("carol")
    spawn_and_wait(hub, "carol", {"profile": "python39", "environment": own_env("cs-alpha=2.0")})
    hub.stop_server("carol")
    spawn_and_wait(hub, "dave", {"profile": "gpu-demo"})

    # The user's page, from the navigation bar: the newest environment, with what changed.
    log_in(driver, hub, "carol")
    driver.get(f"{hub.url}/hub/home")
    press(driver, one(driver, "#nav-environments"))
    wait_for(lambda: by_css(driver, "#environments"), 30, "the environments page")
    assert one(driver, "h1").text == "Your environments"
    assert len(by_css(driver, "#environments tbody tr")) == 2
    assert not by_css(driver, "#admin-link")  # carol is no admin
    summary = one(driver, "#diff-summary").text
    assert "2 removed (cs-beta 1.0, cs-gamma 0.5)" in summary and "1 upgraded (cs-alpha 1.1 -> 2.0)" in summary
    assert "cs-alpha 1.1 → 2.0" in one(driver, "#diff").text
    assert "cs-alpha" in one(driver, "#packages").text
    for link in ("#download-yml", "#download-lock", "#download-log", "#start-with"):
        assert one(driver, link).is_displayed()
    assert page_errors(driver) == []
    full_page_screenshot(driver, artifacts / "environments-user.png")
    # Dark mode (the hub's theme toggle sets Bootstrap's data-bs-theme): the page follows it.
    driver.execute_script("document.documentElement.setAttribute('data-bs-theme', 'dark')")
    background = driver.execute_script("return getComputedStyle(document.querySelector('#detail')).backgroundColor")
    assert background not in ("rgb(255, 255, 255)", "rgba(0, 0, 0, 0)"), background
    full_page_screenshot(driver, artifacts / "environments-user-dark.png")

    # Not for her: the admin page answers with one line.
    driver.get(f"{hub.url}/hub/environments/admin")
    assert one(driver, "#failure").text == "this needs the custom:condaspawner:admin scope (hub admins have it)"
    assert [error for error in page_errors(driver)  # but the refusal's own status
            if not ("/hub/environments/admin" in error and "status of 403 (Forbidden)" in error)] == []

    # The admin prebuilds a profile whose pip step waits on the index: the build runs while we look.
    profiles = hub.state / "profiles"
    (profiles / "envs" / "gated.yml").write_text(
        f"channels: [conda-forge]\ndependencies:\n  - python=3.9\n  - ipykernel\n  - pip:\n    - {GATED}\n"
        f"variables: {{RUN: {RUN}}}\n")
    (profiles / "60-gated.yaml").write_text(GATED_PROFILE)
    gate = pip_index.add(GATED, gated=True)
    log_in(driver, hub, "admin")
    driver.get(f"{hub.url}/hub/environments/admin")
    wait_for(lambda: by_css(driver, "#prebuild-form"), 30, "the admin page")
    from selenium.webdriver.support.ui import Select
    Select(one(driver, "#prebuild-form select")).select_by_value("gated")
    press(driver, one(driver, "#prebuild-form button"))
    wait_for(lambda: by_css(driver, "#notice"), 30, "the prebuild's notice")
    assert one(driver, "#notice").text.startswith("building Gated build (live log)")
    # The page was drawn right after the build began: the builds table and the log follow it live.
    wait_for(lambda: "solved:" in one(driver, "#build-log").text, 300, "the live log's first lines")
    assert "Gated build (live log)" in one(driver, "#builds").text
    assert one(driver, "#builds-state").text == "live"
    gpus = one(driver, "#gpus").text
    assert "NVIDIA A100-SXM4-80GB" in gpus and "dave" in gpus and "held_" in gpus
    assert FAKE_GPU[:12] in gpus
    assert "Live" in one(driver, "#build-log-state").text
    full_page_screenshot(driver, artifacts / "environments-admin.png")

    # Let the build finish: the same stream says so.
    gate.set()
    wait_for(lambda: "The build ended: built." in one(driver, "#build-log-state").text, 600, "the build's end")
    wait_for(lambda: one(driver, "#no-builds").is_displayed(), 60, "the builds table to empty, without a reload")
    assert not one(driver, "#builds-table").is_displayed()
    assert page_errors(driver) == []
    hub.stop_server("dave")
