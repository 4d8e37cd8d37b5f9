"""A build's log (``builds/<key>/build.log``), capped as it is written and read in chunks.

A pip section may run a package's build code, whose output pip prints whole when it fails:
hundreds of MB. The builder writes every line as it comes, so that a hub killed mid-build
(SIGKILL, out of memory) leaves what the build did last, where its error is. Past
LOG_HEAD_BYTES the log is cut: its first LOG_HEAD_BYTES, one line saying how much was left out,
then the rest as it comes. Once that rest passes twice LOG_TAIL_BYTES, the file is written anew
(next to it, then renamed over it) with only its last LOG_TAIL_BYTES, and again when the build
ends: on disk a log stays under about LOG_HEAD_BYTES + 2 x LOG_TAIL_BYTES, in memory it is
nothing. No code reads ids back from it (what docker made is in made.json, madeids.py): it is
for people. Readers (LogReader) take the file a chunk at a time, in a thread, off one open
file: a download reads the file it opened, whole; a live log follows the writer into each new
file from where it was (LogLines makes lines of the chunks).
"""

from __future__ import annotations

import codecs
import io
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO

MIB = 1024 * 1024
LOG_HEAD_BYTES = 1 * MIB
LOG_TAIL_BYTES = 4 * MIB
CHUNK_BYTES = 64 * 1024  # what a reader takes at once
MARKER_MAX = 512  # the cut's line is shorter
_LEFT_OUT = re.compile(rb"--- the build log past [^:\n]*: (?:(\d+) bytes \(\d+ lines\) left out, then )?"
                       rb"its last lines ---\n")


class CappedLog(io.TextIOBase):
    """The log at ``path``, written as it comes, capped: its first ``head`` bytes, the line
    saying how much was left out, then the last ``tail`` to 2 x ``tail`` bytes of the rest
    (``tail`` once closed)."""

    def __init__(self, path: Path, head: int = LOG_HEAD_BYTES, tail: int = LOG_TAIL_BYTES) -> None:
        super().__init__()
        self.path, self.head, self.tail = path, head, tail
        for stale in path.parent.glob(f".{path.name}.*"):  # a cut a killed process left half-written
            stale.unlink(missing_ok=True)
        self.file: BinaryIO = _new_file_over(path)
        self.head_left = head
        self.line_open = False  # the head's last write did not end its line
        self.cut_at = -1  # past the head: where the line saying what was left out starts
        self.rest_at = 0  # past the head: where the rest kept starts
        self.rest_lines = 0  # the lines ended in the rest kept
        self.left_out_bytes = self.left_out_lines = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        if self.cut_at < 0 and len(data) > self.head_left:
            self._start_cutting()
        self._append(data)
        if self.cut_at < 0:
            self.head_left -= len(data)
            self.line_open = not data.endswith(b"\n") if data else self.line_open
        else:
            self.rest_lines += data.count(b"\n")
            if self.file.tell() - self.rest_at > 2 * self.tail:
                self._cut()
        return len(text)

    def flush(self) -> None:
        if not self.file.closed:
            self.file.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.cut_at >= 0 and self.file.tell() - self.rest_at > self.tail:
                self._cut()
        finally:
            self.file.close()
            super().close()

    def _append(self, data: bytes) -> None:
        # Each write reaches the file at once: a process killed next leaves it.
        self.file.write(data)
        self.file.flush()

    def _start_cutting(self) -> None:
        if self.line_open:
            self._append(b"\n")
        self.cut_at = self.file.tell()
        self._append(_marker(self.head, 0, 0))
        self.rest_at = self.file.tell()

    def _cut(self) -> None:
        """Write the file anew next to it, with the rest's last ``tail`` bytes only, and rename it
        over this one (a reader sees one or the other, whole); then write on into the new one."""
        end = self.file.tell()
        start = _line_start(self.file, max(self.rest_at, end - self.tail), end)
        kept_lines = _count_lines(self.file, start, end)
        left_out_bytes = self.left_out_bytes + start - self.rest_at
        left_out_lines = self.left_out_lines + self.rest_lines - kept_lines
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        new = os.fdopen(handle, "w+b")
        try:
            os.fchmod(handle, os.fstat(self.file.fileno()).st_mode & 0o777)  # the admin's CLI reads it too
            _copy(self.file, new, 0, self.cut_at)
            new.write(_marker(self.head, left_out_bytes, left_out_lines))
            rest_at = new.tell()
            _copy(self.file, new, start, end)
            new.flush()
            os.replace(temporary, self.path)
        except BaseException:
            new.close()
            Path(temporary).unlink(missing_ok=True)
            raise
        self.file.close()
        self.file, self.rest_at, self.rest_lines = new, rest_at, kept_lines
        self.left_out_bytes, self.left_out_lines = left_out_bytes, left_out_lines


