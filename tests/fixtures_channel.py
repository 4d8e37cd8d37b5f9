"""Session fixtures for the local conda dev channel (see condaspawner_bench.devchannel)."""

from __future__ import annotations

import pytest
from fixtures_docker import bench_dir, bench_unavailable

from condaspawner_bench.devchannel import (
    ChannelInfo,
    build_dev_channel,
    read_channel_info,
)


def require_python(channel: ChannelInfo) -> None:
    """Skip (fail under CI=true) when the channel has no ``python`` package."""
    if not channel.python_available:
        bench_unavailable(f"the dev channel has no python package: {channel.python_skip_reason}")


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
