"""The SPC-5 persistent reservation engine: every service action, its failure
paths, unit attention recipients, PRgeneration, APTPL and the conflict table."""

from __future__ import annotations

import json

import pytest

from prmigrate.lun.conflicts import OPCODE_ACCESS, Access, classify
from prmigrate.lun.persist import PersistError
from prmigrate.lun.pr import ReservationTable
from prmigrate.lun.types import Nexus, ReservationConflict
from prmigrate.scsi.constants import (
    VALID_PR_TYPES,
    MaintenanceIn,
    Opcode,
    PrInAction,
    PrOutAction,
    PrType,
    ServiceActionIn16,
)
from prmigrate.scsi.pr import (
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    ReportCapabilities,
    pr_in_cdb,
    pr_out_cdb,
    pr_out_params,
    register_and_move_params,
)
from prmigrate.scsi.sense import CheckCondition, Sense
from prmigrate.scsi.transport_id import TransportId

T = "iqn.2026-01.test:target"
A = Nexus.make("iqn.host:a", 0x1, T)
A2 = Nexus.make("iqn.host:a", 0x2, T)  # same initiator name, another ISID
A_P2 = Nexus.make("iqn.host:a", 0x1, T, tpgt=2, rel_port=2)  # same port, other target port
B = Nexus.make("iqn.host:b", 0x1, T)
C = Nexus.make("iqn.host:c", 0x1, T)
K, KB, KC = 0xA1, 0xB2, 0xC3

WE, EA = PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS
WE_RO, EA_RO = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
WE_AR, EA_AR = PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS
ALL_TYPES = sorted(VALID_PR_TYPES)

READ10 = bytes((Opcode.READ_10,)) + bytes(9)
WRITE10 = bytes((Opcode.WRITE_10,)) + bytes(9)


class UaLog:
    def __init__(self) -> None:
        self.events: list[tuple[Nexus, Sense]] = []

    def establish(self, nexus: Nexus, sense: Sense) -> None:
        self.events.append((nexus, sense))

    def of(self, nexus: Nexus) -> list[Sense]:
        return [s for n, s in self.events if n == nexus]

    def clear(self) -> None:
        self.events.clear()


@pytest.fixture
def ua() -> UaLog:
    return UaLog()


@pytest.fixture
def t(ua: UaLog) -> ReservationTable:
    return ReservationTable(ua, None)


def out(t, nexus, action, rk=0, sark=0, rtype=PrType.NONE, scope=0, **flags):
    data = pr_out_params(rk, sark, **flags)
    t.persistent_reserve_out(nexus, pr_out_cdb(action, rtype, scope, len(data)), data)


def raw_out(t, nexus, action, data, rtype=PrType.NONE, scope=0, plen=None):
    plen = len(data) if plen is None else plen
    t.persistent_reserve_out(nexus, pr_out_cdb(action, rtype, scope, plen), data)


def register(t, nexus, key, **flags):
    out(t, nexus, PrOutAction.REGISTER, 0, key, **flags)


def reserve(t, nexus, key, rtype):
    out(t, nexus, PrOutAction.RESERVE, key, 0, rtype)


def pr_in(t, action, alloc=0xFFFF, nexus=A) -> bytes:
    return t.persistent_reserve_in(nexus, pr_in_cdb(action, alloc))


def keys(t) -> list[int]:
    return list(ReadKeys.decode(pr_in(t, PrInAction.READ_KEYS)).keys)


def resv(t) -> ReadReservation:
    return ReadReservation.decode(pr_in(t, PrInAction.READ_RESERVATION))


def full(t) -> ReadFullStatus:
    return ReadFullStatus.decode(pr_in(t, PrInAction.READ_FULL_STATUS))


def check(sense: Sense):
    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(CheckCondition)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            r = self.ctx.__exit__(*exc)
            assert self.info.value.sense is sense, self.info.value.sense
            return r

    return _Ctx()


# ===================================================================== REGISTER


def test_register_from_unregistered(t, ua):
    register(t, A, K)
    assert keys(t) == [K] and t.generation == 1
    assert t.registration_of(A).key == K
    assert ua.events == []


def test_register_unregistered_with_rk_conflicts(t):
    with pytest.raises(ReservationConflict):
        out(t, A, PrOutAction.REGISTER, 5, K)
    assert keys(t) == [] and t.generation == 0


def test_register_unregistered_sark_zero_is_a_noop(t):
    out(t, A, PrOutAction.REGISTER, 0, 0)
    assert keys(t) == [] and t.generation == 0  # pinned: no PRgeneration bump


def test_register_change_key(t):
    register(t, A, K)
    out(t, A, PrOutAction.REGISTER, K, KB)
    assert keys(t) == [KB] and t.generation == 2


def test_register_same_key_again_bumps_generation(t):
    register(t, A, K)
    out(t, A, PrOutAction.REGISTER, K, K)
    assert keys(t) == [K] and t.generation == 2


def test_register_rk_mismatch_conflicts(t):
    register(t, A, K)
    with pytest.raises(ReservationConflict):
        out(t, A, PrOutAction.REGISTER, K + 1, KB)
    assert keys(t) == [K] and t.generation == 1


def test_register_registered_with_spec_i_pt_is_invalid(t):
    register(t, A, K)
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        out(t, A, PrOutAction.REGISTER, K, KB, spec_i_pt=True, transport_ids=[TransportId.of(B)])
    assert keys(t) == [K]


