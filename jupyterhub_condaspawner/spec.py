"""EnvironmentSpec: parse, validate and normalise a user's conda ``environment.yml``.

Everything a user uploads passes through :func:`SpecPolicy.parse`. It either returns
an :class:`EnvironmentSpec` in canonical form or raises :class:`SpecError` whose
message is one line naming the field (and YAML line) that was refused.

Conda dependencies are parsed by py-rattler's ``MatchSpec`` and pip requirements by
``packaging``; this module only adds what those parsers do not check (control
characters, lengths, channel and pip policy).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterator

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from rattler import Channel, MatchSpec
from traitlets import Integer, List, Unicode
from traitlets.config import Configurable

DEFAULT_CHANNELS = ["conda-forge", "pytorch", "nvidia", "bioconda", "defaults", "nodefaults"]
TOP_LEVEL_KEYS = ("name", "channels", "dependencies", "variables", "prefix")
# MatchSpec's default channel alias: a spec's channel that lives elsewhere was given as
# a URL or a path, not as a name.
_ANACONDA_ALIAS = "https://conda.anaconda.org/"
# Characters that mean nothing in either grammar but a lot to a shell. The parsers
# catch most of them already; this check makes the message say why.
_SHELL_CHARS_CONDA = set("`$&;\\")
_SHELL_CHARS_PIP = set("`$&\\")
_LABEL = re.compile(r"[A-Za-z0-9_.-]+\Z")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VCS_PREFIXES = ("git+", "hg+", "svn+", "bzr+")
_SHOWN_CHARS = 60
_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
# What `defaults` stands for: allowing `defaults` allows naming its members directly.
_DEFAULTS_MEMBERS = ("pkgs/main", "pkgs/r")


class SpecError(ValueError):
    """A refused environment file: ``str(error)`` is one line for the user."""

    def __init__(self, reason: str, *, field: str | None = None, source: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.source = source

    @property
    def detail(self) -> str:
        """The reason prefixed by the field it concerns, without the file name."""
        return f"{self.field}: {self.reason}" if self.field else self.reason

    def __str__(self) -> str:
        return f"{self.source}: {self.detail}" if self.source else self.detail


def show(value: object, limit: int = _SHOWN_CHARS) -> str:
    """Quote a user's value for an error message: one line, truncated."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


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


