"""ImageBuilder on the real daemon, base image and local channel (pip from a loopback index)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest
from fixtures_docker import bench_dir, remove_repo_images
from kernel_script import kernel_round_trip
from pip_index import PipIndex, sdist, tiny_wheel

from condaspawner_bench.basewheels import served
from condaspawner_bench.ports import free_port
from jupyterhub_condaspawner import madeids
from jupyterhub_condaspawner.buildcontext import KERNEL_DISPLAY_NAME_VARIABLE
from jupyterhub_condaspawner.builder import LABEL_KEY, BuildError, BuildRequest, ImageBuilder
from jupyterhub_condaspawner.buildlog import LOG_HEAD_BYTES, LOG_TAIL_BYTES
from jupyterhub_condaspawner.buildmodel import (
    LABEL_BASE_IMAGE,
    LABEL_ENV_NAME,
    LABEL_LOCK_DIGEST,
    LABEL_SPEC,
    request_for_profile,
)
from jupyterhub_condaspawner.failures import explain
from jupyterhub_condaspawner.profiles import Profile
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.spec import SpecPolicy

pytestmark = pytest.mark.docker
SESSION = uuid.uuid4().hex[:8]


def write_wheel(directory: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel whose module reports its version, in ``directory``."""
    filename, data = tiny_wheel(name, version)
    wheel = directory / filename
    wheel.write_bytes(data)
    return wheel


@pytest.fixture(scope="module")
def wheel_index(tmp_path_factory):
    """A find-links directory served on 127.0.0.1, so pip in builds stays on loopback."""
    directory = tmp_path_factory.mktemp("wheels")
    for version in ("1.0", "1.1"):
        write_wheel(directory, "cs-hello", version)
    with served(directory) as url:
        yield directory, url


@pytest.fixture(scope="module")
def builder(docker_daemon, base_image, dev_python_channel, wheel_index, tmp_path_factory):
    cache = tmp_path_factory.mktemp("builder-cache")
    # The bench's package cache, shared as a hub's is: a cold one would only unpack the same packages again.
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url}, package_cache_dir=str(bench_dir() / "pkgs"))
    yield ImageBuilder(
        resolver=resolver,
        docker_client=docker_daemon.client(),
        base_image=base_image,
        cache_dir=str(cache),
        image_repo=f"condaspawner-test-{SESSION}",
        pip_config={"no-index": "true", "find-links": wheel_index[1]},
        build_network_mode="host",  # the wheels are served on loopback; the bench daemon has no bridge
    )
    remove_repo_images(docker_daemon.client(), f"condaspawner-test-{SESSION}")


def request(text: str, **kwargs) -> BuildRequest:
    return BuildRequest(SpecPolicy().parse(textwrap.dedent(text)), **kwargs)


def unique_env(pip: list[str] = (), extra: str = "") -> BuildRequest:
    """A request whose key no earlier test built (a unique variable).

    Without ``extra`` its conda packages and env name are those of the other requests
    here, so docker reuses their conda layers (COPY, compileall): a test about keys,
    dedup or queues does not pay a full build each time.
    """
    lines = ["channels: [conda-forge]", "dependencies:", "  - python=3.9", "  - ipykernel"]
    if extra:
        lines.append(f"  - {extra}")
    if pip:
        lines += ["  - pip:"] + [f"    - {p}" for p in pip]
    lines += ["variables:", f"  TEST_ID: {uuid.uuid4().hex}"]
    return request("\n".join(lines) + "\n", env_name="demo", kernel_display_name='Demo "quoted" env')


async def collect(build) -> list[dict]:
    return [event async for event in build.follow()]


async def test_build_then_cache_hit(builder):
    req = unique_env(pip=["cs-hello==1.0"])
    before = builder.builds_started
    build = builder.ensure(req)
    events, info = await asyncio.gather(collect(build), build.result())
    assert not info.cached and builder.builds_started == before + 1
    phases = [event["phase"] for event in events]
    assert phases[0] == "solve" and phases[-1] == "ready"
    # the layered route: the kernel spec is in the loaded layers, the pip section a docker build on them
    order = ["solve", "install", "plan", "compile", "build", "kernel", "pip", "tag", "ready"]
    assert [p for p in dict.fromkeys(phases)] == order
    progress = [event["progress"] for event in events]
    assert progress == sorted(progress) and progress[-1] == 100
    messages = [event["message"] for event in events]
    assert "Installing 1 pip package in a container" in messages
    assert not any(message.startswith("Step ") for message in messages)  # docker's steps stay in the log

    image = builder.client.images.get(info.tag)
    assert image.labels[LABEL_KEY] == info.key and info.tag.endswith(info.key[:16])
    assert json.loads(image.labels[LABEL_SPEC])["pip"] == ["cs-hello==1.0"]
    assert image.labels[LABEL_ENV_NAME] == "demo" and len(image.labels[LABEL_LOCK_DIGEST]) == 64
    assert (builder.key_dir(info.key) / "build.log").read_text().count("Step ") >= 5
    assert json.loads((builder.key_dir(info.key) / "lock.json").read_text())["packages"]
    # the staging folder is out of the key's way once the image is ready, and gone soon after
    staged = Path(builder.cache_dir) / "staging"
    assert not (staged / info.key).exists()
    await builder.finish_removals()
    assert not list(staged.glob(f"*{info.key}"))

    started = time.perf_counter()
    again = await builder.get_image(req)
    assert again.cached and again.image_id == info.image_id
    assert builder.builds_started == before + 1  # no second docker build
    assert builder.lookup(req).image_id == info.image_id
    used = builder.last_used(info.key)
    assert builder.is_cached(req) and builder.last_used(info.key) == used  # a form badge is not a use
    print(f"first build {info.seconds:.1f} s, cache hit {time.perf_counter() - started:.3f} s")


