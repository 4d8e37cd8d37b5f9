"""The environments page without a hub: configure(c), the EnvironmentsPage settings, a swarm's GPU map."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from fake_nvml import FakeNvml
from test_gpuqueue import until
from traitlets.config import Config

from jupyterhub_condaspawner.builder import BuildError, BuildRequest, ImageBuilder
from jupyterhub_condaspawner.culler import GpuIdleCuller
from jupyterhub_condaspawner.envhandlers import (
    _API,
    AdminForm,
    PageFailure,
    _Environments,
    one_check_at_a_time,
    spawn_pending_url,
)
from jupyterhub_condaspawner.environments import admin_builds, gpu_map, recent_failures, swarm_gpu_map
from jupyterhub_condaspawner.envpage import ADMIN_SCOPE, EnvironmentsPage, configure, handlers
from jupyterhub_condaspawner.gpuqueue import GpuQueue
from jupyterhub_condaspawner.gpus import GpuAllocator, GpuInventory
from jupyterhub_condaspawner.spec import SpecPolicy
from jupyterhub_condaspawner.swarm import NodeInfo, SwarmState, TaskInfo
from jupyterhub_condaspawner.swarmgpus import GpuReading
from jupyterhub_condaspawner.usage import Use


def test_configure_adds_the_handlers_templates_and_scope_and_keeps_what_was_there():
    c = Config()
    c.JupyterHub.extra_handlers = [("/mine", "my.Handler")]
    c.JupyterHub.custom_scopes = {"custom:mine": {"description": "mine"}}
    configure(c)
    assert c.JupyterHub.extra_handlers == [("/mine", "my.Handler"), *handlers()]
    assert set(c.JupyterHub.custom_scopes) == {"custom:mine", ADMIN_SCOPE}
    assert c.JupyterHub.template_paths[0].endswith("templates/hub")
    assert "load_roles" not in c.JupyterHub  # the settings are read by the handlers, not a role
    assert EnvironmentsPage(config=c).admin_users == set()


def test_admins_named_in_settings_set_before_or_after_configure():
    c = Config()
    c.EnvironmentsPage.admin_users = {"carol"}
    configure(c, admin_users=["alice"], admin_groups=["gpu-admins"])
    c.EnvironmentsPage.admin_groups = c.EnvironmentsPage.admin_groups | {"late-group"}  # a later line of the file
    page = EnvironmentsPage(config=c)
    assert page.admin_users == {"alice", "carol"} and page.admin_groups == {"gpu-admins", "late-group"}
    assert page.names_admin("carol", []) and page.names_admin("dave", ["late-group", "x"])
    assert not page.names_admin("dave", ["x"])


def test_every_setting_has_help_with_a_config_example():
    for name, trait in EnvironmentsPage.class_traits(config=True).items():
        assert f"c.EnvironmentsPage.{name} = " in trait.help, name


def test_the_swarm_gpu_map_lists_each_nodes_gpus_holders_readings_and_the_pending_servers():
    node = dict(address="10.0.0.2", state="ready", availability="active", role="worker", gpu_model="NVIDIA A100",
                nano_cpus=0, memory=0)
    nodes = (NodeInfo("n2", "worker2", gpus=("GPU-c",), **node), NodeInfo("n1", "worker1", gpus=("GPU-a", "GPU-b"), **node))
    task = dict(service_id="s", node_id="n1", desired_state="running", message="", error="", server_name="")
    tasks = (
        TaskInfo("t1", state="running", user="alice", gpus_requested=1, gpus=("GPU-b",), created="2026-12-01T01:00:00Z",
                 **task),
        TaskInfo("t3", state="pending", user="carol", gpus_requested=2, gpus=(), created="2026-12-01T01:00:30Z",
                 **{**task, "message": "insufficient resources on 2 nodes"}),
        TaskInfo("t2", state="pending", user="bob", gpus_requested=2, gpus=(), created="2026-12-01T01:00:10Z", **task),
    )
    culler = GpuIdleCuller(GpuAllocator(inventory=GpuInventory(static_gpus=[])))
    readings = {"GPU-b": GpuReading(97.0, 2 ** 30), "GPU-a": GpuReading(0.0, 0)}
    now = datetime(2026, 12, 1, 1, 1, 0, tzinfo=timezone.utc).timestamp()

    in_the_hub = [{"user": "dan", "server": "", "gpus": 1, "model": "", "profile": "gpu", "position": 0,
                   "waited_seconds": 5}]  # GpuQueue.waiting(): a start the hub's queue holds back
    view = swarm_gpu_map(SwarmState(nodes, tasks), readings, 10.0, culler, now=now, waiting=in_the_hub)

    assert [(row["host"], row["index"], row["uuid"], row["state"]) for row in view["gpus"]] == [
        ("worker1", 0, "GPU-a", "free"), ("worker1", 1, "GPU-b", "held_busy"), ("worker2", 0, "GPU-c", "free")]
    held = view["gpus"][1]
    assert held["utilization"] == 97.0 and held["memory_used"] == 2 ** 30 and held["model"] == "NVIDIA A100"
    assert held["holders"] == [{"user": "alice", "server": "", "since": "2026-12-01T01:00:00Z", "running": True,
                                "idle_seconds": None}]
    assert view["gpus"][2]["utilization"] is None  # worker2 gave no reading
    assert [(w["user"], w["position"], w["gpus"], w["waited_seconds"], w["reason"]) for w in view["queue"]] == [
        ("bob", 0, 2, 50, ""), ("carol", 1, 2, 30, "insufficient resources on 2 nodes"),
        ("dan", 2, 1, 5, "in the hub's queue")]
    assert view["queue"][2]["profile"] == "gpu"


def test_a_users_second_check_while_the_first_runs_is_a_429_in_one_line():
    checking: set[str] = set()
    with one_check_at_a_time(checking, "alice"):
        with pytest.raises(PageFailure) as refused, one_check_at_a_time(checking, "alice"):
            pass
        with one_check_at_a_time(checking, "bob"):  # another user's check runs
            assert checking == {"alice", "bob"}
    assert (refused.value.status, refused.value.message) == (
        429, "your previous check is still running: wait for its answer, then check again")
    with pytest.raises(ValueError), one_check_at_a_time(checking, "alice"):  # a check that fails ends too
        raise ValueError
    assert checking == set()


async def test_the_live_builds_table_hears_of_a_build_starting_and_ending(tmp_path):
    # A daemon that is not there: the build starts, fails at its first look-up, and ends.
    builder = ImageBuilder(cache_dir=str(tmp_path), docker_host="unix:///nonexistent/docker.sock")
    request = BuildRequest(SpecPolicy().parse("dependencies: [python=3.9]\n"))
    started, before = builder.runs.next_change(), builder.runs.changes
    build = builder.runs.ensure(request, "0" * 64)
    assert started.done() and builder.in_progress() == [build]

    ended = builder.runs.next_change()
    with pytest.raises(BuildError, match="nonexistent"):
        await build.result()
    assert ended.done() and builder.runs.changes == before + 2 and builder.in_progress() == []


def test_the_builds_view_lists_recent_failures_read_from_the_cache_folder(tmp_path):
    builder = ImageBuilder(cache_dir=str(tmp_path))
    for key, status in (("a" * 64, "failed"), ("b" * 64, "built")):
        builder.key_dir(key).mkdir(parents=True)
        builder.records.record(key, status=status, name=f"env {status}", phase="pip" if status == "failed" else "",
                               cause="no cs-x", started="2026-12-01T01:00:00+00:00",
                               finished="2026-12-01T01:01:00+00:00")
    failed = recent_failures(builder)

    assert failed == [{"key": "a" * 64, "name": "env failed", "phase": "pip", "cause": "no cs-x",
                       "finished": "2026-12-01T01:01:00+00:00"}]
    assert admin_builds(builder, failed) == {"running": [], "queued": [], "failed": failed, "max_concurrent_builds": 2}
async def test_the_gpu_map_lists_the_queue_as_the_event_loop_read_it():
    # The queue changes on the event loop: the page reads it there, and maps the GPUs (NVML) in a thread.
    allocator = GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(1)), queue_timeout=30)
    queue = GpuQueue(allocator)
    await queue.allocate("alice", "", 1)
    waiting = asyncio.ensure_future(queue.allocate("bob", "", 1, profile="gpu"))
    await until(lambda: queue.length == 1)

    page = await asyncio.to_thread(gpu_map, allocator, queue.waiting(), GpuIdleCuller(allocator))

    assert [(row["user"], row["profile"], row["position"]) for row in page["queue"]] == [("bob", "gpu", 0)]
    assert [holder["user"] for holder in page["gpus"][0]["holders"]] == ["alice"]
    queue.cancel("bob", "")
    await asyncio.gather(waiting, return_exceptions=True)


class _Handler(_Environments):
    """The handlers' shared part, as a request of ``user`` (a user, or a service) with ``scopes`` sees it."""

    def __init__(self, user: Any, method: str = "GET", body: bytes = b"", scopes: tuple[str, ...] = ()):
        self.current_user, self.expanded_scopes, self.settings = user, set(scopes), {}
        self.request = SimpleNamespace(method=method, body=body)
        self.users: dict[str, Any] = {}

    def has_scope(self, scope: str) -> bool:
        return scope in self.expanded_scopes


