"""JupyterHub spawner that builds cached conda-environment images and binds GPUs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spawner import CondaSpawner

__all__ = ["CondaSpawner"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The spawner pulls in JupyterHub, DockerSpawner, SQLAlchemy and tornado: import it
    # only when asked for, so the `condaspawner` command starts fast.
    if name == "CondaSpawner":
        from .spawner import CondaSpawner

        return CondaSpawner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
