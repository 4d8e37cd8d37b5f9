"""What an environment's lock says: exact environment.yml, and what changed between two locks.

Inputs are the ``packages`` of a lock (``lock.json`` in the builder's key folder: name,
version, build, url, sha256). Versions compare as conda compares them (py-rattler's Version).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from rattler import Version

from .specmodel import EnvironmentSpec

_PACKAGE_KINDS = ("added", "removed", "upgraded", "downgraded", "rebuilt")


@dataclass
class Diff:
    """Packages added, removed, upgraded and downgraded (``rebuilt``: same version, other build); the
    pip section's requirements added and removed, and the names of the ``variables`` that changed
    (neither is in the conda lock: they come from the two specs)."""

    added: list[dict[str, str]] = field(default_factory=list)
    removed: list[dict[str, str]] = field(default_factory=list)
    upgraded: list[dict[str, str]] = field(default_factory=list)
    downgraded: list[dict[str, str]] = field(default_factory=list)
    rebuilt: list[dict[str, str]] = field(default_factory=list)
    pip_added: list[str] = field(default_factory=list)
    pip_removed: list[str] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not any(self.as_dict().values())

    def as_dict(self) -> dict[str, list[Any]]:
        return {"added": self.added, "removed": self.removed, "upgraded": self.upgraded,
                "downgraded": self.downgraded, "rebuilt": self.rebuilt, "pip_added": self.pip_added,
                "pip_removed": self.pip_removed, "variables": self.variables}

    def summary(self, limit: int = 4) -> str:
        """One line: "2 upgraded (numpy 1.26.4 -> 2.0.0, ...), 1 added (rich 13.7); pip: 1 added (six)"."""
        packages = [_kind_text(kind, [_change_text(change) for change in getattr(self, kind)], limit)
                    for kind in _PACKAGE_KINDS if getattr(self, kind)]
        pip = [_kind_text(kind, changes, limit)
               for kind, changes in (("added", self.pip_added), ("removed", self.pip_removed)) if changes]
        parts = [*packages, *(["pip: " + ", ".join(pip)] if pip else []),
                 *([f"variables changed ({_listed(self.variables, limit)})"] if self.variables else [])]
        return "; ".join(parts) or "no package changed"


def spec_changes(result: Diff, old_spec: EnvironmentSpec, new_spec: EnvironmentSpec) -> Diff:
    """``result`` with what changed from the ``old`` spec's pip section and variables to the ``new`` one's."""
    old_pip, new_pip = set(old_spec.pip), set(new_spec.pip)
    # shown without their --hash options (64 hex digits each): the requirement says which changed
    result.pip_added = sorted(requirement.split(" --hash", 1)[0] for requirement in new_pip - old_pip)
    result.pip_removed = sorted(requirement.split(" --hash", 1)[0] for requirement in old_pip - new_pip)
    old_variables, new_variables = dict(old_spec.variables), dict(new_spec.variables)
    result.variables = sorted(name for name in set(old_variables) | set(new_variables)
                              if old_variables.get(name) != new_variables.get(name))
    return result


def diff(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> Diff:
    """What changed from the ``old`` lock's packages to the ``new`` one's."""
    before = {package["name"]: package for package in old}
    after = {package["name"]: package for package in new}
    result = Diff()
    for name in sorted(set(before) | set(after)):
        if name not in before:
            result.added.append({"name": name, "version": after[name]["version"]})
        elif name not in after:
            result.removed.append({"name": name, "version": before[name]["version"]})
        else:
            was, now = before[name], after[name]
            change = {"name": name, "from": was["version"], "to": now["version"]}
            if Version(now["version"]) > Version(was["version"]):
                result.upgraded.append(change)
            elif Version(now["version"]) < Version(was["version"]):
                result.downgraded.append(change)
            elif now.get("build") != was.get("build"):
                result.rebuilt.append({**change, "from": f"{was['version']} {was.get('build', '')}",
                                       "to": f"{now['version']} {now.get('build', '')}"})
    return result


def exact_environment_yml(lock: dict[str, Any], spec_text: str = "", name: str = "",
                          default_channels: list[str] | None = None) -> str:
    """An environment.yml pinning every conda package of ``lock`` to its version and build.

    Channels are names conda knows elsewhere: the spec's, else ``default_channels`` (the
    hub's, which solved a spec that lists none); the lock's URLs only when neither is known
    (they can be the hub's own mirror or local folders). A ``pip:`` section and ``variables:``
    are kept as the spec wrote them (neither is in the conda lock; conda sets the variables
    when the environment is activated). A spec that is not YAML (a damaged record) adds nothing.
    """
    try:
        spec = yaml.safe_load(spec_text) if spec_text else {}
    except yaml.YAMLError:
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    channels = spec.get("channels") or list(default_channels or []) or list(lock.get("channels", []))
    dependencies: list[Any] = [f"{package['name']}={package['version']}={package['build']}"
                               for package in lock.get("packages", [])]
    pip = [entry["pip"] for entry in spec.get("dependencies") or [] if isinstance(entry, dict) and "pip" in entry]
    if pip and pip[0]:
        dependencies.append({"pip": list(pip[0])})
    document: dict[str, Any] = {}
    if name or spec.get("name"):
        document["name"] = name or spec["name"]
    document["channels"] = channels
    document["dependencies"] = dependencies
    if isinstance(spec.get("variables"), dict) and spec["variables"]:
        document["variables"] = dict(spec["variables"])
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _kind_text(kind: str, shown: list[str], limit: int) -> str:
    return f"{len(shown)} {kind} ({_listed(shown, limit)})"


def _listed(shown: list[str], limit: int) -> str:
    more = f", {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def _change_text(change: dict[str, str]) -> str:
    if "from" in change:
        return f"{change['name']} {change['from']} -> {change['to']}"
    return f"{change['name']} {change['version']}"