def test_register_and_ignore_skips_rk_check(t):
    out(t, A, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0x999, K)
    assert keys(t) == [K]
    out(t, A, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0x777, KB)
    assert keys(t) == [KB] and t.generation == 2
    out(t, A, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0)
    assert keys(t) == [] and t.generation == 3


def test_register_and_ignore_rejects_spec_i_pt(t):
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        out(
            t,
            A,
            PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            K,
            spec_i_pt=True,
            transport_ids=[TransportId.of(B)],
        )
    assert keys(t) == []


@pytest.mark.parametrize("length", [0, 8, 23, 25, 28, 32])
def test_parameter_list_length_error(t, length):
    data = pr_out_params(0, K).ljust(length, b"\x00")[:length]
    with check(Sense.PARAMETER_LIST_LENGTH_ERROR):
        raw_out(t, A, PrOutAction.REGISTER, data)
    assert keys(t) == []


def test_parameter_list_shorter_than_cdb_says(t):
    with check(Sense.PARAMETER_LIST_LENGTH_ERROR):
        raw_out(t, A, PrOutAction.REGISTER, pr_out_params(0, K), plen=28)


def test_unregister(t, ua):
    register(t, A, K)
    register(t, B, KB)
    out(t, A, PrOutAction.REGISTER, K, 0)
    assert keys(t) == [KB] and t.generation == 3
    assert ua.events == []


@pytest.mark.parametrize("rtype", [WE, EA])
def test_unregister_holder_releases_without_ua(t, ua, rtype):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, A, K, rtype)
    out(t, A, PrOutAction.REGISTER, K, 0)
    assert resv(t).key is None
    assert ua.events == []


@pytest.mark.parametrize("rtype", [WE_RO, EA_RO])
def test_unregister_holder_of_registrants_only_sends_2a04_to_others(t, ua, rtype):
    register(t, A, K)
    register(t, B, KB)
    register(t, C, KC)
    reserve(t, A, K, rtype)
    out(t, A, PrOutAction.REGISTER, K, 0)
    assert resv(t).key is None
    assert ua.of(B) == [Sense.RESERVATIONS_RELEASED]
    assert ua.of(C) == [Sense.RESERVATIONS_RELEASED]
    assert ua.of(A) == []


@pytest.mark.parametrize("rtype", [WE_AR, EA_AR])
def test_all_registrants_reservation_lives_until_last_registrant(t, ua, rtype):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, A, K, rtype)
    out(t, A, PrOutAction.REGISTER, K, 0)
    r = resv(t)
    assert r.rtype == rtype and r.key == 0
    out(t, B, PrOutAction.REGISTER, KB, 0)
    assert resv(t).key is None
    assert ua.events == []


def test_isid_distinguishes_registrations_and_reconnect_finds_them(t):
    register(t, A, K)
    assert t.registration_of(A2) is None
    register(t, A2, KB)
    assert sorted(keys(t)) == [K, KB]
    again = Nexus.make("IQN.HOST:A", 0x1, T)  # reconnect: same name (any case) and ISID
    assert t.registration_of(again).key == K


def test_registration_is_per_target_port_unless_all_tg_pt(t):
    register(t, A, K)
    assert t.registration_of(A_P2) is None
    register(t, A_P2, KB)
    assert sorted(keys(t)) == [K, KB]


def test_all_tg_pt_registers_on_every_target_port(t):
    register(t, A, K, all_tg_pt=True)
    assert t.registration_of(A_P2).key == K
    [e] = full(t).entries
    assert e.all_tg_pt
    # Unregistering from the other port removes the one registration.
    out(t, A_P2, PrOutAction.REGISTER, K, 0)
    assert keys(t) == []


def test_all_tg_pt_only_for_register_actions(t):
    register(t, A, K)
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        out(t, A, PrOutAction.RESERVE, K, 0, WE, all_tg_pt=True)
    assert resv(t).key is None


def test_spec_i_pt_only_for_register(t):
    register(t, A, K)
    data = pr_out_params(K, 0, spec_i_pt=True, transport_ids=[TransportId.of(B)])
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        raw_out(t, A, PrOutAction.RESERVE, data, WE)


# ===================================================================== SPEC_I_PT


def test_spec_i_pt_registers_listed_ports(t, ua):
    tids = [TransportId.of(B), TransportId("iqn.host:c")]
    register(t, A, K, spec_i_pt=True, transport_ids=tids)
    assert keys(t) == [K, K, K] and t.generation == 1
    assert t.registration_of(B).key == K
    assert t.registration_of(C).key == K  # format 00b: any ISID of iqn.host:c
    assert t.registration_of(Nexus.make("iqn.host:c", 0x77, T)).key == K
    fmts = {str(e.transport_id): e.transport_id.isid for e in full(t).entries}
    assert fmts["iqn.host:c"] is None


def _spec_list(tids) -> bytes:
    body = b"".join(tids)
    return pr_out_params(0, K)[:20] + b"\x08\x00\x00\x00" + len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    "tids",
    [
        [TransportId.of(B).encode(), TransportId.of(B).encode()],  # duplicate
        [TransportId.of(B).encode(), TransportId("iqn.host:b").encode()],  # overlapping
        [TransportId.of(A).encode()],  # the caller itself
        [bytes((0x85,)) + TransportId.of(B).encode()[1:]],  # unknown format 10b
        [bytes((0x46,)) + TransportId.of(B).encode()[1:]],  # not iSCSI
    ],
)
def test_spec_i_pt_invalid_lists_register_nothing(t, tids):
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        raw_out(t, A, PrOutAction.REGISTER, _spec_list(tids))
    assert keys(t) == [] and t.generation == 0


