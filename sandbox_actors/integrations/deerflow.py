"""A drop-in sandbox provider for deer-flow, backed by a sandbox-actors pool on Ray.

In deer-flow's ``config.yaml``::

    sandbox:
      use: sandbox_actors.integrations.deerflow:RaySandboxProvider
      # our keys, next to deer-flow's own (any SandboxConfig key):
      pool_name: deerflow
      idle_timeout: 600
      # or all of them from a file:  sandbox_actors_config: /etc/sandbox-actors/pool.yaml
      # and where the Ray cluster is (default: RAY_ADDRESS, else this machine's):
      ray_address: auto

deer-flow builds the provider with no arguments; it reads those keys from deer-flow's app config
(``get_app_config().sandbox``), attaches to the cluster through Ray and gets (or creates) the
named pool there, so every deer-flow worker process shares the same sandboxes. Sandboxes are
keyed by (user, thread): the same thread id under two users gets two sandboxes.

When deer-flow is importable the classes subclass its ``SandboxProvider`` and ``Sandbox``;
without it they stand alone with the same methods (for tests and other hosts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import SandboxError

logger = logging.getLogger(__name__)

try:  # deer-flow's own classes, when it is installed
    from deerflow.sandbox.sandbox import Sandbox as _SandboxBase
    from deerflow.sandbox.sandbox_provider import SandboxProvider as _ProviderBase
    from deerflow.sandbox.search import GrepMatch
except ImportError:  # stand alone, same interface
    _SandboxBase = object  # type: ignore[assignment,misc]
    _ProviderBase = object  # type: ignore[assignment,misc]

    @dataclass(frozen=True)
    class GrepMatch:  # type: ignore[no-redef]
        path: str
        line_number: int
        line: str


DEERFLOW = _ProviderBase is not object
VIRTUAL_PATH_PREFIX = "/mnt/user-data"  # deer-flow's: downloads stay under it
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OWN_KEYS = {"use", "sandbox_actors_config", "ray_address"}
# Directories glob and grep never descend into (what deer-flow's own sandboxes skip too).
IGNORED_DIRS = frozenset({
    ".git", ".svn", ".hg", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".nox", ".eggs",
    "site-packages", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".cache", ".next", ".turbo",
})
_MAX_LINE = 500
_NO_OUTPUT = "(no output)"


def _validate_env(env: Mapping[str, str] | None) -> None:
    for key in env or {}:
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise ValueError(f"env key {key!r} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A path glob as a regex over '/'-separated relative paths: ``**`` spans directories,
    ``*`` and ``?`` stay within one."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _ignored(relative: str) -> bool:
    return any(part in IGNORED_DIRS for part in relative.split("/")[:-1])


# Runs inside the sandbox (python3 is in our image and in the AIO image); its arguments come in
# the environment, never spliced into the command.
_GREP = r"""
import json, os, re
a = json.loads(os.environ["SA_GREP"])
rx = re.compile(re.escape(a["pattern"]) if a["literal"] else a["pattern"], 0 if a["case"] else re.I)
ignored = set(a["ignored"])
root, cap, found, truncated = a["path"], a["cap"], [], False
def files():
    if os.path.isfile(root):
        yield root
        return
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ignored)
        for name in sorted(names):
            yield os.path.join(here, name)
for path in files():
    try:
        if os.path.getsize(path) > 1000000:
            continue
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        continue
    if b"\0" in data[:8192]:
        continue
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if rx.search(line):
            found.append([path, number, line[:a["maxline"]]])
            if len(found) >= cap:
                truncated = True
                break
    if truncated:
        break
