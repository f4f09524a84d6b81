"""Attaching to a Ray cluster: what a user is told when the cluster found cannot be attached to.

Unit tests: ``ray.init`` is replaced by one that refuses as Ray refuses a cluster of another
Python (the text below is Ray 2.60's, seen when the CLI met deer-flow's Python 3.12 cluster).
"""

from __future__ import annotations

import pytest
import ray

from sandbox_actors import localray
from sandbox_actors.errors import ConfigError

RAY_REFUSAL = """Version mismatch: The cluster was started with:
    Ray: 2.60.0
    Python: 3.12.1
This process on node 192.0.2.2 was started with:
    Ray: 2.60.0
    Python: 3.11.7
"""


@pytest.fixture
def ray_refuses(monkeypatch):
    """Make ``ray.init`` refuse with the text given, with no Ray attached and no address known."""
    def refusing(text: str) -> None:
        def refuse(**kwargs):
            raise RuntimeError(text)

        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", refuse)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(localray, "our_head", lambda: None)  # whatever `up` left on this machine

    return refusing


def test_a_cluster_of_another_python_is_named_with_both_versions_and_what_to_do(ray_refuses):
    ray_refuses(RAY_REFUSAL)
    with pytest.raises(localray.ClusterMismatch) as caught:
        localray.attach(None)
    message = caught.value.message
    assert "Python: 3.12.1" in message and "Python: 3.11.7" in message
    assert "--address" in message and "cluster's Python" in message
    assert isinstance(caught.value, ConfigError)  # the CLI's exit code 2, its message and no traceback


def test_any_other_refusal_of_ray_init_is_left_as_ray_raised_it(ray_refuses):
    ray_refuses("something else")
    with pytest.raises(RuntimeError, match="something else"):
        localray.attach(None)


def test_a_refusal_whose_versions_cannot_be_read_still_says_what_it_is(ray_refuses):
    ray_refuses("Version mismatch: (a Ray that words it otherwise)")
    with pytest.raises(localray.ClusterMismatch, match="runs another Python or Ray than this process"):
        localray.attach(None)
