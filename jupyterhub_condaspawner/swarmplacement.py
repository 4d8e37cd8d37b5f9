"""An admin's Swarm placement constraints (``extra_placement_spec``), judged by the hub as Swarm
judges them: where the hub picks a GPU server's node (``gpu_assignment = "hub"``), it must pick
one the service's constraints allow, or Swarm would never place it.

Swarm's constraint syntax: ``KEY==VALUE`` or ``KEY!=VALUE``, values compared without regard to
case (label names with it); a label the node lacks fails ``==`` and passes ``!=``; ``node.ip`` is compared as
an address, or may be a CIDR block (anything else matches no node), and is the address the node reports
(``Status.Addr``: a manager's may be 0.0.0.0).
The keys judged here are Swarm's node attributes (``node.id``, ``node.hostname``, ``node.role``,
``node.ip``, ``node.platform.os``, ``node.platform.arch``, ``node.labels.*``, ``engine.labels.*``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

_CONSTRAINT = re.compile(r"^\s*([\w.\-/]+)\s*(==|!=)\s*(\S.*?)\s*$")  # Swarm refuses an empty value
_NODE_KEYS = ("node.id", "node.hostname", "node.role", "node.ip", "node.platform.os", "node.platform.arch")
_LABEL_PREFIXES = ("node.labels.", "engine.labels.")


def node_attributes(attrs: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """What constraints are judged against, from a node as the manager reports it (``node.ip``: the
    address it reports, ``Status.Addr``, which Swarm's scheduler compares)."""
    address = str((attrs.get("Status") or {}).get("Addr") or "")
    description = attrs.get("Description") or {}
    platform = description.get("Platform") or {}
    spec = attrs.get("Spec") or {}
    pairs = {"node.id": attrs.get("ID", ""), "node.hostname": description.get("Hostname", ""),
             "node.role": spec.get("Role", ""), "node.ip": address, "node.platform.os": platform.get("OS", ""),
             "node.platform.arch": platform.get("Architecture", "")}
    pairs.update((f"node.labels.{key}", value) for key, value in (spec.get("Labels") or {}).items())
    engine = (description.get("Engine") or {}).get("Labels") or {}
    pairs.update((f"engine.labels.{key}", value) for key, value in engine.items())
    return tuple((key, str(value)) for key, value in pairs.items())


def unjudged(constraints: Iterable[str]) -> list[str]:
    """The constraints the hub cannot judge (not ``KEY==VALUE``/``KEY!=VALUE`` of a node attribute)."""
    return [constraint for constraint in constraints if _parse(constraint) is None]


def allows(attributes: Iterable[tuple[str, str]], constraints: Iterable[str]) -> bool:
    """Whether a node with ``attributes`` (:func:`node_attributes`) meets every constraint."""
    known = dict(attributes)
    for constraint in constraints:
        parsed = _parse(constraint)
        if parsed is None:
            return False
        key, operator, value = parsed
        matches = _ip_matches(known.get(key, ""), value) if key == "node.ip" else (
            key in known and known[key].lower() == value.lower())
        if matches is None or matches != (operator == "=="):
            return False
    return True


def _parse(constraint: str) -> tuple[str, str, str] | None:
    match = _CONSTRAINT.match(constraint)
    if match is None:
        return None
    key, operator, value = match.group(1), match.group(2), match.group(3)
    prefix = next((prefix for prefix in _LABEL_PREFIXES if key.lower().startswith(prefix)), None)
    if prefix is not None and len(key) > len(prefix):
        return prefix + key[len(prefix):], operator, value  # label names keep their case
    return (key.lower(), operator, value) if key.lower() in _NODE_KEYS else None


def _ip_matches(actual: str, wanted: str) -> bool | None:
    """Swarm's ``node.ip``: an address compared as an address, a CIDR block by containment; None when
    ``wanted`` is neither (Swarm then places the service on no node, whatever the operator)."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(actual)
    except ValueError:
        address = None
    try:
        return address == ipaddress.ip_address(wanted)
    except ValueError:
        pass
    if "/" not in wanted:
        return None
    try:
        network = ipaddress.ip_network(wanted, strict=False)
    except ValueError:
        return None
    return address is not None and address in network
