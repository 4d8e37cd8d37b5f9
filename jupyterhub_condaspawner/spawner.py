"""CondaSpawner: DockerSpawner glue over spec, profiles, builder and gpus.

The full spawner (form, progress, GPUs) arrives with the spawner issue; for now it
is a plain DockerSpawner registered under the ``conda`` entry point.
"""

from dockerspawner import DockerSpawner


class CondaSpawner(DockerSpawner):
    """Spawn JupyterLab in a cached image built from a profile or a user's environment.yml."""
