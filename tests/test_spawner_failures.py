"""Every failure of a start reaches the user as one line with a fitting status.

A CondaSpawner runs in-process with a stand-in user (as KubeSpawner tests its spawner in
mock mode) against the bench's real daemon and channel; each test breaks one part: the
base image, the daemon, the channel's files, the build's time. The end-to-end tests
(test_e2e_failures.py) show the same lines travel through a real hub.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import docker.auth
import docker.errors
import pytest
from fake_nvml import FakeNvml
from gated_daemon import GatedDaemon
from jupyterhub.objects import Hub
from pip_index import PipIndex
from stand_in_user import StandInUser
from test_gpuqueue import WatchedNvml, until
from traitlets.config import Config

from jupyterhub_condaspawner import gpuinventory, spawngpus
from jupyterhub_condaspawner.builder import BuildRequest, _StepTracker
from jupyterhub_condaspawner.buildmodel import request_for_profile
from jupyterhub_condaspawner.dockerbuild import OUTPUT_LINE_CHARS, OUTPUT_LINES
from jupyterhub_condaspawner.failures import StartFailure, explain, log_failure
from jupyterhub_condaspawner.gpus import Allocation, GpuUnavailable
from jupyterhub_condaspawner.spawner import CondaSpawner
from jupyterhub_condaspawner.spec import parse_environment
from jupyterhub_condaspawner.swarmspawner import CondaSwarmSpawner


def profiles_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "profiles"
    if directory.exists():
        return directory
    (directory / "envs").mkdir(parents=True)
    (directory / "10-py.yaml").write_text(
        "display_name: Python\nslug: py\nenvironment: envs/py.yml\nallow_custom_environment: true\n")
    (directory / "envs" / "py.yml").write_text("channels: [conda-forge]\ndependencies: [python=3.9, cs-alpha]\n")
    (directory / "20-gpu.yaml").write_text(
        'display_name: GPU\nslug: gpu\nenvironment: envs/py.yml\ngpus: 1\ncuda: "12.4"\n')
    return directory


def spawner_for(tmp_path: Path, channel_url: str, **settings) -> CondaSpawner:
    config = Config()
    config.ProfileCatalog.profiles_dir = str(profiles_dir(tmp_path))
    config.Resolver.channel_urls = {"conda-forge": channel_url}
    config.Resolver.package_cache_dir = str(tmp_path / "pkgs")
    config.ImageBuilder.cache_dir = str(tmp_path / "builder")
    config.ImageBuilder.image_repo = f"condaspawner-failtest-{uuid.uuid4().hex[:8]}"
    # Container names of this test's own (the daemon is shared: a hub test's alice runs jupyter-alice).
    config.DockerSpawner.prefix = "failtest-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]
    for dotted, value in settings.items():
        section, name = dotted.split("__")
        setattr(config[section], name, value)
    return CondaSpawner(user=StandInUser("alice"), hub=Hub(), config=config)


def unique_env() -> str:
    return f"channels: [conda-forge]\ndependencies: [python=3.9, cs-beta]\nvariables: {{RUN: {uuid.uuid4().hex}}}\n"


def start_behind_a_held_gpu(tmp_path: Path, channel_url: str, name: str, **settings
                            ) -> tuple[CondaSpawner, str, asyncio.Future]:
    """alice's start of the "gpu" profile on a host of one GPU, which "holder" holds: it builds,
    then waits in the queue. The spawner, the GPU and the start."""
    gpu = f"GPU-{name}-{uuid.uuid4().hex[:8]}"
    spawner = spawner_for(tmp_path, channel_url, GpuInventory__static_gpus=[{"uuid": gpu}],
                          GpuAllocator__queue_timeout=600.0, **settings)
    spawner.services.allocator.allocate("holder", "", 1)
    spawner.apply_choice({"profile": "gpu"})
    return spawner, gpu, asyncio.ensure_future(spawner.start())


async def failed_start(spawner: CondaSpawner, options: dict) -> tuple[StartFailure, list[str]]:
    spawner.apply_choice(options)
    with pytest.raises(StartFailure) as failure:
        await spawner.start()
    messages = [event["message"] async for event in spawner.progress()]
    assert "\n" not in failure.value.message
    assert failure.value.jupyterhub_message == failure.value.message  # what the progress page shows
    return failure.value, messages



async def test_a_failed_start_no_one_waited_for_is_logged_once_not_again_with_its_traceback(caplog):
    """JupyterHub's spawn handler waits a second for a start and leaves it running: a start that fails
    later is a task whose exception no one retrieves, which asyncio used to log again, traceback and all."""
    failure = StartFailure("pip could not install the pip: section: ...", reason="pip", status_code=400)
    log_failure(logging.getLogger("test-starts"), "carol", failure, failure)  # the spawner's one line

    async def start(error: Exception) -> None:
        raise error

    for error in (failure, ValueError("a bug of the hub's")):
        task = asyncio.ensure_future(start(error))
        await asyncio.sleep(0)  # it fails; nothing awaits it
        del task
        gc.collect()  # asyncio logs an exception no one retrieved when the task goes
    logged = [record for record in caplog.records if "never retrieved" in record.getMessage()]
    assert [type(record.exc_info[1]) for record in logged] == [ValueError]  # the unexpected still say so
    assert [record.getMessage() for record in caplog.records if record.name == "test-starts"] == [
        "Start of carol refused (400): pip could not install the pip: section: ..."]

@pytest.mark.docker
async def test_a_missing_base_image_is_the_admins_to_fix(tmp_path, docker_daemon, dev_python_channel):
    spawner = spawner_for(tmp_path, dev_python_channel.url, ImageBuilder__base_image="condaspawner-base:no-such-tag")

    failure, _ = await failed_start(spawner, {"profile": "py"})

    assert failure.status_code == 500
    assert failure.message == ("The hub's base image is missing: condaspawner-base:no-such-tag is not on the Docker "
                               "host (an admin builds it with `condaspawner base`); tell the hub admin")


async def test_an_unreachable_daemon_is_a_503_worth_retrying(tmp_path, monkeypatch, dev_python_channel):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    spawner = spawner_for(tmp_path, dev_python_channel.url)

    failure, _ = await failed_start(spawner, {"profile": "py"})

    assert (failure.status_code, failure.reason) == (503, "docker-unreachable")
    assert failure.message == "The Docker daemon cannot be reached: try again in a minute, or tell the hub admin"
    assert "no-daemon.sock" in failure.log_message  # the details go to the log


@pytest.mark.docker
async def test_a_build_past_build_timeout_says_so(tmp_path, docker_daemon, base_image, dev_python_channel):
    with PipIndex() as index:
        gate = index.add("cs-slow", gated=True)  # pip waits on it: the build cannot end in time
        spawner = spawner_for(tmp_path, dev_python_channel.url, ImageBuilder__build_timeout=2,
                              ImageBuilder__pip_config={"index-url": index.url, "trusted-host": "127.0.0.1"})
        environment = unique_env().replace("cs-beta]", "cs-beta, pip, {pip: [cs-slow==1.0]}]")
        try:
            failure, messages = await failed_start(spawner, {"profile": "py", "environment": environment})
        finally:
            gate.set()

    assert failure.status_code == 503
    assert failure.message.startswith("Building this environment took too long: build took longer than 2 s "
                                      "(ImageBuilder.build_timeout); ask the hub admin to prebuild it")
    assert messages[0].startswith("Looking up the image")


@pytest.mark.docker
async def test_a_package_the_channel_lost_fails_the_install_with_a_retry_hint(tmp_path, docker_daemon, base_image,
                                                                             dev_python_channel):
    channel = tmp_path / "channel"
    shutil.copytree(Path(dev_python_channel.url.removeprefix("file://")), channel)
    for package in (channel / "noarch").glob("cs-beta-*"):
        package.unlink()  # still in repodata.json: the solve succeeds, the download cannot
    spawner = spawner_for(tmp_path, channel.as_uri())

    failure, messages = await failed_start(spawner, {"profile": "py", "environment": unique_env()})

    assert (failure.status_code, failure.reason) == (503, "install")
    assert failure.message.startswith("Downloading or installing the packages failed: ")
    assert "cs-beta" in failure.message and "try again later" in failure.message
    assert any(message.startswith("Solved: ") for message in messages)
    assert any(message.startswith("Downloading ") for message in messages)


@pytest.mark.docker
async def test_a_spec_that_cannot_solve_is_the_users_to_fix_and_a_profiles_the_admins(tmp_path, docker_daemon,
                                                                                      base_image, dev_python_channel):
    spawner = spawner_for(tmp_path, dev_python_channel.url)
    bad = "channels: [conda-forge]\ndependencies: [python=3.9, no-such-package-xyz]\n"

    failure, _ = await failed_start(spawner, {"profile": "py", "environment": bad})
    assert (failure.status_code, failure.reason) == (400, "solve")
    assert failure.message.startswith("Your environment cannot be solved: ")
    assert "no-such-package-xyz" in failure.message

    (tmp_path / "profiles" / "envs" / "py.yml").write_text(bad)
    failure, _ = await failed_start(spawner_for(tmp_path, dev_python_channel.url), {"profile": "py"})
    assert failure.status_code == 500
    assert failure.message.startswith("This profile's environment cannot be solved: ")
    # the admin's to fix: the user passes on the build whose log says why
    assert re.search(r"; the profile's environment needs fixing: tell the hub admin "
                     r"\(build ([0-9a-f]{16}): `condaspawner log \1`\)$", failure.message), failure.message


async def test_a_gpu_profile_on_a_host_without_gpus_is_refused_at_submit(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")

    with pytest.raises(StartFailure) as refusal:
        spawner.apply_choice({"profile": "gpu"})

    assert refusal.value.status_code == 400
    assert refusal.value.message.startswith("No GPU on this hub fits: 0 of 0 ('gpu' needs 1 GPU for CUDA 12.4; ")
    assert "NVML" not in refusal.value.message and "NVML" in refusal.value.log_message
    with pytest.raises(ValueError, match="^No GPU on this hub fits: 0 of 0"):  # the form says the same
        await spawner.options_from_form_data({"profile": ["gpu"]})


FIRST_GPU_CHECKS = {
    "form": lambda spawner: spawner.options_from_form_data({"profile": ["gpu"]}),
    "link": lambda spawner: spawner.options_from_query({"profile": ["gpu"]}),
    "rest": lambda spawner: spawner._run_apply_user_options({"profile": "gpu"}),
}


@pytest.mark.parametrize("check", FIRST_GPU_CHECKS.values(), ids=list(FIRST_GPU_CHECKS))
async def test_the_hubs_first_nvml_scan_is_read_off_the_event_loop(tmp_path, monkeypatch, check):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")  # no table restore: no scan yet
    nvml = WatchedNvml(FakeNvml.with_gpus(1).gpus)
    nvml.loop_thread = threading.get_ident()
    nvml.gate.clear()  # the driver's first answer waits until this test, on the event loop, lets it go
    monkeypatch.setattr(gpuinventory, "_load_pynvml", lambda: nvml)
    spawner = spawner_for(tmp_path, "file:///nonexistent", GpuAllocator__gpu_sample_interval=0.0)

    checking = asyncio.ensure_future(check(spawner))
    await until(nvml.stuck.is_set)
    nvml.gate.set()  # the loop ran on while the first scan waited
    await checking

    assert nvml.on_loop == []
    assert spawner.services.allocator.known_scan().usable  # the check judged by the scan read in a thread


@pytest.mark.docker
async def test_no_gpu_is_handed_out_before_the_table_knows_what_running_servers_hold(tmp_path, docker_daemon,
                                                                                    rootfs_image):
    # DockerSpawner keeps one client per class: each spawner class here gets its own daemon.
    class DaemonDown(CondaSpawner):
        _client = None

    class DaemonUp(CondaSpawner):
        _client = None

    gpu = f"GPU-table-{uuid.uuid4().hex[:8]}"
    config = spawner_for(tmp_path, "file:///nonexistent").config
    config.GpuInventory.static_gpus = [{"uuid": gpu}]
    config.GpuAllocator.queue_timeout = 0
    config.DockerSpawner.client_kwargs = {"base_url": f"unix://{tmp_path}/no-daemon.sock"}
    down = DaemonDown(user=StandInUser("bob"), hub=Hub(), config=config)
    profile = down.services.catalog.get("gpu")
    assert not down.services.allocator.restored  # the hub started while its daemon did not answer
    with pytest.raises(StartFailure) as refusal:
        await down._allocate_gpus(profile)
    assert refusal.value.status_code == 503 and "\n" not in refusal.value.message
    assert refusal.value.message.startswith("The hub cannot tell yet which GPUs its servers hold (Docker: ")
    assert refusal.value.message.endswith("try again in a minute, or tell the hub admin")

    # The daemon answers again; a server started before the restart still runs on the GPU.
    holder = f"gpu-table-{uuid.uuid4().hex[:8]}"
    running = docker_daemon.client().containers.run(
        rootfs_image, ["sleep", "120"], detach=True, network_mode="host", name=holder,
        labels={"io.condaspawner.user": holder, "io.condaspawner.server": "", "io.condaspawner.gpus": gpu})
    try:
        config.DockerSpawner.client_kwargs = {"base_url": docker_daemon.docker_host}
        up = DaemonUp(user=StandInUser("bob"), hub=Hub(), config=config)
        with pytest.raises(GpuUnavailable, match="1 of the 1 GPU on this host match, 1 busy"):
            await up._allocate_gpus(profile)
        assert up.services.allocator.restored
        assert up.services.allocator.allocation(holder, "").uuids == (gpu,)
    finally:
        running.remove(force=True)


@pytest.mark.docker
async def test_gpu_starts_before_the_table_is_restored_restore_it_once_and_never_share_a_gpu(tmp_path, docker_daemon):
    class SlowDaemon(CondaSpawner):
        _client = None

    # The shared daemon lists other tests' GPU containers too: this GPU and these users are no one else's.
    gpu, run = f"GPU-only-one-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    config = spawner_for(tmp_path, "file:///nonexistent").config
    config.GpuInventory.static_gpus = [{"uuid": gpu}]
    config.GpuAllocator.queue_timeout = 0
    config.DockerSpawner.client_kwargs = {"base_url": f"unix://{tmp_path}/docker.sock"}
    alice, bob = (SlowDaemon(user=StandInUser(f"{name}-{run}"), hub=Hub(), config=config) for name in ("alice", "bob"))
    profile = alice.services.catalog.get("gpu")
    assert not alice.services.allocator.restored  # the hub started while its daemon did not answer
    with GatedDaemon(tmp_path / "docker.sock", docker_daemon.docker_host) as daemon:  # it answers now, slowly
        for spawner in (alice, bob):
            spawner._start_began = time.monotonic()
        starts = [asyncio.ensure_future(spawner._allocate_gpus(profile)) for spawner in (alice, bob)]
        await asyncio.to_thread(daemon.wait_for_listing)
        daemon.answer_all()
        results = await asyncio.gather(*starts, return_exceptions=True)

    assert len(daemon.listings) == 1  # bob's start waited for alice's restore instead of making its own
    # Either may get the GPU: after the restore each reads the GPU scan in a thread before it asks.
    granted = [result for result in results if isinstance(result, Allocation)]
    refused = [result for result in results if not isinstance(result, Allocation)]
    assert len(granted) == 1 and granted[0].uuids == (gpu,), results
    assert len(refused) == 1 and isinstance(refused[0], GpuUnavailable), results
    assert "1 of the 1 GPU on this host match, 1 busy" in str(refused[0])


@pytest.mark.docker
async def test_the_hubs_start_restores_the_gpu_table_in_a_thread_and_a_hung_driver_holds_it_up_only_so_long(
        tmp_path, monkeypatch, caplog, docker_daemon):
    nvml = WatchedNvml(FakeNvml.with_gpus(1).gpus)
    nvml.loop_thread = threading.get_ident()
    monkeypatch.setattr(gpuinventory, "_load_pynvml", lambda: nvml)
    with GatedDaemon(tmp_path / "docker.sock", docker_daemon.docker_host) as daemon:
        daemon.answer_all()

        def hub_starts() -> CondaSpawner:
            config = spawner_for(tmp_path, "file:///nonexistent").config
            config.DockerSpawner.client_kwargs = {"base_url": daemon.url}
            spawner = CondaSpawner(user=StandInUser("alice"), hub=Hub(), config=config)
            spawner.services  # the hub's services, on first use: the GPU table is restored
            return spawner

        try:
            assert hub_starts().services.allocator.restored
            assert daemon.listings and nvml.on_loop == []  # the daemon and NVML were read in a thread

            monkeypatch.setattr(spawngpus, "RESTORE_TIMEOUT_S", 1.0)
            nvml.gate.clear()  # the driver hangs: the hub goes on without its table after RESTORE_TIMEOUT_S
            allocator = hub_starts().services.allocator
            assert not allocator.restored
            assert "GPU allocations not restored from the servers' containers (the daemon or NVML did not answer " \
                   "within 1 s): GPU starts restore them first" in caplog.text
        finally:
            nvml.gate.set()
        await until(lambda: allocator.restored)  # the driver answers again: the restore ends by itself


# -- docker's build output, as the build sees it ----------------------------------------------


def tracker(pip: tuple[str, ...] = ()) -> _StepTracker:
    spec = dataclasses.replace(parse_environment("dependencies: [python=3.9]\n"), pip=pip)
    return _StepTracker(BuildRequest(spec, env_name="custom"), 101_000_000)


PIP_STEP = ("Step 9/19 : RUN set -e;     if [ -s /opt/condaspawner/requirements.txt ]; then         "
            "PIP_CONFIG_FILE=/opt/condaspawner/pip.conf /opt/conda/envs/${ENV_NAME}/bin/python -m pip install "
            "        --no-cache-dir -r /opt/condaspawner/requirements.txt;     fi")


def test_steps_become_phases_a_user_understands():
    steps = tracker(pip=("requests",))
    seen = [steps.feed(line) for line in (
        "Step 1/19 : ARG BASE_IMAGE", "Step 5/19 : COPY env /opt/conda/envs/${ENV_NAME}", " ---> 1f2e3d",
        "Step 6/19 : RUN /opt/conda/envs/${ENV_NAME}/bin/python -m compileall -q -j 0 /opt/x", PIP_STEP,
        "Collecting requests", "Step 12/19 : COPY kernel /opt/conda/share/jupyter/kernels/${ENV_NAME}")]
    assert [message for message in seen if message] == [
        "Writing the environment into the image (101 MB)", "Compiling the environment's Python files",
        "Installing 1 pip package in a container", "Registering the kernel"]


def test_a_pip_failure_is_pips_error_line_without_docker_noise():
    steps = tracker(pip=("definitely-not-a-real-pkg-xyz==1.0",))
    for line in (PIP_STEP, " ---> Running in 6ff3d16200dd",
                 "\x1b[91mERROR: Could not find a version that satisfies the requirement "
                 "definitely-not-a-real-pkg-xyz==1.0 (from versions: none)\x1b[0m",
                 "ERROR: No matching distribution found for definitely-not-a-real-pkg-xyz==1.0",
                 "Removing intermediate container 6ff3d16200dd"):
        steps.feed(line)
    error = steps.failure("The command '/bin/sh -c set -e; ...' returned a non-zero code: 1")
    assert (error.phase, error.cause) == ("pip", "No matching distribution found for definitely-not-a-real-pkg-xyz==1.0")
    failure = explain(error, custom_spec=True)
    assert failure.status_code == 400
    assert failure.message == ("pip could not install the pip: section: No matching distribution found for "
                               "definitely-not-a-real-pkg-xyz==1.0; check the pip: packages of your environment.yml")
    error.key = "0123456789abcdef" * 4
    assert explain(error, custom_spec=True).log_message == (  # the hub's log: key, phase in words, cause
        "build 0123456789abcdef failed installing the pip: section: No matching distribution found for "
        "definitely-not-a-real-pkg-xyz==1.0")


def test_a_steps_output_is_kept_to_its_last_lines_and_its_failure_is_still_pips_error_line():
    steps = tracker(pip=("cs-noisy==1.0",))
    steps.feed(PIP_STEP)
    for number in range(100_000):  # a failing build backend's output, which pip prints whole
        steps.feed(f"      noisy build backend: line {number}")
    steps.feed("x" * 1_000_000)
    steps.feed("ERROR: Failed to build installable wheels for some pyproject.toml based projects (cs-noisy)")

    assert len(steps.output) == OUTPUT_LINES and max(map(len, steps.output)) == OUTPUT_LINE_CHARS
    error = steps.failure("The command '/bin/sh -c set -e; ...' returned a non-zero code: 1")
    assert (error.phase, error.cause) == (
        "pip", "Failed to build installable wheels for some pyproject.toml based projects (cs-noisy)")


def test_an_unreachable_index_is_not_reported_as_a_missing_package():
    steps = tracker(pip=("requests",))
    for line in (PIP_STEP, "WARNING: Retrying (Retry(total=0)) after connection broken by "
                 "'NewConnectionError(\"Failed to establish a new connection: [Errno 111] Connection refused\")'",
                 "ERROR: No matching distribution found for requests"):
        steps.feed(line)
    error = steps.failure("returned a non-zero code: 1")
    assert error.unreachable and error.cause == "the package index could not be reached"
    failure = explain(error, custom_spec=True)
    assert failure.status_code == 503 and "try again later" in failure.message


def test_profiles_that_cannot_load_are_the_admins_and_their_paths_stay_in_the_log(tmp_path):
    directory = profiles_dir(tmp_path)
    for profile in directory.glob("*.yaml"):
        profile.write_text('display_name: "never closed\n')
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    with pytest.raises(StartFailure) as failure:
        spawner.apply_choice({"profile": "py"})
    assert failure.value.status_code == 500
    assert failure.value.message == "This hub's profiles cannot be read: tell the hub admin (the hub's log names " \
                                    "the problems)"
    assert str(directory) in failure.value.log_message and "never closed" in failure.value.log_message


@pytest.mark.docker
async def test_gc_keeps_the_image_of_a_start_waiting_for_a_gpu_and_one_removed_anyway_is_one_line(
        tmp_path, docker_daemon, base_image, dev_python_channel):
    spawner, _, start = start_behind_a_held_gpu(tmp_path, dev_python_channel.url, "pin", ImageBuilder__disk_budget=1)
    allocator, builder = spawner.services.allocator, spawner.services.builder
    async for event in spawner.progress():
        if event["message"].startswith("Waiting for a GPU"):
            break
    tag = spawner._image_info.tag

    # A budget no image fits in: gc would remove every image no container uses.
    result = await asyncio.to_thread(builder.gc)
    assert result.removed == [] and f"kept {tag}: a server is starting with it" in result.notes
    assert builder.find_image(spawner._image_info.key) is not None

    # An admin's `docker rmi -f` is not gc's to stop: the start says so instead of asking Docker Hub.
    docker_daemon.client().images.remove(tag, force=True)
    allocator.release("holder", "")
    with pytest.raises(StartFailure) as failure:
        await start
    assert (failure.value.status_code, failure.value.reason) == (503, "image-removed")
    assert failure.value.message == (f"The image of your environment ({tag}) was removed from the Docker host while "
                                     "your server started: start it again (it is built again)")
    assert allocator.allocation("alice", "") is None  # its GPU went back

    # The start ended: its image is gc's again.
    image = await spawner.services.builder.get_image(request_for_profile(spawner.services.catalog.get("gpu")))
    assert [removed.id for removed in (await asyncio.to_thread(builder.gc)).removed] == [image.image_id]


@pytest.mark.docker
async def test_a_start_cancelled_after_its_gpu_was_granted_gives_it_back(tmp_path, docker_daemon, base_image,
                                                                       dev_python_channel):
    spawner, gpu, start = start_behind_a_held_gpu(tmp_path, dev_python_channel.url, "cancel")
    allocator = spawner.services.allocator
    async for event in spawner.progress():
        if event["message"].startswith("Waiting for a GPU"):
            allocator.release("holder", "")
        if event["message"].startswith("GPUs:"):
            assert allocator.allocation("alice", "").uuids == (gpu,)
            start.cancel()  # the user's stop, as JupyterHub cancels a pending spawn
            break
    with pytest.raises(asyncio.CancelledError):
        await start
    assert await spawner.get_object() is None  # no container was created
    assert allocator.allocation("alice", "") is None
    assert allocator.allocate("next", "", 1).uuids == (gpu,)


@pytest.mark.docker
async def test_a_profile_withdrawn_while_its_start_waits_for_a_gpu_gets_no_gpu(tmp_path, docker_daemon, base_image,
                                                                               dev_python_channel):
    """An admin removes the profile (a course ended) while a start waits in the GPU queue: when
    the GPU frees, the start is refused in one line and the GPU goes to the next one."""
    spawner, gpu, start = start_behind_a_held_gpu(tmp_path, dev_python_channel.url, "withdrawn")
    allocator = spawner.services.allocator
    async for event in spawner.progress():
        if event["message"].startswith("Waiting for a GPU"):
            (profiles_dir(tmp_path) / "20-gpu.yaml").unlink()
            allocator.release("holder", "")
            break
    with pytest.raises(StartFailure) as failure:
        await start
    assert (failure.value.status_code, failure.value.reason) == (403, "access")
    assert failure.value.message == ("Your access to GPU was withdrawn while you waited for a GPU: choose another "
                                     "profile, or ask the hub admin")
    assert allocator.allocation("alice", "") is None
    assert allocator.allocate("next", "", 1).uuids == (gpu,)


@pytest.mark.docker
async def test_a_start_out_of_its_own_time_leaves_the_gpu_queue_in_one_line(tmp_path, docker_daemon, base_image,
                                                                           dev_python_channel):
    # JupyterHub would end it at start_timeout with an empty "Spawn failed: "; the queue ends it first.
    gpu = f"GPU-late-{uuid.uuid4().hex[:8]}"
    spawner = spawner_for(tmp_path, dev_python_channel.url, GpuInventory__static_gpus=[{"uuid": gpu}],
                          GpuAllocator__queue_timeout=600.0, Spawner__start_timeout=1)
    spawner.services.allocator.allocate("holder", "", 1)

    failure, _ = await failed_start(spawner, {"profile": "gpu"})

    assert (failure.status_code, failure.reason) == (503, "capacity")
    assert failure.message == ("No GPU is free on this hub: 0 of 1 ('gpu' needs 1 GPU for CUDA 12.4; try again when a "
                               "server stops) after waiting 0 s in the queue (Spawner.start_timeout)")


@pytest.mark.parametrize("spawner_class", [CondaSpawner, CondaSwarmSpawner])
async def test_a_poll_docker_does_not_answer_keeps_the_server(tmp_path, spawner_class, caplog):
    # Raised on, JupyterHub would take the server as stopped and (after a restart) clear its
    # state, while its container or service runs on and holds its GPUs.
    class Unanswered(spawner_class):
        _client = None

    config = spawner_for(tmp_path, "file:///nonexistent").config
    config.DockerSpawner.client_kwargs = {"base_url": f"unix://{tmp_path}/hung.sock", "timeout": 2}
    spawner = Unanswered(user=StandInUser("alice"), hub=Hub(), config=config)
    spawner.object_id = "c0ffee"  # a server the hub started earlier

    assert await spawner.poll() is None  # no daemon at all
    with socket.socket(socket.AF_UNIX) as hung:  # a daemon that takes the connection and never answers
        hung.bind(str(tmp_path / "hung.sock"))
        hung.listen(16)
        assert await spawner.poll() is None
    assert caplog.text.count("Cannot poll alice (Docker does not answer: ") == 2
    assert "taken as still running" in caplog.text and spawner.object_id == "c0ffee"


def test_a_hub_restarted_with_a_bad_gpu_setting_still_loads_its_gpu_servers(tmp_path, caplog):
    # JupyterHub loads every server's state as it starts: raised there, the hub would not start
    # at all (a traceback), where a bad setting is meant to keep the servers until it is fixed.
    spawner = spawner_for(tmp_path, "file:///nonexistent", GpuAllocator__queue_timeout="10 min")
    saved = {"object_id": "c0ffee", "object_name": "jupyter-alice",
             "condaspawner": {"key": "k", "image": "img:k", "image_id": "sha256:0", "env_name": "e",
                              "reference": "", "gpus": ["GPU-held"], "gpu_user": "alice", "port": 8888,
                              "gpu_idle_timeout": 30.0, "profile_name": "GPU"}}

    spawner.load_state(saved)

    assert "Loading alice without the hub's services (a setting in the hub's config: " in caplog.text
    assert "'queue_timeout' trait" in caplog.text
    # Saved again as it was: the hub restarted with the fix still knows the server's GPUs.
    assert spawner.get_state()["condaspawner"] == saved["condaspawner"]
    with pytest.raises(StartFailure) as refused:  # and a start is refused in one line
        spawner.services
    assert refused.value.message == "This hub's configuration has an error: tell the hub admin (the hub's log names the setting)"


class HungDaemon:
    """A unix socket that takes connections and never answers, counting them."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        for connection in self.held:
            connection.close()
        self.sock.close()