def test_a_services_token_is_refused_in_one_line_not_an_internal_error():
    # A service has no spawner: asked for its environments, it is told the page is for users.
    service = SimpleNamespace(kind="service", name="announcer")
    for method in ("GET", "POST"):
        with pytest.raises(PageFailure) as refused:
            _Handler(service, method, scopes=("read:servers", "servers")).condaspawner  # noqa: B018
        assert (refused.value.status, refused.value.message) == (
            403, "the environments page is for users: log in, or use a user's API token")


class _BodyHandler(_Handler):
    body = _API.body
    _refuse_large_body = _API._refuse_large_body
    condaspawner = SimpleNamespace(policy=SpecPolicy())  # type: ignore[assignment]


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"server": ' * 50_000, b"\xff\xfe{", b"{", b"5"])
def test_a_malformed_request_body_is_a_400_in_one_line(raw):
    alice = SimpleNamespace(kind="user", name="alice")
    handler = _BodyHandler(alice, "POST", raw, scopes=("servers!user=alice",))
    with pytest.raises(PageFailure) as refused:
        handler.body()
    assert refused.value.status == 400 and refused.value.message in (
        "the request body must be JSON", "the request body must be a JSON object")


class _ServicesHandler(_Handler):
    condaspawner: Any = None  # the test's HubServices


