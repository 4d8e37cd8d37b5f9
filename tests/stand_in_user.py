"""What a spawner reads of a JupyterHub user, for spawners run in-process (as KubeSpawner's
tests run its spawner in mock mode)."""

from __future__ import annotations

from jupyterhub.objects import Server


class StandInUser:
    """A user named ``name`` in no groups, with no database row."""

    def __init__(self, name: str):
        self.name = self.escaped_name = name
        self.id = 1
        self.url = f"/user/{name}/"
        self.groups: list = []
        self.server = Server()
        self.orm_user = None
