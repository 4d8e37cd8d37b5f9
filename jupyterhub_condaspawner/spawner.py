"""CondaSpawner: DockerSpawner glue over profiles, spec, builder and gpus.

The spawn form is spawnform.py's, a server's image spawnimage.py's, its GPUs
spawngpus.py's, its container spawncontainer.py's, what all spawners of a hub share
hubservices.py's, names and hardening isolation.py's.

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
import difflib
import logging
import time
from collections.abc import Iterator
from typing import Any, AsyncIterator

from dockerspawner import DockerSpawner
from traitlets import Bool, Float, default

from .builderrors import BuildError, one_line, unanswered
from .buildmodel import EventStream, ImageInfo, request_for_profile
from .failures import StartFailure, config_failure, explain, log_failure
from .gpus import Allocation, GpuUnavailable
from .hubservices import HubConfigError, HubServices, hub_services
from .isolation import IsolationMixin
from .profiles import Profile, ProfileError
from .resolve import ResolveError
from .spawncontainer import SpawnContainerMixin
from .spawnform import SpawnFormMixin
from .spawngpus import GpuBindingMixin
from .spawnimage import SpawnImageMixin
from .spec import EnvironmentSpec, SpecError, SpecPolicy

# A refused environment file lists every problem (SpecPolicy.max_problems of them at most).
_SPEC_MESSAGE_CHARS = 8000
# The spawner's limits a profile may override for one start.
_LIMITS = ("cpu_limit", "mem_limit")
# What a /hub/spawn link's query may carry: a profile, nothing else (see options_from_query).
_QUERY_FIELDS = frozenset({"profile"})
# What a start's options may carry (the REST API's body; the form's fields become these), and what
# apply_choice adds to the options it saves (JupyterHub starts with them again when a body is empty).
_OPTION_FIELDS = ("profile", "environment")
_SAVED_FIELDS = frozenset({*_OPTION_FIELDS, "environment_key"})


def _apply_user_options(spawner: "CondaSpawner", user_options: dict) -> None:
    """JupyterHub's apply_user_options hook (form and REST alike): validate, then normalise.
    Before any await, so that a refusal is the answer to the request (the form's file was read
    off the event loop, and is not read again)."""
    spawner.apply_choice(user_options)


class CondaSpawner(SpawnFormMixin, SpawnImageMixin, GpuBindingMixin, SpawnContainerMixin, IsolationMixin,
                   DockerSpawner):
    """Spawn JupyterLab in a cached image built from a profile or a user's environment.yml."""

    replace_changed_containers = Bool(
        True,
        config=True,
        help="""Remove a kept (stopped) container when its image (or its labels: profile
        key, host networking) no longer matches the user's choice, instead of restarting
        the stale one (DockerSpawner keeps it). A kept container whose GPUs differ from
        the start's is always replaced, whatever this says: its devices cannot change in
        place, and its old GPUs may be another server's now.

        c.CondaSpawner.replace_changed_containers = False
        """,
    )

    gpu_idle_timeout = Float(
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
    def _default_options_form(self):
        return CondaSpawner.render_options_form

    @default("options_from_form")
    def _default_options_from_form(self):
        return self.options_from_form_data

    @default("apply_user_options")
    def _default_apply_user_options(self):
        return _apply_user_options

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
        self._device_requests: list = []
        self._restart_notice = False  # this process posted "the hub restarted while you ..."
        self._hub_stops_under_start = False  # stop() came from the hub shutting down, not from the user
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

    # -- the choice: form, REST, validation --------------------------------------------------

    def resolve_choice(self, user_options: dict | None) -> tuple[Profile, EnvironmentSpec | None]:
        """The profile and custom spec in ``user_options``; HTTPError 400/403 when refused."""
        options = user_options or {}
        _refuse_unknown_fields(options)
        catalog = self.services.catalog
        slug = options.get("profile")
        if slug is None:
            profile = catalog.default_for(self.user.name, self._group_names)
            if profile is None:
                raise _refused(403, "no profile is available to you")
        else:
            if not isinstance(slug, str):
                raise _refused(400, "profile: must be a profile's slug")
            profile = self.allowed_profile(slug)
        return profile, self._custom_spec(profile, options.get("environment"))

    def allowed_profile(self, slug: str) -> Profile:
        """The profile ``slug`` as the profiles are now, if this user may use it; HTTPError
        400 (no such profile) or 403 (not theirs) otherwise."""
        try:
            profile = self.services.catalog.get(slug)
        except KeyError:
            raise _refused(400, f"profile: unknown profile {slug[:64]!r}{self._nearest_profile(slug)}") from None
        if not profile.allows(self.user.name, self._group_names):
            raise _refused(403, f"profile: {profile.slug!r} is not available to you")
        return profile

    def _nearest_profile(self, slug: str) -> str:
        """`` (did you mean 'cs101-hw2'?)`` for a misspelt or miscased slug (a link in a syllabus),
        among the profiles this user may use; "" when none is close."""
        mine = {profile.slug.lower(): profile.slug for profile in self.services.catalog.profiles
                if profile.allows(self.user.name, self._group_names)}
        close = difflib.get_close_matches(str(slug).lower()[:64], list(mine), n=1)
        return f" (did you mean {mine[close[0]]!r}?)" if close else ""

    def _custom_spec(self, profile: Profile, text: Any) -> EnvironmentSpec | None:
        if text in (None, ""):
            if profile.environment is None:
                raise _refused(400, f"environment: profile {profile.slug!r} needs your own environment.yml")
            return None
        if not isinstance(text, str):
            raise _refused(400, "environment: must be the text of an environment.yml")
        if not profile.allow_custom_environment:
            raise _refused(400, f"environment: profile {profile.slug!r} does not allow your own environment")
        try:
            return self._parse_custom(text, self.services.policy)
        except SpecError as error:
            raise _spec_refused(error) from None

    def _parse_custom(self, text: str, policy: SpecPolicy) -> EnvironmentSpec:
        """``text`` parsed, once per text: the form and Check read a file off the event loop (one
        at the size limit takes up to a second to read), then the options are applied."""
        remembered = self._parsed
        if remembered is None or remembered[0] != text:
            try:
                remembered = (text, policy.parse(text, source="environment.yml"))
            except SpecError as error:
                remembered = (text, error)
            self._parsed = remembered
        if isinstance(remembered[1], SpecError):
            raise remembered[1]
        return remembered[1]

    async def parse_custom_off_loop(self, text: str) -> EnvironmentSpec:
        """Parse a user's environment.yml in a thread, off the hub's event loop; SpecError if
        refused. resolve_choice then takes the remembered result."""
        return await asyncio.to_thread(self._parse_custom, text, self.services.policy)

    def apply_choice(self, user_options: dict | None) -> None:
        """Validate ``user_options`` and store them normalised (JSON: profile, spec text, key)."""
        profile, custom = self.resolve_choice(user_options)
        self.check_gpus_feasible(profile)
        normalised: dict[str, Any] = {"profile": profile.slug}
        if custom is not None:
            normalised["environment"] = custom.to_yaml()
            normalised["environment_key"] = custom.key()
        self._choice = (profile, custom)
        self._undo_profile_limits()
        self._feed = EventStream()  # progress() of this spawn may be asked for before start() runs
        self.user_options = normalised
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = normalised

    async def options_from_form_data(self, formdata: dict[str, list]) -> dict[str, Any]:
        """Form fields -> user_options. Errors are FormRefusal (a ValueError): the form shows
        them as one line, and the hub logs them as one line."""
        with self._refusals_named(FormRefusal):
            return await self._options_from_form(formdata)

    @contextlib.contextmanager
    def _refusals_named(self, kind: type[FormRefusal] | type[StartFailure]) -> Iterator[None]:
        """A refusal of ``kind`` raised inside names this server, for JupyterHub's one log line
        about it (_QuietFormRefusals)."""
        _quiet_form_refusals(self.log)  # JupyterHub's handler logs the refusal on this logger
        try:
            yield
        except kind as refusal:
            refusal.server = self._log_name
            raise

    async def _options_from_form(self, formdata: dict[str, list]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if formdata.get("profile"):
            options["profile"] = formdata["profile"][0]
        upload = (formdata.get("environment_file_file") or [{}])[0]
        if not isinstance(upload, dict):  # JupyterHub's name for an uploaded file, sent as a text field
            raise FormRefusal("environment_file: must be a file chosen with the form's upload field")
        raw_text = (formdata.get("environment_text") or [""])[0]
        # Parsed as pasted, as Check and the REST API do: stripping would take away only the first
        # line's indentation of a uniformly indented paste, and break it.
        text = raw_text if raw_text.strip() else ""
        # Shown again, as typed, if the hub sends the form back with an error; a paste over the
        # size limit is not kept (the hub's body limit is 100 MB, rendered back into HTML).
        kept = raw_text if len(raw_text) <= self.services.policy.max_file_bytes else ""
        self._last_form = {"profile": options.get("profile"), "environment": kept}
        if upload.get("body") and text:
            raise FormRefusal("environment: upload a file or paste text, not both")
        # No file chosen sends a part with no name; a named part with nothing in it is a file the
        # user chose, and meant: not a reason to start the profile's own environment instead.
        if upload.get("filename") and not upload.get("body") and not text:
            raise FormRefusal(f"{str(upload['filename'])[:100]}: the uploaded file is empty: "
                              "choose it again, or paste its text")
        data: str | bytes = upload.get("body") or text
        if data:
            policy = self.services.policy
            try:
                spec = await asyncio.to_thread(policy.parse, data,
                                               source=upload.get("filename") or "pasted environment.yml")
            except SpecError as error:
                if error.count > 1:
                    self._last_form["problems"] = {"source": error.source, "count": error.count,
                                                   "details": list(error.details)}
                raise FormRefusal.of_spec(error) from None
            # The file as written (it parsed, so it is UTF-8): apply_choice normalises it and
            # keeps its notes (ignored keys) for the progress page.
            options["environment"] = data.decode("utf-8-sig") if isinstance(data, bytes) else data
            self._parsed = (options["environment"], spec)
        await self.ready_gpu_view()
        try:
            self.check_gpus_feasible(self.resolve_choice(options)[0])
        except StartFailure as refusal:
            raise FormRefusal(refusal.message) from None
        return options

    async def options_from_query(self, query_data: dict[str, list[str]]) -> dict[str, Any]:
        """A /hub/spawn link's query: JupyterHub starts the server at once on such a GET, so a
        link in a chat or on any site would start it. It may choose a profile (``?profile=slug``)
        and nothing else: an environment.yml (code: its ``variables`` reach the kernel) or any
        other field comes only with the form's POST or the REST API. Refused: a 400 on the form."""
        with self._refusals_named(StartFailure):
            return await self._options_from_query(query_data)

    async def _options_from_query(self, query_data: dict[str, list[str]]) -> dict[str, Any]:
        fields = sorted(set(query_data) - _QUERY_FIELDS)
        if fields:
            raise _refused(400, f"A link may choose only a profile, not {fields[0][:40]!r}: "
                                "choose your options on this form and start from it")
        values = query_data.get("profile") or [""]
        if len(values) > 1:
            raise _refused(400, "profile: a link names one profile")
        options = {"profile": values[0]} if values[0] else {}
        await self.ready_gpu_view()
        self.check_gpus_feasible(self.resolve_choice(options)[0])
        return options

    def check_gpus_feasible(self, profile: Profile) -> None:
        """Refuse at once a GPU profile this host could never serve; nothing is held."""
        if not profile.gpus:
            return
        try:
            self.services.allocator.check_feasible(self.user.name, self.name, profile.gpus, profile.gpu_model,
                                                   cuda=profile.cuda, profile=profile.slug)
        except GpuUnavailable as error:
            raise explain(error, custom_spec=False) from None

    async def ready_gpu_view(self) -> None:
        """Have something for the GPU checks on the event loop to judge by: the hub's first NVML
        scan, read in a thread. Returns without suspending once there is one."""
        await self.services.allocator.ensure_scanned()

    async def refresh_gpu_view(self) -> None:
        """Read what the GPU checks on the event loop judge by (a stale NVML scan), in a thread."""
        await asyncio.to_thread(self.services.allocator.latest_scan)

    async def check_gpus_feasible_now(self, profile: Profile) -> None:
        """The start's feasibility check, on a fresh scan, off the event loop (NVML may be slow)."""
        if profile.gpus:
            await self.refresh_gpu_view()
        self.check_gpus_feasible(profile)

    async def _run_apply_user_options(self, user_options: dict) -> None:
        # JupyterHub logs any exception here with a traceback at ERROR; a refused input is
        # the user's mistake, not the hub's: one line at INFO, and the one-line reason.
        self._before_container = True  # JupyterHub's start of a server begins here
        if self.apply_user_options is not _apply_user_options:
            return await super()._run_apply_user_options(user_options)
        try:
            # At once (JupyterHub answers the POST when the first await comes, with
            # slow_spawn_timeout 0), the GPU check by the last scan or read of the swarm (only a
            # hub's very first scan is awaited, read in a thread) ...
            await self.ready_gpu_view()
            _apply_user_options(self, user_options)
            # ... then again on a fresh one, read off the event loop.
            await self.refresh_gpu_view()
            if self._choice is not None:
                self.check_gpus_feasible(self._choice[0])
            await self.precheck_solve()
            self._accepted_options = dict(self.user_options)
        except StartFailure as refusal:
            self._failing = True
            if self.orm_spawner is not None:  # a start without a body gets the last accepted options, not these
                self.orm_spawner.user_options = dict(self._accepted_options)
            refusal.server = self._log_name
            self.log.info("Refused options for %s (%s): %s", self._log_name, refusal.status_code, refusal.message)
            raise

    async def precheck_solve(self) -> None:
        """Will the user's own environment solve? Asked before the spawn is accepted (form and REST).

        Solved as its build will solve it (the profile's CUDA, ipykernel added); the build
        then reuses the lock. Unsolvable: a 400 with the solver's reason. Skipped for an
        image already built; past SpecPolicy.precheck_timeout, or with a channel that does
        not answer, the spawn goes on and the build reports.
        """
        profile, custom = self._choice or (None, None)
        if profile is not None and custom is not None:
            await self.presolve(profile, custom)

    async def presolve(self, profile: Profile, custom: EnvironmentSpec) -> bool | None:
        """Solve ``custom`` on ``profile``'s hardware as its build will: True when it solves
        (or its image exists), None when the solver could not answer within
        SpecPolicy.precheck_timeout; StartFailure (400) with the solver's reason when it cannot."""
        timeout = self.services.policy.precheck_timeout
        if timeout <= 0:
            return None
        builder = self.services.builder
        request = request_for_profile(profile, custom)

        async def unless_cached() -> None:
            with contextlib.suppress(Exception):  # no daemon or base image: the start will say so
                if await asyncio.to_thread(builder.is_cached, request):
                    return
            await builder.presolve(request)

        try:
            await asyncio.wait_for(unless_cached(), timeout)
            return True
        except asyncio.TimeoutError:
            self.log.info("Pre-check of %s's environment took over %g s: the build solves it",
                          self._log_name, timeout)
        except ResolveError as error:
            if not error.unreachable:
                raise explain(BuildError(f"solve: {error}", phase="solve",
                                         cause=str(error).removeprefix("cannot solve: ")), custom_spec=True) from None
        return None

    # -- start / stop / poll -------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        self._start_began = time.monotonic()
        self._before_container = True
        self._hub_stops_under_start = False
        if self._feed.done:
            self._feed = EventStream()
        custom = None
        try:
            profile, custom = self._choice or self.resolve_choice(self.user_options)
            self._choice = None
            return await self._start(profile, custom)
        except asyncio.CancelledError:
            # A user's stop of a start with no container yet: the hub's poll() says "not
            # running" (0), so no stop() comes to free what the start was granted.
            if self._before_container:
                self._release_gpus()
            raise
        except Exception as error:
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
            await self._adopt_gpus_of_unsaved_start()
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
        try:
            await super().stop(now=now)
        finally:
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
        kept but recorded as orphaned; their environments record and notices are removed."""
        services = hub_services(self)
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
            self._allocation = self._saved_allocation(tuple(saved["gpus"]))
            self._watch_gpu_idleness(self._profile_of_saved_options(), saved)

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


class FormRefusal(ValueError):
    """A choice refused on the form, as one line. A spec with several problems is summed up in
    one line and listed under the environment.yml box of the form rendered again.

    JupyterHub shows ``jupyterhub_message`` above the form it renders again. Its
    ``jupyterhub_html_message`` never shows there (JupyterHub passes it to spawn.html as
    ``html_error_message``, which reads ``error_html_message``), so the list is the form's own.
    """

    def __init__(self, message: str, shown: str | None = None):
        super().__init__(message)
        self.jupyterhub_message = shown or message
        self.server = ""  # whose form, for the hub's log

    @classmethod
    def of_spec(cls, error: SpecError) -> FormRefusal:
        return cls(str(error), str(error) if error.count == 1 else (
            f"{error.source}: {error.count} problems, listed under your environment.yml below"))


# What JupyterHub logs, with the traceback, when a start from the form or a /hub/spawn link fails.
_JUPYTERHUB_SPAWN_FAILED = {"Failed to spawn single-user server with form": "form",
                            "Failed to spawn single-user server with query arguments": "link"}


class _QuietFormRefusals(logging.Filter):
    """JupyterHub logs a refused spawn form or link at ERROR with its traceback; a refused input
    is the user's mistake, not the hub's: one line at INFO, as for refused REST options. A start
    from the form that failed otherwise within JupyterHub's first second is logged once already
    (log_failure: a traceback only for the unexpected), so JupyterHub's line loses its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        refusal = record.exc_info[1] if record.exc_info else None
        if isinstance(refusal, FormRefusal):
            record.msg, record.args = "Refused spawn form for %s: %s", (refusal.server, one_line(refusal))
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        elif (isinstance(refusal, StartFailure) and not refusal.unexpected and isinstance(record.msg, str)
              and record.msg in _JUPYTERHUB_SPAWN_FAILED):
            what = _JUPYTERHUB_SPAWN_FAILED[record.msg]
            refused = refusal.status_code < 500
            record.msg = f"Refused spawn {what} for %s (%s): %s" if refused else f"Spawn {what} of %s failed (%s): %s"
            record.args = (refusal.server, refusal.status_code, refusal.message)
            record.exc_info, record.exc_text = None, None
            if refused:
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _quiet_form_refusals(log: logging.Logger | logging.LoggerAdapter) -> None:
    logger = log.logger if isinstance(log, logging.LoggerAdapter) else log
    if not any(isinstance(existing, _QuietFormRefusals) for existing in logger.filters):
        logger.addFilter(_QuietFormRefusals())


def _spec_refused(error: SpecError) -> StartFailure:
    """A refused environment file (REST): every problem, on one line, ``; `` between them."""
    return StartFailure(str(error), reason="options", status_code=400, max_chars=_SPEC_MESSAGE_CHARS)


def _refuse_unknown_fields(options: dict) -> None:
    """A start's option the hub does not know (a misspelt ``environemnt`` in a REST body) is refused,
    never ignored: ignored, the start would run the profile's own environment instead."""
    unknown = sorted(str(field) for field in set(options) - _SAVED_FIELDS)
    if "environment_key" in options and options.get("environment") in (None, ""):
        # The key the hub saves next to an environment's text; alone, it would be ignored and
        # the profile's own environment would start instead of the one the key names.
        raise _refused(400, "'environment_key' is what the hub saves with an environment, not a choice: send the "
                            "environment.yml's text as 'environment' (or start one of your environments by its key: "
                            "POST /hub/api/environments/KEY/start)")
    if unknown:
        close = difflib.get_close_matches(unknown[0], _OPTION_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _refused(400, f"{unknown[0][:40]!r} is not an option of a start{hint}: a start takes only "
                            f"{' and '.join(map(repr, _OPTION_FIELDS))}")


def _refused(status: int, message: str) -> StartFailure:
    """A refused choice (bad profile or environment): the user's to fix, shown as one line."""
    return StartFailure(message, reason="options", status_code=status)