async def test_an_image_whose_build_runs_is_not_deleted_under_it(tmp_path):
    # Deleted while a rebuild runs, the image would be back once the rebuild tags its new one.
    key = "c" * 64
    builder = ImageBuilder(cache_dir=str(tmp_path), docker_host="unix:///nonexistent/docker.sock")
    builder.in_progress = lambda: [SimpleNamespace(key=key)]  # type: ignore[method-assign]
    builder.find_image = lambda key: SimpleNamespace(id="sha256:" + key)  # type: ignore[method-assign]
    handler = _ServicesHandler(SimpleNamespace(kind="user", name="ops"), "DELETE", scopes=("servers!user=ops",))
    handler.condaspawner = SimpleNamespace(builder=builder)
    with pytest.raises(PageFailure) as refused:
        await handler._delete(key)
    assert (refused.value.status, refused.value.message) == (
        409, f"{builder.tag_for(key)} is being built now: delete it once its build has ended (the builds table)")


def test_a_starts_progress_url_names_the_user_as_the_hubs_own_pages_do():
    # escaped_name is escaped already: escaped again, "josé" became "jos%25C3%25A9", another (no) user.
    from jupyterhub.user import User

    class Named:
        name = "josé"
        escaped_name = User.escaped_name
    assert spawn_pending_url("/hub/", Named(), "") == "/hub/spawn-pending/jos%C3%A9"
    assert spawn_pending_url("/hub/", Named(), "second") == "/hub/spawn-pending/jos%C3%A9/second"


