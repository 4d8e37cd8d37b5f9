"""BuildError: a failed build in one line, and the wording every build message shares.

Docker and registry calls go through :func:`daemon_call` and :func:`registry_call`, which
turn a failure to reach (or a refusal by) the daemon or the registry into a BuildError
that names where and what.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import docker
import requests.exceptions

from . import oneline
from .registry import RegistryError

MESSAGE_CHARS = 300
# A build's summary is the admin's (the hub's log, the CLI): room for a daemon's long socket
# path and its error, or a solver's explanation, which the middle cut would lose.
SUMMARY_CHARS = 1000


class BuildError(Exception):
    """A failed build: ``str(error)`` is a short reason for the user; the full log is kept.

    ``phase``: where it failed (base-image, daemon, solve, install, build, load (Docker refused
    the layers), pip, timeout,
    registry: the registry could not be reached or refused us; registry-failed: it answered
    with a server error (HTTP 500, 507: its storage full, say); config: inconsistent settings;
    disk: a disk filled up: "no space left in FOLDER (needs about N MB)");
    ``cause``: the reason alone, without the phase; ``key``: the build's key, when known;
    ``unreachable``: a channel, index or the Docker daemon could not be reached (worth a retry).
    """

    def __init__(self, message: str, *, phase: str = "build", cause: str = "", key: str = "",
                 unreachable: bool = False):
        super().__init__(message)
        self.phase = phase
        self.cause = cause or message
        self.key = key
        self.unreachable = unreachable

    def summary(self) -> str:
        """One line for logs and the command line: the build's key, the phase in words, the cause."""
        who = f"build {self.key[:16]}" if self.key else "the build"
        return oneline.one_line(f"{who} failed {PHASE_WORDS.get(self.phase, 'writing the image')}: {self.cause}",
                                SUMMARY_CHARS)


# BuildError.phase in words, after "build KEY failed ...".
PHASE_WORDS = {
    "base-image": "looking up the base image",
    "daemon": "talking to the Docker daemon",
    "solve": "solving the environment",
    "install": "downloading or installing the conda packages",
    "build": "writing the image",
    "load": "loading its layers into Docker",
    "pip": "installing the pip: section",
    "timeout": "to finish in time",
    "registry": "at the registry",
    "registry-failed": "at the registry (a server error there)",
    "config": "before it started (the settings do not fit together)",
    "disk": "for want of disk space",
    "internal": "with an error nobody foresaw (a defect: the hub's log has its traceback)",
}


def one_line(value: object) -> str:
    return oneline.one_line(value, MESSAGE_CHARS)


def plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


def megabytes(size: int) -> str:
    return f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"



@contextlib.contextmanager
def registry_call(what: str) -> Iterator[None]:
    """Registry API calls: a RegistryError becomes the one-line BuildError of phase "registry"."""
    try:
        yield
    except RegistryError as error:
        raise BuildError(f"{what}: {error}", phase="registry", cause=str(error),
                         unreachable=error.unreachable) from None



def unanswered(error: BaseException) -> bool:
    """Whether ``error`` says the daemon did not answer (down, hung, unreachable), not that it said no."""
    return (isinstance(error, requests.exceptions.RequestException)
            or (isinstance(error, docker.errors.DockerException) and not isinstance(error, docker.errors.APIError)))


@contextlib.contextmanager
def daemon_call(what: str, where: str = "") -> Iterator[None]:
    """Docker calls whose failure to connect is "the daemon cannot be reached", not a bug."""
    try:
        yield
    except docker.errors.NotFound:
        raise
    except docker.errors.APIError as error:  # the daemon answered: it is reachable, and said no
        where = where or os.environ.get("DOCKER_HOST") or "the default socket"
        raise BuildError(f"the Docker daemon at {where} refused {what}: {one_line(error)}", phase="daemon",
                         cause=f"the Docker daemon at {where} refused {what} ({one_line(error)})") from None
    except (docker.errors.DockerException, requests.exceptions.ConnectionError) as error:
        where = where or os.environ.get("DOCKER_HOST") or "the default socket"
        raise BuildError(f"cannot reach the Docker daemon at {where} ({what}): {one_line(error)}", phase="daemon",
                         cause=f"the Docker daemon at {where} cannot be reached ({one_line(error)})",
                         unreachable=True) from None
