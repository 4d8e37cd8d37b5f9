"""End to end: a real hub, proxy, daemon and local channel, on host networking (loopback)."""

from __future__ import annotations

import threading
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
from fixtures_hub import FAKE_GPU

pytestmark = pytest.mark.docker


def unique_env(extra: str = "cs-alpha") -> str:
    return (f"name: mine\nchannels: [conda-forge]\ndependencies: [python=3.9, ipykernel, {extra}]\n"
            f"variables: {{RUN: {uuid.uuid4().hex}}}\n")


def messages(events: list[dict]) -> list[str]:
    return [event["message"] for event in events]


def spawn_and_wait(hub, user: str, options: dict, server: str = "") -> tuple[list[dict], float]:
    started = time.monotonic()
    status, body = hub.spawn(user, options, server)
    assert status in (201, 202), body
    events = hub.progress(user, server)
    return events, time.monotonic() - started


async def test_first_spawn_builds_and_the_kernel_runs_in_the_env(hub):
    events, first_seconds = spawn_and_wait(hub, "ada", {"profile": "python39"})
    assert events[-1].get("ready"), events[-1]
    text = messages(events)
    phases = ("Looking up the image", "First build of this environment", "Solving ",
              "Solved: ", ("Downloading ", "Installing "), "Installed the conda environment (",
              "Planning the environment's layers",
              # the layered route; an earlier build may have compiled these packages already
              ("Compiling the environment's Python files", "Python files already compiled"),
              "Writing the environment as ",
              "Registering the kernel", "Tagged ", "Starting your server", "Server ready")
    order = [next((i for i, m in enumerate(text) if m.startswith(prefix)), None) for prefix in phases]
    assert None not in order and order == sorted(order), text
    assert not any(m.startswith("Step ") or "Dockerfile" in m for m in text), text  # phases, not docker's steps
    progress = [event["progress"] for event in events]
    assert progress == sorted(progress)

    status, specs = hub.user_api("ada", "/kernelspecs")
    assert status == 200 and specs["default"] == "python39"
    assert list(specs["kernelspecs"]) == ["python39"]  # the base image's own kernel is hidden
    assert specs["kernelspecs"]["python39"]["spec"]["display_name"] == "Python 3.9 (demo channel)"  # the profile's
    output = await hub.execute("ada", "python39", "import sys, os; print(sys.prefix, sys.version_info[:2], os.getuid())")
    assert output.split() == ["/opt/conda/envs/python39", "(3,", "9)", "1000"], output

    hub.stop_server("ada")
    events, second_seconds = spawn_and_wait(hub, "ada", {"profile": "python39"})
    assert events[-1].get("ready")
    assert any(m.endswith("(cached)") for m in messages(events))
    assert not any(m.startswith(("Writing ", "Solving")) for m in messages(events))
    # Timings are printed, not asserted (benchmarks/bench_spawn.py measures them).
    print(f"\nfirst spawn (build) {first_seconds:.1f} s; second spawn (cache hit) {second_seconds:.1f} s")
    hub.stop_server("ada")


async def test_custom_environment_via_rest_is_built_and_served(hub):
    events, _ = spawn_and_wait(hub, "grace", {"profile": "python39", "environment": unique_env("cs-beta")})
    assert events[-1].get("ready"), events[-1]
    model = hub.server_model("grace")
    assert model["user_options"]["profile"] == "python39"
    assert len(model["user_options"]["environment_key"]) == 64
    assert "cs-beta" in model["user_options"]["environment"]
    output = await hub.execute("grace", "custom", "import sys, os; print(sys.prefix, os.path.isdir(sys.prefix + '/share/cs-beta'))")
    assert output.split() == ["/opt/conda/envs/custom", "True"]
    hub.stop_server("grace")


async def test_a_renamed_profile_starts_its_image_at_once_under_the_new_name(hub):
    profiles = Path(hub.env["CONDASPAWNER_DEMO_PROFILES"])
    (profiles / "envs" / "renamed.yml").write_text(unique_env("cs-gamma").replace("name: mine\n", ""))
    profile = profiles / "55-renamed.yaml"
    profile.write_text('display_name: "Homework 1"\nslug: renamed\nenvironment: envs/renamed.yml\n')
    events, _ = spawn_and_wait(hub, "rena", {"profile": "renamed"})
    assert events[-1].get("ready") and any(m.startswith("First build") for m in messages(events)), messages(events)
    hub.stop_server("rena")
    profile.write_text('display_name: "Homework 1 (2026)"\nslug: renamed\nenvironment: envs/renamed.yml\n')
    events, _ = spawn_and_wait(hub, "rena", {"profile": "renamed"})
    assert events[-1].get("ready") and any(m.endswith("(cached)") for m in messages(events)), messages(events)
    assert not any(m.startswith(("First build", "Solving", "Writing ")) for m in messages(events)), messages(events)
    status, specs = hub.user_api("rena", "/kernelspecs")
    assert status == 200 and specs["kernelspecs"]["renamed"]["spec"]["display_name"] == "Homework 1 (2026)"
    hub.stop_server("rena")
    profile.unlink()


