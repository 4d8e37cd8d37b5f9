"""Pulling a GPU server's image onto the nodes it may run on, before the start takes a GPU.

A Swarm node pulls a service's image when it is given the task: with the GPU already held,
idle, for the minutes a multi-GB CUDA image takes. So a GPU start first has each node that
could run it (schedulable, with the GPUs, model and CUDA it asks for, allowed by the admin's
placement constraints) pull the image, through a one-off job service pinned to that node
(``replicated-job``: the node pulls the image, runs the image's Python doing nothing, isolated
and without site, and the task completes), and waits for those jobs before it waits for a GPU. Nodes holding no GPU of
the start's are busy with nothing: nobody waits on them. One job per image and node at a time,
shared by every start that needs it; a node the hub saw pull an image is not asked again
(an image removed there behind the hub's back is pulled by the server's own task, as before).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import docker.errors
import docker.types
import requests

from . import swarmplacement
from .failures import StartFailure
from .spawngpus import CONTAINER_START_S
from .swarm import ENDED_STATES, NodeInfo, ServiceRequest, SwarmState, check_quota

if TYPE_CHECKING:  # what the mixin is mixed into, for the type checker
    from .spawner import CondaSpawner as _SpawnerBase
else:
    _SpawnerBase = object

# The label of a pull job's service: the node ID it pulls onto. Its tasks carry no user label,
# so that they never count as a server's (GPUs, ports).
LABEL_PULL = "io.condaspawner.pull-onto"
POLL_S = 1.0

_pulled: set[tuple[str, str]] = set()  # (image reference, node ID) this hub saw pulled
_pulling: dict[tuple[str, str], asyncio.Task] = {}  # the job now pulling that image onto that node
_swept = False  # the ended jobs an earlier hub process left were removed


@dataclass(frozen=True)
class PullOutcome:
    """How one node's pull job ended: ``error`` is "" when the node holds the image now."""

    node_id: str
    error: str = ""


def targets(state: SwarmState, request: ServiceRequest, constraints: Iterable[str],
            avoid: Iterable[str] = ()) -> list[NodeInfo]:
    """The nodes a GPU server of ``request`` may be placed on now: schedulable, with the GPUs (count,
    model, CUDA) and CPU and memory it asks for, allowed by the admin's ``constraints`` (those the
    hub cannot judge are left to Swarm), and not in ``avoid`` (node IDs)."""
    judged = [constraint for constraint in constraints if not swarmplacement.unjudged([constraint])]
    left_out = set(avoid)
    return [node for node in state.nodes
            if node.schedulable and node.id not in left_out and request.fits(node)
            and swarmplacement.allows(node.attributes, judged)]


def already_pulled(image: str, node_id: str) -> bool:
    return (image, node_id) in _pulled


def forget(image: str, node_id: str) -> None:
    """The node turned out to lack the image (its server's task could not get it): ask it again next time."""
    _pulled.discard((image, node_id))


def forget_all() -> None:
    """Every node's pulls forgotten (images were removed from the nodes behind the hub's back)."""
    _pulled.clear()


