"""What parsing an environment file produces, and the limits it applies.

:class:`SpecError` (a refusal: one line for the user, every problem in it),
:class:`EnvironmentSpec` (an accepted environment in canonical form, and its key),
:class:`SpecLimits` (SpecPolicy's values that one parse reads), and :func:`show` and
:func:`printable`, which quote a user's text for a message.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

import yaml

SHOWN_CHARS = 60


class SpecError(ValueError):
    """A refused environment file: ``str(error)`` is one line for the user.

    One refusal may hold several problems (``problems``, each a SpecError naming its
    field): the file's every problem at once, up to ``SpecPolicy.max_problems``;
    ``omitted`` counts those past the cap.
    """

    def __init__(self, reason: str, *, field: str | None = None, source: str | None = None,
                 problems: Sequence[SpecError] = (), omitted: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.source = source
        self.problems: list[SpecError] = list(problems) or [self]
        self.omitted = omitted

    @classmethod
    def combine(cls, problems: Sequence[SpecError], cap: int) -> SpecError:
        """One refusal for ``problems`` (at least one), keeping the first ``cap`` of them."""
        if len(problems) == 1:
            return problems[0]
        kept = list(problems[:max(cap, 1)])
        return cls(kept[0].reason, field=kept[0].field, problems=kept, omitted=len(problems) - len(kept))

    @property
    def details(self) -> list[str]:
        """One line per problem (field and reason, without the file name); a last line counts the omitted."""
        lines = [problem._own_detail for problem in self.problems]
        if self.omitted:
            lines.append(f"... and {self.omitted} more problem{'s' if self.omitted > 1 else ''}")
        return lines

    @property
    def _own_detail(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason

    @property
    def detail(self) -> str:
        """Every problem on one line (``; `` between them), without the file name."""
        return "; ".join(self.details)

    @property
    def count(self) -> int:
        """How many problems the file has (reported and omitted)."""
        return len(self.problems) + self.omitted

    def __str__(self) -> str:
        detail = f"{self.count} problems: {self.detail}" if self.count > 1 else self.detail
        return f"{self.source}: {detail}" if self.source else detail


def show(value: object, limit: int = SHOWN_CHARS) -> str:
    """Quote a user's value for an error message: one line, truncated."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def printable(text: str) -> str:
    """A user's key or entry for a note: printable characters only (no line or paragraph
    separator either: splitlines() ends a line there), truncated."""
    cleaned = "".join("?" if unicodedata.category(char)[0] == "C" or unicodedata.category(char) in ("Zl", "Zp")
                      else char for char in text)
    return cleaned if len(cleaned) <= SHOWN_CHARS else cleaned[:SHOWN_CHARS] + "..."


@dataclass(frozen=True)
class EnvironmentSpec:
    """A validated environment in canonical form.

    ``channels`` keep their order (it changes the solve); ``conda`` and ``pip`` are
    canonical, deduplicated and sorted; ``name`` is informational and not part of
    the key.
    """

    channels: tuple[str, ...] = ()
    conda: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    variables: tuple[tuple[str, str], ...] = ()
    name: str | None = field(default=None, compare=False)
    # What was accepted but ignored (unknown top-level keys): shown to the user, not in the key.
    notes: tuple[str, ...] = field(default=(), compare=False)

    def normalized(self) -> dict:
        """The canonical, JSON-serialisable form that the key is computed over."""
        return {
            "channels": list(self.channels),
            "conda": list(self.conda),
            "pip": list(self.pip),
            "variables": dict(self.variables),
        }

    def normalized_json(self) -> str:
        return json.dumps(self.normalized(), sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """sha256 hex of the normalised form: same environment, same key."""
        return hashlib.sha256(self.normalized_json().encode()).hexdigest()

    def to_yaml(self, name: str | None = None) -> str:
        """The normalised spec as an ``environment.yml`` (what goes into a build context)."""
        dependencies: list = list(self.conda)
        if self.pip:
            dependencies.append({"pip": list(self.pip)})
        document: dict = {}
        if name or self.name:
            document["name"] = name or self.name
        document["channels"] = list(self.channels)
        document["dependencies"] = dependencies
        if self.variables:
            document["variables"] = dict(self.variables)
        return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)

    @classmethod
    def from_normalized(cls, data: dict, name: str | None = None) -> "EnvironmentSpec":
        """Rebuild a spec from :meth:`normalized` output (already validated)."""
        return cls(
            channels=tuple(data["channels"]),
            conda=tuple(data["conda"]),
            pip=tuple(data["pip"]),
            variables=tuple(sorted(data["variables"].items())),
            name=name,
        )


@dataclass(frozen=True)
class SpecLimits:
    """The policy one parse applies: SpecPolicy's settings, read once per file."""

    max_dependencies: int
    max_spec_length: int
    max_name_length: int
    max_problems: int
    allowed_channels: tuple[str, ...]
