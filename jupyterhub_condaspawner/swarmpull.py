"""Pulling a GPU server's image onto the nodes it may run on, before the start takes a GPU.

A Swarm node pulls a service's image when it is given the task: with the GPU already held,
idle, for the minutes a multi-GB CUDA image takes. So a GPU start has each node that could run
it (schedulable, with the GPUs, model and CUDA it asks for, allowed by the admin's judged
placement constraints) and lacks the image pull it, through a one-off job service pinned to
that node (``replicated-job``: the node pulls the image, runs the image's Python doing nothing,
isolated and without site, and the task completes). The start waits until one such node holds
the image; in the GPU queue, the nodes still pulling are kept out of its seat until their pull
ends (SwarmPullMixin). One job per image and node at a time, shared by every start that needs
it; a node the hub saw pull an image is not asked again (an image removed there behind the
hub's back is pulled by the server's own task, as before).
"""

from __future__ import annotations

import asyncio
import functools
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
from .builderrors import one_line
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
    not_run: str = ""  # why no job ran (the manager refused it: Docker before 20.10 has no jobs); no error


def targets(state: SwarmState, request: ServiceRequest, constraints: Iterable[str],
            avoid: Iterable[str] = ()) -> list[NodeInfo]:
    """The nodes a GPU server of ``request`` may be placed on now: schedulable, with the GPUs (count,
    model, CUDA) and CPU and memory it asks for, allowed by the admin's ``constraints`` (those the
    hub cannot judge are left to Swarm), and not in ``avoid`` (node IDs)."""
    judged = [constraint for constraint in constraints if not swarmplacement.unjudged([constraint])]
    return [node for node in nodes_left(state, request, avoid)
            if node.schedulable and swarmplacement.allows(node.attributes, judged)]


def already_pulled(image: str, node_id: str) -> bool:
    return (image, node_id) in _pulled