def test_spec_i_pt_already_registered_port_is_invalid(t):
    register(t, B, KB)
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        register(t, A, K, spec_i_pt=True, transport_ids=[TransportId.of(C), TransportId.of(B)])
    assert keys(t) == [KB]


def test_spec_i_pt_list_length_mismatch(t):
    data = _spec_list([TransportId.of(B).encode()])
    with check(Sense.PARAMETER_LIST_LENGTH_ERROR):
        raw_out(t, A, PrOutAction.REGISTER, data[:-4])
    bad_len = data[:24] + (100).to_bytes(4, "big") + data[28:]
    with check(Sense.PARAMETER_LIST_LENGTH_ERROR):
        raw_out(t, A, PrOutAction.REGISTER, bad_len)
    assert keys(t) == []


def test_spec_i_pt_with_all_tg_pt(t):
    register(t, A, K, spec_i_pt=True, all_tg_pt=True, transport_ids=[TransportId.of(B)])
    b_p2 = Nexus.make("iqn.host:b", 0x1, T, tpgt=2, rel_port=2)
    assert t.registration_of(b_p2).key == K


# ===================================================================== RESERVE


def test_reserve_success_no_generation_change(t):
    register(t, A, K)
    reserve(t, A, K, WE)
    r = resv(t)
    assert (r.key, r.rtype, r.scope) == (K, WE, 0)
    assert t.generation == 1
    reserve(t, A, K, WE)  # same again: GOOD
    assert resv(t).rtype == WE


def test_reserve_failures(t):
    with pytest.raises(ReservationConflict):
        reserve(t, A, K, WE)  # unregistered
    register(t, A, K)
    register(t, B, KB)
    with pytest.raises(ReservationConflict):
        reserve(t, A, KB, WE)  # wrong RK
    reserve(t, A, K, WE)
    with pytest.raises(ReservationConflict):
        reserve(t, A, K, EA)  # holder, other type
    with pytest.raises(ReservationConflict):
        reserve(t, B, KB, WE)  # not the holder
    assert resv(t).key == K and resv(t).rtype == WE


@pytest.mark.parametrize("rtype", [0, 2, 4, 9, 15])
def test_reserve_invalid_type(t, rtype):
    register(t, A, K)
    with check(Sense.INVALID_FIELD_IN_CDB):
        reserve(t, A, K, rtype)


def test_reserve_invalid_scope(t):
    register(t, A, K)
    with check(Sense.INVALID_FIELD_IN_CDB):
        out(t, A, PrOutAction.RESERVE, K, 0, WE, scope=1)


@pytest.mark.parametrize("rtype", [WE_AR, EA_AR])
def test_all_registrants_every_registrant_holds(t, rtype):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, A, K, rtype)
    reserve(t, B, KB, rtype)  # B is a holder too: GOOD
    assert t.is_holder(B) and t.is_holder(A)
    assert resv(t).key == 0  # SPC-5 6.16.3.2: key zero for all-registrants


# ===================================================================== RELEASE


def test_release_paths(t, ua):
    with pytest.raises(ReservationConflict):
        out(t, A, PrOutAction.RELEASE, K, 0, WE)  # unregistered
    register(t, A, K)
    register(t, B, KB)
    out(t, A, PrOutAction.RELEASE, K, 0, WE)  # no reservation: GOOD
    reserve(t, A, K, WE)
    out(t, B, PrOutAction.RELEASE, KB, 0, WE)  # not the holder: GOOD, no effect
    assert resv(t).key == K
    with pytest.raises(ReservationConflict):
        out(t, A, PrOutAction.RELEASE, KB, 0, WE)  # wrong RK
    with check(Sense.INVALID_RELEASE_OF_PERSISTENT_RESERVATION):
        out(t, A, PrOutAction.RELEASE, K, 0, EA)  # holder, wrong type
    assert resv(t).key == K
    out(t, A, PrOutAction.RELEASE, K, 0, WE)
    assert resv(t).key is None
    assert t.generation == 2  # RESERVE / RELEASE do not bump
    assert ua.events == []  # WE release: no unit attention


@pytest.mark.parametrize("rtype", [WE_RO, EA_RO, WE_AR, EA_AR])
def test_release_of_shared_types_sends_2a04_to_others(t, ua, rtype):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, A, K, rtype)
    out(t, A, PrOutAction.RELEASE, K, 0, rtype)
    assert resv(t).key is None
    assert ua.of(B) == [Sense.RESERVATIONS_RELEASED]
    assert ua.of(A) == []


# ===================================================================== CLEAR


def test_clear(t, ua):
    with pytest.raises(ReservationConflict):
        out(t, A, PrOutAction.CLEAR, 0, 0)
    register(t, A, K)
    register(t, B, KB)
    register(t, C, KC)
    reserve(t, A, K, EA)
    with pytest.raises(ReservationConflict):
        out(t, B, PrOutAction.CLEAR, K, 0)
    out(t, B, PrOutAction.CLEAR, KB, 0)
    assert keys(t) == [] and resv(t).key is None
    assert t.generation == 4
    assert ua.of(A) == [Sense.RESERVATIONS_PREEMPTED]
    assert ua.of(C) == [Sense.RESERVATIONS_PREEMPTED]
    assert ua.of(B) == []


# ===================================================================== PREEMPT


