"""condaspawner build / ls / lock / log / gc against the real daemon and local channel."""

from __future__ import annotations

import uuid

import pytest
from fixtures_docker import bench_dir, remove_repo_images
from test_cli import condaspawner

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

    lock = condaspawner("lock", "--config", str(config), key).stdout.decode().splitlines()
    assert {line.split()[0] for line in lock} >= {"python", "cs-gamma", "cs-alpha", "ipykernel"}
    assert "Step 5/" in condaspawner("log", "--config", str(config), key).stdout.decode()
    missing = condaspawner("log", "--config", str(config), "ffffffffffff")
    assert missing.returncode == 1 and b"no single build matches" in missing.stderr

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


def test_build_refuses_a_bad_file_before_building(config, tmp_path):
    env = tmp_path / "evil.yml"
    env.write_text("dependencies:\n  - pip:\n    - --index-url http://evil\n")
    result = condaspawner("build", "--config", str(config), str(env))
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode().startswith(f"error: {env}: dependencies[0].pip[0]")