async def test_pip_only_change_reuses_the_conda_layer(builder):
    marker = uuid.uuid4().hex
    first = await builder.get_image(request(f"""
        dependencies: [python=3.9, ipykernel, 'pip']
        variables: {{TEST_ID: {marker}}}
        """, env_name="demo"))
    second = await builder.get_image(request(f"""
        dependencies: [python=3.9, ipykernel, 'pip', {{pip: [cs-hello==1.1]}}]
        variables: {{TEST_ID: {marker}}}
        """, env_name="demo"))
    assert first.key != second.key
    layers = [builder.client.images.get(i.image_id).attrs["RootFS"]["Layers"] for i in (first, second)]
    base_layers = len(builder.client.images.get(builder.base_image).attrs["RootFS"]["Layers"])
    # base, then the environment's layers (packages, compiled; then conda-meta): all shared; only the pip layers differ.
    assert layers[0][: base_layers + 2] == layers[1][: base_layers + 2]
    assert layers[0][base_layers + 2:] != layers[1][base_layers + 2:]


async def test_concurrent_requests_share_one_build(builder):
    req = unique_env()
    before = builder.builds_started
    results = await asyncio.gather(*(builder.get_image(req) for _ in range(20)))
    assert builder.builds_started == before + 1
    assert len({(r.key, r.image_id, r.tag) for r in results}) == 1


async def test_late_joiner_sees_the_same_progress_stream(builder):
    req = unique_env()
    first = builder.ensure(req)
    first_events = asyncio.ensure_future(collect(first))
    await asyncio.sleep(0.5)
    joined = builder.ensure(req)
    assert joined is first
    assert await collect(joined) == await first_events


async def test_failing_pip_requirement_is_clear_and_retry_works(builder, wheel_index):
    package = f"cs-late-{uuid.uuid4().hex[:6]}"
    req = unique_env(pip=[f"{package}==1.0"])
    key = builder.build_key(req)
    build = builder.ensure(req)
    events = asyncio.ensure_future(collect(build))
    with pytest.raises(BuildError) as info:
        await build.result()
    message = str(info.value)
    assert "\n" not in message and len(message) < 700
    assert message == f"pip: No matching distribution found for {package}==1.0"
    assert (info.value.phase, info.value.key) == ("pip", key)
    assert (await events)[-1]["phase"] == "error"
    assert builder.find_image(key) is None
    assert not (Path(builder.cache_dir) / "staging" / key).exists()
    assert package.replace("-", "_") in (builder.key_dir(key) / "build.log").read_text().lower() or \
        package in (builder.key_dir(key) / "build.log").read_text()

    write_wheel(wheel_index[0], package, "1.0")  # the index gains it: the next request retries
    retried = await builder.get_image(req)
    assert not retried.cached and builder.find_image(key) is not None


async def test_built_image_serves_the_env_kernel(builder, docker_daemon):
    info = await builder.get_image(unique_env(pip=["cs-hello==1.0"]))
    client = docker_daemon.client()
    port = free_port()
    server = client.containers.run(
        info.tag,
        ["jupyter", "server", f"--port={port}", "--ip=127.0.0.1", "--IdentityProvider.token=t0ken"],
        network_mode="host", detach=True, environment={KERNEL_DISPLAY_NAME_VARIABLE: 'Demo "quoted" env'},
    )
    try:
        specs = wait_for_json(f"http://127.0.0.1:{port}/api/kernelspecs?token=t0ken")
        assert specs["default"] == "demo"
        assert specs["kernelspecs"]["demo"]["spec"]["display_name"] == 'Demo "quoted" env'  # as the spawner says
        script = kernel_round_trip("import sys, cs_hello; (sys.prefix, sys.version_info[:2], cs_hello.VERSION)", "demo")
        output = client.containers.run(info.tag, ["python", "-c", script], network_mode="host", remove=True)
        assert output.decode().strip().splitlines()[-1] == "ok ('/opt/conda/envs/demo', (3, 9), '1.0')"
    finally:
        server.remove(force=True)


async def test_a_renamed_profile_keeps_its_image_and_its_server_shows_the_new_name(builder, docker_daemon):
    text = f"channels: [conda-forge]\ndependencies: [python=3.9, ipykernel]\nvariables: {{RUN: {uuid.uuid4().hex}}}\n"
    spec = SpecPolicy().parse(text)
    before, after = (request_for_profile(Profile(slug="course", display_name=name, source="test", environment=spec))
                     for name in ("Course 2025", "Course 2026"))
    assert builder.build_key(before) == builder.build_key(after)
    first = await builder.get_image(before)
    again = await builder.get_image(after)
    assert again.cached and again.image_id == first.image_id  # nothing solved, installed or stored again
    port = free_port()
    server = docker_daemon.client().containers.run(
        again.tag, ["jupyter", "server", f"--port={port}", "--ip=127.0.0.1", "--IdentityProvider.token=t0ken"],
        network_mode="host", detach=True, environment={KERNEL_DISPLAY_NAME_VARIABLE: after.kernel_name})
    try:
        specs = wait_for_json(f"http://127.0.0.1:{port}/api/kernelspecs?token=t0ken")
        assert specs["kernelspecs"]["course"]["spec"]["display_name"] == "Course 2026"
    finally:
        server.remove(force=True)


