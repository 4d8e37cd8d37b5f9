"""Pushing a built image to the registry and pulling it onto a daemon that lacks it,
through the Docker daemon, with progress in layers and bytes.

Docker's event streams are read in a thread (:func:`dockerclient.thread_stream`); what the daemon
reports is tallied by registry.py's PushTally and PullTally.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import docker

from .builderrors import BuildError, daemon_call, megabytes, registry_call
from .buildmodel import Build, ImageInfo
from .buildrecords import BuildRecords
from .dockerclient import thread_stream
from .registry import (
    PullTally,
    PushTally,
    RegistryClient,
    RegistryError,
    Throttle,
    connection_problem,
    docker_credentials,
    failure_is_server_error,
    failure_is_unreachable,
)


class RegistryTransfer:
    """Pushes to and pulls from ``registry`` through a daemon at ``daemon_url``; a push's
    outcome goes to the key's build log (``records``)."""

    def __init__(self, registry: RegistryClient, daemon_url: str, records: BuildRecords,
                 log: logging.Logger | logging.LoggerAdapter):
        self.registry = registry
        self.daemon_url = daemon_url
        self.records = records
        self.log = log

    async def push(self, api: docker.APIClient, build: Build, info: ImageInfo) -> ImageInfo:
        """Push the built image from ``api``'s daemon (only the layers the registry lacks); the pinned reference."""
        registry = self.registry
        host, tag = registry.repository.host, info.key[:16]
        started = time.monotonic()
        with self._daemon("reading the image's layers"):
            attrs = await asyncio.to_thread(api.inspect_image, info.image_id)
        tally = PushTally(list(attrs["RootFS"]["Layers"]))
        await build.publish("push", 98, f"Pushing the image to the registry {host} (only layers it lacks)")
        with registry_call(f"reading the credentials for {host}"):
            auth = daemon_auth(await asyncio.to_thread(docker_credentials, host))
        throttle = Throttle(2.0)
        push = thread_stream(lambda: api.push(registry.repository.name, tag, stream=True, decode=True,
                                              auth_config=auth))
        async with contextlib.aclosing(push) as events:
            async for event in events:
                if "daemon_error" in event:
                    raise self._daemon_gone(event["daemon_error"], "pushing the image", info.key)
                if str(event.get("status", "")).startswith("Retrying in"):
                    await self._fail_if_registry_gone(registry, info.key)
                if tally.feed(event) and throttle():
                    await build.publish("push", 98, f"Pushing to {host}: {tally.done} of {tally.layers} layers "
                                                    f"done, {tally.uploaded} uploaded")
        if tally.error or not tally.digest:
            cause = tally.error or "the daemon reported no digest"
            self.records.write_log(info.key, f"push to {registry.repository} failed: {cause}\n")
            raise transfer_failure(f"pushing the image to {host}", host, cause, info.key)
        with registry_call(f"reading back {registry.repository}:{tag}"):
            remote = await asyncio.to_thread(registry.image, tally.digest)
        if remote is None:
            raise BuildError(f"the registry {host} does not have the image just pushed ({tally.digest})",
                             phase="registry", key=info.key, cause=f"{host} lost the image just pushed")
        remote = dataclasses.replace(remote, tag=tag)
        pushed = tally.bytes_pushed(remote)
        seconds = time.monotonic() - started
        summary = (f"Pushed {megabytes(pushed)} to {host} in {seconds:.1f} s: {tally.uploaded} of {tally.layers} "
                   f"layers new, {tally.layers - tally.uploaded} already there")
        self.records.write_log(info.key, f"push: {remote.reference}: {pushed} bytes, {tally.uploaded} of "
                                         f"{tally.layers} layers uploaded, {seconds:.1f} s\n")
        self.log.info("%s (%s)", summary, remote.reference)
        await build.publish("push", 99, summary)
        return dataclasses.replace(info, image_id=remote.config_digest, reference=remote.reference,
                                   pushed_bytes=pushed)

    async def _fail_if_registry_gone(self, registry: RegistryClient, key: str) -> None:
        """Docker retries a layer's upload five times, about 50 s in all, whatever failed: a
        registry that no longer answers at all fails the push now instead."""
        try:
            await asyncio.to_thread(registry.check)
        except RegistryError as error:
            if error.unreachable:
                host = registry.repository.host
                self.records.write_log(key, f"push to {registry.repository} failed: {error}\n")
                raise BuildError(f"pushing the image to {host} failed: it stopped answering mid-push: {error.problem}",
                                 phase="registry", key=key, cause=str(error), unreachable=True) from None

    def _daemon(self, what: str) -> contextlib.AbstractContextManager:
        return daemon_call(what, self.daemon_url)

    def _daemon_gone(self, error: str, what: str, key: str) -> BuildError:
        return BuildError(f"the Docker daemon at {self.daemon_url} went away while {what}: {error}", phase="daemon",
                          key=key, cause=f"the Docker daemon at {self.daemon_url} cannot be reached ({error})")

    async def pull(self, api: docker.APIClient, info: ImageInfo,
                   publish: Callable[[str, int, str], Awaitable[None]] | None = None) -> None:
        """Pull ``info``'s registry image (``info.reference``) onto ``api``'s daemon and tag it
        ``<registry>:<key[:16]>`` there; ``publish`` as in ImageBuilder.ensure_present."""
        registry = self.registry
        host = registry.repository.host
        digest = info.reference.partition("@")[2]
        with registry_call(f"reading {info.reference}"):
            remote = await asyncio.to_thread(registry.image, digest)
            auth = daemon_auth(await asyncio.to_thread(docker_credentials, host))
        if remote is None:
            raise BuildError(f"the registry {host} no longer has {info.reference}", phase="registry", key=info.key,
                             cause=f"{host} no longer has the image {info.reference}")
        tally = PullTally(remote.layers)
        throttle = Throttle(1.0)
        say = publish or no_progress
        await say("pull", 0, f"Pulling the image from {host} ({megabytes(remote.size)} compressed; "
                            "layers this host has are skipped)")
        pull = thread_stream(lambda: api.pull(registry.repository.name, tag=digest, stream=True, decode=True,
                                              auth_config=auth))
        async with contextlib.aclosing(pull) as events:
            async for event in events:
                if "daemon_error" in event:
                    raise self._daemon_gone(event["daemon_error"], "pulling the image", info.key)
                tally.feed(event)
                if event.get("status") == "Downloading" and throttle():
                    done = tally.done
                    await say("pull", 100 * done // max(tally.total, 1),
                              f"Pulling the image from {host}: {megabytes(done)} of {megabytes(tally.total)}"
                              + (f" ({tally.already} layers already here)" if tally.already else ""))
        if tally.error:
            raise transfer_failure(f"pulling {info.reference}", host, tally.error, info.key)
        with self._daemon("tagging the pulled image"):
            await asyncio.to_thread(api.tag, info.reference, registry.repository.name, info.key[:16])
        await say("pull", 100, f"Pulled {megabytes(tally.total)} from {host}"
                  + (f" ({tally.already} layers were already here)" if tally.already else ""))


def transfer_failure(what: str, host: str, error: str, key: str) -> BuildError:
    """A push or pull the daemon reported failed: unreachable (worth a retry) or refused."""
    if failure_is_unreachable(error):
        cause = f"the registry {host} cannot be reached ({connection_problem(error)})"
        return BuildError(f"{what} failed: {error}", phase="registry", key=key, cause=cause, unreachable=True)
    if failure_is_server_error(error):
        cause = f"the registry {host} failed {what} ({error}): its storage may be full; its log says why"
        return BuildError(f"{what} failed: {error}", phase="registry-failed", key=key, cause=cause)
    return BuildError(f"{what} failed: {error}", phase="registry", key=key, cause=f"{what} failed ({error})")


def daemon_auth(credentials: dict[str, str] | None) -> dict[str, str] | None:
    """Docker's credentials for a registry as docker-py's auth_config (the X-Registry-Auth header)."""
    if not credentials:
        return None
    if "identitytoken" in credentials:
        return {"identitytoken": credentials["identitytoken"]}
    return {"username": credentials["username"], "password": credentials.get("password", "")}


async def no_progress(phase: str, progress: int, message: str) -> None:
    return None