def test_hostile_environment_is_refused_with_400_and_nothing_built(hub):
    builds = hub.state / "builder" / "builds"
    before = set(builds.iterdir()) if builds.exists() else set()
    hostile = "channels: [conda-forge]\ndependencies:\n  - pip:\n    - git+https://evil.example/x.git\n"
    status, body = hub.spawn("mallory", {"profile": "python39", "environment": hostile})
    assert status == 400
    assert body["message"].startswith("environment.yml: dependencies[0].pip[0] (line 4): ")
    assert "URLs and version-control references are not allowed" in body["message"]
    status, body = hub.spawn("mallory", {"profile": "course-hw1", "environment": unique_env()})
    assert status in (400, 403)
    status, body = hub.spawn("mallory", {"profile": "no-such-profile"})
    assert status == 400 and "unknown profile" in body["message"]
    # misspelt, a REST body's environment would be ignored: the profile's own would start instead
    status, body = hub.spawn("mallory", {"profile": "python39", "environemnt": unique_env()})
    assert status == 400
    assert body["message"] == ("'environemnt' is not an option of a start (did you mean 'environment'?): "
                               "a start takes only 'profile' and 'environment'")
    assert hub.server_model("mallory") is None
    assert (set(builds.iterdir()) if builds.exists() else set()) == before


def test_a_start_without_options_after_a_refused_one_gets_the_last_accepted_options(hub):
    """JupyterHub saves a REST body's options before the spawner refuses them; a start without a
    body (the admin panel's Start) must not repeat the refused ones."""
    events, _ = spawn_and_wait(hub, "rita", {"profile": "python39"})
    assert events[-1].get("ready"), events[-1]
    hub.stop_server("rita")
    status, body = hub.spawn("rita", {"profile": "no-such-profile"})
    assert status == 400 and "unknown profile" in body["message"], body
    events, _ = spawn_and_wait(hub, "rita", None)
    assert events[-1].get("ready"), events[-1]
    assert hub.server_model("rita")["user_options"] == {"profile": "python39"}
    hub.stop_server("rita")


