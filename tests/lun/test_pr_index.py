"""The indexed reservation table against a reference model that scans.

``ScanningTable`` is the engine with every indexed lookup (the registration
of a nexus, registrations by key, the first overlapping registration, the
nexuses a registration covers) replaced by a plain scan over everything in
order, as the engine did before it had indexes. Random histories of PR OUT
(every service action, SPEC_I_PT lists and REGISTER AND MOVE with format 00b
and 01b TransportIDs, ALL_TG_PT), PR IN, SCSI-2 commands, nexus losses and
conflict checks run on both; after every step their answers, unit
attentions, aborted nexuses, registrations (in order), reservation and
PRgeneration must be equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prmigrate.lun.pr import Registration, ReservationTable, _Registry
from prmigrate.lun.types import Nexus, ReservationConflict
from prmigrate.scsi.constants import Opcode, PrInAction, PrOutAction
from prmigrate.scsi.pr import pr_in_cdb, pr_out_cdb, pr_out_params, register_and_move_params
from prmigrate.scsi.sense import CheckCondition, Sense
from prmigrate.scsi.transport_id import TransportId


class ScanningTable(ReservationTable):
    """The reference model: the same rules, every lookup a scan in order."""

    def registration_of(self, nexus: Nexus) -> Registration | None:
        wildcard = None
        for reg in self._regs.values():
            if reg.matches(nexus):
                if reg.tid.isid is not None:
                    return reg
                wildcard = wildcard or reg
        return wildcard

    def _with_key(self, key: int) -> list[Registration]:
        return [r for r in self._regs.values() if r.key == key]

    def _overlap(self, reg: Registration, among: _Registry) -> Registration | None:
        return next((o for o in among.values() if reg.overlaps(o)), None)

    def _nexuses_of(self, reg: Registration) -> set[Nexus]:
        found = {n for n in self._nexuses.values() if reg.matches(n)}
        home = reg.home_nexus()
        if home is not None and not any((n.initiator, n.isid, n.rel_port) ==
                                        (home.initiator, home.isid, home.rel_port) for n in found):
            found.add(home)
        return found


T = "iqn.t"
NEXUSES = [
    Nexus.make(name, isid, T, tpgt=port, rel_port=port)
    for name in ("iqn.a", "iqn.b")
    for isid in (1, 2)
    for port in (1, 2)
] + [Nexus.make("iqn.c", 7, T)]
TIDS = [TransportId.of(n) for n in NEXUSES] + [TransportId("iqn.a", None), TransportId("IQN.B", None),
                                              TransportId("iqn.d", 3)]
KEYS = [0, 1, 2, 3]
TYPES = [0, 1, 3, 5, 6, 7, 8]
CDBS = [
    bytes((Opcode.READ_10,)) + bytes(9),
    bytes((Opcode.WRITE_10,)) + bytes(9),
    bytes((Opcode.TEST_UNIT_READY,)) + bytes(5),
    bytes((Opcode.RESERVE_6,)) + bytes(5),
    bytes((Opcode.RELEASE_6,)) + bytes(5),
    pr_in_cdb(PrInAction.READ_KEYS),
    pr_out_cdb(PrOutAction.REGISTER, 0, 0, 24),
]

nexuses = st.sampled_from(NEXUSES)
keys = st.sampled_from(KEYS)


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[Nexus, Sense]] = []
        self.aborted: list[frozenset[Nexus]] = []

    def establish(self, nexus: Nexus, sense: Sense) -> None:
        self.events.append((nexus, sense))

    def abort(self, nexuses: set[Nexus]) -> None:
        self.aborted.append(frozenset(nexuses))


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except CheckCondition as e:
        return ("check", e.sense, e.field)
    except ReservationConflict:
        return ("conflict",)


class IndexedVsScanning(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.logs = (Log(), Log())
        self.tables = (
            ReservationTable(self.logs[0], None, abort_tasks=self.logs[0].abort),
            ScanningTable(self.logs[1], None, abort_tasks=self.logs[1].abort),
        )

    def both(self, call: Callable[[ReservationTable], Any]) -> None:
        indexed, scanning = (outcome(lambda t=t: call(t)) for t in self.tables)
        assert indexed == scanning
        assert self.logs[0].events == self.logs[1].events
        assert self.logs[0].aborted == self.logs[1].aborted

    def out(self, n: Nexus, action: int, data: bytes, rtype: int = 0) -> None:
        cdb = pr_out_cdb(action, rtype, 0, len(data))
        self.both(lambda t: t.persistent_reserve_out(n, cdb, data))

    @rule(n=nexuses, rk=keys, sark=keys, ignore=st.booleans(), all_tg_pt=st.booleans())
    def register(self, n, rk, sark, ignore, all_tg_pt):
        action = PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY if ignore else PrOutAction.REGISTER
        self.out(n, action, pr_out_params(rk, sark, all_tg_pt=all_tg_pt))

    @rule(n=nexuses, sark=keys, tids=st.lists(st.sampled_from(TIDS), max_size=4), all_tg_pt=st.booleans())
    def register_spec_i_pt(self, n, sark, tids, all_tg_pt):
        data = pr_out_params(0, sark, spec_i_pt=True, all_tg_pt=all_tg_pt, transport_ids=tids)
        self.out(n, PrOutAction.REGISTER, data)

    @rule(n=nexuses, rk=keys, sark=keys, rtype=st.sampled_from(TYPES),
          action=st.sampled_from([PrOutAction.RESERVE, PrOutAction.RELEASE, PrOutAction.CLEAR,
                                  PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT]))
    def pr_out(self, n, rk, sark, rtype, action):
        self.out(n, action, pr_out_params(rk, sark), rtype)

    @rule(n=nexuses, rk=keys, sark=keys, tid=st.sampled_from(TIDS), port=st.sampled_from([1, 2]),
          unreg=st.booleans())
    def move(self, n, rk, sark, tid, port, unreg):
        self.out(n, PrOutAction.REGISTER_AND_MOVE, register_and_move_params(rk, sark, tid, port, unreg=unreg))

    @rule(n=nexuses, reserve=st.booleans())
    def scsi2(self, n, reserve):
        cdb = bytes((Opcode.RESERVE_6 if reserve else Opcode.RELEASE_6,)) + bytes(5)
        self.both(lambda t: (t.reserve if reserve else t.release)(n, cdb))

    @rule(n=nexuses, lost=st.booleans())
    def nexus_event(self, n, lost):
        self.both(lambda t: t.nexus_lost(n) if lost else t.reset())

    @rule(n=nexuses, action=st.sampled_from(list(PrInAction)))
    def pr_in(self, n, action):
        self.both(lambda t: t.persistent_reserve_in(n, pr_in_cdb(action, 0xFFFF)))

    @invariant()
    def same_state(self):
        a, b = self.tables
        assert a.registrations == b.registrations
        assert (a.reservation, a.generation, a.aptpl, a.scsi2_holder) == (
            b.reservation, b.generation, b.aptpl, b.scsi2_holder)
        for n in NEXUSES:
            assert a.registration_of(n) == b.registration_of(n)
            assert a.is_holder(n) == b.is_holder(n)
            for cdb in CDBS:
                assert a.conflicts(n, cdb) == b.conflicts(n, cdb)


IndexedVsScanning.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
TestIndexedVsScanning = IndexedVsScanning.TestCase


def test_registry_keeps_order_and_indexes_through_key_changes() -> None:
    r = _Registry()
    a1 = Registration(1, TransportId("iqn.a", 1), 1)
    a2 = Registration(2, TransportId("iqn.a", 2), 1)
    any_a = Registration(1, TransportId("iqn.a", None), 1, all_tg_pt=True)
    for reg in (a1, a2, any_a):
        r.put(reg)
    r.put(Registration(9, TransportId("iqn.a", 1), 1))  # key change: same place
    assert [x.key for x in r.values()] == [9, 2, 1]
    assert r.with_key(1) == [any_a] and [x.key for x in r.with_key(9)] == [9]
    assert r.of_nexus(Nexus.make("iqn.A", 2, T)) == a2
    assert r.of_nexus(Nexus.make("iqn.a", 5, T, rel_port=4)) == any_a  # format 00b, all target ports
    assert r.first_overlap(Registration(3, TransportId("iqn.a", None), 7)) == any_a
    r.drop(a2.ident)
    assert r.of_nexus(Nexus.make("iqn.a", 2, T)) == any_a
    r.clear()
    assert not r and r.with_key(9) == [] and r.of_nexus(Nexus.make("iqn.a", 1, T)) is None


def test_pr_in_built_up_to_the_allocation_length_equals_the_full_reply_cut() -> None:
    """READ KEYS / READ FULL STATUS encode only what fits; the bytes are the
    full reply (encoded by scsi/pr.py's codecs) cut at every length."""
    from prmigrate.scsi.constants import PrType
    from prmigrate.scsi.pr import FullStatusEntry, ReadFullStatus, ReadKeys

    log = Log()
    t = ReservationTable(log, None)
    names = ["iqn.a", "iqn.2026-11.org.example:a-much-longer-initiator-name", "iqn.b"]
    for i, name in enumerate(names * 3):
        n = Nexus.make(name, i + 1, T)
        data = pr_out_params(0, 0x100 + i, all_tg_pt=i % 2 == 0)
        t.persistent_reserve_out(n, pr_out_cdb(PrOutAction.REGISTER, 0, 0, len(data)), data)
    regs = t.registrations
    keys = ReadKeys(t.generation, tuple(r.key for r in regs)).encode()
    full = ReadFullStatus(t.generation, tuple(
        FullStatusEntry(r.key, r.all_tg_pt, False, 0, PrType.NONE, r.rel_port, r.tid) for r in regs)).encode()
    nexus = Nexus.make("iqn.a", 1, T)
    for alloc in range(len(full) + 9):
        assert t.persistent_reserve_in(nexus, pr_in_cdb(PrInAction.READ_KEYS, alloc)) == keys[:alloc]
        assert t.persistent_reserve_in(nexus, pr_in_cdb(PrInAction.READ_FULL_STATUS, alloc)) == full[:alloc]
