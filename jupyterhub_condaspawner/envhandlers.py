"""The environments page's handlers (HTML pages and JSON API): see envpage.py for what and why."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyterhub import scopes
from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.handlers.base import BaseHandler
from jupyterhub.utils import url_escape_path, url_path_join
from tornado import web
from tornado.iostream import StreamClosedError

from . import environments
from .builder import ImageBuilder
from .builderrors import BuildError, unanswered
from .buildlog import CHUNK_BYTES, LogLines, LogReader
from .buildmodel import (
    CUSTOM_ENV_NAME,
    CUSTOM_KERNEL_NAME,
    LABEL_KEY,
    Build,
    BuildRequest,
    request_for_profile,
)
from .envpage import ADMIN_SCOPE, EnvironmentsPage
from .failures import StartFailure
from .hubservices import HubServices
from .owners import user_identity
from .profiles import Profile, ProfileError
from .spawner import CondaSpawner
from .spec import EnvironmentSpec, SpecError
from .swarmspawner import CondaSwarmSpawner
from .usage import Use

# The page's result of an action, for its next view: a signed cookie read once.
_NOTICE_COOKIE = "condaspawner-notice"
_NOTICE_MAX_AGE_DAYS = 1 / 24
_NOTICE_CHARS = 1000

LOG_POLL_S = 0.5  # how often a live log looks for news
# A user's live logs at once: each reads the log in a thread (the hub's small pool) every
# LOG_POLL_S while its build runs, so hundreds of open tabs would slow every user's hub.
MAX_LOG_STREAMS_PER_USER = 8
# The live builds table is sent again at each build's event, start and end, and read again at
# least this often (other hub processes' builds, a killed build become interrupted).
BUILDS_REREAD_S = 5.0
STREAM_S = 3600.0  # a live table's stream ends after this; the browser's EventSource reconnects
HEARTBEAT_S = 15.0  # a comment line this often: a closed connection shows on the next write
# A request body is read (json.loads) only up to this many times SpecPolicy.max_file_bytes:
# an environment.yml in JSON, with room for its escapes.
BODY_FILE_FACTOR = 4


def spawn_pending_url(base_url: str, user: Any, server_name: str) -> str:
    """The progress page of ``user``'s start of ``server_name``, as the hub's own pages link it."""
    return url_path_join(base_url, "spawn-pending", user.escaped_name, url_escape_path(server_name))


def _already_active(server_name: str) -> PageFailure:
    which = f"your server {server_name!r}" if server_name else "your server"
    return PageFailure(409, f"{which} is already running or starting: stop it on the Home page first")


def _refuse_unless_allowed(spawner: Any, slug: str) -> None:
    """PageFailure 403 when the user may no longer use profile ``slug`` (taken out of the course's
    group): told so first, not that the profile changed (which would also show them its new name);
    409 when the hub no longer has the profile (a start would name another as "did you mean")."""
    try:
        spawner.allowed_profile(slug)
    except StartFailure as refusal:
        if refusal.status_code == 403:
            raise PageFailure(403, f"cannot start: {refusal.message}") from None
        if refusal.reason == "options":  # an unknown profile: removed since
            raise PageFailure(409, f"cannot start: profile {slug!r}, which built this environment, is no longer on "
                                   "this hub: choose a profile on the Home page") from None


class PageFailure(web.HTTPError):
    """A refused request or a failed action: ``status`` and one line for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message.replace("%", "%%"))
        self.status = status
        self.message = message


# -- what every handler shares ----------------------------------------------------------------


