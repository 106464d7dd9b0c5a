"""One owner for every background loop of a process: the writer, the hub, reconcile, budget, …

A loop is meant to run until the process stops. If one ends early, by an exception or by
returning, the supervisor logs it once with its traceback and records it under its name;
`/readyz` then answers 503 naming it, so a load balancer takes the instance out instead of
sending it requests that would wait forever for a task that is gone. A failed loop is not
restarted: a bug that kills it once would kill it again, and the operator must see it.

Register a loop with `supervisor.spawn("relay-name", coroutine)`. `stop()` first cancels, all
together, the loops that gave no `stop` hook (those that feed the writer stop before it), then
ends the ones with a hook one by one, last registered first (the writer commits what is queued).
Pure asyncio, no I/O, so any layer may use it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("relay.supervisor")


class Supervisor:
    """Runs named background tasks and remembers those that died (see module doc)."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._stoppers: dict[str, Callable[[], Awaitable[None]]] = {}
        self._stopping = False
        # name -> one line saying how it ended ("RuntimeError: …", or "returned")
        self.failures: dict[str, str] = {}

    def spawn(
        self,
        name: str,
        coroutine: Coroutine[Any, Any, Any],
        *,
        stop: Callable[[], Awaitable[None]] | None = None,
    ) -> asyncio.Task[Any]:
        """Run `coroutine` as the task `name`, expected to run until `stop()`; `stop`, if given,
        is awaited to end it gracefully (it must end the task), instead of a bare cancel."""
        if self._stopping:
            coroutine.close()
            raise RuntimeError(f"cannot start {name!r}: the process is stopping")
        if name in self._tasks:
            coroutine.close()
            raise ValueError(f"a background task named {name!r} is already running")
        task = asyncio.create_task(coroutine, name=name)
        self._tasks[name] = task  # also the strong reference that keeps the task alive
        task.add_done_callback(self._ended)
        if stop is not None:
            self._stoppers[name] = stop
        return task

    @property
    def names(self) -> list[str]:
        return sorted(self._tasks)

    def healthy(self) -> bool:
        return not self.failures

    def problem(self) -> str | None:
        """One line naming the failed tasks, for `/readyz`; None while all run."""
        if not self.failures:
            return None
        failed = "; ".join(f"{name} ({how})" for name, how in sorted(self.failures.items()))
        return f"background task failed: {failed}; see the log, then restart Relay"

    def _ended(self, task: asyncio.Task[Any]) -> None:
        name = task.get_name()
        if self._stopping or task.cancelled():
            return
        error = task.exception()
        if error is None:
            self.failures[name] = "returned"
            log.error("background task %s ended unexpectedly", name)
            return
        # The exception's class only in the one-line reason: its message may quote data.
        self.failures[name] = type(error).__name__
        log.error("background task %s crashed", name, exc_info=error)

    async def stop(self) -> None:
        """End every task (an ending caused by this is not a failure): the loops without a stop
        hook are cancelled together first (they only feed others, such as the writer); then
        those with a hook end one by one, last registered first."""
        self._stopping = True
        plain = [task for name, task in self._tasks.items() if name not in self._stoppers]
        for task in plain:
            task.cancel()
        await asyncio.gather(*plain, return_exceptions=True)
        for name, task in reversed(list(self._tasks.items())):
            stopper = self._stoppers.get(name)
            if stopper is None:
                continue
            if not task.done():
                await stopper()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._tasks.clear()
        self._stoppers.clear()
