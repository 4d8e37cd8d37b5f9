"""Reading one environment file's YAML node tree into an EnvironmentSpec.

A :class:`SpecReader` is made per parse: it holds the limits, the file's problems and
its notes, reads the top-level keys, the channels, the dependencies (conda entries and
the pip section) and the variables, and raises one SpecError naming every problem.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, TypeVar

import yaml
from rattler import MatchSpec

from .specentries import DEFAULTS_CHANNELS, EntryChecker, check_printable
from .specmodel import EnvironmentSpec, SpecError, SpecLimits, printable, show
from .specyaml import at, entry_text, is_null, line, scalar_text, sequence

TOP_LEVEL_KEYS = ("name", "channels", "dependencies", "variables", "prefix")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# How close an unknown top-level key must be to a known one to be a typo (difflib's
# ratio: `dependancies` 0.92, `channel` 0.93; `platforms`, `category`, `extras` < 0.4).
_KEY_TYPO_CUTOFF = 0.8
# Unknown top-level keys a note names (the rest are counted).
_IGNORED_NAMED = 10
# Packages that exist only for Windows: their presence marks a Windows `conda env export`.
_WINDOWS_ONLY = frozenset({"vc", "vc14_runtime", "vs2015_runtime", "ucrt", "pywin32", "pywinpty", "winpty",
                           "wincertstore", "win_inet_pton", "menuinst-win"})
_WINDOWS_ONLY_PREFIXES = ("vs20", "m2w64-", "m2-")
# Keys of a mapping in dependencies that a refusal names, the rest counted.
_KEYS_NAMED = 3
# Windows-only packages a refusal names (an R export brings dozens of m2w64-*), the rest counted.
_WINDOWS_NAMED = 5

_T = TypeVar("_T")


class SpecReader:
    """One parse of one file: every problem it finds is kept, so one refusal names them all."""

    def __init__(self, limits: SpecLimits):
        self._limits = limits
        self._entries = EntryChecker(limits)
        self.problems: list[SpecError] = []
        self.notes: list[str] = []

    def read(self, document: yaml.MappingNode) -> EnvironmentSpec:
        """The environment the file's top-level mapping describes; SpecError with every problem."""
        sections = self._top_level_sections(document)
        no_channels: list[str] = []
        no_dependencies: tuple[list[tuple[str, MatchSpec]], list[str]] = ([], [])
        no_variables: dict[str, str] = {}
        channels = self._collect(lambda: self._channels(sections.get("channels")), no_channels)
        conda, pip = self._collect(lambda: self._dependencies(sections.get("dependencies")), no_dependencies)
        variables = self._collect(lambda: self._variables(sections.get("variables")), no_variables)
        name = self._collect(lambda: self._name(sections.get("name")), None)
        if len(conda) + len(pip) > self._limits.max_dependencies:
            self.problems.append(SpecError(
                f"{len(conda) + len(pip)} entries, more than the limit of {self._limits.max_dependencies}",
                field="dependencies",
            ))
        if self.problems:
            raise SpecError.combine(self.problems, self._limits.max_problems)
        return EnvironmentSpec(
            channels=tuple(dict.fromkeys(channels)),
            conda=tuple(sorted(set(text for text, _ in conda))),
            pip=tuple(sorted(set(pip))),
            variables=tuple(sorted(variables.items())),
            name=name,
            notes=tuple(self.notes),
        )

    def _top_level_sections(self, document: yaml.MappingNode) -> dict[str, yaml.Node]:
        """The known sections. A likely typo of a known key is a problem; any other
        unknown key is ignored, as conda does, and named in a note."""
        sections = {}
        ignored = []
        for key_node, value_node in document.value:
            if not isinstance(key_node, yaml.ScalarNode) or is_null(key_node):
                self.problems.append(SpecError(f"line {line(key_node)}: a top-level key must be a plain name; "
                                               f"known keys: {', '.join(TOP_LEVEL_KEYS)}"))
                continue
            key = key_node.value
            if key in TOP_LEVEL_KEYS:
                sections[key] = value_node
                continue
            hint = difflib.get_close_matches(key.lower(), TOP_LEVEL_KEYS, n=1, cutoff=_KEY_TYPO_CUTOFF)
            if hint:
                self.problems.append(SpecError(f"line {line(key_node)}: unknown key {show(key)} "
                                               f"(did you mean {hint[0]!r}?); known keys: {', '.join(TOP_LEVEL_KEYS)}"))
            else:
                ignored.append(key)
        if ignored:  # the first few: the note is the first line of the progress page
            more = f" and {len(ignored) - _IGNORED_NAMED} more" if len(ignored) > _IGNORED_NAMED else ""
            self.notes.append("ignored: " + ", ".join(printable(key) for key in ignored[:_IGNORED_NAMED]) + more)
        if "pip" in ignored:  # conda ignores it too: the pip packages would be missing without a word
            self.notes.append("a top-level 'pip:' installs nothing: put it under dependencies, as '- pip:' "
                              "followed by its list")
        return sections

    def _name(self, node: yaml.Node | None) -> str | None:
        if node is None or is_null(node):
            return None
        text = scalar_text(node, "name")
        # The name is the build's, in the hub's log and the build log's first line: one line.
        check_printable(text, "name", node)
        self._entries.check_length(text, self._limits.max_name_length, "name", node)
        return text

    def _channels(self, node: yaml.Node | None) -> list[str]:
        channels = []
        items = list(sequence(node, "channels"))
        listed = {item.value.strip() for _, item in items if isinstance(item, yaml.ScalarNode)}
        for index, item in items:
            where = f"channels[{index}]"

            def one(item: yaml.Node = item, where: str = where) -> str:
                channel = entry_text(item, where)
                self._entries.check_length(channel, self._limits.max_name_length, where, item)
                return self._entries.allowed_channel(channel, where, item, listed)

            channel = self._collect(one, None)
            if channel is not None:
                channels.append(channel)
        self._note_defaults_and_nodefaults(channels, node)
        return channels

    def _note_defaults_and_nodefaults(self, channels: list[str], node: yaml.Node | None) -> None:
        """`nodefaults` means "not defaults": listed with `defaults` (or one of its members) the file
        says both. Accepted, as conda accepts it (the listed channel is used), but noted."""
        defaults = [channel for channel in channels if channel in DEFAULTS_CHANNELS]
        if "nodefaults" in channels and defaults:
            self.notes.append(f"{at('channels', node)}: lists both {defaults[0]!r} and 'nodefaults', which means "
                              f"\"not defaults\": {defaults[0]!r} is used all the same; remove the one you did not "
                              "mean")

    def _dependencies(self, node: yaml.Node | None) -> tuple[list[tuple[str, MatchSpec]], list[str]]:
        conda: list[tuple[str, MatchSpec]] = []
        pip: list[str] | None = None
        no_pip: list[str] = []
        conda_nodes: list[yaml.Node] = []
        items = list(sequence(node, "dependencies"))
        if not items:
            if node is None:
                raise SpecError("no dependencies: add a 'dependencies:' list of packages")
            raise SpecError("no dependencies: list the packages under it ('- python=3.11')",
                            field=at("dependencies", node))
        for index, item in items:
            where = f"dependencies[{index}]"
            if isinstance(item, yaml.MappingNode):
                if pip is not None:
                    self.problems.append(SpecError("a second 'pip:' section; merge them into one",
                                                   field=at(where, item)))
                    continue
                pip = self._collect(lambda: self._pip_section(item, where), no_pip)
                continue
            parsed = self._collect(lambda: self._entries.conda_spec(entry_text(item, where), where, item), None)
            if parsed is not None:
                conda.append(parsed)
                conda_nodes.append(item)
        windows = self._windows_export(conda, conda_nodes)
        if windows is not None:
            self.problems.append(windows)
        return conda, pip or []

    def _windows_export(self, conda: list[tuple[str, MatchSpec]], nodes: list[yaml.Node]) -> SpecError | None:
        """A `conda env export` made on Windows: its Windows-only packages never solve on Linux."""
        found = [(spec.name.normalized, node) for (_, spec), node in zip(conda, nodes)
                 if spec.name is not None and is_windows_only(spec.name.normalized)]
        if not found:
            return None
        unique = list(dict.fromkeys(name for name, _ in found))
        more = f" and {len(unique) - _WINDOWS_NAMED} more" if len(unique) > _WINDOWS_NAMED else ""
        names = ", ".join(unique[:_WINDOWS_NAMED]) + more
        exported = len(unique) >= 3 or any(spec.build is not None for _, spec in conda)
        if not exported:  # written by hand: a package left from a selector (`pywin32  # [win]`)
            verb = "exists" if len(unique) == 1 else "exist"
            return SpecError(f"{names} {verb} only for Windows: remove {'it' if len(unique) == 1 else 'them'} "
                             "(selectors such as `# [win]` are comments in an environment.yml)",
                             field=at("dependencies", found[0][1]))
        return SpecError(
            f"a Windows export ({names} exist only for Windows): export the environment with "
            "`conda env export --from-history` (or `--no-builds`, without those packages), or on Linux",
            field=at("dependencies", found[0][1]),
        )

    def _pip_section(self, node: yaml.MappingNode, where: str) -> list[str]:
        if len(node.value) != 1 or getattr(node.value[0][0], "value", None) != "pip":
            spec = _spec_written_as_mapping(node)
            if spec is not None:
                raise SpecError(f"{show(spec[0])} is read by YAML as a mapping (a ':' then a space): write "
                                f"{show(spec[1])}", field=at(where, node))
            more = f" and {len(node.value) - _KEYS_NAMED} more" if len(node.value) > _KEYS_NAMED else ""
            keys = ", ".join(show(getattr(k, "value", "?")) for k, _ in node.value[:_KEYS_NAMED]) + more
            raise SpecError(f"only a 'pip:' list may appear here, found {keys}", field=at(where, node))
        requirements: list[str] = []
        hashed: list[tuple[str, yaml.Node]] = []
        unhashed: list[tuple[str, yaml.Node]] = []
        listed = node.value[0][1]
        if is_null(listed) or (isinstance(listed, yaml.SequenceNode) and not listed.value):
            # Most often its '- package' lines are not indented below it: they are conda packages then
            self.notes.append(f"{at(where, node)}: '- pip:' lists no packages (pip installs nothing): its "
                              "'- package' lines go indented below it")
        for index, item in sequence(listed, f"{where}.pip"):
            item_where = f"{where}.pip[{index}]"

            def one(item: yaml.Node = item, item_where: str = item_where) -> str:
                return self._entries.pip_requirement(entry_text(item, item_where), item_where, item)

            requirement = self._collect(one, None)
            if requirement is not None:
                requirements.append(requirement)
                (hashed if " --hash=" in requirement else unhashed).append((item_where, item))
        if hashed and unhashed:
            item_where, item = unhashed[0]
            first = hashed[0][0].rsplit(".", 1)[-1]
            self.problems.append(SpecError(
                f"has no --hash while {first} has one: pip then checks hashes for every package, so give "
                "each pip requirement an exact pin (==) and its --hash, or none of them",
                field=at(item_where, item),
            ))
        return requirements

    def _variables(self, node: yaml.Node | None) -> dict[str, str]:
        if node is None or is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise SpecError("must be a mapping of NAME: value", field=at("variables", node))
        variables = {}
        for key_node, value_node in node.value:

            def one(key_node: yaml.Node = key_node, value_node: yaml.Node = value_node) -> tuple[str, str]:
                name = scalar_text(key_node, "variables")
                where = f"variables.{name}"
                if not _VARIABLE_NAME.match(name) or len(name) > self._limits.max_name_length:
                    raise SpecError(f"{show(name)} is not a valid environment variable name",
                                    field=at("variables", key_node))
                value = "" if is_null(value_node) else scalar_text(value_node, where)
                check_printable(value, where, value_node)
                self._entries.check_length(value, self._limits.max_spec_length, where, value_node)
                return name, value

            variable = self._collect(one, None)
            if variable is not None:
                variables[variable[0]] = variable[1]
        return variables

    def _collect(self, check: Callable[[], _T], fallback: _T) -> _T:
        """``check()``, or ``fallback`` with its SpecError added to the file's problems."""
        try:
            return check()
        except SpecError as error:
            self.problems.extend(error.problems)
            return fallback


def _spec_written_as_mapping(node: yaml.MappingNode) -> tuple[str, str] | None:
    """`numpy: 1.26` (as pixi and poetry write a dependency): what was written and the conda spec
    it means, or None for any other mapping."""
    if len(node.value) != 1:
        return None
    key, value = node.value[0]
    if not (isinstance(key, yaml.ScalarNode) and isinstance(value, yaml.ScalarNode)) or is_null(value):
        return None
    version = value.value.strip()
    operator = "" if version[:1] in "=<>!~" else "="
    return f"{key.value}: {version}", f"{key.value}{operator}{version}"


def is_windows_only(name: str) -> bool:
    """Whether conda has the package only for Windows (a sign of a Windows `conda env export`)."""
    return name in _WINDOWS_ONLY or name.startswith(_WINDOWS_ONLY_PREFIXES)
