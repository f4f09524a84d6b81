"""``sandbox-actors bench``: how fast a thread gets a working sandbox, against what the machine
does without us.

Each stage runs in a private local Ray cluster of its own, between clean floors measured while
nothing of ours runs (:mod:`.run`); the floors are bare container starts, bursts and rollout
episodes driven straight through the engine (:mod:`.floors`, :mod:`sandbox_actors.rollouts`);
:mod:`.report` turns the figures into ratios, targets and the printed table.
"""

from .report import judge, table
from .run import Bench

__all__ = ["Bench", "judge", "table"]