class _Environments:
    """Mixed into the hub's handlers: the services, the permission checks, the views' data."""

    current_user: Any
    expanded_scopes: set[str]
    users: Any
    log: Any

    @property
    def user_name(self) -> str:
        """The user the request acts for, if its token may: read their servers to look, start
        them to act (POST, DELETE). A token made for less (a server's, a narrow one) may not."""
        user = self.current_user
        if user is None or getattr(user, "kind", "user") != "user":
            raise PageFailure(403, "the environments page is for users: log in, or use a user's API token")
        acting = self.request.method not in ("GET", "HEAD")  # type: ignore[attr-defined]
        needed = f"{'servers' if acting else 'read:servers'}!user={user.name}"
        if not self.has_scope(needed):  # type: ignore[attr-defined]
            raise PageFailure(403, f"this token cannot {'start or change' if acting else 'see'} your environments: "
                                   f"it needs the {needed.split('!')[0]} scope")
        return str(user.name)

    @property
    def is_admin(self) -> bool:
        if ADMIN_SCOPE in self.expanded_scopes or "admin-ui" in self.expanded_scopes:
            return True
        page = EnvironmentsPage(config=self.settings.get("config"))  # type: ignore[attr-defined]
        user = self.current_user
        # EnvironmentsPage names people, not tokens: only with all of the user's own authority
        # (their login, or a token that inherits it), never a token made for less.
        return page.names_admin(str(user.name), [group.name for group in user.groups]) and \
            scopes.get_scopes_for(user) <= self.expanded_scopes

    def require_admin(self) -> None:
        self.user_name  # noqa: B018 (a user, first)
        if not self.is_admin:
            raise PageFailure(403, f"this needs the {ADMIN_SCOPE} scope (hub admins have it)")

    @property
    def condaspawner(self) -> HubServices:  # not `services`: BaseHandler has that name
        self.user_name  # noqa: B018 (a user, first: a service's token has no spawner)
        spawner = self.current_user.spawner
        if not isinstance(spawner, CondaSpawner):
            raise PageFailure(500, "the environments page needs CondaSpawner (or a subclass) as "
                                   "JupyterHub.spawner_class")
        return spawner.services

    def use_of(self, key: str) -> Use:
        """The current user's use of ``key``; for admins anyone's, or the build's own record."""
        if not environments.is_key(key):  # an admin's ?key= or rebuild argument reaches a path
            raise PageFailure(404, "key: must be an image's full key (64 hex digits)")
        services = self.condaspawner
        for use in services.usage.uses(self.user_name, user_identity(self.current_user)):
            if use.key == key:
                return use
        if self.is_admin:
            for use in services.usage.all_uses():
                if use.key == key:
                    return use
            record = services.builder.build_record(key)
            if record is not None:
                own = record.env_name == CUSTOM_ENV_NAME
                return Use("", key, "" if own else record.env_name, own, record.name, "", 0.0, 0.0)
            raise PageFailure(404, "no environment with this key on this hub")
        raise PageFailure(404, "no such environment of yours")

    def running_servers(self) -> dict[str, list[str]]:
        """Key -> the servers running it now ("user" or "user/server")."""
        running: dict[str, list[str]] = {}
        for user in self.users.values():
            for name, spawner in user.spawners.items():
                info = getattr(spawner, "_image_info", None)
                if info is not None and (spawner.active or spawner.ready):
                    running.setdefault(info.key, []).append(f"{user.name}/{name}" if name else user.name)
        return running

    async def user_view(self) -> dict[str, Any]:
        services, user = self.condaspawner, self.user_name
        uses = services.usage.uses(user, user_identity(self.current_user))
        rows = await asyncio.to_thread(lambda: [environments.environment_summary(services.builder, use)
                                                for use in uses])
        return {"user": user, "admin": self.is_admin, "environments": rows}

    async def detail_view(self, key: str) -> dict[str, Any]:
        use, services = self.use_of(key), self.condaspawner
        return await asyncio.to_thread(environments.environment_detail, services.builder, services.usage, use)

    async def admin_view(self, part: str) -> dict[str, Any]:
        self.require_admin()
        services = self.condaspawner
        if part == "images":
            running = self.running_servers()
            try:
                return await asyncio.to_thread(environments.admin_images, services.builder, services.usage, running)
            except Exception as error:  # the daemon: one line, the rest of the page still shows
                raise PageFailure(503, f"cannot list images: {_daemon_line(services.builder, error)}") from None
        if part == "builds":
            failed = await asyncio.to_thread(environments.recent_failures, services.builder)
            return environments.admin_builds(services.builder, failed)
        spawner = self.current_user.spawner
        if isinstance(spawner, CondaSwarmSpawner):
            return await self._swarm_gpus(spawner, services)
        # NVML may rescan (and be slow): off the event loop; the queue, which the loop changes, read on it.
        waiting = services.queue.waiting()
        return await asyncio.to_thread(environments.gpu_map, services.allocator, waiting, services.culler)

    async def _swarm_gpus(self, spawner: CondaSwarmSpawner, services: HubServices) -> dict[str, Any]:
        try:
            state = await asyncio.to_thread(spawner.read_swarm)
        except Exception as error:  # the manager: one line
            raise PageFailure(503, f"cannot read the swarm's GPUs from its manager: {_one_line(error)}") from None
        nodes = [node for node in state.nodes if node.gpus and node.ready]
        readings = await asyncio.to_thread(spawner.utilization_source().read, nodes)  # a node that fails: no reading
        return environments.swarm_gpu_map(state, readings, services.allocator.idle_utilization, services.culler,
                                          waiting=services.queue.waiting())

    async def start(self, key: str, server_name: str = "") -> str:
        """Start the user's server ``server_name`` ("": their default one) with ``key``'s environment;
        the spawn-pending URL. A new named server's name is checked as the hub checks it."""
        use = self.use_of(key)
        if not use.profile:
            raise PageFailure(404, "no such environment of yours")
        user = self.current_user
        # No name: the user's default server, JupyterHub.default_server_name when the hub has one.
        server_name = server_name or self.settings.get("default_server_name") or ""  # type: ignore[attr-defined]
        if server_name:
            await self._check_server_name(user, server_name)
        spawner = user.get_or_create_spawner(server_name, server_name)
        if spawner.active:
            raise _already_active(server_name)
        if not use.own:
            _refuse_unless_allowed(spawner, use.profile)
            await self._refuse_a_changed_profile(use)
        options = {"profile": use.profile, **({"environment": use.spec} if use.own else {})}
        try:
            await self.spawn_single_user(user, server_name, options=options)  # type: ignore[attr-defined]
        except web.HTTPError as error:
            raise PageFailure(error.status_code, f"cannot start: {error.log_message or error.reason}") from None
        except RuntimeError:  # the hub's "pending": another start of this server began while this one waited
            if not spawner.active:
                raise
            raise _already_active(server_name) from None
        return spawn_pending_url(self.hub.base_url, user, server_name)  # type: ignore[attr-defined]

    async def _refuse_a_changed_profile(self, use: Use) -> None:
        """PageFailure 409 when ``use``'s profile now builds another image (its environment.yml
        edited, say): a start takes the profile's current environment, not the one the user chose
        on this page. A profile the hub no longer has is left to the start's own refusal, and a
        daemon that does not answer (the base image's id) to the start."""
        services = self.condaspawner
        try:
            profile = services.catalog.get(use.profile)
            current = await asyncio.to_thread(services.builder.build_key, request_for_profile(profile))
        except (KeyError, ValueError, ProfileError):
            return
        except Exception as error:  # the daemon: the start itself then says what failed
            self.log.warning("Cannot tell the current image of profile %r: %s", use.profile, _one_line(error))
            return
        if current != use.key:
            raise PageFailure(409, f"{profile.display_name} has changed since this environment was built (its "
                                   "environment.yml or display name, or the hub's base image): a start now gets its "
                                   "current environment, not this one; start it from the Home page")

    async def _check_server_name(self, user: Any, server_name: str) -> None:
        if not self.settings.get("allow_named_servers"):  # type: ignore[attr-defined]
            raise PageFailure(400, "server: this hub has no named servers (JupyterHub.allow_named_servers): "
                                   "leave the name empty")
        try:  # the hub's own check: the name's form, and the named_server_limit_per_user
            await self._check_named_server_request(user, server_name, server_name)  # type: ignore[attr-defined]
        except web.HTTPError as error:
            reason = " ".join(str(error.log_message or error.reason).split())
            if reason.startswith("Invalid server_name"):
                reason = (f"{server_name[:40]!r} is not a name the hub accepts: lowercase letters, digits and "
                          "single hyphens, starting with a letter, at most 30 characters")
            raise PageFailure(400, f"server: {reason}") from None

    async def admin_action(self, action: str, argument: str, dry_run: bool = True) -> dict[str, Any]:
        self.require_admin()
        services = self.condaspawner
        builder = services.builder
        if action == "prebuild":
            try:
                profile = services.catalog.get(argument)
                request = request_for_profile(profile)
            except (KeyError, ValueError, ProfileError, SpecError):
                raise PageFailure(400, f"profile: no profile {argument[:64]!r} with an environment of its own") from None
            build = await self._ensure(request)
            return {"key": build.key, "message": f"building {request.display_name} ({build.key[:16]})"}
        if action == "rebuild":
            return await self._rebuild(argument)
        if action == "delete":
            return await self._delete(argument)
        profiles = list(services.catalog.profiles)

        def gc() -> Any:
            try:
                keep = builder.profile_images(profiles)
            except BuildError:  # no base image: no image is a profile's current one
                keep = {}
            return builder.gc(dry_run, keep=keep)

        try:
            result = await asyncio.to_thread(gc)
        except Exception as error:
            raise PageFailure(503, f"gc failed: {_daemon_line(builder, error)}") from None
        removed = [builder.tag_for(image.labels[LABEL_KEY]) for image in result.removed]
        verb = "would remove" if dry_run else "removed"
        return {"dry_run": dry_run, "removed": removed, "freed": result.freed_total, "total": result.total,
                "notes": result.notes, "message": f"gc {verb} {len(removed)} image(s), "
                                                  f"{result.freed_total / 1e6:.0f} MB"}

    async def _ensure(self, request: BuildRequest, rebuild: bool = False) -> Build:
        """Start (or join) a build in the background: its failure shows in the builds view and log."""
        builder = self.condaspawner.builder
        try:
            await asyncio.to_thread(builder.base_image_id)  # the key needs it: a missing base is one line now
            build = builder.ensure(request, rebuild=rebuild)
        except BuildError as error:
            raise PageFailure(503, f"cannot build: {error}") from None
        assert build.task is not None
        build.task.add_done_callback(_quiet)  # a failed build is recorded; nobody here awaits it
        return build

    async def _delete(self, key: str) -> dict[str, Any]:
        builder = self.condaspawner.builder
        if not environments.is_key(key):
            raise PageFailure(400, "key: must be an image's full key (64 hex digits)")
        servers = self.running_servers().get(key)
        if servers:  # the admin's page: whose, so that they know which to stop
            raise PageFailure(409, f"a server uses this image ({', '.join(sorted(servers)[:5])}"
                                   f"{', ...' if len(servers) > 5 else ''}): stop it first")
        if any(build.key == key for build in builder.in_progress()):  # a rebuild would tag it again
            raise PageFailure(409, f"{builder.tag_for(key)} is being built now: delete it once its build has ended "
                                   "(the builds table)")
        try:
            image = await asyncio.to_thread(builder.find_image, key)
            if image is None:
                raise PageFailure(404, "no image with this key on the Docker host")
            await asyncio.to_thread(_remove_image, builder, key, image.id)
        except PageFailure:
            raise
        except Exception as error:  # docker refused (a stopped container still uses it: 409) or is gone (503)
            gone = unanswered(error) or (isinstance(error, BuildError) and error.unreachable)
            raise PageFailure(503 if gone else 409,
                              f"cannot delete {builder.tag_for(key)}: {_daemon_line(builder, error)}") from None
        return {"key": key, "message": f"deleted {builder.tag_for(key)}"}

    async def _rebuild(self, key: str) -> dict[str, Any]:
        """Build the key's environment again from its spec (a fresh solve: newer packages): that
        very key, never the profile's current environment when the profile has changed since."""
        use = self.use_of(key)
        services = self.condaspawner
        try:
            profile = services.catalog.get(use.profile)
            request = await self._request_of(key, use, profile)
        except KeyError:  # str(KeyError) is the bare slug: say what is missing
            raise PageFailure(400, f"cannot rebuild: {_unrebuildable(use)}") from None
        except (ValueError, ProfileError, SpecError) as error:
            raise PageFailure(400, f"cannot rebuild: {str(error).splitlines()[0] if str(error) else 'no spec'}") from None
        # The old image serves new servers until the new one is tagged, and stays if this fails.
        build = await self._ensure(request, rebuild=True)
        return {"key": build.key, "message": f"rebuilding {request.display_name} ({build.key[:16]})"}

    async def _request_of(self, key: str, use: Use, profile: Profile) -> BuildRequest:
        """The request whose build key is ``key``: from what its build recorded, the usage record's
        spec, or the profile as it is now; PageFailure 409 when none is (the profile, or the
        hub's base image, changed since and the key's own spec is not recorded here)."""
        builder = self.condaspawner.builder
        for request in self._candidates(key, use, profile):
            try:
                candidate = await asyncio.to_thread(builder.build_key, request)
            except BuildError as error:
                raise PageFailure(503, f"cannot build: {error}") from None
            if candidate == key:
                return request
        raise PageFailure(409, f"cannot rebuild: {_older(builder.tag_for(key), use, profile)}")

    def _candidates(self, key: str, use: Use, profile: Profile) -> Iterator[BuildRequest]:
        """The requests that may have built ``key``, the likeliest first (each spec parsed only
        when the ones before it did not match)."""
        def request(spec: EnvironmentSpec, cuda: str | None) -> BuildRequest:
            if use.own:
                return BuildRequest(spec, cuda=cuda, env_name=CUSTOM_ENV_NAME, kernel_display_name=CUSTOM_KERNEL_NAME)
            return BuildRequest(spec, cuda=cuda, env_name=profile.slug, kernel_display_name=profile.display_name)

        policy = self.condaspawner.policy
        record = self.condaspawner.builder.build_record(key)
        recorded = environments.recorded_spec(record)
        if record is not None and recorded is not None:  # checked as a start checks it: the policy may be stricter now
            yield request(policy.parse(recorded.to_yaml(), source="environment.yml"), record.cuda or None)
        if use.spec:
            yield request(policy.parse(use.spec, source="environment.yml"), profile.cuda)
        if not use.own and profile.environment is not None:
            yield request_for_profile(profile)


