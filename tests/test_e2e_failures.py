"""End to end, what a user sees when a start fails, when GPUs are busy, and across a hub restart.

A real hub, proxy and daemon (fixtures_hub), with a fake GPU handed to containers through
NVIDIA_VISIBLE_DEVICES ("nvidia-runtime" mode, so a GPU server really runs on this GPU-less
host) and the pip sections of builds pointed at a package index on loopback (pip_index).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures_hub import FAKE_GPU
from pip_index import HUB_PIP_CONFIG, served_to_hubs

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = HUB_PIP_CONFIG + """
c.GpuAllocator.device_mode = "nvidia-runtime"  # no NVIDIA runtime here: the fake GPU travels as an env var
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 3}  # quick failures answer the POST itself
# Spawns wait this long for a busy GPU, then hear "No GPU is free". Long enough for the queue
# test's two later spawns to line up behind the first while it still waits (about 5 s unloaded).
c.GpuAllocator.queue_timeout = 45
"""
GATED = "gated-package"
NO_SUCH = "definitely-not-a-real-pkg-xyz"


@pytest.fixture(scope="module", autouse=True)
def pip_index():
    with served_to_hubs() as index:
        yield index


def custom_env(conda: str = "cs-alpha", pip: list[str] | None = None) -> str:
    text = (f"channels: [conda-forge]\ndependencies:\n  - python=3.9\n  - ipykernel\n  - {conda}\n"
            f"variables: {{RUN: {uuid.uuid4().hex}}}\n")
    if pip:
        text = text.replace("variables:", "  - pip:\n" + "".join(f"    - {line}\n" for line in pip) + "variables:")
    return text


class Spawn:
    """One spawn through REST, its progress events collected live in a thread."""

    def __init__(self, hub, user: str, options: dict, server: str = ""):
        self.hub, self.user, self.server = hub, user, server
        self.events: list[dict] = []
        self.cut: BaseException | None = None  # the stream's end when the hub went away
        self.status, self.body = hub.spawn(user, options, server)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        if self.status == 202:  # still starting: the rest comes as progress events
            self._thread.start()
        elif self.status == 201:  # the POST waited until the server was up
            self.events.append({"progress": 100, "ready": True, "message": "ready when the POST returned"})

    def _follow(self) -> None:
        request = self.hub.progress_request(self.user, self.server)
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    if line.startswith(b"data:"):
                        self.events.append(json.loads(line[5:]))
                        if self.events[-1].get("ready") or self.events[-1].get("failed"):
                            return
        except (http.client.HTTPException, OSError) as error:  # a test that stops the hub ends the stream
            self.cut = error

    def wait(self, timeout: float = 600) -> dict:
        if self._thread.is_alive():
            self._thread.join(timeout)
        assert self.events, f"no progress events for {self.user} (POST said {self.status}: {self.body})"
        return self.events[-1]

    def wait_for(self, prefix: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(event["message"].startswith(prefix) for event in self.events):
            assert time.monotonic() < deadline, f"no {prefix!r} in {self.messages}"
            assert not (self.events and (self.events[-1].get("failed") or self.events[-1].get("ready"))), \
                self.messages
            time.sleep(0.2)

    @property
    def messages(self) -> list[str]:
        return [event["message"] for event in self.events]


def failure_message(hub, spawn: Spawn) -> str:
    """The one line a REST client gets: the POST's error, or the progress stream's last event."""
    if spawn.status >= 400:
        return spawn.body["message"]
    final = spawn.wait()
    assert final.get("failed"), final
    return final["message"].removeprefix("Spawn failed: ")


def assert_one_clean_line(message: str) -> None:
    assert "\n" not in message and "\x1b" not in message
    for noise in ("Traceback", "Step ", "/bin/sh", "HTTP 500", "Internal Server Error", "returned a non-zero"):
        assert noise not in message, message


def assert_progress_page_says(hub, user: str, message: str) -> None:
    """The progress page (what the browser shows after the form) ends with the same line."""
    events = hub.progress(user)
    assert events[-1]["failed"] and events[-1]["message"] == f"Spawn failed: {message}", events[-1]


def form_failure_page(hub, user: str, fields: dict[str, str]) -> str:
    """Submit the spawn form as a person does; the page they end on once the start failed:
    the form again (the hub waits a second for a quick failure) or the spawn-pending page."""
    session, _ = hub.login(user)
    _, url, page = session.post(f"/hub/spawn/{user}", fields)
    if "/spawn-pending/" in url:
        assert hub.progress(user)[-1]["failed"]
        _, url, page = session.get(f"/hub/spawn-pending/{user}")
    return page


def assert_page_says(page: str, message: str) -> None:
    """The page shows the one line, once, and none of the hub's generic error text."""
    assert page.count(message) == 1, page[-3000:]
    for noise in ("Traceback", "Internal Server Error", "Unhandled error"):
        assert noise not in page, page[-3000:]


