"""The fault matrix of issue 15: faults injected into real builds on the bench, each checked for its
one-line message, its exit status, what it leaves behind (nothing, once the next build or gc ran) and
that the retry builds a correct image.

Covered elsewhere, not repeated here:
- a build process killed after its solve (install or docker build): test_cli_builder.py::
  test_a_killed_build_is_listed_as_interrupted_with_its_log (interrupted, its log, gc, the retry);
- a full cache folder, before and during the install: test_cli_builder.py::
  test_a_full_cache_folder_is_a_build_error_that_leaves_nothing_behind, and the spawner's message:
  test_the_spawners_handler_shows_a_full_disk;
- a build over build_timeout: test_builder.py::test_a_build_over_its_timeout_fails_clearly_and_leaves_nothing;
- an unsatisfiable pip section and an unreachable index: test_e2e_failures.py, test_builder.py;
- two hub users on one new environment (one build, in one process): test_e2e.py::
  test_two_users_same_new_environment_one_build;
- a registry that is down before a spawn: test_e2e_registry.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker
import psutil
import pytest
from fixtures_docker import bench_dir, bench_unavailable, remove_repo_images
from test_cli import REPO

from condaspawner_bench.dockerd import BenchDaemonError, BenchPaths, DaemonHandle, ensure_daemon
from condaspawner_bench.registry import BenchRegistryError, start_registry
from jupyterhub_condaspawner import layeredbuild, leftovers, madeids, staging
from jupyterhub_condaspawner.builder import BuildError, ImageBuilder
from jupyterhub_condaspawner.buildmodel import Build
from jupyterhub_condaspawner.dockerbuild import StepIds
from jupyterhub_condaspawner.resolve import Resolver

pytestmark = pytest.mark.docker

WAIT_S = 180  # how long a step of a build may take on the slow bench before a test gives up


def write_config(directory: Path, channel_url: str, base_image: str, repo: str, extra: str = "") -> Path:
    path = directory / "jupyterhub_config.py"
    path.write_text(
        "c = get_config()\n"
        f"c.Resolver.channel_urls = {{'conda-forge': {channel_url!r}}}\n"
        f"c.Resolver.package_cache_dir = {str(bench_dir() / 'pkgs')!r}\n"
        f"c.ImageBuilder.cache_dir = {str(directory / 'cache')!r}\n"
        f"c.ImageBuilder.base_image = {base_image!r}\n"
        f"c.ImageBuilder.image_repo = {repo!r}\n"
        "c.ImageBuilder.build_network_mode = 'host'\n"  # the bench daemon has no bridge
        "c.ImageBuilder.pip_config = {'no-index': 'true'}\n" + extra
    )
    return path


def env_file(directory: Path, pip: str = "") -> Path:
    path = directory / f"env-{uuid.uuid4().hex[:8]}.yml"
    pip_section = f"  - pip: [{pip}]\n" if pip else ""
    path.write_text("channels: [conda-forge]\ndependencies:\n  - python=3.9\n  - cs-gamma\n" + pip_section
                    + f"variables: {{ID: {uuid.uuid4().hex}}}\n")
    return path


def start_build(config: Path, env: Path, docker_host: str = "") -> subprocess.Popen:
    environment = {**os.environ, **({"DOCKER_HOST": docker_host} if docker_host else {})}
    return subprocess.Popen([sys.executable, "-m", "jupyterhub_condaspawner.cli", "build", "--config", str(config),
                             str(env)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)


def run_cli(*args: str, docker_host: str = "") -> subprocess.CompletedProcess:
    environment = {**os.environ, **({"DOCKER_HOST": docker_host} if docker_host else {})}
    return subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", *args], capture_output=True,
                          cwd=REPO, timeout=600, env=environment)


def wait_for_log(cache: Path, process: subprocess.Popen, pattern: str) -> tuple[Path, str]:
    """The build's key folder once its log matches ``pattern`` (the build still running)."""
    deadline = time.monotonic() + WAIT_S
    found = re.compile(pattern, re.MULTILINE)
    while True:
        for log in (cache / "builds").glob("*/build.log"):
            text = log.read_text(errors="replace")
            if found.search(text):
                return log.parent, text
        assert process.poll() is None, f"the build ended before its log showed {pattern!r}: {process.communicate()}"
        assert time.monotonic() < deadline, f"the build's log never showed {pattern!r}"
        time.sleep(0.05)