print(json.dumps({"matches": found, "truncated": truncated}))
"""


class RaySandbox(_SandboxBase):  # type: ignore[misc,valid-type]
    """One deer-flow sandbox: a sandbox-actors sandbox, by its handle."""

    def __init__(self, id: str, handle: Any) -> None:
        if DEERFLOW:
            super().__init__(id)
        self._id = id
        self._box = handle
        self._lock = threading.Lock()  # one command at a time in the persistent shell

    @property
    def id(self) -> str:
        return self._id

    def execute_command(self, command: str, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
        """The command's output (stdout and stderr together), or ``Error: ...`` when it could not
        run. With ``env`` it runs in a fresh session with those variables (request-scoped secrets:
        never logged, never in the command line); without, in the persistent shell."""
        _validate_env(env)
        try:
            if env:
                result = self._box.bash(command, env=env, timeout=timeout)
                output = result.stdout + result.stderr
            else:
                with self._lock:
                    output = self._box.exec(command, timeout=timeout).output
        except SandboxError as exc:
            logger.warning("command in sandbox %s failed: %s", self._id, type(exc).__name__)
            return f"Error: {exc}"
        return output or _NO_OUTPUT

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        """Lines ``start_line`` to ``end_line`` (1-based, inclusive) or the whole file."""
        try:
            return self._box.read_file(path, None if start_line is None else max(start_line - 1, 0),
                                       None if end_line is None else max(end_line, 0))
        except SandboxError as exc:
            return f"Error: {exc}"

    def download_file(self, path: str) -> bytes:
        """A file's bytes, from under /mnt/user-data only.

        Raises:
            PermissionError: a '..' segment, or a path outside /mnt/user-data.
            OSError: it could not be read.
        """
        normalised = path.replace("\\", "/")
        if ".." in normalised.split("/"):
            raise PermissionError(f"Access denied: path traversal in {path!r}")
        stripped, prefix = normalised.lstrip("/"), VIRTUAL_PATH_PREFIX.lstrip("/")
        if stripped != prefix and not stripped.startswith(prefix + "/"):
            raise PermissionError(f"Access denied: path must be under {VIRTUAL_PATH_PREFIX!r}: {path!r}")
        try:
            return self._box.read_bytes(path)
        except SandboxError as exc:
            raise OSError(f"could not download {path!r} from sandbox {self._id}: {exc}") from exc

    def list_dir(self, path: str, max_depth: int = 2) -> list[str]:
        """Files and directories under ``path``, ``max_depth`` levels deep (at most 500)."""
        command = (f"find {shlex.quote(path)} -maxdepth {int(max_depth)} \\( -type f -o -type d \\) 2>/dev/null"
                   " | head -500")
        try:
            result = self._box.bash(command)
        except SandboxError as exc:
            logger.warning("list_dir in sandbox %s failed: %s", self._id, exc)
            return []
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]

    def write_file(self, path: str, content: str, append: bool = False) -> None:
        self._box.write_file(path, content, append=append)

    def update_file(self, path: str, content: bytes) -> None:
        self._box.write_file(path, bytes(content))

    def glob(self, path: str, pattern: str, *, include_dirs: bool = False, max_results: int = 200
             ) -> tuple[list[str], bool]:
        """Paths under ``path`` whose path relative to it matches ``pattern``; True when cut at
        ``max_results``."""
        root = path.rstrip("/") or "/"
        regex, matches = glob_regex(pattern), []
        for entry in self._box.list_files(root, recursive=True):
            if entry.is_directory and not include_dirs:
                continue
            relative = entry.path[len(root):].lstrip("/")
            if not relative or _ignored(relative + ("/x" if entry.is_directory else "")):
                continue
            if regex.match(relative):
                if len(matches) >= max_results:
                    return matches, True
                matches.append(entry.path)
        return matches, False

    def grep(self, path: str, pattern: str, *, glob: str | None = None, literal: bool = False,
             case_sensitive: bool = False, max_results: int = 100) -> tuple[list[GrepMatch], bool]:
        """Lines matching ``pattern`` (a Python regex, or text with ``literal``) in text files under
        ``path`` (or in that file), optionally only files whose relative path matches ``glob``.

        Raises:
            re.error: an invalid pattern (checked here, before the sandbox is asked).
        """
        re.compile(re.escape(pattern) if literal else pattern, 0 if case_sensitive else re.IGNORECASE)
        args = {"path": path, "pattern": pattern, "literal": literal, "case": case_sensitive,
                "cap": max_results * 4 + 50 if glob else max_results + 1, "ignored": sorted(IGNORED_DIRS),
                "maxline": _MAX_LINE}
        result = self._box.bash('python3 -c "$SA_GREP_SCRIPT"', env={"SA_GREP": json.dumps(args),
                                                                    "SA_GREP_SCRIPT": _GREP})
        if result.exit_code != 0:
            raise OSError(f"grep in sandbox {self._id} failed: {result.stderr.strip()[-500:]}")
        found = json.loads(result.stdout)
        root = path.rstrip("/") or "/"
        regex = glob_regex(glob) if glob else None
        matches: list[GrepMatch] = []
        for file_path, number, line in found["matches"]:
            relative = file_path[len(root):].lstrip("/") if file_path != root else file_path.rsplit("/", 1)[-1]
            if regex is not None and not regex.match(relative):
                continue
            if len(matches) >= max_results:
                return matches, True
            matches.append(GrepMatch(path=file_path, line_number=number, line=line))
        return matches, bool(found["truncated"])


class RaySandboxProvider(_ProviderBase):  # type: ignore[misc,valid-type]
    """deer-flow's sandbox provider on a sandbox-actors pool (see the module's docstring).

    Args:
        config: our pool config (a SandboxConfig, a mapping, or a YAML path). Default: the keys of
            deer-flow's ``sandbox:`` section, else built-in defaults.
        address: the Ray cluster (default: ``ray_address`` there, else RAY_ADDRESS, else local).
    """

    uses_thread_data_mounts = True  # the pool mounts each thread's user-data directories itself
    needs_upload_permission_adjustment = False  # the pool gives the thread mounts to the command user

    def __init__(self, config: Any = None, address: str | None = None) -> None:
        from .. import client

        settings = _deerflow_settings() if config is None else {}
        if config is None:
            config = settings.get("sandbox_actors_config") or {k: v for k, v in settings.items() if k not in _OWN_KEYS}
        self._pool = client.connect(config or None, address=address or settings.get("ray_address"))
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
        handle = self._pool.acquire(self.thread_key(thread_id, user_id))
        with self._lock:
            self._sandboxes[handle.sandbox_id] = RaySandbox(handle.sandbox_id, handle)
        return handle.sandbox_id

    async def acquire_async(self, thread_id: str | None = None, *, user_id: str | None = None) -> str:
        return await asyncio.to_thread(self.acquire, thread_id, user_id=user_id)

    def get(self, sandbox_id: str) -> RaySandbox | None:
        """The sandbox, when it is active in the pool (another worker's acquire counts)."""
        with self._lock:
            known = self._sandboxes.get(sandbox_id)
        handle = self._pool.get(sandbox_id)
        if handle is None:
            return None
        if known is not None and known._box.actor == handle.actor:
            return known
        sandbox = RaySandbox(sandbox_id, handle)
        with self._lock:
            self._sandboxes[sandbox_id] = sandbox
        return sandbox

    def release(self, sandbox_id: str) -> None:
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)
        self._pool.release(sandbox_id)

    def reset(self) -> None:
        """Forget this process's handles (the pool and its sandboxes live on)."""
        with self._lock:
            self._sandboxes.clear()

    def shutdown(self) -> None:
        """This process is done with the provider; the pool, shared with other workers, stays."""
        self.reset()


def _deerflow_settings() -> dict[str, Any]:
    """deer-flow's ``sandbox:`` section, as far as it concerns us (empty without deer-flow):
    our own keys, and the SandboxConfig keys it sets (deer-flow's other keys are its own)."""
    if not DEERFLOW:
        return {}
    from deerflow.config import get_app_config

    from ..config import SandboxConfig

    section = get_app_config().sandbox
    data = section.model_dump() if hasattr(section, "model_dump") else dict(section)
    data.update(getattr(section, "model_extra", None) or {})
    ours = {k: v for k, v in data.items() if v is not None and (k in SandboxConfig.model_fields or k in _OWN_KEYS)}
    skipped = sorted(set(data) - set(ours) - {"use"})
    if skipped:
        logger.info("deer-flow sandbox keys not ours, left to deer-flow: %s", skipped)
    return ours