# A base image's own server config, where the base's server reads it (its sys-prefix folder).
BASE_SERVER_CONFIG = 'c.ServerApp.tornado_settings = {"headers": {"X-Base-Config": "in force"}}\n'


@pytest.fixture(scope="module")
def base_with_its_own_server_config(docker_daemon, base_image):
    """The bench's base with a /opt/conda/etc/jupyter/jupyter_server_config.py of its own."""
    client, tag = docker_daemon.client(), f"condaspawner-test-base-{SESSION}:own-server-config"
    files = {"Dockerfile": f"FROM {base_image}\nCOPY jupyter_server_config.py /opt/conda/etc/jupyter/\n",
             "jupyter_server_config.py": BASE_SERVER_CONFIG}
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    yield tag
    remove_repo_images(client, tag.split(":")[0])


@pytest.mark.parametrize("layered", [True, False], ids=["layered", "dockerfile"])
async def test_a_base_images_own_server_config_stays_in_force_beside_ours(
        builder, base_with_its_own_server_config, docker_daemon, layered):
    on_own_base = ImageBuilder(resolver=builder.resolver, docker_client=builder.client,
                               base_image=base_with_its_own_server_config, cache_dir=builder.cache_dir,
                               image_repo=builder.image_repo, build_network_mode="host", layered_images=layered)
    info = await on_own_base.get_image(unique_env())
    port = free_port()
    server = docker_daemon.client().containers.run(
        info.tag, ["jupyter", "server", f"--port={port}", "--ip=127.0.0.1", "--IdentityProvider.token=t0ken"],
        network_mode="host", detach=True, environment={KERNEL_DISPLAY_NAME_VARIABLE: "Course 2026"})
    try:
        specs, headers = wait_for_response(f"http://127.0.0.1:{port}/api/kernelspecs?token=t0ken")
        assert headers.get("X-Base-Config") == "in force"  # the base's file was not replaced
        assert specs["default"] == "demo" and list(specs["kernelspecs"]) == ["demo"]  # our settings too
        assert specs["kernelspecs"]["demo"]["spec"]["display_name"] == "Course 2026"
    finally:
        server.remove(force=True)


async def test_gc_removes_least_recently_used_but_never_an_image_in_use(builder, docker_daemon):
    client = docker_daemon.client()
    old, used = [await builder.get_image(unique_env()) for _ in range(2)]
    ages = {image.labels[LABEL_KEY]: 0 for image in builder.images()}
    ages.update({used.key: 400, old.key: 300})  # `used` is the oldest, but a container uses it
    for key, age in ages.items():
        stamp = time.time() - age
        os.utime(builder.key_dir(key) / "last-used", (stamp, stamp))
    container = client.containers.create(used.tag, ["true"], network_mode="host")
    keep = builder.max_images
    try:
        builder.max_images = len(ages) - 1
        assert [image.id for image in builder.gc_plan().removed] == [old.image_id]
        assert [image.id for image in builder.gc(dry_run=True).removed] == [old.image_id]
        assert builder.find_image(old.key) is not None
        assert [image.id for image in builder.gc().removed] == [old.image_id]
        assert builder.find_image(old.key) is None and builder.find_image(used.key) is not None
        assert client.images.get(builder.base_image)  # never the base
    finally:
        builder.max_images = keep
        container.remove(force=True)


async def test_gc_keeps_a_profiles_prebuilt_image_however_long_ago_it_was_used(builder):
    # The instructor prebuilt the homework last week; students' own environments came since.
    # gc (a nightly cron job) must not undo the prebuild: the class would wait for a build again.
    run = uuid.uuid4().hex
    course = Profile(slug="cs101-hw2", display_name="CS101 HW 2", source="test", environment=SpecPolicy().parse(
        f"channels: [conda-forge]\ndependencies: [python=3.9, ipykernel]\nvariables: {{RUN: {run}}}\n"))
    prebuilt = await builder.get_image(request_for_profile(course))
    students = await builder.get_image(unique_env())
    ages = {image.labels[LABEL_KEY]: 0 for image in builder.images()}
    ages.update({prebuilt.key: 900, students.key: 300})  # the prebuilt image is the least recently used
    for key, age in ages.items():
        stamp = time.time() - age
        os.utime(builder.key_dir(key) / "last-used", (stamp, stamp))
    keep = builder.profile_images([course])
    assert keep == {prebuilt.key: "profile cs101-hw2"}
    limit = builder.max_images
    try:
        builder.max_images = len(ages) - 1
        plan = builder.gc_plan(keep)
        assert [image.id for image in plan.removed] == [students.image_id]
        assert f"kept {prebuilt.tag}: the current image of profile cs101-hw2" in plan.notes
        assert [image.id for image in builder.gc(keep=keep).removed] == [students.image_id]
        assert builder.find_image(prebuilt.key) is not None
    finally:
        builder.max_images = limit


