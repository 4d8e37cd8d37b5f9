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
from typing import Callable, Iterator, Sequence, TypeVar

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from rattler import Channel, MatchSpec
from traitlets import Float, Integer, List, Unicode
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
# How close an unknown top-level key must be to a known one to be a typo (difflib's
# ratio: `dependancies` 0.92, `channel` 0.93; `platforms`, `category`, `extras` < 0.4).
_KEY_TYPO_CUTOFF = 0.8
_CHANNEL_TYPO_CUTOFF = 0.8
# What conda accepts as a build string (with `*` globs); MatchSpec takes anything.
_BUILD_STRING = re.compile(r"[A-Za-z0-9_.+*]*[A-Za-z0-9_*][A-Za-z0-9_.+*]*\Z")
# Plain YAML scalars that are not text: `- 3.10` is the float 3.1, `- 42` an int.
_NON_TEXT_TAGS = {
    "tag:yaml.org,2002:int": "the number",
    "tag:yaml.org,2002:float": "the number",
    "tag:yaml.org,2002:bool": "true/false",
}
# Packages that exist only for Windows: their presence marks a Windows `conda env export`.
_WINDOWS_ONLY = frozenset({"vc", "vc14_runtime", "vs2015_runtime", "ucrt", "pywin32", "pywinpty", "winpty",
                           "wincertstore", "win_inet_pton", "menuinst-win"})