def _older(tag: str, use: Use, profile: Profile) -> str:
    """Why ``use``'s image cannot be built again as it was: what changed, and what to do instead."""
    if use.own:
        return (f"{tag} is a user's own environment built for an earlier {profile.display_name} (its CUDA) or base "
                "image, and what it was built from is not recorded here: the user's next start of their file "
                "builds it for the profile as it is now")
    return (f"{tag} is an older environment of {profile.display_name} (its environment.yml or CUDA, or the hub's "
            "base image, changed since), and what it was built from is not recorded here: prebuild the profile, "
            "or start it, to build its current environment")


def _unrebuildable(use: Use) -> str:
    """Why ``use``, whose profile the hub does not have, cannot be built again."""
    if use.profile:
        return f"profile {use.profile!r}, which built it, is no longer on this hub"
    return "its environment.yml is not recorded on this hub (no user started it here)"


def _remove_image(builder: ImageBuilder, key: str, image_id: str) -> None:
    """Remove the key's image and the stopped containers of servers that ran it (a stopped
    server's next start replaces its container anyway: its image changed)."""
    with builder.records.unpinned(key) as free:  # as gc: a start that found this image keeps it
        if not free:
            raise PageFailure(409, "a server is starting on this image: try again when it has started, "
                                   "and stop it first")
        _remove_unpinned_image(builder, key, image_id)


