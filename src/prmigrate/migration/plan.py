"""The takeover plan: which PR OUT commands, from which nexus, in which phase.

A pure function of the migrated ``DevicePrState``, of what the destination
registered during setup, of what it observed on the target (PR IN), and of the
target's known traits. The shell turns each ``PrOp`` into a CDB and parameter
list (``PrOp.cdb()`` / ``PrOp.params()``, via ``scsi/pr.py``) and sends it on the
named side's per-guest backend nexus, in order, stopping at the first failure.

Phases (SPC-5 5.14.11; QEMU's sequence: docs/design.md)
-------------------------------------------------------
SETUP (destination, outside the pause)
    REGISTER AND IGNORE EXISTING KEY, SARK = key, on each guest's destination
    nexus. RAIEK rather than QEMU's REGISTER RK=0: it also succeeds when a
    previous, failed attempt left the nexus registered. A key the target no
    longer shows (observed READ KEYS / READ FULL STATUS) is NOT registered: the
    guest was fenced (preempted by another node) and registering its key again
    would undo the fence.

RELEASE (source, inside the pause, before STATE is sent)
    For a register-only guest, and for an all-registrants holder whose key the
    destination already registered in setup, the source drops its own
    registration: REGISTER RK = key, SARK = 0 from the source nexus while the
    guest is held (as REGISTER AND IGNORE EXISTING KEY with SARK = 0, the
    idempotent form of REGISTER RK = key SARK = 0: GOOD also when the
    registration is already gone). Chosen over a destination PREEMPT (SARK = key, type WE)
    because (a) it touches exactly one registration and never the reservation
    (SPC-5 5.14.11.2.2: unregistering a non-holder has no other effect; an AR
    reservation lives on through the destination's registration); (b) a
    PREEMPT with SARK = key where another guest of the device holds the
    reservation with that same key would preempt *the reservation*; (c) it
    avoids both target quirks (TYPE=0 rejected; own registration dropped when
    no reservation exists) and costs one round trip either way. The destination
    PREEMPT variant is kept as ``register_only="preempt"`` for comparison, and
    is used for a holder that the destination's PR IN shows is no longer a
    holder (the source, planning without observing, did not release it).

TAKEOVER (destination, inside the pause)
    Keys that changed since setup are (re)registered first (RAIEK). Then, for
    the holder of a WE / EA / RO reservation, ONE PERSISTENT RESERVE OUT
    PREEMPT with RK = SARK = key and the same type and scope: it removes every
    other registration with that key (the source's) and gives the reservation
    to the caller atomically (SPC-5 5.14.11.4.3); the reservation is never
    absent. Guests that unregistered since setup are unregistered (RAIEK SARK=0).

FIXUP (destination, inside the pause, after the PREEMPT)
    - other guests of the device whose key equals the preempted key lost their
      destination registration too: register them again;
    - when no reservation is known to exist and the target may drop the
      preempting nexus's own registration (LIO), register it again;
    - all-registrants: PREEMPT with a non-zero SARK removes only the matching
      registrations and keeps the reservation (SPC-5 5.14.11.4.4), so an AR
      guest that had to be registered inside the pause is moved that way.

ROLLBACK (source, guest still held) and CLEANUP (destination)
    See ``rollback_plan`` / ``cleanup_plan``: the source re-registers what it
    released and, if the destination may have preempted, takes the reservation
    back with a PREEMPT from its own nexus before the destination unregisters,
    so that the reservation is never absent on that path either.

MOVE (source, inside the pause, before STATE) instead of TAKEOVER's PREEMPT
    When the holder's key is also registered by a nexus outside the device
    (another host sharing the key), a PREEMPT would remove that registration
    too. The source then hands the reservation to the destination's nexus
    with ONE PERSISTENT RESERVE OUT REGISTER AND MOVE from its own nexus
    (SPC-5 5.14.8; parameter list SPC-5 6.17.4): RK = SARK = key, the
    destination nexus's TransportID (format 01b) and the relative target
    port it reaches the LUN through (both sent in SETUP_OK), UNREG = 1 (the
    source's registration goes in the same command: nothing of the source
    is left, and nothing is left to clean up after the commit point). The
    other host's registration is untouched. ``MOVE_CASES`` says which case
    gets which plan, ``MOVE_REFUSALS`` how the plan keeps clear of each
    condition under which the target refuses REGISTER AND MOVE.
    Rollback (``give_back_plan``, ``rollback_plan(moved=...)``): the
    destination, then the holder, moves the reservation back with REGISTER
    AND MOVE to the source nexus (UNREG = 1: its own registration goes with
    it) before it tells the source it aborted; the source registers again and
    RESERVEs (GOOD when it holds again; RESERVATION CONFLICT while the
    destination still holds, so the guest stays held): never a PREEMPT,
    which would fence the other host.

``qemu_plan`` is QEMU 11's sequence (REGISTER RK=0 + PREEMPT, both inside the
pause, type 0 passed through) for the benchmark.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from ..device.state import DevicePrState, GuestPrState
from ..scsi.constants import PrOutAction, PrType
from ..scsi.transport_id import TransportId
from ..scsi.vocabulary import words
from .errors import PlanError

RAIEK = PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY


class Strategy(StrEnum):
    """How the reservation moves; carried by SETUP so both sides agree."""

    PRMIGRATE = "prmigrate"  # setup registration, one PREEMPT, the source releases the rest
    DEST_PREEMPT = "dest-preempt"  # same, but the destination PREEMPTs register-only guests (WE)
    QEMU = "qemu"  # QEMU 11: REGISTER + PREEMPT, both inside the pause (benchmark baseline)

    @property
    def register_only(self) -> str:
        return "preempt" if self is Strategy.DEST_PREEMPT else "release"


class Side(Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class Phase(Enum):
    SETUP = "setup"
    RELEASE = "release"
    TAKEOVER = "takeover"
    FIXUP = "fixup"
    ROLLBACK = "rollback"
    CLEANUP = "cleanup"


@dataclass(frozen=True, slots=True)
class MovePort:
    """An I_T nexus as REGISTER AND MOVE names it (SPC-5 6.17.4): the
    initiator port's TransportID (format 01b: name + ISID) and the RELATIVE
    TARGET PORT IDENTIFIER of the target port."""

    transport_id: TransportId
    rel_tgt_port: int

    def to_wire(self) -> list[object]:
        return [str(self.transport_id), self.rel_tgt_port]

    @staticmethod
    def from_wire(v: object) -> MovePort:
        """From ``[\"name,i,0x<isid>\", port]``; ValueError when malformed."""
        if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                and isinstance(v[1], int) and not isinstance(v[1], bool) and 0 < v[1] <= 0xFFFF):
            raise ValueError(f"bad move port {v!r}")
        name, sep, isid = v[0].rpartition(",i,0x")
        if not sep or len(isid) != 12:
            raise ValueError(f"bad TransportID {v[0]!r}")
        try:
            return MovePort(TransportId(name, int(isid, 16)), v[1])
        except Exception as e:  # PrDecodeError, ValueError
            raise ValueError(f"bad TransportID {v[0]!r}: {e}") from None

    def __str__(self) -> str:
        return f"{self.transport_id} via port {self.rel_tgt_port}"


