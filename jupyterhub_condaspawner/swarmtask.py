"""A conda-swarm server's task: waiting for Swarm to place and run it (saying where it
stands), another node when one cannot start it, what ended it (poll, and the notice the
user reads), and a running one whose start the hub never recorded (poll adopts it). Mixed
into CondaSwarmSpawner by :class:`SwarmTaskMixin`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import docker.errors

from . import swarm
from .failures import StartFailure
from .gpuqueue import QueueCancelled
from .gpus import GpuUnavailable
from .owners import labels_name_server
from .spawngpus import QUEUE_INTERRUPTED
from .spawnimage import image_of_unsaved_start
from .swarm import ServiceRequest, SwarmState
from .swarmpull import forget, no_node_could_start, nodes_left, pulls_under_way, why_not_pulled

# How often a starting server's task is read (the progress page follows it).
TASK_POLL_S = 1.0
_NODE_WAIT_INTERRUPTED = ("Your last start of {} was waiting for Docker Swarm to place it when the hub restarted, "
                          "and did not go on: start it again")
# Swarm's reason when it ends a task whose node was updated (relabelled, drained and made active,
# a manager restart): with GPUs as named generic resources, every GPU task on that node.
_NODE_UPDATE_REJECTION = "assigned node no longer meets constraints"


if TYPE_CHECKING:  # what the mixin is mixed into, for the type checker
    from .profiles import Profile
    from .spawner import CondaSpawner as _SpawnerBase
else:
    _SpawnerBase = object


class SwarmTaskMixin(_SpawnerBase):
    """The task of a server's service; the host class is a CondaSwarmSpawner."""

    if TYPE_CHECKING:  # CondaSwarmSpawner's own
        service_name: str
        _request: ServiceRequest
        _deadline: float
        _assigned: tuple[str, ...]
        _node: str
        _failed_nodes: dict[str, str]
        _seated_off: tuple[str, ...]
        _pinned: tuple[str, tuple[str, ...]]
        _profile: Profile
        _stop_asked: bool

        async def _read_swarm(self, service_id: str | None = None) -> SwarmState: ...

        async def remove_object(self) -> None: ...

        def _leave_gpu_seat(self, placed: SwarmState | None = None) -> None: ...

        async def _pin_to_another_node(self) -> bool: ...

    async def start_object(self) -> None:
        """Wait until the task runs, saying where it stands; fail in one line if it cannot.

        While it waits, a hub that stops leaves the user a notice for the next spawn page
        (taken back when the wait ends otherwise), as the single-host GPU queue does.
        """
        what = self._profile_name("your server")
        self._post_restart_notice((QUEUE_INTERRUPTED if self._request.gpus else _NODE_WAIT_INTERRUPTED).format(what))
        with self._restart_notice_kept_if_cancelled():
            await self._wait_for_task()

    async def _wait_for_task(self) -> None:
        said, service_id = "", self.object_id
        while True:
            try:
                state = await self._read_swarm(service_id)
            except docker.errors.NotFound:
                if self.object_id and not self._stop_asked:
                    raise
            if not self.object_id:  # stop() removed the service: the user gave up waiting
                self._end_if_stop_asked(asked=True)
            if self._stop_asked:  # stop() came while this start made a service on another node
                await self._remove_quietly()
                self._end_if_stop_asked()
            task = state.task_for(service_id)
            if task is not None and task.state == "running":
                if said:  # it waited: the profile may have been taken away meanwhile
                    await self._refuse_if_access_withdrawn_on_swarm()
                node = state.node(task.node_id)
                self._assigned, self._node = task.gpus, node.hostname if node else task.node_id
                self._leave_gpu_seat(placed=state)
                gpus = f" with GPU {', '.join(task.gpus)}" if task.gpus else ""
                await self._feed.publish("start", 92, f"Running on node {self._node}{gpus}")
                return
            if task is not None and (task.state in swarm.ENDED_STATES or not task.live
                                     or self._pinned_node_closed(state, task)):
                service_id = await self._try_another_node(state, task)
                said = ""
                continue
            if task is not None and self._pulled_where_kept_off(task):
                service_id = await self._recreate_for_pulled_nodes()
                said = ""
                continue
            message = self._waiting_message(state, task)
            if message != said:
                said = message
                await self._feed.publish("start", 91, message)
            if time.monotonic() >= self._deadline:
                await self._remove_quietly()
                raise self._timed_out(state, task)
            await asyncio.sleep(TASK_POLL_S)

    def _end_if_stop_asked(self, asked: bool = False) -> None:
        """QueueCancelled when the user stopped the start (``asked``, or stop() came meanwhile)."""
        if asked or self._stop_asked:
            message = "The start was cancelled while it waited for a GPU or a node"
            raise QueueCancelled(message, message)

    async def _refuse_if_access_withdrawn_on_swarm(self) -> None:
        """The server, placed after a wait, is removed again if its profile is no longer the user's."""
        try:
            self._refuse_if_access_withdrawn(self._profile, "a GPU" if self._request.gpus else "a node")
        except StartFailure:
            await self._remove_quietly()
            raise

    def _pulled_where_kept_off(self, task: swarm.TaskInfo) -> bool:
        """gpu_assignment "swarm": Swarm could not place the task (a reason: another service's CPU or
        memory on the node the seat counted, say), and a node its service was kept off while it pulled
        the image (SwarmSeatMixin) has finished: the service may go there now."""
        return (task.state in ("new", "allocated", "pending") and bool(task.error)
                and not set(self._seated_off) <= pulls_under_way(self.image).keys())

    async def _recreate_for_pulled_nodes(self) -> str:
        """The service again, kept off only the nodes still pulling, and its ID."""
        await self._remove_quietly()
        under_way = pulls_under_way(self.image)
        self._seated_off = tuple(node_id for node_id in self._seated_off if node_id in under_way)
        return await self._create_again()

    async def _create_again(self) -> str:
        """A new service for the start (its last one removed), and its ID."""
        created = await self.create_object()
        self.object_id = created["ID"]
        return self.object_id

    def _pinned_node_closed(self, state: SwarmState, task: swarm.TaskInfo) -> bool:
        """Whether the node the hub pinned a task Swarm has not placed yet to went down, was drained
        or paused (or left the swarm): Swarm would keep it pending there until the start's deadline."""
        node_id = self._pinned[0]
        if not node_id or task.state not in ("new", "allocated", "pending"):
            return False
        node = state.node(node_id)
        return node is None or node.state in ("down", "disconnected") or node.availability != "active"

    async def _try_another_node(self, state: SwarmState, task: swarm.TaskInfo) -> str:
        """The task ended before it ran (a node that cannot pull, or went down), or its pinned node
        closed before Swarm placed it: a new service kept off that node, and its ID; StartFailure
        when no other node could run it."""
        await self._remove_quietly()
        self._seated_off = ()  # its seat's moment has passed: those nodes may hold the image by now
        node_id = task.node_id or self._pinned[0]
        node = state.node(node_id)
        name = node.hostname if node else node_id
        cause = _why_task_ended(task, node)
        self._failed_nodes[node_id] = f"node {name}: {cause}"
        forget(self.image, node_id)  # it may have lost the image since the hub saw it pulled
        self.log.warning("Server %s could not start on node %s (%s); %s", self._log_name, name, task.reason,
                         "see that node's Docker log")
        others = nodes_left(state, self._request, self._failed_nodes)
        if others:
            await self._feed.publish("start", 91, f"Node {name} could not start your server ({cause}): trying another node")
        if not others or not await self._pin_to_another_node():
            raise no_node_could_start(self._failed_nodes)
        return await self._create_again()

    def _waiting_message(self, state: SwarmState, task: swarm.TaskInfo | None) -> str:
        if task is None or task.state in ("new", "allocated", "pending"):
            reason = task.error if task else ""  # why the scheduler has not placed it (none yet at first)
            if "insufficient resources" in reason and state.waiting_for(self._request, task) == "a GPU":
                held, open_gpus = state.open_gpus()
                return (f"Waiting for a GPU on any node: {held} of {open_gpus} GPUs are held{swarm.closed_gpus_note(state, open_gpus)}; "
                        "your server starts when one is free")
            if "insufficient resources" in reason:
                return cpu_wait_message(self._request)
            return f"Waiting for a node that fits: {reason}" if reason else "Waiting for Docker Swarm to place it"
        node = state.node(task.node_id)
        where = node.hostname if node else task.node_id
        if task.state in ("assigned", "accepted", "preparing"):
            return f"Starting on node {where} (it pulls the image if it lacks it)"
        return f"Starting on node {where}"

    def _timed_out(self, state: SwarmState, task: swarm.TaskInfo | None) -> GpuUnavailable:
        waited = f"{self.start_timeout:.0f} s" if self.start_timeout < 120 else f"{self.start_timeout / 60:.0f} min"
        reason = task.reason if task else "no task"
        if self._request.gpus and state.waiting_for(self._request, task) == "a GPU":
            held, open_gpus = state.open_gpus()
            user = (f"No GPU is free on this hub: {open_gpus - held} of {open_gpus} ({self._request.describe(True)}; "
                    f"no node had one free within {waited}{swarm.closed_gpus_note(state, open_gpus)}: try again later)")
        else:
            user = (f"No node had the CPU or memory free for your server within {waited} "
                    f"({self._request.describe()}): try again later")
        return GpuUnavailable(f"{self._request.describe()}: not placed within start_timeout ({reason})", user)

    async def _remove_quietly(self) -> None:
        try:
            await self.remove_object()
        except docker.errors.DockerException as error:
            self.log.warning("Could not remove service %s: %s", self.service_name, error)
        self.object_id = ""

    async def poll(self) -> int | str | None:
        """None while the task is on its way or running on a node that is up; else why it is not.

        A server found dead has its service removed here, as a container with auto_remove goes
        by itself: the hub calls stop() only for servers poll says are running, and a service
        left behind would restart its container (and take a GPU) if a dead node came back.
        """
        if self._before_container:  # a start that failed before its service was created
            self._keep_failure_visible()
            return 0
        try:
            service = await self.get_object()
            if not service:
                self.services.culler.forget(self.user.name, self.name)
                return 0
            state = await self._read_swarm(self.object_id)
        except Exception as error:  # the manager does not answer: not a reason to forget the server
            self._unknown_while_unanswered(error)
            return None
        task = state.task_for(self.object_id)
        if task is None:
            return None  # just created: no task yet
        node = state.node(task.node_id)
        where = f" on node {node.hostname}" if node else ""
        # "unknown": what Swarm says of every node for a moment after a leader change.
        if task.state == "running" and node is not None and node.state in ("down", "disconnected"):
            status = f"node {node.hostname} is {node.state}"
        elif not task.live:
            status = f"task {task.state}{where} (desired state {task.desired_state}): {task.reason}"
        else:
            if self._image_info is None and task.state == "running":
                self._adopt_unsaved_service(service, task, node)
            return None
        self.log.warning("Server %s stopped: %s; removing service %s", self._log_name, status, self.service_name)
        await self._remove_quietly()
        services = self.services
        services.culler.forget(self.user.name, self.name)  # its GPUs are Swarm's again
        services.notices.post(self.user.name, self.name, self._ended_notice(status, task, node))
        return status

    def _adopt_unsaved_service(self, service: Mapping[str, Any], task: swarm.TaskInfo,
                               node: swarm.NodeInfo | None) -> None:
        """A start the hub was killed under after Swarm ran its task, before JupyterHub saved its
        state: JupyterHub finds the server running, and nothing here says what it runs or holds.
        Its service's labels do, when they name this user's server (never a renamed user's of this
        name): its image, GPUs, node and port, for the culler, the environments page and the state."""
        spec = ((service.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec") or {}
        labels = spec.get("Labels") or {}
        if not labels_name_server(labels, self.user, self.name):
            return
        info = image_of_unsaved_start(labels, str(spec.get("Image", "")), "", spec.get("Env") or [])
        if info is None:
            return
        self._image_info, self.image = info, info.image
        self._assigned, self._node = task.gpus, node.hostname if node else task.node_id
        if str(labels.get(swarm.LABEL_PORT, "")).isdigit():
            self.port = int(labels[swarm.LABEL_PORT])
        self.log.info("Adopting %s, whose start the hub did not record: it runs %s on node %s%s", self._log_name,
                      info.image, self._node, f" with GPU {', '.join(task.gpus)}" if task.gpus else "")
        self._watch_gpu_idleness(self._profile_of_saved_options())

    def _profile_name(self, fallback: str) -> str:
        """The server's profile in the user's words: its display name (kept for GPU servers), else its slug."""
        return self._idle_watch.get("profile_name") or (self.user_options or {}).get("profile") or fallback

    def _ended_notice(self, status: str, task: swarm.TaskInfo, node: swarm.NodeInfo | None) -> str:
        """What the user's next spawn page says of a server Swarm ended (the hub did not stop it)."""
        what = self._profile_name("your profile")
        where = f"node {node.hostname}" if node is not None else "its node"
        if node is not None and node.state in ("down", "disconnected"):  # Swarm says "rejected" then too
            return f"Your server on {what} stopped: {where} is {node.state} (start it again: Swarm picks a node that is up)"
        if node is not None and node.availability == "drain":  # Swarm shuts its tasks down
            return (f"Your server on {what} stopped: an admin drained {where} (start it again: Swarm picks a node "
                    "that takes servers)")
        if _NODE_UPDATE_REJECTION in (task.reason or "") and task.gpus:
            return (f"Your server on {what} was stopped by Docker Swarm when {where} was updated (Swarm ends GPU "
                    "servers on any update of their node): start it again")
        return f"Your server on {what} stopped on {where} ({status}): start it again"


def cpu_wait_message(request: ServiceRequest) -> str:
    """The progress line of a start that waits for CPU or memory beside free GPUs."""
    return (f"Waiting for CPU or memory on a node that fits: {request.describe()}, and every such node has less "
            "free; your server starts when a server there stops")


def _why_task_ended(task: swarm.TaskInfo, node: swarm.NodeInfo | None) -> str:
    """A task's end before it ran, in a few words: the node's state, or what its daemon said."""
    if node is not None and node.state in ("down", "disconnected"):
        return f"the node is {node.state}"
    if node is not None and node.availability in ("drain", "pause"):
        return f"an admin {'drained' if node.availability == 'drain' else 'paused'} it"
    if node is None and not task.node_id:
        return "it left the swarm"
    return why_not_pulled(task.reason) or task.state