def _remove_unpinned_image(builder: ImageBuilder, key: str, image_id: str) -> None:
    client = builder.client
    for container in client.containers.list(ignore_removed=True, all=True, filters={"label": f"{LABEL_KEY}={key}"}):
        if container.status == "running":
            raise PageFailure(409, f"a server uses this image: stop it first ({container.name} runs it)")
        container.remove()
    client.images.remove(image_id, noprune=False)


def _quiet(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit


def _one_line(error: BaseException) -> str:
    text = getattr(error, "explanation", None) or str(error) or type(error).__name__
    return str(text).splitlines()[0][:300]


def _daemon_line(builder: ImageBuilder, error: BaseException) -> str:
    if isinstance(error, BuildError):
        return str(error)
    return f"{_one_line(error)} (Docker at {builder.daemon_url})"


# -- JSON API -------------------------------------------------------------------------------


class _API(_Environments, APIHandler):
    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.current_user is None:
            raise web.HTTPError(403, "log in, or send a user's API token")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, PageFailure):
            self.set_status(error.status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"status": error.status, "message": error.message}))
            return
        super().write_error(status_code, **kwargs)

    def body(self) -> dict[str, Any]:
        self._refuse_large_body()
        try:
            data = json.loads(self.request.body or b"{}")
        except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
            raise PageFailure(400, "the request body must be JSON") from None
        if not isinstance(data, dict):
            raise PageFailure(400, "the request body must be a JSON object")
        return data

    def _refuse_large_body(self) -> None:
        self.user_name  # noqa: B018 (a user: their spawner has the policy)
        size, most = len(self.request.body or b""), self.condaspawner.policy.max_file_bytes
        if size > BODY_FILE_FACTOR * most:
            raise PageFailure(413, f"the request body is {size} bytes, more than this API reads "
                                   f"({BODY_FILE_FACTOR} x SpecPolicy.max_file_bytes): send an environment.yml "
                                   f"of at most {most} bytes")