@pytest.mark.parametrize("profile,own,message", [
    ("envtest", False, "cannot rebuild: profile 'envtest', which built it, is no longer on this hub"),
    # `condaspawner build` of a user's file: no usage record has its environment.yml
    ("", True, "cannot rebuild: its environment.yml is not recorded on this hub (no user started it here)"),
])
async def test_a_rebuild_that_cannot_be_says_why_in_words(profile, own, message):
    key = "d" * 64
    handler = _ServicesHandler(SimpleNamespace(kind="user", name="ops"), "POST", scopes=("servers!user=ops",))
    handler.condaspawner = SimpleNamespace(catalog=SimpleNamespace(get=lambda slug: {}[slug]), policy=SpecPolicy())
    handler.use_of = lambda key: Use("", key, profile, own, "env", "", 0.0, 0.0)  # type: ignore[method-assign]
    with pytest.raises(PageFailure) as refused:
        await handler._rebuild(key)
    assert (refused.value.status, refused.value.message) == (400, message)


async def test_the_admin_forms_gc_is_a_dry_run_unless_the_run_button_says_otherwise():
    # As the API's: a post without dry_run (a script's, a form of an older page) removes nothing.
    asked: list[tuple[str, str, bool]] = []

    class Form:
        current_user = SimpleNamespace(kind="user", name="ops")

        def __init__(self, fields: dict[str, str]):
            self.fields = fields

        def get_body_argument(self, name: str, default: str) -> str:
            return self.fields.get(name, default)

        async def admin_action(self, action: str, argument: str, dry_run: bool) -> dict[str, Any]:
            asked.append((action, argument, dry_run))
            return {"message": "done"}

        def back(self, path: str, message: str, kind: str = "info") -> None:
            pass

    for fields in ({"action": "gc"}, {"action": "gc", "dry_run": "1"}, {"action": "gc", "dry_run": "0"}):
        await AdminForm.post(Form(fields))  # type: ignore[arg-type]
    assert [dry_run for _, _, dry_run in asked] == [True, True, False]


async def test_a_second_start_while_the_first_is_under_way_is_a_409_not_an_internal_error():
    # A double click: both pass the "already running" check, then wait (the profile's current key,
    # read in a thread); the first spawn begins, and the hub refuses the second (RuntimeError).
    spawner = SimpleNamespace(active=False, allowed_profile=lambda slug: None)

    async def spawn_single_user(user: Any, server_name: str, options: dict[str, Any]) -> None:
        spawner.active = True  # the first request's spawn, pending now
        raise RuntimeError("alice pending spawn")

    alice = SimpleNamespace(kind="user", name="alice", get_or_create_spawner=lambda name, display: spawner)
    handler = _ServicesHandler(alice, "POST", scopes=("servers!user=alice",))
    handler.use_of = lambda key: Use("alice", key, "python39", False, "Python", "", 0.0, 0.0)  # type: ignore[method-assign]

    async def unchanged(use: Use) -> None:
        pass
    handler._refuse_a_changed_profile = unchanged  # type: ignore[method-assign]
    handler.spawn_single_user = spawn_single_user  # type: ignore[attr-defined]
    with pytest.raises(PageFailure) as refused:
        await handler.start("e" * 64)
    assert (refused.value.status, refused.value.message) == (
        409, "your server is already running or starting: stop it on the Home page first")


async def test_a_delete_while_the_docker_daemon_is_gone_is_a_503_as_the_other_views_say(tmp_path):
    # 409 said the daemon refused (a stopped container still uses the image): try again later instead
    key = "e" * 64
    builder = ImageBuilder(cache_dir=str(tmp_path), docker_host="unix:///nonexistent/docker.sock")
    handler = _ServicesHandler(SimpleNamespace(kind="user", name="ops"), "DELETE", scopes=("servers!user=ops",))
    handler.condaspawner = SimpleNamespace(builder=builder)
    with pytest.raises(PageFailure) as refused:
        await handler._delete(key)
    assert refused.value.status == 503 and refused.value.message.startswith(f"cannot delete {builder.tag_for(key)}: ")
    assert "cannot reach the Docker daemon" in refused.value.message
