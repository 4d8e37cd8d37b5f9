"""End to end: /hub/metrics of a real hub counts a spawn's build, its cache lookups and the GPUs.

One build (the python39 profile, first a cache miss, then a hit) on a hub with one fake
static GPU (FAKE_GPU), sampled every second.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from fixtures_hub import TOKEN, metric

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = "c.GpuAllocator.gpu_sample_interval = 1\n"


def spawn(hub, user: str) -> list[dict]:
    status, body = hub.spawn(user, {"profile": "python39"})
    assert status in (201, 202), body
    events = hub.progress(user)
    assert events[-1].get("ready"), events[-1]
    return events


def test_hub_metrics_count_the_build_the_cache_lookups_and_the_gpus(hub):
    spawn(hub, "metrics-user")  # a cache miss: the image is built
    hub.stop_server("metrics-user")
    spawn(hub, "metrics-user")  # a hit
    hub.stop_server("metrics-user")

    samples = hub.metrics()
    assert metric(samples, "condaspawner_image_cache_lookups_total", result="miss") == 1
    assert metric(samples, "condaspawner_image_cache_lookups_total", result="hit") == 1
    assert metric(samples, "condaspawner_builds_total", result="success", phase="ready") == 1
    assert not [key for key in samples if key[0] == "condaspawner_builds_total" and ("result", "failure") in key[1]]
    assert metric(samples, "condaspawner_build_duration_seconds_count", result="success") == 1
    built_in = metric(samples, "condaspawner_build_duration_seconds_sum", result="success")
    assert built_in is not None and 1 < built_in < 1800
    # The fake GPU: free (python39 asks for none); never idle, it has no utilization reading.
    assert {state: metric(samples, "condaspawner_gpus", state=state)
            for state in ("free", "held_busy", "held_idle", "unusable")} == \
        {"free": 1, "held_busy": 0, "held_idle": 0, "unusable": 0}
    assert metric(samples, "condaspawner_gpu_queue_length") == 0
    assert metric(samples, "condaspawner_gpu_idle_seconds_total") == 0

    status, text = hub.request("GET", "/hub/metrics")
    for name in ("condaspawner_gpu_queue_wait_seconds", "condaspawner_culls_total", "condaspawner_gpu_idle_seconds_total"):
        assert f"# HELP {name} " in text, name  # defined, even with nothing counted yet
    assert "# HELP jupyterhub_" in text  # the hub's own registry: one endpoint for both


def test_hub_metrics_need_the_read_metrics_scope(hub):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(hub.url + "/hub/metrics", timeout=30)
    assert refused.value.code == 403
    request = urllib.request.Request(hub.url + "/hub/metrics", headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