@pytest.mark.parametrize("rtype", ALL_TYPES)
@pytest.mark.parametrize("action", [PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT])
def test_migration_takeover(ua, rtype, action):
    """Source A holds with key K; destination B registers K and preempts RK = SARK = K."""
    aborted: list[set[Nexus]] = []
    t = ReservationTable(ua, None, abort_tasks=aborted.append)
    register(t, A, K)
    register(t, C, KC)  # a bystander with another key
    reserve(t, A, K, rtype)
    register(t, B, K)
    gen = t.generation
    ua.clear()
    out(t, B, action, K, K, rtype)
    assert t.registration_of(A) is None
    assert t.registration_of(B).key == K
    assert t.registration_of(C).key == KC
    assert t.is_holder(B)
    r = resv(t)
    assert r.rtype == rtype and r.key == (0 if rtype.all_registrants else K)
    holders = [e for e in full(t).entries if e.holder]
    if rtype.all_registrants:
        assert len(holders) == 2
    else:
        assert [str(e.transport_id) for e in holders] == [B.initiator_port]
    assert ua.of(A) == [Sense.REGISTRATIONS_PREEMPTED]
    assert ua.of(B) == []
    assert ua.of(C) == []  # same type and scope: no 2A/04
    assert t.generation == gen + 1
    if action is PrOutAction.PREEMPT_AND_ABORT:
        assert aborted == [{A}]
    else:
        assert aborted == []


@pytest.mark.parametrize("rtype", [WE, EA, WE_RO, EA_RO])
def test_preempt_holder_with_type_change_sends_2a04_to_remaining(t, ua, rtype):
    register(t, A, K)
    register(t, B, KB)
    register(t, C, KC)
    reserve(t, A, K, rtype)
    new = EA if rtype != EA else WE
    out(t, B, PrOutAction.PREEMPT, KB, K, new)
    assert t.registration_of(A) is None
    r = resv(t)
    assert (r.key, r.rtype) == (KB, new)
    assert ua.of(A) == [Sense.REGISTRATIONS_PREEMPTED]
    assert ua.of(C) == [Sense.RESERVATIONS_RELEASED]
    assert ua.of(B) == []


def test_preempt_self_changes_type(t, ua):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, A, K, WE)
    out(t, A, PrOutAction.PREEMPT, K, K, EA)
    assert resv(t).rtype == EA and resv(t).key == K
    assert t.registration_of(A).key == K
    assert ua.of(B) == [Sense.RESERVATIONS_RELEASED]
    assert ua.of(A) == []


@pytest.mark.parametrize("rtype", [WE_AR, EA_AR])
def test_preempt_all_registrants_sark_zero(t, ua, rtype):
    register(t, A, K)
    register(t, B, KB)
    register(t, C, KC)
    reserve(t, A, K, rtype)
    out(t, B, PrOutAction.PREEMPT, KB, 0, EA)
    assert keys(t) == [KB]
    r = resv(t)
    assert (r.key, r.rtype) == (KB, EA)
    assert ua.of(A) == [Sense.REGISTRATIONS_PREEMPTED]
    assert ua.of(C) == [Sense.REGISTRATIONS_PREEMPTED]
    assert ua.of(B) == []


@pytest.mark.parametrize("rtype", [WE_AR, EA_AR])
def test_preempt_all_registrants_sark_nonzero_removes_matching_only(t, ua, rtype):
    register(t, A, K)
    register(t, B, KB)
    register(t, C, KC)
    reserve(t, A, K, rtype)
    out(t, B, PrOutAction.PREEMPT, KB, KC, WE)  # TYPE is ignored here
    assert sorted(keys(t)) == [K, KB]
    assert resv(t).rtype == rtype
    assert ua.of(C) == [Sense.REGISTRATIONS_PREEMPTED]
    assert ua.of(A) == [] and ua.of(B) == []
    with pytest.raises(ReservationConflict):
        out(t, B, PrOutAction.PREEMPT, KB, 0x5555, WE)  # nothing matches


def test_preempt_without_reservation_removes_registrations(t, ua):
    register(t, A, K)
    register(t, B, KB)
    out(t, A, PrOutAction.PREEMPT, K, KB, PrType.NONE)  # TYPE 0 is fine without a reservation
    assert keys(t) == [K] and resv(t).key is None
    assert ua.of(B) == [Sense.REGISTRATIONS_PREEMPTED]
    assert ua.of(A) == []
    assert t.generation == 3


def test_preempt_without_reservation_own_key_removes_caller_too(t, ua):
    """Pinned (SPC-5 5.14.11.4.4): with no reservation every registration with
    key SARK goes, the caller's included; only the caller gets no unit attention."""
    register(t, A, K)
    register(t, B, K)
    out(t, B, PrOutAction.PREEMPT, K, K, WE)
    assert keys(t) == []
    assert ua.of(A) == [Sense.REGISTRATIONS_PREEMPTED]
    assert ua.of(B) == []


def test_preempt_non_holder_key(t, ua):
    register(t, A, K)
    register(t, B, KB)
    register(t, C, KC)
    reserve(t, A, K, WE)
    out(t, B, PrOutAction.PREEMPT, KB, KC, WE)
    assert sorted(keys(t)) == [K, KB] and resv(t).key == K
    assert ua.of(C) == [Sense.REGISTRATIONS_PREEMPTED]


