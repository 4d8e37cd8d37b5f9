"""The user's choice of a start: a profile, maybe with their own environment.yml.

From the spawn form, a /hub/spawn link or the REST API alike: validated (the profile is
the user's to use, the file passes SpecPolicy, a GPU profile is one this host could ever
serve, the file solves), normalised into the options JupyterHub saves, and refused as one
line naming the field otherwise (a FormRefusal on the form, a StartFailure elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

from .builderrors import BuildError, one_line
from .buildmodel import EventStream, request_for_profile
from .failures import StartFailure, explain
from .gpus import GpuUnavailable
from .profiles import Profile
from .resolve import ResolveError
from .spec import EnvironmentSpec, SpecError, SpecPolicy
from .specmodel import printable

if TYPE_CHECKING:
    from .hubservices import HubServices

# A refused environment file lists every problem (SpecPolicy.max_problems of them at most).
_SPEC_MESSAGE_CHARS = 8000
# What a /hub/spawn link's query may carry: a profile, nothing else (see options_from_query).
_QUERY_FIELDS = frozenset({"profile"})
# What a start's options may carry (the REST API's body; the form's fields become these), and what
# apply_choice adds to the options it saves (JupyterHub starts with them again when a body is empty).
_OPTION_FIELDS = ("profile", "environment")
_SAVED_FIELDS = frozenset({*_OPTION_FIELDS, "environment_key"})


def apply_user_options_hook(spawner: SpawnChoiceMixin, user_options: dict) -> None:
    """JupyterHub's apply_user_options hook (form and REST alike): validate, then normalise.
    Before any await, so that a refusal is the answer to the request (the form's file was read
    off the event loop, and is not read again)."""
    spawner.apply_choice(user_options)


# A user no profile admits (not yet in the course's group): the form says it, and a start gets it.
NO_PROFILE = ("no profile on this hub is open to you (yet): ask the hub admin, or your instructor, to give you "
              "access (a course's profile is open to its group)")


class SpawnChoiceMixin:
    """Validating and normalising a start's options; the host class is a CondaSpawner."""

    if TYPE_CHECKING:  # provided by CondaSpawner, the class this is mixed into
        user: Any
        name: str
        log: Any
        _log_name: str
        orm_spawner: Any
        user_options: dict[str, Any]
        apply_user_options: Any
        _choice: tuple[Profile, EnvironmentSpec | None] | None
        _parsed: tuple[str, EnvironmentSpec | SpecError] | None
        _last_form: dict[str, Any] | None
        _feed: EventStream
        _accepted_options: dict[str, Any]
        _failing: bool
        _before_container: bool

        @property
        def services(self) -> HubServices: ...

        @property
        def _group_names(self) -> list[str]: ...

        @property
        def _normalize_username(self) -> Callable[[str], str] | None: ...

        def _undo_profile_limits(self) -> None: ...

    def resolve_choice(self, user_options: dict | None) -> tuple[Profile, EnvironmentSpec | None]:
        """The profile and custom spec in ``user_options``; HTTPError 400/403 when refused."""
        options = user_options or {}
        _refuse_unknown_fields(options)
        catalog = self.services.catalog
        slug = options.get("profile")
        if slug is None:
            profile = catalog.default_for(self.user.name, self._group_names, self._normalize_username)
            if profile is None:
                raise _refused(403, NO_PROFILE)
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
        if not profile.allows(self.user.name, self._group_names, self._normalize_username):
            raise _refused(403, f"profile: {profile.slug!r} is not available to you")
        return profile

    def _nearest_profile(self, slug: str) -> str:
        """`` (did you mean 'cs101-hw2'?)`` for a misspelt or miscased slug (a link in a syllabus),
        among the profiles this user may use; "" when none is close."""
        visible = self.services.catalog.visible_to(self.user.name, self._group_names, self._normalize_username)
        mine = {profile.slug.lower(): profile.slug for profile in visible}
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
        # The file's name as the browser sent it, shown in refusals: printable characters only (no
        # bidi override turning the line around, no control characters in the hub's log).
        filename = printable(str(upload.get("filename") or ""))
        # No file chosen sends a part with no name; a named part with nothing in it is a file the
        # user chose, and meant: not a reason to start the profile's own environment instead.
        if filename and not upload.get("body") and not text:
            raise FormRefusal(f"{filename}: the uploaded file is empty: "
                              "choose it again, or paste its text")
        data: str | bytes = upload.get("body") or text
        if data:
            policy = self.services.policy
            try:
                spec = await asyncio.to_thread(policy.parse, data,
                                               source=filename or "pasted environment.yml")
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
        if self.apply_user_options is not apply_user_options_hook:
            return await super()._run_apply_user_options(user_options)  # type: ignore[misc]  # Spawner's
        try:
            # At once (JupyterHub answers the POST when the first await comes, with
            # slow_spawn_timeout 0), the GPU check by the last scan or read of the swarm (only a
            # hub's very first scan is awaited, read in a thread) ...
            await self.ready_gpu_view()
            apply_user_options_hook(self, user_options)
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
                cause = str(error).removeprefix("cannot solve: ")
                refusal = explain(BuildError(f"solve: {error}", phase="solve", cause=cause), custom_spec=True)
                refusal.log_message = f"the solve pre-check refused the environment (nothing built): {cause}"
                raise refusal from None
        return None


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
