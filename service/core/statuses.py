"""Prediction statuses and the one forward-only order they move in.

starting < processing < {succeeded, failed, canceled, aborted}. A status Relay does not know
(Replicate may add one) ranks with `processing`: stored and shown, never rejected, and never
able to overwrite a terminal state.
"""

from enum import IntEnum


class Rank(IntEnum):
    STARTING = 1
    RUNNING = 2
    TERMINAL = 3


TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})
_RANKS = {"starting": Rank.STARTING, "processing": Rank.RUNNING}


def rank(status: str) -> Rank:
    if status in TERMINAL_STATUSES:
        return Rank.TERMINAL
    return _RANKS.get(status, Rank.RUNNING)


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def supersedes(new: Rank, current: Rank) -> bool:
    """Whether an event of rank `new` replaces the state of rank `current`.

    A higher rank always wins; an equal non-terminal rank wins (newer progress); the first
    terminal state stays. The same rule is `relay_supersedes` in sql/030_append_batch.sql.
    """
    return new > current or (new == current and current < Rank.TERMINAL)