@dataclass(frozen=True, slots=True)
class PrOp:
    """One PERSISTENT RESERVE OUT on one side's nexus for one guest."""

    side: Side
    guest: str
    action: PrOutAction
    rk: int = 0
    sark: int = 0
    rtype: PrType = PrType.NONE
    scope: int = 0
    inside_pause: bool = False
    aptpl: bool = False
    phase: Phase = Phase.SETUP
    why: str = ""
    # RESERVATION CONFLICT means "nothing to do" for this op: the shell counts
    # it as completed and goes on (e.g. the rollback PREEMPT when the
    # destination's registrations are already gone).
    conflict_ok: bool = False
    # REGISTER AND MOVE: the I_T nexus the reservation goes to, and UNREG
    move_to: MovePort | None = None
    unreg: bool = False
    # a probe: RESERVATION CONFLICT is the answer SPC-5 requires (success);
    # anything else, GOOD included, fails the op
    probe: bool = False

    def cdb(self) -> bytes:
        from ..scsi.pr import pr_out_cdb

        return pr_out_cdb(self.action, self.rtype, self.scope, len(self.params()))

    def params(self) -> bytes:
        from ..scsi.pr import pr_out_params, register_and_move_params

        if self.move_to is not None:
            return register_and_move_params(self.rk, self.sark, self.move_to.transport_id,
                                            self.move_to.rel_tgt_port, unreg=self.unreg, aptpl=self.aptpl)
        return pr_out_params(self.rk, self.sark, aptpl=self.aptpl)

    def __str__(self) -> str:
        t = f" type={words(self.rtype)!r}" if self.rtype else ""
        to = f" to {self.move_to}{' unreg' if self.unreg else ''}" if self.move_to is not None else ""
        return f"{self.side.value}[{self.guest}] {self.action.name} rk={self.rk:#x} sark={self.sark:#x}{t}{to} ({self.phase.value}: {self.why})"


@dataclass(frozen=True, slots=True)
class TargetTraits:
    """What the shell knows about the backend target (defaults: assume the worst)."""

    read_full_status: bool = False
    preempt_rejects_type_zero: bool = True  # LIO
    preempt_drops_own_registration: bool = True  # LIO, when no reservation exists
    # PR OUT REGISTER AND MOVE supported (REPORT SUPPORTED OPERATION CODES, 5Fh/07h)
    register_and_move: bool = False