class EnvironmentsAPI(_API):
    async def get(self) -> None:
        self.write(await self.user_view())


class EnvironmentAPI(_API):
    async def get(self, key: str) -> None:
        self.write(await self.detail_view(key))


class UnknownAPI(_API):
    """Any other path under the API: one line saying what the paths are, not a bare 404."""

    def _unknown(self, path: str) -> None:
        raise PageFailure(404, "no such environments API path: a key is the image's 64 lowercase hex digits "
                               "(GET /hub/api/environments lists yours)")

    get = post = delete = _unknown


class DownloadAPI(_API):
    async def get(self, key: str, what: str) -> None:
        use, builder = self.use_of(key), self.condaspawner.builder
        if what == "log":
            return await self._download_log(builder.key_dir(key) / "build.log", f"build-{key[:16]}.log")
        lock = environments.read_lock(builder, key)
        if lock is None:
            raise PageFailure(404, "this environment has no lock yet (its build has not solved)")
        elif what == "lock":
            self._download(json.dumps(lock, indent=2) + "\n", f"lock-{key[:16]}.json", "application/json")
        else:
            name = use.profile if not use.own else "my-environment"
            text = environments.envdiff.exact_environment_yml(lock, use.spec, name=name,
                                                              default_channels=builder.resolver.default_channels)
            self._download(text, "environment.yml", "application/x-yaml")

    def _download(self, text: str, filename: str, kind: str) -> None:
        self._download_headers(filename, kind)
        self.finish(text)

    def _download_headers(self, filename: str, kind: str) -> None:
        self.set_header("Content-Type", f"{kind}; charset=utf-8")
        self.set_header("Content-Disposition", f'attachment; filename="{filename}"')

    async def _download_log(self, path: Path, filename: str) -> None:
        """The log a chunk at a time, each read in a thread and sent before the next is read."""
        with LogReader(path) as log:
            chunk = await asyncio.to_thread(log.read)
            if chunk is None:
                raise PageFailure(404, "this environment has no build log here (built on another hub?)")
            self._download_headers(filename, "text/plain")
            try:
                while chunk:
                    self.write(chunk)
                    await self.flush()
                    chunk = await asyncio.to_thread(log.read)
            except StreamClosedError:
                return
        self.finish()