async def test_students_files_that_differ_only_in_their_name_share_one_build(builder):
    profile = Profile(slug="course", display_name="Course", source="test", allow_custom_environment=True)
    run = uuid.uuid4().hex
    texts = [f"name: {name}\nchannels: [conda-forge]\ndependencies: [{deps}]\nvariables: {{RUN: {run}}}\n"
             for name, deps in (("hw", "python=3.9, ipykernel"), ("other-name", "ipykernel, python 3.9.*"))]
    texts.append(f"channels: [conda-forge]\ndependencies: [python=3.9, ipykernel]\nvariables: {{RUN: {run}}}\n")
    requests = [request_for_profile(profile, SpecPolicy().parse(text)) for text in texts]
    assert len({builder.build_key(req) for req in requests}) == 1
    # and `condaspawner build FILE` (no profile) prebuilds that same image: the kernel's name is not in it
    assert builder.build_key(BuildRequest(requests[0].spec)) == builder.build_key(requests[0])
    assert [req.display_name for req in requests] == ["hw", "other-name", "My environment"]  # how pages name them

    first = await builder.get_image(requests[0])
    assert [(await builder.get_image(req)).cached for req in requests[1:]] == [True, True]
    # A trailing newline: Docker's log of a container that just exited may lack a last partial line.
    kernel = builder.client.containers.run(first.tag, ["sh", "-c", 'cat "$0"; echo',
                                                       "/opt/conda/share/jupyter/kernels/custom/kernel.json"],
                                           remove=True, network_mode="host")
    assert json.loads(kernel)["display_name"] == "custom"  # no one's name: the server is told "My environment"
    first_line = (builder.key_dir(first.key) / "build.log").read_text().splitlines()[0]
    assert "hw" not in first_line.split() and "(custom)" in first_line  # the shared log names no one's file


async def test_gc_reads_0_as_no_limit_for_both_max_images_and_disk_budget(builder):
    await builder.get_image(unique_env())
    keep = builder.max_images, builder.disk_budget
    try:
        builder.max_images, builder.disk_budget = 0, 0
        assert builder.gc_plan().removed == []
        builder.disk_budget = 1  # one byte: every image no container uses goes
        assert len(builder.gc_plan().removed) == len(builder.images())
    finally:
        builder.max_images, builder.disk_budget = keep


def wait_for_json(url: str, timeout: float = 60) -> dict:
    return wait_for_response(url, timeout)[0]


