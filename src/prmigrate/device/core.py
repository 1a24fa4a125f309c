"""The passthrough device's core: every decision, no I/O.

The device (``passthrough.py``, QEMU's ``scsi-block,migrate-pr=on``) is a
logical unit towards the guest and a set of iSCSI initiator sessions
towards the shared LUN. ``DeviceCore`` decides what each guest command
becomes, learns from each backend answer and keeps what the device owes
the guests; the asyncio shell only moves commands, answers and timers.
The rules live in the pure modules it uses: ``snoop.py`` (what a PR OUT
did), ``mask.py`` (what the guest may not see or do), ``identity.py``
(which backend nexus a guest uses), ``frontends.py`` (per frontend nexus
state), ``journal.py`` (crash-safe state), ``verify.py`` / ``reconcile.py``
(the backend's view), ``datain.py`` (data-in lengths).

Forwarding
----------
Every guest command goes to the backend unchanged (same CDB and data-out)
and the backend's status, sense and data come back unchanged. The data path
is one ``Session.submit`` whose Future is handed straight to the target: no
Task, no callback, no copy. The exceptions, each decided by ``route``
(``Kind``) and finished by the answer's handler:

* PERSISTENT RESERVE OUT: with migrate-pr on, SPEC_I_PT / ALL_TG_PT are
  refused before they reach the backend (``mask.refuse_pr_out``). Otherwise
  a journal intent is written, the command forwarded, and when the backend
  answers the snooper observes it (only GOOD changes state). When the
  outcome depends on other initiators the device verifies with READ FULL
  STATUS (READ KEYS + READ RESERVATION when the backend answers INVALID
  OPCODE / INVALID FIELD to it, like tgt) *before* the guest gets its answer,
  so a drained device's state is always verified or explicitly marked not.
* PERSISTENT RESERVE IN / REPORT CAPABILITIES: with migrate-pr on, SIP_C and
  ATP_C are cleared in the answer (``mask.mask_pr_in``).
* REPORT LUNS is answered by the device, like QEMU's SCSI bus does: the guest
  sees its own LUN (``frontend_lun``), not the backend's LUN inventory.
* Unit attentions 2A/03, 2A/04, 2A/05 and 29/xx in any backend answer mark
  the guest's state unverified and start one (coalesced) verification; the
  answer itself is forwarded untouched.
* RESERVE / RELEASE (6/10): forwarded; the answer tells which frontend
  nexus holds the SCSI-2 reservation (below).

Verification uses a separate *monitor* nexus (host initiator name, ISID
``derive_isid(device, MONITOR)``) that never registers: a PR IN issued on a
guest's own nexus could consume a unit attention meant for the guest.

Identity
--------
``identity=guest``: each guest initiator NAME gets its own backend session
(host initiator name, ISID from ``identity.backend_port``), opened on its first
command. libiscsi picks a new ISID on each reconnect, so the guest's PR state
is keyed by its name, never by its frontend ISID. ``identity=host``: one
shared backend session for every guest (QEMU's: the host's one nexus).

Frontend nexuses sharing a backend nexus: several sessions of one guest
name (identity=guest: a multipath guest, a reconnect with a new ISID), or
every guest (identity=host), use one backend I_T nexus. What a LU keeps per
I_T nexus is then kept per frontend nexus by the device (``frontends.py``):
a unit attention the backend reports to one of them is queued for the
others (one the device meets on its own commands, for all; a frontend that
logs in later gets none of the older ones, as on a LU); a SCSI-2
reservation is held by the frontend whose RESERVE got GOOD, and the
device answers the others' commands as the LU would answer another nexus
(RESERVATION CONFLICT, RELEASE without effect). Unit attentions owed to the
guest (``owed_uas``: migrated, or met by the device's own PR OUTs) go to
its first frontend command and are queued for its other frontends then.
The plain forward below is for a backend nexus with one frontend and
nothing queued (``SharedNexus.sole``).

SCSI-2 RESERVE and nexus loss: when the frontend holding the reservation
ends (``nexus_lost``) while other frontends keep the backend nexus, the
device sends RELEASE (6 or 10, as reserved) there, as the LU would drop it
on that nexus loss; guest commands wait for it as for a task management
function (below), so none meets the departed session's reservation. When the last frontend nexus of a guest ends, its
backend session is logged out, so the LUN sees the I_T nexus loss itself.
While the device is held (a migration is moving it) nexus loss does not
close anything: the decision waits for ``release_held()`` (rollback) or
``close()``.

Data-in length: the LU contract carries no Expected Data Transfer Length,
so the backend is asked for the length the CDB itself allows
(``expected_in_len``: allocation length or transfer length x block size).
The frontend target then truncates to the guest's EDTL and reports the
residual against it, exactly as the backend would have (iSCSIResiduals
tests pass through the device). ``execute(..., data_in_len=N)`` overrides it.
A command that only moves data in but arrives with data-out (a READ flagged
as a write) is forwarded without the data, as a LUN would ignore it.

Task management: the guest's LOGICAL UNIT RESET, TARGET WARM/COLD RESET
become a LOGICAL UNIT RESET of the backend LUN on the guest's nexus (a guest
must not reset the shared target); CLEAR TASK SET is forwarded as is. The
guest has the function's response at once, so until the backend answered it
every guest command waits (all backend nexuses): a command sent after the
response reaches the LU after the function, as on a LU (MultipathIO.Reset
resets through one path and expects the UA on the next command of each).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from ..iscsi.initiator_core import describe_result
from ..lun.types import Nexus, Result, unit_attention
from ..lun.ua import UA_EXEMPT
from ..scsi.cdb import SupportedTmfs, invalid_cdb
from ..scsi.constants import Opcode, PrInAction, PrOutAction, SenseKey, Status
from ..scsi.sense import Sense, encode_sense, sense_triple
from .config import DeviceConfig
from .datain import DATA_IN_ONLY, expected_in_len
from .errors import DeviceError
from .frontends import SharedNexus, Verdict, drops_scsi2, request_sense_data
from .identity import (
    BackendPort,
    DeviceIdentity,
    IdentityMode,
    backend_port,
    derive_isid,
    state_key,
)
from .journal import Intent, JournalError, PrJournal
from .mask import PrFilter
from .snapshot import DeviceSnapshot
from .snoop import PrSnooper, puts_state_in_doubt
from .state import DevicePrState, StateChange, describe_guest
from .tmf import TmfQueue
from .verify import Verification, VerifySchedule, failure_text

log = logging.getLogger("prmigrate.device.passthrough")

MONITOR = ".monitor"  # not an iSCSI name: its derived ISID is no guest's
# SAM-5 5.14: a command answered with a unit attention was not run; the
# device's own commands are sent again, at most this many times in all
UA_RETRIES = 8
# Crash-test hook: with this variable set to a PR OUT service action name
# (REGISTER, RESERVE, ...; ANY for every one), the process kills itself with
# SIGKILL after the backend answered GOOD to that action and before the
# journal records the outcome: only the intent is on disk.
CRASH_ENV = "PRMIGRATE_TEST_CRASH_AFTER_GOOD"
_GOOD = Status.GOOD
_CHECK = Status.CHECK_CONDITION


class Purpose(Enum):
    """Why the device sends a command of its own on a backend nexus: what
    the backend PR OUT port and the one unit attention rule
    (``OWN_COMMANDS``) do with it."""

    GUEST = "guest"  # a PR OUT for a guest (``pr_out``)
    MIGRATION = "migration"  # a migration's setup, takeover, rollback, fence or cleanup PR OUT
    MONITOR = "monitor"  # the verification's reads on the monitor nexus
    RELEASE = "release"  # RELEASE for a SCSI-2 holder that left


@dataclass(frozen=True, slots=True)
class OwnCommand:
    """The rule for one ``Purpose``. Every unit attention answer is retried
    (SAM-5 5.14: the command was not run), ``UA_RETRIES`` sends in all.
    ``tracked``: a PR OUT is journaled and snooped, and verified when its
    outcome asks for it, as a guest's. ``owed``: the unit attentions met are
    the guest's (reported on its next command), but for those whose ASC is
    in ``own_asc`` (caused by the command itself)."""

    tracked: bool
    owed: bool
    own_asc: frozenset[int] = frozenset()


OWN_COMMANDS: dict[Purpose, OwnCommand] = {
    # the guest's nexus: what it meets is the guest's (SAM-5 5.14)
    Purpose.GUEST: OwnCommand(tracked=True, owed=True),
    # the snapshot already carries the state these ops move, and a snooped
    # op's verification would be a round trip inside the pause (docs/design.md,
    # "How a PR OUT travels"); the 2A/xx they cause on the nexuses they touch
    # (RESERVATIONS / REGISTRATIONS PREEMPTED, RESERVATIONS RELEASED, SPC-5
    # 5.14.11) are the migration's own, any other UA is the guest's
    Purpose.MIGRATION: OwnCommand(tracked=False, owed=True, own_asc=frozenset({0x2A})),
    # the monitor nexus is no guest's (verify.py): dropped
    Purpose.MONITOR: OwnCommand(tracked=False, owed=False),
    # reached no frontend: every frontend of the nexus gets them
    Purpose.RELEASE: OwnCommand(tracked=False, owed=True),
}


class UaRetry:
    """The unit attentions one of the device's own commands met while the
    initiator's ``Session.submit_retrying`` sent it again (``note`` is its
    ``on_retry``): all of them (``met``), and those ``OWN_COMMANDS`` owes
    the guest for this ``purpose`` (``owed``)."""

    __slots__ = ("rule", "met", "owed")

    def __init__(self, purpose: Purpose) -> None:
        self.rule = OWN_COMMANDS[purpose]
        self.met: list[bytes] = []
        self.owed: list[bytes] = []

    def note(self, r: Result) -> None:
        """A unit attention answer was met (the command is sent again)."""
        ua = unit_attention(r)
        if ua is None:
            return
        sense = bytes(r.sense)
        self.met.append(sense)
        if self.rule.owed and ua[0] not in self.rule.own_asc:
            self.owed.append(sense)


class OwnPrOut(NamedTuple):
    """One of the device's own PR OUTs in flight (``DeviceCore.own_pr_out``)."""

    key: str
    guest: str
    cdb: bytes
    data: bytes
    intent: Intent | None
    retry: UaRetry
    tracked: bool