class _Refused(Exception):
    """Raised inside the YAML loader; carries the mark of the offending node."""

    def __init__(self, reason: str, mark: yaml.Mark | None):
        super().__init__(reason)
        self.reason = reason
        self.mark = mark


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases, explicit tags, duplicate keys and deep nesting.

    Refusing aliases outright defeats "billion laughs" before any expansion happens.
    """

    def __init__(self, stream: str, max_depth: int):
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused("YAML anchors and aliases (&name, *name) are not allowed", event.start_mark)
        if getattr(event, "tag", None) is not None:
            raise _Refused(f"YAML tags are not allowed ({show(event.tag)})", event.start_mark)
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise _Refused(f"YAML nesting deeper than {self._max_depth} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise _Refused(f"duplicate key {show(key_node.value)}", key_node.start_mark)
                seen.add(key_node.value)
        return node


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class SpecPolicy(Configurable):
    """Limits and policy applied to every environment.yml (users' and profiles')."""

    max_file_bytes = Integer(
        256 * 1024,
        config=True,
        help="""Largest environment.yml accepted, in bytes.

        c.SpecPolicy.max_file_bytes = 512 * 1024
        """,
    )
    max_dependencies = Integer(
        1000,
        config=True,
        help="""Most dependencies (conda and pip together) one environment may list.

        c.SpecPolicy.max_dependencies = 2000
        """,
    )
    max_spec_length = Integer(
        200,
        config=True,
        help="""Longest single dependency line, in characters.

        c.SpecPolicy.max_spec_length = 300
        """,
    )
    max_name_length = Integer(
        100,
        config=True,
        help="""Longest package name, environment name or variable name, in characters.

        c.SpecPolicy.max_name_length = 128
        """,
    )
    max_yaml_depth = Integer(
        10,
        config=True,
        help="""Deepest YAML nesting accepted (an environment.yml needs 5).

        c.SpecPolicy.max_yaml_depth = 10
        """,
    )
    allowed_channels = List(
        Unicode(),
        default_value=list(DEFAULT_CHANNELS),
        config=True,
        help="""Conda channel names users may list, in `channels:` or as `channel::package`.

        Only names: URLs and file paths are always refused. Names resolve under the
        resolver's channel alias (conda-forge, or a mirror).

        c.SpecPolicy.allowed_channels = ["conda-forge", "nodefaults", "my-lab"]
        """,
    )

    def parse(self, data: str | bytes, source: str | None = None) -> EnvironmentSpec:
        """Validate and normalise an environment file; raise SpecError on any problem."""
        try:
            document = self._load_yaml(self._decode(data))
            return self._build_spec(document)
        except SpecError as error:
            error.source = source
            raise

    def parse_mapping(self, mapping: dict, source: str | None = None) -> EnvironmentSpec:
        """Validate an environment given as an already-loaded mapping (inline in a profile)."""
        try:
            text = yaml.safe_dump(mapping)
        except yaml.YAMLError as error:
            raise SpecError(f"not a plain YAML mapping ({error.__class__.__name__})", source=source)
        return self.parse(text, source)

    # -- reading ---------------------------------------------------------------

    def _decode(self, data: str | bytes) -> str:
        if isinstance(data, str):
            size = len(data.encode("utf-8", "surrogatepass"))
        else:
            size = len(data)
        if size > self.max_file_bytes:
            raise SpecError(f"file is {size} bytes, larger than the limit of {self.max_file_bytes}")
        if isinstance(data, bytes):
            if data.startswith(_UTF16_32_BOMS):
                raise SpecError("file is UTF-16 or UTF-32; save it as UTF-8")
            if b"\x00" in data:
                raise SpecError("file contains NUL bytes: not a text file")
            try:
                data = data.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                raise SpecError(f"file is not UTF-8 (invalid byte at offset {error.start})")
        if "\x00" in data:
            raise SpecError("file contains NUL characters: not a text file")
        if any(0xD800 <= ord(char) <= 0xDFFF for char in data):
            raise SpecError("file contains unpaired surrogates: not valid UTF-8")
        return data.lstrip("\ufeff")

    def _load_yaml(self, text: str) -> yaml.MappingNode:
        loader = _StrictLoader(text, self.max_yaml_depth)
        try:
            node = loader.get_single_node()
        except _Refused as refused:
            where = f"line {refused.mark.line + 1}: " if refused.mark else ""
            raise SpecError(where + refused.reason)
        except yaml.MarkedYAMLError as error:
            raise SpecError(_describe_yaml_error(error))
        except yaml.YAMLError as error:
            raise SpecError("invalid YAML: " + str(error).splitlines()[0])
        finally:
            loader.dispose()
        if node is None:
            raise SpecError("file is empty")
        if not isinstance(node, yaml.MappingNode):
            raise SpecError(f"line {_line(node)}: the top level must be a mapping (name:, channels:, dependencies:)")
        return node

    # -- validating --------------------------------------------------------------

    def _build_spec(self, document: yaml.MappingNode) -> EnvironmentSpec:
        sections = self._top_level_sections(document)
        channels = self._channels(sections.get("channels"))
        conda, pip = self._dependencies(sections.get("dependencies"))
        if len(conda) + len(pip) > self.max_dependencies:
            raise SpecError(
                f"{len(conda) + len(pip)} entries, more than the limit of {self.max_dependencies}",
                field="dependencies",
            )
        return EnvironmentSpec(
            channels=tuple(dict.fromkeys(channels)),
            conda=tuple(sorted(set(conda))),
            pip=tuple(sorted(set(pip))),
            variables=tuple(sorted(self._variables(sections.get("variables")).items())),
            name=self._name(sections.get("name")),
        )

    def _top_level_sections(self, document: yaml.MappingNode) -> dict[str, yaml.Node]:
        sections = {}
        for key_node, value_node in document.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in TOP_LEVEL_KEYS:
                hint = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise SpecError(
                    f"line {_line(key_node)}: unknown key {show(key if key is not None else 'complex key')}"
                    f"{suggestion}; allowed: {', '.join(TOP_LEVEL_KEYS)}"
                )
            sections[key] = value_node
        return sections

    def _name(self, node: yaml.Node | None) -> str | None:
        if node is None or _is_null(node):
            return None
        text = self._scalar_text(node, "name")
        self._check_length(text, self.max_name_length, "name", node)
        return text

    def _channels(self, node: yaml.Node | None) -> list[str]:
        channels = []
        for index, item in self._sequence(node, "channels"):
            where = f"channels[{index}]"
            channel = self._scalar_text(item, where)
            self._check_length(channel, self.max_name_length, where, item)
            channels.append(self._allowed_channel(channel, where, item))
        return channels

    def _allowed_channel(self, channel: str, where: str, node: yaml.Node | None) -> str:
        if self._is_allowed_channel(channel):
            return channel
        if "://" in channel or channel.startswith(("/", ".", "~", "file:")) or "\\" in channel:
            kind = "a URL or a path"
        else:
            kind = "not an allowed channel"
        raise SpecError(
            f"{show(channel)} is {kind}; allowed channels: {', '.join(self.allowed_channels)}",
            field=_at(where, node),
        )

    def _is_allowed_channel(self, channel: str) -> bool:
        """An allowed name, a label of one (`conda-forge/label/dev`), or a member of `defaults`."""
        owner, is_label, label = channel.partition("/label/")
        if is_label:
            return owner in self.allowed_channels and bool(_LABEL.match(label))
        if channel in self.allowed_channels:
            return True
        return channel in _DEFAULTS_MEMBERS and "defaults" in self.allowed_channels

    def _dependencies(self, node: yaml.Node | None) -> tuple[list[str], list[str]]:
        conda: list[str] = []
        pip: list[str] | None = None
        for index, item in self._sequence(node, "dependencies"):
            where = f"dependencies[{index}]"
            if isinstance(item, yaml.MappingNode):
                if pip is not None:
                    raise SpecError("a second 'pip:' section; merge them into one", field=_at(where, item))
                pip = self._pip_section(item, where)
            else:
                conda.append(self._conda_spec(self._scalar_text(item, where), where, item))
        return conda, pip or []

    def _pip_section(self, node: yaml.MappingNode, where: str) -> list[str]:
        if len(node.value) != 1 or getattr(node.value[0][0], "value", None) != "pip":
            keys = ", ".join(show(getattr(k, "value", "?")) for k, _ in node.value)
            raise SpecError(f"only a 'pip:' list may appear here, found {keys}", field=_at(where, node))
        requirements = []
        for index, item in self._sequence(node.value[0][1], f"{where}.pip"):
            item_where = f"{where}.pip[{index}]"
            requirements.append(self._pip_requirement(self._scalar_text(item, item_where), item_where, item))
        return requirements

    def _variables(self, node: yaml.Node | None) -> dict[str, str]:
        if node is None or _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise SpecError("must be a mapping of NAME: value", field=_at("variables", node))
        variables = {}
        for key_node, value_node in node.value:
            name = self._scalar_text(key_node, "variables")
            where = f"variables.{name}"
            if not _VARIABLE_NAME.match(name) or len(name) > self.max_name_length:
                raise SpecError(f"{show(name)} is not a valid environment variable name", field=_at("variables", key_node))
            value = "" if _is_null(value_node) else self._scalar_text(value_node, where)
            _check_printable(value, where, value_node)
            self._check_length(value, self.max_spec_length, where, value_node)
            variables[name] = value
        return variables

    # -- one entry -------------------------------------------------------------

    def _conda_spec(self, text: str, where: str, node: yaml.Node) -> str:
        self._check_entry_text(text, where, node, _SHELL_CHARS_CONDA)
        try:
            match_spec = MatchSpec(text)
        except Exception as error:  # py-rattler raises its own exception types
            raise SpecError(
                f"{show(text)} is not a valid conda spec (MatchSpec: {_first_line(error)})",
                field=_at(where, node),
            )
        if match_spec.name is None:
            raise SpecError(f"{show(text)} names no package", field=_at(where, node))
        self._check_length(match_spec.name.normalized, self.max_name_length, where, node)
        if match_spec.channel is not None:
            self._check_spec_channel(match_spec.channel, text, where, node)
        return str(match_spec)

    def _check_spec_channel(self, channel: Channel, text: str, where: str, node: yaml.Node) -> None:
        if channel.name is None or channel.base_url != f"{_ANACONDA_ALIAS}{channel.name}/":
            raise SpecError(
                f"{show(text)} names its channel by URL or path; use a channel name "
                f"({', '.join(self.allowed_channels)})",
                field=_at(where, node),
            )
        self._allowed_channel(channel.name, where, node)

    def _pip_requirement(self, text: str, where: str, node: yaml.Node) -> str:
        self._check_entry_text(text, where, node, _SHELL_CHARS_PIP)
        refusal = _pip_policy_refusal(text)
        if refusal:
            raise SpecError(f"{show(text)}: {refusal}", field=_at(where, node))
        if _EMPTY_OPERATOR.search(text.split(";", 1)[0]):
            raise SpecError(f"{show(text)} has an operator with no version", field=_at(where, node))
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            hint = " (pip pins with '==', not '=')" if re.search(r"[^=<>!~]=[^=]", text) else ""
            raise SpecError(
                f"{show(text)} is not a valid pip requirement (packaging: {_first_line(error)}){hint}",
                field=_at(where, node),
            )
        if requirement.url:
            raise SpecError(f"{show(text)}: direct URL references are not allowed", field=_at(where, node))
        if any(not spec.version for spec in requirement.specifier):
            raise SpecError(f"{show(text)} has an operator with no version", field=_at(where, node))
        self._check_length(requirement.name, self.max_name_length, where, node)
        requirement.name = canonicalize_name(requirement.name)
        requirement.extras = {canonicalize_name(extra) for extra in requirement.extras}
        return str(requirement)

    def _check_entry_text(self, text: str, where: str, node: yaml.Node, shell_chars: set[str]) -> None:
        _check_printable(text, where, node)
        shell = next((char for char in text if char in shell_chars), None)
        if shell is not None:
            raise SpecError(f"{show(text)} contains the shell character {shell!r}", field=_at(where, node))
        self._check_length(text, self.max_spec_length, where, node)
        if not text.strip():
            raise SpecError("empty entry", field=_at(where, node))

    # -- YAML shapes -------------------------------------------------------------

    def _sequence(self, node: yaml.Node | None, where: str) -> Iterator[tuple[int, yaml.Node]]:
        if node is None or _is_null(node):
            return iter(())
        if not isinstance(node, yaml.SequenceNode):
            raise SpecError("must be a list (one '- item' per line)", field=_at(where, node))
        return enumerate(node.value)

    def _scalar_text(self, node: yaml.Node, where: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or _is_null(node):
            kind = "an empty entry" if _is_null(node) else "a nested list or mapping"
            raise SpecError(f"expected text, found {kind}", field=_at(where, node))
        return node.value.strip()

    def _check_length(self, text: str, limit: int, where: str, node: yaml.Node | None) -> None:
        if len(text) > limit:
            raise SpecError(f"{show(text)} is {len(text)} characters, longer than {limit}", field=_at(where, node))


def _check_printable(text: str, where: str, node: yaml.Node) -> None:
    control = next((char for char in text if unicodedata.category(char)[0] == "C"), None)
    if control is not None:
        raise SpecError(
            f"{show(text)} contains a control or invisible character (U+{ord(control):04X})",
            field=_at(where, node),
        )


# A version operator with no version after it. Whether packaging accepts `requests===`
# (arbitrary equality with an empty string) depends on its release: refuse it here.
_EMPTY_OPERATOR = re.compile(r"(===|==|!=|~=|<=|>=|<|>)\s*(?=,|\)|$)")


def _pip_policy_refusal(text: str) -> str | None:
    """Why a pip line is refused before parsing, or None: options, URLs, VCS and paths."""
    requirement_part = text.split(";", 1)[0]
    if re.search(r"(^|\s)-", requirement_part):
        return "pip options (-e, -r, --index-url, --extra-index-url, --find-links, ...) are not allowed"
    if "://" in requirement_part or requirement_part.startswith(_VCS_PREFIXES):
        return "URLs and version-control references are not allowed; name a package from the index"
    if requirement_part.startswith((".", "/", "~")) or "/" in requirement_part or "\\" in requirement_part:
        return "local paths are not allowed; name a package from the index"
    return None


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _at(where: str, node: yaml.Node | None) -> str:
    return f"{where} (line {_line(node)})" if node is not None else where


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else error.__class__.__name__


def _describe_yaml_error(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = error.problem or error.context or "syntax error"
    return f"invalid YAML{where}: {problem}"


def parse_environment(data: str | bytes, source: str | None = None, policy: SpecPolicy | None = None) -> EnvironmentSpec:
    """Parse an environment.yml with ``policy`` (default limits when None)."""
    return (policy or SpecPolicy()).parse(data, source)