def test_preempt_failures(t):
    with pytest.raises(ReservationConflict):
        out(t, A, PrOutAction.PREEMPT, K, KB, WE)  # unregistered
    register(t, A, K)
    register(t, B, KB)
    with pytest.raises(ReservationConflict):
        out(t, A, PrOutAction.PREEMPT, KB, KB, WE)  # wrong RK
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        out(t, A, PrOutAction.PREEMPT, K, 0, WE)  # SARK 0, no reservation
    with pytest.raises(ReservationConflict):
        out(t, A, PrOutAction.PREEMPT, K, 0x5555, WE)  # no match
    reserve(t, B, KB, WE)
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        out(t, A, PrOutAction.PREEMPT, K, 0, WE)  # SARK 0, not an all-registrants type
    with check(Sense.INVALID_FIELD_IN_CDB):
        out(t, A, PrOutAction.PREEMPT, K, KB, 2)  # preempting the holder needs a valid type
    with check(Sense.INVALID_FIELD_IN_CDB):
        out(t, A, PrOutAction.PREEMPT, K, KB, WE, scope=1)
    assert sorted(keys(t)) == [K, KB] and resv(t).key == KB
    assert t.generation == 2


def test_preempt_and_abort_aborts_preempted_nexuses_only(ua):
    aborted: list[set[Nexus]] = []
    t = ReservationTable(ua, None, abort_tasks=aborted.append)
    register(t, A, K)
    register(t, A2, K)
    register(t, B, KB)
    reserve(t, A, K, EA)
    out(t, B, PrOutAction.PREEMPT_AND_ABORT, KB, K, EA)
    assert aborted == [{A, A2}]
    assert keys(t) == [KB] and resv(t).key == KB


# ===================================================================== REGISTER AND MOVE


def move(t, nexus, rk, sark, tid, port=1, **kw):
    data = register_and_move_params(rk, sark, tid, port, **kw)
    raw_out(t, nexus, PrOutAction.REGISTER_AND_MOVE, data)


def test_register_and_move(t, ua):
    register(t, A, K)
    reserve(t, A, K, EA)
    move(t, A, K, KB, TransportId.of(B))
    assert t.registration_of(B).key == KB
    assert t.registration_of(A).key == K
    assert t.is_holder(B) and not t.is_holder(A)
    assert resv(t).rtype == EA and resv(t).key == KB
    assert t.generation == 2
    move(t, B, KB, KC, TransportId.of(C), unreg=True)
    assert t.registration_of(B) is None and t.is_holder(C)
    assert sorted(keys(t)) == [K, KC]
    assert ua.events == []


def test_register_and_move_to_registered_destination_sets_its_key(t):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, A, K, WE)
    move(t, A, K, KC, TransportId.of(B))
    assert t.registration_of(B).key == KC and t.is_holder(B)


def test_register_and_move_failures(t):
    with pytest.raises(ReservationConflict):
        move(t, A, K, KB, TransportId.of(B))  # unregistered
    register(t, A, K)
    register(t, B, KB)
    with pytest.raises(ReservationConflict):
        move(t, A, K, KC, TransportId.of(C))  # no reservation
    reserve(t, A, K, WE)
    with pytest.raises(ReservationConflict):
        move(t, B, KB, KC, TransportId.of(C))  # not the holder
    with pytest.raises(ReservationConflict):
        move(t, A, KB, KC, TransportId.of(C))  # wrong RK
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        move(t, A, K, 0, TransportId.of(C))  # SARK 0
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        move(t, A, K, KC, TransportId.of(A))  # to itself
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        move(t, A, K, KC, TransportId.of(C), port=0)
    good = register_and_move_params(K, KC, TransportId.of(C))
    with check(Sense.PARAMETER_LIST_LENGTH_ERROR):
        raw_out(t, A, PrOutAction.REGISTER_AND_MOVE, good[:20])
    with check(Sense.PARAMETER_LIST_LENGTH_ERROR):
        raw_out(t, A, PrOutAction.REGISTER_AND_MOVE, good[:-4])
    with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST):
        raw_out(t, A, PrOutAction.REGISTER_AND_MOVE, good[:24] + b"\x85" + good[25:])
    assert t.is_holder(A) and t.registration_of(C) is None


@pytest.mark.parametrize("rtype", [WE_AR, EA_AR])
def test_register_and_move_not_for_all_registrants(t, rtype):
    register(t, A, K)
    reserve(t, A, K, rtype)
    with pytest.raises(ReservationConflict):
        move(t, A, K, KB, TransportId.of(B))


# ===================================================================== REPLACE LOST RESERVATION


def test_replace_lost_reservation_when_nothing_was_lost(t):
    """Pinned: reservation information is never lost here (RLR_C = 0), so the
    service action is rejected with INVALID FIELD IN CDB and changes nothing."""
    register(t, A, K)
    reserve(t, A, K, WE)
    gen = t.generation
    with check(Sense.INVALID_FIELD_IN_CDB):
        out(t, A, PrOutAction.REPLACE_LOST_RESERVATION, K, K, EA)
    assert resv(t).rtype == WE and t.generation == gen and keys(t) == [K]


@pytest.mark.parametrize("sa", [9, 0x10, 0x1F])
def test_unknown_pr_out_service_action(t, sa):
    with check(Sense.INVALID_FIELD_IN_CDB):
        raw_out(t, A, sa, pr_out_params(0, K))


# ===================================================================== PR IN


def test_read_keys_truncation_and_additional_length(t):
    register(t, A, K)
    register(t, B, KB)
    raw = pr_in(t, PrInAction.READ_KEYS, 16)
    assert len(raw) == 16
    rk = ReadKeys.decode(raw)
    assert rk.keys == (K,) and rk.additional_length == 16 and rk.generation == 2
    assert pr_in(t, PrInAction.READ_KEYS, 0) == b""
    assert pr_in(t, PrInAction.READ_KEYS, 4) == (2).to_bytes(4, "big")


