"""How the engine's failures become ours: a containerd that is away (the engine restarting) is
retryable, a refusal is not. Pure logic: the errors are built as the docker SDK raises them."""

from __future__ import annotations

import docker.errors
import pytest
import requests

from backends.engine import engine_errors
from backends.errors import BackendError, BackendUnavailable


def api_error(status: int, explanation: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError(f"{status} Server Error", response=response, explanation=explanation)


@pytest.mark.parametrize("explanation", [
    # seen in a chaos run: an image removal while the engine restarted
    "error deleting lease: transport is closing: unavailable",
    "rpc error: code = Unavailable desc = connection error: desc = \"transport: Error while dialing\"",
    "failed to create task: dial unix /run/containerd/containerd.sock: connect: connection refused",
])
def test_a_containerd_that_is_away_is_retryable(explanation):
    with pytest.raises(BackendUnavailable, match="retry"):
        with engine_errors("remove image x"):
            raise api_error(500, explanation)


@pytest.mark.parametrize("status, explanation", [
    (409, "conflict: unable to remove repository reference (must force) - container is using its referenced image"),
    (500, "driver failed programming external connectivity on endpoint: port is already allocated"),
    (404, "No such image: transport is closing"),  # not a server failure
])
def test_a_refusal_stays_a_refusal(status, explanation):
    with pytest.raises(BackendError) as raised:
        with engine_errors("remove image x"):
            raise api_error(status, explanation)
    assert not isinstance(raised.value, BackendUnavailable)