@dataclass(frozen=True, slots=True)
class Observed:
    """The target's PR state as the destination read it (PR IN).

    ``keys``: READ KEYS. ``reservation_key``: READ RESERVATION key (None = no
    reservation; 0 for all-registrants types). ``source_keys``: with READ FULL
    STATUS, the key registered on each guest's source nexus (None without RFS).
    """

    keys: frozenset[int] = frozenset()
    reservation_key: int | None = None
    reservation_type: PrType = PrType.NONE
    source_keys: Mapping[str, int] | None = None
    # key -> the nexuses outside the device (neither a guest's source nor
    # its destination nexus) registered with it; READ FULL STATUS only
    foreign: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    @staticmethod
    def from_pr_in(read_keys: object, read_reservation: object, source_keys: Mapping[str, int] | None = None) -> Observed:
        """From ``scsi.pr.ReadKeys`` / ``ReadReservation`` replies."""
        rtype = getattr(read_reservation, "rtype", PrType.NONE)
        return Observed(
            frozenset(getattr(read_keys, "keys", ())),
            getattr(read_reservation, "key", None),
            PrType(rtype) if int(rtype) in PrType._value2member_map_ else PrType.NONE,
            None if source_keys is None else {k.lower(): v for k, v in source_keys.items()},
        )

    def registered(self, guest: str, key: int) -> bool:
        if self.source_keys is not None:
            return self.source_keys.get(guest) == key
        return key in self.keys

    def holds(self, g: GuestPrState) -> bool:
        """Does the target agree that ``g`` holds the reservation?"""
        if self.reservation_key is None or not self.reservation_type:
            return False
        if g.rtype.all_registrants:
            return self.reservation_type == g.rtype and g.key in self.keys
        return self.reservation_key == g.key


@dataclass(frozen=True, slots=True)
class SetupPlan:
    ops: tuple[PrOp, ...]
    skipped: tuple[str, ...] = ()  # guests whose key the target no longer shows
    notes: tuple[str, ...] = ()

    fenced: Mapping[str, int] = field(default_factory=dict)  # skipped guest -> its key
    # holders the source moves with REGISTER AND MOVE (their key is shared
    # outside the device): guest -> the destination nexus it moves to
    move: Mapping[str, MovePort] = field(default_factory=dict)

    @property
    def registered(self) -> dict[str, int]:
        return {op.guest: op.sark for op in self.ops if op.action is RAIEK}


@dataclass(frozen=True, slots=True)
class TakeoverPlan:
    release: tuple[PrOp, ...] = ()  # source, inside the pause, before STATE
    takeover: tuple[PrOp, ...] = ()  # destination, inside the pause
    fixups: tuple[PrOp, ...] = ()  # destination, inside the pause, after takeover
    notes: tuple[str, ...] = ()
    effective: Mapping[str, GuestPrState] = field(default_factory=dict)  # after reconciling

    @property
    def destination_ops(self) -> tuple[PrOp, ...]:
        return self.takeover + self.fixups

    @property
    def round_trips(self) -> int:
        """Backend PR round trips inside the guest pause (both sides)."""
        return len(self.release) + len(self.takeover) + len(self.fixups)

    @property
    def preempts(self) -> bool:
        return any(op.action is PrOutAction.PREEMPT for op in self.takeover + self.fixups)


def _guests(pr: DevicePrState) -> list[tuple[str, GuestPrState]]:
    return sorted((name, g) for name, g in pr.guests.items() if g.registered)


def check_state(pr: DevicePrState) -> None:
    """SPC-5 5.14.9-10: holders are registered; one holder or all-registrants."""
    holders = [g for g in pr.guests.values() if g.holder]
    for g in holders:
        if not g.registered or g.rtype not in _VALID:
            raise PlanError(f"holder without key or type: {g}")
    if len({g.rtype for g in holders}) > 1 or (len(holders) > 1 and not holders[0].rtype.all_registrants):
        raise PlanError(f"more than one holder of a {words(holders[0].rtype)} reservation")


_VALID = frozenset(t for t in PrType if t is not PrType.NONE)


def _refuse_collateral(observed: Observed | None, name: str, key: int, what: str) -> None:
    """A PREEMPT with SARK = ``key`` removes every registration with that
    key (SPC-5 5.14.11.4.3 and .4), other hosts' too: one that is not the
    device's would be fenced by the move. Refused (PlanError) when the
    target shows one."""
    shared = observed.foreign.get(key, ()) if observed is not None else ()
    if shared:
        raise PlanError(
            f"{name}: key {key:#x} is also registered by {', '.join(shared)}, outside the device;"
            f" {what} would remove {'that registration' if len(shared) == 1 else 'those registrations'}:"
            " not moved"
        )