def test_a_start_that_fails_at_once_tells_the_progress_page_why_at_every_moment(hub):
    """JupyterHub answers the progress stream with 400 while it stops a start that failed: a
    progress page asking then never learns why. The spawner's part of that stop is instant."""
    def ask(answers: list) -> None:
        try:
            events = hub.progress("quinn", timeout=60)
            answers.append(events[-1].get("message", "") if events[-1].get("failed") else f"no failure: {events}")
        except urllib.error.HTTPError as error:  # what a page's EventSource gives up on
            answers.append(f"HTTP {error.code}: {error.read().decode(errors='replace')}")

    for _ in range(3):
        unsolvable = f"channels: [conda-forge]\ndependencies: [python=3.9, cs-gamaa]\nvariables: {{R: {uuid.uuid4().hex}}}\n"
        status, body = hub.spawn("quinn", {"profile": "python39", "environment": unsolvable})
        assert status in (201, 202), body
        # pages that load before, during and after the failure and its clean-up (~0.1 s after the POST)
        answers: list[str] = []
        askers = [threading.Timer(0.005 * index, ask, (answers,)) for index in range(80)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        assert len(answers) == 80 and all("cs-gamaa" in answer for answer in answers), sorted(set(answers))
    assert hub.server_model("quinn") is None


def test_outsider_gets_403_for_the_course_profile(hub):
    status, body = hub.spawn("outsider", {"profile": "course-hw1"})
    assert status == 403 and "not available to you" in body["message"]
    assert hub.server_model("outsider") is None


def test_two_users_same_new_environment_one_build(hub):
    environment = unique_env("cs-gamma")
    results: dict[str, list] = {}

    def spawn(user: str) -> None:
        results[user] = spawn_and_wait(hub, user, {"profile": "python39", "environment": environment})[0]

    threads = [threading.Thread(target=spawn, args=(user,)) for user in ("twin1", "twin2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert results["twin1"][-1].get("ready") and results["twin2"][-1].get("ready")
    key = hub.server_model("twin1")["user_options"]["environment_key"]
    assert key == hub.server_model("twin2")["user_options"]["environment_key"]
    images = {hub.server_model(user)["state"]["condaspawner"]["image"] for user in ("twin1", "twin2")}
    assert len(images) == 1
    (image,) = images
    assert hub.log().count(f"Building image {image} ") == 1
    for user in ("twin1", "twin2"):
        hub.stop_server(user)


def test_gpu_profile_creates_the_device_request_and_releases_the_gpu(hub, docker_daemon):
    client = docker_daemon.client()
    events, _ = spawn_and_wait(hub, "gpu1", {"profile": "gpu-demo"})
    assert events[-1].get("failed")
    failure = events[-1]["message"]
    assert "GPUs: " + FAKE_GPU in messages(events)
    # Docker here cannot select the nvidia driver: the user hears so in one line.
    assert failure == ("Spawn failed: The GPU could not be attached: Docker on this host has no NVIDIA runtime; "
                       "tell the hub admin"), failure
    (container,) = client.containers.list(all=True, filters={"label": "io.condaspawner.user=gpu1"})
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] == "host"
    (request,) = host["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == [FAKE_GPU]
    assert request["Capabilities"] == [["gpu"]]
    assert container.labels["io.condaspawner.gpus"] == FAKE_GPU
    assert f"CONDASPAWNER_GPUS={FAKE_GPU}" in container.attrs["Config"]["Env"]
    assert (host["CpuQuota"], host["Memory"]) == (200_000, 4 * 2**30)  # no profile limits: the config's 2 CPU, 4G
    # The failed server gave its GPU back: the next user gets the same (only) GPU.
    events, _ = spawn_and_wait(hub, "gpu2", {"profile": "gpu-demo"})
    assert "GPUs: " + FAKE_GPU in messages(events)
    assert "no GPU" not in events[-1]["message"] and "busy" not in events[-1]["message"]


def test_named_servers_have_their_own_environment(hub):
    events, _ = spawn_and_wait(hub, "nina", {"profile": "python39"}, server="second")
    assert events[-1].get("ready"), events[-1]
    status, _ = hub.user_api("nina", "/kernelspecs", server="second")
    assert status == 200
    hub.stop_server("nina", "second")


async def test_hub_restart_keeps_the_server_and_its_state(hub):
    events, _ = spawn_and_wait(hub, "rita", {"profile": "python39"})
    assert events[-1].get("ready")
    state_before = hub.server_model("rita")["state"]
    hub.stop()
    hub.start()
    model = hub.server_model("rita")
    assert model is not None and model["ready"], model
    assert model["state"]["condaspawner"] == state_before["condaspawner"]
    output = await hub.execute("rita", "python39", "import sys; print(sys.prefix)")
    assert output.strip() == "/opt/conda/envs/python39"
    hub.stop_server("rita")


async def test_containers_are_unprivileged_and_the_home_volume_survives_an_env_change(hub, docker_daemon):
    events, _ = spawn_and_wait(hub, "vera", {"profile": "python39", "environment": unique_env("cs-beta")})
    assert events[-1].get("ready"), events[-1]
    (container,) = docker_daemon.client().containers.list(filters={"label": "io.condaspawner.user=vera"})
    host = container.attrs["HostConfig"]
    assert not host["Privileged"] and not host.get("CapAdd")
    assert (host["CpuQuota"], host["Memory"]) == (100_000, 2 * 2**30)  # the profile's 1 CPU, 2G
    mounts = container.attrs["Mounts"]
    assert [(m["Type"], m["Destination"]) for m in mounts] == [("volume", "/home/jovyan")]
    assert not any("docker.sock" in (m.get("Source") or "") for m in mounts)
    assert container.image.attrs["Config"]["User"] == "jovyan"
    note = uuid.uuid4().hex
    await hub.execute("vera", "custom", f"open('/home/jovyan/note.txt', 'w').write({note!r})")

    hub.stop_server("vera")
    events, _ = spawn_and_wait(hub, "vera", {"profile": "python39"})  # another environment, another image
    assert events[-1].get("ready"), events[-1]
    assert (await hub.execute("vera", "python39", "print(open('/home/jovyan/note.txt').read())")).strip() == note
    hub.stop_server("vera")
