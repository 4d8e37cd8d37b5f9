"""condaspawner build / ls / lock / log / gc against the real daemon and local channel."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fixtures_docker import bench_dir, bench_unavailable, remove_repo_images
from test_cli import REPO, condaspawner

from condaspawner_bench.ports import free_port
from jupyterhub_condaspawner.builder import BuildError, BuildRequest, ImageBuilder
from jupyterhub_condaspawner.failures import explain
from jupyterhub_condaspawner.spec import SpecPolicy

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def config(docker_daemon, base_image, dev_python_channel, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-builder")
    path = directory / "jupyterhub_config.py"
    repo = f"condaspawner-cli-{uuid.uuid4().hex[:8]}"
    path.write_text(
        "c = get_config()\n"
        f"c.Resolver.channel_urls = {{'conda-forge': {dev_python_channel.url!r}}}\n"
        f"c.Resolver.package_cache_dir = {str(bench_dir() / 'pkgs')!r}\n"  # the bench's shared cache
        f"c.ImageBuilder.cache_dir = {str(directory / 'cache')!r}\n"
        f"c.ImageBuilder.base_image = {base_image!r}\n"
        f"c.ImageBuilder.image_repo = {repo!r}\n"
        "c.ImageBuilder.build_network_mode = 'host'\n"  # the bench daemon has no bridge
    )
    yield path
    remove_repo_images(docker_daemon.client(), repo)


def test_build_ls_lock_log_gc(config, tmp_path, docker_daemon):
    env = tmp_path / "hw.yml"
    env.write_text(f"name: hw\nchannels: [conda-forge]\ndependencies: [python=3.9, cs-gamma]\nvariables: {{ID: {uuid.uuid4().hex}}}\n")
    first = condaspawner("build", "--config", str(config), str(env))
    assert first.returncode == 0, first.stdout + first.stderr
    header, row = first.stdout.decode().splitlines()
    assert header.split() == ["NAME", "KEY", "IMAGE", "SIZE", "SECONDS", "RESULT"]
    name, key, image, *_, result = row.split()
    assert (name, result) == (str(env), "built") and image.endswith(f":{key}")

    again = condaspawner("build", "--config", str(config), str(env))
    assert again.stdout.decode().splitlines()[1].split()[-1] == "cached"

    listing = condaspawner("ls", "--config", str(config)).stdout.decode()
    assert key in listing and image in listing
    # SIZE is what the image adds to the base, which every image shares: not the base's bytes again
    client = docker_daemon.client()
    base_image = config.read_text().split("c.ImageBuilder.base_image = ")[1].splitlines()[0].strip("'\"")
    base_size = client.images.get(base_image).attrs["Size"]
    built = client.images.get(image)
    listed = next(line for line in listing.splitlines() if line.startswith(key))
    size = parse_size(" ".join(listed.split()[2:4]))
    assert abs(size - (built.attrs["Size"] - base_size)) <= max(0.001 * size, 1e5) + 0.05e6, (listed, built.attrs["Size"])
    assert listing.splitlines()[-1].endswith(f"beyond the base image {base_image} (layers they share counted once)")

    lock = condaspawner("lock", "--config", str(config), key).stdout.decode().splitlines()
    assert {line.split()[0] for line in lock} >= {"python", "cs-gamma", "cs-alpha", "ipykernel"}
    assert "layer environment: " in condaspawner("log", "--config", str(config), key).stdout.decode()
    # lock and log read the cache folder: no daemon needed
    assert without_daemon("lock", "--config", str(config), key).stdout.decode().splitlines() == lock
    assert "layer environment: " in without_daemon("log", "--config", str(config), key).stdout.decode()
    missing = condaspawner("log", "--config", str(config), "ffffffffffff")
    assert missing.returncode == 1 and missing.stderr.decode().startswith(
        "error: no build has key 'ffffffffffff': `condaspawner ls` and `ls --failed` list the build keys")
    short = condaspawner("log", "--config", str(config), key[:6])
    assert short.returncode == 1 and "give 8 or more of its hex digits" in short.stderr.decode()

    dry = condaspawner("gc", "--config", str(config), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.decode().splitlines()[-1].startswith("would remove 0 image(s)")


def test_build_profiles_reports_failures(config, tmp_path):
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "ok.yml").write_text("channels: [conda-forge]\ndependencies: [python=3.9, cs-beta]\n")
    (tmp_path / "envs" / "bad.yml").write_text("channels: [conda-forge]\ndependencies: [python=3.9, cs-conflict]\n")
    (tmp_path / "a.yaml").write_text("display_name: Works\nenvironment: envs/ok.yml\n")
    (tmp_path / "b.yaml").write_text("display_name: Breaks\nenvironment: envs/bad.yml\n")
    result = condaspawner("build", "--config", str(config), "--profiles", str(tmp_path))
    assert result.returncode == 1
    rows = {line.split()[0]: line for line in result.stdout.decode().splitlines()[1:]}
    assert rows["works"].split()[-1] in ("built", "cached")
    assert "FAILED: solve: cannot solve:" in rows["breaks"]


def test_an_instructor_prebuilds_one_profile_by_its_slug(config, tmp_path):
    """`build --profile SLUG` builds that profile's image alone; `build SLUG` and `build` of the
    profile's own environment file (which builds a user's-own-file image, not the profile's) say so."""
    (tmp_path / "envs").mkdir()
    hw = tmp_path / "envs" / "hw.yml"
    hw.write_text(f"channels: [conda-forge]\ndependencies: [python=3.9, cs-beta]\nvariables: {{ID: {uuid.uuid4().hex}}}\n")
    (tmp_path / "envs" / "bad.yml").write_text("channels: [conda-forge]\ndependencies: [python=3.9, cs-conflict]\n")
    (tmp_path / "a.yaml").write_text("display_name: CS101 HW 2\nslug: cs101-hw2\nenvironment: envs/hw.yml\n")
    (tmp_path / "b.yaml").write_text("display_name: Other course\nslug: other\nenvironment: envs/bad.yml\n")
    (tmp_path / "c.yaml").write_text("display_name: Sandbox\nslug: sandbox\nallow_custom_environment: true\n")
    profiles = ("--config", str(config), "--profiles", str(tmp_path))

    by_slug = condaspawner("build", *profiles, "cs101-hw2")
    assert by_slug.returncode == 1 and by_slug.stdout == b""
    assert by_slug.stderr.decode() == ("error: cs101-hw2: no such file; it is a profile's slug: `condaspawner build "
                                       "--profile cs101-hw2` prebuilds that profile's image\n")
    for slug, expected in (("CS101-HW2", "error: --profile: no profile 'CS101-HW2' (did you mean 'cs101-hw2'?); "),
                           ("sandbox", "error: --profile: profile 'sandbox' has no environment of its own")):
        refused = condaspawner("build", *profiles, "--profile", slug)
        assert refused.returncode == 1 and refused.stderr.decode().startswith(expected), refused.stderr

    built = condaspawner("build", *profiles, "--profile", "cs101-hw2")
    assert built.returncode == 0, built.stdout + built.stderr
    rows = built.stdout.decode().strip().splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["cs101-hw2"]  # not the other course's (it fails to solve)
    everything = condaspawner("build", *profiles)
    assert everything.returncode == 1  # the other course's profile does not solve
    assert {row.split()[0]: row.split()[-1] for row in everything.stdout.decode().strip().splitlines()[1:]
            if row.startswith("cs101-hw2")} == {"cs101-hw2": "cached"}

    as_file = condaspawner("build", *profiles, str(hw))
    assert as_file.returncode == 0, as_file.stdout + as_file.stderr
    assert (f"note: {hw} is the environment of profile cs101-hw2: built here as a user's own environment.yml, "
            "which is another image than the profile's; `condaspawner build --profile cs101-hw2` prebuilds the "
            "profile's") in as_file.stderr.decode()


