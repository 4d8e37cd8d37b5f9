"""Loading layers into a real Docker daemon in stages: each stage's archive ends only once the
stage before it has loaded, the stages' own images go once the image is there, and a stage
that fails fails the load without leaving them behind."""

from __future__ import annotations

import threading

import docker
import pytest

from jupyterhub_condaspawner import imageload, layers


def file_layers(folder, count: int, size: int) -> list[layers.Layer]:
    folder.mkdir(exist_ok=True)
    made = []
    for index in range(count):
        source = folder / f"file{index}"
        source.write_bytes(bytes([65 + index]) * size)
        made.append(layers.Layer(f"layer{index}", (layers.Entry(f"opt/staged/{index}.txt", source),)))
    return made


def still_there(api, images: list[str]) -> list[str]:
    """Which of these images Docker still has (other tests' loads may hold stage images of their own now)."""
    there = []
    for image in images:
        try:
            api.inspect_image(image)
            there.append(image)
        except docker.errors.ImageNotFound:
            pass
    return there


@pytest.mark.docker
def test_layers_go_in_stages_and_only_the_image_is_left(docker_daemon, base_image, tmp_path, monkeypatch):
    monkeypatch.setattr(imageload, "STAGE_MIN_BYTES", 4096)  # every layer of 8 KiB ends a stage
    api = docker_daemon.client().api
    plan = file_layers(tmp_path, 5, 8192)
    told: list[str] = []
    sent = threading.Event()  # the build keeps its byte code once it is set: not while layers are written
    sent_when_prepared: list[bool] = []

    def prepare(layer: layers.Layer) -> layers.Layer:
        sent_when_prepared.append(sent.is_set())
        return layer

    result = imageload.load_image(api, base_image, plan, {"io.condaspawner.test": "staged"}, set(),
                                  layers.LayerMemo(None), env={"CONDASPAWNER_ENV": "/opt/staged"},
                                  on_image_id=told.append, prepare=prepare, sent=sent)
    try:
        assert len(told) == 5 and told[-1] == result.image_id  # a stage per layer, the last one the image
        assert sent_when_prepared == [False] * 5 and sent.is_set()  # set once every layer's bytes went
        assert result.partial_images == told[:-1] and sorted(result.removed) == sorted(told[:-1])
        assert still_there(api, told) == [result.image_id]  # the stages' images went
        attrs = api.inspect_image(result.image_id)
        assert attrs["RootFS"]["Layers"][-5:] == [diff_id for _, diff_id, _, _ in result.layers]
        assert attrs["Config"]["Labels"]["io.condaspawner.test"] == "staged"
        assert imageload.PARTIAL_LABEL not in attrs["Config"]["Labels"]
        assert "CONDASPAWNER_ENV=/opt/staged" in attrs["Config"]["Env"]
        output = docker_daemon.client().containers.run(
            result.image_id, ["sh", "-c", "cat /opt/staged/*.txt | wc -c; head -c 1 /opt/staged/4.txt; echo"],
            network_mode="none", remove=True)
        assert output.decode().split() == ["40960", "E"]
    finally:
        api.remove_image(result.image_id)


@pytest.mark.docker
def test_a_stage_docker_refuses_fails_the_load_and_leaves_no_stage_image(docker_daemon, base_image, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(imageload, "STAGE_MIN_BYTES", 4096)
    api = docker_daemon.client().api
    plan = file_layers(tmp_path, 2, 8192)
    twice = layers.Layer("twice", (layers.Entry("opt/x.txt", tmp_path / "file0"),) * 2)  # Docker refuses a path twice
    told: list[str] = []
    with pytest.raises(imageload.LoadRefused) as refused:
        imageload.load_image(api, base_image, [*plan, twice, *file_layers(tmp_path / "above", 1, 8192)], {}, set(),
                             layers.LayerMemo(None), on_image_id=told.append)
    assert "\n" not in str(refused.value) and not refused.value.missing_layer
    assert len(told) >= 2 and still_there(api, told) == []  # the first stages' images were made, then removed


@pytest.mark.docker
def test_a_layer_that_cannot_be_written_fails_the_load_and_leaves_no_stage_image(docker_daemon, base_image, tmp_path,
                                                                                 monkeypatch):
    """As when the compile container dies before a layer's byte code is there: ``prepare`` raises."""
    monkeypatch.setattr(imageload, "STAGE_MIN_BYTES", 4096)
    api = docker_daemon.client().api
    plan = file_layers(tmp_path, 4, 8192)

    def prepare(layer: layers.Layer) -> layers.Layer:
        if layer.name == "layer2":
            raise OSError("the compile container ended before batch 3 of 4")
        return layer

    told: list[str] = []
    with pytest.raises(Exception) as failed:
        imageload.load_image(api, base_image, plan, {}, set(), layers.LayerMemo(None), on_image_id=told.append,
                             prepare=prepare)
    assert "batch 3 of 4" in str(failed.value)
    assert len(told) == 2 and still_there(api, told) == []  # layer0's and layer1's stages loaded, and went


@pytest.mark.docker
def test_a_load_told_to_stop_mid_layer_sends_nothing_more_and_leaves_no_image(docker_daemon, base_image, tmp_path,
                                                                             monkeypatch):
    """As when its build times out or is cancelled: the load's threads do not go on sending."""
    monkeypatch.setattr(imageload, "STAGE_MIN_BYTES", 4096)
    api = docker_daemon.client().api
    plan = [*file_layers(tmp_path, 2, 8192), *file_layers(tmp_path / "big", 1, 8 * layers.CHUNK)]
    plan[2] = layers.Layer("big", plan[2].entries)
    plan.append(file_layers(tmp_path / "above", 1, 8192)[0])
    stop = threading.Event()
    read: list[str] = []

    def prepare(layer: layers.Layer) -> layers.Layer:
        read.append(layer.name)
        if layer.name == "big":
            stop.set()  # the build ends while this layer's bytes go
        return layer

    told: list[str] = []
    sent = threading.Event()
    with pytest.raises(imageload.LoadStopped):
        imageload.load_image(api, base_image, plan, {}, set(), layers.LayerMemo(None), on_image_id=told.append,
                             prepare=prepare, stop=stop, sent=sent)
    assert read == ["layer0", "layer1", "big"] and not sent.is_set()  # nothing prepared after the stop
    assert len(told) == 2 and still_there(api, told) == []  # the stages before it loaded, and went


@pytest.mark.docker
def test_a_layer_sent_with_other_bytes_than_its_memo_says_loads_and_corrects_the_memo(docker_daemon, base_image,
                                                                                      tmp_path):
    """What Docker got counts: a stale memo entry (written by an older release, or bytes that changed
    for one identity) costs no failed load, and is right for the next build."""
    api = docker_daemon.client().api
    (layer,) = file_layers(tmp_path, 1, 8192)
    layer = layers.Layer(layer.name, layer.entries, identity="cs-stale")
    memo = layers.LayerMemo(tmp_path / "memo")
    memo.put(layer, "sha256:" + "e" * 64, 123)  # its chain is not held: the layer is sent, and differs
    result = imageload.load_image(api, base_image, [layer], {}, set(), memo)
    try:
        (_, diff_id, size, sent) = result.layers[0]
        assert sent and memo.get(layer) == (diff_id, size) and diff_id == api.inspect_image(result.image_id)[
            "RootFS"]["Layers"][-1]
    finally:
        api.remove_image(result.image_id)
