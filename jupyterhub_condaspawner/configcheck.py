"""Setting classes the admin meant but misspelled (``c.ImageBuildr.max_images = 3``).

traitlets warns about an unknown setting of a known class, but a config section whose class
name is misspelled is silently never read, by the hub and by ``condaspawner`` alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

# Every configurable class of this package (tests/test_configcheck.py keeps the list whole).
SETTING_CLASSES = (
    "CondaSpawner", "CondaSwarmSpawner", "EnvironmentsPage", "GpuAllocator", "GpuInventory", "ImageBuilder",
    "IsolationMixin", "KubernetesExport", "ProfileCatalog", "Resolver", "SpecPolicy",
)
# Real classes of JupyterHub and DockerSpawner that are near one of ours: never taken as typos.
_OTHERS = frozenset({"Spawner", "DockerSpawner", "SwarmSpawner", "SystemUserSpawner", "LocalProcessSpawner"})


def misspelled_sections(config: Mapping[str, Any]) -> list[str]:
    """One line per config section that is no class but close to one of :data:`SETTING_CLASSES`."""
    lines = []
    for section in config:
        if not section[:1].isupper() or section in SETTING_CLASSES or section in _OTHERS:
            continue
        close = difflib.get_close_matches(section, SETTING_CLASSES, n=1, cutoff=0.8)
        if close:
            lines.append(f"c.{section} is not a setting class, so its settings are ignored: "
                         f"did you mean c.{close[0]}?")
    return lines