async def test_a_hung_swarm_manager_is_never_asked_on_the_hubs_event_loop(tmp_path):
    class HungManager(CondaSwarmSpawner):
        _client = None

    hung = HungDaemon(tmp_path / "manager.sock")
    try:
        config = spawner_for(tmp_path, "file:///nonexistent").config
        config.DockerSpawner.client_kwargs = {"base_url": f"unix://{tmp_path}/manager.sock", "timeout": 2}
        spawner = HungManager(user=StandInUser("ivan"), hub=Hub(), config=config)
        spawner.services  # the hub's services, on first use: no GPU table to restore from a swarm
        spawner.apply_choice({"profile": "gpu"})  # the REST options and the form: judged without the manager
        await spawner.options_from_form_data({"profile": ["gpu"]})
        assert hung.held == []

        with pytest.raises(docker.errors.DockerException, match="Read timed out"):  # the start asks it, off the loop
            await spawner.check_gpus_feasible_now(spawner.services.catalog.get("gpu"))
        assert hung.held  # asked from a thread (the GPU sampler asks it from one too)
    finally:
        hung.close()


async def test_a_swarm_service_carries_the_registry_credentials_docker_login_wrote_last(tmp_path, monkeypatch,
                                                                                        docker_daemon):
    class Rotating(CondaSwarmSpawner):
        _client = None

    def login(password: str) -> None:  # what `docker login` writes without a credential helper
        token = base64.b64encode(f"hub:{password}".encode()).decode()
        (tmp_path / "config.json").write_text(json.dumps({"auths": {"registry.example.edu:5000": {"auth": token}}}))

    def sent_password(spawner: CondaSwarmSpawner) -> str:  # the X-Registry-Auth docker-py would send
        header = docker.auth.get_config_header(spawner.client, "registry.example.edu:5000")
        return json.loads(base64.urlsafe_b64decode(header))["password"]

    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    login("first")
    config = spawner_for(tmp_path, "file:///nonexistent").config
    config.DockerSpawner.client_kwargs = {"base_url": docker_daemon.docker_host}
    spawner = Rotating(user=StandInUser("alice"), hub=Hub(), config=config)
    assert sent_password(spawner) == "first"
    login("rotated")  # a cron job renews a short-lived token

    await spawner.reload_registry_credentials()  # what each service's creation does first
    assert sent_password(spawner) == "rotated"