def test_profiles_key_column_is_the_spec_key_not_a_build_key(config, tmp_path):
    """Two profiles sharing one file show one SPEC KEY in `profiles` but build two images:
    the column says which key it is, and `log` with it says where build keys are listed."""
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "ok.yml").write_text("channels: [conda-forge]\ndependencies: [python=3.9, cs-beta]\n")
    (tmp_path / "a.yaml").write_text("display_name: On CPU\nslug: on-cpu\nenvironment: envs/ok.yml\n")
    (tmp_path / "b.yaml").write_text("display_name: On GPU\nslug: on-gpu\nenvironment: envs/ok.yml\n"
                                     "gpus: 1\ncuda: '12.1'\n")
    listed = condaspawner("profiles", "--config", str(config), str(tmp_path))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    header, *rows = listed.stdout.decode().splitlines()
    assert header.rstrip().endswith("SPEC KEY")
    spec_keys = {row.split()[0]: row.split()[-1] for row in rows}
    assert spec_keys["on-cpu"] == spec_keys["on-gpu"]
    built = condaspawner("build", "--config", str(config), "--profiles", str(tmp_path))
    assert built.returncode == 0, built.stdout + built.stderr
    build_keys = {row.split()[0]: row.split()[1] for row in built.stdout.decode().splitlines()[1:]}
    assert build_keys["on-cpu"] != build_keys["on-gpu"] and spec_keys["on-cpu"] not in build_keys.values()
    log = condaspawner("log", "--config", str(config), spec_keys["on-cpu"])
    assert log.returncode == 1 and "the key `validate` and `profiles` print is the spec's" in log.stderr.decode()


