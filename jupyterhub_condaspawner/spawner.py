"""CondaSpawner: DockerSpawner glue over profiles, spec, builder and gpus.

The user's choice (form, link, REST) is spawnchoice.py's, the spawn form spawnform.py's,
a server's image spawnimage.py's, its GPUs spawngpus.py's, its container
spawncontainer.py's, what all spawners of a hub share hubservices.py's, names and
hardening isolation.py's.

A spawn: the user's choice (a profile, maybe with their own environment.yml) is
validated, and a GPU profile checked against the GPUs this host could ever give it
(nothing held) -> the builder returns the cached image or builds it -> only then the
allocator hands out GPUs -> DockerSpawner creates and starts the container with the
image, GPU devices and labels. Every phase is reported through ``progress()``; every
failure leaves ``start()`` as one line with a fitting HTTP status (failures.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any, AsyncIterator, Callable

from dockerspawner import DockerSpawner
from tornado import web
from traitlets import Bool, TraitError, default
from traitlets.config import Config

from .builderrors import one_line, unanswered
from .buildmodel import EventStream, ImageInfo, request_for_profile
from .failures import StartFailure, config_failure, explain, log_failure
from .gpus import Allocation
from .hubservices import HubConfigError, HubServices, hub_services
from .isolation import IsolationMixin
from .profiles import Profile, ProfileError
from .spawnchoice import SpawnChoiceMixin, apply_user_options_hook
from .spawncontainer import SpawnContainerMixin
from .spawnform import SpawnFormMixin
from .spawngpus import GpuBindingMixin
from .spawnimage import SpawnImageMixin
from .spec import EnvironmentSpec, SpecError
from .traittypes import FiniteFloat

# The spawner's limits a profile may override for one start.
_LIMITS = ("cpu_limit", "mem_limit")
CANCELLED_START = "Spawn cancelled: the server was stopped before it was ready"


def cancelled_start_is_not_ready(spawner: Any, ready_event: dict[str, Any]) -> dict[str, Any]:
    """CondaSpawner's default ``progress_ready_hook``. JupyterHub's stop of a pending start cancels it,
    then waits a second before stopping: a progress stream that ends in that second finds the
    server "ready" (its record is still there, nothing pending) and says "Server ready at ...",
    sending the page to a server that never started. A cancelled start says so instead."""
    if getattr(spawner, "_start_cancelled", False):
        return {"progress": 100, "failed": True, "message": CANCELLED_START}
    return ready_event


class CondaSpawner(SpawnChoiceMixin, SpawnFormMixin, SpawnImageMixin, GpuBindingMixin, SpawnContainerMixin, IsolationMixin,
                   DockerSpawner):
    """Spawn JupyterLab in a cached image built from a profile or a user's environment.yml."""

    replace_changed_containers = Bool(
        True,
        config=True,
        help="""Remove a kept (stopped) container when its image, its labels (the build
        key) or its kernel's name (the profile's display_name, renamed since) no longer
        match the user's choice, and always under host networking (each start picks its
        port), instead of restarting the stale one (DockerSpawner keeps it). False restarts
        it as it was: a renamed profile's kernel then keeps its old name. A kept container
        whose GPUs differ from the start's is always replaced, whatever this says: its
        devices cannot change in place, and its old GPUs may be another server's now.

        c.CondaSpawner.replace_changed_containers = False
        """,
    )

    gpu_idle_timeout = FiniteFloat(
        0.0,
        min=0.0,
        config=True,
        help="""Minutes a GPU server may keep its GPUs without using them (every GPU at or
        below GpuAllocator.idle_utilization percent, as sampled every
        GpuAllocator.gpu_sample_interval seconds) before the hub stops it and frees them.
        Browser activity does not count. A profile's own gpu_idle_timeout wins; 0 turns
        culling off. The user's next spawn page says why their server stopped.

        c.CondaSpawner.gpu_idle_timeout = 30
        """,
    )

    @default("start_timeout")
    def _default_start_timeout(self) -> int:
        # The first spawn of a new environment builds its image: minutes, not seconds.
        return 1800

    @default("http_timeout")
    def _default_http_timeout(self) -> int:
        return 120

    @default("use_internal_ip")
    def _default_use_internal_ip(self) -> bool:
        # With host networking there is nothing to publish: docker refuses port bindings.
        return self.network_name != "bridge"

    @default("options_form")
    def _default_options_form(self) -> Callable[..., Any]:
        return CondaSpawner.render_options_form

    @default("options_from_form")
    def _default_options_from_form(self) -> Callable[..., Any]:
        return self.options_from_form_data

    @default("progress_ready_hook")
    def _default_progress_ready_hook(self) -> Callable[..., Any]:
        return cancelled_start_is_not_ready

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Callable[..., Any]:
        return apply_user_options_hook

    _config_errors: tuple[str, ...] = ()  # this spawner's own settings that did not load (_load_config)

    def _load_config(self, cfg: Config, section_names: list[str] | None = None,
                     traits: dict[str, Any] | None = None) -> None:
        """A setting of this spawner's own with a wrong type (``gpu_idle_timeout = "30 minutes"``)
        would raise from JupyterHub's construction of every spawner: a bare 500 and a traceback
        on every page that touches one. Load the others one by one instead (a running server's
        name, network and volumes must stay right for poll and stop) and refuse starts with the
        hub's config error (:attr:`services`), the bad settings named in its log."""
        try:
            super()._load_config(cfg, section_names=section_names, traits=traits)
            return
        except TraitError:
            pass
        errors: list[str] = []
        sections = section_names if section_names is not None else self.section_names()
        for name, trait in (traits if traits is not None else self.traits(config=True)).items():
            # Only this setting (the others would be warned about as unknown here)
            one = Config({section: {name: cfg[section][name]} for section in sections
                          if section in cfg and name in cfg[section]})
            try:
                super()._load_config(one, section_names=section_names, traits={name: trait})
            except TraitError as error:
                errors.append(f"a setting in the hub's config: {one_line(error)}")
        self._config_errors = tuple(errors)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._choice: tuple[Profile, EnvironmentSpec | None] | None = None
        self._profile_slug = ""  # the profile of the start in progress (the usage record)
        self._last_form: dict[str, Any] | None = None
        self._parsed: tuple[str, EnvironmentSpec | SpecError] | None = None  # the last user file's parse
        self._feed = EventStream()
        self._allocation: Allocation | None = None
        self._gpu_key: tuple[str, str] | None = None  # (user name, server) at allocation (spawngpus.gpu_key)
        self._not_adoptable: tuple[str, tuple[str, str]] | None = None  # (container id, key): spawngpus
        self._image_info: ImageInfo | None = None
        self._extra_labels: dict[str, str] = {}
        self._extra_env: dict[str, str] = {}
        self._kernel_display_name = ""  # the kernel's name in JupyterLab, not in the image (buildcontext.py)
        self._device_requests: list = []
        self._restart_notice = False  # this process posted "the hub restarted while you ..."
        self._hub_stops_under_start = False  # stop() came from the hub shutting down, not from the user
        self._start_cancelled = False  # the last start was cancelled (a user's or an admin's stop)
        self._idle_watch: dict[str, Any] = {}  # the culler's timeout and profile name for this server
        self._image_pins = contextlib.ExitStack()  # the image this start uses, kept from gc until it ends
        # A start that has not (yet) created its container: nothing to poll or stop.
        self._before_container = False
        self._start_began = 0.0  # time.monotonic() when start() began: JupyterHub's start_timeout counts from then
        # A start that failed before its container: JupyterHub's clean-up of it is under way.
        self._failing = False
        # trait -> (its value before this spawner's last profile override, the profile's value)
        self._profile_limits: dict[str, tuple[Any, Any]] = {}
        # The options of the last start this spawner accepted: JupyterHub saves a REST body's options
        # before they are checked, and a start without a body (the admin panel's) reuses the saved ones.
        self._accepted_options = dict(self.orm_spawner.user_options or {}) if self.orm_spawner is not None else {}

    @property
    def services(self) -> HubServices:
        """The shared services, with the profiles reloaded if an admin edited them."""
        if self._config_errors:
            raise config_failure("; ".join(self._config_errors))
        try:
            services = hub_services(self)
            for problem in services.catalog.reload_if_changed():
                self.log.error("Profile problem (the hub serves the profiles that load; "
                               "`condaspawner profiles` lists them all): %s", problem)
            return services
        except ProfileError as error:
            raise StartFailure("This hub's profiles cannot be read: tell the hub admin (the hub's log names the "
                               "problems)", reason="profiles", status_code=500,
                               log_message="the admin's profiles have problems: " + "; ".join(error.problems)) from None
        except HubConfigError as error:
            raise config_failure(str(error)) from None

    @property
    def _group_names(self) -> list[str]:
        return [group.name for group in getattr(self.user, "groups", [])]

    @property
    def _normalize_username(self) -> Callable[[str], str] | None:
        """The hub's ``Authenticator.normalize_username`` (None without one): the names in a
        profile's ``allowed_users`` are read through it, as JupyterHub reads its own lists."""
        return getattr(self.authenticator, "normalize_username", None)

    # -- start / stop / poll -------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        self._start_began = time.monotonic()
        self._before_container = True
        self._hub_stops_under_start = False
        self._start_cancelled = False
        if self._feed.done:
            self._feed = EventStream()
        custom = None
        try:
            profile, custom = self._choice or self.resolve_choice(self.user_options)
            self._choice = None
            return await self._start(profile, custom)
        except asyncio.CancelledError:
            self._start_cancelled = True
            # A user's stop of a start with no container yet: the hub's poll() says "not
            # running" (0), so no stop() comes to free what the start was granted.
            if self._before_container:
                self._release_gpus()
            raise
        except Exception as error:
            # A container that exists (started, maybe: Docker's answer lost) may hold its GPUs:
            # JupyterHub stops a failed start, and that stop (or its poll) releases them.
            if self._before_container or not self.object_id:
                self._release_gpus()
            self._failing = self._before_container
            failure = explain(error, custom_spec=custom is not None)
            failure.server = self._log_name
            log_failure(self.log, self._log_name, failure, error)
            raise failure from None  # JupyterHub's progress stream ends with "Spawn failed: <message>"
        finally:
            self._image_pins.close()
            await self._feed.finish()

    async def _start(self, profile: Profile, custom: EnvironmentSpec | None) -> tuple[str, int]:
        request = request_for_profile(profile, custom)
        self._profile_slug = profile.slug
        self._kernel_display_name = request.kernel_name
        for note in custom.notes if custom is not None else ():
            await self._feed.publish("image", 0, f"Note: your environment.yml: {note}")
        self._apply_profile_limits(profile)
        # Never hold a GPU while an image builds: check now (nothing held), allocate last.
        await self.check_gpus_feasible_now(profile)
        info = await self._ensure_image(request)
        self._image_info = info
        self.image = info.image  # with a registry: the reference pinned by digest
        await self._refuse_if_another_user_runs_here()
        self._allocation = await self._allocate_gpus(profile)
        self._watch_gpu_idleness(profile)
        self._prepare_container(info, self._allocation)
        await self._replace_if_changed(info)
        await self._feed.publish("start", 90, f"Starting your server ({profile.display_name})")
        self._before_container = False
        ip_port = await super().start()
        await self._feed.publish("start", 95, "Container started; waiting for JupyterLab to answer")
        return ip_port

    def limits_for(self, profile: Profile) -> tuple[float | None, int | None]:
        """The CPU and memory limits a start of ``profile`` gets: the profile's own, else the
        spawner's (the config's, or what an auth_state_hook or pre_spawn_hook set)."""
        return (profile.cpu_limit or self._limit_without_profile("cpu_limit"),
                profile.mem_limit or self._limit_without_profile("mem_limit"))

    def _limit_without_profile(self, trait: str) -> Any:
        """``trait`` as the admin left it: a previous start's profile override, if nothing
        changed it since, undone."""
        current = getattr(self, trait)
        before, ours = self._profile_limits.get(trait, (current, None))
        return before if ours is not None and current == ours else current

    def _undo_profile_limits(self) -> None:
        """Back to the limits without the last start's profile (before JupyterHub runs the
        pre_spawn_hook, so that the hook sees, and may change, the admin's limits)."""
        for trait in _LIMITS:
            setattr(self, trait, self._limit_without_profile(trait))
        self._profile_limits = {}

    def _apply_profile_limits(self, profile: Profile) -> None:
        """A profile's cpu_limit / mem_limit win for this start; a limit it does not set stays
        as the config, an auth_state_hook or the pre_spawn_hook left it."""
        self._undo_profile_limits()
        for trait in _LIMITS:
            value = getattr(profile, trait)
            if value:
                self._profile_limits[trait] = (getattr(self, trait), value)
                setattr(self, trait, value)

    def _post_restart_notice(self, text: str) -> None:
        """Leave ``text`` for this server's next spawn page, should the hub stop under this start."""
        self.services.notices.post(self.user.name, self.name, text)
        self._restart_notice = True

    def _take_back_restart_notice(self) -> None:
        if self._restart_notice:
            self.services.notices.discard(self.user.name, self.name)
            self._restart_notice = False

    @contextlib.contextmanager
    def _restart_notice_kept_if_cancelled(self) -> Iterator[None]:
        """A restart notice posted in this block is taken back when it ends, unless it was
        cancelled: the hub stopping leaves it for the next spawn page, and a user's stop takes
        it back in clear_state()."""
        cancelled = False
        try:
            yield
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            if not cancelled and not self._hub_stops_under_start:
                self._take_back_restart_notice()

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        async for event in self._feed.follow():
            yield {"progress": event["progress"], "message": event["message"]}

    async def poll(self) -> int | str | None:
        if self._before_container:
            self._keep_failure_visible()
            return 0
        try:
            await self._adopt_unsaved_start()
            status = await super().poll()
        except Exception as error:
            self._unknown_while_unanswered(error)
            return None
        if status is not None:
            self._release_gpus()
        return status

    def _unknown_while_unanswered(self, error: Exception) -> None:
        """A poll the daemon did not answer: the server is taken as running (the caller returns
        None; JupyterHub then asks the server itself). Raised on, the hub would forget it (and,
        after a restart, clear its state) while its container runs on and holds its GPUs;
        any other error is raised again. A setting the hub's services refuse (a typo in the
        config the hub restarted with) is taken as running too: the servers wait for the fix."""
        if isinstance(error, HubConfigError):
            self.log.error("Cannot poll %s (%s): taken as still running", self._log_name, error)
            return
        if not unanswered(error):
            raise error
        self.log.warning("Cannot poll %s (Docker does not answer: %s): taken as still running", self._log_name,
                         one_line(error))

    def _keep_failure_visible(self) -> None:
        """JupyterHub stops a start that failed (polling first) before it settles the start: in
        between, its progress API answers a page that asks "not starting" (HTTP 400), and the
        page never learns why (jupyterhub#4244). So the start stays pending until JupyterHub
        settles it (its own callback then clears the flag), and the page gets the failure."""
        if self._failing:
            self._failing = False
            self._spawn_pending = True

    async def stop(self, now: bool = False) -> None:
        self._hub_stops_under_start = self._stopped_by_the_hub()
        try:
            services = hub_services(self)
        except HubConfigError as error:
            # JupyterHub forgets the server whatever stop() raises: its container must stop all
            # the same. There is no GPU table to release from; the next hub rebuilds it from labels.
            self.log.error("Stopping %s without the hub's services (%s)", self._log_name, error)
            await super().stop(now=now)
            return
        services.queue.cancel(*self.gpu_key)  # a start still waiting for a GPU
        container = self.object_id
        try:
            await super().stop(now=now)
        except Exception as error:
            # JupyterHub forgets the server all the same (and says nothing), while its container
            # may run on with its GPUs: they must not go to the next in line meanwhile.
            if self._holds_gpus() and container:
                self._keep_gpus_of_failed_stop(container, error)
            else:
                self._release_gpus()
            raise
        except BaseException:
            self._release_gpus()
            raise
        self._release_gpus()

    def _stopped_by_the_hub(self) -> bool:
        """Whether this stop (or clear_state) ends a start that nobody cancelled: JupyterHub's
        shutdown with ``cleanup_servers = True`` stops pending starts as they are, while a
        user's stop (or an admin's) cancels the start first. The restart notice then stays
        for the next spawn page."""
        future = self._spawn_future  # User.stop has cleared the pending flags by now: the start's future tells
        if future is None or future.done():
            return False
        cancelling = getattr(future, "cancelling", None)  # Python 3.11: a cancel asked, not yet done
        return not (callable(cancelling) and cancelling())

    async def delete_forever(self) -> None:
        """The hub deletes this server, or (the default server) the user: what belonged to the
        name is not handed to the next user who gets it. A deleted user's home volumes are
        kept but recorded as orphaned; their environments record and notices are removed.

        Not while a setting of the hub's config is wrong (no services): the orphaning could not
        be recorded, and the next user given the name would get the home. The admin's delete
        is refused in one line (JupyterHub then deletes nothing), naming the setting."""
        try:
            services = hub_services(self)
        except HubConfigError as error:
            raise web.HTTPError(409, f"{self._log_name} is not deleted: {error}. Fix it in the hub's config, "
                                     "restart the hub, and delete again") from None
        services.notices.discard(self.user.name, self.name)
        if self.name:  # a named server: the user, their home and their record stay
            return
        await self.orphan_user_volumes()
        services.usage.forget(self.user.name)
        services.notices.discard_all(self.user.name, self.user.orm_user.orm_spawners.keys())

    # -- state across hub restarts ----------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self._image_info is not None and self.object_id:
            state["condaspawner"] = {
                "key": self._image_info.key,
                "image": self._image_info.tag,
                "reference": self._image_info.reference,
                "image_id": self._image_info.image_id,
                "env_name": self._image_info.env_name,
                "gpus": list(self._allocation.uuids) if self._allocation else [],
                "gpu_user": self.gpu_key[0],
                "port": self.port,
                **self._idle_watch,  # for a server whose profile is renamed or removed while it runs
            }
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        saved = state.get("condaspawner")
        if not saved:
            return
        self._image_info = ImageInfo(saved["key"], saved["image"], saved["image_id"], saved["env_name"], cached=True,
                                     reference=saved.get("reference", ""))
        self.image = self._image_info.image
        self.port = saved.get("port") or self.port
        if saved.get("gpus"):
            self._gpu_key = (str(saved.get("gpu_user") or self.user.name), self.name)
            try:
                self._allocation = self._saved_allocation(tuple(saved["gpus"]))
                self._watch_gpu_idleness(self._profile_of_saved_options(), saved)
            except HubConfigError as error:
                # Raised here, JupyterHub would not start at all (its loading of every server ends
                # in a traceback). The server keeps its GPUs in its state, and poll() takes it as
                # running, until the admin fixes the setting and restarts the hub.
                self.log.error("Loading %s without the hub's services (%s): its GPUs stay recorded, and "
                               "are watched once the setting is fixed", self._log_name, error)
                self._allocation = Allocation(*self._gpu_key, tuple(saved["gpus"]))
                self._idle_watch = {key: saved[key] for key in ("gpu_idle_timeout", "profile_name") if key in saved}

    def _saved_allocation(self, uuids: tuple[str, ...]) -> Allocation | None:
        """The table's entry (restored from container labels) for this server; while the table is
        not restored yet (the daemon slow when the hub started), the GPUs its state saved, so that
        the culler watches it from now on: it reads who holds what from the table once restored."""
        allocator = hub_services(self).allocator
        held = allocator.allocation(*self.gpu_key)
        if held is None and not allocator.restored:
            return Allocation(*self.gpu_key, uuids)
        return held

    def clear_state(self) -> None:
        super().clear_state()
        # JupyterHub's shutdown clears a start that has no container yet without stop() (its
        # poll says "not running"): the notice stays then. A user's stop cancelled the start.
        if not (self._hub_stops_under_start or self._stopped_by_the_hub()):
            self._take_back_restart_notice()  # the user stopped a spawn that waited for a GPU or a build
        self._image_info = None
