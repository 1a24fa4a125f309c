"""Small asyncio helpers shared by the asyncio shells."""

from __future__ import annotations

import asyncio
import logging
import selectors
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


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


class PollingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's default selector, busy-polling before it sleeps.

    ``select`` with nothing ready polls without blocking for up to
    ``poll_s`` seconds (never past the caller's timeout) before it blocks.
    A PDU that arrives within the poll window is then picked up by a running
    process instead of waking a sleeping one, which on a virtual machine
    costs tens of microseconds (the idle vCPU halts and must be woken by the
    hypervisor). The price is CPU: after every wake-up the loop spins for up
    to ``poll_s`` before it sleeps, so an idle loop costs nothing and a loop
    serving one outstanding command at a time keeps a core busy.
    """

    def __init__(self, poll_s: float) -> None:
        super().__init__()
        if poll_s < 0:
            raise ValueError("poll time must not be negative")
        self.poll_s = poll_s

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.poll_s <= 0 or (timeout is not None and timeout <= 0):
            return super().select(timeout)  # type: ignore[no-any-return]
        start = time.monotonic()
        spin_end = start + (self.poll_s if timeout is None else min(self.poll_s, timeout))
        while True:
            ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
            if ready:
                return ready
            now = time.monotonic()
            if now >= spin_end:
                break
        if timeout is not None:
            timeout -= now - start
            if timeout <= 0:
                return []
        return super().select(timeout)  # type: ignore[no-any-return]


# Answers given as a value known at once or a future of one (the device's:
# a ``Result`` or the ``Future`` of a ``Session.submit``).


def on_outcome(r: Any, fn: Callable[[Any], Any]) -> None:
    """``fn(value, error, or None when cancelled)`` once ``r`` is settled
    (at once when it is no future)."""
    if not asyncio.isfuture(r):
        fn(r)
        return

    def settled(f: asyncio.Future[Any]) -> None:
        fn(None if f.cancelled() else (f.exception() or f.result()))

    r.add_done_callback(settled)


def on_answer(r: Any, fn: Callable[[Any], Any]) -> None:
    """``fn(value)`` once ``r`` has one (at once if it has: before whoever
    awaits it can send the next command); errors and cancellation skip it."""
    if not asyncio.isfuture(r):
        fn(r)
    elif r.done():
        if not r.cancelled() and r.exception() is None:
            fn(r.result())
    else:
        r.add_done_callback(lambda f: None if f.cancelled() or f.exception() is not None else fn(f.result()))


def deliver(r: Any, done: Callable[[Any], Any]) -> Any:
    """``r`` when it is no future; else None and, once it is settled,
    ``done(value or error)`` (a cancelled one as ``CancelledError``): the
    LU contract's ``execute_then`` (``iscsi/lu.py``)."""
    if not asyncio.isfuture(r):
        return r
    on_outcome(r, lambda x: done(asyncio.CancelledError() if x is None else x))
    return None


def settle(dst: asyncio.Future[T], r: T | BaseException | None) -> None:
    """Give ``dst`` the outcome ``r`` (None: cancelled) unless it has one."""
    if dst.done():
        return
    if r is None:
        dst.cancel()
    elif isinstance(r, BaseException):
        dst.set_exception(r)
    else:
        dst.set_result(r)


def chain(src: Any, dst: asyncio.Future[Any]) -> None:
    """``dst`` gets ``src``'s outcome."""
    on_outcome(src, lambda r: settle(dst, r))


def map_answer(src: asyncio.Future[T], dst: asyncio.Future[T], fn: Callable[[T], T]) -> asyncio.Future[T]:
    """``dst`` gets ``fn(value)`` of ``src``, or its error."""
    on_outcome(src, lambda r: settle(dst, r if r is None or isinstance(r, BaseException) else fn(r)))
    return dst


async def run_plan(
    plan: Generator[Any, Any, T], step: Callable[[Any], Awaitable[Any]],
    errors: type[BaseException] | tuple[type[BaseException], ...] = Exception,
) -> T:
    """Drive a sans-IO plan: a generator that yields steps, is sent each
    step's outcome (``await step(s)``) or has its error (one of ``errors``)
    thrown in, and returns the result. Any other error of a step (a
    cancellation) closes the plan and is raised."""
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            s = plan.send(answer) if error is None else plan.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        try:
            answer, error = await step(s), None
        except errors as exc:
            answer, error = None, exc
        except BaseException:
            plan.close()  # its ``finally`` clauses run now (a cancelled plan)
            raise


def loop_options_error(use_uvloop: bool, poll_us: int) -> str | None:
    """Why ``run_loop`` cannot take these options, or None."""
    if poll_us < 0:
        return f"the busy-poll time must not be negative, not {poll_us} us"
    if use_uvloop and poll_us:
        return "busy polling needs the asyncio loop: not with uvloop"
    return None


def run_loop(main: Coroutine[Any, Any, T], *, use_uvloop: bool = False, poll_us: int = 0) -> T:
    """Run ``main`` on a new event loop: uvloop, or asyncio's selector loop
    busy-polling ``poll_us`` microseconds before it sleeps (PollingSelector),
    or plain asyncio. Polling needs asyncio's loop (uvloop's is libuv's):
    ValueError (``loop_options_error``) otherwise."""
    error = loop_options_error(use_uvloop, poll_us)
    if error is not None:
        main.close()
        raise ValueError(error)
    if use_uvloop:
        import uvloop

        result: T = uvloop.run(main)
        return result
    if not poll_us:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(PollingSelector(poll_us / 1e6))) as r:
        return r.run(main)