class Move(Enum):
    """How one registered guest's state reaches the destination."""

    RELEASE = "the destination registers in setup, the source unregisters in the pause"
    PREEMPT = "the destination registers in setup, then PREEMPTs RK = SARK = key in the pause"
    REGISTER_AND_MOVE = "the destination registers in setup, the source REGISTER AND MOVEs to it in the pause"
    REFUSED = "not moved"


class Holding(Enum):
    NONE = "register-only"
    SINGLE = "holder of WE, EA, WE RO or EA RO (types 1, 3, 5, 6)"
    ALL_REGISTRANTS = "holder of WE AR or EA AR (types 7, 8)"


# (what the guest holds, key shared by a nexus outside the device) -> plan.
# A shared key with a single holder also needs the backend's REGISTER AND
# MOVE and the destination's nexus as it names it (SETUP_OK); without them
# the move is refused, as it is for the rows that say REFUSED.
MOVE_CASES: dict[tuple[Holding, bool], tuple[Move, str]] = {
    (Holding.NONE, False): (Move.RELEASE, "SPC-5 5.14.11.2.2: unregistering a non-holder touches nothing else"),
    (Holding.NONE, True): (Move.RELEASE, "SPC-5 5.14.11.2.2: only the source nexus's registration goes; the other host's stays"),
    (Holding.ALL_REGISTRANTS, False): (Move.RELEASE, "SPC-5 5.14.11.2.2: an AR reservation lives on through the destination's registration"),
    (Holding.ALL_REGISTRANTS, True): (Move.RELEASE, "SPC-5 5.14.11.2.2 (as above); REGISTER AND MOVE is not allowed for AR types (SPC-5 5.14.8)"),
    (Holding.SINGLE, False): (Move.PREEMPT, "SPC-5 5.14.11.4.3: removes every other registration with the key (the source's) and moves the reservation atomically"),
    (Holding.SINGLE, True): (Move.REGISTER_AND_MOVE, "SPC-5 5.14.8: the holder moves the reservation to one named I_T nexus; no other registration changes"),
}

# Why a target refuses REGISTER AND MOVE (SPC-5 5.14.8, 6.17.4), and how the
# plan keeps clear of it (or refuses the move before the pause).
MOVE_REFUSALS: dict[str, tuple[str, str]] = {
    "issuing nexus not registered, or RK not its key": (
        "RESERVATION CONFLICT", "sent from the source nexus, the holder, with RK = the guest's key"),
    "issuing nexus not the holder": (
        "RESERVATION CONFLICT", "planned only for the holder; a holder that released meanwhile fails definitely and rolls back"),
    "an all-registrants reservation (types 7, 8)": (
        "RESERVATION CONFLICT", "never planned for them: they move by RELEASE"),
    "SARK = 0": ("ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST", "SARK = the guest's key, never 0"),
    "the TransportID names the issuing nexus": (
        "ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST",
        "refused in setup when the destination nexus is the source's (same initiator port)"),
    "no such relative target port": (
        "ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST",
        "the port the destination's nexus reaches the LUN through (VPD 83h); none known: refused in setup"),
    "service action not supported": (
        "ILLEGAL REQUEST, INVALID FIELD IN CDB",
        "asked in setup (REPORT SUPPORTED OPERATION CODES, 5Fh/07h), then tried from the destination's"
        " registered non-holder nexus (must answer RESERVATION CONFLICT): anything else refuses the move in setup"),
}


def _holding(g: GuestPrState) -> Holding:
    if not g.holder:
        return Holding.NONE
    return Holding.ALL_REGISTRANTS if g.rtype.all_registrants else Holding.SINGLE


def _shared(observed: Observed | None, key: int) -> tuple[str, ...]:
    return observed.foreign.get(key, ()) if observed is not None else ()