class LogReader:
    """A build log open for reading, a chunk at a time off the one file it opened (a download:
    that file whole, whatever cut comes after), or following the writer's cuts (a live log)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO | None = None
        self.offset = 0

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def read(self, size: int = CHUNK_BYTES) -> bytes | None:
        """Up to ``size`` next bytes (b"" at the end, for now); None if the log cannot be read."""
        try:
            if self.file is None:
                self.file = self.path.open("rb")
            chunk = os.pread(self.file.fileno(), size, self.offset)
        except OSError:
            return None
        self.offset += len(chunk)
        return chunk

    def follow(self) -> bytes:
        """The next bytes; at the end of a file a cut replaced, on from the same line in the new one."""
        chunk = self.read()
        if not chunk and self._switch():
            chunk = self.read()
        return chunk or b""

    def _switch(self) -> bool:
        try:
            new = self.path.open("rb")
        except OSError:
            return False
        if self.file is None or os.path.sameopenfile(new.fileno(), self.file.fileno()):
            new.close()
            return False
        self.offset = _resume_at(self.file, new, self.offset)
        self.file.close()
        self.file = new
        return True


class LogLines:
    """A log's bytes, chunk after chunk, as whole lines (a line longer than a chunk: in pieces)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, chunk: bytes) -> list[str]:
        """The lines ``chunk`` ends (the log's next bytes), without their newlines."""
        lines = (self._pending + self._decoder.decode(chunk)).split("\n")
        self._pending = lines.pop()
        if len(self._pending) > CHUNK_BYTES:
            lines.append(self._pending)
            self._pending = ""
        return lines

    def rest(self) -> list[str]:
        """The last line, if the log does not end with one."""
        rest, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return [rest] if rest else []


def _new_file_over(path: Path) -> BinaryIO:
    """A new, empty file renamed over ``path`` (a rebuild's log): whoever still reads the last
    build's log (a download) reads it whole, not a file emptied under them."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    file = os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), "w+b")  # the umask's mode
    try:
        os.replace(partial, path)
    except BaseException:
        file.close()
        partial.unlink(missing_ok=True)
        raise
    return file


def _marker(head: int, left_out_bytes: int, left_out_lines: int) -> bytes:
    left_out = f"{left_out_bytes} bytes ({left_out_lines} lines) left out, then " if left_out_bytes else ""
    return f"--- the build log past {_amount(head)}: {left_out}its last lines ---\n".encode()


def _resume_at(old: BinaryIO, new: BinaryIO, end: int) -> int:
    """Where in ``new``, the file a cut wrote, the bytes after ``old``'s first ``end`` are.

    The two differ first in their lines saying what was left out, after the same head: found by
    place, not by their words, which a line of the build's own output could copy. A file that is
    no cut of ``old``: from its start."""
    differ = _first_difference(old, new)
    before = _pread(new, max(0, differ - MARKER_MAX), differ)
    if b"\n" not in before and differ > MARKER_MAX:
        return 0
    cut_at = differ - len(before) + before.rfind(b"\n") + 1
    old_marker = _LEFT_OUT.match(_pread(old, cut_at, cut_at + MARKER_MAX))
    new_marker = _LEFT_OUT.match(_pread(new, cut_at, cut_at + MARKER_MAX))
    if old_marker is None or new_marker is None:
        return 0
    if end <= cut_at:  # still in the head, the same in both
        return end
    done = int(old_marker.group(1) or 0) + end - (cut_at + old_marker.end())  # bytes of the rest read so far
    at = cut_at + new_marker.end() + done - int(new_marker.group(1) or 0)
    return at if at >= cut_at + new_marker.end() else cut_at  # fell behind the cut: from the line saying so


def _first_difference(one: BinaryIO, other: BinaryIO) -> int:
    at = 0
    while True:
        mine, theirs = _pread(one, at, at + CHUNK_BYTES), _pread(other, at, at + CHUNK_BYTES)
        if mine != theirs or not mine:
            return at + len(os.path.commonprefix([mine, theirs]))
        at += len(mine)


def _line_start(file: BinaryIO, at: int, end: int) -> int:
    """The first line's start from ``at`` on; a line longer than a chunk is cut at a character."""
    window = _pread(file, at - 1, min(end, at - 1 + CHUNK_BYTES))
    newline = window.find(b"\n")
    if newline >= 0:
        return at + newline
    while at < end and _pread(file, at, at + 1)[0] & 0xC0 == 0x80:  # inside a UTF-8 character
        at += 1
    return at


def _count_lines(file: BinaryIO, start: int, end: int) -> int:
    return sum(_pread(file, at, min(end, at + CHUNK_BYTES)).count(b"\n") for at in range(start, end, CHUNK_BYTES))


def _copy(source: BinaryIO, target: BinaryIO, start: int, end: int) -> None:
    for at in range(start, end, CHUNK_BYTES):
        target.write(_pread(source, at, min(end, at + CHUNK_BYTES)))


def _pread(file: BinaryIO, start: int, end: int) -> bytes:
    return os.pread(file.fileno(), end - start, start) if end > start else b""


def _amount(size: int) -> str:
    return f"{size // MIB} MiB" if size % MIB == 0 else f"{size} bytes"
