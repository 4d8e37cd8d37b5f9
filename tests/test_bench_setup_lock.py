"""One set-up of a bench folder at a time: a second (a second `make demo` during the first's
set-up, `demo-admin` beside a test run's own) waits, and says so, instead of running mmdebstrap
into the same rootfs folder."""

from __future__ import annotations

import threading

from condaspawner_bench.bench import one_setup_at_a_time


def test_a_second_set_up_of_a_bench_folder_waits_for_the_first_and_says_so(tmp_path):
    said: list[str] = []
    waiting, second_ran = threading.Event(), threading.Event()

    def say(line: str) -> None:
        said.append(line)
        waiting.set()

    def second() -> None:
        with one_setup_at_a_time(tmp_path, say):
            second_ran.set()

    with one_setup_at_a_time(tmp_path, say):
        other = threading.Thread(target=second)
        other.start()
        assert waiting.wait(60)  # a safety net only: it says so before it blocks
        assert not second_ran.is_set()
    other.join(60)
    assert second_ran.is_set()
    assert said == [f"another process is setting up {tmp_path}: waiting for it to finish"]
    with one_setup_at_a_time(tmp_path, say):  # free again: no wait, nothing said
        pass
    assert len(said) == 1


def test_lines_said_from_the_set_up_threads_never_run_together(monkeypatch):
    import io
    import sys

    from condaspawner_bench import cli

    class Slow(io.StringIO):
        def write(self, text: str) -> int:  # a thread switch between two writes, every time
            written = super().write(text)
            threading.Event().wait(0.0005)
            return written

    stream = Slow()
    monkeypatch.setattr(sys, "stderr", stream)
    lines = [f"bench: part {n}: 0.0 s (cached)" for n in range(8)]
    threads = [threading.Thread(target=lambda line=line: [cli._say(line) for _ in range(20)]) for line in lines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(stream.getvalue().splitlines()) == sorted(line for line in lines for _ in range(20))
