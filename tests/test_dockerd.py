"""The bench Docker daemon and the rootfs image, on a real dockerd (no mocks)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import docker
import pytest
from fixtures_docker import bench_dir, bench_unavailable

from condaspawner_bench import offlinebase
from condaspawner_bench.dockerd import BenchPaths, ensure_daemon, mounts_under
from condaspawner_bench.offlinebase import (
    HOST_CA_BUNDLE,
    OFFLINE_DOCKERFILE,
    RECIPE_LABEL,
    build_rootfs_image,
    debian_mirror,
    rootfs_recipe,
)
from condaspawner_bench.phases import PhaseLog
from jupyterhub_condaspawner.baseimage import IMAGES_DIR, PRODUCTION_DOCKERFILE, singleuser_pins


def run_in(client: docker.DockerClient, image: str, script: str) -> str:
    output = client.containers.run(image, ["sh", "-c", script], network_mode="host", remove=True)
    return output.decode().strip()


def file_in(client: docker.DockerClient, image: str, path: str) -> bytes:
    container = client.containers.create(image, ["true"])
    try:
        chunks, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
            member = archive.extractfile(archive.getmembers()[0])
            assert member is not None, f"{path} is not a regular file in {image}"
            return member.read()
    finally:
        container.remove(force=True)


# --- daemon -------------------------------------------------------------------


@pytest.mark.docker
def test_daemon_answers_ping_and_is_the_sessions_docker_host(docker_daemon):
    assert docker_daemon.client().ping()
    assert os.environ["DOCKER_HOST"] == docker_daemon.docker_host
    assert docker.from_env().ping()


@pytest.mark.docker
def test_second_ensure_reuses_the_running_daemon(docker_daemon):
    again = ensure_daemon(bench_dir())

    assert again.docker_host == docker_daemon.docker_host
    assert not again.owned
    assert again.pid == docker_daemon.pid


@pytest.mark.docker
def test_bench_daemon_is_found_by_its_socket_without_docker_host(docker_daemon):
    if docker_daemon.paths is None:
        pytest.skip("the session uses an external daemon, not a bench one")

    again = ensure_daemon(bench_dir(), use_external=False)

    assert again.docker_host == docker_daemon.docker_host
    assert not again.owned
    assert again.pid == docker_daemon.pid


def test_long_bench_dir_gets_a_short_socket_path(tmp_path):
    long_bench = tmp_path / ("very-long-directory-name-" * 8) / "bench"

    paths = BenchPaths.for_bench_dir(long_bench)

    assert len(str(paths.socket)) < 100
    assert paths.data_root.is_relative_to(long_bench)
    assert BenchPaths.for_bench_dir(long_bench).socket == paths.socket


@pytest.mark.docker
def test_stop_leaves_no_mounts_and_the_bench_dir_removable(docker_daemon, rootfs_image, tmp_path):
    if os.geteuid() != 0:
        bench_unavailable("starting a second private dockerd needs root")
    private_bench = tmp_path / ("long-name-for-a-short-socket-dir-" * 2) / "bench"
    assert not BenchPaths.for_bench_dir(private_bench).runtime_dir.is_relative_to(private_bench)
    handle = ensure_daemon(private_bench, use_external=False)
    assert handle.owned and handle.docker_host != docker_daemon.docker_host
    client = handle.client()
    build_rootfs_image(client, bench_dir())  # imports the cached rootfs tree
    # tini passes dockerd's SIGTERM on to sleep, so stopping does not wait 10 s for it.
    client.containers.run(
        rootfs_image, ["tini", "--", "sleep", "300"], network_mode="host", detach=True
    )
    assert mounts_under(private_bench)

    handle.stop()

    assert not _pid_alive(handle.pid)
    assert mounts_under(private_bench) == []
    assert mounts_under(handle.paths.runtime_dir) == []
    shutil.rmtree(private_bench)
    assert not handle.paths.runtime_dir.exists()  # the short-socket dir under /tmp


@pytest.mark.docker
def test_a_bench_daemon_that_lost_its_socket_is_replaced(docker_daemon, tmp_path):
    if os.geteuid() != 0:
        bench_unavailable("starting a private dockerd needs root")
    first = ensure_daemon(tmp_path / "bench", use_external=False)
    first.paths.socket.unlink()  # as when someone deletes the bench dir under a running daemon

    second = ensure_daemon(tmp_path / "bench", use_external=False)
    try:
        assert second.owned and second.pid != first.pid
        assert not _pid_alive(first.pid)
        assert second.client().ping()
    finally:
        second.stop()


def test_non_root_without_a_daemon_gets_told_what_to_do(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to check the message as another user")

    message = _in_child_as_nobody(
        lambda: _error_of(ensure_daemon, tmp_path / "bench"),
        env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"},
    )

    assert "needs root" in message
    assert "DOCKER_HOST" in message


def _error_of(function, *args) -> str:
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 - the message is what is under test
        return f"{type(error).__name__}: {error}"
    return "no error"


def _in_child_as_nobody(function, env: dict[str, str]) -> str:
    """Run ``function`` in a forked child with euid nobody; return the string it returns."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            os.environ.update(env)
            os.seteuid(65534)
            os.write(write_end, function().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as output:
        result = output.read()
    os.waitpid(pid, 0)
    return result


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- rootfs image ---------------------------------------------------------------


@pytest.mark.docker
def test_rootfs_image_runs_python3(docker_daemon, rootfs_image):
    assert run_in(docker_daemon.client(), rootfs_image, "python3 -c 'print(6 * 7)'") == "42"


@pytest.mark.docker
def test_rootfs_image_has_jovyan_with_uid_1000_in_users(docker_daemon, rootfs_image):
    client = docker_daemon.client()
    identity = run_in(client, rootfs_image, "id jovyan")

    assert identity == "uid=1000(jovyan) gid=100(users) groups=100(users)"
    assert run_in(client, rootfs_image, "stat -c %u:%g /home/jovyan") == "1000:100"


@pytest.mark.docker
def test_rootfs_image_trusts_the_hosts_ca_bundle(docker_daemon, rootfs_image):
    client = docker_daemon.client()

    env = client.images.get(rootfs_image).attrs["Config"]["Env"]
    assert f"SSL_CERT_FILE={HOST_CA_BUNDLE}" in env and f"PIP_CERT={HOST_CA_BUNDLE}" in env
    # copied out, not printed by a container: docker may not have the end of a large output
    # in the container's log yet when its exit is reported (seen under load)
    assert file_in(client, rootfs_image, str(HOST_CA_BUNDLE)) == HOST_CA_BUNDLE.read_bytes()


@pytest.mark.docker
def test_rootfs_image_is_cached_by_recipe(docker_daemon, rootfs_image):
    client = docker_daemon.client()
    image = client.images.get(rootfs_image)
    assert image.labels[RECIPE_LABEL] == rootfs_recipe()

    phases = PhaseLog()
    assert build_rootfs_image(client, bench_dir(), phases=phases) == image.id
    assert phases.phases == []  # neither mmdebstrap nor the import ran


# --- inputs ---------------------------------------------------------------------


def test_debian_mirror_comes_from_apt_sources(tmp_path, monkeypatch):
    sources_dir = tmp_path / "sources.list.d"
    sources_dir.mkdir()
    (sources_dir / "nodesource.sources").write_text(
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
        "Components: main\n"
    )
    (sources_dir / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian-old\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    monkeypatch.setattr(offlinebase, "APT_SOURCES_DIR", sources_dir)
    monkeypatch.setattr(offlinebase, "APT_SOURCES_LIST", tmp_path / "sources.list")

    assert debian_mirror() == "http://mirror.invalid/debian"

    (tmp_path / "sources.list").write_text(
        "# deb http://commented.invalid/debian bookworm main\n"
        "deb [signed-by=/usr/share/keyrings/x.gpg] http://one-line.invalid/debian trixie main\n"
    )
    assert debian_mirror() == "http://one-line.invalid/debian"


def test_both_base_images_install_the_shared_pins():
    pins = singleuser_pins()

    assert pins["jupyterhub"] == "5.5.4"
    assert pins["jupyterlab"].startswith("4.")
    for dockerfile in (OFFLINE_DOCKERFILE, IMAGES_DIR / PRODUCTION_DOCKERFILE):
        assert "singleuser-requirements.txt" in dockerfile.read_text()
