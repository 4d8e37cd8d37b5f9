"""Checking one entry of an environment file: a conda spec, a pip line, a channel.

py-rattler's ``MatchSpec`` parses conda specs and ``packaging`` pip requirements; this
adds what they do not check (control and shell characters, lengths, build strings, the
channel and pip policy) and returns each entry in canonical form, or raises SpecError
naming the entry's field and line.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from typing import Collection

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from rattler import Channel, MatchSpec

from .specmodel import SpecError, SpecLimits, show
from .specpip import (
    EMPTY_OPERATOR,
    PYTORCH_CHANNELS_HINT,
    policy_refusal,
    pytorch_cuda,
    pytorch_local_label,
    split_hashes,
)
from .specyaml import at, whole_line

# MatchSpec's default channel alias: a spec's channel that lives elsewhere was given as
# a URL or a path, not as a name.
_ANACONDA_ALIAS = "https://conda.anaconda.org/"
# Characters that mean nothing in either grammar but a lot to a shell. The parsers
# catch most of them already; this check makes the message say why.
_SHELL_CHARS_CONDA = set("`$&;\\")
_SHELL_CHARS_PIP = set("`$&\\")
# A requirements file's line continuation (`requests==2.31.0 \` then `--hash=...`, as pip-compile
# writes them), which YAML folds into one entry with the backslash in it.
_CONTINUATION = re.compile(r"\\(\s|\Z)")
_LABEL = re.compile(r"(?!\.+\Z)[A-Za-z0-9_.-]+\Z")  # a name, never "." or ".." (a path step)
# What `defaults` stands for: allowing `defaults` allows naming its members directly.
_DEFAULTS_MEMBERS = ("pkgs/main", "pkgs/r")
DEFAULTS_CHANNELS = ("defaults", *_DEFAULTS_MEMBERS)  # what `nodefaults` says not to use
# What `conda env export` writes for Anaconda's channels, and its usual typo.
_ANACONDA_DEFAULTS = ("defaults", "default", "anaconda", *_DEFAULTS_MEMBERS)
# How close an unknown channel must be to an allowed one to be a typo (difflib's ratio).
_CHANNEL_TYPO_CUTOFF = 0.8
# A conda-build selector (`numpy [linux]`), which a recipe has and an environment.yml cannot.
_SELECTOR = re.compile(r"\[\s*(not\s+)?(linux|win|osx|unix|linux64|win64|osx64|x86_64|aarch64|arm64|py\d*)\b[^\]]*\]")
# The most of a parser's own reason a refusal quotes.
_PARSER_REASON_CHARS = 160
# A version operator right after the package name: what follows was meant as a version.
_OPERATOR_AFTER_NAME = re.compile(r"[A-Za-z0-9_.-]+\s*[=<>!~]")
# What conda accepts as a build string (with `*` globs); MatchSpec takes anything.
_BUILD_STRING = re.compile(r"[A-Za-z0-9_.+*]*[A-Za-z0-9_*][A-Za-z0-9_.+*]*\Z")


class EntryChecker:
    """The checks of single entries, under one parse's limits; each raises SpecError."""

    def __init__(self, limits: SpecLimits):
        self._limits = limits

    def conda_spec(self, text: str, where: str, node: yaml.Node) -> tuple[str, MatchSpec]:
        """A conda dependency in canonical form, and its MatchSpec."""
        if _folded_pip_list(text, node):
            raise SpecError(f"{show(text)} goes on to line {node.end_mark.line + 1}: is the ':' of '- pip:' missing?",
                            field=at(where, node))
        check_one_line(text, where, node)
        self._check_entry_text(text, where, node, _SHELL_CHARS_CONDA)
        try:
            match_spec = MatchSpec(text)
        except Exception as error:  # py-rattler raises its own exception types
            selector = _SELECTOR.search(text)
            hint = (f"; {selector.group(0)!r} is a conda-build selector, not part of a spec: remove it" if selector
                    else "")
            raise SpecError(
                f"{show(text)} is not a valid conda spec (MatchSpec: {_first_line(error)}){hint}",
                field=at(where, node),
            )
        if match_spec.name is None or not any(char.isalnum() for char in match_spec.name.normalized):
            # MatchSpec takes '.', '..' or '-' as a name; no package is called that (a path, a stray dash)
            raise SpecError(f"{show(text)} names no package", field=at(where, node))
        if match_spec.namespace is not None:
            raise SpecError(f"{show(text)}: {_namespace_reason(match_spec.namespace, text)}", field=at(where, node))
        if "[url=" in str(match_spec) or ("::" not in text and ("://" in text or text.lower().startswith("file:"))):
            # A direct URL has no channel to check: the solve would fetch it from wherever it points.
            raise SpecError(f"{show(text)} is a package URL or file; name the package (such as 'numpy=1.26') from "
                            f"an allowed channel ({', '.join(self._limits.allowed_channels)})", field=at(where, node))
        self.check_length(match_spec.name.normalized, self._limits.max_name_length, where, node)
        self._check_version_is_one(match_spec, text, where, node)
        build = match_spec.build
        if build is not None and not _BUILD_STRING.match(build):
            # MatchSpec reads whatever follows the version as a build string; conda refuses it.
            if build.strip(".") == "":
                reason = "the version ends with '.': write 'numpy=1.26' or 'numpy=1.26.*'"
            else:
                reason = (f"{show(build)} is not a build string (letters, digits, '_', '.', '+', '*'); "
                          "start a comment with '#'")
            raise SpecError(f"{show(text)}: {reason}", field=at(where, node))
        if match_spec.channel is not None:
            self._check_spec_channel(match_spec.channel, text, where, node)
        return str(match_spec), match_spec

    def _check_version_is_one(self, match_spec: MatchSpec, text: str, where: str, node: yaml.Node) -> None:
        """A version without a digit is a second package name: ``numpy pandas`` (two on one line,
        or a next line whose ``- `` went missing, which YAML folds into this one)."""
        version = str(match_spec.version or "")
        if not version or any(char.isdigit() for char in version) or version.strip("=<>!~ ") in ("*", ""):
            return
        if _OPERATOR_AFTER_NAME.match(text.split("::")[-1]):  # `numpy=latest`: meant as a version, not as a second package
            written = version.lstrip("=<>!~ ").removesuffix(".*")
            raise SpecError(f"{show(text)}: {written!r} is not a version (versions have digits): write "
                            f"{match_spec.name.normalized!r} for any version", field=at(where, node))
        folded = node.end_mark.line > node.start_mark.line
        hint = (f"it goes on to line {node.end_mark.line + 1}: is a '- ' missing there?" if folded
                else "put each package on a '- ' line of its own")
        raise SpecError(f"{show(text)} reads as {match_spec.name.normalized} version "
                        f"{version.lstrip('=')!r}: {hint}", field=at(where, node))

    def _check_spec_channel(self, channel: Channel, text: str, where: str, node: yaml.Node) -> None:
        if channel.name == "nodefaults":
            raise SpecError(f"{show(text)}: nodefaults is not a channel to take a package from; write "
                            f"{show(text.split('::', 1)[-1])}", field=at(where, node))
        if channel.name is None or channel.base_url != f"{_ANACONDA_ALIAS}{channel.name}/":
            raise SpecError(
                f"{show(text)} names its channel by URL or path; use a channel name "
                f"({', '.join(self._limits.allowed_channels)})",
                field=at(where, node),
            )
        self.allowed_channel(channel.name, where, node)

    def allowed_channel(self, channel: str, where: str, node: yaml.Node | None, listed: Collection[str] = ()) -> str:
        """``channel`` if the policy allows it; otherwise SpecError, with the allowed ones (``listed``:
        the file's channels, where the hint would add one it already has)."""
        if self._is_allowed_channel(channel):
            return channel
        if "://" in channel or channel.startswith(("/", ".", "~", "file:")) or "\\" in channel:
            named = channel.rstrip("/").removeprefix(_ANACONDA_ALIAS)
            if channel.startswith(_ANACONDA_ALIAS) and self._is_allowed_channel(named):
                raise SpecError(f"{show(channel)} is a URL or a path: write its name, {named!r}; allowed channels: "
                                f"{', '.join(self._limits.allowed_channels)}", field=at(where, node))
            kind = "a URL or a path"
            hint = ""
        elif channel in _ANACONDA_DEFAULTS and "defaults" not in self._limits.allowed_channels:
            kind = "not an allowed channel"
            hint = " (this hub does not use Anaconda's defaults channels: remove it)"
        else:
            kind = "not an allowed channel"
            # `nodefaults` means "not defaults": offered only for a typo of itself.
            names = [name for name in self._limits.allowed_channels if name != "nodefaults" or channel.startswith("no")]
            near = difflib.get_close_matches(channel, names, n=1, cutoff=_CHANNEL_TYPO_CUTOFF)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            if not near and channel in _ANACONDA_DEFAULTS:
                hint = (" (it is one of Anaconda's defaults channels, and 'defaults' is listed: remove it)"
                        if "defaults" in listed else " (it is one of Anaconda's defaults channels: write 'defaults')")
        raise SpecError(
            f"{show(channel)} is {kind}{hint}; allowed channels: {', '.join(self._limits.allowed_channels)} "
            "(the hub admin sets them: c.SpecPolicy.allowed_channels)",
            field=at(where, node),
        )

    def _is_allowed_channel(self, channel: str) -> bool:
        """An allowed name, a label of one (`conda-forge/label/dev`), or a member of `defaults`."""
        owner, is_label, label = channel.partition("/label/")
        if is_label:
            return owner in self._limits.allowed_channels and bool(_LABEL.match(label))
        if channel in self._limits.allowed_channels:
            return True
        return channel in _DEFAULTS_MEMBERS and "defaults" in self._limits.allowed_channels

    def pip_requirement(self, text: str, where: str, node: yaml.Node) -> str:
        """A pip requirement in canonical form (its ``--hash`` options after it)."""
        if _CONTINUATION.search(text):
            raise SpecError(f"{show(text)}: '\\' continues a line in a requirements file, not in an environment.yml: "
                            "write the requirement and its --hash options on one line, without '\\'",
                            field=at(where, node))
        check_one_line(text, where, node)
        check_printable(text, where, node)
        # `C:\pkg`: a Windows path is named as a path, not by its '\\' as a shell character
        if "\\" in text and (refusal := policy_refusal(text)):
            raise SpecError(f"{show(text)}: {refusal}", field=at(where, node))
        self._check_entry_text(text, where, node, _SHELL_CHARS_PIP)
        text, hashes = split_hashes(text)
        refusal = policy_refusal(text)
        if refusal:
            raise SpecError(f"{show(text)}: {refusal}", field=at(where, node))
        if EMPTY_OPERATOR.search(text.split(";", 1)[0]):
            raise SpecError(f"{show(text)} has an operator with no version", field=at(where, node))
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            hint = " (pip pins with '==', not '=')" if re.search(r"[^=<>!~]=[^=]", text) else ""
            raise SpecError(
                f"{show(text)} is not a valid pip requirement (packaging: {_first_line(error)}){hint}",
                field=at(where, node),
            )
        if requirement.url:
            raise SpecError(f"{show(text)}: direct URL references are not allowed", field=at(where, node))
        if any(not spec.version for spec in requirement.specifier):
            raise SpecError(f"{show(text)} has an operator with no version", field=at(where, node))
        wheel_label = pytorch_local_label(requirement)
        if wheel_label:
            raise SpecError(
                f"{show(text)}: versions with '+{wheel_label}' exist only on PyTorch's own index, which pip may "
                f"not use here; {PYTORCH_CHANNELS_HINT.format(cuda=pytorch_cuda(wheel_label))}",
                field=at(where, node),
            )
        if hashes and not (len(requirement.specifier) == 1
                           and next(iter(requirement.specifier)).operator in ("==", "===")
                           and "*" not in str(requirement.specifier)):
            raise SpecError(f"{show(text)}: a requirement with --hash needs an exact pin (==)",
                            field=at(where, node))
        self.check_length(requirement.name, self._limits.max_name_length, where, node)
        requirement.name = canonicalize_name(requirement.name)
        # Extras only lower-cased: pip before 23.3 looks `save_movie` up as written (PySurfer[save_movie]),
        # so '_' -> '-' (PEP 685) would lose the extra's dependencies there.
        requirement.extras = {extra.lower() for extra in requirement.extras}
        return " ".join([str(requirement), *(f"--hash={value}" for value in hashes)])

    def _check_entry_text(self, text: str, where: str, node: yaml.Node, shell_chars: set[str]) -> None:
        check_printable(text, where, node)
        shell = next((char for char in text if char in shell_chars), None)
        if shell is not None:
            raise SpecError(f"{show(text)} contains the shell character {shell!r}", field=at(where, node))
        self.check_length(text, self._limits.max_spec_length, where, node)
        if not text.strip():
            raise SpecError("empty entry", field=at(where, node))

    def check_length(self, text: str, limit: int, where: str, node: yaml.Node | None) -> None:
        """Refuse ``text`` longer than ``limit`` characters."""
        if len(text) > limit:
            raise SpecError(f"{show(text)} is {len(text)} characters, longer than {limit}", field=at(where, node))