def setup_plan(
    pr: DevicePrState,
    observed: Observed | None = None,
    traits: TargetTraits | None = None,
    ports: Mapping[str, MovePort] | None = None,
    source_ports: Mapping[str, MovePort] | None = None,
) -> SetupPlan:
    """SETUP ops; PlanError (the migration is refused before the pause)
    when the takeover would have to PREEMPT a key another host shares and
    REGISTER AND MOVE cannot be used instead (``MOVE_CASES``): the backend
    lacks it (``traits``), or the destination's nexus for the guest
    (``ports``: guest -> its TransportID and relative target port) is not
    known or is the source's own (``source_ports``)."""
    check_state(pr)
    # what the takeover would move, as the target shows it now (a guest
    # fenced meanwhile, or no longer holding, is not preempted for)
    eff, _ = _reconcile(pr, observed, {})
    move: dict[str, MovePort] = {}
    for name, g in sorted(eff.items()):
        how, _clause = MOVE_CASES[(_holding(g), bool(_shared(observed, g.key)))]
        if how is not Move.REGISTER_AND_MOVE:
            continue
        why = _cannot_move(name, traits, ports, source_ports)
        if why:
            _refuse_collateral(observed, name, g.key, f"the takeover PREEMPT ({why})")
        move[name] = (ports or {})[name]
    ops, skipped, notes, fenced = [], [], [], {}
    for name, g in _guests(pr):
        if observed is not None and not observed.registered(name, g.key):
            skipped.append(name)
            fenced[name] = g.key
            notes.append(f"{name}: key {g.key:#x} not on the target (fenced?): not registered")
            continue
        ops.append(PrOp(Side.DESTINATION, name, RAIEK, 0, g.key, aptpl=g.aptpl, phase=Phase.SETUP, why="register the guest's key ahead of the pause"))
        if name in move:
            # Try REGISTER AND MOVE where SPC-5 5.14.8 requires RESERVATION
            # CONFLICT and nothing changes: from our registered nexus, which
            # does not hold, to the source's nexus (the holder: even a
            # target that wrongly let us move would change nothing). A
            # target that does not implement it (ILLEGAL REQUEST), or does
            # not follow SPC-5 here (tgt 1.0.85 answers GOOD and finds the
            # destination by SARK among existing registrations, which a
            # shared key makes ambiguous), fails the probe: the move is
            # refused before the pause.
            h = eff[name]
            ops.append(PrOp(Side.DESTINATION, name, PrOutAction.REGISTER_AND_MOVE, g.key, g.key, h.rtype, h.scope,
                            phase=Phase.SETUP, why="probe: REGISTER AND MOVE from a non-holder must conflict",
                            move_to=(source_ports or {})[name], probe=True))
    return SetupPlan(tuple(ops), tuple(skipped), tuple(notes), fenced, move)


def _cannot_move(name: str, traits: TargetTraits | None, ports: Mapping[str, MovePort] | None,
                 source_ports: Mapping[str, MovePort] | None) -> str:
    """Why REGISTER AND MOVE cannot be planned for ``name`` ("" if it can)."""
    if traits is None or not traits.register_and_move:
        return "the backend does not support REGISTER AND MOVE"
    port = (ports or {}).get(name)
    if port is None:
        return "the destination's nexus and target port are not known"
    src = (source_ports or {}).get(name)
    if src is None:
        return "the source's nexus is not known (a rollback moves the reservation back to it)"
    if src.transport_id.same_port(port.transport_id):
        return "the destination's nexus is the source's"
    return ""


def _reconcile(pr: DevicePrState, observed: Observed | None, fenced: Mapping[str, int]) -> tuple[dict[str, GuestPrState], list[str]]:
    """The state to move: the tracked state, corrected by what the target shows."""
    out: dict[str, GuestPrState] = {}
    notes: list[str] = []
    for name, g in _guests(pr):
        if fenced.get(name) == g.key:
            notes.append(f"{name}: key {g.key:#x} was fenced before setup: not moved")
            continue
        if observed is not None and not observed.registered(name, g.key):
            notes.append(f"{name}: key {g.key:#x} gone from the target: nothing to move")
            continue
        if g.holder and observed is not None and not observed.holds(g):
            notes.append(f"{name}: target shows no {words(g.rtype)} reservation for key {g.key:#x}: moved as a registration only")
            g = GuestPrState(g.key, g.aptpl)
        out[name] = g
    return out, notes