def wait_for_response(url: str, timeout: float = 60) -> tuple[dict, Any]:
    """The JSON a server answers once it is up, and its response headers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response), response.headers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


async def test_two_hub_processes_sharing_a_cache_build_a_key_once(builder):
    # A second ImageBuilder on the same cache folder and daemon stands for a second hub
    # process: it shares nothing in memory, only the per-key file lock.
    other = ImageBuilder(
        resolver=builder.resolver, docker_client=builder.client, base_image=builder.base_image,
        cache_dir=builder.cache_dir, image_repo=builder.image_repo, pip_config=builder.pip_config,
        build_network_mode=builder.build_network_mode,
    )
    req = unique_env()
    mine, theirs = await asyncio.gather(builder.get_image(req), other.get_image(req))
    assert mine.image_id == theirs.image_id
    assert sorted([mine.cached, theirs.cached]) == [False, True]
    assert other.builds_started == (0 if theirs.cached else 1)


async def test_a_build_waiting_for_another_processes_build_of_its_key_says_so(builder):
    # An instructor's `condaspawner build` (another process) holds the key's build lock: the
    # students' spawns of that environment wait for it, and their progress pages say why.
    req = unique_env()
    lock_path = builder.key_dir(builder.build_key(req)) / "build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_EX)
        build = builder.ensure(req)
        events = []
        async for event in build.follow():
            events.append(event)
            if event["phase"] == "queued":
                break
        fcntl.flock(other_process, fcntl.LOCK_UN)
    assert events[-1]["message"] == ("waiting for the build of this environment already under way elsewhere "
                                     "(an admin's prebuild, or another hub process)")
    assert not (await build.result()).cached  # the other process built nothing: this one builds it


def test_a_restarted_hubs_build_estimate_comes_from_the_builds_its_cache_folder_recorded(builder, tmp_path):
    """The "about N min" of the form and the progress page, before this process built anything."""
    def restarted() -> ImageBuilder:
        return ImageBuilder(resolver=builder.resolver, docker_client=builder.client, base_image=builder.base_image,
                            cache_dir=str(tmp_path), image_repo=builder.image_repo)

    assert restarted().build_estimate() == "about 2 min"  # nothing recorded: the default
    records = restarted().records
    for number, (minutes, status) in enumerate([(4, "built"), (5, "built"), (6, "built"), (30, "failed")]):
        records.key_dir(f"{number:064x}").mkdir(parents=True)
        records.record(f"{number:064x}", status=status, started="2026-12-02T10:00:00+00:00",
                       finished=f"2026-12-02T10:{minutes:02d}:00+00:00")
    records.key_dir(f"{9:064x}").mkdir(parents=True)
    records.record(f"{9:064x}", status="building", started="2026-12-02T11:00:00+00:00", finished="")
    assert restarted().build_estimate() == "about 5 min"  # the median of the builds that built


async def test_builds_beyond_the_limit_wait_in_a_visible_queue(builder):
    one_at_a_time = ImageBuilder(
        resolver=builder.resolver, docker_client=builder.client, base_image=builder.base_image,
        cache_dir=builder.cache_dir, image_repo=builder.image_repo, pip_config=builder.pip_config,
        build_network_mode=builder.build_network_mode, max_concurrent_builds=1,
    )
    first, second = one_at_a_time.ensure(unique_env()), one_at_a_time.ensure(unique_env())
    # Either may take the slot first: each looks up the cache in a thread before it queues.
    *streams, _ = await asyncio.gather(collect(first), collect(second), asyncio.gather(first.result(), second.result()))
    queued = [event for events in streams for event in events if event["phase"] == "queued"]
    assert len(queued) == 1 and queued[0]["message"] == "waiting for 1 running builds to finish (1 in the queue)"
    assert [events[-1]["phase"] for events in streams] == ["ready", "ready"] and one_at_a_time.builds_started == 2


async def test_a_build_stays_on_the_base_its_key_was_made_with_when_the_base_tag_moves(builder, docker_daemon):
    """`condaspawner base` may move the base tag while a build waits or runs: the key, FROM, the
    compile and the labels all use the base the key was made with."""
    client = docker_daemon.client()
    first_base = client.images.get(builder.base_image).id
    private = f"condaspawner-test-base-{uuid.uuid4().hex[:8]}"
    client.images.get(first_base).tag(private, "1")
    holder = client.containers.run(first_base, ["touch", "/tmp/next-base"], detach=True, network_mode="none")
    try:
        holder.wait()
        next_base = holder.commit(private, "next").id  # one layer more than the first base
        moving = ImageBuilder(resolver=builder.resolver, docker_client=builder.client, base_image=f"{private}:1",
                              cache_dir=builder.cache_dir, image_repo=builder.image_repo,
                              pip_config=builder.pip_config, build_network_mode=builder.build_network_mode)
        req = unique_env()
        build = moving.ensure(req)  # its key: on the first base; the build has not begun
        client.images.get(next_base).tag(private, "1")  # the admin builds a new base
        moving._base_id = ("", 0.0)  # past the base id's few seconds of caching
        assert moving.base_image_id() == next_base and build.base_id == first_base
        info = await build.result()
        assert info.key == moving.build_key(req, first_base)
        image = client.images.get(info.image_id)
        assert image.labels[LABEL_BASE_IMAGE] == first_base
        layers = image.attrs["RootFS"]["Layers"]
        first_layers = client.images.get(first_base).attrs["RootFS"]["Layers"]
        next_layers = client.images.get(next_base).attrs["RootFS"]["Layers"]
        assert layers[:len(first_layers)] == first_layers
        assert len(next_layers) > len(first_layers) and layers[:len(next_layers)] != next_layers  # not on the new base
    finally:
        holder.remove(force=True)
        for tag in (f"{private}:1", f"{private}:next"):
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(tag)


def pip_builder(builder: ImageBuilder, index: PipIndex, **settings) -> ImageBuilder:
    """``builder``'s settings with pip asking the loopback ``index`` (host network: it listens on 127.0.0.1)."""
    settings.setdefault("docker_client", builder.client)
    return ImageBuilder(resolver=builder.resolver, base_image=builder.base_image, cache_dir=builder.cache_dir,
                        image_repo=builder.image_repo, build_network_mode="host",
                        pip_config={"index-url": index.url, "trusted-host": "127.0.0.1"}, **settings)


def running(client: docker.DockerClient, container: str) -> bool:
    try:
        return bool(client.api.inspect_container(container)["State"]["Running"])
    except docker.errors.NotFound:
        return False


async def test_a_build_over_its_timeout_fails_clearly_and_leaves_nothing(builder):
    # pip asks a loopback index whose page for cs-slow only comes once the build has timed out
    with PipIndex() as index:
        gate = index.add("cs-slow", gated=True)
        impatient = pip_builder(builder, index, build_timeout=3)
        req = unique_env(pip=["cs-slow==1.0"])
        with pytest.raises(BuildError, match=r"^build took longer than 3 s \(ImageBuilder.build_timeout\)$"):
            await impatient.get_image(req)
        key = builder.build_key(req)
        assert builder.find_image(key) is None
        assert not (Path(builder.cache_dir) / "staging" / key).exists()
        gate.set()
        impatient.build_timeout = 600
        assert not (await impatient.get_image(req)).cached  # a later request builds it


async def test_a_build_cancelled_in_its_pip_step_stops_that_step(builder):
    """A timeout or a cancel ends the build: the step it was running (a pip that waits on its
    index: for ever, left alone) is gone with it, not left running on the daemon."""
    with PipIndex() as index:
        gate = index.add("cs-hang", gated=True)
        patient = pip_builder(builder, index)
        req = unique_env(pip=["cs-hang==1.0"])
        build = patient.ensure(req)
        log = patient.key_dir(build.key) / "build.log"
        pip_step = ""
        async for event in build.follow():
            if event["phase"] == "pip":
                break
        while not pip_step and not build.task.done():  # pip asks the gated index: its step's container runs
            step = log.read_text().rsplit("Step ", 1)[-1]
            found = re.search(r"^ ---> Running in ([0-9a-f]+)$", step, re.MULTILINE)
            # Docker names the container once created, maybe a moment before it starts.
            pip_step = found.group(1) if found and "pip install" in step and running(builder.client, found.group(1)) \
                else ""
            await asyncio.sleep(0.2)
        assert pip_step and running(builder.client, pip_step)
        build.task.cancel()
        with pytest.raises((asyncio.CancelledError, BuildError)):
            await build.result()
        assert not running(builder.client, pip_step)
        gate.set()