class Backend(SharedNexus):
    """One backend I_T nexus (a guest's, or the shared one with identity=host),
    with the frontend nexuses sharing it (``SharedNexus``: ``frontends``,
    their unit attention queues, the SCSI-2 reservation holder). The link
    table (``links.Link``) adds its session and the commands waiting for it."""

    def __init__(self, key: str, port: BackendPort) -> None:
        super().__init__()
        self.key = key  # state key: guest name, or SHARED_NEXUS
        self.port = port
        # sense owed to the guest (its own nexus's UAs the device took,
        # migrated ones): reported to the first frontend command, then
        # queued for the others
        self.owed_uas: list[bytes] = []


@dataclass(eq=False)
class Held:
    """A guest command queued while the device is held (``token``: the
    shell's handle for its answer)."""

    nexus: Nexus
    cdb: bytes
    data_out: Any
    data_in_len: int | None
    token: Any


class Kind(Enum):
    """How a command the core does not answer itself goes to the backend."""

    PLAIN = "plain"
    PR_OUT = "pr-out"  # snooped, maybe verified, before the guest's answer
    PR_IN = "pr-in"  # PRgeneration watched; REPORT CAPABILITIES masked
    SCSI2 = "scsi-2"  # the answer tells which frontend holds the reservation


class Forward(NamedTuple):
    """How to forward a guest command (``DeviceCore.route``): its CDB,
    data-out and data-in length; a PR OUT's journal ``intent``; what the
    core learns from the backend's answer (``seen``) and the answer the
    guest gets instead of the backend's (``mapped``), both per ``Kind``
    (``DeviceCore._watched``); a PR OUT's way back (``back``: its answer,
    or the transport's error, to ``pr_out_back``, which returns the reason
    of the verification to run before the guest has the answer)."""

    kind: Kind
    cdb: bytes
    data_out: Any
    data_in_len: int
    intent: Intent | None = None
    seen: Callable[[Result], None] | None = None
    mapped: Callable[[Result], Result] | None = None
    back: Callable[[Result | BaseException | None], str | None] = lambda r: None


