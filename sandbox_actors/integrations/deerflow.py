"""A drop-in sandbox provider for deer-flow, backed by a sandbox-actors pool on Ray.

In deer-flow's ``config.yaml``::

    sandbox:
      use: sandbox_actors.integrations.deerflow:RaySandboxProvider
      sandbox_actors:              # every key of ours, under one key of its own
        pool_name: deerflow        # (the default)
        idle_timeout: 600
        # config: /etc/sandbox-actors/pool.yaml   (the pool's keys from a file instead)
        # ray_address: auto        (default: RAY_ADDRESS, else the cluster on this machine,
        #                           else a head started here that outlives the process)

deer-flow builds the provider with no arguments in each of its processes; every one attaches to
the same Ray cluster and the same named pool, so a conversation's sandbox is one, whichever
process serves a turn. Sandboxes are keyed by (user, thread), as deer-flow keys them.

A new sandbox starts on the node of the process that asks for it, and mounts deer-flow's own
directories of that conversation: workspace, uploads and outputs at ``/mnt/user-data`` and the
ACP workspace (read-only) at ``/mnt/acp-workspace``, as deer-flow's paths give them; and the
user's skills (read-only) where deer-flow's ``skills.container_path`` says. So files the gateway
uploads are in the sandbox, and what the agent writes to ``/mnt/user-data/outputs`` is where
deer-flow's artifacts router reads it (``uses_thread_data_mounts`` is True). With gateways on
several nodes, deer-flow's base directory must be shared storage, as deer-flow itself requires.

When deer-flow is importable the classes subclass its ``SandboxProvider`` and ``Sandbox``;
without it they stand alone with the same methods (for tests and other hosts).
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import re
import shlex
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.base import Mount

from ..errors import CommandTimeout, ConfigError, SandboxDied, SandboxError
from . import sandbox_search

logger = logging.getLogger(__name__)

try:  # deer-flow's own classes, when it is installed
    from deerflow.sandbox.sandbox import Sandbox as _SandboxBase
    from deerflow.sandbox.sandbox_provider import SandboxProvider as _ProviderBase
    from deerflow.sandbox.search import IGNORE_PATTERNS, GrepMatch
except ImportError:  # stand alone, same interface
    _SandboxBase = object  # type: ignore[assignment,misc]
    _ProviderBase = object  # type: ignore[assignment,misc]
    # What glob and grep skip without deer-flow (with it, deer-flow's own list).
    IGNORE_PATTERNS = [".git", ".svn", ".hg", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".nox",
                       ".eggs", "site-packages", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".cache"]

    @dataclass(frozen=True)
    class GrepMatch:  # type: ignore[no-redef]
        path: str
        line_number: int
        line: str


DEERFLOW = _ProviderBase is not object
VIRTUAL_PATH_PREFIX = "/mnt/user-data"  # deer-flow's: downloads stay under it
ACP_WORKSPACE = "/mnt/acp-workspace"
SECTION = "sandbox_actors"  # our key in deer-flow's `sandbox:` section
DEFAULT_POOL = "deerflow"
NO_OUTPUT_TIMEOUT = 600.0  # deer-flow's AIO sandbox: a command that prints nothing for this long stops
ENV_COMMAND_TIMEOUT = 600.0  # and one with request-scoped env, by wall clock
MAX_DOWNLOAD = 100 * 1024 * 1024  # deer-flow's AIO sandbox refuses larger downloads
SEARCH_TIMEOUT = 120.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NO_OUTPUT = "(no output)"
# deer-flow's sandbox keys that are its own (its tools read them), whatever the provider.
_DEERFLOW_KEYS = {"use", "allow_host_bash", "bash_output_max_chars", "read_file_output_max_chars",
                  "ls_output_max_chars", "bash_command_timeout", SECTION}
_PROVIDER_KEYS = {"config", "ray_address"}  # ours under `sandbox_actors:` that are not pool keys
_SEARCH_SCRIPT = Path(sandbox_search.__file__).read_text(encoding="utf-8")


def _validate_env(env: Mapping[str, str] | None) -> None:
    for key in env or {}:
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise ValueError(f"env key {key!r} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")


class RaySandbox(_SandboxBase):  # type: ignore[misc,valid-type]
    """One deer-flow sandbox: a sandbox-actors sandbox, by its handle.

    Args:
        id: the sandbox id; handle: its SandboxHandle; lost: called once when the sandbox turns
            out to be gone (the provider then forgets it, and deer-flow's next tool call acquires
            the conversation's sandbox again).
    """

    def __init__(self, id: str, handle: Any, lost: Any = None) -> None:
        if DEERFLOW:
            super().__init__(id)
        self._id = id
        self._box = handle
        self._lost = lost

    @property
    def id(self) -> str:
        return self._id

    def _gone(self, exc: SandboxError) -> str:
        if isinstance(exc, SandboxDied) and self._lost is not None:
            self._lost(self._id)
        logger.warning("sandbox %s: %s", self._id, type(exc).__name__)
        return f"Error: {exc}"

    def execute_command(self, command: str, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
        """The command's output, or ``Error: ...`` when it could not run, as deer-flow's AIO sandbox
        answers. Without ``env`` it runs in the persistent shell (stdout and stderr together) and
        stops after 600 s without new output, however long it runs; with ``env`` (request-scoped
        secrets: never logged, never in the command line) in a fresh session for at most 600 s,
        stderr after stdout behind ``Std Error:``. ``timeout`` (seconds) adds a wall-clock limit."""
        _validate_env(env)
        try:
            if env:
                result = self._box.bash(command, env=env, timeout=timeout or ENV_COMMAND_TIMEOUT)
                output = result.stdout
                if result.stderr:
                    output += f"\nStd Error:\n{result.stderr}" if output else result.stderr
            else:
                output = self._box.exec(command, timeout=timeout, idle_timeout=NO_OUTPUT_TIMEOUT).output
        except CommandTimeout as exc:
            partial = "".join(part for part in (exc.output, getattr(exc, "stderr", "")) if part)
            return f"{partial}\nError: {exc}" if partial else f"Error: {exc}"
        except SandboxError as exc:
            return self._gone(exc)
        return output or _NO_OUTPUT

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        """Lines ``start_line`` to ``end_line`` (1-based, inclusive) or the whole file; ``Error: ...``
        when it cannot be read."""
        try:
            return self._box.read_file(path, None if start_line is None else max(start_line - 1, 0),
                                       None if end_line is None else max(end_line, 0))
        except SandboxError as exc:
            return self._gone(exc)

    def download_file(self, path: str) -> bytes:
        """A file's bytes, from under /mnt/user-data only, at most 100 MB.

        Raises:
            PermissionError: a '..' segment, or a path outside /mnt/user-data.
            OSError: it could not be read (EFBIG: over 100 MB).
        """
        normalised = path.replace("\\", "/")
        if ".." in normalised.split("/"):
            raise PermissionError(f"Access denied: path traversal detected in '{path}'")
        stripped, prefix = normalised.lstrip("/"), VIRTUAL_PATH_PREFIX.lstrip("/")
        if stripped != prefix and not stripped.startswith(prefix + "/"):
            raise PermissionError(f"Access denied: path must be under '{VIRTUAL_PATH_PREFIX}': '{path}'")
        sink = _Capped(MAX_DOWNLOAD, path)
        try:
            self._box.download(path, sink)
        except SandboxError as exc:
            self._gone(exc)
            raise OSError(f"Failed to download file '{path}' from sandbox: {exc}") from exc
        return sink.getvalue()

    def list_dir(self, path: str, max_depth: int = 2) -> list[str]:
        """Files and directories under ``path``, ``max_depth`` levels deep (at most 500)."""
        command = (f"find {shlex.quote(path)} -maxdepth {int(max_depth)} -type f -o -type d 2>/dev/null"
                   " | head -500")
        try:
            result = self._box.bash(command)
        except SandboxError as exc:
            self._gone(exc)
            return []
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]

    def write_file(self, path: str, content: str, append: bool = False) -> None:
        self._box.write_file(path, content, append=append)

    def update_file(self, path: str, content: bytes) -> None:
        self._box.write_file(path, bytes(content))

    def glob(self, path: str, pattern: str, *, include_dirs: bool = False, max_results: int = 200
             ) -> tuple[list[str], bool]:
        """Paths under ``path`` whose relative path matches ``pattern``, as deer-flow's
        ``find_glob_matches`` finds them (see :mod:`sandbox_search`); True when cut at ``max_results``.

        Raises:
            FileNotFoundError, NotADirectoryError: ``path`` is missing, or no directory.
            ValueError: an empty pattern.
        """
        sandbox_search.path_matches(pattern, "x")  # an empty pattern fails here, before the sandbox is asked
        found = self._search({"op": "glob", "path": path, "pattern": pattern, "include_dirs": include_dirs,
                              "max_results": max_results})
        return list(found["matches"]), bool(found["truncated"])

    def grep(self, path: str, pattern: str, *, glob: str | None = None, literal: bool = False,
             case_sensitive: bool = False, max_results: int = 100) -> tuple[list[GrepMatch], bool]:
        """Lines matching ``pattern`` (a Python regex, or text with ``literal``) in text files under
        ``path`` (or in that file), as deer-flow's ``find_grep_matches`` finds them.

        Raises:
            re.error: an invalid pattern (checked here, before the sandbox is asked).
            FileNotFoundError, NotADirectoryError: ``path`` is missing, or neither file nor directory.
        """
        re.compile(re.escape(pattern) if literal else pattern, 0 if case_sensitive else re.IGNORECASE)
        found = self._search({"op": "grep", "path": path, "pattern": pattern, "glob": glob, "literal": literal,
                              "case_sensitive": case_sensitive, "max_results": max_results})
        matches = [GrepMatch(path=p, line_number=n, line=line) for p, n, line in found["matches"]]
        return matches, bool(found["truncated"])

    def _search(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run :mod:`sandbox_search` in the sandbox; its arguments go in the environment, never
        into the command line."""
        request["ignore"] = list(IGNORE_PATTERNS)
        try:
            result = self._box.bash('python3 -c "$SA_SEARCH_SCRIPT"', timeout=SEARCH_TIMEOUT,
                                    env={"SA_SEARCH": json.dumps(request), "SA_SEARCH_SCRIPT": _SEARCH_SCRIPT})
        except SandboxError as exc:
            self._gone(exc)
            raise OSError(f"{request['op']} in sandbox {self._id} failed: {exc}") from exc
        if result.exit_code != 0:
            raise OSError(f"{request['op']} in sandbox {self._id} failed: {result.stderr.strip()[-500:]}")
        found = json.loads(result.stdout)
        if "error" in found:
            raise {"FileNotFoundError": FileNotFoundError}.get(found["error"], NotADirectoryError)(found["path"])
        return found


class _Capped(io.BytesIO):
    """A download's bytes, refused past ``limit`` (deer-flow's AIO sandbox caps downloads too)."""

    def __init__(self, limit: int, path: str) -> None:
        super().__init__()
        self._limit, self._path = limit, path

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self._limit:
            raise OSError(errno.EFBIG, f"File exceeds maximum download size of {self._limit} bytes", self._path)
        return super().write(data)


class RaySandboxProvider(_ProviderBase):  # type: ignore[misc,valid-type]
    """deer-flow's sandbox provider on a sandbox-actors pool (see the module's docstring).

    Args:
        config: our pool config (a SandboxConfig, a mapping, or a YAML path). Default: the keys
            under ``sandbox_actors:`` in deer-flow's ``sandbox:`` section.
        address: the Ray cluster (default: ``ray_address`` there, else RAY_ADDRESS, else the
            cluster on this machine, else a head started here that outlives this process).

    Raises:
        ConfigError: a key of ours outside ``sandbox_actors:`` (said where to write it), or a bad key.
    """

    uses_thread_data_mounts = True  # a sandbox mounts its conversation's directories (on this node)
    needs_upload_permission_adjustment = True  # commands run as an unprivileged user, as in the AIO image

    def __init__(self, config: Any = None, address: str | None = None) -> None:
        from .. import client
        from ..localray import attach

        settings = _deerflow_settings() if config is None else {}
        attach(address or settings.pop("ray_address", None), fallback="head")
        if config is None:
            config = settings.pop("config", None) or {"pool_name": DEFAULT_POOL, **settings}
        self._pool = client.connect(config)
        self._sandboxes: dict[str, RaySandbox] = {}
        self._lock = threading.Lock()

    @property
    def pool(self) -> Any:
        """The sandbox-actors PoolClient underneath."""
        return self._pool

    @staticmethod
    def thread_key(thread_id: str | None, user_id: str | None) -> str | None:
        """The pool thread id of a deer-flow (user, thread): one sandbox per pair."""
        if thread_id is None:
            return None
        return thread_id if user_id is None else f"user:{user_id}/thread:{thread_id}"

    def acquire(self, thread_id: str | None = None, *, user_id: str | None = None) -> str:
        """The sandbox of (user, thread), started on this node with that conversation's directories
        when it is new; the same sandbox from every deer-flow process."""
        user_id = user_id or _effective_user_id()
        handle = self._pool.acquire(self.thread_key(thread_id, user_id), mounts=_conversation_mounts(thread_id, user_id))
        with self._lock:
            self._sandboxes[handle.sandbox_id] = RaySandbox(handle.sandbox_id, handle, self._forget)
        return handle.sandbox_id

    async def acquire_async(self, thread_id: str | None = None, *, user_id: str | None = None) -> str:
        """:meth:`acquire` in a worker thread: the event loop never waits on it."""
        user_id = user_id or _effective_user_id()  # read here: the context is this task's
        return await asyncio.to_thread(self.acquire, thread_id, user_id=user_id)

    def get(self, sandbox_id: str) -> RaySandbox | None:
        """The sandbox this process acquired and still holds, else None: a lookup in memory, as
        deer-flow calls it on its event loop (for one another process acquired, deer-flow then
        acquires it here, which finds the same sandbox)."""
        with self._lock:
            return self._sandboxes.get(sandbox_id)

    def release(self, sandbox_id: str) -> None:
        """Park the sandbox warm (the pool's idle timeout decides its fate)."""
        self._forget(sandbox_id)
        self._pool.release(sandbox_id)

    def _forget(self, sandbox_id: str) -> None:
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)

    def reset(self) -> None:
        """Forget this process's handles (the pool and its sandboxes live on)."""
        with self._lock:
            self._sandboxes.clear()

    def shutdown(self) -> None:
        """This process is done with the provider; the pool, shared with other processes, stays
        (``sandbox-actors down`` ends it)."""
        self.reset()


