"""Group commit: the writes of concurrent requests share one transaction.

A commit costs a disk sync, and SQLite lets one writer in at a time, so
writers that each open their own transaction queue up on the lock and
wait on each other's syncs. Here, items that arrive while a transaction
runs wait for the next one, which stores them all, and each caller hears
its result only once that transaction is committed.

The items are the callers' own: visitor ids and event data from intake,
and, from delivery, claims that hold contacts' emails. Nothing here logs
or keeps them past their transaction.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from mapper.store import run_transaction

Item = TypeVar("Item")
Result = TypeVar("Result")
# Enough to share a sync among many requests, few enough that one
# transaction never holds the lock for long.
MOST_PER_COMMIT = 256


@dataclass(frozen=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]


@dataclass(frozen=True)
class _Outcome:
    """An item's result, or the error its transaction raised."""

    value: Any = None
    error: Exception | None = None


class WriteBatcher(Generic[Item, Result]):
    """Stores items in shared transactions, one at a time, oldest first.

    `store` takes an open session and a list of items, and returns one
    result per item, in their order. When a shared transaction fails on an
    item, each of its items is stored again in a transaction of its own, so
    that one item's error is its caller's alone; `store` must therefore act
    on nothing outside the database. When the database itself fails, every
    caller of that transaction hears so at once.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: Callable[[Session, list[Item]], list[Result]],
        *,
        most: int = MOST_PER_COMMIT,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._most = most
        self._waiting: deque[_Waiting[Item, Result]] = deque()
        self._flushing: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """Store `item` in the next shared transaction and return its result."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(item, future))
        # A flush ended by a closed event loop leaves a finished task behind.
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        batch: list[_Waiting[Item, Result]] = []
        try:
            while self._waiting:
                count = min(self._most, len(self._waiting))
                batch = [self._waiting.popleft() for _ in range(count)]
                items = [waiting.item for waiting in batch]
                outcomes = await run_in_threadpool(self._commit, items)
                for waiting, outcome in zip(batch, outcomes, strict=True):
                    _settle(waiting.future, outcome)
        finally:
            self._flushing = None
            # Only a cancelled flush gets here with callers still waiting;
            # they are cancelled too rather than left waiting for ever.
            for waiting in [*batch, *self._waiting]:
                waiting.future.cancel()
            self._waiting.clear()

    def _commit(self, items: list[Item]) -> list[_Outcome]:
        """Store `items` in one transaction, or each alone if an item failed it."""
        try:
            results = run_transaction(self._sessions, lambda s: self._run(s, items))
        except OperationalError as exc:
            # The database failed, not an item: each alone would fail too,
            # after waiting as long again.
            return [_Outcome(error=exc)] * len(items)
        except Exception as exc:
            if len(items) == 1:
                return [_Outcome(error=exc)]
            return [self._commit([item])[0] for item in items]
        return [_Outcome(value=result) for result in results]

    def _run(self, session: Session, items: list[Item]) -> list[Result]:
        results = self._store(session, items)
        # Checked inside the transaction, so that a miscount is rolled back
        # rather than leaving a caller without an answer.
        if len(results) != len(items):
            raise RuntimeError(
                f"Expected {len(items)} results, one per item; got {len(results)}."
            )
        return results


def _settle(future: asyncio.Future[Any], outcome: _Outcome) -> None:
    # A caller that went away (a closed connection) no longer listens.
    if future.done():
        return
    if outcome.error is not None:
        future.set_exception(outcome.error)
    else:
        future.set_result(outcome.value)