def pulls_under_way(image: str) -> dict[str, asyncio.Task]:
    """The jobs of this hub pulling the image now, by node ID."""
    return {node_id: task for (pulled, node_id), task in _pulling.items() if pulled == image and not task.done()}


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
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(self._run(image, node_id))
            _pulling[key] = task
            task.add_done_callback(lambda done: _pulling.pop(key, None) if _pulling.get(key) is done else None)
        return task

    async def _run(self, image: str, node_id: str) -> PullOutcome:
        await asyncio.to_thread(self._sweep_once)
        try:
            service_id = await asyncio.to_thread(self._create, image, node_id)
        except (docker.errors.DockerException, requests.RequestException) as error:
            return PullOutcome(node_id, not_run=f"the manager refused the pull job: {error}")
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
        return PullOutcome(node_id, f"the image had not arrived within {self.timeout:.0f} s")

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
    """A GPU start's pulls, around its turn in the GPU queue; the host class is a CondaSwarmSpawner.

    The start waits (out of the queue) only until one node that could run it holds the image:
    one did already, or the first pull ends. In the queue, the nodes still pulling are kept out
    of its seat until their pull ends (or prepull_timeout), so its GPU is never one of a node
    still pulling; a node whose pull failed stays out.
    """

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

        def _tell_seats_what_it_needs(self) -> None: ...

        def _wake_the_queue(self) -> None: ...

    def _init_pulls(self) -> None:
        self._pulls: dict[str, asyncio.Task] = {}  # node ID -> its pull, while it goes on (this start's nodes)
        self._pull_names: dict[str, str] = {}  # node ID -> hostname
        self._pulls_until = 0.0  # when the nodes still pulling stop being kept out of the start's seat
        self._pulls_matter = False  # the start waits for its seat: a pull's end changes where it may go
        self._pulls_overdue: asyncio.TimerHandle | None = None

    def _nodes_still_pulling(self) -> list[str]:
        """Nodes kept out of the start's seat while they pull its image (until prepull_timeout)."""
        return [node_id for node_id in self._pulls if time.monotonic() < self._pulls_until]

    def _still_pulling_names(self) -> str:
        """The hostnames of :meth:`_nodes_still_pulling`, for the user."""
        return ", ".join(sorted(self._pull_names.get(node_id, node_id) for node_id in self._nodes_still_pulling()))

    async def _pull_onto_gpu_nodes(self) -> None:
        """Have the nodes that could run this GPU server and lack its image (as far as the hub saw)
        pull it, and wait until one of them holds it, before the start joins the GPU queue.
        StartFailure when no node that could ever run the server is left (every pull failed)."""
        self._pulls, self._pull_names = {}, {}
        limit = min(self.prepull_timeout, self._deadline - time.monotonic() - CONTAINER_START_S)
        if limit <= 0 or "@" not in self.image:  # off, or no registry reference (the start fails later)
            return
        state = await self._read_swarm()
        # Over the quota with the servers it runs, the user is refused now (429), not after the pulls.
        check_quota(state, self.user.name, self.name, self._request.gpus, self.services.allocator.per_user_gpu_quota,
                    self._request.profile)
        constraints = tuple(self.extra_placement_spec.get("constraints") or ())
        eligible = targets(state, self._request, constraints, self._failed_nodes)
        nodes = [node for node in eligible if not already_pulled(self.image, node.id)]
        if not nodes:
            return
        api = await asyncio.to_thread(lambda: self.client)
        puller = NodePuller(api, self.network_name, self.launcher_python, self.prepull_timeout, self.log)
        self._pull_names = {node.id: node.hostname for node in nodes}
        self._pulls_until = time.monotonic() + limit
        self._pulls = {node.id: puller.pull(self.image, node.id) for node in nodes}
        for node_id, task in self._pulls.items():
            task.add_done_callback(functools.partial(self._pull_ended, node_id))
        self._pulls_overdue = asyncio.get_running_loop().call_later(limit, self._seat_anywhere_now)
        if len(nodes) < len(eligible):
            return  # a node holds the image already: the queue may seat the start there at once
        await self._until_a_node_holds_the_image(len(nodes))
        self._refuse_if_no_node_is_left(state)

    async def _until_a_node_holds_the_image(self, count: int) -> None:
        what = f"{count} GPU node{'s' if count > 1 else ''}"
        said = ""
        while self._pulls and len(self._pulls) == count - self._pulls_failed() and \
                time.monotonic() < self._pulls_until:
            failed = self._pulls_failed()
            message = (f"Pulling the image onto the {what} it may run on, before taking a GPU"
                       + (f" ({failed} could not)" if failed else ""))
            if message != said:
                said = message
                await self._feed.publish("pull", 86, message)
            # The jobs go on if this start ends: others may wait for them, and each removes its service.
            await asyncio.wait(set(self._pulls.values()), timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
            self._end_if_stop_asked()
        pulled = sorted(name for node_id, name in self._pull_names.items()
                        if node_id not in self._pulls and node_id not in self._failed_nodes)
        if pulled:
            others = f"; {len(self._pulls)} more still pulling" if self._pulls else ""
            await self._feed.publish("pull", 86, f"Pulled the image onto node {', '.join(pulled)}{others}")
        elif self._pulls:
            self.log.warning("Server %s: %d node(s) still pulling %s at prepull_timeout: going on (a server placed "
                             "there waits for its pull)", self._log_name, len(self._pulls), self.image)

    def _pulls_failed(self) -> int:
        return sum(node_id in self._failed_nodes for node_id in self._pull_names)

    def _pull_ended(self, node_id: str, task: asyncio.Task) -> None:
        """A pull of this start's ended (on the event loop): the node holds the image now, or is left out."""
        if self._pulls.pop(node_id, None) is None:
            return  # the start had ended
        outcome: PullOutcome = task.result() if not task.cancelled() and task.exception() is None else \
            PullOutcome(node_id, "the hub stopped its pull")
        name = self._pull_names.get(node_id, node_id)
        if outcome.error:
            cause = why_not_pulled(outcome.error)
            self._failed_nodes[node_id] = f"node {name}: {cause}"
            self.log.warning("Server %s: node %s could not pull %s (%s)", self._log_name, name, self.image,
                             outcome.error)
            asyncio.ensure_future(self._feed.publish(
                "pull", 86, f"Node {name} could not get the image ({cause}): your server will run on another node"))
        elif outcome.not_run:  # the node pulls when it is given the server, as without pulls first
            self.log.warning("Server %s: no pull onto node %s first: %s", self._log_name, name,
                             one_line(outcome.not_run))
        if self._pulls_matter:  # it may go to that node now (or, failed, never)
            self._tell_seats_what_it_needs()
            self._wake_the_queue()

    def _seat_anywhere_now(self) -> None:
        """prepull_timeout has passed: the nodes still pulling may take the start (it waits for the pull there)."""
        if self._pulls_matter and self._pulls:
            self._tell_seats_what_it_needs()
            self._wake_the_queue()

    def _follow_pulls_under_way(self, state: SwarmState) -> None:
        """The nodes pulling the start's image now (its own pulls, or another start's) stay out of its
        seat again until their pull ends or prepull_timeout passes: the start looks for another node
        after its own failed it (SwarmSeatMixin._pin_to_another_node), with no GPU held meanwhile."""
        self._pulls = {node_id: task for node_id, task in pulls_under_way(self.image).items()
                       if node_id not in self._failed_nodes}
        if not self._pulls:
            return
        self._pull_names.update({node.id: node.hostname for node in state.nodes if node.id in self._pulls})
        if not self._pulls_until:  # its own start asked no node (each held the image then)
            self._pulls_until = time.monotonic() + min(self.prepull_timeout,
                                                       self._deadline - time.monotonic() - CONTAINER_START_S)
        for node_id, task in self._pulls.items():
            task.add_done_callback(functools.partial(self._pull_ended, node_id))
        self._pulls_matter = True

    def _stop_following_pulls(self) -> None:
        """The start has its seat, or ended: the pulls go on for others, not for it."""
        self._pulls_matter = False
        self._pulls = {}
        if self._pulls_overdue is not None:
            self._pulls_overdue.cancel()
            self._pulls_overdue = None

    def _refuse_if_no_node_is_left(self, state: SwarmState) -> None:
        """StartFailure when every node that could ever run the server failed its pull."""
        if self._failed_nodes and not nodes_left(state, self._request, self._failed_nodes):
            raise no_node_could_start(self._failed_nodes)


def nodes_left(state: SwarmState, request: ServiceRequest, failed: Iterable[str]) -> list[NodeInfo]:
    """The nodes that could ever run ``request`` (whatever their availability now) and that a start has
    not failed on (``failed``: node IDs)."""
    left_out = set(failed)
    return [node for node in state.nodes if node.id not in left_out and request.fits(node)]


def no_node_could_start(failed_nodes: dict[str, str]) -> StartFailure:
    """The start's failure when every node that could run the server failed it (``failed_nodes``: why, by node)."""
    return StartFailure(f"Docker Swarm could not start your server: {'; '.join(failed_nodes.values())}; "
                        "try again later, or tell the hub admin (those nodes' Docker logs say why)",
                        reason="swarm", status_code=503)