class LogStreamAPI(_API):
    """The build log as server-sent events: the lines so far, then each new one while the build
    runs; ``event: done`` when it ends (with the build's status)."""

    open_streams: Counter[str] = Counter()  # user -> live logs streaming to them now, in this hub

    async def get(self, key: str) -> None:
        self.use_of(key)
        user = self.user_name
        if self.open_streams[user] >= MAX_LOG_STREAMS_PER_USER:
            raise PageFailure(429, f"you have {MAX_LOG_STREAMS_PER_USER} build logs streaming already: close one "
                                   "(a tab or window showing a log) and try again")
        builder = self.condaspawner.builder
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.open_streams[user] += 1
        try:
            with LogReader(builder.key_dir(key) / "build.log") as log:
                await self._stream(key, log)
        except StreamClosedError:
            return
        finally:
            self.open_streams[user] -= 1
        self.finish()

    async def _stream(self, key: str, log: LogReader) -> None:
        builder = self.condaspawner.builder
        lines = LogLines()
        deadline = time.monotonic() + builder.build_timeout + 60
        while True:
            building = any(build.key == key for build in builder.in_progress())
            # At most a chunk per round, read in a thread: a log of any size costs the loop little.
            chunk = await asyncio.to_thread(log.follow)
            for line in lines.feed(chunk):
                self.write(f"data: {json.dumps(line)}\n\n")
            await self.flush()
            if not building and not chunk:
                for line in lines.rest():
                    self.write(f"data: {json.dumps(line)}\n\n")
                record = builder.build_record(key)
                self.write(f"event: done\ndata: {json.dumps(record.status if record else 'unknown')}\n\n")
                return
            if time.monotonic() > deadline:
                return
            if len(chunk) < CHUNK_BYTES:  # caught up: wait for the build to write more
                await asyncio.sleep(LOG_POLL_S)