def test_ls_says_why_no_profile_matches_when_the_base_image_is_missing(config, tmp_path):
    """An admin who sets a base_image that is not there: ls still lists the images, and says
    why its PROFILES column is empty instead of leaving every row '-' unexplained."""
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "ok.yml").write_text("channels: [conda-forge]\ndependencies: [python=3.9, cs-beta]\n")
    (tmp_path / "a.yaml").write_text("display_name: Works\nenvironment: envs/ok.yml\n")
    missing = tmp_path / "missing_base.py"
    missing.write_text(config.read_text() + f"c.ProfileCatalog.profiles_dir = {str(tmp_path)!r}\n"
                       "c.ImageBuilder.base_image = 'condaspawner-base:no-such-tag'\n")
    result = condaspawner("ls", "--config", str(missing))
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().splitlines() == [
        "note: PROFILES cannot be matched: base image condaspawner-base:no-such-tag not found: "
        "build it with `condaspawner base`"]


def test_build_lists_each_profile_problem_on_its_own_line_as_profiles_does(config, tmp_path):
    (tmp_path / "a.yaml").write_text("display_name: A\ngpus: many\n")
    (tmp_path / "b.yaml").write_text("displayname: B\nallow_custom_environment: true\n")
    built = condaspawner("build", "--config", str(config), "--profiles", str(tmp_path))
    listed = condaspawner("profiles", "--config", str(config), str(tmp_path))
    assert built.returncode == listed.returncode == 1 and built.stdout == b""
    lines = built.stderr.decode().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), lines
    assert lines == listed.stdout.decode().splitlines()


def test_build_refuses_a_bad_file_before_building(config, tmp_path):
    env = tmp_path / "evil.yml"
    env.write_text("dependencies:\n  - pip:\n    - --index-url http://evil\n")
    result = condaspawner("build", "--config", str(config), str(env))
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode().startswith(f"error: {env}: dependencies[0].pip[0]")


NO_DAEMON = "unix:///nonexistent/docker.sock"


def without_daemon(*args: str) -> subprocess.CompletedProcess:
    """``condaspawner ARGS`` with DOCKER_HOST pointing nowhere."""
    return subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", *args], capture_output=True,
                          cwd=REPO, timeout=120, env={**os.environ, "DOCKER_HOST": NO_DAEMON})