def test_read_reservation(t):
    assert pr_in(t, PrInAction.READ_RESERVATION) == bytes(8)
    register(t, A, K)
    reserve(t, A, K, EA)
    raw = pr_in(t, PrInAction.READ_RESERVATION)
    assert raw == bytes.fromhex("00000001 00000010") + K.to_bytes(8, "big") + bytes(
        5
    ) + b"\x03" + bytes(2)


def test_report_capabilities(t):
    raw = pr_in(t, PrInAction.REPORT_CAPABILITIES)
    assert raw == bytes.fromhex("0008 1d 90 ea01 0000")
    caps = ReportCapabilities.decode(raw)
    assert caps.crh and caps.sip_c and caps.atp_c and caps.ptpl_c and caps.tmv
    assert not caps.rlr_c and not caps.ptpl_a
    assert caps.types == VALID_PR_TYPES
    assert pr_in(t, PrInAction.REPORT_CAPABILITIES, 3) == raw[:3]


def test_report_capabilities_ptpl_a_follows_aptpl(tmp_path, ua):
    t = ReservationTable(ua, tmp_path / "pr.json")
    register(t, A, K, aptpl=True)
    assert ReportCapabilities.decode(pr_in(t, PrInAction.REPORT_CAPABILITIES)).ptpl_a


def test_read_full_status(t):
    register(t, A, K)
    register(t, B, KB, all_tg_pt=True)
    register(t, A_P2, KC)
    reserve(t, A, K, WE_RO)
    st = full(t)
    assert st.generation == 3
    by_key = {e.key: e for e in st.entries}
    assert by_key[K].holder and by_key[K].rtype == WE_RO and by_key[K].rel_tgt_port == 1
    assert by_key[K].transport_id == TransportId("iqn.host:a", 1)
    assert by_key[K].transport_id.isid is not None  # format 01b
    assert not by_key[KB].holder and by_key[KB].all_tg_pt and by_key[KB].rtype == 0
    assert not by_key[KC].holder and by_key[KC].rel_tgt_port == 2
    raw = pr_in(t, PrInAction.READ_FULL_STATUS, 40)
    assert len(raw) == 40
    assert ReadFullStatus.decode(raw).additional_length == len(st.encode()) - 8


@pytest.mark.parametrize("rtype", [WE_AR, EA_AR])
def test_read_full_status_all_registrants_are_holders(t, rtype):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, B, KB, rtype)
    assert all(e.holder and e.rtype == rtype for e in full(t).entries)


@pytest.mark.parametrize("sa", [4, 5, 0x10, 0x1F])
def test_pr_in_invalid_service_action(t, sa):
    with check(Sense.INVALID_FIELD_IN_CDB):
        t.persistent_reserve_in(A, pr_in_cdb(sa, 100))


# ===================================================================== generation


def test_generation_wraps(t):
    t._generation = 0xFFFFFFFF
    register(t, A, K)
    assert t.generation == 0


def test_generation_not_bumped_by_failures_or_pr_in(t):
    register(t, A, K)
    for _ in range(3):
        with pytest.raises(ReservationConflict):
            out(t, B, PrOutAction.REGISTER, 1, 2)
        keys(t)
    assert t.generation == 1


# ===================================================================== APTPL


def test_aptpl_survives_restart(tmp_path, ua):
    path = tmp_path / "lun0-pr.json"
    t = ReservationTable(ua, path)
    register(t, A, K, aptpl=True)
    register(t, B, KB, aptpl=True, all_tg_pt=True)
    reserve(t, A, K, EA_RO)
    assert path.exists()
    t2 = ReservationTable(UaLog(), path)
    assert t2.generation == t.generation
    assert t2.aptpl
    assert t2.registration_of(A).key == K
    assert t2.registration_of(Nexus.make("iqn.host:b", 1, T, rel_port=3)).key == KB
    assert t2.is_holder(A) and t2.reservation.rtype == EA_RO
    assert full(t2) == full(t)


def test_aptpl_all_registrants_survives(tmp_path, ua):
    path = tmp_path / "pr.json"
    t = ReservationTable(ua, path)
    register(t, A, K, aptpl=True)
    reserve(t, A, K, WE_AR)
    t2 = ReservationTable(ua, path)
    assert t2.reservation.rtype == WE_AR and t2.is_holder(A)


def test_last_register_without_aptpl_forgets(tmp_path, ua):
    path = tmp_path / "pr.json"
    t = ReservationTable(ua, path)
    register(t, A, K, aptpl=True)
    register(t, B, KB)  # the last REGISTER decides: APTPL off
    assert not path.exists()
    t2 = ReservationTable(ua, path)
    assert t2.registrations == () and t2.generation == 0


def test_aptpl_state_follows_changes(tmp_path, ua):
    path = tmp_path / "pr.json"
    t = ReservationTable(ua, path)
    register(t, A, K, aptpl=True)
    register(t, B, KB, aptpl=True)
    out(t, A, PrOutAction.CLEAR, K, 0)
    state = json.loads(path.read_text())
    assert state["registrations"] == [] and state["reservation"] is None
    assert ReservationTable(ua, path).registrations == ()


