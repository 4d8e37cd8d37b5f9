"""A build's log (``builds/<key>/build.log``), capped as it is written and read in chunks.

A pip section may run a package's build code, whose output pip prints whole when it fails:
hundreds of MB. The builder writes the first LOG_HEAD_BYTES as they come, then keeps only
the last LOG_TAIL_BYTES of the rest, in memory, and writes them when the build ends (the
error is at the end). No code reads ids back from it (what docker made is in made.json,
madeids.py): it is for people. Readers take the file a chunk at a time (read_chunk;
LogLines makes lines of the chunks), in a thread.
"""

from __future__ import annotations

import codecs
import io
from collections import deque
from pathlib import Path
from typing import TextIO

MIB = 1024 * 1024
LOG_HEAD_BYTES = 1 * MIB
LOG_TAIL_BYTES = 4 * MIB
CHUNK_BYTES = 64 * 1024  # what a reader takes at once


class CappedLog(io.TextIOBase):
    """``raw`` (a text file open for writing), capped: the first ``head`` bytes and, written
    when closed, the last ``tail`` bytes of the rest."""

    def __init__(self, raw: TextIO, head: int = LOG_HEAD_BYTES, tail: int = LOG_TAIL_BYTES) -> None:
        super().__init__()
        self.raw, self.head_left, self.tail = raw, head, tail
        self.head = head
        self.capping = False
        self.line_open = False  # the head's last write did not end its line
        self.partial = ""  # past the head: the start of a line not yet ended
        self.kept: deque[tuple[str, int]] = deque()  # past the head: (line, its bytes), oldest first
        self.kept_bytes = 0
        self.left_out_bytes = self.left_out_lines = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not self.capping:
            size = _size(text)
            if size <= self.head_left:
                self.raw.write(text)
                self.head_left -= size
                self.line_open = not text.endswith("\n") if text else self.line_open
                return len(text)
            self._start_capping()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        if len(self.partial) > CHUNK_BYTES:  # a line without end: kept in pieces
            lines.append(self.partial)
            self.partial = ""
        for line in lines:
            self._past_head(line + "\n")
        return len(text)

    def flush(self) -> None:
        if not self.raw.closed:
            self.raw.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.capping and not self.raw.closed:
                self._write_tail()
                self.raw.flush()
        finally:
            super().close()

    def _start_capping(self) -> None:
        self.capping = True
        self.raw.write(("\n" if self.line_open else "") +
                       f"--- the build log is past {_amount(self.head)}: of the rest, the last "
                       f"{_amount(self.tail)} are written when the build ends ---\n")

    def _past_head(self, line: str) -> None:
        size = _size(line)
        self.kept.append((line, size))
        self.kept_bytes += size
        while self.kept_bytes > self.tail:
            _, dropped = self.kept.popleft()
            self.kept_bytes -= dropped
            self.left_out_bytes += dropped
            self.left_out_lines += 1

    def _write_tail(self) -> None:
        if self.partial:
            self._past_head(self.partial + "\n")
            self.partial = ""
        left_out = (f"{self.left_out_bytes} bytes ({self.left_out_lines} lines) left out, then "
                    if self.left_out_lines else "")
        self.raw.write(f"--- the build log past {_amount(self.head)}: {left_out}its last lines ---\n")
        self.raw.writelines(line for line, _ in self.kept)
        self.kept.clear()


class LogLines:
    """A log's bytes, chunk after chunk, as whole lines (a line longer than a chunk: in pieces)."""

    def __init__(self) -> None:
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, chunk: bytes) -> list[str]:
        """The lines ``chunk`` ends (the log's next bytes), without their newlines."""
        self.offset += len(chunk)
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


def read_chunk(path: Path, offset: int, size: int = CHUNK_BYTES) -> bytes | None:
    """Up to ``size`` bytes of ``path`` from ``offset`` (b"" at its end); None if it cannot be read."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read(size)
    except OSError:
        return None


def _size(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


def _amount(size: int) -> str:
    return f"{size // MIB} MiB" if size % MIB == 0 else f"{size} bytes"
