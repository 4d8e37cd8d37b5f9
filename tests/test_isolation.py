"""Names built from user input never collide; containers get the hardening defaults.

Spawners here are real CondaSpawners of real JupyterHub users (an in-memory hub
database, no hub process); the names are what DockerSpawner 14 renders from the
shipped configs. The last tests create real containers on the bench daemon.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path

import pytest
from dockerspawner import DockerSpawner
from escapism import unescape
from hypothesis import given, settings
from hypothesis import strategies as st
from jupyterhub import orm
from jupyterhub.objects import Hub
from jupyterhub.user import User
from tornado import web
from traitlets.config import Config, PyFileConfigLoader

from condaspawner_bench.dockerd import ensure_daemon
from jupyterhub_condaspawner.buildmodel import LABEL_KEY, ImageInfo
from jupyterhub_condaspawner.failures import StartFailure
from jupyterhub_condaspawner.gpus import LABEL_GPUS, LABEL_SERVER, LABEL_USER, Allocation
from jupyterhub_condaspawner.isolation import IsolationMixin, escape_name, is_user_template
from jupyterhub_condaspawner.owners import LABEL_IDENTITY, user_identity
from jupyterhub_condaspawner.spawner import CondaSpawner

REPO = Path(__file__).resolve().parents[1]
# (user, server) pairs that a naive template mixes up: erin's "one", erino's "ne" and erinone's
# default server all concatenate to "erinone"; case, accents, dashes and the "--" separator;
# control characters that DockerSpawner's own escaping writes with one hex digit.
COLLIDING = [
    ("\x010", ""), ("\x10", ""), ("jos\x0c3\n9", ""), ("josé", ""), ("\x0c3\x0ba", ""), ("ú", ""),
    ("erin", "one"), ("erino", "ne"), ("erinone", ""), ("erin", ""), ("Erin", ""), ("ERIN", "one"),
    ("érin", ""), ("e\u0301rin", ""), ("erin-one", ""), ("erin.one", ""), ("erin_one", ""),
    ("a--b", ""), ("a", "b"), ("a-b", ""), ("a", "b-c"), ("a-2db", ""), ("-a", ""), ("a", "a"),
    ("user@example.org", ""), ("用户", ""), ("a-2d-2db", ""),
]


@pytest.fixture(scope="module")
def db():
    return orm.new_session_factory("sqlite:///:memory:")()


def make_spawner(db, config: Config, user_name: str, server: str = "",
                 spawner_class: type[CondaSpawner] = CondaSpawner) -> CondaSpawner:
    """A CondaSpawner of a real JupyterHub user, as the hub creates it."""
    orm_user = orm.User.find(db, user_name) or orm.User(name=user_name)
    db.add(orm_user)
    db.commit()
    user = User(orm_user, settings={"spawner_class": spawner_class, "config": config, "db": db, "hub": Hub(),
                                    "allow_named_servers": True})
    return user.get_or_create_spawner(server, server)


def load_config(path: Path, tmp_path: Path) -> Config:
    """A shipped config file as JupyterHub loads it (the demo's reads its bench from the environment)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CONDASPAWNER_BENCH_DIR", str(tmp_path / "bench"))
        env.setenv("CONDASPAWNER_PROXY_COMMAND", "configurable-http-proxy")
        env.setenv("CONDASPAWNER_DEMO_STATE", str(tmp_path / "state"))
        for name in ("CONDASPAWNER_DEMO_VOLUME_PREFIX", "CONDASPAWNER_DEMO_EXTRA_CONFIG"):
            env.delenv(name, raising=False)
        return PyFileConfigLoader(path.name, str(path.parent)).load_config()


@pytest.fixture(params=["jupyterhub_config.example.py", "demo/jupyterhub_config.py"], scope="module")
def shipped_config(request, tmp_path_factory) -> Config:
    return load_config(REPO / request.param, tmp_path_factory.mktemp("config"))


def static_gpus(config: Config, tag: str, count: int = 2) -> list[str]:
    """Give the hub of ``config`` ``count`` GPUs (static: no NVML on the bench) of UUIDs no other test uses."""
    gpus = [f"GPU-{tag}-{uuid.uuid4().hex[:8]}-{index}" for index in range(count)]
    config.GpuInventory.static_gpus = [{"uuid": gpu} for gpu in gpus]
    return gpus


def home_volume(spawner: CondaSpawner) -> str:
    (name,) = spawner.user_volume_names()
    return name


def test_the_shipped_configs_give_each_user_one_home_no_one_else_gets(db, shipped_config):
    homes = {(user, server): home_volume(make_spawner(db, shipped_config, user, server))
             for user, server in COLLIDING}
    for (user1, server1), (user2, server2) in itertools.combinations(homes, 2):
        same = homes[(user1, server1)] == homes[(user2, server2)]
        assert same == (user1 == user2), (user1, server1, user2, server2, homes[(user1, server1)])
    assert homes[("erin", "one")] == homes[("erin", "")]  # one home, shared by all of erin's servers


def test_container_names_never_collide(db, shipped_config):
    names = [make_spawner(db, shipped_config, user, server).object_name for user, server in COLLIDING]
    assert len(set(names)) == len(names), sorted(names)


def test_the_old_template_is_the_collision_the_issue_reports(db):
    config = Config()
    config.DockerSpawner.volumes = {"jupyterhub-user-{username}{servername}": "/home/jovyan"}
    names = {home_volume(make_spawner(db, config, user, server)) for user, server in
             [("erin", "one"), ("erino", "ne"), ("erinone", "")]}
    assert names == {"jupyterhub-user-erinone"}  # why CondaSpawner also checks who owns a volume


def test_dockerspawners_own_escaping_collides_and_condaspawners_does_not(db):
    # escapism 1.1 writes bytes below 0x10 with one hex digit: "\x01" "0" and "\x10" are both "-10".
    for attacker, victim in (("\x010", "\x10"), ("jos\x0c3\n9", "josé"), ("\x0c3\x0ba", "ú")):
        assert DockerSpawner._escape(attacker) == DockerSpawner._escape(victim)
        assert escape_name(attacker) != escape_name(victim)
        assert make_spawner(db, Config(), attacker).escaped_name != make_spawner(db, Config(), victim).escaped_name
    assert make_spawner(db, Config(), "josé").escaped_name == "jos-c3-a9"


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_escaped_names_are_reversible_so_distinct_users_stay_distinct(name):
    escaped = escape_name(name)
    assert set(escaped) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert unescape(escaped, escape_char="-") == name
    assert "--" not in escaped  # so "{username}--{servername}" splits in one place only
    if all(ord(c) >= 0x10 for c in name):  # existing deployments keep their names
        assert escaped == DockerSpawner._escape(name)


@pytest.mark.parametrize("template, per_user", [
    ("jupyterhub-home-{username}", True), ("home-{raw_username}", True), ("h-{safe_username}", True),
    ("{username!s:>3}-x", True), ("datasets", False), ("scratch-{servername}", False), ("{broken", False),
])
def test_which_volume_templates_are_per_user(template, per_user):
    assert is_user_template(template) is per_user


def test_shared_volumes_and_host_paths_are_not_labelled(db):
    config = Config()
    config.DockerSpawner.volumes = {"jupyterhub-home-{username}": "/home/jovyan", "datasets": "/data",
                                    "/srv/scratch/{username}": "/scratch"}
    config.DockerSpawner.read_only_volumes = {"course-{username}": "/course"}
    assert make_spawner(db, config, "erin").user_volume_names() == ["course-erin", "jupyterhub-home-erin"]


def test_hardening_defaults_and_the_swap_cap(db):
    spawner = make_spawner(db, Config(), "erin")
    spawner.mem_limit = "2G"
    assert spawner.hardening_host_config({}) == {
        "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "pids_limit": 4096, "memswap_limit": 2 * 2**30}
    assert spawner.hardening_host_config({"mem_limit": "1G"})["memswap_limit"] == "1G"  # the admin's limit wins
    config = Config()
    config.CondaSpawner.cap_drop = []
    config.CondaSpawner.security_opt = []
    config.CondaSpawner.pids_limit = None
    config.CondaSpawner.allow_swap = True
    relaxed = make_spawner(db, config, "erin")
    relaxed.mem_limit = "2G"
    assert relaxed.hardening_host_config({}) == {}


def test_every_isolation_setting_has_help_with_a_config_example():
    for name, trait in IsolationMixin.class_traits(config=True).items():
        assert f"c.CondaSpawner.{name} = " in trait.help, name


# -- real containers on the bench daemon -----------------------------------------------------


@pytest.fixture
def docker_config(docker_daemon, base_image, tmp_path) -> tuple[Config, str]:
    """A config whose homes and containers carry a unique test prefix; removed afterwards."""
    prefix = f"cs-iso-{uuid.uuid4().hex[:8]}"
    config = Config()
    config.ImageBuilder.cache_dir = str(tmp_path / "cache")  # the hub's ledger of volume owners
    config.DockerSpawner.prefix = prefix
    config.DockerSpawner.image = base_image
    config.DockerSpawner.network_name = "host"
    config.DockerSpawner.volumes = {prefix + "-home-{username}": "/home/jovyan"}
    yield config, prefix
    client = docker_daemon.client()
    for container in client.containers.list(ignore_removed=True, all=True, filters={"name": prefix}):
        container.remove(force=True)
    for volume in client.volumes.list(filters={"name": prefix}):
        volume.remove(force=True)


async def created_host_config(spawner: CondaSpawner) -> dict:
    created = await spawner.create_object()
    return spawner.client.inspect_container(created["Id"])["HostConfig"]


@pytest.mark.docker
async def test_the_admins_extra_host_config_wins_over_the_defaults_or_adds_to_them(db, docker_config):
    config, _ = docker_config
    config.DockerSpawner.mem_limit = "1G"
    config.DockerSpawner.extra_host_config = {"pids_limit": 512, "cap_add": ["NET_BIND_SERVICE"],
                                              "security_opt": ["label=disable"]}
    host = await created_host_config(make_spawner(db, config, "hana"))
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["NET_BIND_SERVICE"]
    assert host["SecurityOpt"] == ["no-new-privileges", "label=disable"]
    assert host["PidsLimit"] == 512
    assert host["Memory"] == host["MemorySwap"] == 2**30


@pytest.mark.docker
async def test_a_home_volume_another_user_owns_is_refused_and_nothing_is_created(db, docker_daemon, docker_config):
    config, prefix = docker_config
    client = docker_daemon.client()
    client.volumes.create(f"{prefix}-home-ivo", labels={LABEL_USER: "someone-else"})
    client.volumes.create(f"{prefix}-home-jan")  # made by hand, or by docker for an older hub
    for user, why in (("ivo", "belongs to another user"), ("jan", "has no owner label")):
        spawner = make_spawner(db, config, user)
        with pytest.raises(web.HTTPError) as refused:
            await spawner.create_object()
        assert refused.value.status_code == 500
        assert refused.value.log_message == refused.value.log_message.strip().splitlines()[0]
        assert f"volume {prefix}-home-{user} {why}" in refused.value.log_message
        assert "someone-else" not in refused.value.log_message
        assert not client.containers.list(all=True, filters={"name": f"{prefix}-{user}"})
    # The volume's owner is let in, and a first start labels a new home for its user.
    host = await created_host_config(make_spawner(db, config, "kai"))
    assert host["Binds"] == [f"{prefix}-home-kai:/home/jovyan:rw"]
    kai = orm.User.find(db, "kai")
    assert client.volumes.get(f"{prefix}-home-kai").attrs["Labels"] == {LABEL_USER: "kai",
                                                                       LABEL_IDENTITY: user_identity(kai)}
    await created_host_config(make_spawner(db, config, "kai", "second"))  # kai's other server: same home


class _OnItsOwnDaemon(CondaSpawner):
    _client = None  # DockerSpawner keeps one client per class: this class's talks to the test's own daemon


@pytest.mark.docker
async def test_a_home_stays_its_users_after_the_docker_daemon_restarts(db, tmp_path):
    """Docker 20.10, restarted (a host reboot, an upgrade), answers a create of an existing volume
    without its labels until the volume is read once: every returning user was refused their own home."""
    bench = tmp_path / "daemon"
    daemon = ensure_daemon(bench, use_external=False)  # its own, to restart: the suite shares the bench's
    try:
        config = Config()
        config.ImageBuilder.cache_dir = str(tmp_path / "cache")
        config.DockerSpawner.client_kwargs = {"base_url": daemon.docker_host}
        config.DockerSpawner.volumes = {"home-{username}": "/home/jovyan"}
        mira = make_spawner(db, config, "mira", spawner_class=_OnItsOwnDaemon)
        await mira.claim_user_volumes()  # her first start labels her home
        daemon.client().volumes.create("home-nils", labels={LABEL_USER: "someone-else"})
        daemon.stop()
        daemon = ensure_daemon(bench, use_external=False)
        await mira.claim_user_volumes()  # still hers
        assert daemon.client().volumes.get("home-mira").attrs["Labels"] == {
            LABEL_USER: "mira", LABEL_IDENTITY: user_identity(orm.User.find(db, "mira"))}
        with pytest.raises(web.HTTPError, match="volume home-nils belongs to another user"):
            await make_spawner(db, config, "nils", spawner_class=_OnItsOwnDaemon).claim_user_volumes()
    finally:
        daemon.stop()


@pytest.mark.docker
async def test_a_user_name_too_long_for_a_volume_name_is_one_line_and_nothing_is_created(db, docker_daemon,
                                                                                         docker_config):
    config, prefix = docker_config
    client = docker_daemon.client()
    for user in ("x" * 300, "\u00e9" * 50):  # an escaped "é" is 6 characters: "-c3-a9"
        spawner = make_spawner(db, config, user)
        with pytest.raises(web.HTTPError) as refused:
            await spawner.create_object()
        message = refused.value.log_message
        assert refused.value.status_code == 500 and "\n" not in message
        assert message.startswith(f"the name of your home volume ({prefix}-home-")
        assert "is longer than the 255 a volume name may have: tell the hub admin" in message
        assert str(docker_daemon.client().info()["DockerRootDir"]) not in message
    assert not client.volumes.list(filters={"name": f"{prefix}-home-"})
    assert not client.containers.list(all=True, filters={"name": prefix})


@pytest.mark.docker
async def test_two_users_racing_for_one_volume_name_cannot_both_win(db, docker_daemon, docker_config):
    config, prefix = docker_config
    config.DockerSpawner.volumes = {prefix + "-shared-{username}{servername}": "/home/jovyan"}  # the bad template
    spawners = [make_spawner(db, config, "erin", "one"), make_spawner(db, config, "erino", "ne")]
    results = await asyncio.gather(*(spawner.create_object() for spawner in spawners), return_exceptions=True)
    refused = [r for r in results if isinstance(r, web.HTTPError)]
    assert len(refused) == 1 and "belongs to another user" in refused[0].log_message, results


def recreate_user(db, name: str) -> None:
    """Delete the hub user ``name`` and create one of that name again (a new identity)."""
    db.delete(orm.User.find(db, name))
    db.commit()
    db.add(orm.User(name=name))
    db.commit()


async def refusal_of(spawner: CondaSpawner) -> str:
    with pytest.raises(web.HTTPError) as refused:
        await spawner.create_object()
    message = refused.value.log_message
    assert refused.value.status_code == 500 and "\n" not in message
    return message


@pytest.mark.docker
async def test_a_home_volume_labelled_for_another_user_id_is_refused_with_one_line(db, docker_daemon, docker_config):
    config, prefix = docker_config
    client = docker_daemon.client()
    owner = make_spawner(db, config, "olga")
    identity = user_identity(owner.user)
    other_identity = "999@2001-01-01T00:00:00"
    client.volumes.create(f"{prefix}-home-olga", labels={LABEL_USER: "olga", LABEL_IDENTITY: other_identity})
    message = await refusal_of(owner)
    assert message == (f"volume {prefix}-home-olga belongs to an earlier user of your name (deleted or renamed): an "
                       "admin must check whose it is and hand it over or remove it as the README's Isolation section says")
    # The prefix is random hex, so it may itself hold "999": look for the whole label values.
    assert other_identity not in message and "2001-01-01" not in message and identity not in message
    assert not client.containers.list(all=True, filters={"name": f"{prefix}-olga"})


@pytest.mark.docker
async def test_a_user_deleted_and_created_again_does_not_get_the_old_home(db, docker_daemon, docker_config):
    config, prefix = docker_config
    client = docker_daemon.client()
    old = make_spawner(db, config, "dora")
    await old.create_object()
    old.services.usage.record("dora", "k1", profile="p", own=True, name="secret", spec="x",
                              identity=user_identity(old.user))
    old.services.notices.post("dora", "", "for the old dora")
    await old.delete_forever()  # as the hub deletes a user
    assert client.volumes.get(f"{prefix}-home-dora").name  # the data is kept
    recreate_user(db, "dora")
    new = make_spawner(db, config, "dora")
    assert "belongs to an earlier user of your name" in await refusal_of(new)
    assert new.services.usage.uses("dora") == [] and new.services.notices.take("dora", "") is None


async def test_a_user_is_not_deleted_while_a_setting_of_the_hubs_config_is_wrong(db, tmp_path):
    """Without the hub's services the orphaning of their homes could not be recorded (the next user
    given the name would get them): the admin's delete is refused in one line naming the setting."""
    config = Config()
    config.GpuAllocator.queue_timeout = "ten minutes"
    config.ImageBuilder.cache_dir = str(tmp_path / "cache")
    for server in ("", "named"):
        with pytest.raises(web.HTTPError) as refused:
            await make_spawner(db, config, "dana", server).delete_forever()
        assert refused.value.status_code == 409
        assert refused.value.log_message.startswith(("dana is not deleted: ", "dana:named is not deleted: "))
        assert "queue_timeout" in refused.value.log_message and refused.value.log_message.endswith(
            "Fix it in the hub's config, restart the hub, and delete again")


@pytest.mark.docker
async def test_a_home_of_an_older_hub_is_adopted_by_its_user_and_no_later_one(db, docker_daemon, docker_config):
    config, prefix = docker_config
    client = docker_daemon.client()
    client.volumes.create(f"{prefix}-home-lena", labels={LABEL_USER: "lena"})  # an older hub's: name only
    await make_spawner(db, config, "lena").create_object()  # lena's own home: adopted
    await make_spawner(db, config, "lena", "two").create_object()  # and still hers
    recreate_user(db, "lena")  # renamed or deleted without the hub hearing of it, and the name reused
    assert "belongs to an earlier user of your name" in await refusal_of(make_spawner(db, config, "lena"))
    # Deleted before ever starting again after the upgrade: orphaned, not adopted by the next one.
    client.volumes.create(f"{prefix}-home-mia", labels={LABEL_USER: "mia"})
    await make_spawner(db, config, "mia").delete_forever()
    recreate_user(db, "mia")
    assert "belongs to an earlier user of your name" in await refusal_of(make_spawner(db, config, "mia"))


@pytest.mark.docker
async def test_a_running_container_of_an_earlier_user_of_the_name_is_refused_not_stopped(db, docker_daemon,
                                                                                        docker_config, base_image):
    config, prefix = docker_config
    client = docker_daemon.client()
    spawner = make_spawner(db, config, "ren")  # a new "ren"; the old one was renamed while its server ran
    running = client.containers.run(base_image, ["sleep", "600"], name=f"{prefix}-ren", detach=True,
                                    labels={LABEL_USER: "ren", LABEL_IDENTITY: "7@2020-01-01T00:00:00"})
    with pytest.raises(StartFailure) as refused:
        await spawner._refuse_if_another_user_runs_here()
    message = refused.value.message
    assert message.startswith(f"container {prefix}-ren still runs another user's server") and "\n" not in message
    assert "7@" not in message
    running.reload()
    assert running.status == "running"


# -- a kept container is restarted only with the GPUs it was made with ------------------------------


@pytest.mark.docker
async def test_a_kept_container_made_with_other_gpus_is_replaced_whatever_replace_changed_containers_says(
        db, docker_daemon, docker_config, base_image):
    config, prefix = docker_config
    gpus = static_gpus(config, "kept")
    config.CondaSpawner.replace_changed_containers = False  # image changes only: GPUs are never kept
    client = docker_daemon.client()
    info = ImageInfo("k" * 64, base_image, client.images.get(base_image).id, "custom", cached=True)
    spawner = make_spawner(db, config, "pia")
    spawner.image = base_image
    allocator = spawner.services.allocator

    async def start_until_docker_start(allocation: Allocation | None) -> bool:
        """pia's start up to DockerSpawner's: whether the kept container is still there for it."""
        spawner._prepare_container(info, allocation)
        await spawner._replace_if_changed(info)
        return bool(client.containers.list(all=True, filters={"name": f"{prefix}-pia"}))

    spawner._prepare_container(info, allocator.allocate("pia", "", 1))
    await spawner.create_object()  # pia's GPU server, made with GPU 0 ...
    allocator.release("pia", "")  # ... stopped and kept: GPU 0 is free
    assert allocator.allocate("quinn", "", 1).uuids == (gpus[0],)  # and quinn's now

    assert not await start_until_docker_start(None)  # a start without GPUs, same image: not restarted on GPU 0
    await spawner.create_object()  # that start's container, kept when it stops
    assert await start_until_docker_start(None)  # the same (no) GPUs and image: restarted as it is
    assert not await start_until_docker_start(allocator.allocate("pia", "", 1))  # GPU 1: replaced


@pytest.mark.docker
async def test_a_kept_container_of_a_since_renamed_profile_is_replaced_so_its_kernel_shows_the_new_name(
        db, docker_daemon, docker_config, base_image):
    # The kernel's name is in the container's environment, not the image: the same image, renamed
    config, prefix = docker_config
    client = docker_daemon.client()
    info = ImageInfo("r" * 64, base_image, client.images.get(base_image).id, "course", cached=True)
    spawner = make_spawner(db, config, "rhea")
    spawner.image, spawner.network_name = base_image, "none"  # under host networking every start replaces it

    async def kept_for_a_start_named(name: str) -> bool:
        spawner._kernel_display_name = name
        spawner._prepare_container(info, None)
        await spawner._replace_if_changed(info)
        return bool(client.containers.list(all=True, filters={"name": f"{prefix}-rhea"}))

    spawner._kernel_display_name = "Homework 1"
    spawner._prepare_container(info, None)
    await spawner.create_object()  # rhea's server, stopped and kept
    assert await kept_for_a_start_named("Homework 1")  # the same name: restarted as it is
    assert not await kept_for_a_start_named("Homework 1 (2026)")  # renamed since: replaced


@pytest.mark.docker
async def test_a_running_leftover_is_gone_before_the_start_creates_its_container(
        db, docker_daemon, docker_config, base_image):
    # With DockerSpawner.remove, containers run with auto_remove: stopping the leftover started
    # the daemon's own removal, remove_object() returned on its 409, and the start's create
    # failed on "The container name ... is already in use" (a server the hub had forgotten).
    config, prefix = docker_config
    config.DockerSpawner.remove = True
    client = docker_daemon.client()
    client.containers.run(base_image, ["sleep", "600"], name=f"{prefix}-lefty", detach=True, auto_remove=True,
                          init=True)
    info = ImageInfo("l" * 64, base_image, client.images.get(base_image).id, "custom", cached=True)
    spawner = make_spawner(db, config, "lefty")
    spawner.image = base_image
    spawner._prepare_container(info, None)

    await spawner._replace_if_changed(info)

    assert not client.containers.list(all=True, filters={"name": f"{prefix}-lefty"})
    assert (await spawner.create_object())["Id"]


# -- a start the hub was stopped under before JupyterHub saved its state ----------------------------


def counted_inspections(spawner: CondaSpawner) -> list[str]:
    """The names of the containers ``spawner`` asks the daemon about from now on (the real asks)."""
    asked: list[str] = []
    inspect = spawner.get_object

    async def get_object():
        asked.append(spawner.object_name)
        return await inspect()

    spawner.get_object = get_object
    return asked


@pytest.mark.docker
async def test_gpus_of_a_start_the_hub_never_recorded_are_released_on_stop_and_a_renamed_users_are_not(
        db, docker_daemon, docker_config, base_image):
    config, prefix = docker_config
    gpus = static_gpus(config, "unsaved")
    config.CondaSpawner.gpu_idle_timeout = 30
    client = docker_daemon.client()
    rosa, tess = make_spawner(db, config, "rosa"), make_spawner(db, config, "tess")
    # SIGTERM after docker start, before JupyterHub's commit: rosa's container runs, her state is empty.
    # tess's name was an earlier user's, renamed while that server ran on the other GPU.
    key = uuid.uuid4().hex * 2
    for spawner, gpu, identity in ((rosa, gpus[0], user_identity(rosa.user)), (tess, gpus[1], "7@2020-01-01T00:00:00")):
        client.containers.run(base_image, ["sleep", "600"], name=f"{prefix}-{spawner.user.name}", detach=True,
                              stop_signal="SIGKILL", environment={"CONDASPAWNER_ENV": "/opt/conda/envs/python39"},
                              labels={LABEL_USER: spawner.user.name, LABEL_SERVER: "", LABEL_GPUS: gpu,
                                      LABEL_IDENTITY: identity, LABEL_KEY: key})
    services = rosa.services  # the restarted hub's: the GPU table is rebuilt from the labels
    assert services.allocator.allocation("rosa", "").uuids == (gpus[0],)

    inspections = counted_inspections(tess)
    for spawner in (rosa, tess):
        spawner.load_state({})  # nothing saved
        assert await spawner.poll() is None  # JupyterHub checks the servers it has a record of
    assert services.culler.watched() == {("rosa", ""): 30 * 60.0}  # tess's GPU is not hers: not watched
    # What rosa's server runs, as its container says: for her state, the environments page, a next restart.
    saved = rosa.get_state()["condaspawner"]
    assert (saved["key"], saved["image"], saved["image_id"], saved["env_name"], saved["gpus"]) == (
        key, base_image, client.images.get(base_image).id, "python39", [gpus[0]])
    assert rosa.image == base_image  # as a restart's load_state of a saved start would set it
    assert "condaspawner" not in tess.get_state()

    # A server without GPUs is adopted too: what it runs, nothing to release or watch.
    una = make_spawner(db, config, "una")
    client.containers.run(base_image, ["sleep", "600"], name=f"{prefix}-una", detach=True, stop_signal="SIGKILL",
                          environment={"CONDASPAWNER_ENV": "/opt/conda/envs/python39"},
                          labels={LABEL_USER: "una", LABEL_SERVER: "", LABEL_IDENTITY: user_identity(una.user),
                                  LABEL_KEY: key})
    una.load_state({})
    assert await una.poll() is None
    assert {k: v for k, v in una.get_state()["condaspawner"].items() if k in ("key", "env_name", "gpus")} == {
        "key": key, "env_name": "python39", "gpus": []}
    assert ("una", "") not in services.culler.watched()
    await una.stop()
    assert len(inspections) == 2  # for the adoption, then for DockerSpawner's poll
    for _ in range(3):
        assert await tess.poll() is None  # JupyterHub polls its servers every few seconds
    assert len(inspections) == 2 + 3  # DockerSpawner's poll only: that container's labels were read once
    await rosa.stop()  # JupyterHub's stop of the start it never saw end (or rosa's)
    assert services.allocator.allocation("rosa", "") is None
    tess._release_gpus()  # what tess's stop releases: nothing of the other server's
    assert services.allocator.allocation("tess", "").uuids == (gpus[1],)
