"""Session fixtures for the local conda channels (see condaspawner_bench.devchannel, .realchannel)."""

from __future__ import annotations

import pytest
from fixtures_docker import bench_dir, bench_unavailable

from condaspawner_bench.devchannel import (
    ChannelInfo,
    build_dev_channel,
    read_channel_info,
)
from condaspawner_bench.realchannel import build_real_channel, real_channel_dir


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


def real_channel(real_set: str) -> ChannelInfo:
    """The dev channel plus ``real_set``'s converted PyPI wheels, built once (cached across
    sessions) in <bench>/channel-<set>; skip (fail under CI=true) when it cannot be built."""
    try:
        return build_real_channel(real_channel_dir(bench_dir(), real_set), real_set, progress=print)
    except RuntimeError as error:  # no python 3.9 to package, pip download failed, no zstd
        bench_unavailable(f"the {real_set} channel cannot be built: {error}")
        raise


@pytest.fixture(scope="session")
def datascience_channel() -> ChannelInfo:
    """The demo's channel: numpy, pandas, matplotlib and their closure (~60 MB of wheels)."""
    return real_channel("datascience")
