"""From verified bytes to a durable row: parsing a delivery and group-committing batches.

Concurrent deliveries wait on one writer task that appends them in one transaction and resolves
each caller's future only after COMMIT returns, so a 2xx always means "durable in Postgres".
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from service.core.errors import DatabaseUnavailable, InvalidPayload
from service.core.pace import RateMeter
from service.core.statuses import is_terminal
from service.core.supervisor import Supervisor
from service.core.validation import MAX_DEPTH, nesting_depth
from service.db import store
from service.db.database import HeldConnection
from service.db.store import Appended, Delivery

log = logging.getLogger("relay.ingest")

MAX_BATCH = 1000
ACQUIRE_TIMEOUT = 5.0
# Errors caused by one row's content rather than by the database being unavailable: bad data
# (22), a constraint (23), or a limit such as an index row too large (54). One such row is
# isolated and answered 400; the rest of its batch still commits.
ROW_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)
# Longest accepted values (Replicate's ids are 26 characters, its statuses one word, model and
# version names well under 200). Each lands in an index, whose rows Postgres caps at ~2.7 kB:
# a longer value would fail the statement, so it is refused here, at parse time.
MAX_LENGTHS = {"id": 256, "status": 64, "model": 512, "version": 512}
WRITER_TASK = "relay-group-commit"


class WriterStopped(DatabaseUnavailable):
    """The writer task has ended (a crash, or shutdown): nothing more can be committed here."""

    def __init__(self) -> None:
        super().__init__("this instance cannot commit deliveries any more (see /readyz); retry later")


def _string_field(prediction: dict[str, Any], name: str) -> str:
    value = prediction.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidPayload(f"the body's {name!r} must be a non-empty string")
    return _checked_text(name, value)


def _checked_text(name: str, value: str) -> str:
    if "\x00" in value:
        raise InvalidPayload(f"the body's {name!r} must not contain NUL characters")
    if len(value) > MAX_LENGTHS[name]:
        raise InvalidPayload(f"the body's {name!r} is longer than {MAX_LENGTHS[name]} characters")
    return value


def _text_or_none(prediction: dict[str, Any], name: str) -> str | None:
    """An optional text field: absent, empty or not a string reads as None; too long is a 400."""
    value = prediction.get(name)
    if not isinstance(value, str) or not value or "\x00" in value:
        return None
    return _checked_text(name, value)


def prediction_model(prediction: dict[str, Any]) -> str | None:
    return _text_or_none(prediction, "model") or _text_or_none(prediction, "version")


def predict_time(prediction: dict[str, Any]) -> float | None:
    metrics = prediction.get("metrics")
    value = metrics.get("predict_time") if isinstance(metrics, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_prediction(body: bytes) -> dict[str, Any]:
    """The delivered prediction object; 400 unless it is a JSON object with string id/status.

    Encodings other than UTF-8, NaN, Infinity and floats that overflow are refused: readers
    could not serve them as JSON. So is nesting deeper than MAX_DEPTH: json's recursion limit
    depends on the caller's stack, and a body that parsed at ingest must never fail to
    serialise later, when it is read.
    """
    try:
        # UTF-8 only, no BOM (RFC 8259): readers splice the stored bytes into UTF-8 messages.
        # json.loads(bytes) would also take UTF-16 and UTF-32; a str refuses a BOM.
        text = body.decode("utf-8")
        prediction = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise InvalidPayload("the body is not valid UTF-8 JSON (or holds a number out of range)") from None
    if not isinstance(prediction, dict):
        raise InvalidPayload("the body must be a JSON object (a Replicate prediction)")
    # Depth never exceeds the number of brackets, and counting them (C) is ~10x cheaper than
    # walking the parsed value (Python), which only bodies with many brackets still need.
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > MAX_DEPTH and nesting_depth(prediction) > MAX_DEPTH:
        raise InvalidPayload(f"the body nests arrays/objects deeper than {MAX_DEPTH} levels")
    return prediction


def delivery_from(
    prediction: dict[str, Any],
    body: bytes,
    *,
    webhook_id: str,
    source: str,
    webhook_timestamp: datetime | None = None,
    received_at: datetime | None = None,
) -> Delivery:
    status = _string_field(prediction, "status")
    return Delivery(
        webhook_id=webhook_id,
        prediction_id=_string_field(prediction, "id"),
        status=status,
        source=source,
        body=body,
        received_at=received_at or datetime.now(UTC),
        webhook_timestamp=webhook_timestamp,
        model=prediction_model(prediction),
        predict_time=predict_time(prediction) if is_terminal(status) else None,
    )


def webhook_delivery(body: bytes, webhook_id: str, timestamp: int) -> Delivery:
    return delivery_from(
        parse_prediction(body),
        body,
        webhook_id=webhook_id,
        source="webhook",
        webhook_timestamp=datetime.fromtimestamp(timestamp, UTC),
    )


class GroupCommitter:
    """Coalesces concurrent appends into one transaction per batch.

    Without a `prepare` hook the batch is one statement (`store.append`) sent outside any
    explicit transaction, so it has committed when its result arrives. The writer keeps its
    connection between batches: handing it back to the pool would cost a reset round trip.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        max_batch: int = MAX_BATCH,
        *,
        prepare: store.Prepare | None = None,
        on_commit: Callable[[list[tuple[int, Delivery]]], None] | None = None,
    ):
        self._prepare = prepare
        self._on_commit = on_commit  # given each batch's new rows (seq, delivery) once committed
        self._writer = HeldConnection(pool, ACQUIRE_TIMEOUT)
        self._max_batch = max_batch
        self._pending: deque[tuple[Delivery, asyncio.Future[Appended]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.committed = RateMeter()  # deliveries a second: background work yields while it is high

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Start the writer task, under `supervisor` when given (the server's), so that its death
        is logged and reported by `/readyz`; a one-shot command runs it bare."""
        if supervisor is None:
            self._task = asyncio.create_task(self._run(), name=WRITER_TASK)
        else:
            self._task = supervisor.spawn(WRITER_TASK, self._run(), stop=self.stop)
        self._task.add_done_callback(self._writer_ended)

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        if self._task is None:
            return
        while self._pending and not self._task.done():
            await asyncio.sleep(0.01)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._writer.release()

    async def submit(self, delivery: Delivery) -> Appended:
        if self._task is not None and self._task.done():
            raise WriterStopped()  # 503 at once: nobody would ever commit it
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._pending.append((delivery, future))
        self._wakeup.set()
        return await future

    def _writer_ended(self, task: asyncio.Task[Any]) -> None:
        """Whatever ended the writer, no caller may wait for it forever."""
        self._fail(list(self._pending), WriterStopped())
        self._pending.clear()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                count = min(len(self._pending), self._max_batch)
                batch = [self._pending.popleft() for _ in range(count)]
                try:
                    await self._commit(batch)
                except BaseException:
                    # A bug (or a cancel) here ends the writer: this batch's callers must learn
                    # it too; those already answered keep their answer (a future is set once).
                    self._fail(batch, WriterStopped())
                    raise

    async def _commit(self, batch: list[tuple[Delivery, asyncio.Future[Appended]]]) -> None:
        try:
            results = await self._append([d for d, _ in batch])
        except ROW_ERRORS as exc:
            if len(batch) > 1:
                # Isolate the row the database refuses by halving: the other half commits in
                # one statement, and a single poison row costs about log2(batch) extra commits.
                middle = len(batch) // 2
                await self._commit(batch[:middle])
                await self._commit(batch[middle:])
                return
            # The class only: the database's message may quote the content.
            log.warning("a delivery was refused by the database (%s)", type(exc).__name__)
            self._fail(batch, InvalidPayload("the database refused this delivery's content"))
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not durable": 503
            log.warning("append failed, answering 503: %s", type(exc).__name__)
            self._fail(batch, DatabaseUnavailable())
            return
        self.batches += 1
        self.committed.add(len(batch))
        # The rows are durable: their callers are answered before the hook runs, so a failing
        # hook (a bug) cannot turn a committed delivery into a 503 or leave its caller waiting.
        # The hook's exception then ends the writer, under the supervisor (logged, /readyz 503).
        for (delivery, future), result in zip(batch, results, strict=True):
            log.debug(
                "stored seq %d prediction %s status %s%s",
                result.seq,
                delivery.prediction_id,
                delivery.status,
                " (duplicate)" if result.duplicate else "",
            )
            if not future.done():
                future.set_result(result)
        if self._on_commit is not None:
            self._on_commit([(r.seq, d) for (d, _), r in zip(batch, results, strict=True) if not r.duplicate])

    async def _append(self, deliveries: list[Delivery]) -> list[Appended]:
        # A row error fails the statement as a whole; the connection itself is fine.
        async with self._writer.use(keep_on=ROW_ERRORS) as conn:
            return await store.append(conn, deliveries, self._prepare)

    @staticmethod
    def _fail(batch: list[tuple[Delivery, asyncio.Future[Appended]]], error: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
