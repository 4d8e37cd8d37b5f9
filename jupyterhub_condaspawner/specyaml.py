"""Reading an environment file's bytes into a YAML node tree, strictly.

:func:`decode` checks the bytes (size, BOMs, NUL, UTF-8); :func:`load_yaml` reads the
text with a loader that refuses anchors, aliases, tags, duplicate keys and deep nesting,
and describes a syntax error at the place a person fixes it. The node helpers
(:func:`sequence`, :func:`scalar_text`, :func:`entry_text`, :func:`at`) read the tree and
name a node's field and line in a refusal.
"""

from __future__ import annotations

import unicodedata
from typing import Iterator

import yaml

from .specmodel import SHOWN_CHARS, SpecError, printable, show

_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
# Plain YAML scalars that are not text: `- 3.10` is the float 3.1, `- 42` an int.
_NON_TEXT_TAGS = {
    "tag:yaml.org,2002:int": "the number",
    "tag:yaml.org,2002:float": "the number",
    "tag:yaml.org,2002:bool": "true/false",
}


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

    def __init__(self, stream: str, max_depth: int, max_nodes: int, why_nodes: str):
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth
        self._nodes = 0
        self._max_nodes = max_nodes
        self._why_nodes = why_nodes

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused("YAML anchors and aliases (&name, *name) are not allowed", event.start_mark)
        if getattr(event, "tag", None) is not None:
            quote = " (quote the value instead: '3.10')" if event.tag in ("!!str", "tag:yaml.org,2002:str") else ""
            raise _Refused(f"YAML tags are not allowed ({show(event.tag)}){quote}", event.start_mark)
        # Composing is pure Python (~70 us a value): a file under the size limit but with
        # 100,000 values would hold the hub's event loop for seconds. Stop at the limit.
        self._nodes += 1
        if self._nodes > self._max_nodes:
            raise _Refused(f"more than {self._max_nodes} YAML values in the file: {self._why_nodes}", event.start_mark)
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


def decode(data: str | bytes, max_bytes: int) -> str:
    """The file's text: refused when too large, not UTF-8 or not text (BOMs, NUL, surrogates)."""
    if isinstance(data, str):
        size = len(data.encode("utf-8", "surrogatepass"))
    else:
        size = len(data)
    if size > max_bytes:
        raise SpecError(f"file is {size} bytes, larger than the limit of {max_bytes}")
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


def load_yaml(text: str, max_depth: int, max_nodes: int, why_nodes: str) -> yaml.MappingNode:
    """The file's top-level mapping node, read by the strict loader; SpecError otherwise
    (``why_nodes`` says why past ``max_nodes`` values)."""
    try:
        # The reader checks the whole text as the loader is made: a control character such as
        # ESC or BEL (YAML allows none but tab, newline and CR) is refused there.
        loader = _StrictLoader(text, max_depth, max_nodes, why_nodes)
    except yaml.reader.ReaderError as error:
        raise SpecError(describe_reader_error(text, error)) from None
    try:
        node = loader.get_single_node()
    except _Refused as refused:
        where = f"line {refused.mark.line + 1}: " if refused.mark else ""
        raise SpecError(where + refused.reason)
    except yaml.MarkedYAMLError as error:
        raise SpecError(describe_yaml_error(error))
    except yaml.YAMLError as error:
        raise SpecError("invalid YAML: " + str(error).splitlines()[0])
    finally:
        loader.dispose()
    if node is None:
        raise SpecError("file is empty")
    if not isinstance(node, yaml.MappingNode):
        raise SpecError(f"line {line(node)}: the top level must be a mapping (name:, channels:, dependencies:): "
                        "list conda packages under 'dependencies:', and pip's (a requirements.txt) under '- pip:' in it")
    return node


def sequence(node: yaml.Node | None, where: str) -> Iterator[tuple[int, yaml.Node]]:
    """A list's (index, item) pairs; nothing for a missing or empty one."""
    if node is None or is_null(node):
        return iter(())
    if not isinstance(node, yaml.SequenceNode):
        raise SpecError("must be a list (one '- item' per line)", field=at(where, node))
    return enumerate(node.value)


def scalar_text(node: yaml.Node, where: str) -> str:
    """A scalar's text, stripped; a nested list or mapping or an empty entry is refused."""
    if not isinstance(node, yaml.ScalarNode) or is_null(node):
        kind = "an empty entry" if is_null(node) else "a nested list or mapping"
        raise SpecError(f"expected text, found {kind}", field=at(where, node))
    return node.value.strip()


def entry_text(node: yaml.Node, where: str) -> str:
    """A list entry's text; YAML numbers and booleans (`- 3.10` is the number 3.1) are refused."""
    text = scalar_text(node, where)
    kind = _NON_TEXT_TAGS.get(node.tag) if node.style is None else None
    if kind is not None:
        read = f"{kind} {_number(text)}" if kind == "the number" else kind
        raise SpecError(f"{show(text)} is read by YAML as {read}, not text: quote it (\"{printable(text)}\") "
                        "or write the package it means", field=at(where, node))
    return text