# Opcodes with a handler of their own; REPORT LUNS is answered by the core.
_KIND: dict[int, Kind] = {
    Opcode.PERSISTENT_RESERVE_OUT: Kind.PR_OUT,
    Opcode.PERSISTENT_RESERVE_IN: Kind.PR_IN,
    Opcode.RESERVE_6: Kind.SCSI2,
    Opcode.RESERVE_10: Kind.SCSI2,
    Opcode.RELEASE_6: Kind.SCSI2,
    Opcode.RELEASE_10: Kind.SCSI2,
}
SPECIAL = frozenset(_KIND) | {Opcode.REPORT_LUNS}


class DeviceCore:
    """Everything the passthrough device decides, without I/O: fed guest
    commands (``route``), backend answers (``pr_out_answered``,
    ``scsi2_answered``, ``pr_in_answered``, ``shared_answered``), unit
    attentions (``unit_attention_met``, ``async_unit_attention``), nexus
    events (``attach``, ``frontend_left``, ``reset_target``) and the
    migration's hooks (``hold``, ``take_held``, ``discard_held``,
    ``snapshot``, ``restore``). What it wants done it asks of the shell
    through ``want_verify``."""

    def __init__(
        self,
        config: DeviceConfig,
        host_initiator: str,
        *,
        state_dir: str | Path | None = None,
        identity: DeviceIdentity | None = None,
        state: DevicePrState | None = None,
        frontend_lun: int = 0,
        fsync: bool = True,
    ) -> None:
        self.config = config
        self.name = config.name
        self.host_initiator = host_initiator.lower()
        self.identity = identity
        # the backend's answer to REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
        # (``start``): a guest's target reset is taken only when the backend
        # reports target resets (see ``reset``); None: not asked or not known
        self.backend_tmfs: SupportedTmfs | None = None
        self.frontend_lun = frontend_lun
        self.migrate_pr = config.effective_migrate_pr
        self.mode = IdentityMode(config.identity)
        self.filter = PrFilter(self.migrate_pr)
        self.lun = config.lun
        self.snooper = PrSnooper(state, mode=self.mode)
        self.journal: PrJournal | None = None
        if state_dir is not None:
            self.journal = PrJournal(Path(state_dir) / f"{config.name}.pr.json", fsync=fsync)
        self.log = logging.LoggerAdapter(log, {"device": config.name})
        self.verification = Verification(self.describe_result)
        # when the shell verifies (one at a time, coalesced, a retry timer)
        self.schedule = VerifySchedule(self.verification)
        self._backends: dict[str, Backend] = {}
        # the fast paths' lookup by guest name: the backend nexuses
        # themselves with identity=guest (keyed by guest name), none with
        # identity=host (one shared nexus, every command through route)
        self._by_guest: dict[str, Backend] = self._backends if self.mode is IdentityMode.GUEST else {}
        self._held: list[Held] | None = None
        # the guests' task management functions forwarded and not answered
        # yet (``tmf.py``): while there are, new backend nexuses start paused
        self.tmfs = TmfQueue()
        self._closed = False
        self.on_state_change: Callable[[Any, tuple[StateChange, ...]], Any] | None = None
        # fn(device, reconciliation dict) after every reconciliation (verify)
        self.on_reconcile: Callable[[Any, dict[str, Any]], Any] | None = None
        self._crash_after = os.environ.get(CRASH_ENV, "").upper() or None
        self._given_state = state is not None  # a migration's: not reconciled at start
        for guest in self.snooper.state.guests:
            self._note_port(guest)
        # Guests named in the ACL: their nexuses are known before they log
        # in, so a reservation taken on one outside the guest is adopted.
        if self.mode is IdentityMode.GUEST:
            for guest in config.guests or ():
                self._note_port(state_key(self.mode, guest))

    # ----------------------------------------------------- shell's hooks
    # one description of a backend answer, the initiator's (status and sense)
    describe_result: Callable[[Result], str] = staticmethod(describe_result)

    def want_verify(self, reason: str = "state in doubt") -> None:
        """The tracked state must be verified (the shell schedules it)."""

    def _new_backend(self, key: str, port: BackendPort) -> Backend:
        return Backend(key, port)

    # ---------------------------------------------------------- nexuses
    def port_of(self, key: str, path: int = 0) -> BackendPort:
        """The backend nexus the device uses for the state key ``key`` (on
        ``path`` of a multipath device, ``paths.py``)."""
        guest = key if self.mode is IdentityMode.GUEST else "*"
        return backend_port(self.mode, self.host_initiator, self.name, guest, path)

    def path_isids(self, key: str) -> tuple[int, ...]:
        """The ISID of ``key``'s nexus on each path (one: single path)."""
        return tuple(self.port_of(key, p).isid for p in range(len(self.config.backend_urls)))

    @property
    def monitor_isids(self) -> tuple[int, ...]:
        """The ISID of the monitor nexus on each path (``derive_isid(device,
        MONITOR)``; one: single path): no guest's nexus, never registered."""
        return tuple(derive_isid(self.name, MONITOR, p) for p in range(len(self.config.backend_urls)))

    def _note_port(self, key: str) -> None:
        self.snooper.transport_ids[key] = self.port_of(key).transport_id
        if len(self.config.backend_urls) > 1:  # every path's nexus is the guest's (verify.py)
            self.snooper.path_ids[key] = tuple(
                self.port_of(key, p).transport_id for p in range(1, len(self.config.backend_urls)))

    def backend_key(self, nexus: Nexus) -> str:
        return state_key(self.mode, nexus.initiator)

    def backend_for(self, guest: str) -> Backend:
        """The backend nexus of ``guest`` (a state key or a guest name), made if new."""
        return self._backend(guest)

    def _backend(self, guest: str) -> Backend:
        key = state_key(self.mode, guest)
        b = self._backends.get(key)
        if b is None:
            b = self._backends[key] = self._new_backend(key, self.port_of(key))
            self._note_port(key)
            if self.tmfs.busy:
                b.pause(True)
        return b

    def backends(self) -> dict[str, Backend]:
        """The backend nexuses by state key."""
        return dict(self._backends)

    def connected(self, b: Backend) -> bool:
        """Whether ``b``'s backend session is logged in (the shell knows)."""
        return False

    def link_state(self, b: Backend) -> dict[str, Any] | None:
        """``b``'s backend session's link state (the shell knows; None: none)."""
        return None

    def monitor_link_state(self) -> dict[str, Any] | None:
        """The monitor session's link state (the shell knows; None: none)."""
        return None

    @property
    def block_size(self) -> int:
        """The LUN's block size (512 until the identity is known); the
        target's write residuals use it too."""
        return self.identity.block_size if self.identity is not None else 512

    def report_luns(self) -> list[int]:
        """The LUNs REPORT LUNS lists (the target node replaces this)."""
        return [self.frontend_lun]

    @property
    def target_reset_supported(self) -> bool:
        """Whether the guest frontend takes a TARGET WARM/COLD RESET (as a
        LOGICAL UNIT RESET of the backend LUN, see ``reset``): only when
        the backend reports target resets, so a guest sees the same TMF
        support through the device as on the backend (a guest REPORT
        SUPPORTED TASK MANAGEMENT FUNCTIONS reaches the backend)."""
        return self.backend_tmfs is not None and self.backend_tmfs.target_reset

    def attach(self, nexus: Nexus) -> None:
        """A guest logged in (called by the target for each new nexus). It
        starts with no unit attention queued, as a new nexus on a LU."""
        self._backend(nexus.initiator).attach(nexus)

    def frontend_left(self, nexus: Nexus) -> tuple[Backend | None, bytes | None]:
        """``nexus`` ended: its backend nexus, and the RELEASE to send there
        when it held the SCSI-2 reservation and others keep that nexus
        (the LU would drop the reservation on this nexus loss)."""
        b = self._backends.get(self.backend_key(nexus))
        if b is None:
            return None, None
        held = b.holder is not None and b.holder == nexus
        release = b.detach(nexus)
        if release is not None:
            self.log.info(
                "%s left holding the SCSI-2 reservation; %d other frontend(s) keep the "
                "backend nexus of %s: sending %s",
                nexus.initiator_port, len(b.frontends), b.key, Opcode(release[0]).name,
            )
        elif held:
            self.log.info(
                "%s left holding the SCSI-2 reservation; its backend nexus closes (I_T nexus loss)",
                nexus.initiator_port,
            )
        return b, release

    def reset_target(self, nexus: Nexus) -> Backend | None:
        """A guest's reset: SAM-5 6.3.3, the LU reset releases a SCSI-2
        reservation. Returns the backend nexus to reset."""
        b = self._backends.get(self.backend_key(nexus))
        if b is None:
            return None
        holder = b.drop_reservation()
        if holder is not None:
            self.log.info(
                "reset from %s: SCSI-2 reservation of %s released",
                nexus.initiator_port, holder.initiator_port,
            )
        return b

    # ------------------------------------------------------ guest commands
    def route(
        self, b: Backend, nexus: Nexus, cdb: bytes, data_out: Any, data_in_len: int | None
    ) -> Result | Forward:
        """A guest command on ``b``: the answer when the device gives it
        (a UA owed or queued, a SCSI-2 reservation of another frontend,
        REPORT LUNS, a refused PR OUT), else how to forward it."""
        op = cdb[0] if cdb else -1
        if b.owed_uas and op not in UA_EXEMPT:
            sense = b.owed_uas.pop(0)
            self.fan_out(b, nexus, sense)
            return Result(_CHECK, b"", sense)
        if b.uas and nexus in b.uas:
            queued = b.take_ua(nexus, op)
            if queued is not None:
                if op == Opcode.REQUEST_SENSE:  # SPC-5 6.39: the UA is the data
                    return Result(_GOOD, request_sense_data(queued, bytes(cdb)))
                return Result(_CHECK, b"", queued)
        if b.holder is not None and b.holder != nexus:
            verdict = b.check(nexus, bytes(cdb))
            if verdict is not Verdict.FORWARD:
                return self._scsi2_refused(b, nexus, op, verdict)
        if data_out and op in DATA_IN_ONLY:
            data_out = b""
        if data_in_len is None:
            data_in_len = expected_in_len(cdb, self.block_size)
        kind = _KIND.get(op, Kind.PLAIN)
        if kind is Kind.PLAIN:
            if op == Opcode.REPORT_LUNS:
                return self._report_luns(b, nexus, cdb)
            return Forward(kind, cdb, data_out, data_in_len)
        if kind is Kind.PR_OUT:
            refusal = self.filter.refuse_pr_out(cdb, data_out)
            if refusal is not None:
                self.log.info(
                    "refused PR OUT from %s with SPEC_I_PT/ALL_TG_PT (migrate-pr on)",
                    nexus.initiator,
                )
                return Result(_CHECK, b"", refusal.encode())
            c, data = bytes(cdb), bytes(data_out)
            try:
                intent = self.begin(b.key, c, data)
            except DeviceError:  # fail closed: what cannot be journaled is not done
                return Result(_CHECK, b"", encode_sense(Sense.INSUFFICIENT_REGISTRATION_RESOURCES))
            key, guest = b.key, nexus.initiator
            return Forward(kind, c, data, 0, intent, back=lambda r: self.pr_out_back(key, guest, c, data, intent, r))
        return self._watched(kind, b, nexus, cdb, data_out, data_in_len)

    def _watched(self, kind: Kind, b: Backend, nexus: Nexus, cdb: bytes, data_out: Any, data_in_len: int) -> Forward:
        """RESERVE / RELEASE: the answer tells which frontend holds the
        SCSI-2 reservation (``scsi2_answered``). PR IN: the PRgeneration in
        the answer is watched once one is known (``generation_seen``), and
        REPORT CAPABILITIES is masked with migrate-pr on (``mask_pr_in``)."""
        c = bytes(cdb)
        if kind is Kind.SCSI2:
            return Forward(kind, cdb, data_out, data_in_len, seen=lambda r: self.scsi2_answered(b, nexus, c, r))
        seen = None if self.snooper.state.generation is None else (lambda r: self.generation_seen(b, c, r))
        mapped = (lambda r: self.mask_pr_in(c, r)) if self.masks_pr_in(c) else None
        return Forward(kind, cdb, data_out, data_in_len, seen=seen, mapped=mapped)

    def _report_luns(self, b: Backend, nexus: Nexus, cdb: bytes) -> Result:
        """SPC-5 6.33, answered by the device: the guest's one LUN."""
        if len(cdb) < 12:
            return _invalid_cdb(0)  # as the LU answers a short CDB (CdbTooShort)
        select, alloc = cdb[2], int.from_bytes(cdb[6:10], "big")
        if select not in (0x00, 0x01, 0x02):
            return _invalid_cdb(2)
        if alloc < 16:
            return _invalid_cdb(6)
        if b.owed_uas and b.owed_uas[0][12:14] == b"\x3f\x0e":
            self.fan_out(b, nexus, b.owed_uas.pop(0))
        if b.uas:
            b.discard_ua(nexus, 0x3F, 0x0E)
        luns = [] if select == 0x01 else sorted(set(self.report_luns()))
        body = b"".join(
            bytes((0, lun, 0, 0, 0, 0, 0, 0))
            if lun < 256
            else bytes((0x40 | (lun >> 8) & 0x3F, lun & 0xFF, 0, 0, 0, 0, 0, 0))
            for lun in luns
        )
        return Result(_GOOD, (len(body).to_bytes(4, "big") + bytes(4) + body)[:alloc])

    def _scsi2_refused(self, b: Backend, nexus: Nexus, op: int, verdict: Verdict) -> Result:
        """A frontend that does not hold the SCSI-2 reservation another
        frontend of its backend nexus holds: answered here (SPC-2 5.5.1)."""
        holder = b.holder.initiator_port if b.holder is not None else "?"
        name = Opcode(op).name if op in Opcode._value2member_map_ else f"opcode 0x{op:02x}"
        if verdict is Verdict.GOOD:
            self.log.info(
                "%s from %s: GOOD without effect, %s holds the SCSI-2 reservation",
                name, nexus.initiator_port, holder,
            )
            return Result(_GOOD)
        self.log.info(
            "%s from %s: RESERVATION CONFLICT, %s holds the SCSI-2 reservation",
            name, nexus.initiator_port, holder,
        )
        return Result(Status.RESERVATION_CONFLICT)

    # ---------------------------------------------------- backend answers
    def scsi2_answered(self, b: Backend, nexus: Nexus, cdb: bytes, r: Result) -> None:
        """RESERVE / RELEASE answered: which frontend holds it now."""
        held = b.holder is not None
        note = b.observe(nexus, cdb, r, registered=b.key in self.snooper.state.guests)
        if note is not None:
            self.log.info("SCSI-2 reservation on the backend nexus of %s: %s", b.key, note)
        if held and b.holder is None and self.snooper.state.unverified:
            # a verification the reservation refused (every PR IN conflicts
            # with it, SPC-5 5.14.3) can run now
            self.want_verify("SCSI-2 reservation released")

    def masks_pr_in(self, cdb: bytes) -> bool:
        """REPORT CAPABILITIES with migrate-pr on: SIP_C / ATP_C cleared."""
        return self.migrate_pr and len(cdb) >= 2 and (cdb[1] & 0x1F) == PrInAction.REPORT_CAPABILITIES

    def mask_pr_in(self, cdb: bytes, r: Result) -> Result:
        if r.status != _GOOD:
            return r
        return Result(r.status, self.filter.mask_pr_in(cdb, r.data_in), r.sense)

    def generation_seen(self, b: Backend, cdb: bytes, result: Result) -> None:
        """A guest's PR IN carries the PRgeneration: a change nobody here
        made starts a reconciliation (snoop.py, _observe_pr_in)."""
        outcome = self.snooper.observe(b.key, cdb, b"", result)
        if outcome.verify:
            self.log.info("guest %s PR IN: %s: verifying PR state", b.key, outcome.note)
            self.want_verify("PRgeneration changed")

    def pr_out_answered(
        self, guest: str, cdb: bytes, data: bytes, result: Result, intent: Intent | None
    ) -> bool:
        """Feed one PR OUT answer to the snooper; journal; True: verify now."""
        # a SCSI-2 reservation one of the device's nexuses holds explains a
        # conflict (one taken by another host is not known here: verified)
        scsi2 = any(x.holder is not None for x in self._backends.values())
        outcome = self.snooper.observe(guest, cdb, data, result, scsi2_held=scsi2)
        action = outcome.action.name if outcome.action is not None else "PR OUT"
        if (
            self._crash_after is not None
            and result.status == _GOOD
            and self._crash_after in (action, "ANY")
        ):
            # test hook: die between the backend's GOOD and the journal write
            self.log.warning("%s: killing the process after GOOD to %s", CRASH_ENV, action)
            os.kill(os.getpid(), signal.SIGKILL)
        self.log.info(
            "guest %s %s -> %s%s",
            outcome.guest or guest,
            action,
            self.describe_result(result),
            f" ({outcome.note})" if outcome.note else "",
        )
        self.report(outcome.changes)
        self.commit(intent, self.snooper.state if outcome.changed else None)
        return outcome.verify

    def pr_out_lost(self, key: str, intent: Intent | None) -> None:
        """A PR OUT got no answer (transport failure): its effect is unknown."""
        self.commit(intent, None)
        self.snooper.state.mark_unverified(key)
        self.want_verify()

    def pr_out_back(
        self, key: str, guest: str, cdb: bytes, data: bytes, intent: Intent | None,
        r: Result | BaseException | None,
    ) -> str | None:
        """The one way back for a PR OUT, a guest's or the device's own:
        snooped and journaled (``pr_out_answered``) or, with no answer, its
        effect in doubt (``pr_out_lost``). Returns the reason of the
        verification its outcome asks for, run before the answer is given."""
        if not isinstance(r, Result):
            self.pr_out_lost(key, intent)
        elif self.pr_out_answered(guest, cdb, data, r, intent):
            sa = cdb[1] & 0x1F if len(cdb) > 1 else -1
            return f"after {PrOutAction(sa).name}" if sa in PrOutAction._value2member_map_ else "after a PR OUT"
        return None

    def own_pr_out(self, guest: str, cdb: bytes, data: bytes, purpose: Purpose) -> OwnPrOut:
        """A PR OUT of the device's own on ``guest``'s backend nexus (the
        backend PR OUT port), journaled first when ``OWN_COMMANDS[purpose]``
        tracks it (DeviceError, and nothing sent, when it cannot be)."""
        rule = OWN_COMMANDS[purpose]
        key = self._backend(guest).key
        intent = self.begin(key, cdb, data) if rule.tracked else None
        return OwnPrOut(key, guest, cdb, data, intent, UaRetry(purpose), rule.tracked)

    def own_pr_out_done(self, op: OwnPrOut, r: Result | BaseException | None, answered: bool = True) -> str | None:
        """``op`` answered (``r``: the answer, or the transport's error;
        ``answered`` False: abandoned): the unit attentions it met are owed
        as its purpose says; a tracked one goes the way back of a guest's
        (``pr_out_back``). Returns the reason of the verification it asks for."""
        self.owe(op.key, op.retry.owed)
        if not (op.tracked and answered):
            return None
        return self.pr_out_back(op.key, op.guest, op.cdb, op.data, op.intent, r)

    def report(self, changes: tuple[StateChange, ...]) -> None:
        for c in changes:
            self.log.info("PR state %s", c.describe())
        if changes and self.on_state_change is not None:
            try:
                self.on_state_change(self, changes)
            except Exception:
                self.log.exception("state change listener failed")

    # ------------------------------------------------------------ journal
    def begin(self, key: str, cdb: bytes, data: bytes) -> Intent | None:
        """The PR OUT's intent, journaled before it is forwarded (None: no
        journal). DeviceError when it cannot be written: fail closed, the
        PR OUT is not forwarded."""
        if self.journal is None:
            return None
        try:
            return self.journal.begin(key, cdb, data)
        except JournalError as exc:
            self.log.error("journal: cannot record PR OUT intent, not forwarded: %s", exc)
            raise DeviceError(f"cannot journal the PR OUT: {exc}") from exc

    def commit(self, intent: Intent | None, state: DevicePrState | None) -> None:
        if self.journal is None:
            return
        try:
            if intent is not None:
                self.journal.commit(intent, state)
            elif state is not None:
                self.journal.save(state)
        except JournalError as exc:
            self.log.error("journal: cannot write PR state: %s", exc)

    def save(self) -> None:
        self.commit(None, self.snooper.state)

    def load_journal(self) -> None:
        """At start: the journal's state, every guest of it in doubt (others
        may have changed it while the daemon was down, or a PR OUT was in
        flight at the crash)."""
        if self.journal is None:
            return
        if self.snooper.state.guests:  # a given state: journaled at once
            self.save()
            return
        try:
            record = self.journal.load()
        except JournalError as exc:
            self.log.error("journal unreadable, starting empty: %s", exc)
            return
        if record is None:
            return
        self.snooper.state = record.state.copy()
        for guest in record.state.guests:
            self._note_port(guest)
        self.log.info("journal seq %d: %s", record.seq, self.describe_state() or "no PR state")
        if record.needs_reconcile:
            self.log.warning(
                "%d PR OUT(s) were in flight at the last stop: reconciling", len(record.intents)
            )
        for guest in record.state.guests:
            self.snooper.state.mark_unverified(guest)
        for intent in record.intents:
            self.snooper.state.mark_unverified(intent.guest)

    def adopt_identity(self, seen: DeviceIdentity) -> None:
        """The backend LUN's identity as read at start: a migrated device
        must front the same LUN on both hosts."""
        if self.identity is None:
            self.identity = seen
        elif not self.identity.same_lun(seen):
            raise DeviceError(
                f"backend {self.config.backend_url} is not the device's LUN: "
                + "; ".join(self.identity.differences(seen, ("serial", "naa_id")))
            )

    @property
    def start_verify(self) -> str | None:
        """The verification ``start`` must do, if any: one that must
        succeed (journal state in doubt), or one whose failure is logged."""
        if self.snooper.state.unverified or (self.journal is not None and self.journal.pending_intents):
            return "start (journal)"
        return None if self._given_state else "start"

    # ------------------------------------------------------ unit attentions
    def shared_answered(self, b: Backend, nexus: Nexus | None, r: Result) -> None:
        """``nexus`` shares ``b`` with other frontends: a unit attention in
        the backend's answer to it was theirs too (``frontends.py``)."""
        if unit_attention(r) is not None:
            self.fan_out(b, nexus, bytes(r.sense))

    def fan_out(self, b: Backend, receiver: Nexus | None, sense: bytes) -> None:
        """``sense`` (a UA of the backend nexus) went to ``receiver`` (None:
        to no frontend): queue it for the other frontends of ``b``."""
        n = b.establish(sense, receiver)
        if n:
            t = sense_triple(sense)
            self.log.info(
                "unit attention %s of %s's backend nexus %s: queued for %d other frontend nexus(es)",
                f"{t[1]:02X}/{t[2]:02X}" if t is not None else "?",
                b.key,
                f"reported to {receiver.initiator_port}" if receiver is not None else "reported to none",
                n,
            )

    def async_unit_attention(self, b: Backend, sense: Any) -> None:
        """A unit attention the backend reported asynchronously reached no
        frontend: every frontend of ``b`` gets it on its next command."""
        if sense is not None and sense.key == SenseKey.UNIT_ATTENTION:
            self.fan_out(b, None, ua_sense((sense.asc, sense.ascq)))

    def unit_attention_met(self, b: Backend, asc: int, ascq: int) -> None:
        """A backend answer on ``b`` carried a unit attention (already
        forwarded to whoever asked): doubt the state, verify soon; a reset
        or nexus loss also ended any SCSI-2 reservation there."""
        if b.holder is not None and drops_scsi2(asc, ascq):
            holder = b.drop_reservation()
            self.log.info(
                "unit attention %02X/%02X on %s: SCSI-2 reservation of %s gone",
                asc, ascq, b.key, holder.initiator_port if holder else "?",
            )
        if puts_state_in_doubt((asc, ascq)):
            self.log.info("unit attention %02X/%02X on %s: verifying PR state", asc, ascq, b.key)
            self.snooper.state.mark_unverified(b.key)
            self.want_verify(f"unit attention {asc:02X}/{ascq:02X}")

    def owe_all(self, b: Backend, senses: list[bytes]) -> None:
        """Unit attentions the device met on ``b`` with a command that
        reached no frontend (the RELEASE of a departed SCSI-2 holder):
        every frontend of ``b`` gets them on its next command."""
        for sense in senses:
            self.fan_out(b, None, sense)

    def owe(self, key: str, senses: list[bytes]) -> None:
        """Unit attentions the device met on ``key``'s nexus with a command
        of its own and owes the guest (``UaRetry.owed``): reported to the
        guest's next command, then queued for its other frontends."""
        self._backend(key).owed_uas.extend(senses)

    # ------------------------------------------------------ verification
    @property
    def verify_method(self) -> str | None:
        """How the backend is read back: READ FULL STATUS, or the READ KEYS
        + READ RESERVATION fallback; None until the first reconciliation."""
        return self.verification.method

    @property
    def verify_retry_at(self) -> float | None:
        """When the retry after a failed verification is due (the shell's
        loop time; None: none armed)."""
        return self.schedule.retry_at

    @property
    def last_verified(self) -> float | None:
        return self.verification.last_verified

    @property
    def last_verify_error(self) -> str | None:
        return self.verification.last_error

    @property
    def verify_unknown(self) -> tuple[str, ...]:
        return self.verification.unknown

    def note_ports(self) -> None:
        """Before a verification: every tracked or doubted key's nexus known."""
        for key in list(self.snooper.state.guests) + list(self.snooper.state.unverified):
            if key not in self.snooper.transport_ids:
                self._note_port(key)

    def verified(
        self, reason: str, how: str, changes: tuple[StateChange, ...], before: dict[str, Any]
    ) -> None:
        """A verification read and applied the backend's state (``before``:
        the tracked state it started from): report, journal, tell."""
        for u in self.verification.unknown:
            self.log.debug("verification left open: %s", u)
        if changes:
            self.log.info("verified by %s (%s): %d change(s)", how, reason, len(changes))
            self.report(changes)
        if changes or self.snooper.state.to_dict() != before:
            self.save()
        self.schedule.succeeded()  # a retry armed after a failure is not due any more
        self._reconciled(reason, how, changes, list(self.verification.unknown), None)

    def verify_failed(self, reason: str, exc: BaseException, unreachable: bool) -> DeviceError:
        """A verification could not read or use the backend's state: the
        error to raise (``last_verify_error`` says why)."""
        text = failure_text(exc, unreachable)
        self.verification.failed(text)
        self._reconciled(reason, None, (), [], text)
        return DeviceError(text)

    def _reconciled(
        self, reason: str, method: str | None, changes: tuple[StateChange, ...],
        unknown: list[str], error: str | None,
    ) -> None:
        if self.on_reconcile is None:
            return
        info: dict[str, Any] = {
            "reason": reason,
            "method": method,
            "changes": [c.describe() for c in changes],
            "unknown": unknown,
        }
        if error is not None:
            info["error"] = error
        try:
            self.on_reconcile(self, info)
        except Exception:
            self.log.exception("reconcile listener failed")

    # ------------------------------------------------------ migration hooks
    @property
    def held(self) -> bool:
        return self._held is not None

    def hold(self) -> None:
        """Stop forwarding: guest commands from now on are queued."""
        if self._held is None:
            self._held = []
            self.log.info("holding guest commands")

    def hold_back(self, h: Held) -> Any:
        """While held: ``h`` waits in the queue, in arrival order, for
        ``release_held`` (rollback) or ``discard_held`` (moved). Returns its
        token (the shell's handle of the guest's answer)."""
        if self._held is None:
            raise DeviceError(f"device {self.name}: not held")
        self._held.append(h)
        return h.token

    def take_held(self) -> list[Held]:
        """Rollback: the queued commands, in arrival order; not held any more."""
        held, self._held = self._held, None
        if held is not None:
            self.log.info("resuming; forwarding %d held command(s)", len(held))
        return held or []

    def resume(self) -> list[Held]:
        """Rollback: the queued commands whose frontend nexus is still there
        (the others have nobody to answer), in arrival order."""
        out = []
        for h in self.take_held():
            b = self._backends.get(self.backend_key(h.nexus))
            if b is not None and h.nexus in b.frontends:
                out.append(h)
        return out

    def discard_held(self) -> int:
        """After a move: drop the queued commands unanswered (the guest
        re-issues them on the destination). The device stays held."""
        held = self._held or []
        if self._held is not None:
            self._held = []
        self.log.info("discarding %d held command(s)", len(held))
        return len(held)

    def snapshot(self) -> DeviceSnapshot:
        """What the migration stream carries for this device: config,
        identity, the tracked PR state, and per guest the unit attentions
        the device took on its nexus and still owes it, then those still
        queued for one of its frontend nexuses (each once)."""
        if self.identity is None:
            raise DeviceError(f"device {self.name}: identity not captured yet")
        return DeviceSnapshot.build(
            self.config,
            self.identity,
            self.snooper.state,
            {b.key: owed(b) for b in self._backends.values() if b.owed_uas or b.uas},
        )

    def restore(
        self,
        state: DevicePrState,
        identity: DeviceIdentity | None = None,
        pending_uas: dict[str, list[Any]] | None = None,
    ) -> None:
        """Adopt a migrated state (and identity, and UAs owed to guests:
        (key, ASC, ASCQ) or (ASC, ASCQ) tuples, ``Sense`` members or sense
        bytes), journaled at once."""
        self.snooper.state = state.copy()
        for guest in state.guests:
            self._note_port(guest)
        if identity is not None:
            self.identity = identity
        for key, uas in (pending_uas or {}).items():
            self._backend(key).owed_uas.extend(ua_sense(u) for u in uas)
        self.save()
        self.log.info("restored PR state: %s", self.describe_state() or "none")

    def describe_state(self) -> str:
        return "; ".join(
            f"{g}: {describe_guest(s)}" for g, s in sorted(self.snooper.state.guests.items())
        )