def test_what_a_packages_build_code_prints_is_not_pips_error_nor_an_unreachable_index():
    """pip shows a failing build's output between "[N lines of output]" and "[end of output]" (pip
    26's lines): its "Connection refused" and its "ERROR:" lines are the package's, not pip's; a block
    whose start the kept lines cut off is the package's too."""
    for head in ([PIP_STEP, "Collecting cs-fetcher==1.0", "  error: subprocess-exited-with-error",
                  "  × Preparing metadata (pyproject.toml) did not run successfully.", "  │ exit code: 1",
                  "  ╰─> [3 lines of output]"], [PIP_STEP]):
        steps = tracker(pip=("cs-fetcher==1.0",))
        for line in (*head, "      urllib.error.URLError: <urlopen error [Errno 111] Connection refused>",
                     "      ERROR: all is well, ask the hub admin", "      [end of output]",
                     "  note: This error originates from a subprocess, and is likely not a problem with pip.",
                     "error: metadata-generation-failed", "× Encountered error while generating package metadata.",
                     "╰─> cs-fetcher", "note: This is an issue with the package mentioned above, not pip."):
            steps.feed(line)
        error = steps.failure("returned a non-zero code: 1")
        assert (error.unreachable, error.cause) == (
            False, "Encountered error while generating package metadata (cs-fetcher)")