class NodePuller:
    """Makes a node pull an image through a job service of its own (``api``: a docker APIClient)."""

    def __init__(self, api: Any, network: str, python: str, timeout: float, log: logging.Logger | logging.LoggerAdapter):
        self.api, self.network, self.python, self.timeout, self.log = api, network, python, timeout, log

    def pull(self, image: str, node_id: str) -> asyncio.Task:
        """The task of the job pulling ``image`` onto the node (one already under way, if any): it
        ends with a :class:`PullOutcome`, and outlives the start that asked (others may share it)."""
        key = (image, node_id)
        task = _pulling.get(key)
        if task is None or task.done():
            task = asyncio.ensure_future(self._run(image, node_id))
            _pulling[key] = task
            task.add_done_callback(lambda done: _pulling.pop(key, None) if _pulling.get(key) is done else None)
        return task

    async def _run(self, image: str, node_id: str) -> PullOutcome:
        await asyncio.to_thread(self._sweep_once)
        try:
            service_id = await asyncio.to_thread(self._create, image, node_id)
        except (docker.errors.DockerException, requests.RequestException) as error:
            return PullOutcome(node_id, f"the manager refused the pull job: {error}")
        try:
            outcome = await self._until_ended(service_id, node_id)
        finally:
            await asyncio.to_thread(self._remove, service_id)
        if not outcome.error:
            _pulled.add((image, node_id))
        return outcome

    def _create(self, image: str, node_id: str) -> str:
        self.api.reload_config()  # a token `docker login` renewed reaches the node (X-Registry-Auth)
        task = docker.types.TaskTemplate(
            # The image is a user's environment: its Python runs isolated (-I) and without site (-S),
            # so that no package's .pth runs, and the container may do nothing else.
            container_spec=docker.types.ContainerSpec(image, command=[self.python, "-I", "-S", "-c", "pass"],
                                                      cap_drop=["ALL"]),
            restart_policy=docker.types.RestartPolicy(condition="none"),
            placement=docker.types.Placement(constraints=[f"node.id=={node_id}"]),
            networks=[self.network] if self.network else [],
        )
        created = self.api.create_service(task, name=f"condaspawner-pull-{uuid.uuid4().hex[:12]}",
                                          labels={LABEL_PULL: node_id},
                                          mode=docker.types.ServiceMode("replicated-job", replicas=1))
        return str(created["ID"])

    async def _until_ended(self, service_id: str, node_id: str) -> PullOutcome:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                tasks = await asyncio.to_thread(self.api.tasks, filters={"service": service_id})
            except (docker.errors.DockerException, requests.RequestException) as error:
                self.log.warning("Cannot read the pull job %s: %s", service_id[:12], error)
                tasks = []
            ended = [task for task in tasks if (task.get("Status") or {}).get("State") in ENDED_STATES]
            if ended:
                status = ended[-1].get("Status") or {}
                if status.get("State") == "complete":
                    return PullOutcome(node_id)
                return PullOutcome(node_id, str(status.get("Err") or status.get("Message") or status.get("State")))
            await asyncio.sleep(POLL_S)
        return PullOutcome(node_id, f"it had not pulled the image within {self.timeout:.0f} s")

    def _remove(self, service_id: str) -> None:
        try:
            self.api.remove_service(service_id)
        except (docker.errors.DockerException, requests.RequestException) as error:
            self.log.warning("Could not remove the pull job %s: %s", service_id[:12], error)

    def _sweep_once(self) -> None:
        """Remove the ended pull jobs a hub process that stopped mid-pull left behind (once per process)."""
        global _swept
        if _swept:
            return
        _swept = True
        try:
            for service in self.api.services(filters={"label": LABEL_PULL}):
                states = {(task.get("Status") or {}).get("State")
                          for task in self.api.tasks(filters={"service": service["ID"]})}
                if states and states <= ENDED_STATES:  # none yet: a job just created (by another start)
                    self.api.remove_service(service["ID"])
        except (docker.errors.DockerException, requests.RequestException) as error:
            self.log.warning("Could not remove ended pull jobs: %s", error)


def why_not_pulled(error: str) -> str:
    """A node's failed pull, in a few words."""
    if "No such image" in error or "pull" in error.lower():
        return "it could not pull the image from the registry"
    return error