def test_no_state_path_means_no_file(tmp_path, ua):
    t = ReservationTable(ua, None)
    register(t, A, K, aptpl=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"version": 99}',
        '{"version": 1, "registrations": [{"key": 1}]}',
        '{"version": 1, "registrations": [], "reservation": {"type": 1, "holder": 0}}',
        '{"version": 1, "registrations": [], "reservation": {"type": 1, "holder": null}}',
    ],
)
def test_corrupt_state_file(tmp_path, ua, content):
    path = tmp_path / "pr.json"
    path.write_text(content)
    with pytest.raises(PersistError):
        ReservationTable(ua, path)


def test_state_file_written_atomically(tmp_path, ua):
    path = tmp_path / "pr.json"
    t = ReservationTable(ua, path)
    register(t, A, K, aptpl=True)
    assert [p.name for p in tmp_path.iterdir()] == ["pr.json"]  # no temp file left


# ===================================================================== SCSI-2


RESERVE6 = bytes((Opcode.RESERVE_6, 0, 0, 0, 0, 0))
RELEASE6 = bytes((Opcode.RELEASE_6, 0, 0, 0, 0, 0))
MODE_SENSE6 = bytes((Opcode.MODE_SENSE_6, 0, 0x3F, 0, 0xFF, 0))
INQUIRY = bytes((Opcode.INQUIRY, 0, 0, 0, 0x60, 0))
REPORT_LUNS = bytes((Opcode.REPORT_LUNS,)) + bytes(11)
TUR = bytes(6)


def test_scsi2_two_initiators(t):
    t.reserve(A, RESERVE6)
    t.reserve(A, RESERVE6)  # again from the holder: GOOD
    assert t.conflicts(B, RESERVE6)
    with pytest.raises(ReservationConflict):
        t.reserve(B, RESERVE6)
    assert not t.conflicts(B, RELEASE6)
    t.release(B, RELEASE6)  # no-op
    assert t.scsi2_holder == A
    assert not t.conflicts(A, MODE_SENSE6)
    assert t.conflicts(B, MODE_SENSE6)
    assert t.conflicts(B, READ10) and t.conflicts(B, WRITE10) and t.conflicts(B, TUR)
    assert not t.conflicts(B, INQUIRY) and not t.conflicts(B, REPORT_LUNS)
    t.release(A, RELEASE6)
    t.reserve(B, RESERVE6)
    assert t.scsi2_holder == B


def test_scsi2_blocks_pr_in_and_out_from_everyone(t):
    t.reserve(A, RESERVE6)
    for n in (A, B):
        assert t.conflicts(n, pr_in_cdb(PrInAction.READ_KEYS, 100))
        assert t.conflicts(n, pr_out_cdb(PrOutAction.REGISTER))
        with pytest.raises(ReservationConflict):
            t.persistent_reserve_in(n, pr_in_cdb(PrInAction.READ_KEYS, 100))
        with pytest.raises(ReservationConflict):
            register(t, n, K)


def test_scsi2_dropped_by_nexus_loss_and_reset_pr_survives(t):
    register(t, B, KB)
    reserve(t, B, KB, WE)
    out(t, B, PrOutAction.RELEASE, KB, 0, WE)
    out(t, B, PrOutAction.REGISTER, KB, 0)
    t.reserve(A, RESERVE6)
    t.nexus_lost(B)
    assert t.scsi2_holder == A
    t.nexus_lost(A)
    assert t.scsi2_holder is None
    t.reserve(A, RESERVE6)
    t.reset()
    assert t.scsi2_holder is None


def test_nexus_loss_and_reset_keep_persistent_state(t):
    register(t, A, K)
    reserve(t, A, K, WE)
    t.nexus_lost(A)
    t.reset()
    assert t.is_holder(A) and keys(t) == [K]


def test_crh_reserve_release_with_registrations(t):
    register(t, A, K)
    with pytest.raises(ReservationConflict):
        t.reserve(A, RESERVE6)  # registered, no persistent reservation
    t.release(A, RELEASE6)  # registered: GOOD, no effect
    with pytest.raises(ReservationConflict):
        t.release(C, RELEASE6)  # unregistered
    reserve(t, A, K, WE)
    t.reserve(A, RESERVE6)  # PR holder: GOOD, nothing changes
    assert t.scsi2_holder is None and resv(t).rtype == WE
    t.release(A, RELEASE6)
    assert resv(t).rtype == WE
    register(t, B, KB)
    with pytest.raises(ReservationConflict):
        t.reserve(B, RESERVE6)  # registered, WE held by another


def test_crh_registrant_of_shared_type_may_reserve(t):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, A, K, WE_RO)
    t.reserve(B, RESERVE6)
    assert t.scsi2_holder is None


def test_reserve10_third_party_rejected(t):
    cdb = bytes((Opcode.RESERVE_10, 0x10)) + bytes(8)
    with check(Sense.INVALID_FIELD_IN_CDB):
        t.reserve(A, cdb)


# ===================================================================== conflict table

# (holder read, holder write, registrant read, registrant write, other read, other write)
# True = allowed. SPC-5 5.14.2 / libiscsi verify_persistent_reserve_access.
ACCESS = {
    WE: (True, True, True, False, True, False),
    EA: (True, True, False, False, False, False),
    WE_RO: (True, True, True, True, True, False),
    EA_RO: (True, True, True, True, False, False),
    WE_AR: (True, True, True, True, True, False),
    EA_AR: (True, True, True, True, False, False),
}


