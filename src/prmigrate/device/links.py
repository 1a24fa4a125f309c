"""The link table of the passthrough device: its backend nexuses' sessions
as a state machine, without I/O.

One initiator session per backend I_T nexus (``core.Backend``), opened on
the guest's first command and logged out when its last frontend nexus
ends (the LUN then sees the I_T nexus loss itself; SAM-5 6.3.4). Per link:

============  =====================================  =====================
state         attributes                             a command sent now
============  =====================================  =====================
open          ``session``, no ``closing``            goes (the shell's
                                                     fast path), unless a
                                                     task management
                                                     function is pending
closed        no ``session``, no ``opening``         waits; ``Open``
opening       ``opening``                            waits
closing       ``closing``                            waits; ``Open`` (after
                                                     the close)
============  =====================================  =====================

Events, each answered with the ``Action``\\ s the shell executes: a command
that cannot go (``queue``), a login done or given up (``opened``,
``open_failed``: its waiting commands get BUSY, SAM-5 5.3.1, which a
guest retries), a frontend nexus gone (``frontend_gone``: the last one
closes the link unless the device is held; a departed SCSI-2 holder gets
its RELEASE), a guest's task management function (``guest_tmf``) and its
answer (``tmf_done``: what waited goes, ``tmf.py``), the device resumed
after a hold (``resumed``) or closed (``shut``). The LU contract's nexus
events (``nexus_lost``, ``reset``, ``clear_task_set``) come here too and
hand their actions to the shell's executor (``_do``). A login is a
``Login`` the table builds (``guest_login``, ``monitor_login``, tried as
``first_login`` says); the relayed reads and writes go as is when
``relay_session`` finds the link ready for them.

``opening`` and ``closing`` hold the shell's handles of the login and the
logout in progress (None: none); the table only asks whether one is.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from ..iscsi.initiator_core import (
    HOLD_TIMEOUT,
    PERSISTENT,
    IscsiError,
    ReconnectPolicy,
    link_state_of,
)
from ..iscsi.pdu import TmfFunction
from ..iscsi.url import parse_url
from ..lun.types import Nexus, Result
from ..scsi.constants import Status
from ..scsi.sense import Sense, encode_sense
from .config import DeviceConfig
from .core import Backend, DeviceCore, Held, Purpose, UaRetry
from .errors import DeviceError
from .identity import BackendPort, DeviceIdentity
from .plans import Call, Own, Step
from .state import DevicePrState
from .tmf import GUEST_TMFS, Tmf, backend_tmf, guest_function, release

_CHECK = Status.CHECK_CONDITION
# the backend could not be reached for this command
ABORTED = Result(_CHECK, b"", encode_sense(Sense.COMMAND_ABORTED))
# SAM-5 5.3.1: the LU cannot take the command now, the guest retries
# (the backend was not reachable within the session's hold timeout)
BUSY = Result(Status.BUSY, b"", b"")
# A command the initiator session would not send: a CDB it cannot carry
# (ValueError) is the guest's error, anything else the transport's.
NOT_FORWARDED: dict[type[Exception], Result] = {
    ValueError: Result(_CHECK, b"", encode_sense(Sense.INVALID_FIELD_IN_CDB)),
}


class Waiting(NamedTuple):
    """A guest command waiting for its link (``token``: the shell's handle
    for its answer)."""

    cdb: bytes
    data_out: Any
    n: int
    token: Any


class Link(Backend):
    """A backend nexus with its session (the shell's ``Session``), the
    shell's handles of a login or logout in progress, and the commands
    waiting for it, in order."""

    def __init__(self, key: str, port: BackendPort) -> None:
        super().__init__(key, port)
        self.session: Any = None
        self.opening: Any = None
        self.closing: Any = None
        self.waiting: list[Waiting] = []


class Do(Enum):
    OPEN = "open"  # log in (after the logout in progress, if any)
    CLOSE = "close"  # log out (the LUN sees the I_T nexus loss)
    SEND = "send"  # send ``commands`` in order on the link's session
    ANSWER = "answer"  # answer ``commands`` with ``result`` (a Result or an error)
    TMF = "tmf"  # send the task management function ``tmf``


class Login(NamedTuple):
    """A backend login the link table asks for: the nexus ``what`` (a
    guest's, or the monitor's), ISID ``isids[i]`` on path ``i`` (several:
    one nexus per path, ``multipath.py``), the session's keyword arguments
    (``options``: ``session_options`` with the callbacks) and who hears of
    a unit attention in an answer (``on_ua``; None: nobody, the monitor's
    own retry drops them)."""

    isids: tuple[int, ...]
    what: str
    options: dict[str, Any]
    on_ua: Any = None


@dataclass(frozen=True, slots=True)
class Action:
    do: Do
    link: Link | None = None
    commands: tuple[Waiting, ...] = ()
    result: Result | BaseException | None = None
    tmf: Tmf | None = None


Actions = list[Action]


class LinkTable(DeviceCore):
    """The device core with its link table (see the module's table)."""

    _backends: dict[str, Link]  # type: ignore[assignment]
    _by_guest: dict[str, Link]  # type: ignore[assignment]

    def __init__(self, config: DeviceConfig, host_initiator: str, *, state_dir: str | Path | None = None,
                 identity: DeviceIdentity | None = None, state: DevicePrState | None = None,
                 frontend_lun: int = 0, session_options: dict[str, Any] | None = None, fsync: bool = True) -> None:
        """``DeviceCore``'s arguments; ``session_options``: the device's own
        keyword arguments of a backend login (``session_options``)."""
        super().__init__(config, host_initiator, state_dir=state_dir, identity=identity, state=state,
                         frontend_lun=frontend_lun, fsync=fsync)
        self.url = parse_url(config.backend_url, require_lun=False)
        self.portal, self.target_iqn = self.url.portal, config.target_iqn
        self._session_options = dict(session_options or {})
        # with several backends: every guest's path set (``paths.PathSet``), which
        # a PR IN answer on any of them lists (``paths.rewrite_pr_in``, multipath.py)
        self.path_sets: list[Any] = []

    def _new_backend(self, key: str, port: BackendPort) -> Link:
        return Link(key, port)

    def link(self, key: str) -> Link:
        """The link of ``key`` (a state key or a guest name), made if new."""
        return self._backend(key)  # type: ignore[return-value]

    def link_for(self, nexus: Nexus) -> Link:
        """The link of ``nexus``'s guest (made if new), ``nexus`` attached."""
        b = self._by_guest.get(nexus.initiator)
        if b is None:
            b = self.link(nexus.initiator)
        if nexus not in b.frontends:
            b.attach(nexus)
        return b

    def relay_session(self, nexus: Nexus, cdb: bytes, op10: int, op16: int, length: int) -> Any:
        """The one eligibility rule of the relayed reads and writes (the
        shell's ``relay_read`` / ``relay_write``): the guest's backend
        session when the command may be forwarded as is (guest identity,
        not held, no unit attention owed, ``nexus`` the guest's sole
        frontend nexus, ``SharedNexus.sole``, the link open and not
        closing, ``cdb`` the 10- or 16-byte form ``op10`` / ``op16`` of
        SBC-4 READ / WRITE whose TRANSFER LENGTH in blocks moves ``length``
        bytes), else None. On the data path: one call per command, nothing
        it calls in turn but the table lookups."""
        b = self._by_guest.get(nexus.initiator)
        if b is None or self._held is not None or b.owed_uas or b.sole is not nexus:
            return None
        s = b.session
        if s is None or b.closing is not None:
            return None
        op = cdb[0]
        if op == op10:
            blocks = (cdb[7] << 8) | cdb[8]
        elif op == op16:
            blocks = int.from_bytes(cdb[10:14], "big")
        else:
            return None
        return s if blocks * self.block_size == length else None

    def link_state(self, b: Backend) -> dict[str, Any] | None:
        """``Session.link_state()`` of ``b``'s backend session (None: none)."""
        return link_state_of(getattr(b, "session", None))

    def connected(self, b: Backend) -> bool:
        """Whether ``b``'s backend session is logged in."""
        s = getattr(b, "session", None)
        return s is not None and s.logged_in

    # ------------------------------------------------------------ sessions
    def session_options(self, on_event: Any = None, on_reconnect: Any = None) -> dict[str, Any]:
        """The keyword arguments of a backend login: an outage of any length
        is logged in again for as long as the device lives (``PERSISTENT``),
        a guest command waits at most ``HOLD_TIMEOUT`` meanwhile, then gets
        BUSY; the device's own options win."""
        opts = {"queue_depth": 128, "reconnect_policy": PERSISTENT, "hold_timeout": HOLD_TIMEOUT, **self._session_options}
        if on_reconnect is not None:
            opts["on_reconnect"] = on_reconnect
        if on_event is not None:
            opts["on_async_event"] = on_event
        return opts

    def guest_login(self, b: Link) -> Login:
        """``b``'s login: its guest's ISID on each path, with the link's
        callbacks (``link_callbacks``)."""
        on_ua, on_event, on_reconnect = self.link_callbacks(b)
        return Login(self.path_isids(b.key), f"guest {b.key}", self.session_options(on_event, on_reconnect), on_ua)

    def monitor_login(self) -> Login:
        """The monitor nexus's login (``monitor_isids``): it reports nothing
        to the device, its unit attentions are its own."""
        return Login(self.monitor_isids, "monitor", self.session_options())

    def first_login(self, b: Link) -> tuple[float, ReconnectPolicy, Callable[[BaseException], None]]:
        """How ``b``'s first login is tried (``initiator.login_within``):
        a guest whose backend is down waits as a reconnecting session's
        commands do, with the reconnect backoff (``PERSISTENT``) for up to
        ``HOLD_TIMEOUT``, its first failure logged; then what waited gets
        BUSY (``open_failed``), which guests retry."""
        return HOLD_TIMEOUT, PERSISTENT, lambda exc: self.log.warning(
            "backend nexus for %s: %s; trying again", b.key, exc)

    def link_callbacks(self, b: Link) -> tuple[Any, Any, Any]:
        """What ``b``'s session reports: a unit attention in an answer
        (``on_unit_attention``), one sent asynchronously (``on_async_event``),
        a login again after a lost connection (``on_reconnect``: the LUN may
        have changed meanwhile, so the PR state is checked before the
        commands the session held go, ``_verify_after_login``)."""
        return (lambda lun, sense: self.unit_attention_met(b, sense.asc, sense.ascq),
                lambda message, sense: self.async_unit_attention(b, sense),
                lambda: self._verify_after_login(b.key))

    async def _verify_after_login(self, key: str) -> None:
        """The shell's: awaited by ``key``'s backend session after it logged
        in again, before its held commands go (it checks the PR state)."""

    # ------------------------------------------------------------ commands
    def queue(self, b: Link, cmd: Waiting) -> Actions:
        """``cmd`` cannot go now (no session, closing, a function pending):
        it waits, in order; the link opens unless it is opening or only a
        task management function keeps the command back."""
        b.waiting.append(cmd)
        if b.opening is None and (b.session is None or not self.tmfs.busy):
            return [Action(Do.OPEN, b)]
        return []

    def not_forwarded(self, cdb: bytes, exc: Exception) -> Result:
        """The session refused to send ``cdb``: the guest's answer."""
        self.log.warning("cannot forward CDB %s: %s", bytes(cdb[:16]).hex(), exc)
        return next((r for t, r in NOT_FORWARDED.items() if isinstance(exc, t)), ABORTED)

    def _send(self, b: Link) -> Actions:
        waiting, b.waiting = b.waiting, []
        return [Action(Do.SEND, b, tuple(waiting))] if waiting else []

    # ------------------------------------------------------------ logins
    def want_session(self, b: Link) -> Actions:
        """Someone waits for ``b``'s session (``backend_session``)."""
        if self._closed:
            raise DeviceError("device closed")
        return [Action(Do.OPEN, b)] if b.opening is None else []

    def opened(self, b: Link) -> Actions:
        """``b`` logged in: what waited goes, unless a function is pending
        (then it goes when that is answered, ``tmf_done``)."""
        return [] if self.tmfs.busy else self._send(b)

    def open_failed(self, b: Link, exc: BaseException | None = None) -> Actions:
        """``b`` could not log in within the hold timeout (``exc``: why):
        BUSY to what waited."""
        if exc is not None:
            self.log.error("cannot open backend nexus for %s: %s", b.key, exc)
        waiting, b.waiting = b.waiting, []
        return [Action(Do.ANSWER, b, tuple(waiting), BUSY)] if waiting else []

    # ------------------------------------------------------------ closing
    def unused(self, b: Link) -> Actions:
        """``b`` may have lost its last frontend nexus: close it then."""
        if b.frontends or b.session is None or b.closing is not None or self._closed:
            return []
        return [Action(Do.CLOSE, b)]

    def closing_started(self, b: Link) -> Any:
        """The logout of ``b`` begins: the session to log out (None: none).
        The LUN sees the nexus loss and drops a SCSI-2 reservation there."""
        session, b.session = b.session, None
        if session is not None:
            self.log.info("guest %s left: closing its backend nexus (I_T nexus loss)", b.key)
            b.drop_reservation()
        return session

    def frontend_gone(self, nexus: Nexus) -> Actions:
        """``nexus`` ended: a RELEASE for it when it held the SCSI-2
        reservation and others keep the backend nexus (sent like a task
        management function: what any guest sends next reaches the LU
        after it); the link closes with its last frontend, unless the
        device is held (the decision waits for ``resumed`` or ``shut``)."""
        b, cdb = self.frontend_left(nexus)
        if b is None:
            return []
        link: Link = b  # type: ignore[assignment]
        out = self.task_management(release(b.key, cdb)) if cdb is not None else []
        if not b.frontends and self._held is None:
            out += self.unused(link)
        return out

    def resumed(self) -> tuple[list[Held], Actions]:
        """Rollback: the held commands to forward, in order (``resume``), and,
        when the device was held, the links left unused meanwhile closing."""
        was_held = self.held
        held = self.resume()
        if not was_held:
            return held, []
        return held, [a for b in self._backends.values() if not b.frontends for a in self.unused(b)]

    def shut(self) -> Actions:
        """The device closes: every waiting command fails, no verification
        is retried."""
        self._closed = True
        self.schedule.stop()
        out = [Action(Do.ANSWER, b, tuple(b.waiting), DeviceError("device closed"))
               for b in self._backends.values() if b.waiting]
        for b in self._backends.values():
            b.waiting = []
        return out

    # ------------------------------------- the LU contract's nexus events
    def nexus_lost(self, nexus: Nexus) -> None:
        """A frontend nexus ended (I_T nexus loss, ``frontend_gone``)."""
        self._do(self.frontend_gone(nexus))

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        """A guest's LOGICAL UNIT / TARGET RESET: a LOGICAL UNIT RESET of the
        backend LUN (the frontend refuses a target reset the backend does
        not report, ``target_reset_supported``)."""
        self._do(self.guest_tmf(nexus, guest_function(target_reset, cold)))

    def clear_task_set(self, nexus: Nexus) -> None:
        """A guest's CLEAR TASK SET: forwarded as is (``tmf.GUEST_TMFS``)."""
        self._do(self.guest_tmf(nexus, TmfFunction.CLEAR_TASK_SET))

    def _do(self, actions: Actions) -> None:
        """The shell's: execute what the link table asks for."""

    # ------------------------------------------------- task management
    def guest_tmf(self, nexus: Nexus, function: TmfFunction) -> Actions:
        """A guest's task management function (``tmf.GUEST_TMFS``), sent
        when its backend nexus is open."""
        rule = GUEST_TMFS[function]
        b = self.reset_target(nexus) if rule.resets else self._backends.get(self.backend_key(nexus))
        if b is None or b.session is None:  # type: ignore[attr-defined]
            return []
        return self.task_management(backend_tmf(b.key, function))

    def task_management(self, tmf: Tmf) -> Actions:
        """Every backend nexus pauses until the functions asked are answered."""
        for b in self._backends.values():
            b.pause(True)
        start = self.tmfs.add(tmf)
        return [Action(Do.TMF, tmf=start)] if start is not None else []

    def tmf_plan(self, tmf: Tmf) -> Generator[Step, Any, None]:
        """Send ``tmf`` on its backend nexus (``Call``: the function; ``Own``:
        the RELEASE of a departed holder, whose unit attentions reached no
        frontend, so every frontend gets them). A failure is logged: the
        guest has had its response already."""
        b = self._backends[tmf.key]
        try:
            if b.session is None:
                raise IscsiError("backend nexus closed")
            if not tmf.release:
                yield Call(tmf.call)
            elif b.closing is None:  # else the nexus loss releases the reservation
                retry = UaRetry(Purpose.RELEASE)
                try:
                    r = yield Own(tmf.release, b"", 0, retry)
                except IscsiError as exc:
                    r = exc
                finally:
                    self.owe_all(b, retry.owed)
                if isinstance(r, IscsiError):
                    self.log.warning("%s on the backend nexus of %s failed: %s", tmf.what, b.key, r)
                else:
                    self.log.info("%s on the backend nexus of %s -> %s", tmf.what, b.key, self.describe_result(r))
            self.log.info("%s done on the backend", tmf.what)
        except IscsiError as exc:
            self.log.warning("backend %s failed: %s", tmf.what, exc)

    def tmf_done(self) -> Actions:
        """The running function was answered or failed: the next one, or,
        none left, what waited goes (or its link opens)."""
        nxt = self.tmfs.done()
        if nxt is not None:
            return [Action(Do.TMF, tmf=nxt)]
        out: Actions = []
        for b in self._backends.values():
            b.pause(False)
            if b.session is not None and b.closing is None:
                out += self._send(b)
            elif b.waiting and not self._closed and b.opening is None:
                out.append(Action(Do.OPEN, b))
        return out


__all__ = ["ABORTED", "BUSY", "NOT_FORWARDED", "Action", "Actions", "Do", "Link", "LinkTable", "Login", "Waiting"]
