"""A build's log: capped as the builder writes it (the head, the recent tail, on disk as it
comes), read in chunks, followed across the writer's cuts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from jupyterhub_condaspawner.buildlog import CHUNK_BYTES, MARKER_MAX, CappedLog, LogLines, LogReader

DOCKER_STEP = ["Step 9/19 : RUN pip install -r requirements.txt", " ---> Running in 6ff3d16200dd"]
DOCKER_STEP_END = [" ---> 1f2e3d4c5b6a", "Removing intermediate container 6ff3d16200dd"]
NOISE = [f"noisy build backend: line {n:06d}" for n in range(20_000)]  # 36 bytes a line
FIRST_CUT = "--- the build log past 1000 bytes: its last lines ---"
HEAD, TAIL = 1000, 3600
# What the file may hold at any moment: the head, the line saying what was left out, twice the tail.
MOST_ON_DISK = HEAD + MARKER_MAX + 2 * TAIL


def written(lines: list[str], head: int, tail: int, path: Path) -> str:
    with CappedLog(path, head=head, tail=tail) as log:
        for line in lines:
            log.write(line + "\n")
    return path.read_text()


def parts(text: str) -> tuple[str, int, int, str]:
    """A capped log's head, the bytes and lines left out after it, and the rest kept."""
    head, rest = text.split("--- the build log past 1000 bytes: ")
    said, kept = rest.split("its last lines ---\n")
    left_out = re.fullmatch(r"(?:(\d+) bytes \((\d+) lines\) left out, then )?", said)
    assert left_out, said
    return head, int(left_out.group(1) or 0), int(left_out.group(2) or 0), kept


def assert_whole(text: str, lines: list[str]) -> None:
    """``text`` is ``lines``' head, what was left out of them said right, and their last lines."""
    head, left_out_bytes, left_out_lines, kept = parts(text)
    past_head = lines[len(head.splitlines()):]
    assert len(head.encode()) <= HEAD and lines[:len(head.splitlines())] == head.splitlines()
    assert left_out_lines + len(kept.splitlines()) == len(past_head)
    assert left_out_bytes + len(kept.encode()) == sum(len(line) + 1 for line in past_head)
    assert kept.splitlines() == past_head[len(past_head) - len(kept.splitlines()):]


def test_a_log_under_its_cap_is_written_as_it_comes(tmp_path):
    lines = ["build 0123 started", *DOCKER_STEP, "Collecting cs-noisy", *DOCKER_STEP_END]
    assert written(lines, 10_000, 10_000, tmp_path / "build.log") == "".join(line + "\n" for line in lines)


def test_past_its_head_a_closed_log_keeps_its_last_lines(tmp_path):
    lines = ["build 0123 started", *DOCKER_STEP, *NOISE, "ERROR: Failed building wheel for cs-noisy",
             *DOCKER_STEP_END]
    text = written(lines, HEAD, TAIL, tmp_path / "build.log")

    assert text.startswith("build 0123 started\nStep 9/19 : RUN pip install -r requirements.txt\n")
    assert text.count("its last lines ---\n") == 1 and " lines) left out, then its last lines ---\n" in text
    assert_whole(text, lines)
    kept = parts(text)[3]
    assert kept.endswith("line 019999\nERROR: Failed building wheel for cs-noisy\n"
                         " ---> 1f2e3d4c5b6a\nRemoving intermediate container 6ff3d16200dd\n")
    assert TAIL - 50 <= len(kept.encode()) <= TAIL
    assert [path.name for path in tmp_path.iterdir()] == ["build.log"]


def test_a_log_on_disk_has_its_recent_lines_and_a_bounded_size_while_written(tmp_path):
    path, lines = tmp_path / "build.log", ["build 0123 started", *NOISE[:5000]]
    with CappedLog(path, head=HEAD, tail=TAIL) as log:
        for number, line in enumerate(lines):
            log.write(line + "\n")
            on_disk = path.read_bytes()
            assert len(on_disk) <= MOST_ON_DISK and on_disk.endswith(line.encode() + b"\n")
            if number % 97 == 0 and len(on_disk) > HEAD:
                assert_whole(on_disk.decode(), lines[:number + 1])


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from jupyterhub_condaspawner.buildlog import CappedLog
log = CappedLog(Path(sys.argv[1]), head=1000, tail=3600)
for line in sys.stdin:
    log.write(line)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_build_leaves_the_head_what_was_left_out_and_the_last_lines(tmp_path):
    path, lines = tmp_path / "build.log", ["build 0123 started", *NOISE[:4321], "ERROR: the last line"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], text=True,
                            input="".join(f"{line}\n" for line in lines), cwd=Path(__file__).parents[1])
    assert killed.returncode == -signal.SIGKILL
    text = path.read_text()
    assert len(text.encode()) <= MOST_ON_DISK and text.endswith("line 004320\nERROR: the last line\n")
    assert parts(text)[1] > 0  # some was left out, and the log says how much
    assert_whole(text, lines)


def test_a_new_log_removes_the_half_written_cut_of_a_killed_writer(tmp_path):
    (tmp_path / ".build.log.x1y2z3").write_text("a cut, half written")
    CappedLog(tmp_path / "build.log").close()
    assert [path.name for path in tmp_path.iterdir()] == ["build.log"]


def followed(reader: LogReader, lines: LogLines) -> list[str]:
    got: list[str] = []
    while chunk := reader.follow():
        got += lines.feed(chunk)
    return got


