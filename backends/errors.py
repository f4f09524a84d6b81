"""The typed error tree shared by every layer.

One root, :class:`SandboxError`; each subclass names one thing a caller can act
on. Errors from outside libraries (``docker.errors``, ``httpx``) are translated
where they are caught, in ``backends``, and chained with ``from``.

Every error pickles cleanly (Ray ships them between processes): constructors
take the message as the only positional argument, extra facts are keywords
stored as attributes.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Root of every error this project raises on purpose.

    Attributes:
        retryable: True when the same call may succeed if tried again later
            (capacity, an engine coming back), False when the input or the
            sandbox itself is the problem.
    """

    retryable: bool = False

    def __init__(self, message: str, **facts: object) -> None:
        super().__init__(message)
        for key, value in facts.items():
            setattr(self, key, value)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


# ── where containers run ────────────────────────────────────────────────────


class BackendUnavailable(SandboxError):
    """The container engine (or provisioner) did not answer.

    This never means "the sandbox is dead": nothing is destroyed because of it.
    """

    retryable = True


class BackendError(SandboxError):
    """The engine answered but refused a request (its explanation is in the message)."""


class BackendUnauthorized(BackendError):
    """The provisioner refused our credentials (``provisioner_api_key``)."""


class IsolationUnavailable(SandboxError):
    """The host cannot enforce the isolation the config asks for (network policy rules, a
    runtime the engine does not know); the message names the cause and the fix. A pool
    refuses to start rather than run sandboxes with less isolation than configured."""


class NotSupported(SandboxError):
    """The backend (or its engine) cannot do what was asked (e.g. a disk limit on a storage
    driver without quotas); the message names the backend and the reason.

    Attributes:
        feature: what was asked for.
    """

    feature: str


class ImageNotFound(SandboxError):
    """The configured image is not present on the engine (we never pull)."""

    image: str


class SandboxStartError(SandboxError):
    """A container could not be created or started; nothing was left behind."""


class ReadinessTimeout(SandboxStartError):
    """The container ran but its API never answered within the deadline.

    Attributes:
        last_observation: what the last probe saw.
        log_tail: the container's last log lines.
    """

    last_observation: str
    log_tail: str


class SandboxExited(SandboxStartError):
    """The container exited while we waited for it to become ready."""


class RestoreFailed(SandboxStartError):
    """A stopped sandbox could not be brought back from its live checkpoint (its processes and
    memory); its container and filesystem are as they were."""


class SandboxOwned(SandboxStartError):
    """Another live actor already owns this sandbox's container.

    Attributes:
        owner: the name of the actor that owns it.
    """

    owner: str


# ── a running sandbox ───────────────────────────────────────────────────────


class SandboxNotFound(SandboxError):
    """No sandbox with that id exists (or it was already destroyed)."""


class SandboxDied(SandboxError):
    """The sandbox's container (or its actor) is gone; acquire the thread again."""


class SandboxUnreachable(SandboxError):
    """The container runs but its API did not answer."""

    retryable = True


class SandboxAuthError(SandboxError):
    """The sandbox API refused our token."""


class CommandTimeout(SandboxError):
    """A command ran longer than its timeout and was killed.

    Attributes:
        output: what the command printed before it was killed.
        stderr: what it printed on stderr (commands run with ``bash``).
    """

    output: str = ""
    stderr: str = ""


class ResourceLimitExceeded(SandboxError):
    """A command failed because the sandbox hit its memory (OOM kill) or process limit.

    The sandbox itself keeps running and stays usable once the load is gone.

    Attributes:
        limits: which limits bit: 'memory', 'pids'.
        exit_code: the command's exit code (None when it never started).
        output: what it printed (stdout, or the shell's merged output).
    """

    limits: tuple[str, ...] = ()
    exit_code: int | None = None
    output: str = ""


class SandboxOperationError(SandboxError):
    """The sandbox API answered with a failure.

    Attributes:
        status_code: the HTTP status the sandbox answered with.
    """

    status_code: int | None = None


class SandboxFileNotFound(SandboxOperationError, FileNotFoundError):
    """A file or directory named in a file operation does not exist."""


class InvalidRequest(SandboxError, ValueError):
    """The request itself is malformed (bad path, env name, argument)."""
