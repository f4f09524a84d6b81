"""The Docker engine connection and the translation of its errors into ours.

Every module of ``backends`` that calls the engine goes through
:func:`engine_errors`, so nothing above sees ``docker.errors`` or ``requests``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import docker
import docker.errors
import requests.exceptions

from .errors import BackendError, BackendUnavailable, SandboxError

_UNREACHABLE = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ConnectionError,
    socket.timeout,
)


# What dockerd answers (a 500) while its containerd is away, e.g. restarting with the engine: the
# gRPC status of the call it could not make. Retryable, as no answer at all is; not a refusal.
_CONTAINERD_AWAY = ("transport is closing", "code = Unavailable", "containerd.sock: connect")


def _containerd_unavailable(exc: docker.errors.APIError) -> bool:
    """Whether the engine failed only because its containerd did not answer."""
    explanation = str(exc.explanation or "")
    return (exc.status_code or 0) >= 500 and (
        any(marker in explanation for marker in _CONTAINERD_AWAY) or explanation.endswith(": unavailable"))


@contextlib.contextmanager
def engine_errors(action: str) -> Iterator[None]:
    """Translate engine failures met while doing ``action`` into typed errors."""
    try:
        yield
    except SandboxError:
        raise
    except _UNREACHABLE as exc:
        raise BackendUnavailable(
            f"Docker engine did not answer while trying to {action}: {exc}. "
            "Is dockerd running? (`docker info` should answer.)"
        ) from exc
    except docker.errors.APIError as exc:
        if _containerd_unavailable(exc):
            raise BackendUnavailable(
                f"Docker engine could not {action} just now: its containerd did not answer ({exc.explanation}). "
                "The engine is likely restarting; retry."
            ) from exc
        raise BackendError(f"Docker engine refused to {action}: {exc.explanation or exc}") from exc
    except docker.errors.DockerException as exc:
        raise BackendUnavailable(
            f"Docker engine unavailable while trying to {action}: {exc}. "
            "Start it (e.g. `dockerd &`) or set DOCKER_HOST."
        ) from exc


def connect(base_url: str | None, timeout: float) -> docker.DockerClient:
    """A client for the engine at ``base_url`` (None: from the environment)."""
    with engine_errors("connect"):
        if base_url:
            client = docker.DockerClient(base_url=base_url, timeout=int(timeout))
        else:
            client = docker.from_env(timeout=int(timeout))
    if client.api.base_url.startswith("http+docker://"):  # a unix socket: no proxy, no .netrc applies
        # Else requests looks both up in the environment and the home directory on every call
        # (a fifth of the client's CPU per engine call here).
        client.api.trust_env = False
    return client