async def test_gc_removes_the_untagged_images_a_failed_build_left(builder, docker_daemon):
    req = unique_env(pip=[f"cs-missing-{uuid.uuid4().hex[:6]}==1.0"])
    with pytest.raises(BuildError):
        await builder.get_image(req)
    log = (builder.key_dir(builder.build_key(req)) / "build.log").read_text()
    # the last step docker finished before the pip step failed: an untagged image nobody needs
    left = [line.split()[-1] for line in log.splitlines() if line.startswith(" ---> ") and "Running in" not in line][-1]
    client = docker_daemon.client()
    image_id = client.images.get(left).id
    assert madeids.bare(image_id) in madeids.read(builder.key_dir(builder.build_key(req))).images
    assert madeids.bare(image_id) in builder.gc(dry_run=True).leftovers.images
    assert client.images.get(image_id)  # a dry run removes nothing
    assert madeids.bare(image_id) in builder.gc().leftovers.images
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(image_id)
    assert client.images.get(builder.base_image)


async def test_a_rebuild_replaces_the_image_only_once_the_new_one_is_built(builder, docker_daemon):
    req = unique_env()
    first = await builder.get_image(req)
    # a rebuild that fails (its channel is gone): the key's image is still there, still tagged
    broken = ImageBuilder(
        resolver=Resolver(channel_urls={"conda-forge": "file:///nonexistent-channel"},
                          package_cache_dir=builder.resolver.package_cache_dir),
        docker_client=builder.client, base_image=builder.base_image, cache_dir=builder.cache_dir,
        image_repo=builder.image_repo, pip_config=builder.pip_config, build_network_mode=builder.build_network_mode)
    assert broken.build_key(req) == first.key
    with pytest.raises(BuildError):
        await broken.ensure(req, rebuild=True).result()
    assert builder.find_image(first.key).id == first.image_id

    again = await builder.ensure(req, rebuild=True).result()
    assert again.key == first.key and not again.cached and again.image_id != first.image_id
    assert builder.find_image(first.key).id == again.image_id
    with pytest.raises(docker.errors.ImageNotFound):  # nothing runs it: removed, not left dangling
        docker_daemon.client().images.get(first.image_id)
    assert f"removed the replaced image {first.image_id}" in (builder.key_dir(first.key) / "build.log").read_text()


async def test_an_image_a_rebuild_replaced_under_a_running_server_goes_once_the_server_is_gone(builder, docker_daemon):
    client = docker_daemon.client()
    req = unique_env()
    first = await builder.get_image(req)
    server = client.containers.run(first.image_id, ["sleep", "600"], detach=True, network_mode="none")
    try:
        again = await builder.ensure(req, rebuild=True).result()
        assert builder.find_image(first.key).id == again.image_id
        log = (builder.key_dir(first.key) / "build.log").read_text()
        assert f"kept the replaced image {first.image_id}: " in log
        assert client.images.get(first.image_id).tags == []  # untagged, still there: the server runs it
        assert first.image_id.removeprefix("sha256:")[:12] not in "".join(builder.gc(dry_run=True).leftovers.images)
    finally:
        server.remove(force=True)
    removed = builder.gc().leftovers.images
    assert any(first.image_id.removeprefix("sha256:").startswith(short) for short in removed), removed
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(first.image_id)
    assert client.images.get(again.image_id).tags  # the new one stays


async def test_a_rebuild_keeps_the_replaced_image_a_start_has_pinned_until_the_start_lets_go(builder, docker_daemon):
    """A start pins the image it looked up (with a registry it runs it by digest, maybe after
    waiting for a GPU): a rebuild meanwhile leaves it for leftovers to remove afterwards."""
    client = docker_daemon.client()
    req = unique_env()
    first = await builder.get_image(req)
    start_pin = builder.records.pin(first.key)
    try:
        again = await builder.ensure(req, rebuild=True).result()
        assert builder.find_image(first.key).id == again.image_id
        log = (builder.key_dir(first.key) / "build.log").read_text()
        assert f"kept the replaced image {first.image_id}: a server is starting with it" in log
        assert client.images.get(first.image_id).tags == []
    finally:
        start_pin.close()
    removed = builder.gc().leftovers.images
    assert any(first.image_id.removeprefix("sha256:").startswith(short) for short in removed), removed


def test_gc_kills_the_step_process_a_killed_daemon_left_under_an_orphaned_shim(builder):
    """A daemon killed mid-step can leave the step's process running under containerd's shim,
    with no container the daemon knows. gc finds the shim by the container id its made.json names."""
    container_id = uuid.uuid4().hex + uuid.uuid4().hex
    key_dir = builder.key_dir(uuid.uuid4().hex * 2)
    key_dir.mkdir(parents=True)
    madeids.add(key_dir, containers=[container_id])
    # A stand-in shim: its command line names the container as containerd's does, and the step's
    # process (a sleep) runs under it. The real one is made by killing dockerd mid-step, which
    # stops the step itself when it comes back (test_build_faults): this path needs it gone for good.
    shim = subprocess.Popen(["containerd-shim-runc-v2", "-c", "sleep 600 & wait", "-namespace", "moby",
                             "-id", container_id, "-address", "/nonexistent/containerd.sock"],
                            executable="/bin/sh", start_new_session=True)
    try:
        step = _wait_for_child(shim.pid)
        result = builder.gc()
        assert result.leftovers.processes == {shim.pid: container_id}
        assert not psutil.wait_procs([step], timeout=30)[1]  # the step's process went first
        shim.wait(timeout=30)  # then the shim (or it ended by itself, as a real one does, once its step is gone)
        assert (key_dir / "swept").exists()  # read once: the next gc does not look again
        assert not builder.gc().leftovers.processes
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shim.pid, signal.SIGKILL)
        shim.wait()