def _effective_user_id() -> str | None:
    """deer-flow's user of the current request (its default user outside one); None without deer-flow."""
    if not DEERFLOW:
        return None
    from deerflow.runtime.user_context import get_effective_user_id

    return get_effective_user_id()


def _conversation_mounts(thread_id: str | None, user_id: str | None) -> list[Mount] | None:
    """deer-flow's directories of a conversation, where its AIO sandbox has them: user data and
    the ACP workspace of the thread, and the user's skills (read-only). None without deer-flow."""
    if not DEERFLOW:
        return None
    from deerflow.config.paths import VIRTUAL_PATH_PREFIX as USER_DATA, get_paths

    paths = get_paths()
    mounts: list[Mount] = []
    if thread_id is not None and user_id is not None:
        paths.ensure_thread_dirs(thread_id, user_id=user_id)
        mounts += [
            Mount(paths.host_sandbox_work_dir(thread_id, user_id=user_id), f"{USER_DATA}/workspace"),
            Mount(paths.host_sandbox_uploads_dir(thread_id, user_id=user_id), f"{USER_DATA}/uploads"),
            Mount(paths.host_sandbox_outputs_dir(thread_id, user_id=user_id), f"{USER_DATA}/outputs"),
            Mount(paths.host_acp_workspace_dir(thread_id, user_id=user_id), ACP_WORKSPACE, read_only=True),
        ]
    return mounts + _skills_mounts(paths, user_id)


