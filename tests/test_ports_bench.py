"""The bench's loopback ports come from outside the ephemeral range, so that no outgoing
connection can take one between its choice and a server (re)starting on it."""

from __future__ import annotations

import socket

from condaspawner_bench import ports


def test_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice():
    low = int(ports.EPHEMERAL_RANGE.read_text().split()[0])
    chosen = [ports.free_port() for _ in range(50)]
    assert len(set(chosen)) == len(chosen)
    assert all(ports.LOWEST <= port < low for port in chosen)


def test_a_port_something_listens_on_is_never_chosen(monkeypatch):
    with socket.socket() as server:
        # A port no one else uses (not a fixed one: another test process may listen there).
        server.bind(("127.0.0.1", 0))
        server.listen()
        taken = server.getsockname()[1]
        monkeypatch.setattr(ports, "_slice", lambda: (taken, 1 + 99))
        monkeypatch.setattr(ports.random, "randrange", lambda first, end: first)
        # Only the taken port is ever drawn: the kernel's choice is the answer instead.
        assert ports.free_port() != taken


def test_each_xdist_worker_draws_from_its_own_slice(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for worker in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        slices.append(ports._slice())
    ends = [first + span for first, span in slices]
    assert [first for first, _ in slices[1:]] == ends[:-1]  # adjacent, not overlapping
