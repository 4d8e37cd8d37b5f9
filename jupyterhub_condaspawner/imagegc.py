"""Reclaiming disk: a builder's environment images, the bytes each adds to the base
(each layer counted once), and ``gc``: least recently used first, within ``max_images``
and ``disk_budget``, with what failed or killed builds left (leftovers.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import docker

from . import leftovers
from .builderrors import one_line
from .buildmodel import LABEL_KEY
from .leftovers import Leftovers

if TYPE_CHECKING:
    from .builder import ImageBuilder


@dataclass
class GcResult:
    """What ``gc`` removed (or would): ``removed`` least recently used first; ``freed``: bytes
    each removal frees (layers no kept image or the base holds), by image id; ``total``: bytes
    the environment images held beyond the base before; ``notes``: one line per image kept
    that the budget would have removed; ``staging``: staging folders killed builds left;
    ``leftovers``: everything failed or killed builds of this installation left (leftovers.py)."""

    removed: list[docker.models.images.Image] = field(default_factory=list)
    freed: dict[str, int] = field(default_factory=dict)
    total: int = 0
    notes: list[str] = field(default_factory=list)
    staging: dict[str, int] = field(default_factory=dict)  # leftover staging folder -> its bytes
    leftovers: Leftovers = field(default_factory=Leftovers)

    @property
    def freed_total(self) -> int:
        return sum(self.freed.values())


def images(builder: ImageBuilder) -> list[docker.models.images.Image]:
    """This builder's environment images on its daemon: in ``repository``, labelled with a key."""
    return [
        image for image in builder.client.images.list(name=builder.repository, filters={"label": LABEL_KEY})
        if builder.tag_for(image.labels[LABEL_KEY]) in image.tags
    ]


def layer_sizes(builder: ImageBuilder, image: docker.models.images.Image) -> dict[str, int]:
    """The image's layers that hold bytes, as {layer key: bytes}.

    A layer's key is a digest of the image's history up to that layer (docker's history
    entries, oldest first): images built on one base, or reusing one cached step, share
    those entries and so the keys of the layers they share.
    """
    with builder.daemon_call("reading an image's layers"):
        history = builder.client.api.history(image.id)  # newest first
    chain = hashlib.sha256()
    sizes: dict[str, int] = {}
    for entry in reversed(history):
        chain.update(json.dumps([entry.get("Created"), entry.get("CreatedBy"), entry.get("Size")]).encode())
        if entry.get("Size"):
            sizes[chain.hexdigest()] = int(entry["Size"])
    return sizes


def own_layers(builder: ImageBuilder, images: list[docker.models.images.Image]) -> dict[str, dict[str, int]]:
    """Each image's layers (by id) less the base image's: the bytes an environment image adds."""
    try:
        with builder.daemon_call("looking up the base image"):
            base = set(layer_sizes(builder, builder.client.images.get(builder.base_image)))
    except docker.errors.ImageNotFound:
        base = set()
    return {image.id: {key: size for key, size in layer_sizes(builder, image).items() if key not in base}
            for image in images}


def gc_plan(builder: ImageBuilder, keep: Mapping[str, str] | None = None) -> GcResult:
    """What `gc` would remove: least recently used first, never one a container uses, never one with
    another tag or one of ``keep`` (build key -> whose: the profiles' current images, prebuilt for a
    class that has not started them lately; a note says which), until the images fit ``max_images``
    and ``disk_budget``.

    Sizes count each layer once and never the base: an image's ``freed`` bytes are the layers
    no image that stays holds, ``total`` the bytes all environment images add to the base.
    """
    # ignore_removed: on a shared daemon another hub may remove a container between the
    # listing and its inspection.
    in_use = {container.attrs.get("Image")
              for container in builder.client.containers.list(all=True, ignore_removed=True)}
    candidates = sorted(images(builder), key=lambda image: builder.last_used(image.labels[LABEL_KEY]))
    layers = own_layers(builder, candidates)
    holders: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for image_layers in layers.values():
        for key, size in image_layers.items():
            holders[key] = holders.get(key, 0) + 1
            sizes[key] = size
    result = GcResult(total=sum(sizes.values()))
    total, count = result.total, len(candidates)
    for image in candidates:
        over_count = builder.max_images and count > builder.max_images
        over_budget = builder.disk_budget and total > int(builder.disk_budget)
        if not (over_count or over_budget):
            break
        if image.id in in_use:
            continue
        tag = builder.tag_for(image.labels[LABEL_KEY])
        if keep and image.labels[LABEL_KEY] in keep:
            result.notes.append(f"kept {tag}: the current image of {keep[image.labels[LABEL_KEY]]}")
            continue
        with builder.records.unpinned(image.labels[LABEL_KEY]) as free:
            if not free:
                result.notes.append(f"kept {tag}: a server is starting with it")
                continue
        others = [other for other in image.tags if other != tag]
        if others:
            result.notes.append(f"kept {tag}: it is also tagged {', '.join(others)} (`docker rmi {others[0]}` "
                                "lets gc remove it)")
            continue
        freed = 0
        for key in layers[image.id]:
            holders[key] -= 1
            freed += sizes[key] if holders[key] == 0 else 0
        result.removed.append(image)
        result.freed[image.id] = freed
        count -= 1
        total -= freed
    return result


def gc(builder: ImageBuilder, dry_run: bool = False, keep: Mapping[str, str] | None = None) -> GcResult:
    """Remove the images of :func:`gc_plan` and what failed or killed builds of this installation
    left (leftovers.py), unless ``dry_run``; what was removed, and notes.

    An image docker refuses to remove (tagged or used since the plan) is kept with a note;
    gc goes on with the others.
    """
    result = gc_plan(builder, keep)
    found = leftovers.find(builder)
    result.leftovers = found if dry_run else leftovers.remove(builder, found)
    result.notes.extend(result.leftovers.notes)
    result.staging = {str(folder): size for folder, size in result.leftovers.staging.items()}
    if dry_run:
        return result
    for image in list(result.removed):
        tag = builder.tag_for(image.labels[LABEL_KEY])
        # Held while docker removes it: a start looking the image up meanwhile waits, then builds it.
        with builder.records.unpinned(image.labels[LABEL_KEY]) as free:
            if not free:
                _keep(result, image, f"kept {tag}: a server is starting with it")
                continue
            try:
                with builder.daemon_call("removing an image"):
                    builder.client.images.remove(image.id, noprune=False)
            except docker.errors.APIError as error:
                _keep(result, image, f"kept {tag}: docker refused to remove it ({one_line(error.explanation or error)})")
    return result


def _keep(result: GcResult, image: docker.models.images.Image, note: str) -> None:
    result.removed.remove(image)
    result.freed.pop(image.id, None)
    result.notes.append(note)
