"""Random PR OUT / PR IN / SCSI-2 sequences against the engine, checking invariants:

- only CheckCondition / ReservationConflict ever escape;
- PRgeneration moves by exactly one on a successful REGISTER*, CLEAR, PREEMPT*,
  REGISTER AND MOVE, and never on failures, RESERVE, RELEASE or PR IN;
- a unit attention never goes to the nexus whose command caused it;
- a single-holder reservation's holder is registered; an all-registrants
  reservation has registrants;
- PR IN replies decode and agree with the table's views;
- with APTPL on, a table rebuilt from the state file is identical.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prmigrate.lun.pr import ReservationTable
from prmigrate.lun.types import Nexus, ReservationConflict
from prmigrate.scsi.constants import Opcode, PrInAction, PrOutAction
from prmigrate.scsi.pr import (
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    pr_in_cdb,
    pr_out_cdb,
    pr_out_params,
    register_and_move_params,
)
from prmigrate.scsi.sense import CheckCondition, Sense
from prmigrate.scsi.transport_id import TransportId

T = "iqn.t"
NEXUSES = [
    Nexus.make("iqn.a", 1, T),
    Nexus.make("iqn.a", 2, T),
    Nexus.make("iqn.b", 1, T),
    Nexus.make("iqn.b", 1, T, tpgt=2, rel_port=2),
    Nexus.make("iqn.c", 7, T),
]
KEYS = [0, 1, 2, 3]
TYPES = [0, 1, 2, 3, 5, 6, 7, 8]  # raw codes: invalid ones (0, 2) are exercised too
BUMPS = {
    PrOutAction.REGISTER,
    PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
    PrOutAction.CLEAR,
    PrOutAction.PREEMPT,
    PrOutAction.PREEMPT_AND_ABORT,
    PrOutAction.REGISTER_AND_MOVE,
}
PR_UAS = {
    Sense.RESERVATIONS_PREEMPTED,
    Sense.RESERVATIONS_RELEASED,
    Sense.REGISTRATIONS_PREEMPTED,
}

nexuses = st.sampled_from(NEXUSES)
keys = st.sampled_from(KEYS)
types = st.sampled_from(TYPES)


class UaLog:
    def __init__(self) -> None:
        self.events: list[tuple[Nexus, Sense]] = []

    def establish(self, nexus: Nexus, sense: Sense) -> None:
        self.events.append((nexus, sense))


class PrMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="pr-sm-"))
        self.path = self.dir / "pr.json"
        self.ua = UaLog()
        self.aborted: list[set[Nexus]] = []
        self.t = ReservationTable(self.ua, self.path, abort_tasks=self.aborted.append)

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, caller: Nexus, fn, bumps: bool) -> None:
        gen = self.t.generation
        self.ua.events.clear()
        self.aborted.clear()
        ok = False
        try:
            fn()
            ok = True
        except (CheckCondition, ReservationConflict):
            pass
        assert all(n != caller for n, _ in self.ua.events), self.ua.events
        assert all(s in PR_UAS for _, s in self.ua.events)
        assert all(caller not in s for s in self.aborted)
        if ok and bumps:
            assert self.t.generation == (gen + 1) & 0xFFFFFFFF or (
                self.t.generation == gen  # REGISTER with SARK 0 from an unregistered nexus
            )
        else:
            assert self.t.generation == gen
            if not ok:
                assert self.ua.events == []

    def _out(self, caller, action, rk, sark, rtype, **flags):
        data = pr_out_params(rk, sark, **flags)
        cdb = pr_out_cdb(action, rtype, 0, len(data))
        self._run(
            caller,
            lambda: self.t.persistent_reserve_out(caller, cdb, data),
            action in BUMPS,
        )

    @rule(
        n=nexuses,
        rk=keys,
        sark=keys,
        ignore=st.booleans(),
        aptpl=st.booleans(),
        all_tg_pt=st.booleans(),
    )
    def register(self, n, rk, sark, ignore, aptpl, all_tg_pt):
        action = PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY if ignore else PrOutAction.REGISTER
        self._out(n, action, rk, sark, 0, aptpl=aptpl, all_tg_pt=all_tg_pt)

    @rule(n=nexuses, sark=keys, others=st.lists(nexuses, max_size=3))
    def register_spec_i_pt(self, n, sark, others):
        tids = [TransportId.of(o) for o in others]
        self._out(n, PrOutAction.REGISTER, 0, sark, 0, spec_i_pt=True, transport_ids=tids)

    @rule(
        n=nexuses,
        rk=keys,
        sark=keys,
        rtype=types,
        action=st.sampled_from(
            [
                PrOutAction.RESERVE,
                PrOutAction.RELEASE,
                PrOutAction.CLEAR,
                PrOutAction.PREEMPT,
                PrOutAction.PREEMPT_AND_ABORT,
                PrOutAction.REPLACE_LOST_RESERVATION,
            ]
        ),
    )
    def pr_out(self, n, rk, sark, rtype, action):
        self._out(n, action, rk, sark, rtype)

    @rule(n=nexuses, rk=keys, sark=keys, dest=nexuses, unreg=st.booleans())
    def move(self, n, rk, sark, dest, unreg):
        data = register_and_move_params(rk, sark, TransportId.of(dest), dest.rel_port, unreg=unreg)
        cdb = pr_out_cdb(PrOutAction.REGISTER_AND_MOVE, 0, 0, len(data))
        self._run(n, lambda: self.t.persistent_reserve_out(n, cdb, data), True)

    @rule(n=nexuses, reserve=st.booleans())
    def scsi2(self, n, reserve):
        op = Opcode.RESERVE_6 if reserve else Opcode.RELEASE_6
        cdb = bytes((op, 0, 0, 0, 0, 0))
        fn = self.t.reserve if reserve else self.t.release
        self._run(n, lambda: fn(n, cdb), False)

    @rule(n=nexuses, lost=st.booleans())
    def nexus_event(self, n, lost):
        if lost:
            self.t.nexus_lost(n)
        else:
            self.t.reset()

    @rule(n=nexuses, action=st.sampled_from(list(PrInAction)), alloc=st.integers(0, 300))
    def pr_in(self, n, action, alloc):
        self._run(n, lambda: self.t.persistent_reserve_in(n, pr_in_cdb(action, alloc)), False)

    @invariant()
    def reservation_consistent(self):
        resv = self.t.reservation
        idents = {r.ident for r in self.t.registrations}
        if resv is None:
            return
        if resv.rtype.all_registrants:
            assert resv.holder is None and idents
        else:
            assert resv.holder in idents
        assert self.t.scsi2_holder is None

    @invariant()
    def pr_in_agrees(self):
        if self.t.scsi2_holder is not None:
            return
        n = NEXUSES[0]
        rk = ReadKeys.decode(self.t.persistent_reserve_in(n, pr_in_cdb(PrInAction.READ_KEYS)))
        assert list(rk.keys) == [r.key for r in self.t.registrations]
        assert rk.generation == self.t.generation
        rr = ReadReservation.decode(
            self.t.persistent_reserve_in(n, pr_in_cdb(PrInAction.READ_RESERVATION))
        )
        resv = self.t.reservation
        assert (rr.key is None) == (resv is None)
        if resv is not None:
            assert rr.rtype == resv.rtype
        fs = ReadFullStatus.decode(
            self.t.persistent_reserve_in(n, pr_in_cdb(PrInAction.READ_FULL_STATUS))
        )
        assert len(fs.entries) == len(self.t.registrations)
        if resv is not None and resv.rtype.all_registrants:
            assert all(e.holder for e in fs.entries)
        else:
            assert sum(e.holder for e in fs.entries) == (0 if resv is None else 1)
        assert all(k != 0 for k in rk.keys)

    @invariant()
    def aptpl_reload(self):
        if not self.t.aptpl:
            assert not self.path.exists()
            return
        t2 = ReservationTable(UaLog(), self.path)
        assert t2.registrations == self.t.registrations
        assert t2.reservation == self.t.reservation
        assert t2.generation == self.t.generation


PrMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrStateMachine = PrMachine.TestCase