def _number(text: str) -> str:
    """The number YAML reads a plain scalar as, for a message: shortened, and never computed from
    a long one (a sexagesimal `59:59:...` is a growing product; past 4300 digits `str()` fails)."""
    if len(text) > SHOWN_CHARS:
        return text[:SHOWN_CHARS] + "..."
    shown = repr(yaml.safe_load(text))
    return shown if len(shown) <= SHOWN_CHARS else shown[:SHOWN_CHARS] + "..."


def line(node: yaml.Node) -> int:
    """The 1-based line a node starts on."""
    return node.start_mark.line + 1


def is_null(node: yaml.Node) -> bool:
    """An empty value (`key:` or `- `)."""
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def at(where: str, node: yaml.Node | None) -> str:
    """A refusal's field: ``where`` and the node's line."""
    return f"{where} (line {line(node)})" if node is not None else where


def describe_reader_error(text: str, error: yaml.reader.ReaderError) -> str:
    """A character YAML does not allow in a file (a control character), at its line and column."""
    before = text[:error.position]
    line_number, column = before.count("\n") + 1, error.position - (before.rfind("\n") + 1) + 1
    character = error.character if isinstance(error.character, int) else ord(str(error.character)[:1] or "?")
    kind = "a control character" if unicodedata.category(chr(character)) == "Cc" else "not a text character"
    return (f"line {line_number}, column {column}: the file contains the character U+{character:04X} ({kind}), "
            "which YAML does not allow: remove it")


def describe_yaml_error(error: yaml.MarkedYAMLError) -> str:
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
    elif problem == "sequence entries are not allowed here" and mark is not None:
        key = whole_line(mark).split(":", 1)[0].strip()
        problem = (f"a '- item' cannot follow the key {show(key)} on its line: put a list on the lines below "
                   f"{show(key + ':')}, or write a single value (a name) there without '- '")
    elif problem == "mapping values are not allowed here" and (key_mark := _key_without_colon(mark)) is not None:
        mark = key_mark
        problem = f"{show(whole_line(mark).split('#', 1)[0].strip())} needs a ':' after it (expected 'key: value')"
    elif problem == "mapping values are not allowed here":
        problem = "unexpected ':' (quote a value that contains ': ', or start a nested block on a new line)"
    elif problem.endswith("that cannot start any token") and mark is not None:
        problem = ("a `conda list --explicit` file, not an environment.yml: write one, or export it with "
                   "`conda env export --from-history`" if whole_line(mark).strip() == "@EXPLICIT"
                   else f"{problem.removeprefix('found character ').split(' that ', 1)[0]} cannot start a value: "
                   "quote it")
    elif problem == "but found another document" and mark is not None:
        problem = ("a second YAML document starts here ('---'): an environment.yml is one document: remove the "
                   "'---' line (and merge what follows)")
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {problem}"


def _key_without_colon(mark: yaml.Mark | None) -> yaml.Mark | None:
    """The start of the key whose ':' is missing, when the ':' at ``mark`` ends a plain scalar
    that began lines above at no deeper indentation (``channels`` then ``  - conda-forge`` then
    ``dependencies:``: YAML reads the three lines as one key); None otherwise."""
    lines = (mark.buffer or "").split("\n") if mark is not None else []
    if mark is None or mark.line >= len(lines):  # lines PyYAML counts and "\n" does not (a lone CR)
        return None
    indent = len(lines[mark.line]) - len(lines[mark.line].lstrip(" "))
    found = None
    for number in range(mark.line - 1, -1, -1):
        text = lines[number].rstrip("\r\x00")
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith(("#", "---", "%")) or ": " in text or stripped.endswith(":"):
            break  # a comment, a document start or a key of its own: the scalar began below it
        if len(text) - len(text.lstrip(" ")) <= indent and not stripped.startswith("-"):
            found = number
    if found is None:
        return None
    pointer = sum(len(line) + 1 for line in lines[:found])
    column = len(lines[found]) - len(lines[found].lstrip(" "))
    return yaml.Mark(mark.name, pointer + column, found, column, mark.buffer, pointer + column)


def _mark_line(error: yaml.MarkedYAMLError) -> str:
    return str(error.problem_mark.line + 1) if error.problem_mark else "?"


def whole_line(mark: yaml.Mark) -> str:
    """The whole source line a mark points into."""
    buffer = mark.buffer or ""
    start = buffer.rfind("\n", 0, mark.pointer) + 1
    end = buffer.find("\n", mark.pointer)
    return buffer[start:end if end >= 0 else len(buffer)].rstrip("\r\x00")


def _line_text(mark: yaml.Mark) -> str:
    """The source line a mark points into, from its column on (PyYAML keeps the whole text)."""
    buffer = mark.buffer or ""
    end = buffer.find("\n", mark.pointer)
    return buffer[mark.pointer:end if end >= 0 else len(buffer)].rstrip("\r\x00")
