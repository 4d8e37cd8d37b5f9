"""End to end, the environments page's JSON API and its permissions, on a real hub.

alice starts two environments of her own (the second upgrades cs-alpha and drops cs-beta
and cs-gamma) and a profile whose file an admin changed after prebuilding it (cs-alpha 1.0 ->
1.1); bob starts one of his own. Then every view is asked for as alice, bob, a user given the
custom:condaspawner:admin scope, the hub admin, and nobody: a user sees only their own
environments (others' keys are 404), non-admins get 403 on admin views and actions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import gated_channel
import pytest
import yaml
from fixtures_docker import REPO
from fixtures_hub import FAKE_GPU
from pip_index import HUB_PIP_CONFIG, served_to_hubs
from throwaway_channel import write_channel

from condaspawner_bench.devchannel import CondaPackage
from jupyterhub_condaspawner.buildrecords import BuildRecords
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.spec import SpecPolicy

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = HUB_PIP_CONFIG + """
c.JupyterHub.load_roles = c.JupyterHub.load_roles + [
    {"name": "condaspawner-admins", "scopes": ["custom:condaspawner:admin"], "users": ["envadmin"]},
]
c.EnvironmentsPage.admin_users = {"listedadmin"}
c.EnvironmentsPage.admin_groups = {"envpage-admins"}
c.JupyterHub.load_groups.update({"envpage-admins": {"users": ["groupadmin"]}})
c.GpuAllocator.device_mode = "nvidia-runtime"  # no NVIDIA runtime here: the fake GPU travels as an env var
c.ImageBuilder.max_concurrent_builds = 1  # a second build waits in the build queue (the live table)
c.ImageBuilder.max_images = 1  # the GC run (the last test) removes every image no container uses
# A channel whose answers wait for the test (a Check that is solving), held longer than a slow run takes.
c.Resolver.channel_urls.update({"gated-checks": os.environ["%s"]})
c.SpecPolicy.allowed_channels.append("gated-checks")
c.SpecPolicy.precheck_timeout = 300
""" % gated_channel.HUB_ENV
GATED = "gated-envpage-builds"
EARLY_NAME = "built-before-the-hub"
RUN = uuid.uuid4().hex  # new keys on every run: the daemon is shared
PROFILE = """
display_name: "Env page test"
slug: envtest
environment: envs/envtest.yml
allow_custom_environment: true
"""


@pytest.fixture(scope="module", autouse=True)
def pip_index():
    with served_to_hubs() as index:
        yield index


@pytest.fixture(scope="module", autouse=True)
def gated_checks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gated-checks")
    write_channel(directory, [CondaPackage("cs-gated", "1.0", "0", "noarch")])
    with gated_channel.served_to_hubs(directory) as channel:
        yield channel


def hub_before_start(hub) -> None:
    """An image of this installation built before the hub first ran (`condaspawner build`): no
    usage record will ever say who started it then."""
    path = hub.state / "early.yml"
    # Not bob's file: `condaspawner build FILE` of a user's file builds the image a user's upload of
    # the same file starts (the kernel's name is not in it), and this one must stay nobody's.
    path.write_text(f"name: {EARLY_NAME}\n" + own_env("cs-beta", "cs-gamma"))
    built = subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", "build", "--config",
                            str(REPO / "demo" / "jupyterhub_config.py"), str(path)],
                           env=hub.env, cwd=hub.state, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr


def own_env(*packages: str) -> str:
    lines = "".join(f"  - {package}\n" for package in ("python=3.9", "ipykernel", *packages))
    return f"channels: [conda-forge]\ndependencies:\n{lines}variables: {{RUN: {RUN}}}\n"


def profile_env(alpha: str, extra: str = "") -> str:
    variables = f"{{RUN: {RUN}, EXTRA: '{extra}'}}" if extra else f"{{RUN: {RUN}}}"
    return f"channels: [conda-forge]\ndependencies: [python=3.9, ipykernel, cs-alpha={alpha}]\nvariables: {variables}\n"


class Client:
    """One user's API token on the hub."""

    def __init__(self, hub, user: str, scopes: list[str] | None = None):
        self.hub, self.user = hub, user
        hub.ensure_user(user)
        request = {"note": "envpage test", **({"scopes": scopes} if scopes is not None else {})}
        status, token = hub.api("POST", f"/users/{user}/tokens", request)
        assert status == 201, token
        self.token = token["token"]

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any, str]:
        """(status, JSON or text, content type) of /hub/api/environments<path>."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.hub.url}/hub/api/environments{path}", data=data, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                payload, status, kind = response.read(), response.status, response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            payload, status, kind = error.read(), error.code, error.headers.get("Content-Type", "")
        text = payload.decode(errors="replace")
        if "json" in kind:
            return status, json.loads(text), kind
        return status, text, kind

    def get(self, path: str) -> Any:
        status, body, _ = self.call("GET", path)
        assert status == 200, (path, status, body)
        return body


def spawn_and_wait(hub, user: str, options: dict) -> list[dict]:
    status, body = hub.spawn(user, options)
    assert status in (201, 202), body
    events = hub.progress(user, timeout=900)
    assert events[-1].get("ready"), events
    return events


def wait_for_builds(client: Client, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while True:
        builds = client.get("/admin/builds")
        if not builds["running"] and not builds["queued"]:
            return
        assert time.monotonic() < deadline, builds
        time.sleep(1)


def key_of(client: Client, predicate) -> str:
    matches = [env["key"] for env in client.get("")["environments"] if predicate(env)]
    assert len(matches) == 1, client.get("")
    return matches[0]


@pytest.fixture(scope="module")
def story(hub) -> dict[str, Any]:
    """The builds and starts every test here reads (see the module docstring)."""
    profiles = __import__("pathlib").Path(hub.env["CONDASPAWNER_DEMO_PROFILES"])
    (profiles / "envs" / "envtest.yml").write_text(profile_env("1.0"))
    (profiles / "50-envtest.yaml").write_text(PROFILE)
    alice, bob = Client(hub, "alice"), Client(hub, "bob")
    envadmin, admin = Client(hub, "envadmin"), Client(hub, "admin")
    listedadmin, groupadmin = Client(hub, "listedadmin"), Client(hub, "groupadmin")

    status, body, _ = envadmin.call("POST", "/admin/prebuild", {"profile": "envtest"})
    assert status == 200, body
    first_profile_key = body["key"]
    wait_for_builds(envadmin)
    (profiles / "envs" / "envtest.yml").write_text(profile_env("1.1", extra="1"))  # a variable is set too

    spawn_and_wait(hub, "alice", {"profile": "python39", "environment": own_env("cs-alpha=1.1", "cs-gamma")})
    hub.stop_server("alice")
    spawn_and_wait(hub, "alice", {"profile": "python39", "environment": own_env("cs-alpha=2.0")})
    hub.stop_server("alice")
    profile_events = spawn_and_wait(hub, "alice", {"profile": "envtest"})
    spawn_and_wait(hub, "bob", {"profile": "python39", "environment": own_env("cs-beta")})
    hub.stop_server("bob")
    return {
        "alice": alice, "bob": bob, "envadmin": envadmin, "admin": admin,
        "listedadmin": listedadmin, "groupadmin": groupadmin,
        "first_profile_key": first_profile_key, "profile_events": profile_events,
        "own_a": key_of(alice, lambda env: env["own"] and env["first_used"] == min(
            e["first_used"] for e in alice.get("")["environments"] if e["own"])),
        "own_b": key_of(alice, lambda env: env["own"] and env["first_used"] == max(
            e["first_used"] for e in alice.get("")["environments"] if e["own"])),
        "profile_key": key_of(alice, lambda env: env["profile"] == "envtest"),
        "bob_key": key_of(bob, lambda env: env["own"]),
    }


def test_a_user_lists_the_environments_they_started(story):
    listing = story["alice"].get("")
    assert listing["user"] == "alice" and listing["admin"] is False
    rows = {env["key"]: env for env in listing["environments"]}
    assert set(rows) == {story["own_a"], story["own_b"], story["profile_key"]}
    for env in rows.values():
        assert env["status"] == "built" and env["built"] and env["present"] is True
        assert env["size"] > 0 and env["packages"] > 5
    assert rows[story["profile_key"]]["profile"] == "envtest" and not rows[story["profile_key"]]["own"]
    assert [env["key"] for env in story["bob"].get("")["environments"]] == [story["bob_key"]]


def test_the_detail_lists_the_locked_packages(story):
    detail = story["alice"].get(f"/{story['own_b']}")
    versions = {package["name"]: package["version"] for package in detail["packages"]}
    assert versions["cs-alpha"] == "2.0" and "cs-beta" not in versions and "cs-gamma" not in versions
    assert all(package["url"] and len(package["sha256"]) == 64 for package in detail["packages"])
    assert detail["start"]["profile"] == "python39" and "cs-alpha 2.0" in detail["start"]["environment"]


def test_what_changed_against_my_previous_own_environment(story):
    detail = story["alice"].get(f"/{story['own_b']}")
    assert detail["previous"] == story["own_a"]
    diff = detail["diff"]
    assert diff["upgraded"] == [{"name": "cs-alpha", "from": "1.1", "to": "2.0"}]
    assert diff["removed"] == [{"name": "cs-beta", "version": "1.0"}, {"name": "cs-gamma", "version": "0.5"}]
    assert diff["added"] == diff["downgraded"] == diff["rebuilt"] == []
    assert story["alice"].get(f"/{story['own_a']}")["diff"] is None  # her first: nothing to compare


def test_a_profile_rebuild_shows_what_changed_in_the_api_and_on_the_progress_page(story, hub):
    detail = story["alice"].get(f"/{story['profile_key']}")
    assert detail["previous"] == story["first_profile_key"]
    assert detail["diff"]["upgraded"] == [{"name": "cs-alpha", "from": "1.0", "to": "1.1"}]
    assert detail["diff"]["variables"] == ["EXTRA"]  # not in the lock: from the two builds' specs
    messages = [event["message"] for event in story["profile_events"]]
    assert ("What changed since the previous build: 1 upgraded (cs-alpha 1.0 -> 1.1); variables changed (EXTRA)"
            in messages), messages
    session, _ = hub.login("envadmin")  # alice's server runs: her login lands in it; an admin sees her key too
    _, _, page = session.get(f"/hub/environments?key={story['profile_key']}")
    assert "variables changed</h3>" in page and "<li>EXTRA</li>" in page, page


def test_downloads_an_exact_environment_yml_that_solves_to_the_same_lock(story, dev_python_channel):
    alice, key = story["alice"], story["own_b"]
    status, text, kind = alice.call("GET", f"/{key}/environment.yml")
    assert status == 200 and "yaml" in kind, text
    status, lock, kind = alice.call("GET", f"/{key}/lock")
    assert status == 200 and "json" in kind
    exact = yaml.safe_load(text)
    assert exact["channels"] == ["conda-forge"] and exact["variables"] == {"RUN": RUN}  # conda sets them too
    pinned = {f"{p['name']}={p['version']}={p['build']}" for p in lock["packages"]}
    assert set(exact["dependencies"]) == pinned
    # conda elsewhere re-creates it: the same packages, solved again from the file alone.
    spec = SpecPolicy().parse(text, source="environment.yml")
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url})
    again = asyncio.run(resolver.solve(spec))
    assert {(p["name"], p["version"], p["build"]) for p in again.packages()} == \
        {(p["name"], p["version"], p["build"]) for p in lock["packages"]}
    status, log, kind = alice.call("GET", f"/{key}/log")
    assert status == 200 and "text/plain" in kind and "solved:" in log


def test_the_build_log_streams_as_server_sent_events(story):
    status, text, kind = story["alice"].call("GET", f"/{story['own_a']}/log/stream")
    assert status == 200 and "text/event-stream" in kind
    assert "data: " in text and 'event: done\ndata: "built"' in text


def test_a_long_build_log_downloads_and_streams_whole_a_chunk_at_a_time(story, hub):
    key, alice = story["own_b"], story["alice"]
    path = hub.state / "builder" / "builds" / key / "build.log"
    with path.open("a", encoding="utf-8") as log:  # several chunks (64 KiB) more, characters of 2 bytes among them
        log.writelines(f"appended line {number:05d}: é ü {'.' * 60}\n" for number in range(4000))
    whole = path.read_text(encoding="utf-8")

    status, text, kind = alice.call("GET", f"/{key}/log")
    assert status == 200 and "text/plain" in kind and text == whole
    status, stream, _ = alice.call("GET", f"/{key}/log/stream")
    events = stream.split("\n\n")
    assert events[-2:] == ['event: done\ndata: "built"', ""]
    assert [json.loads(event.removeprefix("data: ")) for event in events[:-2]] == whole.split("\n")[:-1]


def test_a_user_never_sees_another_users_environment(story):
    bob, alice_key = story["bob"], story["own_b"]
    for path in ("", "/environment.yml", "/lock", "/log", "/log/stream"):
        status, body, _ = bob.call("GET", f"/{alice_key}{path}")
        assert status == 404, (path, body)
        assert "cs-alpha" not in json.dumps(body)
    status, body, _ = bob.call("POST", f"/{alice_key}/start")
    assert status == 404, body
    status, body, _ = bob.call("GET", f"/{'0' * 64}")
    assert status == 404 and body["message"] == "no such environment of yours"


def test_a_key_in_a_wrong_form_gets_one_line_saying_what_a_key_is(story):
    alice = story["alice"]
    for path in (f"/{story['own_a'].upper()}", f"/{story['own_a'][:16]}/lock", "/admin/nothing"):
        status, body, _ = alice.call("GET", path)
        assert status == 404 and body["message"] == (
            "no such environments API path: a key is the image's 64 lowercase hex digits (GET /hub/api/environments "
            "lists yours)"), (path, body)


def test_without_a_login_nothing_answers(hub, story):
    request = urllib.request.Request(f"{hub.url}/hub/api/environments/{story['own_a']}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403


ADMIN_CALLS = [
    ("GET", "/admin/images", None), ("GET", "/admin/builds", None), ("GET", "/admin/gpus", None),
    ("POST", "/admin/prebuild", {"profile": "python39"}), ("POST", "/admin/gc", {"dry_run": True}),
    ("POST", "/admin/rebuild", {"key": "0" * 64}), ("DELETE", f"/admin/images/{'0' * 64}", None),
    ("GET", "/admin/builds/stream", None), ("POST", "/admin/gc", {"dry_run": False}),
]


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS)
def test_non_admins_get_403_on_admin_views_and_actions(story, method, path, body):
    status, answer, _ = story["alice"].call(method, path, body)
    assert status == 403, answer
    assert answer["message"] == "this needs the custom:condaspawner:admin scope (hub admins have it)"


def test_a_token_made_for_less_than_its_user_cannot_look_act_or_administer(story):
    # A server's token for a visitor, or a narrow one: it may not read or start the user's
    # environments, and a page admin's (named in EnvironmentsPage) is no admin token.
    alice_key = story["own_b"]
    narrow = Client(story["alice"].hub, "alice", scopes=["read:users:name!user=alice"])
    status, answer, _ = narrow.call("GET", "")
    assert status == 403 and answer["message"] == "this token cannot see your environments: it needs the " \
                                                  "read:servers scope", answer
    assert narrow.call("GET", f"/{alice_key}/lock")[0] == 403
    looking = Client(story["alice"].hub, "alice", scopes=["read:servers!user=alice"])
    assert looking.call("GET", f"/{alice_key}/lock")[0] == 200
    status, answer, _ = looking.call("POST", f"/{alice_key}/start", {})
    assert status == 403 and answer["message"] == "this token cannot start or change your environments: it " \
                                                  "needs the servers scope", answer
    listed = Client(story["alice"].hub, "listedadmin", scopes=["servers!user=listedadmin",
                                                               "read:servers!user=listedadmin"])
    for method, path, body in (("GET", "/admin/images", None), ("POST", "/admin/gc", {"dry_run": True})):
        status, answer, _ = listed.call(method, path, body)
        assert status == 403 and "custom:condaspawner:admin" in answer["message"], (path, answer)


@pytest.mark.parametrize("who", ["envadmin", "admin", "listedadmin", "groupadmin"])
def test_the_custom_scope_hub_admins_and_the_page_settings_see_every_image(story, who):
    images = {image["key"]: image for image in story[who].get("/admin/images")["images"]}
    assert {story["own_a"], story["own_b"], story["profile_key"], story["bob_key"],
            story["first_profile_key"]} <= set(images)
    assert images[story["bob_key"]]["users"] == ["bob"] and images[story["bob_key"]]["running"] == []
    assert images[story["profile_key"]]["profiles"] == ["envtest"]
    assert images[story["profile_key"]]["running"] == ["alice"]  # her envtest server still runs
    assert images[story["first_profile_key"]]["users"] == []  # prebuilt, never started
    assert images[story["first_profile_key"]]["users_known"] is True  # the usage log ran since
    assert all(image["size"] > 0 and image["created"] and image["last_used"] for image in images.values())


def test_the_admin_sees_the_gpu_map_and_the_builds(story):
    gpus = story["envadmin"].get("/admin/gpus")
    row = next(gpu for gpu in gpus["gpus"] if gpu["uuid"] == FAKE_GPU)
    assert row["model"] == "NVIDIA A100-SXM4-80GB" and row["memory_total"] == 80 * 1024 ** 3
    assert row["state"] == "free" and row["holders"] == [] and row["host"]
    assert gpus["queue"] == []
    builds = story["envadmin"].get("/admin/builds")
    assert builds["running"] == [] and builds["queued"] == [] and builds["max_concurrent_builds"] >= 1


def test_start_with_an_environment_its_profile_no_longer_builds_is_refused_in_one_line(story, hub):
    # The prebuilt envtest image (cs-alpha 1.0): the profile's file changed since (1.1), so a start
    # of the profile would get 1.1, not the environment the button names.
    status, body, _ = story["envadmin"].call("POST", f"/{story['first_profile_key']}/start")
    assert status == 409 and body["message"] == (
        "Env page test has changed since this environment was built (its environment.yml or display name, or the "
        "hub's base image): a start now gets its current environment, not this one; start it from the Home page"), body
    assert hub.server_model("envadmin") is None


def test_a_rebuild_of_an_older_image_of_a_profile_builds_that_image_or_says_why_it_cannot(story, hub):
    # The prebuilt envtest image (cs-alpha 1.0): the profile builds 1.1 now. Its Rebuild builds
    # 1.0 again, from what its build recorded, not the profile's current environment.
    envadmin, old = story["envadmin"], story["first_profile_key"]
    created = {image["key"]: image["created"] for image in envadmin.get("/admin/images")["images"]}
    status_file = hub.state / "builder" / "builds" / old / "status.json"
    recorded = status_file.read_text()
    # As a hub that did not record what a key was built from: no record says how to build it again.
    status_file.write_text(json.dumps({name: value for name, value in json.loads(recorded).items()
                                       if name not in ("spec", "cuda")}))
    try:
        status, body, _ = envadmin.call("POST", "/admin/rebuild", {"key": old})
        session, _ = hub.login("envadmin")
        _, _, page = session.post("/hub/environments/admin/action", {"action": "rebuild", "argument": old})
    finally:
        status_file.write_text(recorded)
    tag = next(image["tag"] for image in envadmin.get("/admin/images")["images"] if image["key"] == old)
    refusal = (f"cannot rebuild: {tag} is an older environment of Env page test (its environment.yml or CUDA, or "
               "the hub's base image, changed since), and what it was built from is not recorded here: prebuild "
               "the profile, or start it, to build its current environment")
    assert (status, body["message"]) == (409, refusal), body
    assert f'id="notice">{refusal}</div>' in html.unescape(page)
    assert envadmin.get("/admin/builds")["running"] == []  # nothing was built instead

    status, body, _ = envadmin.call("POST", "/admin/rebuild", {"key": old})
    assert status == 200 and body == {"key": old, "message": f"rebuilding Env page test ({old[:16]})"}, body
    wait_for_builds(envadmin)
    versions = {package["name"]: package["version"] for package in envadmin.get(f"/{old}")["packages"]}
    assert versions["cs-alpha"] == "1.0"
    after = {image["key"]: image["created"] for image in envadmin.get("/admin/images")["images"]}
    assert after[story["profile_key"]] == created[story["profile_key"]]  # the current one: not built again


def test_admin_actions_gc_dry_run_delete_and_refusals(story, hub):
    envadmin = story["envadmin"]
    status, body, _ = envadmin.call("POST", "/admin/gc", {"dry_run": True})
    assert status == 200 and body["dry_run"] is True and body["message"].startswith("gc would remove"), body
    # Alice's envtest server runs on its image: it stays.
    status, body, _ = envadmin.call("DELETE", f"/admin/images/{story['profile_key']}")
    assert status == 409 and body["message"] == "a server uses this image (alice): stop it first"
    status, body, _ = envadmin.call("POST", "/admin/prebuild", {"profile": "no-such-profile"})
    assert status == 400 and body["message"].startswith("profile: ")
    status, body, _ = envadmin.call("POST", "/admin/gc", {"dry_run": "yes"})
    assert status == 400 and body["message"] == "dry_run: must be true or false"
    status, body, _ = envadmin.call("POST", "/admin/rebuild", {"key": "0" * 64})
    assert status == 404 and body["message"] == "no environment with this key on this hub"
    status, body, _ = envadmin.call("POST", "/admin/rebuild", {"key": "../../" + "0" * 58})  # never a path
    assert status == 404 and body["message"] == "key: must be an image's full key (64 hex digits)"
    # The first envtest build: unused, so it goes, once no start holds it (as gc: a start that
    # found the image pins it until its container runs).
    start_pin = BuildRecords(hub.state / "builder").pin(story["first_profile_key"])
    try:
        status, body, _ = envadmin.call("DELETE", f"/admin/images/{story['first_profile_key']}")
        assert status == 409 and body["message"] == ("a server is starting on this image: try again when it has "
                                                     "started, and stop it first"), body
    finally:
        start_pin.close()
    status, body, _ = envadmin.call("DELETE", f"/admin/images/{story['first_profile_key']}")
    assert status == 200, body
    keys = {image["key"] for image in envadmin.get("/admin/images")["images"]}
    assert story["first_profile_key"] not in keys and story["profile_key"] in keys


def test_an_actions_result_shows_once_and_no_link_puts_its_own_text_in_the_alert(story, hub):
    session, _ = hub.login("envadmin")
    status, url, page = session.post("/hub/environments/admin/action", {"action": "gc", "dry_run": "1"})
    assert status == 200 and url.endswith("/hub/environments/admin"), (status, url)
    assert re.search(r'id="notice">gc would remove \d+ image\(s\), \d+ MB</div>', page)
    _, _, again = session.get("/hub/environments/admin")
    assert 'id="notice"' not in again  # shown once
    # A link from elsewhere (a phishing mail) cannot make the hub's page say what it wants.
    for path in ("/hub/environments", "/hub/environments/admin"):
        _, _, spoofed = session.get(path + "?message=Your+session+expired:+log+in+at+evil.example&kind=danger")
        assert "evil.example" not in spoofed and 'id="notice"' not in spoofed


def test_an_admin_rebuilds_an_unused_image(story):
    envadmin, key = story["envadmin"], story["bob_key"]
    status, body, _ = envadmin.call("POST", "/admin/rebuild", {"key": key})
    assert status == 200 and body["key"] == key and body["message"].startswith("rebuilding My environment"), body
    wait_for_builds(envadmin)
    assert key in {image["key"] for image in envadmin.get("/admin/images")["images"]}
    assert story["bob"].get(f"/{key}")["status"] == "built"
    status, body, _ = envadmin.call("POST", "/admin/rebuild", {"key": "f" * 64})
    assert status == 404, body


def test_start_a_server_with_an_environment(story, hub):
    alice = story["alice"]
    status, body, _ = alice.call("POST", f"/{story['own_a']}/start")
    assert status == 409 and body["message"].startswith("your server is already running")  # envtest runs
    hub.stop_server("alice")
    status, body, _ = alice.call("POST", f"/{story['own_a']}/start")
    assert status == 202, body
    events = hub.progress("alice", timeout=600)
    assert events[-1].get("ready"), events
    running = {image["key"]: image["running"] for image in story["envadmin"].get("/admin/images")["images"]}
    assert running[story["own_a"]] == ["alice"]
    hub.stop_server("alice")


# -- the spawn form's "Check" button: its API, and the button on the form ------------------------


def test_check_accepts_a_file_says_which_keys_it_ignores_and_that_it_solves(hub):
    carol = Client(hub, "checker")
    text = own_env("cs-beta") + "platforms: [linux-64]\ncategory: main\n"
    status, answer, _ = carol.call("POST", "/check", {"profile": "python39", "environment": text})

    assert status == 200, answer
    assert answer["ok"] is True and answer["solves"] is True and len(answer["key"]) == 64
    assert answer["notes"] == ["ignored: platforms, category"]
    assert hub.server_model("checker") is None  # a check starts nothing
    # misspelt, the profile would be ignored: the answer would be the default profile's
    status, answer, _ = carol.call("POST", "/check", {"profil": "python39", "environment": text})
    assert (status, answer["message"]) == (400, "'profil' is not an option of a check: it takes only 'profile' and "
                                                "'environment'"), answer


def test_check_lists_every_problem_at_once(hub):
    text = ("channels: [conda-forge, https://evil.example/chan, my-own-channel]\n"
            "dependencies: [python=3.9, {pip: [https://evil.example/x.whl]}]\n")
    status, answer, _ = Client(hub, "checker2").call("POST", "/check", {"profile": "python39", "environment": text})

    assert status == 200 and answer["ok"] is False, answer
    assert answer["count"] == len(answer["problems"]) == 3, answer
    assert [problem.split(":")[0] for problem in answer["problems"]] == [
        "channels[1] (line 1)", "channels[2] (line 1)", "dependencies[1].pip[0] (line 2)"]


def test_check_says_when_a_valid_file_cannot_solve_and_on_which_profile(hub):
    client = Client(hub, "checker3")
    status, answer, _ = client.call("POST", "/check", {"profile": "python39", "environment": own_env("cs-gamaa")})

    assert status == 200 and answer["ok"] is False, answer
    [problem] = answer["problems"]
    assert problem.startswith("Your environment cannot be solved: ") and "cs-gamaa" in problem, problem
    status, answer, _ = client.call("POST", "/check", {"profile": "no-such-profile", "environment": own_env()})
    assert answer == {"ok": False, "problems": ["profile: unknown profile 'no-such-profile'"], "count": 1}
    status, answer, _ = client.call("POST", "/check", {"profile": "python39", "environment": ""})
    assert status == 400 and answer["message"] == "environment: paste or upload an environment.yml first"
    status, answer, _ = client.call("POST", "/check", {"profile": "python39", "environment": 5})
    assert status == 400 and answer["message"] == "environment: must be the text of an environment.yml"


def test_a_second_check_of_a_user_while_their_first_solves_is_a_429_and_a_later_one_reuses_its_lock(
        hub, gated_checks: gated_channel.GatedChannel):
    dana, erin = Client(hub, "checker5"), Client(hub, "checker6")
    gated = {"profile": "python39",
             "environment": "channels: [conda-forge, gated-checks]\ndependencies: [python=3.9, ipykernel, cs-gated]\n"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(dana.call, "POST", "/check", gated)
        assert gated_checks.asked.wait(300), first.result()  # dana's check is solving: it waits on the channel

        status, answer, _ = dana.call("POST", "/check", gated)
        assert status == 429 and answer["message"] == (
            "your previous check is still running: wait for its answer, then check again"), answer
        status, answer, _ = erin.call("POST", "/check", {"profile": "python39", "environment": own_env("cs-beta")})
        assert status == 200 and answer["solves"] is True, answer  # another user's check goes on
        gated_checks.gate.set()
        status, answer, _ = first.result()
    assert status == 200 and answer["solves"] is True, answer

    gated_checks.gate.clear()  # a solve now would wait (past the pre-check's timeout: "solves": null)
    status, answer, _ = dana.call("POST", "/check", gated)
    gated_checks.gate.set()
    assert status == 200 and answer["solves"] is True, answer  # the kept lock answered


def test_a_request_body_larger_than_the_api_reads_is_a_413_in_one_line(hub):
    most = SpecPolicy().max_file_bytes
    body = {"profile": "python39", "environment": "#" * (4 * most)}
    status, answer, _ = Client(hub, "checker7").call("POST", "/check", body)

    assert status == 413 and answer["message"] == (
        f"the request body is {len(json.dumps(body).encode())} bytes, more than this API reads "
        f"(4 x SpecPolicy.max_file_bytes): send an environment.yml of at most {most} bytes"), answer


def test_the_spawn_form_has_the_check_button(hub):
    page = hub.spawn_page("checker4")
    assert 'id="condaspawner-check"' in page and 'data-testid="condaspawner-check-result"' in page


# -- the builds table, live; images nobody's usage record names; named servers; GPU queue; GC --


def stream_snapshots(client: Client, path: str):
    """The ``data:`` objects of a server-sent event stream, as they come (comments skipped)."""
    request = urllib.request.Request(f"{client.hub.url}/hub/api/environments{path}",
                                     headers={"Authorization": f"token {client.token}"})
    with urllib.request.urlopen(request, timeout=600) as response:
        assert "text/event-stream" in response.headers.get("Content-Type", "")
        for line in response:
            if line.startswith(b"data:"):
                yield json.loads(line[5:])


def test_the_builds_table_and_queue_update_live(story, hub, pip_index):
    profiles = Path(hub.env["CONDASPAWNER_DEMO_PROFILES"])
    (profiles / "envs" / "gated.yml").write_text(own_env() .replace(
        "variables:", f"  - pip:\n    - {GATED}\nvariables:"))
    (profiles / "61-gated.yaml").write_text('display_name: "Gated build"\nslug: gated\nenvironment: envs/gated.yml\n')
    (profiles / "envs" / "after.yml").write_text(own_env("cs-gamma"))
    (profiles / "62-after.yaml").write_text('display_name: "Built after"\nslug: after\nenvironment: envs/after.yml\n')
    gate = pip_index.add(GATED, gated=True)
    envadmin = story["envadmin"]
    seen: list[dict] = []
    after: dict = {}
    held = False  # the gated build was seen running at its pip step while the other one queued
    try:
        snapshots = stream_snapshots(envadmin, "/admin/builds/stream")
        first = next(snapshots)
        assert first["running"] == first["queued"] == [] and first["max_concurrent_builds"] == 1, first
        status, gated, _ = envadmin.call("POST", "/admin/prebuild", {"profile": "gated"})
        assert status == 200, gated
        for snapshot in snapshots:
            seen.append(snapshot)
            running = {row["key"]: row for row in snapshot["running"]}
            queued = {row["key"] for row in snapshot["queued"]}
            if not after and gated["key"] in running:  # it holds the only build slot: the next one queues
                status, after, _ = envadmin.call("POST", "/admin/prebuild", {"profile": "after"})
                assert status == 200, after
            elif after and not held and after["key"] in queued and \
                    running.get(gated["key"], {}).get("message", "").startswith("Installing 1 pip package"):
                held = True
                gate.set()  # the gated build waits on the index: let it go
            elif held and not running and not queued:
                break  # both left the table
    finally:
        gate.set()
    assert held, seen[-3:]

    def states(key: str) -> list[tuple[str, str, int]]:
        found = []
        for snapshot in seen:
            for where in ("running", "queued"):
                found += [(where, row["phase"], row["progress"]) for row in snapshot[where] if row["key"] == key]
        return found

    # The queued build waits while the gated one runs, then runs its own steps, in order.
    after_states = states(after["key"])
    assert after_states[0][:2] == ("queued", "queued"), after_states
    running = [(phase, progress) for where, phase, progress in after_states if where == "running"]
    assert len({phase for phase, _ in running}) >= 2, after_states
    assert [progress for _, progress in running] == sorted(progress for _, progress in running), after_states
    assert {where for where, _, _ in after_states[after_states.index(("running", *running[0])):]} == {"running"}
    assert {record["key"] for record in seen[-1]["failed"]}.isdisjoint({gated["key"], after["key"]})
    keys = {image["key"] for image in envadmin.get("/admin/images")["images"]}
    assert {gated["key"], after["key"]} <= keys


def test_a_user_streams_a_few_live_logs_at_once_not_hundreds(story, hub, pip_index):
    # Each live log reads in a thread twice a second while its build runs: one user's many tabs
    # must not slow everyone's hub. The log of a build held at its pip step stays live.
    name = f"{GATED}-streams"
    profiles = Path(hub.env["CONDASPAWNER_DEMO_PROFILES"])
    (profiles / "envs" / "streams.yml").write_text(own_env().replace("variables:", f"  - pip:\n    - {name}\nvariables:"))
    (profiles / "63-streams.yaml").write_text('display_name: "Streamed"\nslug: streams\nenvironment: envs/streams.yml\n')
    gate = pip_index.add(name, gated=True)
    envadmin = story["envadmin"]
    opened = []
    try:
        status, build, _ = envadmin.call("POST", "/admin/prebuild", {"profile": "streams"})
        assert status == 200, build
        deadline = time.monotonic() + 600
        while not any(row["key"] == build["key"] and row["message"].startswith("Installing 1 pip package")
                      for row in envadmin.get("/admin/builds")["running"]):  # held at its pip step
            assert time.monotonic() < deadline, envadmin.get("/admin/builds")
            time.sleep(0.5)
        path = f"{hub.url}/hub/api/environments/{build['key']}/log/stream"
        for _ in range(8):  # open once the server sent the log so far: each is counted by then
            request = urllib.request.Request(path, headers={"Authorization": f"token {envadmin.token}"})
            opened.append(urllib.request.urlopen(request, timeout=300))
        status, body, _ = envadmin.call("GET", f"/{build['key']}/log/stream")
        assert status == 429 and body["message"] == ("you have 8 build logs streaming already: close one (a tab or "
                                                     "window showing a log) and try again"), body
        opened.pop().close()  # a closed tab frees its place (noticed within a poll)
        deadline = time.monotonic() + 60
        while len(opened) < 8 and time.monotonic() < deadline:
            request = urllib.request.Request(path, headers={"Authorization": f"token {envadmin.token}"})
            try:
                opened.append(urllib.request.urlopen(request, timeout=300))
            except urllib.error.HTTPError as refused:
                assert refused.code == 429
                time.sleep(0.5)
        assert len(opened) == 8
    finally:
        gate.set()
        for response in opened:
            response.read()  # to the build's end
            response.close()
    wait_for_builds(envadmin)


def test_an_image_built_before_the_hub_started_is_listed_with_users_unknown(story):
    images = [image for image in story["envadmin"].get("/admin/images")["images"] if image["name"] == EARLY_NAME]
    assert len(images) == 1, images
    [early] = images
    assert early["users"] == [] and early["users_known"] is False and early["running"] == []
    assert early["size"] > 0 and early["created"] and early["profiles"] == []
    for user in ("alice", "bob"):  # nobody's own: a user sees only what they started
        assert early["key"] not in {env["key"] for env in story[user].get("")["environments"]}
        status, _, _ = story[user].call("GET", f"/{early['key']}")
        assert status == 404


def test_start_a_named_server_with_an_environment(story, hub):
    alice, key = story["alice"], story["own_b"]
    for server, message in [
        ("Not A Name", "server: 'Not A Name' is not a name the hub accepts: lowercase letters, digits and single "
                       "hyphens, starting with a letter, at most 30 characters"),
        (7, 'server: must be a server\'s name (a string; "" for the default server)'),
    ]:
        status, body, _ = alice.call("POST", f"/{key}/start", {"server": server})
        assert (status, body["message"]) == (400, message), body
    # misspelt, the name would be ignored: the default server would start instead of this one
    status, body, _ = alice.call("POST", f"/{key}/start", {"sever": "second"})
    assert (status, body["message"]) == (400, "'sever' is not an option of this start: it takes only 'server' (the "
                                               "server's name; none or \"\" for the default server)"), body
    assert hub.server_model("alice", "not-a-name") is None
    status, body, _ = alice.call("POST", f"/{key}/start", {"server": "second"})
    assert status == 202 and body["progress_url"].endswith("/hub/spawn-pending/alice/second"), body
    events = hub.progress("alice", "second", timeout=600)
    assert events[-1].get("ready"), events
    model = hub.server_model("alice", "second")
    assert model["user_options"]["profile"] == "python39" and "cs-alpha 2.0" in model["user_options"]["environment"]
    running = {image["key"]: image["running"] for image in story["envadmin"].get("/admin/images")["images"]}
    assert running[key] == ["alice/second"]
    status, body, _ = alice.call("POST", f"/{key}/start", {"server": "second"})
    assert status == 409 and body["message"].startswith("your server 'second' is already running"), body
    # Left running: the GC test below must spare its image.


def wait_for_queue(client: Client, predicate, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        gpus = client.get("/admin/gpus")
        if predicate(gpus["queue"]):
            return gpus
        assert time.monotonic() < deadline, gpus
        time.sleep(0.5)


def test_the_gpu_queue_shows_waiting_spawns_until_they_get_a_gpu_or_are_cancelled(story, hub):
    envadmin = story["envadmin"]
    spawn_and_wait(hub, "gpu-holder", {"profile": "gpu-demo"})
    for count, user in enumerate(("gpu-next", "gpu-last"), 1):  # one after the other: a known order
        status, body = hub.spawn(user, {"profile": "gpu-demo"})
        assert status == 202, body
        gpus = wait_for_queue(envadmin, lambda queue, count=count: len(queue) == count)
    assert [(w["user"], w["server"], w["position"], w["profile"], w["gpus"]) for w in gpus["queue"]] == [
        ("gpu-next", "", 0, "gpu-demo", 1), ("gpu-last", "", 1, "gpu-demo", 1)]
    [gpu] = [row for row in gpus["gpus"] if row["uuid"] == FAKE_GPU]
    assert [holder["user"] for holder in gpu["holders"]] == ["gpu-holder"]

    hub.stop_server("gpu-last")  # cancelled: it leaves the queue
    wait_for_queue(envadmin, lambda queue: [w["user"] for w in queue] == ["gpu-next"])
    hub.stop_server("gpu-holder")  # the GPU frees: gpu-next gets it and leaves the queue
    events = hub.progress("gpu-next", timeout=300)
    assert events[-1].get("ready"), events
    gpus = wait_for_queue(envadmin, lambda queue: queue == [])
    [gpu] = [row for row in gpus["gpus"] if row["uuid"] == FAKE_GPU]
    assert [holder["user"] for holder in gpu["holders"]] == ["gpu-next"]
    hub.stop_server("gpu-next")


def test_gc_removes_unused_images_and_spares_a_running_servers_and_the_base(story, hub, docker_daemon, base_image):
    envadmin, alice = story["envadmin"], story["alice"]
    status, body, _ = alice.call("POST", "/admin/gc", {"dry_run": False})
    assert status == 403, body
    before = {image["key"]: image for image in envadmin.get("/admin/images")["images"]}
    assert before[story["own_b"]]["running"] == ["alice/second"]
    [unused] = [image for image in before.values() if image["name"] == EARLY_NAME]  # `condaspawner build`'s: nobody's
    assert unused["running"] == []
    current = before[story["profile_key"]]  # its server moved on to another environment: no container uses it,
    assert current["running"] == []         # but it is the profile's current image

    status, body, _ = envadmin.call("POST", "/admin/gc", {"dry_run": False})
    assert status == 200 and body["dry_run"] is False, body
    assert unused["tag"] in body["removed"] and before[story["own_b"]]["tag"] not in body["removed"], body
    assert current["tag"] not in body["removed"], body
    assert f"kept {current['tag']}: the current image of profile envtest" in body["notes"], body
    assert body["message"] == f"gc removed {len(body['removed'])} image(s), {body['freed'] / 1e6:.0f} MB"
    after = {image["key"] for image in envadmin.get("/admin/images")["images"]}
    assert unused["key"] not in after and story["profile_key"] in after and story["own_b"] in after
    assert docker_daemon.client().images.get(base_image).id  # the base image stays
    assert hub.server_model("alice", "second")["ready"]  # and the server runs on
    hub.stop_server("alice", "second")


def test_a_user_taken_out_of_a_changed_profile_is_told_that_not_how_it_changed(story, hub):
    # The course's profile moved on (its file edited) and alice left the course: her page's start
    # of its old environment is refused for her access (403), not for the change (409, which
    # would name the profile as it is now and send her to the Home page, where it is refused).
    profiles = Path(hub.env["CONDASPAWNER_DEMO_PROFILES"])
    profile, environment = profiles / "50-envtest.yaml", profiles / "envs" / "envtest.yml"
    saved = profile.read_text(), environment.read_text()
    hub.stop_server("alice")  # her default server is the one the page starts
    try:
        profile.write_text(PROFILE + "allowed_users: [bob]\n")
        environment.write_text(profile_env("2.0"))
        status, body, _ = story["alice"].call("POST", f"/{story['profile_key']}/start")
        assert status == 403 and body["message"] == "cannot start: profile: 'envtest' is not available to you", body
        assert hub.server_model("alice") is None
        profile.unlink()  # the course is over: its profile removed, not another profile "meant"
        status, body, _ = story["alice"].call("POST", f"/{story['profile_key']}/start")
        assert status == 409 and body["message"] == (
            "cannot start: profile 'envtest', which built this environment, is no longer on this hub: choose a "
            "profile on the Home page"), body
        assert hub.server_model("alice") is None
    finally:
        profile.write_text(saved[0])
        environment.write_text(saved[1])
