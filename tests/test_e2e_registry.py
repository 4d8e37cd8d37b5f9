"""End to end through a real hub: images go through the registry, and a registry that is down
fails a spawn in one line (fixtures_hub's hub, the session registry of fixtures_registry)."""

from __future__ import annotations

import os
import re
import uuid

import pytest
from fixtures_docker import remove_repo_images
from test_e2e_envpage import Client
from test_e2e_failures import Spawn, assert_one_clean_line, custom_env, failure_message

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = """
import os
c.ImageBuilder.registry = os.environ["CONDASPAWNER_TEST_REGISTRY"]
c.ImageBuilder.insecure_registries = [os.environ["CONDASPAWNER_TEST_REGISTRY"].split("/")[0]]
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 10}  # quick failures answer the POST
"""


@pytest.fixture(scope="module", autouse=True)
def registry(registry_server, docker_daemon):
    """The hub's registry repository (set up before the hub, removed after it)."""
    repository = registry_server.repository(f"condaspawner-e2e-reg-{uuid.uuid4().hex[:8]}")
    os.environ["CONDASPAWNER_TEST_REGISTRY"] = repository
    yield registry_server, repository
    os.environ.pop("CONDASPAWNER_TEST_REGISTRY", None)
    remove_repo_images(docker_daemon.client(), repository)


def remove_kept_containers(client, repository: str) -> None:
    """The hub keeps stopped containers (remove = False); fixtures_hub removes only those of its
    image_repo, and their home volumes: these run registry images."""
    for container in client.containers.list(ignore_removed=True, all=True, filters={"label": "io.condaspawner.key"}):
        if str(container.attrs["Config"]["Image"]).startswith(repository):
            container.remove(force=True)


def test_a_spawn_builds_pushes_and_runs_the_pinned_image(hub, registry, docker_daemon):
    _, repository = registry
    spawn = Spawn(hub, "reggie", {"profile": "python39", "environment": custom_env("cs-beta")})
    try:
        final = spawn.wait()
        model = hub.server_model("reggie") or {}
    finally:
        hub.stop_server("reggie")
        remove_kept_containers(docker_daemon.client(), repository)

    assert final.get("ready"), spawn.messages
    print("\n" + "\n".join(spawn.messages))
    host = repository.split("/")[0]
    assert f"Pushing the image to the registry {host} (only layers it lacks)" in spawn.messages
    pushed = [message for message in spawn.messages if message.startswith("Pushed ")]
    assert pushed and re.match(rf"Pushed \d+ (MB|kB) to {re.escape(host)} in [0-9.]+ s: \d+ of \d+ layers new",
                               pushed[0]), spawn.messages
    state = model["state"]["condaspawner"]
    assert re.fullmatch(rf"{re.escape(repository)}:{state['key'][:16]}@sha256:[0-9a-f]{{64}}", state["reference"])


def test_the_environments_page_lists_an_image_only_the_registry_has(hub, registry, docker_daemon):
    _, repository = registry
    admin = Client(hub, "admin")
    [image] = [image for image in admin.get("/admin/images")["images"] if image["users"] == ["reggie"]]
    assert image["location"] == "daemon" and image["tag"] == f"{repository}:{image['key'][:16]}", image
    docker_daemon.client().images.remove(image["tag"])  # the digest reference servers ran stays, untagged

    listing = admin.get("/admin/images")
    [again] = [entry for entry in listing["images"] if entry["key"] == image["key"]]
    assert again["location"] == "registry" and again["users"] == ["reggie"] and listing["notes"] == []
    assert again["size"] > 0 and again["created"] == image["created"] and again["name"] == image["name"]


def test_a_registry_that_is_down_fails_the_spawn_in_one_line(hub, registry):
    server, _ = registry
    server.stop()
    try:
        spawn = Spawn(hub, "reggie-down", {"profile": "python39", "environment": custom_env("cs-alpha")})
        message = failure_message(hub, spawn)
    finally:
        server.start()  # the same port and storage: the session's other tests keep their registry

    assert spawn.status in (503, 202), spawn.body
    assert message == (f"The image registry is unavailable: the registry {server.host} cannot be reached "
                       "(connection refused); try again in a minute, or tell the hub admin if it keeps failing")
    assert_one_clean_line(message)
    assert hub.server_model("reggie-down") is None