def test_a_spec_that_validates_but_cannot_solve_is_a_400_with_the_reason(hub):
    log_start = len(hub.log())
    spawn = Spawn(hub, "frank", {"profile": "python39", "environment": custom_env("cs-gamaa")})

    assert spawn.status == 400, spawn.body
    message = spawn.body["message"]
    assert message.startswith("Your environment cannot be solved: ") and "cs-gamaa" in message, message
    assert message.endswith("check your environment.yml")
    assert_one_clean_line(message)
    assert hub.server_model("frank") is None
    assert_progress_page_says(hub, "frank", message)
    assert "Traceback" not in hub.log()[log_start:]


def test_a_form_file_with_several_problems_comes_back_with_every_problem(hub):
    many = (Path(__file__).parent / "corpus" / "hostile" / "many-problems.yml").read_text()
    page = form_failure_page(hub, "paula", {"profile": "python39", "environment_text": many})

    assert_page_says(page, "pasted environment.yml: 4 problems, listed under your environment.yml below")
    listed = page.split('data-testid="condaspawner-form-problems">')[1].split("</div>")[0]
    assert listed.count('data-testid="condaspawner-spec-problem"') == 4, listed
    assert "channels[0] (line 3): " in listed and "my-own-channel" in listed, listed
    assert hub.server_model("paula") is None


def test_refused_input_is_one_log_line_without_a_traceback(hub):
    log_start = len(hub.log())
    status, body = hub.spawn("mallory2", {"profile": "python39", "environment": "dependencies: [numpy; rm -rf /]"})

    assert status == 400 and body["message"].startswith("environment.yml: dependencies[0]")
    log = hub.log()[log_start:]
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if "Refused options" in line and "mallory2" in line]

    log_start = len(hub.log())  # the same input on the spawn form
    form_failure_page(hub, "mallory3", {"profile": "python39", "environment_text": "dependencies: [numpy; rm -rf /]"})
    log = hub.log()[log_start:]
    assert "Traceback" not in log and "Failed to spawn single-user server with form" not in log, log
    refused = [line for line in log.splitlines() if "Refused spawn form for mallory3" in line]
    assert len(refused) == 1 and "environment.yml: dependencies[0]" in refused[0], log


def test_a_refused_form_or_link_is_one_log_line_without_a_traceback(hub):
    log_start = len(hub.log())
    page = form_failure_page(hub, "linda", {"profile": "python39", "environment_text": custom_env("cs-gamaa")})
    assert "Your environment cannot be solved: " in page and "cs-gamaa" in page
    session, _ = hub.login("linda")
    status, _, page = session.get("/hub/spawn/linda?profile=no-such-profile")
    assert status == 400 and "profile: unknown profile 'no-such-profile'" in page

    log = hub.log()[log_start:]
    assert "Traceback" not in log and "Failed to spawn single-user server" not in log
    refused = [line for line in log.splitlines() if "Refused spawn link for linda (400)" in line]
    assert len(refused) == 1 and refused[0].startswith("[I "), refused
    assert refused[0].endswith("profile: unknown profile 'no-such-profile'")
    assert hub.server_model("linda") is None


def test_an_unsatisfiable_pip_section_names_the_requirement(hub, pip_index):
    spawn = Spawn(hub, "pipper", {"profile": "python39", "environment": custom_env(pip=[f"{NO_SUCH}==1.0"])})

    message = failure_message(hub, spawn)
    assert message.startswith("pip could not install the pip: section: "), message
    assert f"No matching distribution found for {NO_SUCH}==1.0" in message
    assert message.endswith("check the pip: packages of your environment.yml")
    assert_one_clean_line(message)
    if spawn.events:  # the build's phases, in words, and no raw Dockerfile step
        assert not any(m.startswith("Step ") for m in spawn.messages), spawn.messages
        assert any(m.startswith("Installing 1 pip package") for m in spawn.messages), spawn.messages