def _skills_mounts(paths: Any, user_id: str | None) -> list[Mount]:
    """The user's skills as deer-flow projects them (public, custom, legacy, integrations), read-only
    under ``skills.container_path``; those it could not project are left out, as its AIO provider does."""
    from deerflow.config import get_app_config
    from deerflow.skills.projection import ensure_skill_projections
    from deerflow.skills.storage import get_or_new_user_skill_storage

    app = get_app_config()
    try:
        projected = ensure_skill_projections(get_or_new_user_skill_storage(user_id or "default", app_config=app))
    except Exception as exc:  # deer-flow's own code: whatever it raises, the sandbox starts without skills
        logger.warning("could not project skills for user %s: %s", user_id, exc)
        return []
    root = app.skills.container_path.rstrip("/")
    mounts = []
    for category in ("public", "custom", "legacy", "integrations"):
        local = Path(getattr(projected, category))
        if local.is_dir():
            mounts.append(Mount(_host_path(paths, local), f"{root}/{category}", read_only=True))
    return mounts


def _host_path(paths: Any, local: Path) -> str:
    """``local`` (under deer-flow's base dir) as the Docker engine's host sees it."""
    try:
        return str(Path(paths.host_base_dir) / local.relative_to(paths.base_dir))
    except ValueError:
        return str(local)