class BuildsStreamAPI(_API):
    """The admin's builds view as server-sent events: the table now, then again whenever a build
    is asked for, moves on a step, or ends (each ``data:`` is what ``GET .../admin/builds`` says)."""

    closed = False

    def on_connection_close(self) -> None:
        self.closed = True

    async def get(self) -> None:
        self.require_admin()
        builder = self.condaspawner.builder
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        sent, wrote = "", time.monotonic()
        end = wrote + STREAM_S
        failures = _Failures(builder)
        try:
            while not self.closed and time.monotonic() < end:
                view = json.dumps(environments.admin_builds(builder, await failures.now()))
                if view != sent:
                    self.write(f"data: {view}\n\n")
                    sent, wrote = view, time.monotonic()
                elif time.monotonic() - wrote > HEARTBEAT_S:
                    self.write(": still here\n\n")
                    wrote = time.monotonic()
                await self.flush()
                await _next_event(builder, BUILDS_REREAD_S)
        except StreamClosedError:
            return
        self.finish()


class _Failures:
    """The recent failures for a live builds table: read again (in a thread) only once a build
    started or ended since, or BUILDS_REREAD_S after the last read."""

    def __init__(self, builder: ImageBuilder) -> None:
        self.builder = builder
        self.failed: list[dict[str, Any]] = []
        self.read_at = float("-inf")
        self.changes = -1

    async def now(self) -> list[dict[str, Any]]:
        changes = self.builder.runs.changes
        if changes != self.changes or time.monotonic() - self.read_at >= BUILDS_REREAD_S:
            self.changes, self.read_at = changes, time.monotonic()
            self.failed = await asyncio.to_thread(environments.recent_failures, self.builder)
        return self.failed


async def _next_event(builder: ImageBuilder, timeout: float) -> None:
    """Until a build in progress publishes its next event, a build starts or ends, or ``timeout``."""
    async def next_of(build: Build) -> None:
        seen = len(build.events)
        async with build.changed:
            await build.changed.wait_for(lambda: len(build.events) > seen or build.done)

    waits: list[asyncio.Future] = [asyncio.ensure_future(next_of(build)) for build in builder.in_progress()]
    waits.append(builder.runs.next_change())
    _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()


class StartAPI(_API):
    async def post(self, key: str) -> None:
        body = self.body() if self.request.body else {}
        unknown = sorted(str(field) for field in body if field != "server")
        if unknown:  # a misspelt "sever" would start the default server instead of the named one
            raise PageFailure(400, f"{unknown[0][:40]!r} is not an option of this start: it takes only 'server' "
                                   "(the server's name; none or \"\" for the default server)")
        server = body.get("server", "")
        if not isinstance(server, str):
            raise PageFailure(400, "server: must be a server's name (a string; \"\" for the default server)")
        url = await self.start(key, server)
        self.set_status(202)
        self.write({"message": "starting", "progress_url": url})


class CheckAPI(_API):
    """The spawn form's "Check" button: will this environment.yml be accepted on this profile,
    and will it solve? Every problem at once, the notes (ignored keys), nothing started."""

    async def post(self) -> None:
        body = self.body()
        unknown = sorted(str(field) for field in body if field not in ("profile", "environment"))
        if unknown:  # a misspelt "profil" would check on the default profile and answer for it
            raise PageFailure(400, f"{unknown[0][:40]!r} is not an option of a check: it takes only 'profile' "
                                   "and 'environment'")
        text, slug = body.get("environment"), body.get("profile")
        if text is not None and not isinstance(text, str):
            raise PageFailure(400, "environment: must be the text of an environment.yml")
        if not isinstance(text, str) or not text.strip():
            raise PageFailure(400, "environment: paste or upload an environment.yml first")
        if slug is not None and not isinstance(slug, str):
            raise PageFailure(400, "profile: must be a profile's slug")
        user = self.user_name  # a user whose token may start servers: the check solves on the hub
        spawner = self.current_user.spawner
        with one_check_at_a_time(self.condaspawner.checking, user):
            self.write(await self._answer(spawner, text, slug))

    async def _answer(self, spawner: CondaSpawner, text: str, slug: str | None) -> dict[str, Any]:
        try:
            spec = await spawner.parse_custom_off_loop(text)
        except SpecError as error:
            return {"ok": False, "problems": error.details, "count": error.count}
        result: dict[str, Any] = {"ok": True, "key": spec.key(), "notes": list(spec.notes), "solves": None}
        try:
            profile, custom = spawner.resolve_choice({"profile": slug or None, "environment": text})
            if custom is not None:
                result["solves"] = await spawner.presolve(profile, custom)
        except web.HTTPError as refusal:
            message = getattr(refusal, "jupyterhub_message", None) or refusal.log_message or str(refusal)
            return {"ok": False, "problems": [message], "count": 1}
        return result


