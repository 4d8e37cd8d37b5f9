"""Why a start failed, in one line a user can act on, with the HTTP status it deserves.

Every failure of a spawn leaves ``CondaSpawner.start()`` as a :class:`StartFailure`
(JupyterHub's ``SpawnException``): the hub then shows ``message`` on the form's error
page, as the progress page's "Spawn failed: ..." line and in the REST reply, with
``status_code``, and logs it without a traceback. 4xx: the user's own spec or choice;
503: capacity or a part that is down, worth retrying; 500: the hub's setup or a bug.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

import docker.errors
import requests.exceptions
from jupyterhub.spawner import SpawnException
from tornado import web

from .builderrors import BuildError
from .gpus import GpuInfeasible, GpuQuotaExceeded, GpuUnavailable
from .oneline import one_line

_MESSAGE_CHARS = 400
# The solver's explanation (resolve.py keeps up to 1,500 characters of it) and the advice.
_SOLVE_MESSAGE_CHARS = 1700


class StartFailure(SpawnException):
    """A failed start: ``message`` is one line for the user, ``log_message`` may say more."""

    def __init__(self, message: str, *, reason: str, status_code: int, log_message: str = "",
                 max_chars: int = _MESSAGE_CHARS):
        message = _one_line(message, max_chars)
        super().__init__(message, reason=reason, status_code=status_code, log_message=log_message or message)
        # JupyterHub shows this on the progress page instead of the exception's repr.
        self.jupyterhub_message = message
        self.server = ""  # whose start, for the hub's log (the spawner sets it)

    @property
    def unexpected(self) -> bool:
        return self.status_code >= 500 and self.reason == "unexpected"


def config_failure(log_message: str) -> StartFailure:
    """A start that a setting in the hub's config stops: the user learns it is the admin's to fix;
    the hub's log names the setting."""
    return StartFailure("This hub's configuration has an error: tell the hub admin (the hub's log names the setting)",
                        reason="config", status_code=500, log_message=log_message)


def explain(error: BaseException, *, custom_spec: bool) -> StartFailure:
    """``error`` (from any phase of a start) as a :class:`StartFailure`.

    ``custom_spec``: the environment is the user's own file, so a spec that cannot be
    solved or pip-installed is the user's to fix (400); a profile's is the admin's (500).
    """
    if isinstance(error, StartFailure):
        return error
    if isinstance(error, GpuInfeasible):
        return StartFailure(error.user_message, reason="gpu-infeasible", status_code=400, log_message=error.detail)
    if isinstance(error, GpuQuotaExceeded):
        return StartFailure(error.user_message, reason="quota", status_code=429, log_message=error.detail)
    if isinstance(error, GpuUnavailable):
        return StartFailure(error.user_message, reason="capacity", status_code=503, log_message=error.detail)
    if isinstance(error, BuildError):
        failure = _build_failure(error, custom_spec)
        failure.log_message = error.summary()  # the hub's log: the key, the phase in words, the cause
        return failure
    if isinstance(error, web.HTTPError):
        return StartFailure(error.log_message or HTTPStatus(error.status_code).phrase,
                            reason="refused", status_code=error.status_code)
    if isinstance(error, (requests.exceptions.ConnectionError, docker.errors.DockerException)):
        return _docker_failure(error)
    return StartFailure("Unexpected error starting your server: the hub admin can find it in the hub's log",
                        reason="unexpected", status_code=500, log_message=f"{error.__class__.__name__}: {error}")


