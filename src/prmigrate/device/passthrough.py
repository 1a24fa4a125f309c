"""The passthrough device: QEMU's ``scsi-block,migrate-pr=on``, its asyncio shell.

One ``PassthroughDevice`` per ``--device``: a logical unit towards the guest
(``execute``, ``execute_then``, ``relay_read``, ``relay_write``), initiator sessions towards
the shared LUN (``sessions.py``), a monitor nexus for reading the backend
(``monitor.py``). Every decision is the core's (``core.py``, which states
the rules, ``links.py``, ``tmf.py``, ``plans.py``, ``verify.py``): how each
command goes and what is learnt from its answer (``route``, ``Forward``),
which relayed read or write may go as is (``relay_session``), the PR OUT
port (``plans.pr_out_plan``); this shell moves guest commands to backend
sessions and answers back, and runs the plans. The plain forward is
one ``Session.submit`` / ``submit_then`` / ``submit_relay`` handed straight
to the target: no Task, no callback of ours, no copy. ``execute_then``'s
test for it is written out in place (the conditions of ``relay_session``
with the opcode's instead of the length's), so that path makes no call of
its own per command.

Migration hooks: ``hold()``, ``await drain()``, ``release_held()``,
``discard_held()``, ``snapshot() -> DeviceSnapshot``, ``restore(state,
identity=None, pending_uas=None)``, ``await backend_session(guest)``,
``await pr_out(guest, action, rtype, rk, sark, scope=0, aptpl=False,
purpose=Purpose.GUEST)`` (the one backend PR OUT port; the migration's ops
with ``Purpose.MIGRATION``), ``await run(plan)`` (a command plan on the
monitor nexus, ``plans.full_status_plan``, ``keys_plan``, ``command_plan``),
``await verify()``,
``await close()``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ..aio import chain, deliver, map_answer, on_answer, on_outcome, run_plan, settle
from ..iscsi.initiator import IscsiError
from ..iscsi.initiator_core import RelaySink
from ..lun.types import Nexus, Result
from ..scsi.constants import PrOutAction, PrType
from . import plans
from .core import CRASH_ENV, SPECIAL, Forward, Held, Kind, Purpose
from .datain import DATA_IN_ONLY, expected_in_len
from .describe import describe_device
from .errors import DeviceError
from .monitor import BackendMonitor
from .sessions import Answer, Link
from .verify import FULL_STATUS_METHOD, KEYS_METHOD


class PassthroughDevice(BackendMonitor):
    """A guest-facing logical unit forwarding to a shared backend LUN."""

    async def start(self, *, capture_identity: bool = True, reconcile: bool = True) -> None:
        """Load the journal, capture the LUN's identity (a migrated device
        must front the same LUN) and task management functions, and
        reconcile before the caller exposes the device: journal state that
        cannot be verified stops the start (DeviceError), another failed
        reconciliation is logged. A migration's given state is not
        reconciled: the backend shows it on the source's nexuses."""
        await self.run(plans.start_plan(self, capture_identity, reconcile))

    def execute(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview = b"",
                data_in_len: int | None = None) -> Answer:
        """The LU contract: forward ``cdb`` for the guest of ``nexus``."""
        b = self.link_for(nexus)
        if self._held is not None:
            return self.hold_back(Held(nexus, cdb, data_out, data_in_len, self._future()))
        f = self.route(b, nexus, cdb, data_out, data_in_len)
        if isinstance(f, Result):
            return f  # the device's own answer: no backend UA in it
        r = self._forward(b, nexus, f)
        if len(b.frontends) > 1:
            on_answer(r, lambda result: self.shared_answered(b, nexus, result))
        return r

    def _forward(self, b: Link, nexus: Nexus, f: Forward) -> Answer:
        sent = self._submit(b, f.cdb, f.data_out, f.data_in_len)
        if f.kind is Kind.PR_OUT:
            out = self._pending()
            on_outcome(sent, lambda r: self._pr_out_back(out, f, r))
            return out
        if f.seen is not None:
            on_answer(sent, f.seen)
        if f.mapped is not None and not isinstance(sent, Result):
            return map_answer(sent, self._future(), f.mapped)
        return sent

    def execute_then(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview,
                     done: Callable[[Result | BaseException], Any]) -> Result | None:
        """``execute`` for a transport that takes a completion callback: the
        Result when known at once, else None and ``done(result or error)``
        later. The plain forward (``SharedNexus.sole``, not held, no special
        case, data direction as sent) goes to ``Session.submit_then``."""
        b = self._by_guest.get(nexus.initiator)
        if b is not None and self._held is None and not b.owed_uas and b.sole is nexus:
            s = b.session
            op = cdb[0] if cdb else -1
            if s is not None and b.closing is None and op not in SPECIAL and not (data_out and op in DATA_IN_ONLY):
                n = 0 if len(data_out) else expected_in_len(cdb, self.block_size)
                try:
                    s.submit_then(self.lun, cdb, data_out, n, done)
                except (IscsiError, ValueError) as exc:
                    return self.not_forwarded(cdb, exc)
                return None
        return deliver(self.execute(nexus, cdb, data_out), done)

    def relay_read(self, nexus: Nexus, cdb: bytes, edtl: int, sink: RelaySink, token: Any) -> bool:
        """The read path (``Connection._fast_reads``): a READ(10)/(16) whose
        length is the EDTL goes to ``Session.submit_relay`` as is. False
        leaves it to ``execute_then`` (not ``sole``, held, UA owed...)."""
        s = self.relay_session(nexus, cdb, 0x28, 0x88, edtl)
        if s is None:
            return False
        try:
            s.submit_relay(self.lun, cdb, edtl, sink, token)
        except (IscsiError, ValueError):
            return False  # execute_then answers it (and logs why)
        return True

    def relay_write(self, nexus: Nexus, cdb: bytes, data: Any, sink: RelaySink, token: Any) -> bool:
        """The write path (``Connection._execute``): a WRITE(10)/(16) whose
        data is all its CDB asks for goes to ``Session.submit_relay`` with
        that data, as is; the backend session sends it as its own login
        negotiated (immediate, unsolicited, R2T-solicited). Declined (False)
        as ``relay_read`` declines: ``execute_then`` answers it."""
        n = len(data)
        s = self.relay_session(nexus, cdb, 0x2A, 0x8A, n) if n else None
        if s is None:
            return False
        try:
            s.submit_relay(self.lun, cdb, 0, sink, token, data)
        except (IscsiError, ValueError):
            return False  # execute_then answers it (and logs why)
        return True

    # ------------------------------------------------ the backend PR OUT port
    def _pr_out_back(self, out: asyncio.Future[Result], f: Forward, r: Result | BaseException | None) -> None:
        """A guest's PR OUT answered (``Forward.back``, ``DeviceCore.pr_out_back``):
        the guest has its answer once the verification its outcome asks for is done."""
        why = f.back(r)
        if why is None:
            settle(out, r)
        else:
            self._bg.spawn(self._verify_after(why)).add_done_callback(lambda _: settle(out, r))

    async def pr_out(self, guest: str, action: PrOutAction | int, rtype: PrType | int, rk: int, sark: int,
                     scope: int = 0, aptpl: bool = False, *, purpose: Purpose = Purpose.GUEST,
                     params: bytes | None = None) -> Result:
        """A PR OUT of the device's own on ``guest``'s backend nexus: the
        one backend PR OUT port. Unit attentions are retried and, per
        ``OWN_COMMANDS[purpose]``, owed to the guest (``owe``: reported on
        its next command). ``Purpose.GUEST``: journaled, snooped and
        verified as a guest's (DeviceError, and nothing sent, when its intent
        cannot be journaled); ``Purpose.MIGRATION`` (the takeover,
        rollback, setup and cleanup ops, ``migration/pr_ops.py``): none of
        that, one round trip per send, the 2A/xx it causes not owed.
        ``params``: another parameter list than the basic one of ``rk``,
        ``sark`` and ``aptpl`` (REGISTER AND MOVE's, ``scsi.pr``). The
        decisions are ``plans.pr_out_plan``'s, run on the guest's backend
        session."""
        session = await self.backend_session(guest)
        plan = plans.pr_out_plan(self, guest, action, rtype, rk, sark, scope, aptpl, purpose, params)
        return await run_plan(plan, lambda step: self._step(step, session), IscsiError)

    # ------------------------------------------------------ migration hooks
    async def drain(self) -> None:
        """Wait for every forwarded command and the snooping/verification
        that follows it."""
        while True:
            waits: list[Any] = list(self._inflight)
            waits += [t for t in (self._verifying, self._tmf_task) if t is not None]
            waits += [b.opening for b in self._backends.values() if b.opening is not None]
            if waits:
                await asyncio.wait(waits)
                continue
            if not any(b.session is not None and b.session.core.outstanding for b in self._backends.values()):
                return
            await asyncio.sleep(0.001)

    def release_held(self) -> None:
        """Rollback: forward the queued commands in order and resume."""
        held, closing = self.resumed()
        for h in held:
            if not h.token.done():
                chain(self.execute(h.nexus, h.cdb, h.data_out, h.data_in_len), h.token)
        self._do(closing)

    def describe(self) -> dict[str, object]:
        """``query-devices`` entry."""
        return describe_device(self, time.time())


__all__ = ["CRASH_ENV", "DeviceError", "FULL_STATUS_METHOD", "KEYS_METHOD", "PassthroughDevice", "expected_in_len"]
