"""Session fixtures for the local conda dev channel (see jupyterhub_condaspawner.devchannel)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jupyterhub_condaspawner.devchannel import ChannelInfo, build_dev_channel, read_channel_info

REPO_ROOT = Path(__file__).resolve().parents[1]


def bench_dir() -> Path:
    """Where bench state lives: $CONDASPAWNER_BENCH_DIR, else <repo>/.bench."""
    return Path(os.environ.get("CONDASPAWNER_BENCH_DIR") or REPO_ROOT / ".bench")


def require_python(channel: ChannelInfo) -> None:
    """Skip (fail under CI=true) when the channel has no ``python`` package."""
    if channel.python_available:
        return
    message = f"the dev channel has no python package: {channel.python_skip_reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def dev_channel() -> ChannelInfo:
    """The dev channel, built once (cached across sessions) in <bench>/channel."""
    directory = bench_dir() / "channel"
    build_dev_channel(directory, progress=print)
    info = read_channel_info(directory)
    assert info is not None
    return info


@pytest.fixture(scope="session")
def dev_python_channel(dev_channel: ChannelInfo) -> ChannelInfo:
    """The dev channel, for tests that need its ``python`` package."""
    require_python(dev_channel)
    return dev_channel
