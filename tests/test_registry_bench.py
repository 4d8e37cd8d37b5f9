"""Images through a real registry (Debian's docker-registry on 127.0.0.1) and the bench daemon.

One session registry; a module builder pushes there. A second builder with a fresh cache
folder stands for another hub process or build host: it finds the image through the
registry alone. A spawn on a daemon without the image pulls it with progress and runs
the reference pinned by digest.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path

import docker
import pytest
import requests
from fixtures_docker import remove_repo_images
from test_cli import condaspawner
from test_spawner_failures import StandInUser, failed_start

from jupyterhub_condaspawner.builder import LABEL_KEY, BuildError, BuildRequest, ImageBuilder
from jupyterhub_condaspawner.failures import explain
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.spawner import CondaSpawner
from jupyterhub_condaspawner.spec import SpecPolicy

pytestmark = pytest.mark.docker
SESSION = uuid.uuid4().hex[:8]
REPO_PATH = f"condaspawner-reg-{SESSION}"
SLUG, DISPLAY = "regdemo", "Registry demo"
# Two environments with the same conda packages: they differ only in a variable (the kernel
# spec and meta layers), so the conda layer and everything below it is shared.
CONDA = "channels: [conda-forge]\ndependencies: [python=3.9, ipykernel, cs-alpha]\n"
FIRST_ENV = CONDA + f"variables: {{RUN: first-{SESSION}}}\n"
SECOND_ENV = CONDA + f"variables: {{RUN: second-{SESSION}}}\n"


def env_request(text: str) -> BuildRequest:
    """The request a profile with this environment makes (slug and display name as in profiles_dir)."""
    return BuildRequest(SpecPolicy().parse(text), env_name=SLUG, kernel_display_name=DISPLAY)


def new_builder(registry: str, channel_url: str, base_image: str, cache: Path, **settings) -> ImageBuilder:
    """A builder with a cache folder of its own: another hub process or build host."""
    host = registry.split("/")[0]
    return ImageBuilder(
        resolver=Resolver(channel_urls={"conda-forge": channel_url}, package_cache_dir=str(cache / "pkgs")),
        base_image=base_image, cache_dir=str(cache), registry=registry, insecure_registries=[host], **settings)


@pytest.fixture(scope="module")
def repository(registry_server, docker_daemon):
    name = registry_server.repository(REPO_PATH)
    yield name
    remove_repo_images(docker_daemon.client(), name)


@pytest.fixture(scope="module")
def builder(repository, base_image, dev_python_channel, tmp_path_factory):
    return new_builder(repository, dev_python_channel.url, base_image, tmp_path_factory.mktemp("reg-builder"))


async def build_and_push(builder: ImageBuilder, text: str):
    build = builder.ensure(env_request(text))
    events, info = await asyncio.gather(collect(build), build.result())
    return info, events


async def collect(build) -> list[dict]:
    return [event async for event in build.follow()]


@pytest.fixture(scope="module")
def first(builder):
    started = time.perf_counter()
    info, events = asyncio.run(build_and_push(builder, FIRST_ENV))
    return info, events, time.perf_counter() - started


@pytest.fixture(scope="module")
def second(builder, first):
    started = time.perf_counter()
    info, events = asyncio.run(build_and_push(builder, SECOND_ENV))
    return info, events, time.perf_counter() - started


def push_seconds(builder: ImageBuilder, key: str) -> float:
    log = (builder.key_dir(key) / "build.log").read_text()
    return float(re.search(r"^push: .* ([0-9.]+) s$", log, re.M).group(1))


def test_a_build_is_pushed_and_run_pinned_by_digest(builder, first, repository):
    info, events, _ = first
    assert not info.cached and builder.builds_started == 1
    assert re.fullmatch(rf"{re.escape(repository)}:{info.key[:16]}@sha256:[0-9a-f]{{64}}", info.reference)
    assert info.image == info.reference and info.pushed_bytes > 1_000_000
    pushes = [event["message"] for event in events if event["phase"] == "push"]
    assert pushes[0] == f"Pushing the image to the registry {repository.split('/')[0]} (only layers it lacks)"
    # Layers an earlier test pushed to this registry (the base's) may be there already.
    assert re.match(r"Pushed \d+ MB to 127\.0\.0\.1:\d+ in [0-9.]+ s: [1-9]\d* of \d+ layers new, \d+ already there",
                    pushes[-1]), pushes[-1]
    progress = [event["progress"] for event in events]
    assert progress == sorted(progress) and events[-1]["phase"] == "ready"
    assert f"push: {info.reference}: {info.pushed_bytes} bytes" in (builder.key_dir(info.key) / "build.log").read_text()
    assert builder.client.images.get(info.reference).id == info.image_id  # the daemon knows it by its digest


def test_another_hub_or_build_host_finds_it_through_the_registry(builder, first, dev_python_channel, base_image,
                                                                 tmp_path):
    info = first[0]
    other = new_builder(builder.registry, dev_python_channel.url, base_image, tmp_path / "other-host")
    started = time.perf_counter()
    found = other.lookup(env_request(FIRST_ENV))
    print(f"registry lookup by another builder: {time.perf_counter() - started:.3f} s")
    assert found is not None and found.cached
    assert (found.reference, found.image_id) == (info.reference, info.image_id)
    assert asyncio.run(other.get_image(env_request(FIRST_ENV))).reference == info.reference
    assert other.builds_started == 0  # no rebuild
    assert other.pushed_reference(env_request(FIRST_ENV)) == info.reference  # the export seam
    assert other.pushed_reference(env_request(CONDA + "variables: {RUN: never-built}\n")) is None
    assert other.is_cached(env_request(FIRST_ENV))


def test_a_second_env_sharing_the_conda_layer_pushes_only_its_new_layers(builder, first, second):
    (one, _, one_total), (two, events, two_total) = first, second
    client = builder.client
    base_layers = len(client.images.get(builder.base_image).attrs["RootFS"]["Layers"])
    layers = [client.images.get(info.image_id).attrs["RootFS"]["Layers"] for info in (one, two)]
    assert layers[0][: base_layers + 2] == layers[1][: base_layers + 2]  # base, packages, conda-meta
    registry = builder.registry_client
    conda_layer = registry.image(one.reference.split("@")[1]).layers[base_layers]
    one_push, two_push = push_seconds(builder, one.key), push_seconds(builder, two.key)
    print(f"\nfirst push: {one.pushed_bytes / 1e6:.1f} MB in {one_push:.1f} s (build+push {one_total:.1f} s); "
          f"second push, sharing layers: {two.pushed_bytes / 1e3:.1f} kB in {two_push:.1f} s "
          f"(build+push {two_total:.1f} s); bytes ratio {two.pushed_bytes / one.pushed_bytes:.4f}, "
          f"time ratio {two_push / one_push:.2f}; the conda layer alone is {conda_layer.size / 1e6:.1f} MB")
    assert two.pushed_bytes < one.pushed_bytes
    assert two.pushed_bytes < conda_layer.size  # the conda layer was not uploaded again
    summary = [event["message"] for event in events if event["phase"] == "push"][-1]
    print(summary)
    new, total, there = map(int, re.search(r"(\d+) of (\d+) layers new, (\d+) already there", summary).groups())
    assert there >= base_layers + 2 and new + there == total


def test_a_tag_whose_image_has_another_key_is_not_a_hit(builder, second, repository):
    impostor = env_request(CONDA + f"variables: {{RUN: impostor-{SESSION}}}\n")
    key = builder.build_key(impostor)
    client = builder.client
    # Someone pushed another environment's image under this key's tag.
    client.api.tag(second[0].image_id, repository, key[:16])
    try:
        assert list(client.api.push(repository, key[:16], stream=True, decode=True))[-1].get("aux")
        remote = builder.registry_client.image(key[:16])
        assert remote is not None and remote.labels[LABEL_KEY] == second[0].key
        assert builder.find_pushed(key) is None
        assert builder.lookup(impostor) is None and not builder.is_cached(impostor)
    finally:
        client.api.remove_image(f"{repository}:{key[:16]}")


def spawner_config(tmp_path: Path, channel_url: str, base_image: str, registry: str, **settings):
    from traitlets.config import Config

    profiles = tmp_path / "profiles"
    (profiles / "envs").mkdir(parents=True, exist_ok=True)
    (profiles / "10-reg.yaml").write_text(f"display_name: {DISPLAY}\nslug: {SLUG}\nenvironment: envs/reg.yml\n")
    (profiles / "envs" / "reg.yml").write_text(FIRST_ENV)
    config = Config()
    config.ProfileCatalog.profiles_dir = str(profiles)
    config.Resolver.channel_urls = {"conda-forge": channel_url}
    config.Resolver.package_cache_dir = str(tmp_path / "pkgs")
    config.ImageBuilder.cache_dir = str(tmp_path / "hub-cache")  # another hub: nothing cached locally
    config.ImageBuilder.base_image = base_image
    config.ImageBuilder.registry = registry
    config.ImageBuilder.insecure_registries = [registry.split("/")[0]]
    config.DockerSpawner.network_name = "host"
    config.DockerSpawner.remove = True
    for dotted, value in settings.items():
        section, name = dotted.split("__")
        setattr(config[section], name, value)
    return config


async def test_a_node_without_the_image_pulls_it_with_progress(builder, first, repository, dev_python_channel,
                                                               base_image, tmp_path, monkeypatch):
    info = first[0]
    client = builder.client
    # This node lacks the image: only its layers shared with other images stay.
    for tag in client.images.get(info.image_id).tags:
        client.api.remove_image(tag)
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(info.reference)
    monkeypatch.setattr(CondaSpawner, "_client", None)  # DockerSpawner caches one client per class
    config = spawner_config(tmp_path, dev_python_channel.url, base_image, repository)
    spawner = CondaSpawner(user=StandInUser(f"reg-{SESSION}"), hub=_hub(), config=config)
    spawner.apply_choice({"profile": SLUG})
    try:
        await spawner.start()
        messages = [event["message"] async for event in spawner.progress()]
        container = spawner.client.inspect_container(spawner.object_id)
        assert container["Config"]["Image"] == info.reference and container["Image"] == info.image_id
        assert spawner.image == info.reference
        assert spawner.get_state()["condaspawner"]["reference"] == info.reference
    finally:
        await spawner.stop(now=True)
    pulls = [message for message in messages if message.startswith("Pull")]
    print("\n" + "\n".join(pulls))
    assert pulls[0].startswith(f"Pulling the image from {repository.split('/')[0]} (")
    assert re.match(r"Pulled \d+ (MB|kB) from 127\.0\.0\.1:\d+", pulls[-1])
    assert client.images.get(builder.tag_for(info.key)).id == info.image_id  # tagged again for ls and gc
    assert not any(message.startswith("First build") for message in messages)


async def test_a_registry_that_is_down_fails_the_spawn_in_one_line(registry_server, dev_python_channel, base_image,
                                                                   tmp_path, docker_daemon):
    from condaspawner_bench.ports import free_port

    down = f"127.0.0.1:{free_port()}/{REPO_PATH}"
    spawner = CondaSpawner(user=StandInUser(f"down-{SESSION}"), hub=_hub(),
                           config=spawner_config(tmp_path, dev_python_channel.url, base_image, down))
    failure, messages = await failed_start(spawner, {"profile": SLUG})
    host = down.split("/")[0]
    assert (failure.status_code, failure.reason) == (503, "registry")
    assert failure.message == (f"The image registry is unavailable: the registry {host} cannot be reached "
                               "(connection refused); try again in a minute, or tell the hub admin if it keeps "
                               "failing")
    assert messages[0].startswith("Looking up the image") and len(messages) == 1


async def test_credentials_come_from_dockers_config(auth_registry_server, builder, first, dev_python_channel,
                                                    base_image, tmp_path, monkeypatch, docker_daemon):
    info = first[0]
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty-docker-config"))  # no credentials
    repository = auth_registry_server.repository(REPO_PATH)
    hub = new_builder(repository, dev_python_channel.url, base_image, tmp_path / "auth-hub")
    with pytest.raises(BuildError) as refused:
        hub.lookup(env_request(FIRST_ENV))
    failure = explain(refused.value, custom_spec=False)
    assert (failure.status_code, refused.value.phase) == (500, "registry")
    assert f"asks for credentials and Docker's config has none for {auth_registry_server.host}" in failure.message

    monkeypatch.setenv("DOCKER_CONFIG", str(auth_registry_server.docker_config(tmp_path / "docker-config")))
    found = hub.lookup(env_request(FIRST_ENV))  # basic auth: the same storage holds the first push
    assert found is not None and found.image_id == info.image_id
    assert found.reference == f"{repository}:{info.key[:16]}@{info.reference.split('@')[1]}"

    # Push with the credentials: an image this host built before the registry knew it.
    other = env_request(CONDA + f"variables: {{RUN: auth-{SESSION}}}\n")
    key = hub.build_key(other)
    assert requests.get(f"{auth_registry_server.url}/v2/", timeout=5).status_code == 401  # it does ask
    client = builder.client
    # An image labelled with this key, on this daemon but not in the registry: the first image,
    # relabelled by a one-line build (no new layer).
    relabelled = client.images.build(fileobj=_dockerfile(info.image_id), labels={LABEL_KEY: key},
                                     tag=f"{repository}:{key[:16]}", rm=True, network_mode="host")[0]
    try:
        pushed = await hub.get_image(other)
        assert pushed.reference.startswith(f"{repository}:{key[:16]}@sha256:") and hub.builds_started == 0
        assert pushed.pushed_bytes < 100_000  # its layers were in the registry's storage already
        # And pull with them: this daemon forgets the reference, then pulls it back.
        client.api.remove_image(f"{repository}:{key[:16]}")
        assert await hub.ensure_present(pushed, client.api)
        assert client.images.get(pushed.reference).id == relabelled.id
    finally:
        remove_repo_images(client, repository)


def _dockerfile(image_id: str):
    import io

    return io.BytesIO(f"FROM {image_id}\n".encode())


def test_condaspawner_build_push_prints_the_pinned_references(builder, first, repository, dev_python_channel,
                                                              base_image, tmp_path):
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        "c = get_config()\n"
        f"c.Resolver.channel_urls = {{'conda-forge': {dev_python_channel.url!r}}}\n"
        f"c.Resolver.package_cache_dir = {str(tmp_path / 'pkgs')!r}\n"
        f"c.ImageBuilder.cache_dir = {str(tmp_path / 'cache')!r}\n"
        f"c.ImageBuilder.base_image = {base_image!r}\n"
        "c.ImageBuilder.build_network_mode = 'host'\n"  # the bench daemon has no bridge
        f"c.ImageBuilder.registry = {repository!r}\n"
        f"c.ImageBuilder.insecure_registries = [{repository.split('/')[0]!r}]\n")
    profiles = spawner_config(tmp_path, dev_python_channel.url, base_image, repository).ProfileCatalog.profiles_dir
    images = tmp_path / "images.yaml"
    result = condaspawner("build", "--push", "--config", str(config), "--profiles", profiles, "--images", str(images))
    assert result.returncode == 0, result.stdout + result.stderr
    header, row, total, wrote = result.stdout.decode().splitlines()
    assert wrote == f"wrote {images}: 1 pinned image(s) for `condaspawner export kubespawner`"
    assert first[0].reference in images.read_text()
    assert header.split() == ["NAME", "KEY", "IMAGE", "SIZE", "SECONDS", "RESULT", "PUSHED"]
    assert row.split()[:3] == [SLUG, first[0].key[:16], first[0].reference]
    assert row.split()[-3:] == ["cached", "0", "B"]  # found in the registry: nothing to push
    assert total == f"pushed 0 B to {repository} (layers it already had are not uploaded again)"

    unregistered = tmp_path / "no-registry.py"
    unregistered.write_text(config.read_text().replace("c.ImageBuilder.registry", "# registry"))
    refused = condaspawner("build", "--push", "--config", str(unregistered), "--profiles", profiles,
                           "--images", str(images))
    assert refused.returncode == 1
    assert refused.stderr.decode().startswith("error: cannot push: no registry to push to: set c.ImageBuilder.registry")


def _hub():
    from jupyterhub.objects import Hub

    return Hub()