def takeover_plan(
    pr: DevicePrState,
    registered: Mapping[str, int] | None = None,
    observed: Observed | None = None,
    traits: TargetTraits = TargetTraits(),
    *,
    register_only: str = "release",
    fenced: Mapping[str, int] | None = None,
    move: Mapping[str, MovePort] | None = None,
) -> TakeoverPlan:
    """Ops inside the pause. ``registered``: what the destination's setup
    registered (guest -> key); ``register_only``: "release" (the source
    unregisters, the default) or "preempt" (the destination preempts, WE type).
    ``fenced``: guests (and keys) that setup found gone from the target
    (``SetupPlan.fenced``); they are not registered again unless the guest
    has since registered a different key. ``move``: holders the source
    moves with REGISTER AND MOVE (``SetupPlan.move``); the same argument on
    both sides gives the same plan."""
    if register_only not in ("release", "preempt"):
        raise ValueError(f"register_only must be 'release' or 'preempt', not {register_only!r}")
    check_state(pr)
    registered = {k.lower(): v for k, v in (registered or {}).items()}
    eff, notes = _reconcile(pr, observed, {k.lower(): v for k, v in (fenced or {}).items()})
    # A holder the target does not confirm: the source (which planned without
    # observing) kept its registration, so the destination removes it.
    demoted = {n for n, g in eff.items() if not g.holder and pr.get(n).holder}
    release: list[PrOp] = []
    register: list[PrOp] = []
    takeover: list[PrOp] = []
    fixups: list[PrOp] = []

    # Keys that changed, appeared or disappeared since setup.
    for name in sorted(registered):
        if name not in eff:
            register.append(PrOp(Side.DESTINATION, name, RAIEK, 0, 0, inside_pause=True, phase=Phase.TAKEOVER, why="guest unregistered since setup"))
    move = {k.lower(): v for k, v in (move or {}).items()}
    # The holder of a single-holder reservation whose key is shared outside
    # the device: REGISTER AND MOVE from the source (it also sets the
    # destination nexus's key to SARK, so no re-registration for it).
    moved = next(((n, g) for n, g in sorted(eff.items())
                  if g.holder and not g.rtype.all_registrants and n in move), None)
    if moved is not None:
        mname, m = moved
        release.append(PrOp(Side.SOURCE, mname, PrOutAction.REGISTER_AND_MOVE, m.key, m.key, m.rtype, m.scope,
                            True, m.aptpl, Phase.RELEASE, "move the reservation to the destination's nexus",
                            move_to=move[mname], unreg=True))
    for name, g in sorted(eff.items()):
        if moved is not None and name == moved[0]:
            continue
        if registered.get(name) != g.key:
            register.append(PrOp(Side.DESTINATION, name, RAIEK, 0, g.key, inside_pause=True, aptpl=g.aptpl, phase=Phase.TAKEOVER, why="key changed since setup"))

    # The holder of a single-holder reservation: one PREEMPT moves it.
    holder = next(((n, g) for n, g in sorted(eff.items()) if g.holder and not g.rtype.all_registrants), None)
    preempted_key = None
    if holder is not None and moved is None:
        hname, h = holder
        preempted_key = h.key
        _refuse_collateral(observed, hname, h.key, "the takeover PREEMPT")
        takeover.append(PrOp(Side.DESTINATION, hname, PrOutAction.PREEMPT, h.key, h.key, h.rtype, h.scope, True, h.aptpl, Phase.TAKEOVER, "move the reservation: RK = SARK = key"))
        for name, g in sorted(eff.items()):
            if name != hname and g.key == h.key:
                fixups.append(PrOp(Side.DESTINATION, name, RAIEK, 0, g.key, inside_pause=True, aptpl=g.aptpl, phase=Phase.FIXUP, why="same key: removed by the PREEMPT"))
        unverified = hname in getattr(pr, "unverified", ())
        if traits.preempt_drops_own_registration and observed is None and unverified:
            fixups.append(PrOp(Side.DESTINATION, hname, RAIEK, 0, h.key, inside_pause=True, aptpl=h.aptpl, phase=Phase.FIXUP, why="reservation not confirmed: target may drop the preempting nexus"))

    # Everyone else: drop the source's registration.
    for name, g in sorted(eff.items()):
        if g.key == preempted_key:
            continue  # the PREEMPT already removed the source's registration
        if moved is not None and name == moved[0]:
            continue  # UNREG: the REGISTER AND MOVE removed it
        on_dest_before_pause = registered.get(name) == g.key
        if g.holder and not on_dest_before_pause:
            # AR (SPC-5 5.14.11.4.4): non-zero SARK removes only the matching
            # registrations (the source's) and keeps the reservation, which the
            # destination shares as a registrant.
            _refuse_collateral(observed, name, g.key, "the PREEMPT of the source's registration")
            takeover.append(PrOp(Side.DESTINATION, name, PrOutAction.PREEMPT, g.key, g.key, g.rtype, g.scope, True, g.aptpl, Phase.TAKEOVER, "AR: remove the source's registration"))
            if traits.preempt_drops_own_registration:
                fixups.append(PrOp(Side.DESTINATION, name, RAIEK, 0, g.key, inside_pause=True, aptpl=g.aptpl, phase=Phase.FIXUP, why="target may drop the preempting nexus"))
        elif (register_only == "preempt" or name in demoted) and not g.holder and not any(o.holder and o.key == g.key for o in eff.values()):
            rtype = PrType.WRITE_EXCLUSIVE if traits.preempt_rejects_type_zero else PrType.NONE
            _refuse_collateral(observed, name, g.key, "the PREEMPT of the source's registration")
            takeover.append(PrOp(Side.DESTINATION, name, PrOutAction.PREEMPT, g.key, g.key, rtype, 0, True, g.aptpl, Phase.TAKEOVER, "register-only: remove the source's registration"))
            if traits.preempt_drops_own_registration:
                fixups.append(PrOp(Side.DESTINATION, name, RAIEK, 0, g.key, inside_pause=True, aptpl=g.aptpl, phase=Phase.FIXUP, why="target may drop the preempting nexus"))
        else:
            release.append(PrOp(Side.SOURCE, name, RAIEK, 0, 0, inside_pause=True, aptpl=g.aptpl, phase=Phase.RELEASE, why="drop the source's registration"))
    return TakeoverPlan(tuple(release), tuple(register + takeover), tuple(fixups), tuple(notes), eff)


