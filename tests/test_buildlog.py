"""A build's log: capped as the builder writes it (the head, the tail), read in chunks."""

from __future__ import annotations

import io

from jupyterhub_condaspawner.buildlog import CHUNK_BYTES, CappedLog, LogLines, read_chunk

DOCKER_STEP = ["Step 9/19 : RUN pip install -r requirements.txt", " ---> Running in 6ff3d16200dd"]
DOCKER_STEP_END = [" ---> 1f2e3d4c5b6a", "Removing intermediate container 6ff3d16200dd"]


def written(lines: list[str], head: int, tail: int, path) -> str:
    with path.open("w", buffering=1) as raw, CappedLog(raw, head=head, tail=tail) as log:
        for line in lines:
            log.write(line + "\n")
    return path.read_text()


def test_a_log_under_its_cap_is_written_as_it_comes(tmp_path):
    lines = ["build 0123 started", *DOCKER_STEP, "Collecting cs-noisy", *DOCKER_STEP_END]
    assert written(lines, 10_000, 10_000, tmp_path / "build.log") == "".join(line + "\n" for line in lines)


def test_past_its_head_a_log_keeps_its_tail(tmp_path):
    noise = [f"noisy build backend: line {n:06d}" for n in range(20_000)]  # 36 bytes a line
    lines = ["build 0123 started", *DOCKER_STEP, *noise, "ERROR: Failed building wheel for cs-noisy",
             *DOCKER_STEP_END]
    text = written(lines, 1000, 3600, tmp_path / "build.log")

    assert text.startswith("build 0123 started\nStep 9/19 : RUN pip install -r requirements.txt\n")
    head, rest = text.split("--- the build log is past 1000 bytes: of the rest, the last 3600 bytes are written "
                            "when the build ends ---\n")
    assert len(head) <= 1000
    mid, tail = rest.split(" its last lines ---\n")
    assert mid.startswith("--- the build log past 1000 bytes: ")
    left_out = int(mid.split(" lines) left out, then")[0].rsplit("(", 1)[1])
    assert left_out + len(tail.splitlines()) == len(lines) - len(head.splitlines())
    assert tail.endswith("line 019999\nERROR: Failed building wheel for cs-noisy\n"
                         " ---> 1f2e3d4c5b6a\nRemoving intermediate container 6ff3d16200dd\n")
    assert len(tail.encode()) <= 3600
    assert len(text.encode()) < 1000 + 3600 + 500


def test_a_line_without_end_is_kept_in_pieces_to_the_tails_size(tmp_path):
    with (tmp_path / "build.log").open("w") as raw, CappedLog(raw, head=100, tail=4 * CHUNK_BYTES) as log:
        for _ in range(64):
            log.write("x" * CHUNK_BYTES)  # 4 MiB, no newline
            assert log.kept_bytes + len(log.partial) <= 5 * CHUNK_BYTES + 2
        log.write("the end\n")
    text = (tmp_path / "build.log").read_text()
    assert text.endswith("x\nthe end\n") and len(text) < 100 + 6 * CHUNK_BYTES


def test_a_log_is_read_a_chunk_at_a_time_as_whole_lines(tmp_path):
    path = tmp_path / "build.log"
    long_line = "y" * (CHUNK_BYTES + 10)
    path.write_text("é" * CHUNK_BYTES + "\n" + long_line + "\nno newline at the end")  # é: 2 bytes, split by chunks
    assert read_chunk(tmp_path / "missing.log", 0) is None
    lines, chunks = LogLines(), 0
    got: list[str] = []
    while chunk := read_chunk(path, lines.offset):
        assert len(chunk) <= CHUNK_BYTES
        got += lines.feed(chunk)
        chunks += 1
    got += lines.rest()
    assert chunks == 4 and lines.offset == path.stat().st_size
    assert "".join(got[:1]) == "é" * CHUNK_BYTES
    assert "".join(got[1:-1]) == long_line and all(len(piece) <= 2 * CHUNK_BYTES for piece in got)
    assert got[-1] == "no newline at the end"


def test_a_closed_log_writes_its_tail_once():
    raw = io.StringIO()
    log = CappedLog(raw, head=10, tail=100)
    log.write("0123456789\nabc\n")
    log.close()
    log.close()
    assert raw.getvalue().count("abc\n") == 1
