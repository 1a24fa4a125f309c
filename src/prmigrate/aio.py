"""Small asyncio helpers shared by the asyncio shells."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol


class _HasLog(Protocol):
    @property
    def log(self) -> logging.Logger | logging.LoggerAdapter[Any]: ...


class BackgroundTasks:
    """Tasks a shell starts and must be able to cancel as a whole.

    Keeps a strong reference to each task until it ends (the loop keeps only
    weak ones) and logs a task that failed through ``owner.log`` (read when it
    fails, so an owner may replace its logger), so no exception is lost.
    """

    __slots__ = ("_owner", "_what", "_tasks")

    def __init__(self, owner: _HasLog, what: str) -> None:
        self._owner = owner
        self._what = what
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._owner.log.error("%s failed: %r", self._what, exc, exc_info=exc)