def _deerflow_settings() -> dict[str, Any]:
    """Our keys, from ``sandbox.sandbox_actors`` in deer-flow's config (empty without deer-flow).

    Raises:
        ConfigError: a key of ours beside deer-flow's own, e.g. ``sandbox.image`` (deer-flow's AIO
            provider has keys of the same names, meant for its image and containers: never taken
            as ours), or ``sandbox_actors`` that is not a mapping.
    """
    if not DEERFLOW:
        return {}
    from deerflow.config import get_app_config

    from ..config import SandboxConfig

    section = get_app_config().sandbox
    extra = dict(getattr(section, "model_extra", None) or {})
    given = set(getattr(section, "model_fields_set", set())) | set(extra)
    ours = extra.get(SECTION) or {}
    if not isinstance(ours, Mapping):
        raise ConfigError(f"sandbox.{SECTION} must be a mapping of sandbox-actors keys")
    misplaced = sorted(k for k in given - _DEERFLOW_KEYS
                       if k in SandboxConfig.model_fields or k in {"ray_address", "sandbox_actors_config"})
    if misplaced:
        example = "\n".join(f"      {k}: ..." for k in misplaced)
        raise ConfigError(
            f"sandbox.{', sandbox.'.join(misplaced)}: sandbox-actors reads its keys under sandbox.{SECTION} only "
            f"(deer-flow's AIO provider has keys of these names for its own containers: they are never taken "
            f"as ours). Write:\n  sandbox:\n    {SECTION}:\n{example}\nor remove them"
        )
    ignored = sorted(given - _DEERFLOW_KEYS)
    if ignored:
        logger.warning("sandbox.%s: no effect with sandbox-actors (keys of deer-flow's other providers)",
                       ", sandbox.".join(ignored))
    settings = dict(ours)
    if settings.get("config") and set(settings) - _PROVIDER_KEYS:
        raise ConfigError(f"sandbox.{SECTION}: give either `config` (a file of pool keys) or the pool keys, not both")
    return settings
