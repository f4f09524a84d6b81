"""An in-memory stand-in for the pool's Fleet, for the unit tier: the pool's logic without Ray.

It keeps actors and containers as plain records and answers the calls the
pool makes the way the real fleet would. ``gate(name)`` makes every call of
that name wait until the test opens the gate, which is how the tests put an
acquire in the middle of a reconcile pass or an idle stop.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbox_actors.errors import BackendUnavailable, SandboxNotFound
from sandbox_actors.raycalls import ActorGone
from sandbox_actors.views import ActorView, ContainerView

ENGINE = "engine-1"
NODE = "node-1"


@dataclass
class FakeActor:
    name: str
    sandbox_id: str | None = None
    thread_id: str | None = None
    container_id: str | None = None
    alive: bool = True
    stopping: bool = False
    inflight: int = 0
    idle_for: float = 1e9
    pinned: str | None = None  # the node it was asked to start on

    def describe(self) -> dict[str, Any]:
        return {"actor_name": self.name, "sandbox_id": self.sandbox_id, "started": self.container_id is not None,
                "container_id": self.container_id, "engine_id": ENGINE, "thread_id": self.thread_id,
                "idle_for": self.idle_for, "node_id": NODE, "dead_reason": None}


@dataclass
class FakeContainer:
    sandbox_id: str
    container_id: str
    thread_id: str | None
    running: bool = True
    mounts: tuple = ()  # the host directories it was created with

    def view(self) -> ContainerView:
        return ContainerView(self.sandbox_id, self.container_id, self.running, ENGINE, NODE, self.thread_id)


@dataclass
class FakeFleet:
    actors: dict[str, FakeActor] = field(default_factory=dict)
    boxes: dict[str, FakeContainer] = field(default_factory=dict)  # container id -> container
    silent: set[str] = field(default_factory=set)  # actor names that do not answer describe
    engine_down: bool = False
    engine_lost: bool = False  # gone with its node: no reaper reaches it
    creates: int = 0
    resumes: int = 0
    starting: int = 0
    prepared: dict[str, Any] = field(default_factory=dict)
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)
    _entered: dict[str, asyncio.Event] = field(default_factory=dict)
    _names: Any = field(default_factory=lambda: itertools.count(1))

    # ── test controls ───────────────────────────────────────────────────────

    def gate(self, name: str) -> None:
        """Calls of ``name`` wait from now on until :meth:`open`."""
        self._gates[name] = asyncio.Event()
        self._entered[name] = asyncio.Event()

    def open(self, name: str) -> None:
        self._gates.pop(name).set()

    async def entered(self, name: str) -> None:
        """Until a call of ``name`` is waiting at its gate."""
        await self._entered[name].wait()

    async def _pass(self, name: str) -> None:
        gate = self._gates.get(name)
        if gate is not None:
            self._entered[name].set()
            await gate.wait()
        await asyncio.sleep(0)

    def actor_of(self, sandbox_id: str) -> FakeActor:
        [actor] = [a for a in self.actors.values() if a.sandbox_id == sandbox_id and a.alive]
        return actor

    def kill_container(self, sandbox_id: str) -> None:
        for container in self.boxes.values():
            if container.sandbox_id == sandbox_id:
                container.running = False

    # ── what the pool calls ────────────────────────────────────────────────

    @property
    def keep_names(self) -> set[str]:
        return set()

    @property
    def spares_starting(self) -> int:
        return 0

    @property
    def starts_waiting(self) -> int:
        return 0

    def start_began(self) -> None:
        self.starting += 1

    def start_ended(self) -> None:
        self.starting -= 1

    @property
    def spare_count(self) -> int:
        return 0

    def spare_target(self) -> int:
        return 0

    def later(self, work: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(work)

    def refill(self) -> None:
        pass

    async def close(self) -> None:
        await self._pass("close")

    async def actor_for(self, node_id: str | None) -> tuple[FakeActor, str, bool]:
        actor = FakeActor(f"sbx-{next(self._names)}", pinned=node_id)
        self.actors[actor.name] = actor
        return actor, actor.name, False

    def launched(self, name: str) -> None:
        pass

    async def placed(self, actor: FakeActor, timeout: float) -> bool:
        return True

    def give_up_spare(self, node_id: str | None) -> bool:
        return False

    async def start(self, actor: FakeActor, sandbox_id: str, thread_id: str | None, resume: bool = False,
                    image: str | None = None, image_from: str | None = None,
                    container_id: str | None = None, mounts: tuple = (), checkpoint: str | None = None,
                    restore_from: str | None = None) -> dict[str, Any]:
        await self._pass("start")
        if self.engine_down:
            raise BackendUnavailable("engine down")
        owner = next((a for a in self.actors.values() if a.sandbox_id == sandbox_id and a.alive and a is not actor
                      and a.container_id is not None), None)
        if owner is not None:
            return {"sandbox_id": sandbox_id, "started": False, "outcome": "owned", "owner": owner.name}
        existing = next((c for c in self.boxes.values() if c.sandbox_id == sandbox_id and c.running), None)
        stopped = next((c for c in self.boxes.values() if c.sandbox_id == sandbox_id and not c.running), None)
        if container_id is not None and container_id not in self.boxes:
            stopped = None  # the recorded container is gone (a namesake would not be it)
        if existing is None and resume:
            if stopped is None:
                raise SandboxNotFound(f"the stopped container of hibernated sandbox {sandbox_id} is gone")
            stopped.running, existing = True, stopped
            self.resumes += 1
        if existing is None:
            self.creates += 1
            existing = FakeContainer(sandbox_id, f"c{self.creates}-{sandbox_id}", thread_id, mounts=mounts)
            self.boxes[existing.container_id] = existing
        actor.sandbox_id, actor.thread_id, actor.container_id = sandbox_id, thread_id, existing.container_id
        actor.idle_for = 0.0
        await self._pass("started")  # a gate here holds a start whose container answered, not yet settled
        return actor.describe()

    async def owner_of(self, sandbox_id: str, owner: str) -> tuple[FakeActor, dict[str, Any]]:
        actor = self.actors[owner]
        return actor, {**actor.describe(), "adopted": True}

    def kill(self, actor: FakeActor) -> None:
        actor.alive = False

    async def discard(self, actor: FakeActor) -> None:
        await self._remove_container_of(actor)
        actor.alive = False

    async def claim(self, actor: FakeActor, thread_id: str | None) -> dict[str, Any]:
        actor.thread_id = thread_id
        return actor.describe()

    async def alive(self, actor: FakeActor, info: dict[str, Any] | None = None) -> bool:
        container = self.boxes.get(actor.container_id or "")
        return actor.alive and container is not None and container.running

    @staticmethod
    def actor_key(actor: FakeActor) -> str:
        return actor.name

    async def outlives(self, actor: FakeActor, seconds: float) -> bool:
        """As Ray fails a call on an actor that dies: False soon after ``alive`` goes False."""
        deadline = asyncio.get_running_loop().time() + seconds
        while actor.alive and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        return actor.alive

    async def describe(self, actor: FakeActor) -> dict[str, Any]:
        if not actor.alive:
            raise ActorGone("gone")
        return actor.describe()

    async def activity(self, actors: dict[str, FakeActor]) -> dict[str, Any]:
        await self._pass("activity")
        return {sid: (a.idle_for, a.inflight, None) if a.alive else ActorGone("gone") for sid, a in actors.items()}

    async def begin_stop(self, actor: FakeActor, if_idle_for: float) -> bool:
        await self._pass("begin_stop")
        if not actor.alive:
            raise ActorGone("gone")
        if actor.inflight or actor.idle_for <= if_idle_for:
            return False
        actor.stopping = True
        return True

    async def cancel_stop(self, actor: FakeActor) -> None:
        actor.stopping = False

    async def stop(self, actor: FakeActor, sandbox_id: str, recycle_as: tuple[str, str] | None = None) -> bool:
        await self._pass("stop")
        if not actor.alive:
            raise ActorGone("gone")
        if self.engine_down:
            raise BackendUnavailable("Docker engine did not answer")
        await self._remove_container_of(actor)
        actor.alive = False
        return True

    async def hibernate(self, actor: FakeActor, sandbox_id: str, live: bool = False) -> dict[str, Any]:
        await self._pass("hibernate")
        if not actor.alive:
            raise ActorGone("gone")
        if self.engine_down:
            raise BackendUnavailable("Docker engine did not answer")
        self.boxes[actor.container_id or ""].running = False
        actor.alive = False
        return actor.describe()

    async def snapshot_images(self, engines: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        return {ENGINE: []}

    async def snapshot(self, actor: FakeActor, sandbox_id: str, image: str, labels: dict[str, str],
                       keep_checkpoint_in: str | None = None) -> dict[str, Any]:
        return {"image_id": f"sha256:{image}", "size": 0}

    async def remove_image(self, engines: dict[str, Any], engine_id: str, image: str) -> bool:
        return True

    async def _remove_container_of(self, actor: FakeActor) -> None:
        if actor.container_id is not None:
            self.boxes.pop(actor.container_id, None)

    async def actor_views(self) -> tuple[list[ActorView], dict[str, FakeActor], set[str]]:
        await self._pass("actor_views")
        live = {name: a for name, a in self.actors.items() if a.alive}
        silent = self.silent & set(live)
        views = [ActorView.from_description(a.describe()) for name, a in live.items() if name not in silent]
        return views, live, silent

    async def alive_nodes(self) -> set[str]:
        await self._pass("alive_nodes")
        return set() if self.engine_lost else {NODE}

    def reaper_on(self, node_id: str | None) -> Any:
        return "reaper" if node_id == NODE else None

    @property
    def engine_on(self) -> dict[str, str]:
        return {} if self.engine_lost else {NODE: ENGINE}

    async def engines(self) -> dict[str, tuple[Any, str]]:
        await self._pass("engines")
        return {} if self.engine_lost else {ENGINE: ("reaper", NODE)}

    async def prepare(self, engines: dict[str, Any], strict: bool) -> None:
        pass

    async def containers(self, engines: dict[str, Any]) -> tuple[list[ContainerView], set[str]]:
        if self.engine_down or self.engine_lost:
            return [], set()
        seen = [c.view() for c in self.boxes.values()]
        await self._pass("containers")  # a gate here holds what was seen before anything changed
        return seen, {ENGINE}

    async def remove(self, engines: dict[str, Any], container: ContainerView) -> bool:
        if self.engine_down:
            raise BackendUnavailable("engine down")
        return self.boxes.pop(container.container_id, None) is not None

    async def probe(self, engines: dict[str, Any], container: ContainerView) -> dict[str, Any] | None:
        found = self.boxes.get(container.container_id)
        return {} if found is not None and found.running else None

    async def remove_everywhere(self, sandbox_id: str, container_id: str | None, engine_id: str | None) -> bool:
        if self.engine_down or self.engine_lost:
            return False
        for cid in [c for c, found in self.boxes.items() if found.sandbox_id == sandbox_id]:
            del self.boxes[cid]
        return True

    async def sweep(self) -> dict[str, int]:
        return {"actors": 0, "containers": 0}

    @staticmethod
    def node_id() -> str:
        return NODE

    async def pool_exists(self, name: str) -> bool:
        return False


if TYPE_CHECKING:  # the type checker holds the fake to what the pool asks of a fleet
    from sandbox_actors.fleet import Fleet

    _held: Fleet = FakeFleet()