def _build_failure(error: BuildError, custom_spec: bool) -> StartFailure:
    cause = error.cause or str(error)
    key = f" (build {error.key[:16]}: `condaspawner log {error.key[:16]}`)" if error.key else ""
    # The profile's environment is the admin's to fix: the user passes the build's key on.
    owner = ("check your environment.yml" if custom_spec
             else f"the profile's environment needs fixing: tell the hub admin{key}")
    phase = error.phase
    if phase == "solve" and error.unreachable:
        return StartFailure(f"The package channel cannot be reached ({cause}): try again later", reason="channel",
                            status_code=503)
    if phase == "solve":
        return StartFailure(f"Your environment cannot be solved: {cause}; {owner}" if custom_spec
                            else f"This profile's environment cannot be solved: {cause}; {owner}",
                            reason="solve", status_code=400 if custom_spec else 500, max_chars=_SOLVE_MESSAGE_CHARS)
    if phase == "install":
        return StartFailure(f"Downloading or installing the packages failed: {cause}; try again later, "
                            f"or tell the hub admin if it keeps failing{key}", reason="install", status_code=503)
    if phase == "pip" and error.unreachable:
        return StartFailure(f"pip could not install the pip: section: {cause}; try again later, or tell the hub "
                            "admin if it keeps failing", reason="pip-index", status_code=503)
    if phase == "pip":
        return StartFailure(f"pip could not install the pip: section: {cause}; "
                            + (_check_pip_packages(cause) if custom_spec else owner),
                            reason="pip", status_code=400 if custom_spec else 500)
    if phase == "timeout":
        return StartFailure(f"Building this environment took too long: {cause}; ask the hub admin to prebuild it "
                            "(`condaspawner build`)", reason="timeout", status_code=503)
    if phase == "disk":
        return StartFailure(f"The hub ran out of disk space building this environment: {cause}; try again later, "
                            f"or tell the hub admin{key}", reason="disk", status_code=503, log_message=f"{error}{key}")
    if phase == "base-image":
        return StartFailure(f"The hub's base image is missing: {cause}; tell the hub admin", reason="base-image",
                            status_code=500)
    if phase == "daemon":
        return _docker_failure(error)
    if phase == "registry" and error.unreachable:
        return StartFailure(f"The image registry is unavailable: {cause}; try again in a minute, or tell the hub "
                            "admin if it keeps failing", reason="registry", status_code=503,
                            log_message=f"{error}{key}")
    if phase == "registry-failed":
        return StartFailure(f"The image registry failed: {cause}; tell the hub admin{key}", reason="registry-failed",
                            status_code=503, log_message=str(error))
    if phase == "registry":
        return StartFailure(f"The image registry refused the hub: {cause}; tell the hub admin{key}",
                            reason="registry-refused", status_code=500, log_message=str(error))
    if phase == "config":
        return StartFailure(f"The hub's image settings do not fit together: {cause}; tell the hub admin",
                            reason="config", status_code=500)
    return StartFailure(f"Writing the image failed: {cause}; tell the hub admin{key}", reason="build",
                        status_code=500)


def _docker_failure(error: BaseException) -> StartFailure:
    text = _one_line(error)
    if isinstance(error, docker.errors.APIError) and "device driver" in text and "nvidia" in text.lower():
        return StartFailure("The GPU could not be attached: Docker on this host has no NVIDIA runtime; "
                            "tell the hub admin", reason="gpu-runtime", status_code=500, log_message=text)
    if isinstance(error, docker.errors.APIError):
        return StartFailure(f"Docker refused to start your server: {error.explanation or text}; tell the hub admin",
                            reason="docker", status_code=500, log_message=text)
    return StartFailure("The Docker daemon cannot be reached: try again in a minute, or tell the hub admin",
                        reason="docker-unreachable", status_code=503, log_message=text)


def _check_pip_packages(cause: str) -> str:
    """What a user does about a pip section that did not install: check it; and, where pip had to build
    a package from source and could not (a C library or compiler the image lacks), take the conda package."""
    if _BUILT_FROM_SOURCE.search(cause):
        return ("check the pip: packages of your environment.yml (a package pip must build from source is "
                "often a conda package too: list it under dependencies instead)")
    return "check the pip: packages of your environment.yml"


_BUILT_FROM_SOURCE = re.compile(r"failed to build|failed building wheel|build wheel|metadata-generation-failed|"
                                r"did not run successfully|generating package metadata",
                                re.IGNORECASE)


def log_failure(log: logging.Logger | logging.LoggerAdapter, who: str, failure: StartFailure,
                error: BaseException) -> None:
    """One line per refused or failed start; a traceback only for the unexpected."""
    _quiet_unretrieved_failures()
    if failure.unexpected:
        log.error("Start of %s failed unexpectedly: %s", who, failure.log_message, exc_info=error)
    elif failure.status_code >= 500:
        log.error("Start of %s failed: %s", who, failure.log_message)
    else:
        log.warning("Start of %s refused (%s): %s", who, failure.status_code, failure.log_message)


class _LoggedOnce(logging.Filter):
    """JupyterHub's spawn handler waits a second for a start and leaves it running; a start that
    fails later is a task whose exception no one retrieves, which asyncio logs again at its end,
    with its traceback ("Task exception was never retrieved"). log_failure has logged it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        return not (isinstance(failure, StartFailure) and not failure.unexpected)


def _quiet_unretrieved_failures() -> None:
    logger = logging.getLogger("asyncio")  # where asyncio's default exception handler logs
    if not any(isinstance(existing, _LoggedOnce) for existing in logger.filters):
        logger.addFilter(_LoggedOnce())


def _one_line(value: object, max_chars: int = _MESSAGE_CHARS) -> str:
    return one_line(value, max_chars)