def test_a_gpu_request_this_hub_can_never_meet_is_refused_at_once(hub):
    profiles = hub.state / "profiles"
    (profiles / "45-two-gpus.yaml").write_text(
        'display_name: "Two fake GPUs"\nslug: two-gpus\nenvironment: envs/gpu.yml\ngpus: 2\ncuda: "12.4"\n')
    try:
        status, body = hub.spawn("greedy", {"profile": "two-gpus"})
    finally:
        (profiles / "45-two-gpus.yaml").unlink()

    assert status == 400, body
    assert body["message"].startswith("No GPU on this hub fits: 0 of 1 ('two-gpus' needs 2 GPUs"), body
    assert "pick another profile" in body["message"]
    assert hub.server_model("greedy") is None


def gpus_held(hub, user: str) -> list[str]:
    model = hub.server_model(user) or {}
    return (model.get("state") or {}).get("condaspawner", {}).get("gpus", [])


def test_no_gpu_is_held_while_an_image_builds_and_busy_gpus_are_queued_for(hub, pip_index):
    # The GPU profile's own image, built once so that later spawns of it are cache hits.
    first = Spawn(hub, "gpu-b", {"profile": "gpu-demo"})
    assert first.wait().get("ready"), first.messages
    hub.stop_server("gpu-b")

    gate = pip_index.add(GATED, gated=True)
    try:
        building = Spawn(hub, "gpu-a", {"profile": "gpu-demo",
                                        "environment": custom_env("cs-cuda-kernels", [GATED])})
        building.wait_for("Installing 1 pip package")  # gpu-a's build now waits on the index

        # Meanwhile the only GPU goes to somebody else; two more wait in line for it.
        other = Spawn(hub, "gpu-b", {"profile": "gpu-demo"})
        assert other.wait().get("ready"), other.messages
        assert gpus_held(hub, "gpu-b") == [FAKE_GPU]
        queued = Spawn(hub, "gpu-c", {"profile": "gpu-demo"})
        assert queued.status == 202, queued.body  # waiting, not refused
        queued.wait_for("Waiting for a GPU: you are next")
        behind = Spawn(hub, "gpu-d", {"profile": "gpu-demo"})
        behind.wait_for("Waiting for a GPU: 1 ahead of you")
        last = Spawn(hub, "gpu-e", {"profile": "gpu-demo"})
        last.wait_for("Waiting for a GPU: 2 ahead of you")
        hub.stop_server("gpu-d")  # cancelling leaves the queue: the one behind moves up
        last.wait_for("Waiting for a GPU: 1 ahead of you")
        assert hub.server_model("gpu-d") is None and not gpus_held(hub, "gpu-d")
        hub.stop_server("gpu-e")
        # Nobody stops gpu-b: after GpuAllocator.queue_timeout gpu-c hears why, in one line.
        message = failure_message(hub, queued)
        assert message.startswith("No GPU is free on this hub: 0 of 1 ('gpu-demo' needs 1 GPU"), message
        waited = re.search(r" after waiting (\d+) s in the queue \(GpuAllocator\.queue_timeout\)$", message)
        assert waited and int(waited[1]) >= 45 and "NVML" not in message, message  # rounded: a late wake-up says 46
        hub.stop_server("gpu-b")
        assert not any(m.startswith("GPUs: ") for m in building.messages), building.messages
    finally:
        gate.set()

    assert building.wait().get("ready"), building.messages
    text = building.messages
    assert text.index(f"GPUs: {FAKE_GPU}") > max(i for i, m in enumerate(text) if m.startswith("Installing 1 pip"))
    assert gpus_held(hub, "gpu-a") == [FAKE_GPU]
    hub.stop_server("gpu-a")


async def test_a_sigterm_restart_keeps_servers_and_their_gpus(hub):
    def restart() -> None:
        hub.stop()  # SIGTERM, as systemd, docker stop or Ctrl-C would
        left = [path.read_text() for path in (hub.state / "builder" / "notices").glob("*.json")]
        assert len(left) == 1 and '"gpu-q"' in left[0], left
        hub.start()

    await assert_a_restart_keeps_the_gpu_server(hub, ("gpu-r", "gpu-q", "gpu-c"), restart)
    after = Spawn(hub, "cpu-after-restart", {"profile": "python39"})
    assert after.wait().get("ready"), after.messages
    hub.stop_server("cpu-after-restart")


