"""Notices a user reads on their next spawn page: what happened to their last start or server.

A notice is a small file per (user, server), named by a hash (never by user text), in a
folder that survives hub restarts. A spawn waiting for a GPU posts "the hub restarted while
you waited" before it waits and takes it back when it leaves the queue, so only a hub that
died under it leaves the notice behind: queued spawns never end silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable


class Notices:
    """Per-server notices stored under ``directory``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def post(self, user: str, server_name: str, text: str) -> None:
        """Leave ``text`` for the server's owner (replacing any earlier notice)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(user, server_name)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({"user": user, "server": server_name, "text": text, "time": time.time()}))
        os.replace(partial, path)  # a reader never sees half a notice

    def take(self, user: str, server_name: str) -> str | None:
        """The notice left for this server, removed once read; None if there is none."""
        path = self._path(user, server_name)
        try:
            notice = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return None
        if (notice.get("user"), notice.get("server")) != (user, server_name):
            return None  # a hash collision would need sha256 to break; be exact anyway
        return str(notice.get("text", "")) or None

    def discard(self, user: str, server_name: str) -> None:
        self._path(user, server_name).unlink(missing_ok=True)

    def discard_all(self, user: str, server_names: Iterable[str]) -> None:
        """Remove the notices of the user's servers (a deleted user: not for the next of the name)."""
        for server_name in {"", *server_names}:
            self.discard(user, server_name)

    def _path(self, user: str, server_name: str) -> Path:
        digest = hashlib.sha256(f"{user}\0{server_name}".encode()).hexdigest()
        return self.directory / f"{digest}.json"
