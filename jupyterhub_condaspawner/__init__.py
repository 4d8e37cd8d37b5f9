"""JupyterHub spawner that builds cached conda-environment images and binds GPUs."""

from .spawner import CondaSpawner

__all__ = ["CondaSpawner"]
__version__ = "0.1.0"