async def assert_a_restart_keeps_the_gpu_server(hub, users: tuple[str, str, str], restart: Callable[[], None]) -> None:
    """``users``: one whose GPU server runs, one whose start waits for its GPU, and one who asks for it
    once ``restart()`` has started the hub again. The server is kept with its GPU, the waiting start
    did not survive and its owner is told so on the next spawn page, and the GPU goes to the third only
    when the first stops."""
    running, queued, later = users
    spawn = Spawn(hub, running, {"profile": "gpu-demo"})
    assert spawn.wait().get("ready"), spawn.messages
    waiting = Spawn(hub, queued, {"profile": "gpu-demo"})
    waiting.wait_for("Waiting for a GPU: you are next")

    restart()

    model = hub.server_once_checked(running)
    assert model is not None and model["ready"], model
    output = await hub.execute(running, "gpu-demo", "import os; print(os.environ['CONDASPAWNER_GPUS'])")
    assert output.strip() == FAKE_GPU
    assert not (hub.server_model(queued) or {}).get("ready")
    page = hub.spawn_page(queued)
    assert "Your last start of Fake A100 (CUDA 12.4) was waiting for a GPU when the hub restarted" in page
    assert "was waiting for a GPU" not in hub.spawn_page(queued)  # told once

    next_one = Spawn(hub, later, {"profile": "gpu-demo"})
    next_one.wait_for("Waiting for a GPU: you are next")
    hub.stop_server(running)
    assert next_one.wait().get("ready"), next_one.messages
    assert gpus_held(hub, later) == [FAKE_GPU]
    hub.stop_server(later)


def spawn_held_in_pip(hub, pip_index, user: str):
    """``user`` spawns an environment whose pip step waits on the index's gated page: the gate, the
    environment and the spawn, once pip has asked for the page (the build prints nothing meanwhile)."""
    held = f"cs-held-{uuid.uuid4().hex[:6]}"
    gate = pip_index.add(held, gated=True)
    environment = custom_env(pip=[f"{held}==1.0"])
    spawn = Spawn(hub, user, {"profile": "python39", "environment": environment})
    deadline = time.monotonic() + 300
    while not any(held in path for path in pip_index.requested):
        if time.monotonic() > deadline:
            gate.set()
            raise AssertionError(spawn.messages)
        time.sleep(0.2)
    return gate, environment, spawn


def test_a_hub_stopped_mid_build_exits_and_tells_the_user_on_the_next_spawn_page(hub, pip_index):
    # The pip step waits on the index's page: the build prints nothing while the hub is told to stop.
    gate, environment, spawn = spawn_held_in_pip(hub, pip_index, "held")
    try:
        assert hub.stop(), "SIGTERM: the hub waited for the silent build step and was killed"
    finally:
        gate.set()
    hub.start()

    page = hub.spawn_page("held")
    assert "was building its environment when the hub restarted, and did not go on: start it again" in page
    assert "was building its environment" not in hub.spawn_page("held")  # told once
    again = Spawn(hub, "held", {"profile": "python39", "environment": environment})
    assert again.wait().get("ready"), again.messages
    hub.stop_server("held")


def test_a_leftover_running_container_is_replaced_not_reused(hub, docker_daemon, base_image):
    # A container the hub no longer knows about (a lost database, a killed test run) still runs.
    client = docker_daemon.client()
    for old in client.containers.list(all=True, filters={"name": "^/jupyter-leftover$"}):
        old.remove(force=True)  # from an interrupted earlier run
    leftover = client.containers.run(base_image, ["sleep", "600"], name="jupyter-leftover", detach=True,
                                     network_mode="host", labels={"io.condaspawner.user": "leftover"})
    try:
        spawn = Spawn(hub, "leftover", {"profile": "python39"})
        assert spawn.wait().get("ready"), spawn.messages
        current = client.containers.get("jupyter-leftover")
        assert current.id != leftover.id and current.status == "running"
        assert current.labels.get("io.condaspawner.key")
    finally:
        hub.stop_server("leftover")



def test_a_user_who_stops_a_start_mid_pip_is_told_it_was_cancelled_not_that_it_is_ready(hub, pip_index):
    # The pip step waits on the index's page when the user stops the start (DELETE, as "Stop My Server").
    gate, environment, spawn = spawn_held_in_pip(hub, pip_index, "held-stop")
    try:
        hub.stop_server("held-stop")
        final = spawn.wait()
        # JupyterHub's stream, ending in the second its stop waits after the cancel, said "Server ready"
        assert not final.get("ready") and final.get("failed"), spawn.messages
        assert final["message"].startswith("Spawn cancelled"), final
        assert_one_clean_line(final["message"])
    finally:
        gate.set()
    again = Spawn(hub, "held-stop", {"profile": "python39", "environment": environment})
    assert again.wait().get("ready"), again.messages
    hub.stop_server("held-stop")
