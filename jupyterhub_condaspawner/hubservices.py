"""What all spawners of one hub share (:class:`HubServices`): the profile catalog, the spec
policy, the image builder, the GPU allocator and its queue, the notices, the GPU-aware
culler and the usage log, created from the hub's config on a spawner's first use; and the
hub's GPU sampler, which feeds the metrics and the culler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from traitlets import TraitError
from traitlets.config import Config

from .builder import ImageBuilder
from .builderrors import one_line
from .configcheck import misspelled_sections
from .culler import Cull, GpuIdleCuller
from .dockerclient import daemon_settings
from .gpuinventory import GpuInventory
from .gpuqueue import GpuQueue
from .gpus import Allocation, GpuAllocator
from .notices import Notices
from .owners import VolumeLedger
from .profiles import ProfileCatalog
from .resolve import Resolver
from .spec import SpecPolicy
from .usage import UsageLog

if TYPE_CHECKING:
    from .spawner import CondaSpawner

# One GPU sample: GPU states and, where not the allocator's table, what each server holds.
GpuSample = tuple[Mapping[str, str], Optional[Mapping[tuple[str, str], Allocation]]]


@dataclass
class HubServices:
    """What all spawners of one hub share: one catalog, one builder, one GPU allocator."""

    catalog: ProfileCatalog
    policy: SpecPolicy
    builder: ImageBuilder
    allocator: GpuAllocator
    queue: GpuQueue
    notices: Notices
    culler: GpuIdleCuller
    usage: UsageLog  # who started which environment (the environments page)
    owners: VolumeLedger  # home volumes adopted from an older hub, or orphaned by a deleted user
    sampler: asyncio.Task | None = None  # samples the GPUs every GpuAllocator.gpu_sample_interval
    sample_gpus: Callable[[], GpuSample] | None = None  # one sample (CondaSpawner.gpu_sampler)
    warned_unsampled: bool = False  # the log said once that gpu_sample_interval = 0 turns GPU idle culling off
    checking: set[str] = field(default_factory=set)  # users whose Check (the form's button) runs now
    # One restore of the GPU table at a time: a second would replace the table with a listing
    # older than what the first let starts allocate meanwhile.
    restoring: asyncio.Lock = field(default_factory=asyncio.Lock)


class HubConfigError(ValueError):
    """A setting in the hub's config that the shared services refuse (``static_gpus`` without a
    ``uuid``, a ``policy`` that does not exist, ...): the admin's to fix, never a stopped server."""


# Keyed by the config's id; the config itself is kept too, so that id is never reused.
_services: dict[int, tuple[Any, HubServices]] = {}
_warned: dict[int, Any] = {}  # the configs whose misspelled classes were logged, kept as _services keeps them


def hub_services(spawner: "CondaSpawner") -> HubServices:
    """The hub's shared services, created on first use from the spawner's config.

    The builder talks to the daemon the servers run on, with DockerSpawner's own settings
    (client_kwargs, tls_config, DOCKER_HOST), unless ImageBuilder.docker_host names a build host.
    """
    key = id(spawner.config)
    if key not in _services:
        config = spawner.config
        if key not in _warned:  # first: a refused setting below would hide them; once, though that raises each time
            _warned[key] = config
            for line in misspelled_sections(config):
                spawner.log.warning("%s", line)
        try:
            allocator = GpuAllocator(config=config, log=spawner.log)
            builder = ImageBuilder(config=config, log=spawner.log,
                                   daemon_settings=daemon_settings(spawner.tls_config, spawner.client_kwargs))
            services = HubServices(
                catalog=ProfileCatalog(config=config),
                policy=SpecPolicy(config=config),
                builder=builder,
                allocator=allocator,
                queue=spawner.gpu_queue(allocator),
                notices=Notices(Path(builder.cache_dir) / "notices"),
                culler=GpuIdleCuller(allocator),
                usage=UsageLog(Path(builder.cache_dir) / "usage"),
                owners=VolumeLedger(Path(builder.cache_dir) / "volumes"),
            )
        except TraitError as error:
            refused = refused_settings(config) or [one_line(error)]
            raise HubConfigError(f"{'settings' if len(refused) > 1 else 'a setting'} in the hub's config: "
                                 + "; ".join(refused)) from None
        if builder.docker_host and not builder.registry:
            spawner.log.error("ImageBuilder.docker_host (%s) needs ImageBuilder.registry: servers cannot run "
                              "images built on another daemon", builder.docker_host)
        services.sample_gpus = spawner.gpu_sampler(services)
        # The catalog loads on first use (CondaSpawner.services), so broken profiles never
        # stop the hub from starting and restoring its servers.
        try:
            spawner.restore_gpu_table(allocator)
        except Exception as error:  # no daemon yet: the first GPU start tries again (spawngpus)
            spawner.log.warning("GPU allocations not restored from the servers' containers (%s): GPU starts "
                                "restore them first", one_line(error))
        _services[key] = (config, services)
    services = _services[key][1]
    _start_gpu_sampler(services, spawner.log)
    return services


def refused_settings(config: Any) -> list[str]:
    """One line for each setting of the hub's services that traitlets refuses: it stops at a class's first,
    and an admin with three mistakes would restart the hub three times to learn them."""
    refused = []
    for cls in (GpuAllocator, GpuInventory, ImageBuilder, Resolver, ProfileCatalog, SpecPolicy):
        for name in cls.class_traits(config=True):
            given = {section: {name: config[section][name]} for section in cls.section_names()
                     if section in config and name in config[section]}
            if not given:
                continue
            try:
                cls(config=Config(given))  # that setting alone
            except TraitError as error:
                refused.append(one_line(error))
    return refused


def _start_gpu_sampler(services: HubServices, log: Any) -> None:
    """Sample the GPUs periodically (metrics: GPU states, GPU-seconds held idle; idle culling),
    once per hub, from the first call made on the hub's event loop."""
    if services.sampler is not None or not services.allocator.gpu_sample_interval:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on the hub's loop (config checks, tests): the next call starts it
        return
    services.sampler = loop.create_task(_sample_gpus(services, log))


async def _sample_gpus(services: HubServices, log: Any) -> None:
    allocator = services.allocator
    sample = services.sample_gpus or host_gpu_sampler(allocator)
    while True:
        try:
            states, holdings = await asyncio.to_thread(sample)  # NVML blocks: off the event loop
            for cull, stop in services.culler.observe(states, holdings):
                asyncio.ensure_future(_cull(services.culler, cull, stop, log))
        except Exception as error:
            log.warning("GPU sample failed: %s", error)
        await asyncio.sleep(allocator.gpu_sample_interval)


def host_gpu_sampler(allocator: GpuAllocator) -> Callable[[], GpuSample]:
    """One sample of this host's GPUs (NVML): their states; the allocator's table says who holds them."""
    return lambda: (allocator.gpu_states(allocator.sample()), None)


async def _cull(culler: GpuIdleCuller, cull: Cull, stop: Any, log: Any) -> None:
    log.info("Stopping %s/%s: its GPUs were idle for %.0f s (gpu_idle_timeout %.0f s)",
             cull.user, cull.server_name or "(default)", cull.idle_seconds, cull.timeout_seconds)
    try:
        await stop(cull)
    except Exception as error:
        log.error("Could not stop idle server %s/%s, will try again: %s", cull.user, cull.server_name, error)
        culler.rearm(cull.user, cull.server_name)