def rollback_plan(
    pr: DevicePrState,
    *,
    preempted: bool | None,
    released: Iterable[str] = (),
    registered_on_dest: Mapping[str, int] | None = None,
    moved: Iterable[str] = (),
) -> tuple[PrOp, ...]:
    """Source ops that restore the source's registrations and reservation.

    ``moved``: holders the source may have moved with REGISTER AND MOVE
    (issued, whatever its outcome). For them no PREEMPT (the key is shared
    with another host, whose registration it would remove): the source
    registers again (its registration went with UNREG) and RESERVEs, GOOD
    once the destination moved the reservation back (``give_back_plan``),
    RESERVATION CONFLICT while the destination still holds it (the guest
    then stays held), and a new reservation if it vanished.

    ``preempted``: whether the destination's PREEMPT ran (None: unknown, e.g.
    the destination vanished; treated as True). ``released``: guests whose
    source registration the RELEASE phase removed. ``registered_on_dest``
    (setup) is accepted for the record; it does not narrow the plan. Every
    op is idempotent, so running this when nothing happened is harmless:
    RAIEK re-registers; PREEMPT RK = SARK = key from the source takes the
    reservation back and removes the destination's registrations of that key
    (the reservation is never absent); RESERVE with the same type is GOOD for
    the holder and re-creates the reservation if it vanished.
    """
    check_state(pr)
    guests = dict(_guests(pr))
    released = {r.lower() for r in released}
    ops: list[PrOp] = []

    def reg(name: str, g: GuestPrState, why: str) -> None:
        ops.append(PrOp(Side.SOURCE, name, RAIEK, 0, g.key, inside_pause=True, aptpl=g.aptpl, phase=Phase.ROLLBACK, why=why))

    holder = next(((n, g) for n, g in sorted(guests.items()) if g.holder and not g.rtype.all_registrants), None)
    took = preempted is not False
    moved = {m.lower() for m in moved}
    if holder is not None and holder[0] in moved:
        hname, h = holder
        reg(hname, h, "registered again (REGISTER AND MOVE's UNREG, or the destination's move back)")
        ops.append(PrOp(Side.SOURCE, hname, PrOutAction.RESERVE, h.key, 0, h.rtype, h.scope, True, False, Phase.ROLLBACK,
                        "the reservation is back with the source (CONFLICT while the destination holds it)"))
        done = {hname}
        for name, g in sorted(guests.items()):
            if name != hname and (name in released or took):
                reg(name, g, "undo the release")
                done.add(name)
    elif holder is not None and took:
        hname, h = holder
        reg(hname, h, "make sure the source nexus is registered")
        ops.append(PrOp(Side.SOURCE, hname, PrOutAction.PREEMPT, h.key, h.key, h.rtype, h.scope, True, h.aptpl, Phase.ROLLBACK, "take the reservation back", conflict_ok=True))
        for name, g in sorted(guests.items()):
            if g.key == h.key:
                reg(name, g, "registration removed by the PREEMPT (or the target's quirk)")
        ops.append(PrOp(Side.SOURCE, hname, PrOutAction.RESERVE, h.key, 0, h.rtype, h.scope, True, False, Phase.ROLLBACK, "re-create the reservation if it vanished"))
        done = {n for n, g in guests.items() if g.key == h.key}
    else:
        done = set()
    for name, g in sorted(guests.items()):
        if name in done:
            continue
        # Preempted (or unknown): a destination PREEMPT of any key may have
        # removed the source's registration; RAIEK is idempotent, so restore all.
        if name in released or took:
            reg(name, g, "undo the release")
            if g.holder:  # all-registrants: RESERVE is GOOD for a holder, re-creates otherwise
                ops.append(PrOp(Side.SOURCE, name, PrOutAction.RESERVE, g.key, 0, g.rtype, g.scope, True, False, Phase.ROLLBACK, "re-create the AR reservation if it vanished"))
    return tuple(ops)