@pytest.mark.parametrize("rtype", ALL_TYPES)
def test_conflict_matrix(t, rtype):
    register(t, A, K)
    register(t, B, KB)
    reserve(t, A, K, rtype)
    got = tuple(not t.conflicts(n, cdb) for n in (A, B, C) for cdb in (READ10, WRITE10))
    assert got == ACCESS[rtype]


def test_no_reservation_nothing_conflicts(t):
    register(t, A, K)
    for n in (A, B):
        assert not t.conflicts(n, READ10) and not t.conflicts(n, WRITE10)


ALWAYS = [
    INQUIRY,
    REPORT_LUNS,
    TUR,
    bytes((Opcode.REQUEST_SENSE, 0, 0, 0, 18, 0)),
    bytes((Opcode.LOG_SENSE,)) + bytes(9),
    bytes((Opcode.READ_CAPACITY_10,)) + bytes(9),
    bytes((Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16)) + bytes(14),
    bytes((Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES)) + bytes(10),
    pr_in_cdb(PrInAction.READ_KEYS, 100),
    pr_out_cdb(PrOutAction.REGISTER),
    pr_out_cdb(PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY),
]
READS = [
    bytes((op,)) + bytes(15)
    for op in (
        Opcode.READ_6,
        Opcode.READ_12,
        Opcode.READ_16,
        Opcode.VERIFY_10,
        Opcode.VERIFY_16,
        Opcode.PRE_FETCH_10,
        Opcode.MODE_SENSE_10,
    )
] + [bytes((Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS)) + bytes(14)]
WRITES = [
    bytes((op,)) + bytes(15)
    for op in (
        Opcode.WRITE_6,
        Opcode.WRITE_16,
        Opcode.WRITE_ATOMIC_16,
        Opcode.WRITE_SAME_10,
        Opcode.WRITE_SAME_16,
        Opcode.UNMAP,
        Opcode.COMPARE_AND_WRITE,
        Opcode.SYNCHRONIZE_CACHE_10,
        Opcode.SYNCHRONIZE_CACHE_16,
        Opcode.MODE_SELECT_6,
        Opcode.MODE_SELECT_10,
        Opcode.FORMAT_UNIT,
        Opcode.WRITE_AND_VERIFY_16,
    )
] + [bytes((Opcode.START_STOP_UNIT, 0, 0, 0, 0x00, 0))]


def test_always_allowed_under_exclusive_access(t):
    register(t, A, K)
    reserve(t, A, K, EA)
    for cdb in ALWAYS:
        assert not t.conflicts(C, cdb), cdb.hex()


def test_reads_and_writes_classes_under_we_and_ea(t):
    register(t, A, K)
    reserve(t, A, K, WE)
    for cdb in READS:
        assert not t.conflicts(C, cdb), cdb.hex()
    for cdb in WRITES:
        assert t.conflicts(C, cdb), cdb.hex()
    out(t, A, PrOutAction.PREEMPT, K, K, EA)
    for cdb in READS + WRITES:
        assert t.conflicts(C, cdb), cdb.hex()
        assert not t.conflicts(A, cdb), cdb.hex()


def test_start_stop_and_prevent_allow_refinements():
    assert classify(bytes((Opcode.START_STOP_UNIT, 0, 0, 0, 0x01, 0))) is Access.ALWAYS
    assert classify(bytes((Opcode.START_STOP_UNIT, 0, 0, 0, 0x00, 0))) is Access.WRITE
    assert classify(bytes((Opcode.START_STOP_UNIT, 0, 0, 0, 0x11, 0))) is Access.WRITE
    assert classify(bytes((Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0, 0))) is Access.ALWAYS
    assert classify(bytes((Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0))) is Access.WRITE


@pytest.mark.parametrize(
    "sa, conflicts",
    [
        (PrOutAction.REGISTER, False),
        (PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, False),
        (PrOutAction.RESERVE, True),
        (PrOutAction.RELEASE, True),
        (PrOutAction.CLEAR, True),
        (PrOutAction.PREEMPT, True),
        (PrOutAction.PREEMPT_AND_ABORT, True),
        (PrOutAction.REGISTER_AND_MOVE, True),
    ],
)
def test_pr_out_from_unregistered(t, sa, conflicts):
    register(t, A, K)
    reserve(t, A, K, EA)
    assert t.conflicts(C, pr_out_cdb(sa)) is conflicts


def test_every_opcode_is_classified():
    sa_based = {
        Opcode.PERSISTENT_RESERVE_OUT,
        Opcode.SERVICE_ACTION_IN_16,
        Opcode.MAINTENANCE_IN,
        Opcode.SERVICE_ACTION_OUT_16,
    }
    missing = [op.name for op in Opcode if op not in OPCODE_ACCESS and op not in sa_based]
    assert missing == []
    for op in Opcode:
        assert isinstance(classify(bytes((op,)) + bytes(15)), Access)
    assert classify(b"\xc0" + bytes(9)) is Access.WRITE  # unknown: the safe side


def test_no_reservation_fast_path_matches_the_table() -> None:
    """The fast path in conflicts() must agree with NO_RESERVATION for every other opcode."""
    from prmigrate.lun.conflicts import NO_RESERVATION, classify
    from prmigrate.lun.pr import _CHECKED_WITHOUT_RESERVATION

    for op in range(256):
        if op in _CHECKED_WITHOUT_RESERVATION:
            continue
        for sa in range(32):
            access = classify(bytes([op, sa]) + bytes(14))
            row = NO_RESERVATION.get(access)
            if row is not None:
                assert not any(row), (hex(op), sa, access)