class SwarmPullMixin(_SpawnerBase):
    """A GPU start's pulls, before its turn in the GPU queue; the host class is a CondaSwarmSpawner."""

    if TYPE_CHECKING:  # CondaSwarmSpawner's own
        prepull_timeout: float
        launcher_python: str
        network_name: str
        extra_placement_spec: dict[str, Any]
        client: Any
        _request: ServiceRequest
        _deadline: float
        _failed_nodes: dict[str, str]

        async def _read_swarm(self, service_id: str | None = None) -> SwarmState: ...

        def _end_if_stop_asked(self, asked: bool = False) -> None: ...

    async def _pull_onto_gpu_nodes(self) -> None:
        """Have every node that could run this GPU server pull its image (those the hub has not seen
        pull it), before the start takes a GPU; a node that cannot is left out of this start (its
        ``_failed_nodes``). StartFailure when no node that could ever run the server is left."""
        limit = min(self.prepull_timeout, self._deadline - time.monotonic() - CONTAINER_START_S)
        if limit <= 0 or "@" not in self.image:  # off, or no registry reference (the start fails later)
            return
        state = await self._read_swarm()
        # Over the quota with the servers it runs, the user is refused now (429), not after the pulls.
        check_quota(state, self.user.name, self.name, self._request.gpus, self.services.allocator.per_user_gpu_quota,
                    self._request.profile)
        constraints = tuple(self.extra_placement_spec.get("constraints") or ())
        nodes = [node for node in targets(state, self._request, constraints, self._failed_nodes)
                 if not already_pulled(self.image, node.id)]
        if not nodes:
            return
        api = await asyncio.to_thread(lambda: self.client)
        puller = NodePuller(api, self.network_name, self.launcher_python, self.prepull_timeout, self.log)
        pending = {puller.pull(self.image, node.id) for node in nodes}
        names = {node.id: node.hostname for node in nodes}
        what = f"{len(nodes)} GPU node{'s' if len(nodes) > 1 else ''}"
        deadline, done, said = time.monotonic() + limit, 0, ""
        while pending and time.monotonic() < deadline:
            message = f"Pulling the image onto the {what} it may run on, before taking a GPU: {done} of {len(nodes)} done"
            if message != said:
                said = message
                await self._feed.publish("pull", 86, message)
            # the jobs go on if this start ends: others may wait for them, and each removes its service
            ended, pending = await asyncio.wait(pending, timeout=min(POLL_S, max(deadline - time.monotonic(), 0)),
                                                return_when=asyncio.FIRST_COMPLETED)
            self._end_if_stop_asked()
            for task in ended:
                outcome: PullOutcome = task.result()
                done += 1
                if outcome.error:
                    await self._leave_out(names[outcome.node_id], outcome)
        if pending:
            self.log.warning("Server %s: %d node(s) still pulling %s after %.0f s: going on (a server placed there "
                             "waits for its pull)", self._log_name, len(pending), self.image, limit)
        else:
            await self._feed.publish("pull", 86, f"Pulled the image onto the {what} it may run on: {done} of "
                                                 f"{len(nodes)} done")
        self._refuse_if_no_node_is_left(state)

    async def _leave_out(self, name: str, outcome: PullOutcome) -> None:
        cause = why_not_pulled(outcome.error)
        self._failed_nodes[outcome.node_id] = f"node {name}: {cause}"
        self.log.warning("Server %s: node %s could not pull %s (%s)", self._log_name, name, self.image, outcome.error)
        await self._feed.publish("pull", 86, f"Node {name} could not get the image ({cause}): your server will run "
                                             "on another node")

    def _refuse_if_no_node_is_left(self, state: SwarmState) -> None:
        """StartFailure when every node that could ever run the server failed its pull."""
        if self._failed_nodes and not any(node.id not in self._failed_nodes and self._request.fits(node)
                                          for node in state.nodes):
            raise no_node_could_start(self._failed_nodes)


def no_node_could_start(failed_nodes: dict[str, str]) -> StartFailure:
    """The start's failure when every node that could run the server failed it (``failed_nodes``: why, by node)."""
    return StartFailure(f"Docker Swarm could not start your server: {'; '.join(failed_nodes.values())}; "
                        "try again later, or tell the hub admin (those nodes' Docker logs say why)",
                        reason="swarm", status_code=503)
