"""Who a home volume belongs to: a JupyterHub user's stable identity, and the hub's ledger.

A user *name* is not an identity: admins rename users, delete them, and names come back
(a re-created user, a recycled account). So a home volume carries, besides the owner's
name (``io.condaspawner.user``), the owner's identity (``io.condaspawner.user-identity``):
the hub database's user id and the user's creation time (SQLite may give a deleted user's
id to the next user created; the creation time tells them apart).

Docker volume labels cannot change after creation, so what the hub learns later is kept in
a small ledger beside the build cache (one JSON file per volume, named by a hash):

- a volume made by an older hub (name label only) is *adopted* by the first user of that
  name who starts after the upgrade: the ledger records their identity, and any later user
  of that name with another identity is refused;
- a deleted user's volumes are recorded as *orphaned* (``delete_forever``): their data stays,
  but no one is handed them until an admin decides (README, "Owned volumes");
- on a swarm, where the nodes create the volumes and the hub cannot read their labels, each
  home volume name is *claimed* by the first user identity that starts with it, and refused to
  any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .gputable import LABEL_SERVER, LABEL_USER

LABEL_IDENTITY = "io.condaspawner.user-identity"
ADOPTED = "adopted"
ORPHANED = "orphaned"
CLAIMED = "claimed"  # on a swarm: the identity whose servers the nodes made this volume for


def user_identity(user: Any) -> str:
    """``<id>@<created>`` of a JupyterHub user (or its orm row): stable across renames, new for
    a user created again under the same name."""
    created = getattr(user, "created", None)
    return f"{user.id}@{created.isoformat() if created is not None else 'unknown'}"


def server_labels(user: Any, server_name: str) -> dict[str, str]:
    """The labels that name this user's server ``server_name`` on its container or service."""
    return {LABEL_USER: user.name, LABEL_SERVER: server_name, LABEL_IDENTITY: user_identity(user)}


def labels_name_server(labels: Mapping[str, str], user: Any, server_name: str) -> bool:
    """Whether a container's or service's labels name this user's server ``server_name``: by the
    user's name and identity (never a renamed user's server, nor one of a user of that name before)."""
    return ((labels.get(LABEL_USER), labels.get(LABEL_SERVER, "")) == (user.name, server_name)
            and labels.get(LABEL_IDENTITY) == user_identity(user))


class VolumeLedger:
    """What the hub recorded about volumes whose labels cannot say it: adoptions and orphans."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def entry(self, volume: str) -> dict[str, Any] | None:
        """The record of ``volume``, or None when the hub never recorded one."""
        with contextlib.suppress(OSError, ValueError):
            entry = json.loads(self._path(volume).read_text())
            if isinstance(entry, dict) and entry.get("volume") == volume:
                return entry
        return None

    def record(self, volume: str, state: str, user: str, identity: str) -> None:
        """Record ``volume`` as ``state`` (ADOPTED, ORPHANED or CLAIMED) for the user ``identity``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(volume)
        partial = path.with_suffix(".tmp")
        entry = {"volume": volume, "state": state, "user": user, "identity": identity, "time": time.time()}
        partial.write_text(json.dumps(entry))
        os.replace(partial, path)  # a reader never sees half a record

    def _path(self, volume: str) -> Path:
        return self.directory / f"{hashlib.sha256(volume.encode()).hexdigest()}.json"
