"""Shared pytest setup. Bench fixtures (Docker daemon, conda channel) live in their own modules."""

import time

pytest_plugins = ["fixtures_docker", "fixtures_channel", "fixtures_hub", "fixtures_swarm", "fixtures_registry"]


def pytest_unconfigure(config):
    # py-rattler 0.28's worker threads may still be releasing the GIL just after an
    # awaited call returns; if the interpreter is finalizing then, the process aborts
    # (exit 134/139) after every test passed. Give them a moment.
    time.sleep(0.3)