_WINDOWS_ONLY_PREFIXES = ("vs20", "m2w64-", "m2-")
# pip's hash option on a requirement line, as `pip-compile --generate-hashes` writes it.
_PIP_HASH = re.compile(r"\s+--hash[=\s]\s*(\S+)")
_PIP_HASH_VALUE = re.compile(r"(sha256|sha384|sha512):([0-9a-fA-F]+)\Z")
# PyTorch's own wheel index and the local version labels only it serves (`2.0.1+cu118`).
_PYTORCH_INDEX = re.compile(r"download\.pytorch\.org/whl/(?:nightly/)?(cu\d+|cpu|rocm[\d.]+)?")
_PYTORCH_LABEL = re.compile(r"cu\d{3,}|cpu|rocm[\d.]+\Z")
_PYTORCH_CHANNELS_HINT = ("install PyTorch with conda instead: channels pytorch and nvidia, "
                          "dependencies pytorch{cuda}")


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
    max_problems = Integer(
        20,
        config=True,
        help="""Most problems one refused file reports (the rest are counted).

        c.SpecPolicy.max_problems = 50
        """,
    )
    precheck_timeout = Float(
        20,
        config=True,
        help="""Seconds the spawner may spend solving a user's own environment before it accepts
        the spawn (and `condaspawner validate --solve` per file). One that cannot be solved is
        refused at once, with the solver's reason; past this time the spawn goes on and the
        build reports. 0 turns the pre-check off.

        c.SpecPolicy.precheck_timeout = 30
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
        problems: list[SpecError] = []
        notes: list[str] = []
        sections = self._top_level_sections(document, problems, notes)
        no_channels: list[str] = []
        no_dependencies: tuple[list[tuple[str, MatchSpec]], list[str]] = ([], [])
        no_variables: dict[str, str] = {}
        channels = _collected(problems, lambda: self._channels(sections.get("channels"), problems), no_channels)
        conda, pip = _collected(
            problems, lambda: self._dependencies(sections.get("dependencies"), problems), no_dependencies)
        variables = _collected(problems, lambda: self._variables(sections.get("variables"), problems), no_variables)
        name = _collected(problems, lambda: self._name(sections.get("name")), None)
        if len(conda) + len(pip) > self.max_dependencies:
            problems.append(SpecError(
                f"{len(conda) + len(pip)} entries, more than the limit of {self.max_dependencies}",
                field="dependencies",
            ))
        if problems:
            raise SpecError.combine(problems, self.max_problems)
        return EnvironmentSpec(
            channels=tuple(dict.fromkeys(channels)),
            conda=tuple(sorted(set(text for text, _ in conda))),
            pip=tuple(sorted(set(pip))),
            variables=tuple(sorted(variables.items())),
            name=name,
            notes=tuple(notes),
        )

    def _top_level_sections(self, document: yaml.MappingNode, problems: list[SpecError],
                            notes: list[str]) -> dict[str, yaml.Node]:
        """The known sections. A likely typo of a known key is a problem; any other
        unknown key is ignored, as conda does, and named in a note."""
        sections = {}
        ignored = []
        for key_node, value_node in document.value:
            if not isinstance(key_node, yaml.ScalarNode) or _is_null(key_node):
                problems.append(SpecError(f"line {_line(key_node)}: a top-level key must be a plain name; "
                                          f"known keys: {', '.join(TOP_LEVEL_KEYS)}"))
                continue
            key = key_node.value
            if key in TOP_LEVEL_KEYS:
                sections[key] = value_node
                continue
            hint = difflib.get_close_matches(key.lower(), TOP_LEVEL_KEYS, n=1, cutoff=_KEY_TYPO_CUTOFF)
            if hint:
                problems.append(SpecError(f"line {_line(key_node)}: unknown key {show(key)} "
                                          f"(did you mean {hint[0]!r}?); known keys: {', '.join(TOP_LEVEL_KEYS)}"))
            else:
                ignored.append(key)
        if ignored:
            notes.append("ignored: " + ", ".join(_printable(key) for key in ignored))
        return sections

    def _name(self, node: yaml.Node | None) -> str | None:
        if node is None or _is_null(node):
            return None
        text = self._scalar_text(node, "name")
        self._check_length(text, self.max_name_length, "name", node)
        return text

    def _channels(self, node: yaml.Node | None, problems: list[SpecError]) -> list[str]:
        channels = []
        for index, item in self._sequence(node, "channels"):
            where = f"channels[{index}]"

            def one(item: yaml.Node = item, where: str = where) -> str:
                channel = self._entry_text(item, where)
                self._check_length(channel, self.max_name_length, where, item)
                return self._allowed_channel(channel, where, item)

            channel = _collected(problems, one, None)
            if channel is not None:
                channels.append(channel)
        return channels

    def _allowed_channel(self, channel: str, where: str, node: yaml.Node | None) -> str:
        if self._is_allowed_channel(channel):
            return channel
        if "://" in channel or channel.startswith(("/", ".", "~", "file:")) or "\\" in channel:
            kind = "a URL or a path"
            hint = ""
        else:
            kind = "not an allowed channel"
            near = difflib.get_close_matches(channel, self.allowed_channels, n=1, cutoff=_CHANNEL_TYPO_CUTOFF)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SpecError(
            f"{show(channel)} is {kind}{hint}; allowed channels: {', '.join(self.allowed_channels)} "
            "(the hub admin sets them: c.SpecPolicy.allowed_channels)",
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

    def _dependencies(self, node: yaml.Node | None,
                      problems: list[SpecError]) -> tuple[list[tuple[str, MatchSpec]], list[str]]:
        conda: list[tuple[str, MatchSpec]] = []
        pip: list[str] | None = None
        no_pip: list[str] = []
        conda_nodes: list[yaml.Node] = []
        items = list(self._sequence(node, "dependencies"))
        if not items:
            if node is None:
                raise SpecError("no dependencies: add a 'dependencies:' list of packages")
            raise SpecError("no dependencies: list the packages under it ('- python=3.11')",
                            field=_at("dependencies", node))
        for index, item in items:
            where = f"dependencies[{index}]"
            if isinstance(item, yaml.MappingNode):
                if pip is not None:
                    problems.append(SpecError("a second 'pip:' section; merge them into one", field=_at(where, item)))
                    continue
                pip = _collected(problems, lambda: self._pip_section(item, where, problems), no_pip)
                continue
            parsed = _collected(problems, lambda: self._conda_spec(self._entry_text(item, where), where, item), None)
            if parsed is not None:
                conda.append(parsed)
                conda_nodes.append(item)
        windows = self._windows_export(conda, conda_nodes)
        if windows is not None:
            problems.append(windows)
        return conda, pip or []

    def _windows_export(self, conda: list[tuple[str, MatchSpec]], nodes: list[yaml.Node]) -> SpecError | None:
        """A `conda env export` made on Windows: its Windows-only packages never solve on Linux."""
        found = [(spec.name.normalized, node) for (_, spec), node in zip(conda, nodes)
                 if spec.name is not None and _is_windows_only(spec.name.normalized)]
        if not found:
            return None
        names = ", ".join(dict.fromkeys(name for name, _ in found))
        return SpecError(
            f"a Windows export ({names} exist only for Windows): export the environment with "
            "`conda env export --from-history` (or `--no-builds`, without those packages), or on Linux",
            field=_at("dependencies", found[0][1]),
        )

    def _pip_section(self, node: yaml.MappingNode, where: str, problems: list[SpecError]) -> list[str]:
        if len(node.value) != 1 or getattr(node.value[0][0], "value", None) != "pip":
            keys = ", ".join(show(getattr(k, "value", "?")) for k, _ in node.value)
            raise SpecError(f"only a 'pip:' list may appear here, found {keys}", field=_at(where, node))
        requirements: list[str] = []
        hashed: list[tuple[str, yaml.Node]] = []
        unhashed: list[tuple[str, yaml.Node]] = []
        for index, item in self._sequence(node.value[0][1], f"{where}.pip"):
            item_where = f"{where}.pip[{index}]"

            def one(item: yaml.Node = item, item_where: str = item_where) -> str:
                return self._pip_requirement(self._entry_text(item, item_where), item_where, item)

            requirement = _collected(problems, one, None)
            if requirement is not None:
                requirements.append(requirement)
                (hashed if " --hash=" in requirement else unhashed).append((item_where, item))
        if hashed and unhashed:
            item_where, item = unhashed[0]
            first = hashed[0][0].rsplit(".", 1)[-1]
            problems.append(SpecError(
                f"has no --hash while {first} has one: pip then checks hashes for every package, so give "
                "each pip requirement an exact pin (==) and its --hash, or none of them",
                field=_at(item_where, item),
            ))
        return requirements

    def _variables(self, node: yaml.Node | None, problems: list[SpecError]) -> dict[str, str]:
        if node is None or _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise SpecError("must be a mapping of NAME: value", field=_at("variables", node))
        variables = {}
        for key_node, value_node in node.value:

            def one(key_node: yaml.Node = key_node, value_node: yaml.Node = value_node) -> tuple[str, str]:
                name = self._scalar_text(key_node, "variables")
                where = f"variables.{name}"
                if not _VARIABLE_NAME.match(name) or len(name) > self.max_name_length:
                    raise SpecError(f"{show(name)} is not a valid environment variable name",
                                    field=_at("variables", key_node))
                value = "" if _is_null(value_node) else self._scalar_text(value_node, where)
                _check_printable(value, where, value_node)
                self._check_length(value, self.max_spec_length, where, value_node)
                return name, value

            variable = _collected(problems, one, None)
            if variable is not None:
                variables[variable[0]] = variable[1]
        return variables

    # -- one entry -------------------------------------------------------------

    def _conda_spec(self, text: str, where: str, node: yaml.Node) -> tuple[str, MatchSpec]:
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
        build = match_spec.build
        if build is not None and not _BUILD_STRING.match(build):
            # MatchSpec reads whatever follows the version as a build string; conda refuses it.
            if build.strip(".") == "":
                reason = "the version ends with '.': write 'numpy=1.26' or 'numpy=1.26.*'"
            else:
                reason = (f"{show(build)} is not a build string (letters, digits, '_', '.', '+', '*'); "
                          "start a comment with '#'")
            raise SpecError(f"{show(text)}: {reason}", field=_at(where, node))
        if match_spec.channel is not None:
            self._check_spec_channel(match_spec.channel, text, where, node)
        return str(match_spec), match_spec

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
        text, hashes = _split_hashes(text)
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
        wheel_label = _pytorch_local_label(requirement)
        if wheel_label:
            raise SpecError(
                f"{show(text)}: versions with '+{wheel_label}' exist only on PyTorch's own index, which pip may "
                f"not use here; {_PYTORCH_CHANNELS_HINT.format(cuda=_pytorch_cuda(wheel_label))}",
                field=_at(where, node),
            )
        if hashes and not (len(requirement.specifier) == 1
                           and next(iter(requirement.specifier)).operator in ("==", "===")
                           and "*" not in str(requirement.specifier)):
            raise SpecError(f"{show(text)}: a requirement with --hash needs an exact pin (==)",
                            field=_at(where, node))
        self._check_length(requirement.name, self.max_name_length, where, node)
        requirement.name = canonicalize_name(requirement.name)
        requirement.extras = {canonicalize_name(extra) for extra in requirement.extras}
        return " ".join([str(requirement), *(f"--hash={value}" for value in hashes)])

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

    def _entry_text(self, node: yaml.Node, where: str) -> str:
        """A list entry's text; YAML numbers and booleans (`- 3.10` is the number 3.1) are refused."""
        text = self._scalar_text(node, where)
        kind = _NON_TEXT_TAGS.get(node.tag) if node.style is None else None
        if kind is not None:
            value = yaml.safe_load(text)  # a plain number or boolean: what YAML made of it
            read = f"{kind} {value!r}" if kind == "the number" else kind
            raise SpecError(f"{show(text)} is read by YAML as {read}, not text: quote it (\"{_printable(text)}\") "
                            "or write the package it means", field=_at(where, node))
        return text

    def _check_length(self, text: str, limit: int, where: str, node: yaml.Node | None) -> None:
        if len(text) > limit:
            raise SpecError(f"{show(text)} is {len(text)} characters, longer than {limit}", field=_at(where, node))


_T = TypeVar("_T")


def _collected(problems: list[SpecError], check: Callable[[], _T], fallback: _T) -> _T:
    """``check()``, or ``fallback`` with its SpecError added to ``problems``."""
    try:
        return check()
    except SpecError as error:
        problems.extend(error.problems)
        return fallback


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
    pytorch = _PYTORCH_INDEX.search(requirement_part)
    if pytorch and re.search(r"(^|\s)-", requirement_part):
        cuda = _pytorch_cuda(pytorch.group(1) or "")
        return "PyTorch's own index cannot be used here; " + _PYTORCH_CHANNELS_HINT.format(cuda=cuda)
    if re.search(r"\s--hash\b", requirement_part):
        return "--hash must be sha256:, sha384: or sha512: and the full hex digest, after the requirement"
    if re.search(r"(^|\s)-", requirement_part):
        return "pip options (-e, -r, --index-url, --extra-index-url, --find-links, ...) are not allowed"
    if "://" in requirement_part or requirement_part.startswith(_VCS_PREFIXES):
        return "URLs and version-control references are not allowed; name a package from the index"
    if requirement_part.startswith((".", "/", "~")) or "/" in requirement_part or "\\" in requirement_part:
        return "local paths are not allowed; name a package from the index"
    return None


def _split_hashes(text: str) -> tuple[str, list[str]]:
    """A pip line without its ``--hash=ALGORITHM:HEX`` options, and those hashes (sorted).

    The one pip option allowed: pip checks the download against it. A malformed hash is
    left in the text, where the option check refuses it.
    """
    hashes = []
    for match in reversed(list(_PIP_HASH.finditer(text))):
        value = _PIP_HASH_VALUE.match(match.group(1))
        if value is None or len(value.group(2)) != hashlib.new(value.group(1)).digest_size * 2:
            break
        if text[match.end():].strip():  # something other than hashes after it
            break
        hashes.append(f"{value.group(1)}:{value.group(2).lower()}")
        text = text[:match.start()] + text[match.end():]
    return text.strip(), sorted(set(hashes))


def pip_requirement_text(line: str) -> str:
    """A normalised pip line without its ``--hash`` options: what ``packaging`` parses."""
    return line.split(" --hash=", 1)[0]


def _pytorch_local_label(requirement: Requirement) -> str | None:
    """`cu118` of `torch==2.0.1+cu118`: a local version only PyTorch's own index serves."""
    for specifier in requirement.specifier:
        _, plus, label = specifier.version.partition("+")
        if plus and _PYTORCH_LABEL.match(label):
            return label
    return None


def _pytorch_cuda(label: str) -> str:
    """`pytorch-cuda=11.8` for `cu118`; `cpuonly` for `cpu`; nothing otherwise."""
    if label == "cpu":
        return ", cpuonly"
    digits = label[2:] if label.startswith("cu") else ""
    if len(digits) >= 3 and digits.isdigit():
        return f", pytorch-cuda={digits[:-1]}.{digits[-1]}"
    return ", pytorch-cuda=<your CUDA version>"


def _is_windows_only(name: str) -> bool:
    return name in _WINDOWS_ONLY or name.startswith(_WINDOWS_ONLY_PREFIXES)


def _printable(text: str) -> str:
    """A user's key or entry for a note: printable characters only, truncated."""
    cleaned = "".join(char if unicodedata.category(char)[0] != "C" else "?" for char in text)
    return cleaned if len(cleaned) <= _SHOWN_CHARS else cleaned[:_SHOWN_CHARS] + "..."


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _at(where: str, node: yaml.Node | None) -> str:
    return f"{where} (line {_line(node)})" if node is not None else where


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else error.__class__.__name__


def _describe_yaml_error(error: yaml.MarkedYAMLError) -> str:
    """The parser's error at the place a person would fix, with what was expected there.

    PyYAML reports a missing ':' where it gave up (often lines later) and the line that
    lacks it as the context mark; an unclosed bracket or quote, where it was opened.
    """
    context, problem = error.context or "", error.problem or error.context or "syntax error"
    mark = error.problem_mark or error.context_mark
    if "simple key" in context and "':'" in problem and error.context_mark is not None:
        mark = error.context_mark
        word = _line_text(mark).split("#", 1)[0].strip()
        problem = f"{show(word)} needs a ':' after it (expected 'key: value', or '- item' under a key)"
    elif context.startswith(("while parsing a flow", "while scanning a quoted")) and error.context_mark:
        opened = {"flow sequence": "the '[' opened here", "flow mapping": "the '{' opened here"}.get(
            context.removeprefix("while parsing a "), "the quote opened here")
        mark = error.context_mark
        problem = f"{opened} is never closed ({problem} at line {_mark_line(error)})"
    elif "'\\t'" in problem or "'\t'" in problem:
        problem = "a tab character: indent with spaces"
    elif problem.startswith("expected <block end>") and error.context_mark is not None:
        problem = (f"this line's indentation does not fit the block started at line {error.context_mark.line + 1} "
                   "(items of one list or mapping line up; a list item starts with '- ')")
    elif problem == "sequence entries are not allowed here":
        problem = "a '- item' cannot follow a key on its line: put the list on the lines below the key"
    elif problem == "mapping values are not allowed here":
        problem = "unexpected ':' (quote a value that contains ': ', or start a nested block on a new line)"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {problem}"


def _mark_line(error: yaml.MarkedYAMLError) -> str:
    return str(error.problem_mark.line + 1) if error.problem_mark else "?"


def _line_text(mark: yaml.Mark) -> str:
    """The source line a mark points into, from its column on (PyYAML keeps the whole text)."""
    buffer = mark.buffer or ""
    end = buffer.find("\n", mark.pointer)
    return buffer[mark.pointer:end if end >= 0 else len(buffer)].rstrip("\r\x00")


def parse_environment(data: str | bytes, source: str | None = None, policy: SpecPolicy | None = None) -> EnvironmentSpec:
    """Parse an environment.yml with ``policy`` (default limits when None)."""
    return (policy or SpecPolicy()).parse(data, source)