def fence_ops(pr: DevicePrState, registered: Mapping[str, int] | None, preempted: bool | None,
              moved: Iterable[str] = ()) -> tuple[PrOp, ...]:
    """Source ops removing the keys a silent destination may have registered
    during setup (a dead process cannot unregister; a live one unregisters
    them itself on a lost channel, and then these ops find nothing to
    remove). ``registered``: what SETUP_OK reported, None/empty: unknown, so
    every key. For each: PREEMPT RK = SARK = key from the source nexus (the
    holder of a single-holder reservation with its own type and scope, so
    the reservation stays where it is), register again (a target may drop
    the caller's own registration when no reservation is held with that
    key), RESERVE again for a holder (GOOD when it still holds). A holder
    whose key a reclaim PREEMPT already covered (``preempted`` not False) is
    skipped. Every op is idempotent; the guest must be held meanwhile.
    A guest of a REGISTER AND MOVE plan (``moved``) is skipped: its key is
    shared with another host, whose registration the PREEMPT would remove."""
    keys = dict(registered or {}) or {n: g.key for n, g in pr.guests.items() if g.registered}
    shared = {pr.get(m).key for m in moved if pr.get(m).registered}
    ops: list[PrOp] = []
    for guest, key in sorted(keys.items()):
        g = pr.get(guest)
        if not g.registered or g.key != key or key in shared:
            continue
        if preempted is not False and g.holder and not g.rtype.all_registrants:
            continue  # the reclaim's PREEMPT of this key already removed them
        rtype = g.rtype if g.holder else PrType.WRITE_EXCLUSIVE
        scope = g.scope if g.holder else 0
        ops.append(PrOp(Side.SOURCE, guest, PrOutAction.PREEMPT, key, key, rtype, scope, True,
                        g.aptpl, Phase.ROLLBACK, "remove the silent destination's registration",
                        conflict_ok=True))
        ops.append(PrOp(Side.SOURCE, guest, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0, key,
                        inside_pause=True, aptpl=g.aptpl, phase=Phase.ROLLBACK,
                        why="keep the source's own registration"))
        if g.holder:
            ops.append(PrOp(Side.SOURCE, guest, PrOutAction.RESERVE, key, 0, g.rtype, g.scope, True,
                            False, Phase.ROLLBACK, "the reservation stays with the source"))
    return tuple(ops)


def give_back_plan(pr: DevicePrState, move: Mapping[str, MovePort], back: Mapping[str, MovePort]) -> tuple[PrOp, ...]:
    """Destination, on a failure once the source may have moved the
    reservation to it (``move``): REGISTER AND MOVE it back to the source's
    nexus (``back``), RK = SARK = the guest's key, UNREG = 1 (the
    destination's registration goes with it). RESERVATION CONFLICT means the
    destination does not hold it (the source never moved it): nothing to
    give back. Sent before the source is told of the abort, so that the
    source's RESERVE finds the reservation on its own nexus."""
    ops: list[PrOp] = []
    for name in sorted(move):
        g = pr.get(name)
        port = back.get(name)
        if not g.registered or port is None:
            continue
        rtype = g.rtype if g.holder and not g.rtype.all_registrants else PrType.WRITE_EXCLUSIVE
        ops.append(PrOp(Side.DESTINATION, name, PrOutAction.REGISTER_AND_MOVE, g.key, g.key, rtype, g.scope if g.holder else 0,
                        True, g.aptpl, Phase.ROLLBACK, "move the reservation back to the source's nexus",
                        conflict_ok=True, move_to=port, unreg=True))
    return tuple(ops)


def cleanup_plan(registered: Mapping[str, int]) -> tuple[PrOp, ...]:
    """Destination: drop every registration it made. RAIEK with SARK = 0 is a
    no-op on a nexus that is not (or no longer) registered, so it is safe
    after the source's PREEMPT already removed them."""
    return tuple(
        PrOp(Side.DESTINATION, name, RAIEK, 0, 0, phase=Phase.CLEANUP, why="unregister what setup registered")
        for name in sorted(registered)
    )


def qemu_plan(pr: DevicePrState) -> tuple[PrOp, ...]:
    """QEMU 11 (docs/design.md, "QEMU's migrate-pr"): REGISTER RK=0 SARK=key, then PREEMPT RK=SARK=key
    with the saved type (0 when none, which LIO rejects), scope 0; both on the
    destination while loading state, i.e. inside the pause."""
    ops: list[PrOp] = []
    for name, g in _guests(pr):
        ops.append(PrOp(Side.DESTINATION, name, PrOutAction.REGISTER, 0, g.key, inside_pause=True, phase=Phase.TAKEOVER, why="qemu: register"))
        ops.append(PrOp(Side.DESTINATION, name, PrOutAction.PREEMPT, g.key, g.key, g.rtype if g.holder else PrType.NONE, 0, True, phase=Phase.TAKEOVER, why="qemu: preempt"))
    return tuple(ops)