def _wait_for_child(pid: int) -> psutil.Process:
    deadline = time.monotonic() + 30
    while not (children := psutil.Process(pid).children()):
        assert time.monotonic() < deadline, f"process {pid} started no child"
        time.sleep(0.05)
    return children[0]


# The build code of a pip package the user names (a PEP 517 backend in its sdist) reports
# what it could do, then fails the build: the build log carries the report.
PROBE_FILES = {
    "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "probe"\nbackend-path = ["."]\n',
    "probe.py": textwrap.dedent("""\
        import os, socket

        def get_requires_for_build_wheel(config_settings=None):
            capabilities = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff:")]
            try:
                socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).close()
                packets = "opened"
            except OSError as error:
                packets = f"refused (errno {error.errno})"
            raise SystemExit(f"PROBE uid={os.getuid()} CapEff={capabilities[0]} packet-socket={packets}")
        """),
}


@pytest.mark.parametrize("layered", [True, False], ids=["layered", "dockerfile"])
async def test_a_users_pip_package_builds_without_capabilities(builder, layered):
    # Its build code runs as root in the env, but could not capture the build network's traffic.
    with PipIndex() as index:
        index.add_file("cs-probe", sdist("cs-probe", "1.0", PROBE_FILES))
        hardened = pip_builder(builder, index, layered_images=layered)
        req = unique_env(pip=["cs-probe==1.0"])
        with pytest.raises(BuildError):
            await hardened.get_image(req)
    log = (builder.key_dir(hardened.build_key(req)) / "build.log").read_text()
    assert "PROBE uid=0 CapEff=0000000000000000 packet-socket=refused (errno 1)" in log


def forging_files(lines: str) -> dict[str, str]:
    """A pip package whose build code writes ``lines`` to pip's own output, unindented (as docker's
    lines are: pip indents what its build code prints), then fails the build."""
    return {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "forger"\nbackend-path = ["."]\n',
        "forger.py": textwrap.dedent(f"""\
            import os

            def get_requires_for_build_wheel(config_settings=None):
                for path in (f"/proc/{{os.getppid()}}/fd/1", "/proc/1/fd/1"):
                    try:
                        with open(path, "w") as out:
                            out.write({lines!r})
                    except OSError:
                        pass
                raise SystemExit("FORGED")
            """),
    }


@pytest.mark.parametrize("layered", [True, False], ids=["layered", "dockerfile"])
async def test_what_a_pip_packages_build_output_names_is_nothing_gc_removes(builder, layered):
    client = builder.client
    stopped = client.containers.create(builder.base_image, ["true"], network_mode="none")
    running = client.containers.run(builder.base_image, ["sleep", "600"], detach=True, network_mode="none")
    untagged = stopped.commit()  # unused, its parent the base: as a step image of a build looks
    lines = (f"\n ---> Running in {stopped.id}\ncompile container {running.id}\n ---> {untagged.id[7:19]}\n"
             f"loaded image {untagged.id}\nkept the replaced image {untagged.id}: a server runs it\n")
    try:
        with PipIndex() as index:
            index.add_file("cs-forger", sdist("cs-forger", "1.0", forging_files(lines)))
            forged = pip_builder(builder, index, docker_client=client, layered_images=layered)
            req = unique_env(pip=["cs-forger==1.0"])
            with pytest.raises(BuildError):
                await forged.get_image(req)
        key_dir = builder.key_dir(forged.build_key(req))
        # the forged lines reached the log as docker's own would (else this test proves nothing)
        assert f"\n ---> Running in {stopped.id}\ncompile container {running.id}\n" in (key_dir / "build.log").read_text()
        made = madeids.read(key_dir)
        assert not {stopped.id, running.id, madeids.bare(untagged.id)} & {
            *made.containers, *made.compilers, *made.images, *made.replaced}, made
        builder.gc()
        assert client.containers.get(running.id).status == "running"
        assert client.containers.get(stopped.id) and client.images.get(untagged.id)
    finally:
        for container in (stopped, running):
            container.remove(force=True)
        client.images.remove(untagged.id)


def test_builds_use_dockers_own_network_unless_told():
    assert ImageBuilder().build_network_mode == "default"


# A pip package's build code that prints 6 MiB, then fails: pip prints all of it, and the
# build log keeps its first MiB and its last 4 MiB.
NOISY_FILES = {
    "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "noisy"\nbackend-path = ["."]\n',
    "noisy.py": textwrap.dedent("""\
        def get_requires_for_build_wheel(config_settings=None):
            for number in range(100_000):
                print(f"noisy build backend: line {number:06d} " + "." * 30)
            raise SystemExit("NOISY: the end")
        """),
}


