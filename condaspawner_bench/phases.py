"""Timings of the bench's set-up phases, so that a slow run says where its time went.

    phases = PhaseLog()
    with phases("rootfs image: mmdebstrap bookworm") as phase:
        ...
        phase.note = "cached"          # optional: shown next to the time
    print("\\n".join(phases.summary()))

Phases may run in several threads at once (the set-up overlaps independent parts);
each records when it started, relative to the log's creation, so overlaps show.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Phase:
    name: str
    started: float = 0.0  # seconds after the log began
    seconds: float = 0.0
    note: str = ""
    error: str | None = None


class PhaseLog:
    """A thread-safe list of timed phases; ``say`` hears "name: 12.3 s" as each one ends."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.phases: list[Phase] = []
        self.began = time.monotonic()
        self.wall: float | None = None
        self._say = say
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[Phase]:
        phase = Phase(name, started=time.monotonic() - self.began)
        try:
            yield phase
        except BaseException as error:
            phase.error = " ".join(str(error).split())[:300] or type(error).__name__
            raise
        finally:
            phase.seconds = time.monotonic() - self.began - phase.started
            with self._lock:
                self.phases.append(phase)
            if self._say:
                self._say(_line(phase))

    def finish(self) -> None:
        self.wall = time.monotonic() - self.began

    def summary(self) -> list[str]:
        """One line per phase, in start order, after a line with the wall time."""
        wall = self.wall if self.wall is not None else time.monotonic() - self.began
        lines = [f"{wall:.1f} s wall; independent phases overlap, a phase named 'a: b' is part of 'a'",
                 " start    took  phase"]
        lines += [f"{phase.started:6.1f} {phase.seconds:7.1f}  {_line(phase, timed=False)}"
                  for phase in sorted(self.phases, key=lambda p: p.started)]
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"wall": self.wall, "phases": [asdict(phase) for phase in self.phases]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhaseLog:
        log = cls()
        log.wall = data.get("wall")
        log.phases = [Phase(**phase) for phase in data.get("phases", [])]
        return log

    def dump(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _line(phase: Phase, timed: bool = True) -> str:
    text = phase.name
    if timed:
        text += f": {phase.seconds:.1f} s"
    if phase.note:
        text += f" ({phase.note})"
    if phase.error:
        text += f" FAILED: {phase.error}"
    return text