def test_a_live_reader_follows_the_log_past_its_head_across_its_cuts(tmp_path):
    path, lines = tmp_path / "build.log", ["build 0123 started", *NOISE[:3000], "ERROR: the last line"]
    got, reading = [], LogLines()
    with LogReader(path) as reader:
        with CappedLog(path, head=HEAD, tail=TAIL) as log:
            for number, line in enumerate(lines):
                log.write(line + "\n")
                if number % 50 == 0:  # 1800 bytes at most behind: never past a cut
                    got += followed(reader, reading)
        got += followed(reader, reading) + reading.rest()  # on through the cut when the log closed
    head = parts(path.read_text())[0].splitlines()
    assert got == [*head, FIRST_CUT, *lines[len(head):]]


def test_a_live_reader_left_behind_by_a_cut_is_told_what_it_missed(tmp_path):
    path, lines = tmp_path / "build.log", ["build 0123 started", *NOISE[:3000]]
    got, reading = [], LogLines()
    with LogReader(path) as reader:
        with CappedLog(path, head=HEAD, tail=TAIL) as log:
            for number, line in enumerate(lines):
                log.write(line + "\n")
                if number % 500 == 0:  # 18 000 bytes behind: past several cuts
                    got += followed(reader, reading)
        got += followed(reader, reading) + reading.rest()
    past_head = got[got.index(FIRST_CUT) + 1:]
    numbers = [int(line.rsplit(" ", 1)[1]) if line.startswith("noisy") else None for line in past_head]
    assert numbers[-1] == 2999 and all(number is not None or "lines) left out, then" in line
                                       for number, line in zip(numbers, past_head))
    seen = [number for number in numbers if number is not None]
    assert seen == sorted(set(seen))  # in order, none twice
    for at, number in enumerate(numbers[1:], 1):
        if number is not None and numbers[at - 1] is not None and number != numbers[at - 1] + 1:
            raise AssertionError(f"lines {numbers[at - 1]} to {number} missed without a word")


def test_a_download_reads_the_file_it_opened_whole_whatever_cut_comes_after(tmp_path):
    path, lines = tmp_path / "build.log", ["build 0123 started", *NOISE[:3000]]
    with CappedLog(path, head=HEAD, tail=TAIL) as log, LogReader(path) as reader:
        for line in lines[:40]:
            log.write(line + "\n")
        got = reader.read(200) or b""
        for line in lines[40:]:
            log.write(line + "\n")
        while chunk := reader.read():
            got += chunk
    text = got.decode()
    head, left_out_bytes, _, kept = parts(text)
    assert left_out_bytes == 0 and text.endswith("\n")
    assert [*head.splitlines(), *kept.splitlines()] == lines[:len(head.splitlines()) + len(kept.splitlines())]
    assert len(kept.encode()) > 2 * TAIL  # the file as it was until the first cut replaced it


def test_a_rebuild_starts_a_new_log_and_a_download_of_the_last_one_reads_it_whole(tmp_path):
    path = tmp_path / "build.log"
    path.parent.chmod(0o755)
    with CappedLog(path, head=HEAD, tail=TAIL) as log:
        log.write("the first build failed\n")
    with LogReader(path) as reader:
        first = reader.read(10) or b""
        with CappedLog(path, head=HEAD, tail=TAIL) as rebuild:
            rebuild.write("the rebuild\n")
            while chunk := reader.read():
                first += chunk
    assert first == b"the first build failed\n"
    assert path.read_text() == "the rebuild\n"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # the admin's CLI reads it as before
    assert [p.name for p in tmp_path.iterdir()] == ["build.log"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_line_without_end_is_cut_at_a_character_to_the_tails_size(tmp_path):
    path = tmp_path / "build.log"
    with CappedLog(path, head=100, tail=4 * CHUNK_BYTES) as log:
        for _ in range(64):
            log.write("é" * (CHUNK_BYTES // 2))  # 4 MiB in all, no newline
            assert path.stat().st_size <= MARKER_MAX + 8 * CHUNK_BYTES
        log.write("the end\n")
    text = path.read_text()  # strict UTF-8: no character was cut in two
    assert text.endswith("éthe end\n") and len(text.encode()) <= MARKER_MAX + 4 * CHUNK_BYTES


def test_a_log_is_read_a_chunk_at_a_time_as_whole_lines(tmp_path):
    path = tmp_path / "build.log"
    long_line = "y" * (CHUNK_BYTES + 10)
    path.write_text("é" * CHUNK_BYTES + "\n" + long_line + "\nno newline at the end")  # é: 2 bytes, split by chunks
    assert LogReader(tmp_path / "missing.log").read() is None
    lines, chunks = LogLines(), 0
    got: list[str] = []
    with LogReader(path) as reader:
        while chunk := reader.read():
            assert len(chunk) <= CHUNK_BYTES
            got += lines.feed(chunk)
            chunks += 1
    got += lines.rest()
    assert chunks == 4 and reader.offset == path.stat().st_size
    assert "".join(got[:1]) == "é" * CHUNK_BYTES
    assert "".join(got[1:-1]) == long_line and all(len(piece) <= 2 * CHUNK_BYTES for piece in got)
    assert got[-1] == "no newline at the end"


def test_a_closed_log_writes_its_tail_once(tmp_path):
    log = CappedLog(tmp_path / "build.log", head=10, tail=100)
    log.write("0123456789\nabc\n")
    log.close()
    log.close()
    assert (tmp_path / "build.log").read_text().count("abc\n") == 1
