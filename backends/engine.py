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
            return docker.DockerClient(base_url=base_url, timeout=int(timeout))
        return docker.from_env(timeout=int(timeout))