def check_printable(text: str, where: str, node: yaml.Node) -> None:
    """Refuse control and invisible characters (bidi overrides, zero-width spaces) and line and
    paragraph separators (U+2028, U+2029: ``splitlines`` ends a line at them)."""
    control = next((char for char in text if unicodedata.category(char) in ("Zl", "Zp")
                    or unicodedata.category(char)[0] == "C"), None)
    if control is not None:
        raise SpecError(
            f"{show(text)} contains a control or invisible character (U+{ord(control):04X})",
            field=at(where, node),
        )


def _namespace_reason(namespace: str, text: str) -> str:
    """Why a spec with one ':' (MatchSpec's namespace, which the solver ignores) is refused."""
    if namespace.strip() == "pip":  # `- pip:requests` would install conda's requests, not pip's
        return "a pip section is '- pip:' with its packages listed on the lines below it"
    name, _, version = text.partition(":")
    instead = f"'{name.strip()}={version.strip()}'" if text.count(":") == 1 else "'package=version'"
    return f"a single ':' has no meaning in a conda spec: write {instead} for a version, or 'channel::package' for a channel"


_CONSTRAINT_STARTS = (",", "|", ";", "<", ">", "=", "!", "~", "--")  # `--`: a pip option such as --hash
_EMITTER_WIDTH = 80  # PyYAML's and ruamel's default: they break a plain scalar at a space past this column
_LINE_BREAKS = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # YAML's