@contextlib.contextmanager
def one_check_at_a_time(checking: set[str], user: str) -> Iterator[None]:
    """At most one Check of ``user``'s runs (each may solve): 429 for another meanwhile."""
    if user in checking:
        raise PageFailure(429, "your previous check is still running: wait for its answer, then check again")
    checking.add(user)
    try:
        yield
    finally:
        checking.discard(user)


class AdminViewAPI(_API):
    async def get(self, part: str) -> None:
        self.write(await self.admin_view(part))


class AdminImageAPI(_API):
    async def delete(self, key: str) -> None:
        self.write(await self.admin_action("delete", key))


class AdminActionAPI(_API):
    async def post(self, action: str) -> None:
        body = self.body()
        argument = body.get("profile" if action == "prebuild" else "key", "")
        if action != "gc" and not isinstance(argument, str):
            raise PageFailure(400, f"{'profile' if action == 'prebuild' else 'key'}: must be a string")
        dry_run = body.get("dry_run", True)
        if not isinstance(dry_run, bool):
            raise PageFailure(400, "dry_run: must be true or false")
        self.write(await self.admin_action(action, str(argument), dry_run))


# -- HTML pages ------------------------------------------------------------------------------


class _Page(_Environments, BaseHandler):
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, PageFailure):
            self.set_status(error.status)
            self.finish(self.render_template("environments_error.html", sync=True, message=error.message,
                                             status=error.status))
            return
        super().write_error(status_code, **kwargs)

    def notice(self) -> dict[str, str]:
        """The result of this user's last action on the page, shown once (a signed cookie: a link
        from elsewhere cannot put its own text in the hub's alert)."""
        raw = self.get_secure_cookie(_NOTICE_COOKIE, max_age_days=_NOTICE_MAX_AGE_DAYS)
        if not raw:
            return {"text": "", "kind": "info"}
        self.clear_cookie(_NOTICE_COOKIE, path=self.hub.base_url)
        with contextlib.suppress(ValueError, TypeError):
            data = json.loads(raw)
            return {"text": str(data["text"]), "kind": str(data["kind"])}
        return {"text": "", "kind": "info"}

    def back(self, path: str, message: str, kind: str = "info") -> None:
        notice = json.dumps({"text": message[:_NOTICE_CHARS], "kind": kind})
        self.set_secure_cookie(_NOTICE_COOKIE, notice, expires_days=None, path=self.hub.base_url, httponly=True)
        self.redirect(f"{self.hub.base_url}{path}")


class UserPage(_Page):
    @web.authenticated
    async def get(self) -> None:
        view = await self.user_view()
        selected = self.get_argument("key", "") or (view["environments"][0]["key"] if view["environments"] else "")
        detail = None
        if selected:
            try:
                detail = await self.detail_view(selected)
            except PageFailure as failure:
                view["failure"] = failure.message
        self.finish(await self.render_template("environments.html", view=view, detail=detail,
                                               notice=self.notice(), named_servers=self.allow_named_servers))


class AdminPage(_Page):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        parts: dict[str, Any] = {}
        failures: list[str] = []
        for part in ("images", "builds", "gpus"):
            try:
                parts[part] = await self.admin_view(part)
            except PageFailure as failure:
                parts[part], failures = {}, failures + [failure.message]
        profiles = [profile for profile in self.condaspawner.catalog.profiles if profile.environment is not None]
        self.finish(await self.render_template("environments_admin.html", parts=parts, failures=failures,
                                               profiles=profiles, notice=self.notice()))


class StartForm(_Page):
    @web.authenticated
    async def post(self, key: str) -> None:
        try:
            url = await self.start(key, self.get_body_argument("server", "").strip())
        except PageFailure as failure:
            return self.back("environments", failure.message, "danger")
        self.redirect(url)


class AdminForm(_Page):
    @web.authenticated
    async def post(self) -> None:
        action = self.get_body_argument("action", "")
        argument = self.get_body_argument("argument", "")
        if action not in ("prebuild", "rebuild", "delete", "gc"):
            return self.back("environments/admin", "action: unknown action", "danger")
        try:
            # A dry run unless the "Run GC" button (0) says otherwise, as the API's default.
            result = await self.admin_action(action, argument, dry_run=self.get_body_argument("dry_run", "1") != "0")
        except PageFailure as failure:
            if failure.status == 403:
                raise
            return self.back("environments/admin", failure.message, "danger")
        self.back("environments/admin", result["message"], "success")
