"""One sandbox's life: create or adopt its container, serve operations, stop it.

:class:`SandboxRuntime` is what a :class:`~sandbox_actors.sandbox.SandboxActor`
wraps; it knows nothing of Ray, so it can be driven directly against a real
engine. It counts operations in flight and remembers the last one, which is
how the pool's idle check knows a long command is still running.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from backends import (
    Backend,
    Mount,
    SandboxAPI,
    SandboxRecord,
    SandboxSpec,
)
from backends.base import LABEL_ACTOR, LABEL_CLUSTER, LABEL_ENGINE_ID, Capability, Usage, usage_baseline
from backends.errors import (
    BackendUnavailable,
    InvalidRequest,
    NotSupported,
    ReadinessTimeout,
    RestoreFailed,
    SandboxDied,
    SandboxError,
    SandboxNotFound,
    SandboxStartError,
    SandboxUnreachable,
)
from backends.preview import Exposure
from backends.tls import BUNDLE, CA_CONTAINER_DIR, TRUST_ENVIRONMENT
from backends.sandbox_api import (
    UNIX_SCHEME,
    BashResult,
    CommandView,
    FileInfo,
    ShellResult,
    TerminalExit,
    TerminalOutput,
)

from .actorconfig import ENV_NAME, ActorConfig
from .audit import AuditLog
from .procfs import process_start, still_runs
from .threads import egress_ca_dir, sandbox_mounts, thread_dir
from .views import Found, StartOutcome

logger = logging.getLogger(__name__)

# A container found already running gets this long to answer before we give up on it.
_ADOPT_READY_TIMEOUT = 5.0
# How long an engine may take to report a killed container as stopped.
_DEATH_NOTICE_SECONDS = 2.0
_BACKGROUND_TRACKED = 64  # background commands a sandbox's idle timer asks about (the latest)
_BACKGROUND_CHECK_SECONDS = 1.0  # the pool waits 3 s for begin_stop; a slow answer keeps the sandbox
# Inside the container: which actor adopted it last (a label names the creator, so only an
# adopter writes this). It outlives the actor, so a new actor can tell whether a live actor still
# owns a running container. The sandbox's own code can write there too: it is only a hint of
# whom to ask, never trusted for which thread a sandbox serves. Best effort: an image where the
# path is not writable has none.
OWNER_FILE = "/run/sandbox-actors/owner.json"
# A live hibernation or snapshot: how long the sandbox's API server may take to let go of its
# socket (~40 ms here), and to listen again after a restore.
_QUIET_SECONDS = 10.0
# How long calls in flight may take to finish before a live checkpoint quiets the server (and cuts them).
_DRAIN_SECONDS = 5.0


def make_backend(config: ActorConfig, cluster: str | None = None) -> Backend:
    """The backend ``config`` asks for (it builds itself from its settings). ``cluster`` (the Ray
    session) labels what it creates."""
    return config.backend.build(prefix=config.container_prefix, pool=config.pool_name, policy=config.network_policy,
                                socket_dir=config.socket_dir, host_socket_dir=config.host_socket_dir,
                                labels={LABEL_CLUSTER: cluster} if cluster else None)


class SandboxRuntime:
    """Owns exactly one container.

    Args:
        config: the pool's config.
        sandbox_id: this sandbox's id.
        thread_id: the thread it serves, None when anonymous.
        backend: where the container runs.
        extra_labels: labels added to a container this runtime creates.
        clock: monotonic seconds (tests pass a fake).
        owner: the name of the actor this runtime lives in (recorded in the container).
        owner_alive: tells whether another owner named in a container still lives.
        mounts: host directories a new container mounts instead of the pool's thread directories.
    """

    def __init__(
        self,
        config: ActorConfig,
        sandbox_id: str,
        thread_id: str | None,
        backend: Backend,
        extra_labels: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        owner: str = "",
        owner_alive: Callable[[str], Awaitable[bool]] | None = None,
        mounts: tuple[Mount, ...] = (),
    ) -> None:
        self.config = config
        self._mounts = mounts
        self.sandbox_id = sandbox_id
        self.thread_id = thread_id
        self.backend = backend
        self._extra_labels = dict(extra_labels or {})
        self._clock = clock
        self.owner = owner
        self._owner_alive = owner_alive
        self.record: SandboxRecord | None = None
        self.adopted = False
        self.inflight = 0
        self._background: dict[str, None] = {}  # background commands started here (oldest first), maybe running
        self.last_activity = clock()
        self.resumed_live: bool | None = None  # after a resume asked to restore processes: whether they came back
        self.forked_live: bool | None = None  # a sandbox started from a live snapshot: whether its processes came
        self._serving = asyncio.Event()  # cleared while a live snapshot checkpoints and restores the container
        self._serving.set()
        self.dead_reason: str | None = None
        self._api: SandboxAPI | None = None
        self._start_lock = asyncio.Lock()
        self._shell_lock = asyncio.Lock()
        self._stopping = False
        self._pid_start: str | None = None  # when the container's init process started, if visible here
        self._owner_written: asyncio.Task[None] | None = None  # a resume's owner record, on its way
        self.audit_log = AuditLog(self._audit_path(thread_id))
        self._usage_seen: collections.deque[Usage] = collections.deque(maxlen=8)  # recent looks at its use
        self._exposed: dict[int, Exposure] = {}  # its preview URLs, by port inside

    # ── lifecycle ──────────────────────────────────────────────────────────

    async def start(self, resume: bool = False, image: str | None = None,
                    container_id: str | None = None, checkpoint: str | None = None,
                    restore_from: str | None = None) -> dict[str, Any]:
        """Adopt this sandbox's running container, or create one and wait until it answers; say
        which (``outcome``, a :class:`StartOutcome`). A running container that another live actor
        owns is neither served nor touched: the answer is ``outcome`` OWNED and that ``owner``'s
        name, for the pool to decide.

        Args:
            resume: a stopped container of this sandbox is started again (it was hibernated:
                its filesystem is the sandbox's), not replaced.
            image: the image of a new container (a snapshot's), instead of the config's.
            container_id: with ``resume``, the stopped container's id as the pool recorded it:
                started at once, without a look-up by name first.
            checkpoint: with ``resume`` and ``container_id``, the live checkpoint its processes
                and memory come back from (a live hibernation's). When they cannot, the container
                starts with its files only (``resumed_live`` False in the description, logged).
            restore_from: with ``image`` (a live snapshot's), the directory of its checkpoint: the
                new container goes on from its processes and memory (``forked_live`` True), or
                when it cannot, starts with the snapshot's files only (False, logged).

        Idempotent: a second call (once served) returns the same description.

        Raises:
            SandboxNotFound: a resume found no container of this sandbox.
            ImageNotFound, SandboxStartError, ReadinessTimeout, SandboxExited,
            BackendUnavailable. On any of them no container is left behind (a resumed one is
            left as it is, for the pool to decide: it removes one that did not answer).
        """
        async with self._start_lock:
            if self._api is not None:
                return self.describe()
            if self._stopping:
                raise SandboxDied(f"sandbox {self.sandbox_id} was destroyed")
            started = time.monotonic()
            found = await self._serve(resume, image, container_id, checkpoint, restore_from)
            if found.outcome is StartOutcome.OWNED:
                return {"sandbox_id": self.sandbox_id, "started": False, **found.report()}
            return {**self.describe(), **found.report(), "start_seconds": time.monotonic() - started}

    async def _serve(self, resume: bool, image: str | None, container_id: str | None,
                     checkpoint: str | None = None, restore_from: str | None = None) -> Found:
        """What :meth:`start` found, and served unless another live actor owns it."""
        # Only a resume deals with its container first: a create finds a container of this
        # sandbox that already exists by its name (and adopts or replaces it, as below).
        existing, resumed = await self._wake(container_id, checkpoint) if resume else (None, None)
        if existing is not None and existing.running and (owner := await self._live_owner(existing)):
            return Found(StartOutcome.OWNED, owner)
        if resumed is not None:
            await self._serve_resumed(resumed)
            return Found(StartOutcome.RESUMED)
        if existing is not None and existing.running and (adopted := await self._try_adopt(existing)):
            logger.info("sandbox %s: adopted running container %s", self.sandbox_id, existing.container_name)
            return adopted
        if existing is not None and resume:
            record, _ = await self.backend.start_container(self.sandbox_id, existing.container_id)
            await self._serve_resumed(record)
            return Found(StartOutcome.RESUMED)
        if existing is not None:
            logger.info("sandbox %s: removing unusable container %s", self.sandbox_id, existing.container_name)
            await self.backend.destroy(self.sandbox_id, existing.container_id)
        return await self._create(image, restore_from)

    async def _wake(self, container_id: str | None,
                    checkpoint: str | None = None) -> tuple[SandboxRecord | None, SandboxRecord | None]:
        """A resume's first step: (the container found, the container started now). By the id
        the pool recorded, the stopped container is started at once; one found running already,
        or looked up by name (no id), is returned as found, for :meth:`start` to adopt or start.

        Raises:
            SandboxNotFound: it is gone. Never a new container in its place: the thread would be
                told its sandbox resumed while everything it left there is gone (the pool gives
                the thread a new one).
        """
        try:
            if container_id is not None:
                record, was_running = await self._start_stopped(container_id, checkpoint)
                return (record, None) if was_running else (None, record)
            found = await self.backend.discover(self.sandbox_id)
            if found is not None:
                return found, None
        except SandboxNotFound:
            pass
        raise SandboxNotFound(f"the stopped container of hibernated sandbox {self.sandbox_id} is gone "
                              "(removed meanwhile), and what was left in it with it")

    async def _start_stopped(self, container_id: str, checkpoint: str | None) -> tuple[SandboxRecord, bool]:
        """Start the stopped container: from its live ``checkpoint`` when given (its server then
        listens again, and the checkpoint, used, is removed), else, or when that fails, with its
        files only."""
        if checkpoint:
            try:
                record, was_running = await self.backend.start_container(self.sandbox_id, container_id, checkpoint)
            except RestoreFailed as exc:
                logger.warning("%s; starting it with its files only (its processes and memory are lost)", exc.message)
                self.resumed_live = False
            else:
                try:
                    if not was_running:
                        await self.backend.listen_again(record, _QUIET_SECONDS)
                except ReadinessTimeout as exc:
                    logger.warning("sandbox %s: restored, but its API server did not listen again (%s); starting it "
                                   "with its files only", self.sandbox_id, exc.message)
                    await self.backend.stop_container(self.sandbox_id, container_id)
                    self.resumed_live = False
                else:
                    self.resumed_live = True
                    await self._drop_checkpoint(container_id, checkpoint)
                    return record, was_running
        return await self.backend.start_container(self.sandbox_id, container_id)

    async def _drop_checkpoint(self, container_id: str, checkpoint: str) -> None:
        try:
            await self.backend.remove_checkpoint(self.sandbox_id, container_id, checkpoint)
        except SandboxError as exc:  # it goes with the container at the latest
            logger.info("sandbox %s: could not remove checkpoint %s (%s)", self.sandbox_id, checkpoint, exc.message)

    async def _serve_resumed(self, record: SandboxRecord) -> None:
        """Wait until the hibernated container, started again, answers; then serve it. Its owner
        record (this actor, for a later adopter to ask) is written meanwhile, not waited for: the
        pool starts one actor per sandbox at a time, and a resume waits for everything else."""
        api = SandboxAPI(record.url, record.token)
        try:
            await api.wait_ready(
                self.config.readiness_timeout,
                is_running=lambda: self.backend.is_running(self.sandbox_id),
                log_tail=lambda: self.backend.logs_tail(self.sandbox_id),
            )
        except BaseException:
            await api.aclose()
            raise
        self._serve_record(record, api, adopted=True)
        self._owner_written = asyncio.ensure_future(self._write_owner())
        logger.info("sandbox %s: resumed container %s", self.sandbox_id, record.container_name)

    def _serve_record(self, record: SandboxRecord, api: SandboxAPI, adopted: bool) -> None:
        """Serve ``record``'s container through ``api`` from now on, and note when its init process
        started (what :meth:`alive` compares with): a restore from a checkpoint (a live snapshot's
        own, a live resume) runs the container under a new one."""
        self.record, self._api, self.adopted = record, api, adopted
        self._pid_start = process_start(record.pid) if record.pid else None

    async def _try_adopt(self, record: SandboxRecord) -> Found | None:
        """Serve ``record``'s running container when it answers and no other live actor owns it
        (then it is found OWNED, not served); None when it does not answer."""
        api = SandboxAPI(record.url, record.token)
        try:
            await api.wait_ready(
                _ADOPT_READY_TIMEOUT,
                is_running=lambda: self.backend.is_running(self.sandbox_id),
                log_tail=lambda: self.backend.logs_tail(self.sandbox_id),
            )
        except BackendUnavailable:
            await api.aclose()
            raise
        except SandboxError as exc:
            logger.info("sandbox %s: running container does not answer (%s)", self.sandbox_id, type(exc).__name__)
            await api.aclose()
            return None
        owner = await self._live_owner(record, str(((await read_owner(api)) or {}).get("actor") or ""))
        if owner is not None:
            await api.aclose()
            return Found(StartOutcome.OWNED, owner)
        self._serve_record(record, api, adopted=True)
        await self._write_owner()
        return Found(StartOutcome.ADOPTED)

    async def _live_owner(self, record: SandboxRecord, recorded_owner: str = "") -> str | None:
        """Another actor that still lives and owns ``record``'s container, if any.

        The creating actor is in a label (immutable); a later adopter is in the
        owner record inside the container. Neither is trusted for more than
        "ask whether that actor lives".
        """
        for other in {record.labels.get(LABEL_ACTOR, ""), recorded_owner}:
            if other and other != self.owner and self._owner_alive is not None and await self._owner_alive(other):
                return other
        return None

    async def _spec(self, image: str | None) -> SandboxSpec:
        return await asyncio.to_thread(container_spec, self.config, self.sandbox_id, self.thread_id, image,
                                       self._mounts, {**self._extra_labels, LABEL_ACTOR: self.owner})

    async def _create(self, image: str | None = None, restore_from: str | None = None) -> Found:
        config = self.config
        spec = await self._spec(image)
        forked = await self._fork(spec, restore_from) if restore_from else None
        record = forked or await self.backend.create(spec)
        if record.labels.get(LABEL_ACTOR, "") != self.owner:
            # The sandbox's container exists already (the engine handed it back): adopt it when it
            # answers and no live actor owns it, else replace it once.
            if owner := await self._live_owner(record):
                return Found(StartOutcome.OWNED, owner)
            if adopted := await self._try_adopt(record):
                logger.info("sandbox %s: adopted running container %s", self.sandbox_id, record.container_name)
                return adopted
            logger.info("sandbox %s: removing unusable container %s", self.sandbox_id, record.container_name)
            await self.backend.destroy(self.sandbox_id, record.container_id)
            record = await self.backend.create(spec)
            if record.labels.get(LABEL_ACTOR, "") != self.owner:
                raise SandboxStartError(f"container {record.container_name} appeared meanwhile and does not answer")
        api = SandboxAPI(record.url, record.token)
        try:
            await api.wait_ready(
                config.readiness_timeout,
                is_running=lambda: self.backend.is_running(self.sandbox_id),
                log_tail=lambda: self.backend.logs_tail(self.sandbox_id),
            )
        except BaseException:
            # Roll back: an unready container is never left running.
            await api.aclose()
            with contextlib.suppress(SandboxError):
                await self.backend.destroy(self.sandbox_id, record.container_id)
            raise
        # When the backend labels containers with their creator (Docker), no owner record is
        # needed: only a later adopter writes one (a request less per start).
        self._serve_record(record, api, adopted=False)
        if not self.backend.records_creator:
            await self._write_owner()
        logger.info("sandbox %s: container %s ready at %s", self.sandbox_id, record.container_name, record.url)
        return Found(StartOutcome.CREATED)

    async def _fork(self, spec: SandboxSpec, source: str) -> SandboxRecord | None:
        """A new container restored from the live snapshot's checkpoint in ``source``, listening
        with its own token; None (logged) when it cannot be: then it starts with the files only."""
        if await self.backend.discover(self.sandbox_id) is not None:
            return None  # its container exists already (a start cut short): adopted or replaced as any
        try:
            record = await self.backend.fork_from_checkpoint(spec, source)
        except (RestoreFailed, SandboxNotFound) as exc:
            logger.warning("sandbox %s: not restored from the live snapshot (%s); it starts with the snapshot's "
                           "files only", self.sandbox_id, exc.message)
            self.forked_live = False
            return None
        try:
            await self.backend.listen_again(record, _QUIET_SECONDS)
        except ReadinessTimeout as exc:
            logger.warning("sandbox %s: restored from the live snapshot, but its API server did not listen again "
                           "(%s); it starts with the snapshot's files only", self.sandbox_id, exc.message)
            await self.backend.destroy(self.sandbox_id, record.container_id)
            self.forked_live = False
            return None
        self.forked_live = True
        return record

    async def claim(self, thread_id: str) -> dict[str, Any]:
        """Give this (pre-warmed, anonymous) sandbox to ``thread_id`` (the pool records the claim)."""
        if self._api is None:
            raise SandboxNotFound(f"sandbox {self.sandbox_id} has not been started")
        self.thread_id = thread_id  # the owner (this actor) is unchanged: nothing to record
        self.audit_log.path = self._audit_path(thread_id)
        self.last_activity = self._clock()
        return self.describe()

    async def _close_api(self) -> None:
        """Close the client to the sandbox's API (after the owner record on its way, if any)."""
        if self._owner_written is not None:
            await asyncio.gather(self._owner_written, return_exceptions=True)
            self._owner_written = None
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    async def _write_owner(self) -> None:
        if self._api is None:
            return
        record = {"actor": self.owner, "sandbox_id": self.sandbox_id, "thread_id": self.thread_id}
        try:
            await self._api.write_file(OWNER_FILE, json.dumps(record))
        except SandboxError as exc:
            logger.info("sandbox %s: could not record its owner (%s)", self.sandbox_id, type(exc).__name__)

    async def hibernate(self, live: bool = False) -> dict[str, Any]:
        """Stop serving and stop the container, keeping its filesystem (the pool then ends this
        actor; a new one resumes the container). With ``live``, its processes and memory are kept
        too, in a checkpoint (gVisor): the description then has ``checkpoint`` (name, bytes).

        Raises:
            NotSupported: ``live`` on a sandbox that cannot be checkpointed (says what is missing).
            BackendUnavailable: the engine did not answer; SandboxStartError: the checkpoint
                failed. Either way the sandbox serves on (unless the failure ended it).
        """
        if self.record is None:
            raise SandboxNotFound(f"sandbox {self.sandbox_id} has not been started")
        if live:
            self._check_live()
        self._stopping = True
        saved: dict[str, object] | None = None
        try:
            if live:
                saved = await self._checkpoint(self.record)
            else:
                await self.backend.stop_container(self.sandbox_id, self.record.container_id)
        except SandboxError:
            self._stopping = False
            raise
        await self._unexpose_all()
        await self._close_api()
        await asyncio.to_thread(self.audit_log.close)  # its trail whole before the actor ends
        return {**self.describe(), **({"checkpoint": saved} if saved is not None else {})}

    def _check_live(self) -> None:
        if self.config.runtime != "runsc":
            raise NotSupported(
                f"a live hibernation keeps processes and memory through gVisor's checkpoints: this pool runs its "
                f"sandboxes under {self.config.runtime or 'runc'!r} (Debian's CRIU, which runc would need, does not "
                "pass `criu check` on this kind of kernel); set runtime: runsc, or hibernate without live",
                feature="live hibernate")
        if Capability.LIVE_CHECKPOINT not in self.backend.capabilities:
            raise NotSupported(f"a live hibernation: the {type(self.backend).__name__} cannot checkpoint",
                               feature="live hibernate")

    async def _checkpoint(self, record: SandboxRecord) -> dict[str, object]:
        """Quiet the sandbox's API server (gVisor cannot save a socket bound on the host: on
        SIGUSR1 it lets go of it and of every connection), then checkpoint the container, which
        stops it. When the checkpoint fails with the container still running, the server listens
        again and the failure is raised."""
        socket_path = record.url[len(UNIX_SCHEME):] if record.url.startswith(UNIX_SCHEME) else ""
        if not socket_path:
            raise NotSupported("a live hibernation needs the sandbox's API on a unix socket (an image that serves it "
                               "there, as ours does)", feature="live hibernate")
        # Calls in flight may finish first (new ones are held back by the caller), for a while.
        deadline = time.monotonic() + _DRAIN_SECONDS
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._close_api()  # our kept-alive connections first
        await self.backend.signal(self.sandbox_id, record.container_id, "SIGUSR1")
        deadline = time.monotonic() + _QUIET_SECONDS
        while os.path.exists(socket_path):
            if time.monotonic() > deadline:
                await self._serve_again(record)
                raise SandboxStartError(f"sandbox {self.sandbox_id}'s API server did not let go of its socket within "
                                        f"{_QUIET_SECONDS:.0f}s (an image without our server's SIGUSR1?); it serves on")
            await asyncio.sleep(0.02)
        name = f"hibernated-{secrets.token_hex(4)}"
        try:
            saved = await self.backend.checkpoint(self.sandbox_id, record.container_id, name)
        except SandboxError:
            if await self.backend.is_running(self.sandbox_id):
                await self._serve_again(record)
            raise
        return {"name": name, "bytes": saved.get("bytes", 0)}

    async def _serve_again(self, record: SandboxRecord) -> None:
        """After a live hibernation that did not happen: the server listens again, and we use it."""
        await self.backend.listen_again(record, _QUIET_SECONDS)
        self._api = SandboxAPI(record.url, record.token)

    async def snapshot(self, image: str, labels: Mapping[str, str], keep_checkpoint_in: str | None = None
                       ) -> dict[str, Any]:
        """Save the container's filesystem (not its processes, not the mounts) as ``image``. With
        ``keep_checkpoint_in`` (a live snapshot, gVisor), its processes and memory too: the
        container is checkpointed (which stops it), committed while stopped, its checkpoint kept
        in that directory (``checkpoint``: path and bytes in the answer), and restored: it goes
        on as it was. Calls made meanwhile wait; those in flight get 5 s to finish, then are cut
        (SandboxUnreachable).
        """
        if self.record is None or self._stopping or self.dead_reason is not None:
            raise SandboxDied(f"sandbox {self.sandbox_id} is not running; acquire it first")
        if keep_checkpoint_in is None:
            return await self.backend.commit(self.sandbox_id, self.record.container_id, image, labels)
        self._check_live()
        record = self.record
        self._serving.clear()
        try:
            saved = await self._checkpoint(record)
            try:
                committed = await self.backend.commit(self.sandbox_id, record.container_id, image, labels)
                kept = await self.backend.keep_checkpoint(self.sandbox_id, record.container_id, str(saved["name"]),
                                                          keep_checkpoint_in)
            finally:
                # The sandbox goes on, from the checkpoint (its files only if that cannot be).
                again, _ = await self._start_stopped(record.container_id, str(saved["name"]))
                await self._serve_resumed(again)
            return {**committed, "checkpoint": {"path": keep_checkpoint_in, "bytes": kept}}
        finally:
            self._serving.set()

    async def begin_stop(self, if_idle_for: float) -> bool:
        """Stop serving if idle that long with nothing in flight and no background command of its
        own still running (the pool then removes the container, or calls the stop off). False:
        busy, keep serving."""
        if self.inflight > 0 or self.idle_for() <= if_idle_for:
            return False
        if await self._background_running():
            self.last_activity = self._clock()  # a running background command is activity
            return False
        if self.inflight > 0 or self.idle_for() <= if_idle_for:  # an operation came while we asked
            return False
        self._stopping = True  # new operations are refused from here on
        return True

    async def _background_running(self) -> bool:
        """Whether a background command started through this runtime still runs. Asked of the
        sandbox, newest first; ended and unknown ones are forgotten. No answer within
        ``_BACKGROUND_CHECK_SECONDS`` counts as running: the sandbox is kept and asked again later."""
        try:
            return await asyncio.wait_for(self._ask_background(), _BACKGROUND_CHECK_SECONDS)
        except asyncio.TimeoutError:
            logger.info("sandbox %s: its background commands did not answer in time; keeping it", self.sandbox_id)
            return True

    async def _ask_background(self) -> bool:
        for session_id in reversed(list(self._background)):
            if self._api is None:
                return False
            try:
                view = await self._api.view_command(session_id, 0, 1)
            except SandboxError as exc:  # the sandbox no longer knows it (or is gone): nothing of it runs
                logger.info("sandbox %s: background command %s: %s", self.sandbox_id, session_id, type(exc).__name__)
                view = None
            if view is not None and view.running:
                return True
            self._background.pop(session_id, None)
        return False

    def cancel_stop(self) -> None:
        """Serve again after :meth:`begin_stop` (the sandbox's thread came back in time)."""
        if self._api is not None:
            self._stopping = False

    async def alive(self) -> bool:
        """A cheap check that the sandbox can serve: not known dead, and its container's init
        process still runs (a file read on the engine's host). An HTTP probe decides where that
        process is out of sight (a provisioner's sandbox) or is not the one it started with."""
        if self.dead_reason is not None or self._api is None or self._stopping:
            return False
        if self.record is not None and still_runs(self.record.pid, self._pid_start):
            return True
        return await self._api.health()

    async def stop(self) -> bool:
        """Remove the container.

        Returns:
            True when the container is gone (or never existed).

        Raises:
            BackendUnavailable: the engine did not answer; the container may still exist.
        """
        self._stopping = True  # new operations are refused from here on
        await self._unexpose_all()
        try:
            if self.record is not None:  # only the container this sandbox owns, never a namesake
                await self.backend.destroy(self.sandbox_id, self.record.container_id)
        except BackendUnavailable:
            self._stopping = False  # nothing happened: the sandbox serves on (or dies on its own)
            raise
        await self._close_api()
        await asyncio.to_thread(self.audit_log.close)
        return True

    async def close(self) -> None:
        """Release client resources (and preview URLs); the container is untouched."""
        await self._unexpose_all()
        await self._close_api()
        await asyncio.to_thread(self.audit_log.close)
        await self.backend.close()

    # ── state ──────────────────────────────────────────────────────────────

    def idle_for(self) -> float:
        return 0.0 if self.inflight > 0 else max(0.0, self._clock() - self.last_activity)

    def describe(self) -> dict[str, Any]:
        record = self.record
        return {
            "sandbox_id": self.sandbox_id,
            "thread_id": self.thread_id,
            "started": self._api is not None,
            "adopted": self.adopted,
            "url": record.url if record else None,
            "container_name": record.container_name if record else None,
            "container_id": record.container_id if record else None,
            "engine_id": record.labels.get(LABEL_ENGINE_ID, record.engine_id) if record else None,
            "host": record.node if record else None,
            "created_at": record.created_at if record else None,
            "idle_for": self.idle_for(),
            "inflight": self.inflight,
            "dead_reason": self.dead_reason,
            "actor_name": self.owner,
            # The container's first process and when it started: the pool, on this node, checks a
            # warm sandbox by them without a call (a restore runs under a new one: then it asks).
            "container_pid": record.pid if record else None,
            "container_started": self._pid_start,
            **({"resumed_live": self.resumed_live} if self.resumed_live is not None else {}),
            **({"forked_live": self.forked_live} if self.forked_live is not None else {}),
        }

    # ── operations ─────────────────────────────────────────────────────────

    @contextlib.asynccontextmanager
    async def _operation(self) -> AsyncIterator[SandboxAPI]:
        if self.dead_reason is not None:
            raise SandboxDied(f"sandbox {self.sandbox_id} is dead: {self.dead_reason}; acquire the thread again")
        if self._stopping:
            raise SandboxDied(f"sandbox {self.sandbox_id} is being destroyed; acquire the thread again")
        if not self._serving.is_set():
            await self._serving.wait()  # a live snapshot under way
        if self._api is None:
            raise SandboxNotFound(f"sandbox {self.sandbox_id} has not been started")
        self.inflight += 1
        self.last_activity = self._clock()
        try:
            yield self._api
        except SandboxUnreachable as exc:
            # Gone, or only slow? Ask the engine. If the engine does not answer
            # either, that is BackendUnavailable, never "dead". (Cut by a live snapshot: alive.)
            if self._stopping:  # cut by a hibernation (a live one quiets the server first) or a destroy
                raise SandboxDied(f"sandbox {self.sandbox_id} was hibernated or destroyed meanwhile; acquire the "
                                  "thread again") from exc
            if not self._serving.is_set() or await self._still_running():
                raise
            self.dead_reason = "its container stopped"
            raise SandboxDied(
                f"sandbox {self.sandbox_id}: its container stopped; acquire the thread again for a new one"
            ) from exc
        finally:
            self.inflight -= 1
            self.last_activity = self._clock()

    async def _still_running(self) -> bool:
        """Whether the container still runs, allowing the engine a moment to notice a kill
        (a killed container's connections drop before the engine reports it stopped)."""
        deadline = self._clock() + _DEATH_NOTICE_SECONDS
        while True:
            if not await self.backend.is_running(self.sandbox_id):
                return False
            if self._clock() >= deadline:
                return True
            await asyncio.sleep(0.2)

    def _shell_timeout(self, timeout: float | None, idle_timeout: float | None) -> float | None:
        """A command's wall-clock limit: the one given, else none when it has an idle timeout (that
        bounds it), else the config's ``exec_timeout``."""
        return timeout or (None if idle_timeout else self.config.exec_timeout)

    async def exec(self, command: str, timeout: float | None = None, exec_dir: str | None = None,
                   idle_timeout: float | None = None) -> ShellResult:
        """Run ``command`` in the persistent shell (one at a time per sandbox)."""
        async with self._operation() as api, self._shell_lock:
            with self.audit_log.command("exec", command) as entry:
                result = await api.exec(command, timeout=self._shell_timeout(timeout, idle_timeout),
                                        exec_dir=exec_dir, idle_timeout=idle_timeout)
                self.audit_log.ended(entry, result)
                return result

    async def stream(
        self, command: str, timeout: float | None = None, exec_dir: str | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[str | ShellResult]:
        """Run ``command`` in the persistent shell, yielding its output as it comes, then its
        ShellResult. Closing the iteration early kills the command (and keeps the shell)."""
        async with self._operation() as api, self._shell_lock:
            stream = api.stream(command, timeout=self._shell_timeout(timeout, idle_timeout), exec_dir=exec_dir,
                                idle_timeout=idle_timeout)
            async for item in self._audited("stream", command, stream, ShellResult):
                yield item

    async def bash_stream(
        self, command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
        exec_dir: str | None = None,
    ) -> AsyncIterator[tuple[str, str] | BashResult]:
        """Like :meth:`bash`, yielding ("stdout" | "stderr", text) as it comes, then its BashResult."""
        _check_env(env)
        async with self._operation() as api:
            stream = api.bash_stream(command, env=env, timeout=timeout or self.config.exec_timeout, exec_dir=exec_dir)
            async for item in self._audited("bash_stream", command, stream, BashResult):
                yield item

    async def _audited(self, kind: str, command: str, stream: Any, final: type) -> AsyncIterator[Any]:
        """A streamed command's items, recorded in the audit trail with its ``final`` result;
        the stream closed at once however the iteration ends (an early end kills the command)."""
        with self.audit_log.command(kind, command) as entry:
            try:
                async for item in stream:
                    if isinstance(item, final):
                        self.audit_log.ended(entry, item)
                    yield item
            finally:
                await stream.aclose()

    async def start_command(self, command: str, session_id: str | None = None, exec_dir: str | None = None) -> str:
        async with self._operation() as api:
            with self.audit_log.command("start", command) as entry:
                session_id = await api.start_command(command, session_id=session_id, exec_dir=exec_dir)
                entry["session_id"] = session_id
        self._background[session_id] = None
        while len(self._background) > _BACKGROUND_TRACKED:  # the oldest are forgotten
            del self._background[next(iter(self._background))]
        return session_id

    async def view_command(self, session_id: str, offset: int = 0, max_bytes: int | None = None) -> CommandView:
        async with self._operation() as api:
            return await api.view_command(session_id, offset, max_bytes)

    async def wait_command(self, session_id: str, seconds: float) -> CommandView:
        async with self._operation() as api:
            return await api.wait_command(session_id, seconds)

    async def kill_command(self, session_id: str) -> CommandView:
        async with self._operation() as api:
            return await api.kill_command(session_id)

    async def upload_chunk(self, path: str, offset: int, data: bytes, final: bool) -> int:
        async with self._operation() as api:
            return await api.upload_chunk(path, offset, data, final)

    async def download_chunk(self, path: str, offset: int, length: int) -> tuple[bytes, int]:
        async with self._operation() as api:
            return await api.download_chunk(path, offset, length)

    async def bash(
        self, command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
        exec_dir: str | None = None,
    ) -> BashResult:
        """Run ``command`` in a fresh session with extra ``env`` (for secrets)."""
        _check_env(env)
        async with self._operation() as api:
            with self.audit_log.command("bash", command) as entry:
                result = await api.bash(command, env=env, timeout=timeout or self.config.exec_timeout,
                                        exec_dir=exec_dir)
                self.audit_log.ended(entry, result)
                return result

    async def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        async with self._operation() as api:
            return await api.read_file(path, start_line, end_line)

    async def read_bytes(self, path: str) -> bytes:
        async with self._operation() as api:
            return await api.read_bytes(path)

    async def write_file(self, path: str, content: str | bytes, append: bool = False) -> int:
        async with self._operation() as api:
            return await api.write_file(path, content, append=append)

    async def list_files(self, path: str, recursive: bool = False, show_hidden: bool = False) -> list[FileInfo]:
        async with self._operation() as api:
            return await api.list_files(path, recursive=recursive, show_hidden=show_hidden)

    async def usage(self) -> Usage:
        """What the sandbox uses now (see api.usage). Not an activity: watching a sandbox does
        not keep it from its idle timeout."""
        return await self.measure(disk=True)

    async def measure(self, disk: bool) -> Usage:
        """:meth:`usage`; its writable layer measured only with ``disk`` (a walk of its files)."""
        await self._serving.wait()  # a live snapshot under way
        if self.dead_reason is not None or self._stopping or self.record is None:
            raise SandboxDied(f"sandbox {self.sandbox_id} is not running; acquire it first")
        since = usage_baseline(self._usage_seen, time.time())
        seen = await self.backend.usage(self.sandbox_id, self.record.container_id, since=since, disk=disk)
        seen = dataclasses.replace(seen, commands=self.audit_log.count)
        if any(look.cpu_seconds > seen.cpu_seconds for look in self._usage_seen):
            self._usage_seen.clear()  # its container started again (a resume): its counters with it
        self._usage_seen.append(seen)
        return seen

    async def pty_open(self, cols: int = 80, rows: int = 24) -> str:
        async with self._operation() as api:
            with self.audit_log.command("pty", f"(terminal {cols}x{rows})") as entry:
                terminal_id = await api.pty_open(cols, rows)
                entry["terminal_id"] = terminal_id
                return terminal_id

    async def pty_write(self, terminal_id: str, data: str) -> int:
        async with self._operation() as api:
            return await api.pty_write(terminal_id, data)

    async def pty_resize(self, terminal_id: str, cols: int, rows: int) -> None:
        async with self._operation() as api:
            await api.pty_resize(terminal_id, cols, rows)

    async def pty_output(self, terminal_id: str, offset: int = 0) -> AsyncIterator[TerminalOutput | TerminalExit]:
        """The terminal's output as it comes (see api.pty_output). Reading is not an activity
        (a terminal left open does not keep its sandbox from the idle timeout; typing does)."""
        if self._api is None or self._stopping or self.dead_reason is not None:
            raise SandboxDied(f"sandbox {self.sandbox_id} is not running; acquire it first")
        output = self._api.pty_output(terminal_id, offset)
        try:
            async for item in output:
                yield item
        finally:
            await output.aclose()

    async def pty_close(self, terminal_id: str) -> int | None:
        async with self._operation() as api:
            return await api.pty_close(terminal_id)

    async def expose(self, port: int) -> str:
        """A preview URL for ``port`` inside the sandbox (see api.expose)."""
        async with self._operation():
            if port in self._exposed:
                return self._exposed[port].url
            assert self.record is not None  # served: it has its record
            exposure = Exposure(self.record.url, self.record.token, port, bind=self.config.bind_host,
                                on_use=self._touch)
            try:
                url = await exposure.open()
            except OSError as exc:
                raise SandboxError(f"could not listen on {self.config.bind_host} for port {port}'s URL: "
                                   f"{exc.strerror or exc}") from exc
            self._exposed[port] = exposure
            logger.info("sandbox %s: port %d exposed at %s", self.sandbox_id, port, url.split("?")[0])
            return url

    async def unexpose(self, port: int) -> bool:
        """Revoke ``port``'s preview URL (see api.unexpose)."""
        exposure = self._exposed.pop(port, None)
        if exposure is None:
            return False
        await exposure.close()
        return True

    async def _unexpose_all(self) -> None:
        for port in list(self._exposed):
            await self.unexpose(port)

    def _touch(self) -> None:
        self.last_activity = self._clock()

    async def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The commands run (see api.audit)."""
        if limit <= 0:
            raise InvalidRequest(f"limit must be positive, not {limit}")
        return await asyncio.to_thread(self.audit_log.entries, limit)

    def _audit_path(self, thread_id: str | None) -> Path | None:
        """The thread's audit trail on the host, beside (not in) its mounted directories."""
        if thread_id is None or not self.config.thread_mounts:
            return None
        return thread_dir(self.config.base_dir, thread_id).parent / "audit.jsonl"


def _check_env(env: Mapping[str, str] | None) -> None:
    for name in env or {}:
        if not ENV_NAME.match(str(name)):
            raise InvalidRequest(f"invalid environment variable name {name!r}")


async def read_owner(api: SandboxAPI) -> dict[str, Any] | None:
    """The owner record inside a sandbox's container, or None when there is none (or it is garbled:
    the sandbox's own code can write there, so it only ever answers "which actor to ask")."""
    try:
        record = json.loads(await api.read_file(OWNER_FILE))
    except (SandboxError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def container_spec(config: ActorConfig, sandbox_id: str, thread_id: str | None, image: str | None = None,
                   mounts: tuple[Mount, ...] = (), labels: Mapping[str, str] | None = None) -> SandboxSpec:
    """What a new container of a sandbox is created with, the thread's directories made: one
    place for the pool's sandboxes and for the bench's floor, which starts the same containers
    with no Ray.

    Raises:
        SandboxStartError: the thread directories could not be made.
    """
    try:
        # Host directories only where the backend mounts them: a provisioner decides what its sandboxes get.
        made = (sandbox_mounts(config, thread_id, mounts)
                if Capability.HOST_MOUNTS in config.backend.capabilities else ())
    except OSError as exc:
        raise SandboxStartError(
            f"could not create the thread directories under {config.base_dir}: {exc.strerror}"
        ) from exc
    environment = _resolve_env(config)
    if config.egress_ca:
        made, environment = (*made, _egress_ca_mount(config)), {**TRUST_ENVIRONMENT, **environment}
    return SandboxSpec(
        sandbox_id=sandbox_id, pool=config.pool_name, image=image or config.image, thread_id=thread_id,
        port=config.port, mounts=made, environment=environment, token=secrets.token_urlsafe(32),
        limits=config.limits, capabilities=tuple(config.capabilities), bind_host=config.bind_host,
        extra_labels=dict(labels or {}), user=config.user, runtime=config.runtime,
        read_only_rootfs=config.read_only_rootfs,
    )


def _egress_ca_mount(config: ActorConfig) -> Mount:
    """The pool's egress CA, certificates only (its key is beside, never mounted), which the
    sandbox's TLS clients trust (TRUST_ENVIRONMENT): HTTPS to an ``inject`` domain is ended at the
    proxy. The node's reaper made it when it prepared the node for the pool."""
    public = egress_ca_dir(config.base_dir, config.pool_name) / "public"
    if not (public / BUNDLE).is_file():
        raise SandboxStartError(f"the egress CA of pool {config.pool_name!r} is missing at {public}: the node's "
                                "reaper makes it when it prepares the node for the pool (see the reaper's log)")
    return Mount(str(egress_ca_dir(config.host_dir, config.pool_name) / "public"), CA_CONTAINER_DIR, read_only=True)


def _resolve_env(config: ActorConfig) -> dict[str, str]:
    env = config.resolved_environment()
    for key, value in config.environment.items():
        if value.startswith("$") and not env[key]:
            # Name the variable, never a value: values may be secrets.
            logger.warning("environment %s refers to %s, which is not set here; passing ''", key, value)
    return env