async def test_a_build_whose_pip_step_prints_without_end_keeps_a_capped_log_with_its_end(builder):
    with PipIndex() as index:
        index.add_file("cs-noisy", sdist("cs-noisy", "1.0", NOISY_FILES))
        noisy = pip_builder(builder, index)
        req = unique_env(pip=["cs-noisy==1.0"])
        with pytest.raises(BuildError) as failed:
            await noisy.get_image(req)
    assert failed.value.phase == "pip" and "\n" not in str(failed.value)
    log = (builder.key_dir(noisy.build_key(req)) / "build.log").read_text()
    assert len(log.encode()) < LOG_HEAD_BYTES + LOG_TAIL_BYTES + 256 * 1024
    head, tail = log.split(" its last lines ---\n")
    assert " lines) left out, then" in head and "line 000000 " not in tail
    assert "line 099999 " in tail and "NOISY: the end" in tail
    assert tail.endswith(f"build failed (pip): {failed.value}\n")


def downloading_files() -> dict[str, str]:
    """A pip package whose build code downloads what it needs (a model, a binary) and cannot: refused."""
    return {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "fetcher"\nbackend-path = ["."]\n',
        "fetcher.py": textwrap.dedent("""\
            import urllib.request

            def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
                urllib.request.urlopen("http://127.0.0.1:1/model.bin", timeout=5)  # nothing listens on port 1
            """),
    }


async def test_a_pip_package_whose_build_cannot_download_is_the_packages_failure_not_the_index(builder):
    """pip reached the index and the package's build code failed on a connection of its own: the user
    is told which package failed to build and to check the pip: packages, not that the index was
    unreachable and to try again later (which never helps). Its build code's lines are not pip's."""
    with PipIndex() as index:
        index.add_file("cs-fetcher", sdist("cs-fetcher", "1.0", downloading_files()))
        fetching = pip_builder(builder, index)
        req = unique_env(pip=["cs-fetcher==1.0"])
        with pytest.raises(BuildError) as failed:
            await fetching.get_image(req)
    log = (builder.key_dir(fetching.build_key(req)) / "build.log").read_text()
    assert "Connection refused" in log  # the package's own connection, in the log
    assert (failed.value.phase, failed.value.unreachable) == ("pip", False)
    assert "cs-fetcher" in failed.value.cause and "\n" not in failed.value.cause
    failure = explain(failed.value, custom_spec=True)
    assert failure.status_code == 400 and failure.message.endswith(
        "check the pip: packages of your environment.yml (a package pip must build from source is often a conda "
        "package too: list it under dependencies instead)")


async def test_a_pip_package_that_prints_a_later_step_is_still_a_pip_failure(builder):
    """A package's build code writes Docker's "Step N/M : COPY kernel ..." line to pip's output and
    fails: the daemon's error names the pip command, so the user is told to check the pip: packages
    (400), not that writing the image failed and to tell the hub admin (500)."""
    lines = "\nStep 12/15 : COPY kernel /opt/conda/share/jupyter/kernels/${ENV_NAME}\n"
    with PipIndex() as index:
        index.add_file("cs-stepper", sdist("cs-stepper", "1.0", forging_files(lines)))
        forged = pip_builder(builder, index)
        req = unique_env(pip=["cs-stepper==1.0"])
        with pytest.raises(BuildError) as failed:
            await forged.get_image(req)
    assert "\nStep 12/15 : COPY kernel" in (builder.key_dir(forged.build_key(req)) / "build.log").read_text()
    assert failed.value.phase == "pip"
    failure = explain(failed.value, custom_spec=True)
    assert failure.status_code == 400 and failure.message.endswith(
        "check the pip: packages of your environment.yml (a package pip must build from source is often a conda "
        "package too: list it under dependencies instead)")


async def pip_step_container(builder: ImageBuilder, build) -> str:
    """The container of ``build``'s pip step, once it runs (its pip waits on a gated index)."""
    log = builder.key_dir(build.key) / "build.log"
    async for event in build.follow():
        if event["phase"] == "pip":
            break
    while not build.task.done():
        step = log.read_text().rsplit("Step ", 1)[-1]
        found = re.search(r"^ ---> Running in ([0-9a-f]+)$", step, re.MULTILINE)
        # Docker names the container once created, maybe a moment before it starts.
        if found and "pip install" in step and running(builder.client, found.group(1)):
            return found.group(1)
        await asyncio.sleep(0.2)
    return ""


async def test_a_cancelled_build_stops_its_own_pip_step_and_leaves_another_builds_running(builder):
    """Two builds in their pip steps at once: cancelling one removes its step container only; the
    other's runs on and its build ends with its image."""
    with PipIndex() as index:
        gates = [index.add(f"cs-hang-{which}", gated=True) for which in ("a", "b")]
        patient = pip_builder(builder, index)
        cancelled, other = (patient.ensure(unique_env(pip=[f"cs-hang-{which}==1.0"])) for which in ("a", "b"))
        steps = [await pip_step_container(patient, build) for build in (cancelled, other)]
        assert all(running(builder.client, step) for step in steps)
        cancelled.task.cancel()
        cancelled.task.cancel()  # twice: a timeout and the hub's stop, say
        with pytest.raises((asyncio.CancelledError, BuildError)):
            await cancelled.result()
        assert not running(builder.client, steps[0])
        assert running(builder.client, steps[1])
        for gate in gates:
            gate.set()
        assert not (await other.result()).cached
