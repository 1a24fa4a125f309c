"""Deferred flushes run at the end of the read event being handled.

A shell batches what one read event produces into one write: the target's
``Connection`` answers futures completed during a turn with one write, the
initiator's ``Session`` sends the commands submitted during a turn with one
write. Deferring that write with ``loop.call_soon`` costs a loop iteration
(a Handle and an ``epoll_wait``) and the latency of one. In the host daemon
the writes a read event causes belong to another connection (a guest's
commands become backend commands; the backend's answers become the guest's
Data-In), so both shells mark their read callbacks as a *read event*
(``begin``/``end``) and ``defer`` runs what was deferred during one when the
event ends, before the loop polls again. Outside a read event (a coroutine
submitting, a timer) ``defer`` falls back to ``call_soon``.

The event loop runs callbacks on one thread; the state is per thread so two
loops in two threads do not mix. A deferred callable that raises is logged
and does not stop the others (nor the read event's transport).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class _State(threading.local):
    depth = 0
    pending: list[Callable[[], Any]] | None = None


_state = _State()


def defer(fn: Callable[[], Any], call_soon: Callable[[Callable[[], Any]], object]) -> None:
    """Run ``fn`` when the current read event ends (``call_soon(fn)`` outside one)."""
    pending = _state.pending
    if pending is not None:
        pending.append(fn)
    else:
        call_soon(fn)


def begin() -> None:
    """A shell starts handling a read event (nested calls are one event)."""
    st = _state
    if not st.depth:
        st.pending = []
    st.depth += 1


def end() -> None:
    """The read event ends: run what was deferred during it (and what that defers)."""
    st = _state
    st.depth -= 1
    if st.depth:
        return
    pending = st.pending
    try:
        while pending:
            st.pending = []
            for fn in pending:
                try:
                    fn()
                except Exception:
                    log.exception("deferred flush %r failed", fn)
            pending = st.pending
    finally:
        st.pending = None