def check_one_line(text: str, where: str, node: yaml.Node) -> None:
    """Refuse an unquoted entry YAML read from several lines: the next entry's '- ' went missing
    (`- python=3.9` then `pandas`, which would read as python's build string), or the next line is
    indented further than the entries (`- numpy` then `   - pandas`), and YAML folded it into this one."""
    if not isinstance(node, yaml.ScalarNode) or node.style is not None or node.end_mark.line <= node.start_mark.line:
        return
    line = _first_unwrapped_line(node)
    if line is None:
        return
    if re.search(r"\s-\s", text):
        reason = (f"line {line} is indented further than the entries above it, and YAML reads it as part of "
                  "this one: indent its '- ' as theirs")
    elif _in_flow_list(node):
        reason = f"it goes on to line {line}: is a ',' missing before it?"
    else:
        reason = f"it goes on to line {line}: is a '- ' missing there?"
    raise SpecError(f"{show(text)}: {reason}", field=at(where, node))


def _first_unwrapped_line(node: yaml.Node) -> int | None:
    """The first line (from 1) a folded entry goes on to other than as one spec wrapped on purpose, or None:
    a line that ends mid-constraint (`numpy >=1.26,` then `<2`; `;` before a pip marker), a next line
    that begins with an operator or a pip option (`--hash=...`), or a line a YAML writer broke (past
    80 columns), which YAML folds as meant."""
    source = node.start_mark.buffer
    if not source:
        return node.start_mark.line + 2
    pieces = _LINE_BREAKS.split(source[node.start_mark.pointer:node.end_mark.pointer])
    lines = [(number, line) for number, line in enumerate(pieces, start=node.start_mark.line + 1)
             if line.strip()]  # a blank line folds in too
    for index, ((_, first), (number, then)) in enumerate(zip(lines, lines[1:])):
        first, then = first.rstrip(), then.lstrip()
        width = len(first) + (node.start_mark.column if index == 0 else 0)  # the first piece starts mid-line
        ends_mid_constraint = first.endswith(";") or (first.endswith((",", "|")) and then[:1] in "<>=!~0123456789")
        if not (width >= _EMITTER_WIDTH or ends_mid_constraint or then.startswith(_CONSTRAINT_STARTS)):
            return number
    return None


def _in_flow_list(node: yaml.Node) -> bool:
    """Whether the entry sits in a `[...]` list (after '[' or ','), not on a '- ' line."""
    return whole_line(node.start_mark)[:node.start_mark.column].rstrip().endswith(("[", ","))


def _folded_pip_list(text: str, node: yaml.Node) -> bool:
    """`- pip` with the list below it but no ':', which YAML folds into one entry: `pip - requests`."""
    return node.end_mark.line > node.start_mark.line and re.match(r"pip\s+-", text) is not None


def _first_line(error: Exception) -> str:
    """A parser's reason, shortened: MatchSpec's quotes the whole entry, twice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else error.__class__.__name__
    return reason if len(reason) <= _PARSER_REASON_CHARS else reason[:_PARSER_REASON_CHARS] + "..."
