"""Command plans the device runs on its monitor nexus: what to read from
the backend and what the answers mean, without I/O.

A plan is a generator: it yields a step (``Own``: one of the device's own
commands, sent under the one unit attention rule, ``core.OWN_COMMANDS``;
``Call``: an initiator ``Session`` helper, called with ``lun=``;
``Verify``: a verification), is sent the answer, or has the transport's
``IscsiError`` thrown in, and returns what was learnt. The shell
(``monitor.py``, ``sessions.py``) only runs the steps. The task
management plan of a backend nexus is the link table's
(``LinkTable.tmf_plan``).

* ``full_status_plan``: READ FULL STATUS (SPC-5 6.16.5), read again with
  the allocation length the answer asks for until it is complete; None
  when the backend does not implement it (``verify.Verification``).
* ``keys_plan``: READ KEYS + READ RESERVATION (SPC-5 6.16.2, 6.16.3), the
  fallback.
* ``identity_plan``: standard INQUIRY, VPD pages 80h and 83h (SPC-5
  7.7.3, 7.7.6; optional) and READ CAPACITY(16) (SBC-4 5.21; optional):
  the backend LUN's identity (``identity.DeviceIdentity``), or
  ``DeviceError`` when the target has no such logical unit.
* ``tmfs_plan``: REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-5 6.40);
  None when the backend does not implement it (tgt) or fails it.
* ``verify_plan``: one verification (``verify.py``): READ FULL STATUS or
  the fallback, reconciled with the tracked state; the device learns the
  outcome (``verified``) or why it failed (``verify_failed``, raised as
  ``DeviceError``).
* ``pr_out_plan``: a PR OUT of the device's own on a guest's backend
  nexus (the backend PR OUT port), its outcome as its ``Purpose`` says,
  and the verification it asks for (``Verify(after=True)``).
* ``start_plan``: a device's start: the journal, the LUN's identity and
  task management functions, the verification at start (``Verify``: one
  the shell runs as any other, ``verify``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, NamedTuple

from ..iscsi.initiator_core import IscsiError
from ..lun.types import Result
from ..scsi.cdb import SupportedTmfs
from ..scsi.constants import PrInAction
from ..scsi.pr import (
    PrDecodeError,
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    pr_in_cdb,
    pr_out_cdb,
    pr_out_params,
)
from .core import Purpose, UaRetry
from .errors import DeviceError
from .identity import DeviceIdentity, no_logical_unit
from .reconcile import ReconcileError
from .state import StateChange
from .verify import PR_IN_ALLOC, Verification

if TYPE_CHECKING:
    from .core import DeviceCore


class Own(NamedTuple):
    """One of the device's own commands (data-out ``data``, allocation
    length ``alloc``), sent again on a unit attention with ``retry``
    keeping the ones met (``core.UaRetry``)."""

    cdb: bytes
    data: bytes
    alloc: int
    retry: UaRetry


class Call(NamedTuple):
    """``Session.<method>(*args, lun=...)``."""

    method: str
    args: tuple[Any, ...] = ()


class Verify(NamedTuple):
    """A verification (``verify(reason)``), run by the shell; ``after``:
    the one a PR OUT's outcome asks for before its answer goes, whose
    failure is logged and retried later (the answer still goes)."""

    reason: str
    after: bool = False


Step = Own | Call | Verify
Plan = Generator[Step, Any, Any]


def command_plan(cdb: bytes, alloc: int) -> Plan:
    """One command of the device's own on the monitor nexus (a probe, e.g.
    REPORT SUPPORTED OPERATION CODES): its answer, unit attentions dropped."""
    return (yield Own(cdb, b"", alloc, UaRetry(Purpose.MONITOR)))  # type: ignore[no-any-return]


def _pr_in(action: PrInAction, alloc: int = PR_IN_ALLOC) -> Own:
    """A PERSISTENT RESERVE IN on the monitor nexus: its unit attentions dropped."""
    return Own(pr_in_cdb(action, alloc), b"", alloc, UaRetry(Purpose.MONITOR))


def full_status_plan(v: Verification, log: Any) -> Generator[Step, Result, ReadFullStatus | None]:
    if v.full_status is False:
        return None
    alloc: int | None = PR_IN_ALLOC
    while alloc is not None:
        known = v.full_status
        r = yield _pr_in(PrInAction.READ_FULL_STATUS, alloc)
        rfs, alloc = v.full_status_answer(r, alloc)
        if rfs is not None:
            return rfs
        if v.full_status is False and known is None:
            log.info("backend has no READ FULL STATUS: using READ KEYS + READ RESERVATION")
    return None


def keys_plan(v: Verification) -> Generator[Step, Result, tuple[ReadKeys, ReadReservation]]:
    keys = v.keys_answer((yield _pr_in(PrInAction.READ_KEYS)))
    rr = v.reservation_answer((yield _pr_in(PrInAction.READ_RESERVATION)))
    return keys, rr


def identity_plan(lun: int, backend: str, log: Any) -> Generator[Step, Any, DeviceIdentity]:
    std = yield Call("inquiry", (None, 255))
    vpd: dict[int, bytes] = {}
    for page in (0x80, 0x83):
        try:
            vpd[page] = yield Call("inquiry", (page, 255))
        except IscsiError:
            pass
    try:
        blocks, size = yield Call("read_capacity16")
        rc: bytes | None = struct.pack(">QI", blocks - 1, size)
    except IscsiError:
        rc = None
    missing = no_logical_unit(std, rc)
    if missing is not None:
        raise DeviceError(f"backend {backend} has no logical unit {lun} ({missing})")
    ident = DeviceIdentity.capture(std, vpd, rc)
    log.info(
        "backend LUN: %s %s serial %s, %d x %d bytes",
        ident.vendor, ident.product, ident.serial, ident.capacity_blocks, ident.block_size,
    )
    return ident


def tmfs_plan(log: Any) -> Generator[Step, Any, SupportedTmfs | None]:
    try:
        tmfs: SupportedTmfs = yield Call("report_supported_tmfs")
    except IscsiError as exc:
        log.info("backend task management functions unknown (target resets refused): %s", exc)
        return None
    log.info("backend task management functions: %s", ", ".join(tmfs.names()) or "none")
    return tmfs


def verify_plan(dev: DeviceCore, reason: str, now: Callable[[], float]) -> Generator[Step, Any, tuple[StateChange, ...]]:
    """Reconcile every tracked guest with the backend (journaled); ``now``:
    the wall clock of the outcome."""
    dev.note_ports()
    before = dev.snooper.state.to_dict()
    v = dev.verification
    try:
        read: Any = yield from full_status_plan(v, dev.log)
        if read is None:
            read = yield from keys_plan(v)
        changes, how = v.apply(dev.snooper, read, now())
    except (PrDecodeError, ReconcileError, IscsiError, DeviceError) as exc:
        raise dev.verify_failed(reason, exc, isinstance(exc, IscsiError)) from exc
    dev.verified(reason, how, changes, before)
    return changes


def pr_out_plan(dev: DeviceCore, guest: str, action: int, rtype: int, rk: int, sark: int, scope: int = 0,
                aptpl: bool = False, purpose: Purpose = Purpose.GUEST,
                params: bytes | None = None) -> Generator[Step, Any, Result]:
    """The backend PR OUT port (``PassthroughDevice.pr_out``): PERSISTENT
    RESERVE OUT (SPC-5 6.17) with the basic parameter list of ``rk``,
    ``sark`` and ``aptpl`` or ``params`` (REGISTER AND MOVE's), sent on
    ``guest``'s backend nexus under the one unit attention rule; its
    outcome goes the way ``OWN_COMMANDS[purpose]`` says
    (``DeviceCore.own_pr_out``, ``own_pr_out_done``: DeviceError, and
    nothing sent, when a tracked one cannot be journaled), then the
    verification it asks for. A send abandoned (``GeneratorExit``: the
    caller cancelled, a CDB the session refused) still owes the unit
    attentions met; only a transport's ``IscsiError`` puts the effect in
    doubt. Returns the answer."""
    data = pr_out_params(rk, sark, aptpl=aptpl) if params is None else params
    cdb = pr_out_cdb(action, rtype, scope, len(data))
    op = dev.own_pr_out(guest, cdb, data, purpose)
    try:
        r = yield Own(cdb, data, 0, op.retry)
    except BaseException as exc:
        dev.own_pr_out_done(op, exc, answered=isinstance(exc, IscsiError))
        raise
    why = dev.own_pr_out_done(op, r)
    if why is not None:
        yield Verify(why, after=True)
    return r  # type: ignore[no-any-return]


def start_plan(dev: DeviceCore, capture_identity: bool, reconcile: bool) -> Generator[Step, Any, None]:
    """Load the journal, capture the LUN's identity (a migrated device must
    front the same LUN) and task management functions, and reconcile:
    journal state that cannot be verified stops the start (DeviceError),
    another failed reconciliation is logged. A migration's given state is
    not reconciled: the backend shows it on the source's nexuses."""
    dev.load_journal()
    if capture_identity:
        dev.adopt_identity((yield from identity_plan(dev.lun, dev.config.backend_url, dev.log)))
        dev.backend_tmfs = yield from tmfs_plan(dev.log)
    how = dev.start_verify
    if how == "start (journal)":
        yield Verify(how)
        if dev.journal is not None:
            dev.journal.clear_intents(dev.snooper.state)
    elif how is not None and reconcile and capture_identity:
        try:
            yield Verify(how)
        except DeviceError as exc:
            dev.log.warning("reconciliation at start failed: %s", exc)


__all__ = ["Call", "Own", "Plan", "Step", "Verify", "full_status_plan", "identity_plan", "keys_plan",
           "pr_out_plan", "start_plan", "tmfs_plan", "verify_plan"]