def result_row(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    lines = out.decode().splitlines()
    return process.returncode, (lines[1] if len(lines) > 1 else ""), err.decode()


def assert_correct_image(client: docker.DockerClient, image: str, key_prefix: str) -> None:
    """The retried image is whole: its label names the key, and the environment's Python imports its packages."""
    assert client.images.get(image).labels["io.condaspawner.key"].startswith(key_prefix)
    output = client.containers.run(image, ["/opt/conda/envs/custom/bin/python", "-c",
                                           "import ipykernel, sys; print(sys.prefix)"],
                                   network_mode="host", remove=True)
    assert output.decode().strip() == "/opt/conda/envs/custom"


def traces_of(key_dir: Path) -> tuple[list[str], list[str]]:
    """The containers and images the key's builds made, as the builder kept them (made.json)."""
    made = madeids.read(key_dir)
    return [*made.containers, *made.compilers], [i for i in [*made.images, *made.replaced] if i not in made.removed]


def present(client: docker.DockerClient, containers: list[str], images: list[str]) -> list[str]:
    """Which of these containers and images the daemon still has."""
    still = []
    for short in containers:
        try:
            client.api.inspect_container(short)
            still.append(short)
        except docker.errors.NotFound:
            pass
    for short in images:
        try:
            client.api.inspect_image(short)
            still.append(short)
        except docker.errors.NotFound:
            pass
    return still


def _in(client: docker.DockerClient, short: str, ids: set[str]) -> bool:
    """Whether the image is one of ``ids`` (gone images are not)."""
    try:
        return client.api.inspect_image(short)["Id"] in ids
    except docker.errors.NotFound:
        return False


# -- another installation on the same daemon ---------------------------------------------------------


def test_gc_and_the_next_build_remove_only_what_this_installation_left(docker_daemon, base_image,
                                                                         dev_python_channel, tmp_path):
    client = docker_daemon.client()
    repo = f"condaspawner-faults-{uuid.uuid4().hex[:8]}"
    ours, theirs = (tmp_path / "ours", tmp_path / "theirs")
    configs = []
    for directory in (ours, theirs):
        directory.mkdir()
        configs.append(write_config(directory, dev_python_channel.url, base_image, repo))
    failures = {}
    for directory, config in zip((ours, theirs), configs):
        process = start_build(config, env_file(directory, pip=f"cs-missing-{uuid.uuid4().hex[:6]}==1.0"))
        status, row, err = result_row(process)
        assert status == 1 and "FAILED: pip: No matching distribution found for cs-missing-" in row, (row, err)
        key_dir = next((directory / "cache" / "builds").glob("*"))
        failures[directory] = (key_dir, traces_of(key_dir))
    their_containers, their_images = failures[theirs][1]
    our_containers, our_images = failures[ours][1]
    assert our_images and their_images  # the loaded layers and docker's step images before the pip step
    assert present(client, [], our_images) == our_images
    # steps their build reused from ours ("Using cache") are part of their images now: those stay
    their_chain = {entry["Id"] for short in their_images for entry in client.api.history(short)}
    our_own = [short for short in our_images if client.api.inspect_image(short)["Id"] not in their_chain]
    assert our_own  # at least the environment's own steps

    # a package cache temporary an interrupted install left, and one an install is writing now, in a
    # package cache of this test's own (every build on the bench sweeps old ones from the shared one)
    cache = tmp_path / "pkgs"
    cache.mkdir()
    configs[0] = write_config(ours, dev_python_channel.url, base_image, repo,
                              extra=f"c.Resolver.package_cache_dir = {str(cache)!r}\n")
    old, fresh = cache / f".pkg-{uuid.uuid4().hex[:8]}", cache / f".pkg-{uuid.uuid4().hex[:8]}"
    for temporary in (old, fresh):
        temporary.mkdir()
        (temporary / "file").write_bytes(b"x" * 1000)
    stamp = time.time() - 2 * 3600 - 60  # older than build_timeout (1 h by default)
    os.utime(old, (stamp, stamp))
    # staging folders finished builds set aside for removal: one whose removal was killed (by a hub
    # that came back with the same process id: ours), one a process is removing now (holding its lock)
    abandoned = ours / "cache" / "staging" / f"{staging.SET_ASIDE}{os.getpid()}-1-{'ab' * 32}"
    removing = ours / "cache" / "staging" / f"{staging.SET_ASIDE}{os.getpid()}-2-{'cd' * 32}"
    for folder in (abandoned, removing):
        (folder / "env").mkdir(parents=True)
        (folder / "env" / "file").write_bytes(b"x" * 1000)
    remover = (removing / staging.SET_ASIDE_LOCK).open("a")
    fcntl.flock(remover, fcntl.LOCK_EX)
    try:
        swept = run_cli("gc", "--config", str(configs[0]))
        assert swept.returncode == 0, swept.stderr
        out = swept.stdout.decode()
        assert present(client, [], our_own) == [] and "left by a failed build" in out
        assert f"removed {old} (" in out and not old.exists()
        assert fresh.exists()  # an install may still be writing it
        assert f"removed {abandoned} (" in out and not abandoned.exists()
        assert removing.exists()  # a process is still removing it
        # the other installation's step images survive our gc, and its own gc removes them
        assert present(client, their_containers, their_images) == their_images
        assert not run_cli("gc", "--config", str(configs[0]), "--dry-run").stdout.decode().startswith("would remove the")
    finally:
        remover.close()
        for temporary in (old, fresh, abandoned, removing):
            subprocess.run(["rm", "-rf", str(temporary)], check=False)

    # their next build (another failure) removes what their first one left, before it starts
    status, row, _ = result_row(start_build(configs[1], env_file(theirs, pip="cs-missing-again==1.0")))
    assert status == 1
    (second,) = [path for path in (theirs / "cache" / "builds").glob("*") if path != failures[theirs][0]]
    reused = {entry["Id"] for short in traces_of(second)[1] for entry in client.api.history(short)}
    gone = [short for short in their_images if not _in(client, short, reused)]
    assert gone and present(client, their_containers, gone) == []
    remove_repo_images(client, repo)


# -- a daemon killed mid-build ---------------------------------------------------------------------


@pytest.fixture
def private_daemon(docker_daemon, rootfs_image, tmp_path):
    """A dockerd of this test's own (this test kills it), holding a copy of the Debian rootfs as
    the builds' base: what a base holds beyond a shell and libc does not matter to a killed
    daemon, and copying the whole server base (about 0.4 GB) would be most of the test."""
    if os.geteuid() != 0:
        bench_unavailable("a private dockerd (this test kills one) needs root")
    try:
        handle = ensure_daemon(tmp_path / "bench", use_external=False)
    except BenchDaemonError as error:
        bench_unavailable(f"cannot start a private dockerd: {error}")
    try:
        handle.client(timeout=600).images.load(docker_daemon.client(timeout=600).api.get_image(rootfs_image))
        yield handle
    finally:
        paths = BenchPaths.for_bench_dir(tmp_path / "bench")
        DaemonHandle(paths.docker_host, paths=paths).stop()


def test_a_daemon_killed_mid_build_is_one_line_and_leaves_nothing_after_the_next_build(
        private_daemon, rootfs_image, dev_python_channel, tmp_path):
    repo = f"condaspawner-faults-{uuid.uuid4().hex[:8]}"
    # the Dockerfile route: its compileall step is a container that runs long enough to be killed under
    config = write_config(tmp_path, dev_python_channel.url, rootfs_image, repo,
                          extra="c.ImageBuilder.layered_images = False\n")
    env = env_file(tmp_path)
    host = private_daemon.docker_host
    process = start_build(config, env, docker_host=host)
    key_dir, _ = wait_for_log(tmp_path / "cache", process, r"-m compileall .*\n ---> Running in [0-9a-f]+$")
    os.kill(private_daemon.pid, signal.SIGKILL)
    status, row, err = result_row(process)
    assert status == 1, (row, err)
    assert row.endswith(f"FAILED: the Docker daemon at {host} went away while writing the image"), row
    assert err.splitlines()[-1] == (f"build {key_dir.name[:16]} failed talking to the Docker daemon: the Docker "
                                    f"daemon at {host} went away while writing the image (`condaspawner log "
                                    f"{key_dir.name[:16]}` shows its log)"), err
    containers, images = traces_of(key_dir)
    assert containers  # the compileall step's container (the last), which the daemon could not remove
    assert not (tmp_path / "cache" / "staging" / key_dir.name).exists()

    daemon = ensure_daemon(tmp_path / "bench", use_external=False)  # back up, same data root
    client = daemon.client()
    left = present(client, containers, [])
    orphans = {pid for short in containers for pid in leftovers.orphan_processes(short)}
    # the running step's container, stopped when the daemon came back (its shim, if any, in orphans)
    assert left == containers[-1:]

    retry = run_cli("build", "--config", str(config), str(env), docker_host=host)
    assert retry.returncode == 0 and retry.stdout.decode().splitlines()[1].split()[-1] == "built", retry.stdout
    assert present(client, containers, []) == []  # the retry removed the killed step's container first
    assert not any(psutil.pid_exists(pid) for pid in orphans)
    assert not list((tmp_path / "cache" / "staging").glob("*"))
    assert_correct_image(client, f"{repo}:{key_dir.name[:16]}", key_dir.name[:16])


# -- a build process killed while docker builds -----------------------------------------------------


def test_a_build_process_killed_mid_docker_build_leaves_nothing_after_gc(docker_daemon, base_image,
                                                                         dev_python_channel, tmp_path):
    client = docker_daemon.client()
    repo = f"condaspawner-faults-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, dev_python_channel.url, base_image, repo)
    env = env_file(tmp_path, pip="cs-missing-never-reached==1.0")
    process = start_build(config, env)
    key_dir, _ = wait_for_log(tmp_path / "cache", process, r"^Step \d+/\d+ : RUN ")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    rows = run_cli("ls", "--config", str(config), "--failed").stdout.decode().splitlines()
    assert next(row for row in rows if row.startswith(key_dir.name[:16])).split()[1] == "interrupted"
    log = (key_dir / "build.log").read_text()
    assert "Step " in log  # a killed build's log is not empty

    swept = run_cli("gc", "--config", str(config))
    assert swept.returncode == 0, swept.stderr
    containers, images = traces_of(key_dir)
    deadline = time.monotonic() + WAIT_S  # the daemon cancels the abandoned build on its own time
    while present(client, containers, images) and time.monotonic() < deadline:
        time.sleep(0.5)
        run_cli("gc", "--config", str(config))
    assert present(client, containers, images) == []
    assert not (tmp_path / "cache" / "staging" / key_dir.name).exists()

    env.write_text(env.read_text().replace("  - pip: [cs-missing-never-reached==1.0]\n", ""))
    retry = run_cli("build", "--config", str(config), str(env))
    assert retry.returncode == 0 and retry.stdout.decode().splitlines()[1].split()[-1] == "built", retry.stdout
    key = retry.stdout.decode().splitlines()[1].split()[1]
    assert_correct_image(client, f"{repo}:{key}", key)
    remove_repo_images(client, repo)


# -- two builders on one key -------------------------------------------------------------------------


def test_two_build_processes_on_one_key_build_once_and_both_get_the_image(docker_daemon, base_image,
                                                                         dev_python_channel, tmp_path):
    client = docker_daemon.client()
    repo = f"condaspawner-faults-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, dev_python_channel.url, base_image, repo)
    env = env_file(tmp_path)
    first, second = start_build(config, env), start_build(config, env)
    results = [result_row(first), result_row(second)]
    assert [status for status, _, _ in results] == [0, 0], results
    outcomes = sorted(row.split()[-1] for _, row, _ in results)
    assert outcomes == ["built", "cached"], results  # one built it, the other waited for its lock
    images = {row.split()[2] for _, row, _ in results}
    assert len(images) == 1 and len(client.images.list(name=repo)) == 1
    (key_dir,) = (tmp_path / "cache" / "builds").glob("*")
    assert (key_dir / "build.log").read_text().count("loaded image ") == 1
    assert_correct_image(client, images.pop(), key_dir.name[:16])
    remove_repo_images(client, repo)


# -- a registry that goes away mid-push ----------------------------------------------------------------


def test_a_registry_that_goes_away_mid_push_is_one_line_and_the_retry_pushes(docker_daemon, rootfs_image,
                                                                            dev_python_channel, tmp_path):
    try:
        server = start_registry(tmp_path / "registry")  # this test's own: it stops it mid-push
    except BenchRegistryError as error:
        bench_unavailable(f"no registry for the bench: {error}")
    client = docker_daemon.client()
    repository = server.repository(f"condaspawner-faults-{uuid.uuid4().hex[:8]}")
    # the Debian rootfs as the base: the push of the server base's 0.4 GB (twice) would be most of the test
    config = write_config(tmp_path, dev_python_channel.url, rootfs_image, "unused",
                          extra=f"c.ImageBuilder.registry = {repository!r}\n"
                                f"c.ImageBuilder.insecure_registries = [{server.host!r}]\n")
    env = env_file(tmp_path)
    try:
        process = start_build(config, env)
        uploads = server.storage
        deadline = time.monotonic() + WAIT_S
        while not any("_uploads" in str(path) for path in uploads.rglob("*")):  # a layer is being uploaded
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the push never started"
            time.sleep(0.02)
        server.stop()
        status, row, err = result_row(process)
        assert status == 1, (row, err)
        key = row.split()[1]
        host = re.escape(server.host)
        assert re.search(rf"FAILED: pushing the image to {host} failed: .*connection (refused|reset)$", row), row
        assert re.fullmatch(rf"build {key} failed at the registry: the registry {host} cannot be reached "
                            rf"\(.*\): the image is not in the registry \(it is built on this host if the build "
                            rf"ran\); run the command again once the registry answers", err.splitlines()[-1]), err
        assert "pushed " not in row  # nothing was: no 'pushed 0 B to ...' line after a failed push
        assert not list((tmp_path / "cache" / "staging").glob("*"))

        server.start()  # same port and storage
        retry = run_cli("build", "--config", str(config), str(env))
        assert retry.returncode == 0, retry.stdout + retry.stderr
        header, row = retry.stdout.decode().splitlines()[:2]
        assert row.split()[2].startswith(f"{repository}:{key}@sha256:")
        client.images.remove(row.split()[2].split("@")[0])
        pulled = client.images.pull(row.split()[2])
        assert_correct_image(client, pulled.id, key)
    finally:
        server.stop()
        remove_repo_images(client, repository)


def test_a_killed_builds_running_compile_container_is_a_leftover_if_it_carries_the_keys_label(
        docker_daemon, base_image, tmp_path):
    """A hub killed mid-build leaves its compile container waiting for batches that never come;
    the next sweep removes it though it runs (no process holds its build's lock), but only if the
    container carries the compile label with the build's key: no other running container."""
    client = docker_daemon.client()
    builder = ImageBuilder(resolver=Resolver(channel_urls={"conda-forge": "file:///nonexistent-channel"}),
                           docker_client=client, base_image=base_image, cache_dir=str(tmp_path / "cache"))
    key = "f" * 16
    waiting = client.containers.run(base_image, ["sleep", "300"], detach=True, network_mode="none",
                                    labels={madeids.COMPILE_LABEL: key})
    unlabelled = client.containers.run(base_image, ["sleep", "300"], detach=True, network_mode="none")
    other_key = client.containers.run(base_image, ["sleep", "300"], detach=True, network_mode="none",
                                      labels={madeids.COMPILE_LABEL: "e" * 16})
    try:
        key_dir = builder.key_dir(key)
        key_dir.mkdir(parents=True)
        madeids.add(key_dir, compilers=[waiting.id, unlabelled.id, other_key.id])
        assert leftovers.find(builder).containers == [waiting.id]
    finally:
        for container in (waiting, unlabelled, other_key):
            container.remove(force=True)


def test_a_step_container_confirmed_after_the_build_was_cancelled_is_removed_too(docker_daemon, base_image, tmp_path):
    """A cancel (or a timeout) ends the build while a thread still asks the daemon about the "Running
    in" line of the step that just started: that thread outlives the cancel, and the container it
    keeps after remove_containers ran must go as well, or that step (a pip waiting on its index) runs on."""
    client = docker_daemon.client()
    step = client.containers.run(base_image, ["sleep", "600"], detach=True, network_mode="none")
    try:
        made = StepIds(client.api, tmp_path, client.images.get(base_image).id, start_is_ours=True)  # a step on its start
        made.remove_containers()  # the cancel: nothing kept yet
        made.feed(f" ---> Running in {step.id[:12]}")  # the thread that was checking the step's line
        assert made.containers == [step.id]
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(step.id)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            step.remove(force=True)


async def test_a_compile_container_that_cannot_start_is_removed_or_left_for_gc(docker_daemon, rootfs_image, tmp_path):
    """A compile container Docker creates and then cannot start (a base image without the Python it
    runs: the build compiles in its Dockerfile then) is not left behind, "Created", for ever: it is
    removed at once, and it is in made.json before it runs (a build killed between the two leaves it to gc)."""
    client = docker_daemon.client()
    builder = ImageBuilder(docker_client=client, base_image=rootfs_image, cache_dir=str(tmp_path / "cache"))
    build = Build(key=uuid.uuid4().hex * 2, name="compile-start", env_name="demo",
                  base_id=client.images.get(rootfs_image).id)
    context = tmp_path / "context"
    (context / "env").mkdir(parents=True)
    builder.key_dir(build.key).mkdir(parents=True)  # the build's, made before it launches the container
    log = io.StringIO()
    launched = layeredbuild._launch_compile(builder, build, context, log)
    assert launched is not None
    with pytest.raises(BuildError):
        await launched
    labelled = client.containers.list(all=True, filters={"label": f"{madeids.COMPILE_LABEL}={build.key}"})
    for container in labelled:
        container.remove(force=True)
    assert labelled == []
    assert madeids.read(builder.key_dir(build.key)).compilers  # recorded before it was started
