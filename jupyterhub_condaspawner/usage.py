"""Which environments each user started: the record behind the environments page.

The builder knows keys and builds, not people. At every start the spawner records here
``user X used key K`` with the profile, whether the environment was the user's own file,
and the spec's text (what "start again" and the exact environment.yml need). One small
JSON file per user, named by a hash of the name (never user text in a path), written whole
and renamed: a reader never sees half of it; writers (a user's servers starting at once,
in any hub process) take turns on a lock file beside it, so none loses another's entry. It survives hub restarts with the build cache.
A marker file (``.since``) says when the record began: who started an image made before then
is not known.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SINCE = ".since"


@dataclass(frozen=True)
class Use:
    """One environment a user started: ``own`` is True for their own environment.yml."""

    user: str
    key: str
    profile: str
    own: bool
    name: str
    spec: str  # the normalised environment.yml text
    first_used: float
    last_used: float
    identity: str = ""  # the user's id@created (owners.user_identity); "" in records of older hubs


class UsageLog:
    """Per-user records of the environment keys each user started, under ``directory``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        with contextlib.suppress(OSError):  # a read-only cache: since() says None
            self.directory.mkdir(parents=True, exist_ok=True)
            if not (self.directory / SINCE).exists():  # once: a hub restart keeps the first time
                (self.directory / SINCE).touch()

    def since(self) -> float | None:
        """When this record began (epoch seconds), or None if it cannot tell."""
        try:
            return (self.directory / SINCE).stat().st_mtime
        except OSError:
            return None

    def record(self, user: str, key: str, *, profile: str, own: bool, name: str, spec: str,
               identity: str = "") -> None:
        """Record that ``user`` (``identity``) started the environment ``key`` now (an earlier use
        keeps its first time). Entries of another user who had this name stay, unseen by this one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(user)
        with path.with_name(f".{path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
            now = time.time()
            others = [use for use in self._read(path, user) if not _same_user(use, identity)]
            uses = {use.key: use for use in self.uses(user, identity)}
            first = uses[key].first_used if key in uses else now
            uses[key] = Use(user, key, profile, own, name, spec, first, now, identity)
            handle, partial = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.")
            try:
                with os.fdopen(handle, "w") as out:
                    os.fchmod(out.fileno(), 0o644)  # as written directly: the admin's CLI reads it too
                    out.write(json.dumps([asdict(use) for use in [*others, *uses.values()]], indent=1))
                os.replace(partial, path)
            finally:
                Path(partial).unlink(missing_ok=True)

    def uses(self, user: str, identity: str | None = None) -> list[Use]:
        """The user's environments, the most recently started first; with ``identity``, only
        theirs (not those of a deleted or renamed user who had this name before)."""
        uses = self._read(self._path(user), user)
        return uses if identity is None else [use for use in uses if _same_user(use, identity)]

    def forget(self, user: str) -> None:
        """Remove the record of ``user`` (a deleted user): the next user of the name starts afresh."""
        path = self._path(user)
        path.unlink(missing_ok=True)
        path.with_name(f".{path.name}.lock").unlink(missing_ok=True)

    def all_uses(self) -> list[Use]:
        """Every user's environments, the most recently started first."""
        uses = [use for path in self.directory.glob("*.json") for use in self._read(path, None)]
        return sorted(uses, key=lambda use: use.last_used, reverse=True)

    def previous_own(self, user: str, key: str, identity: str | None = None) -> Use | None:
        """The user's own environment started before ``key`` was first started, or None."""
        uses = {use.key: use for use in self.uses(user, identity)}
        current = uses.get(key)
        if current is None or not current.own:
            return None
        earlier = [use for use in uses.values() if use.own and use.key != key
                   and use.first_used <= current.first_used]
        return max(earlier, key=lambda use: use.first_used, default=None)

    def _read(self, path: Path, user: str | None) -> list[Use]:
        with contextlib.suppress(OSError, ValueError, TypeError):
            uses = [Use(**entry) for entry in json.loads(path.read_text())]
            # The name is checked too: a file is found by a hash of it.
            return sorted((use for use in uses if user is None or use.user == user),
                          key=lambda use: use.last_used, reverse=True)
        return []

    def _path(self, user: str) -> Path:
        return self.directory / f"{hashlib.sha256(user.encode()).hexdigest()}.json"


def _same_user(use: Use, identity: str) -> bool:
    """Whether ``use`` is of the user ``identity``: entries of an older hub (no identity) are
    taken as the name's current user's."""
    return not use.identity or not identity or use.identity == identity