def test_a_failed_build_has_a_key_a_log_and_a_status(config, tmp_path):
    env = tmp_path / "conflict.yml"
    env.write_text(f"channels: [conda-forge]\ndependencies: [python=3.9, cs-conflict]\n"
                   f"variables: {{ID: {uuid.uuid4().hex}}}\n")
    result = condaspawner("build", "--config", str(config), str(env))
    assert result.returncode == 1
    name, key, rest = result.stdout.decode().splitlines()[1].split(maxsplit=2)
    assert name == str(env) and len(key) == 16 and rest.startswith("FAILED: solve: cannot solve:")
    line = result.stderr.decode().splitlines()[-1]
    assert line.startswith(f"build {key} failed solving the environment: ") and "cs-conflict" in line
    assert line.endswith(f" (`condaspawner log {key}` shows its log)")

    listing = without_daemon("ls", "--config", str(config), "--failed")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.decode().splitlines()
    assert header.split() == ["KEY", "STATUS", "PHASE", "WHEN", "NAME", "CAUSE"]
    row = next(row for row in rows if row.startswith(key))
    assert row.split()[1:3] == ["failed", "solve"] and "cs-conflict" in row

    log = without_daemon("log", "--config", str(config), key)
    assert log.returncode == 0 and "solve failed: cannot solve" in log.stdout.decode()
    # ... and below it, the solver's explanation as it wrote it: a tree, one branch a line
    tree = [line for line in log.stdout.decode().splitlines() if "\u2500 " in line]
    assert len(tree) > 3 and any("cs-conflict" in line for line in tree), log.stdout.decode()
    assert log.stdout.decode().splitlines()[0].startswith("build ")
    # On a terminal that cannot show the tree's characters, the log still comes out whole, as written.
    ascii_terminal = subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", "log", "--config",
                                     str(config), key], capture_output=True, cwd=REPO, timeout=120,
                                    env={**os.environ, "DOCKER_HOST": NO_DAEMON, "PYTHONIOENCODING": "ascii"})
    assert ascii_terminal.returncode == 0 and ascii_terminal.stdout == log.stdout, ascii_terminal.stderr
    lock = without_daemon("lock", "--config", str(config), key)
    assert lock.returncode == 1 and lock.stderr.decode() == (
        f"error: build {key} has no lock (its solve failed; see `condaspawner log`)\n")

    images = without_daemon("ls", "--config", str(config))  # the images need the daemon: one line, no traceback
    assert images.returncode == 1 and images.stderr.decode().startswith("error: cannot reach the Docker daemon")


def test_a_registry_that_does_not_answer_fails_the_row_without_a_push_total_or_a_log_to_read(config, tmp_path):
    """Nothing was pushed: no 'pushed 0 B to ...' line; the failure is the registry's, not a build's, and
    its build log (if a build even ran) does not say it: the line says what to do instead."""
    port = free_port()  # nothing listens there
    down = tmp_path / "down.py"
    down.write_text(config.read_text() + f"c.ImageBuilder.registry = '127.0.0.1:{port}/envs'\n"
                                         f"c.ImageBuilder.insecure_registries = ['127.0.0.1:{port}']\n")
    env = tmp_path / "env.yml"
    env.write_text(f"channels: [conda-forge]\ndependencies: [python=3.9]\nvariables: {{ID: {uuid.uuid4().hex}}}\n")
    result = condaspawner("build", "--config", str(down), str(env))
    assert result.returncode == 1
    out, line = result.stdout.decode(), result.stderr.decode().splitlines()[-1]
    key = out.splitlines()[1].split()[1]
    assert "FAILED: " in out and "pushed " not in out, out
    assert line == (f"build {key} failed at the registry: the registry 127.0.0.1:{port} cannot be reached "
                    "(connection refused): the image is not in the registry (it is built on this host if the build "
                    "ran); run the command again once the registry answers"), line