def owed(b: Backend) -> list[tuple[int, int, int]]:
    """What a snapshot owes the guest of ``b``: the UAs owed to the guest,
    then each one still queued for one of its frontend nexuses (once)."""
    out = [t for t in (sense_triple(u) for u in b.owed_uas) if t is not None]
    for u in b.pending_uas():
        t = sense_triple(u)
        if t is not None and t not in out:
            out.append(t)
    return out


def ua_sense(ua: Any) -> bytes:
    """Fixed-format sense for a unit attention given in any of the forms
    ``restore`` accepts."""
    if isinstance(ua, bytes | bytearray):
        return bytes(ua)
    value = getattr(ua, "value", ua)
    asc, ascq = int(value[-2]), int(value[-1])
    known = Sense.lookup(SenseKey.UNIT_ATTENTION, asc, ascq)
    if known is not None:
        return encode_sense(known)
    raw = bytearray(encode_sense(Sense.POWER_ON_RESET))
    raw[12], raw[13] = asc, ascq
    return bytes(raw)


def _invalid_cdb(byte: int) -> Result:
    return Result(_CHECK, b"", invalid_cdb(byte).encode())


__all__ = [
    "CRASH_ENV",
    "MONITOR",
    "SPECIAL",
    "UA_RETRIES",
    "Backend",
    "DeviceCore",
    "DeviceError",
    "Forward",
    "Held",
    "Kind",
    "OWN_COMMANDS",
    "OwnCommand",
    "OwnPrOut",
    "Purpose",
    "UaRetry",
    "owed",
    "ua_sense",
]