def test_a_killed_build_is_listed_as_interrupted_with_its_log(config, tmp_path):
    env = tmp_path / "killed.yml"
    env.write_text(f"channels: [conda-forge]\ndependencies: [python=3.9, cs-gamma]\n"
                   f"variables: {{ID: {uuid.uuid4().hex}}}\n")
    builds = Path(config.read_text().split("c.ImageBuilder.cache_dir = ")[1].splitlines()[0].strip("'\"")) / "builds"
    before = set(builds.glob("*")) if builds.exists() else set()
    staging = builds.parent / "staging"
    process = subprocess.Popen([sys.executable, "-m", "jupyterhub_condaspawner.cli", "build", "--config",
                                str(config), str(env)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # until the solve is done and the install (or the docker build) runs
            new = [path for path in builds.glob("*") if path not in before] if builds.exists() else []
            if new and "solved:" in _read(new[0] / "build.log") and (staging / new[0].name).exists():
                break
            assert process.poll() is None and time.monotonic() < deadline, "the build never got past the solve"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    key = new[0].name
    status = json.loads((new[0] / "status.json").read_text())
    assert status["status"] == "building"  # as the killed process left it; nobody holds its lock now
    log = without_daemon("log", "--config", str(config), key[:16]).stdout.decode()
    assert log.startswith(f"build {key} ") and "solved:" in log
    rows = without_daemon("ls", "--config", str(config), "--failed").stdout.decode().splitlines()
    row = next(row for row in rows if row.startswith(key[:16]))
    assert row.split()[1] == "interrupted" and "killed" in row

    assert (staging / key).exists()  # what the killed build left: the next gc removes it
    swept = condaspawner("gc", "--config", str(config), "--dry-run")
    assert f"would remove {staging / key} (" in swept.stdout.decode() and (staging / key).exists()
    swept = condaspawner("gc", "--config", str(config))
    assert swept.returncode == 0 and f"removed {staging / key} (" in swept.stdout.decode(), swept.stdout + swept.stderr
    assert not (staging / key).exists()

    retry = condaspawner("build", "--config", str(config), str(env))
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert retry.stdout.decode().splitlines()[1].split()[-1] == "built"
    rows = without_daemon("ls", "--config", str(config), "--failed").stdout.decode().splitlines()
    assert not any(row.startswith(key[:16]) for row in rows)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_gc_keeps_an_image_tagged_twice_with_a_note_and_counts_no_base_bytes(config, tmp_path, docker_daemon):
    client = docker_daemon.client()
    text = config.read_text()
    repo, cache = (text.split(f"c.ImageBuilder.{name} = ")[1].splitlines()[0].strip("'\"")
                   for name in ("image_repo", "cache_dir"))
    envs = [tmp_path / "twice.yml", tmp_path / "once.yml"]
    for env, package in zip(envs, ("cs-gamma", "cs-beta")):
        env.write_text(f"channels: [conda-forge]\ndependencies: [python=3.9, {package}]\n"
                       f"variables: {{ID: {uuid.uuid4().hex}}}\n")
    assert condaspawner("build", "--config", str(config), *map(str, envs)).returncode == 0
    images = client.images.list(name=repo)
    assert len(images) >= 2  # these, and this module's other builds
    twice, *others = images
    key = twice.labels["io.condaspawner.key"]
    for age, image in enumerate(images):  # the image tagged twice is the least recently used
        stamp = time.time() - 1000 + age
        os.utime(Path(cache) / "builds" / image.labels["io.condaspawner.key"] / "last-used", (stamp, stamp))
    extra = f"{repo}-extra:keep"
    twice.tag(extra)
    base = client.images.get(text.split("c.ImageBuilder.base_image = ")[1].splitlines()[0].strip("'\""))
    strict = tmp_path / "strict_config.py"
    strict.write_text(text + "c.ImageBuilder.max_images = 1\n")
    try:
        result = condaspawner("gc", "--config", str(strict))
        assert result.returncode == 0, result.stderr
        assert result.stderr.decode() == (f"note: kept {repo}:{key[:16]}: it is also tagged {extra} "
                                          f"(`docker rmi {extra}` lets gc remove it)\n")
        *lines, summary = result.stdout.decode().splitlines()
        removed = [line for line in lines if line.startswith(f"removed {repo}:")]  # not the leftovers of failed builds
        assert len(removed) == len(others) and summary.startswith(f"removed {len(others)} image(s), ")
        sizes = {image.tags[0]: image.attrs["Size"] for image in others}
        for line in removed:  # "removed TAG (SIZE)": only the bytes it alone held, never the base's
            _, tag, size = line.split(" ", 2)
            assert parse_size(size.strip("()")) <= sizes[tag] - base.attrs["Size"] + 1e5
        assert parse_size(summary.split(", ")[1].split(" (")[0]) < base.attrs["Size"]
        assert client.images.get(twice.id).tags  # kept, both tags
        assert not [image for image in client.images.list(name=repo) if image.id != twice.id]
    finally:
        client.images.remove(extra)


def parse_size(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


@pytest.fixture
def small_folder(tmp_path):
    """An 8 MB tmpfs: a cache folder that fills up (mounting needs root, as CI and the bench have)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        bench_unavailable(f"cannot mount an 8 MB tmpfs as a cache folder that fills up (needs root): "
                          f"{mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the folder's filesystem is full."""
    filler = folder / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"x" * 65536)
                out.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_full_cache_folder_is_a_build_error_that_leaves_nothing_behind(config, tmp_path, small_folder):
    small_config = tmp_path / "small_config.py"
    small_config.write_text(re.sub(r"c\.ImageBuilder\.cache_dir = .*", f"c.ImageBuilder.cache_dir = {str(small_folder)!r}",
                                   config.read_text()))
    env = tmp_path / "big.yml"
    env.write_text(f"channels: [conda-forge]\ndependencies: [python=3.9, cs-gamma]\nvariables: {{ID: {uuid.uuid4().hex}}}\n")
    message = re.compile(rf"FAILED: no space left in {re.escape(str(small_folder))} \(needs about (\d+) MB\)$")
    for attempt in range(3):  # filling up during the install, three times: the staging folder never stays
        result = condaspawner("build", "--config", str(small_config), str(env))
        assert result.returncode == 1, result.stdout + result.stderr
        row = result.stdout.decode().splitlines()[1]
        match = message.search(row)
        assert match, row
        assert int(match.group(1)) > 8  # the environment, copied (staging is not on the package cache's disk)
        assert "internal error" not in result.stderr.decode() and "Traceback" not in result.stderr.decode()
        assert not list((small_folder / "staging").glob("*"))
        key = row.split()[1]
        failed = without_daemon("ls", "--config", str(small_config), "--failed").stdout.decode().splitlines()
        assert next(line for line in failed if line.startswith(key)).split()[1:3] == ["failed", "disk"]

    filler = fill(small_folder)  # full before the build starts
    result = condaspawner("build", "--config", str(small_config), str(env))
    assert result.returncode == 1 and message.search(result.stdout.decode().splitlines()[1]), result.stdout
    assert "internal error" not in result.stderr.decode()
    assert not list((small_folder / "staging").glob("*"))
    filler.unlink()

    subprocess.run(["umount", "-l", str(small_folder)], check=True)  # room again: the retry builds it
    retry = condaspawner("build", "--config", str(small_config), str(env))
    assert retry.returncode == 0 and retry.stdout.decode().splitlines()[1].split()[-1] == "built", retry.stdout


async def test_the_spawners_handler_shows_a_full_disk(config, small_folder, docker_daemon, dev_python_channel,
                                                     base_image):
    builder = ImageBuilder(docker_client=docker_daemon.client(), base_image=base_image, cache_dir=str(small_folder),
                           image_repo=f"condaspawner-cli-disk-{uuid.uuid4().hex[:8]}")
    builder.resolver.channel_urls = {"conda-forge": dev_python_channel.url}
    builder.resolver.package_cache_dir = str(bench_dir() / "pkgs")
    fill(small_folder)
    spec = SpecPolicy().parse(f"dependencies: [python=3.9]\nvariables: {{ID: {uuid.uuid4().hex}}}\n".encode())
    with pytest.raises(BuildError) as info:
        await builder.get_image(BuildRequest(spec))
    assert info.value.phase == "disk" and str(info.value).startswith(f"no space left in {small_folder} (needs about ")
    failure = explain(info.value, custom_spec=True)
    assert (failure.status_code, failure.reason) == (503, "disk")
    assert failure.message.startswith(f"The hub ran out of disk space building this environment: no space left in "
                                      f"{small_folder} (needs about ")
