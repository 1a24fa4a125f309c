"""Snooping: every service action, success and every failure status."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prmigrate.device.identity import SHARED_NEXUS
from prmigrate.device.snoop import PrSnooper
from prmigrate.device.state import DevicePrState, GuestPrState
from prmigrate.lun.types import Result, unit_attention
from prmigrate.scsi.constants import PrOutAction, PrType, Status
from prmigrate.scsi.pr import (
    FullStatusEntry,
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    pr_out_cdb,
    pr_out_params,
    register_and_move_params,
)
from prmigrate.scsi.sense import Sense, encode_sense
from prmigrate.scsi.transport_id import TransportId

G1, G2, G3 = "iqn.a:g1", "iqn.a:g2", "iqn.a:g3"
HOST = "iqn.h:host"
TID = {
    G1: TransportId(HOST, 0x800000000001),
    G2: TransportId(HOST, 0x800000000002),
    G3: TransportId(HOST, 0x800000000003),
}
WE, EA, WE_RO, WE_AR, EA_AR = (
    PrType.WRITE_EXCLUSIVE,
    PrType.EXCLUSIVE_ACCESS,
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
)
GOOD = Result()


def snooper(**guests):
    s = DevicePrState()
    for name, st_ in guests.items():
        s.set(f"iqn.a:{name}", st_)
    return PrSnooper(s, transport_ids=TID)


def out(sn, guest, action, rtype=PrType.NONE, rk=0, sark=0, *, status=GOOD, scope=0, **flags):
    params = pr_out_params(rk, sark, **flags)
    return sn.observe(guest, pr_out_cdb(action, rtype, scope, len(params)), params, status)


def g(key=0, holder=False, rtype=PrType.NONE, aptpl=False, scope=0):
    return GuestPrState(key, aptpl, holder, rtype, scope)


# ------------------------------------------------------------ REGISTER


def test_register_new_registration():
    sn = snooper()
    o = out(sn, G1, PrOutAction.REGISTER, sark=0xAA, aptpl=True)
    assert sn.state.get(G1) == g(0xAA, aptpl=True)
    assert o.changed and o.action is PrOutAction.REGISTER
    assert o.verify  # could have joined an all-registrants reservation held elsewhere
    assert G1 in sn.pending_verification


def test_register_new_joins_known_all_registrants_reservation():
    sn = snooper(g2=g(0xBB, True, WE_AR))
    out(sn, G1, PrOutAction.REGISTER, sark=0xAA)
    assert sn.state.get(G1) == g(0xAA, True, WE_AR)


def test_register_changes_key_keeps_reservation():
    sn = snooper(g1=g(0xAA, True, WE))
    o = out(sn, G1, PrOutAction.REGISTER, rk=0xAA, sark=0xCC)
    assert sn.state.get(G1) == g(0xCC, True, WE)
    assert not o.verify


def test_register_unregister_drops_non_ar_reservation():
    sn = snooper(g1=g(0xAA, True, EA))
    o = out(sn, G1, PrOutAction.REGISTER, rk=0xAA, sark=0)
    assert sn.state.get(G1).empty and not o.verify
    assert "releasing" in o.note


def test_register_unregister_ar_holder_leaves_others_holding():
    sn = snooper(g1=g(0xAA, True, WE_AR), g2=g(0xBB, True, WE_AR))
    out(sn, G1, PrOutAction.REGISTER, rk=0xAA, sark=0)
    assert sn.state.get(G1).empty
    assert sn.state.get(G2) == g(0xBB, True, WE_AR)


def test_register_unregistered_sark_zero_is_noop():
    sn = snooper()
    o = out(sn, G1, PrOutAction.REGISTER)
    assert not o.changed and not o.verify


def test_register_good_with_other_rk_means_stale_view():
    sn = snooper(g1=g(0xAA))
    o = out(sn, G1, PrOutAction.REGISTER, rk=0x77, sark=0xCC)
    assert sn.state.get(G1).key == 0xCC and o.verify


def test_register_and_ignore_existing_key():
    sn = snooper(g1=g(0xAA, True, WE))
    o = out(sn, G1, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, rk=0x1234, sark=0xDD, aptpl=True)
    assert sn.state.get(G1) == g(0xDD, True, WE, aptpl=True) and not o.verify
    o = out(sn, G1, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, rk=0x5, sark=0)
    assert sn.state.get(G1).empty


# ------------------------------------------------------------ RESERVE / RELEASE


@pytest.mark.parametrize("rtype", [WE, EA, WE_RO, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY])
def test_reserve(rtype):
    sn = snooper(g1=g(0xAA))
    o = out(sn, G1, PrOutAction.RESERVE, rtype, rk=0xAA)
    assert sn.state.get(G1) == g(0xAA, True, rtype) and not o.verify


@pytest.mark.parametrize("rtype", [WE_AR, EA_AR])
def test_reserve_all_registrants_makes_every_registered_guest_a_holder(rtype):
    sn = snooper(g1=g(0xAA), g2=g(0xBB))
    out(sn, G1, PrOutAction.RESERVE, rtype, rk=0xAA)
    assert sn.state.get(G1) == g(0xAA, True, rtype)
    assert sn.state.get(G2) == g(0xBB, True, rtype)


def test_reserve_invalid_type_good_changes_nothing():
    sn = snooper(g1=g(0xAA))
    o = out(sn, G1, PrOutAction.RESERVE, 2, rk=0xAA)
    assert not o.changed and o.verify


def test_reserve_by_one_guest_ends_a_stale_reservation_of_another():
    sn = snooper(g1=g(0xAA, True, WE), g2=g(0xBB))
    o = out(sn, G2, PrOutAction.RESERVE, EA, rk=0xBB)
    assert sn.state.get(G2) == g(0xBB, True, EA) and sn.state.get(G1) == g(0xAA)
    assert o.verify


def test_reserve_unregistered_view_is_stale():
    sn = snooper()
    o = out(sn, G1, PrOutAction.RESERVE, WE, rk=0xAA)
    assert sn.state.get(G1) == g(0xAA, True, WE) or sn.state.get(G1).holder
    assert o.verify


def test_release_by_holder():
    sn = snooper(g1=g(0xAA, True, WE))
    o = out(sn, G1, PrOutAction.RELEASE, WE, rk=0xAA)
    assert sn.state.get(G1) == g(0xAA) and not o.verify


def test_release_by_non_holder_is_noop():
    sn = snooper(g1=g(0xAA), g2=g(0xBB, True, WE))
    o = out(sn, G1, PrOutAction.RELEASE, WE, rk=0xAA)
    assert not o.changed and not o.verify


def test_release_type_mismatch_good_is_suspicious():
    sn = snooper(g1=g(0xAA, True, WE))
    o = out(sn, G1, PrOutAction.RELEASE, EA, rk=0xAA)
    assert not o.changed and o.verify


def test_release_all_registrants_releases_for_everyone():
    sn = snooper(g1=g(0xAA, True, EA_AR), g2=g(0xBB, True, EA_AR))
    out(sn, G1, PrOutAction.RELEASE, EA_AR, rk=0xAA)
    assert sn.state.get(G1) == g(0xAA) and sn.state.get(G2) == g(0xBB)


# ------------------------------------------------------------ CLEAR


def test_clear_empties_every_guest():
    sn = snooper(g1=g(0xAA, True, WE), g2=g(0xBB), g3=g(0xCC, aptpl=True))
    o = out(sn, G2, PrOutAction.CLEAR, rk=0xBB)
    assert sn.state.guests == {} and not o.verify
    assert {c.guest for c in o.changes} == {G1, G2, G3}


# ------------------------------------------------------------ PREEMPT


@pytest.mark.parametrize("action", [PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT])
def test_preempt_other_guest_holder(action):
    sn = snooper(g1=g(0xAA), g2=g(0xBB, True, WE))
    o = out(sn, G1, action, EA, rk=0xAA, sark=0xBB)
    assert sn.state.get(G1) == g(0xAA, True, EA)
    assert sn.state.get(G2).empty
    assert o.verify  # PREEMPT is always verified


@pytest.mark.parametrize("action", [PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT])
def test_preempt_self_changes_type(action):
    sn = snooper(g1=g(0xAA, True, WE))
    out(sn, G1, action, EA, rk=0xAA, sark=0xAA)
    assert sn.state.get(G1) == g(0xAA, True, EA)


def test_preempt_migration_takeover_removes_same_key_guests():
    # Destination registered K and preempts RK = SARK = K: every other nexus with K goes.
    sn = snooper(g1=g(0x4B), g2=g(0x4B, True, WE))
    out(sn, G1, PrOutAction.PREEMPT, WE, rk=0x4B, sark=0x4B)
    assert sn.state.get(G1) == g(0x4B, True, WE) and sn.state.get(G2).empty


def test_preempt_outsider_needs_verification():
    sn = snooper(g1=g(0xAA))
    o = out(sn, G1, PrOutAction.PREEMPT, WE, rk=0xAA, sark=0x99)
    assert sn.state.get(G1) == g(0xAA) and o.verify and G1 in sn.pending_verification
    # the shell reads the reservation: held by us now
    v = sn.apply_read_reservation(G1, ReadReservation(5, 0xAA, 0, WE))
    assert sn.state.get(G1) == g(0xAA, True, WE) and not v.verify
    assert G1 not in sn.pending_verification and sn.state.generation == 5


def test_preempt_non_holder_key_leaves_our_reservation():
    sn = snooper(g1=g(0xAA, True, WE), g2=g(0xBB))
    out(sn, G1, PrOutAction.PREEMPT, EA, rk=0xAA, sark=0xBB)
    assert sn.state.get(G1) == g(0xAA, True, WE) and sn.state.get(G2).empty


def test_preempt_all_registrants_sark_zero():
    sn = snooper(g1=g(0xAA, True, WE_AR), g2=g(0xBB, True, WE_AR), g3=g(0xCC, True, WE_AR))
    out(sn, G1, PrOutAction.PREEMPT, EA, rk=0xAA, sark=0)
    assert sn.state.guests == {G1: g(0xAA, True, EA)}


def test_preempt_all_registrants_nonzero_sark_keeps_reservation():
    sn = snooper(g1=g(0xAA, True, WE_AR), g2=g(0xBB, True, WE_AR))
    out(sn, G1, PrOutAction.PREEMPT, EA, rk=0xAA, sark=0xBB)
    assert sn.state.guests == {G1: g(0xAA, True, WE_AR)}


# ------------------------------------------------------------ REGISTER AND MOVE


def move(sn, guest, tid, rk, sark, *, unreg=False, aptpl=False, status=GOOD):
    params = register_and_move_params(rk, sark, tid, unreg=unreg, aptpl=aptpl)
    return sn.observe(
        guest, pr_out_cdb(PrOutAction.REGISTER_AND_MOVE, 0, 0, len(params)), params, status
    )


def test_register_and_move_to_outsider():
    sn = snooper(g1=g(0xAA, True, EA))
    o = move(sn, G1, TransportId("iqn.z:other", 7), 0xAA, 0xEE)
    assert sn.state.get(G1) == g(0xAA) and not o.verify


def test_register_and_move_unreg():
    sn = snooper(g1=g(0xAA, True, EA))
    move(sn, G1, TransportId("iqn.z:other", 7), 0xAA, 0xEE, unreg=True)
    assert sn.state.get(G1).empty


def test_register_and_move_to_our_other_guest():
    sn = snooper(g1=g(0xAA, True, EA, scope=0))
    o = move(sn, G1, TID[G2], 0xAA, 0xEE, aptpl=True)
    assert sn.state.get(G1) == g(0xAA)
    assert sn.state.get(G2) == g(0xEE, True, EA, aptpl=True)
    assert not o.verify


def test_register_and_move_name_only_is_ambiguous():
    sn = snooper(g1=g(0xAA, True, EA))
    o = move(sn, G1, TransportId(HOST), 0xAA, 0xEE)
    assert o.verify and sn.state.get(G1) == g(0xAA)


def test_register_and_move_by_non_holder_view_is_stale():
    sn = snooper(g1=g(0xAA))
    assert move(sn, G1, TransportId("iqn.z:o", 1), 0xAA, 0xEE).verify


# ------------------------------------------------------------ REPLACE LOST RESERVATION


def test_replace_lost_reservation():
    sn = snooper(g1=g(0xAA))
    o = out(sn, G1, PrOutAction.REPLACE_LOST_RESERVATION, WE, rk=0xAA)
    assert sn.state.get(G1) == g(0xAA, True, WE) and o.verify


def test_replace_lost_reservation_from_unknown_registration():
    sn = snooper()
    out(sn, G1, PrOutAction.REPLACE_LOST_RESERVATION, EA, rk=0x42)
    assert sn.state.get(G1) == g(0x42, True, EA)


# ------------------------------------------------------------ failures change nothing

RICH = dict(g1=g(0xAA, True, WE), g2=g(0xBB, aptpl=True), g3=g(0xCC))
FAILURES = [
    Result(Status.RESERVATION_CONFLICT),
    Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_FIELD_IN_PARAMETER_LIST)),
    Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.PARAMETER_LIST_LENGTH_ERROR)),
    Result(
        Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    ),
    Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.POWER_ON_RESET)),
    Result(Status.CHECK_CONDITION, b"", b""),
    Result(Status.BUSY),
    Result(Status.TASK_SET_FULL),
    Result(Status.ACA_ACTIVE),
    Result(Status.TASK_ABORTED),
    Result(Status.CONDITION_MET),
    Result(0x7E),  # not a status at all
]
ACTION_PARAMS = {
    PrOutAction.REGISTER: (PrType.NONE, 0xAA, 0xDD),
    PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY: (PrType.NONE, 0, 0),
    PrOutAction.RESERVE: (EA, 0xBB, 0),
    PrOutAction.RELEASE: (WE, 0xAA, 0),
    PrOutAction.CLEAR: (PrType.NONE, 0xBB, 0),
    PrOutAction.PREEMPT: (EA, 0xBB, 0xAA),
    PrOutAction.PREEMPT_AND_ABORT: (EA, 0xCC, 0xAA),
    PrOutAction.REPLACE_LOST_RESERVATION: (EA, 0xCC, 0),
}


@pytest.mark.parametrize("result", FAILURES, ids=lambda r: f"{r.status:#x}-{r.sense[12:14].hex()}")
@pytest.mark.parametrize("action", list(PrOutAction))
def test_failure_changes_nothing(action, result):
    sn = snooper(**RICH)
    before = sn.state.to_dict()
    if action is PrOutAction.REGISTER_AND_MOVE:
        o = move(sn, G1, TID[G2], 0xAA, 0xEE, unreg=True, status=result)
    else:
        rtype, rk, sark = ACTION_PARAMS[action]
        who = G2 if action in (PrOutAction.RESERVE, PrOutAction.CLEAR) else G1
        who = G3 if action is PrOutAction.PREEMPT_AND_ABORT else who
        o = out(sn, who, action, rtype, rk, sark, status=result)
    assert not o.changed
    assert {k: v for k, v in sn.state.to_dict().items() if k != "unverified"} == {
        k: v for k, v in before.items() if k != "unverified"
    }
    # the same command with GOOD does change something (so the test means something)
    sn2 = snooper(**RICH)
    if action is PrOutAction.REGISTER_AND_MOVE:
        assert move(sn2, G1, TID[G2], 0xAA, 0xEE, unreg=True).changed
    else:
        assert out(sn2, who, action, rtype, rk, sark).changed


def test_conflict_to_register_with_tracked_key_flags_stale_state():
    sn = snooper(g1=g(0xAA))
    o = out(
        sn, G1, PrOutAction.REGISTER, rk=0xAA, sark=0xBB, status=Result(Status.RESERVATION_CONFLICT)
    )
    assert not o.changed and o.verify
    o = out(
        sn, G2, PrOutAction.REGISTER, rk=0, sark=0xBB, status=Result(Status.RESERVATION_CONFLICT)
    )
    assert o.verify  # we thought G2 unregistered; the target says it is registered
    o = out(sn, G1, PrOutAction.RESERVE, WE, rk=0xAA, status=Result(Status.RESERVATION_CONFLICT))
    assert not o.verify  # someone else holds it: an ordinary conflict


def test_conflict_under_a_known_scsi2_reservation_says_nothing_about_keys():
    """SPC-5 5.14.3: while a SCSI-2 reservation is held every PR OUT
    conflicts, whatever its key: with one the device knows of, a conflict
    does not put the tracked key in doubt (nothing to verify, and a
    verification would conflict too)."""
    sn = snooper(g1=g(0xAA))
    params = pr_out_params(0xAA, 0xBB)
    o = sn.observe(G1, pr_out_cdb(PrOutAction.REGISTER, PrType.NONE, 0, len(params)), params,
                   Result(Status.RESERVATION_CONFLICT), scsi2_held=True)
    assert not o.changed and not o.verify and not sn.state.unverified
    assert sn.state.get(G1) == g(0xAA)


def test_qemu_bug_conflict_does_not_rewrite_key():
    """The seed sets key = SARK even when the target answered RESERVATION CONFLICT."""
    sn = snooper(g1=g(0xAA, True, WE))
    out(
        sn, G1, PrOutAction.REGISTER, rk=0x11, sark=0x22, status=Result(Status.RESERVATION_CONFLICT)
    )
    assert sn.state.get(G1) == g(0xAA, True, WE)


# ------------------------------------------------------------ malformed input


@pytest.mark.parametrize("n", range(24))
def test_short_parameter_list_changes_nothing(n):
    sn = snooper(**RICH)
    before = sn.state.guests.copy()
    params = pr_out_params(0xAA, 0x55)[:n]
    o = sn.observe(G1, pr_out_cdb(PrOutAction.REGISTER, param_len=n), params, GOOD)
    assert sn.state.guests == before and not o.changed and o.verify


def test_parameter_list_length_zero_in_cdb():
    sn = snooper(**RICH)
    before = sn.state.guests.copy()
    sn.observe(G1, pr_out_cdb(PrOutAction.REGISTER, param_len=0), pr_out_params(0xAA, 0x55), GOOD)
    assert sn.state.guests == before


@pytest.mark.parametrize("n", range(10))
def test_truncated_cdb_changes_nothing(n):
    sn = snooper(**RICH)
    before = sn.state.guests.copy()
    o = sn.observe(G1, pr_out_cdb(PrOutAction.CLEAR)[:n], pr_out_params(0xAA), GOOD)
    assert sn.state.guests == before and not o.changed and not o.verify


@pytest.mark.parametrize("sa", range(9, 32))
def test_unknown_service_action_changes_nothing(sa):
    sn = snooper(**RICH)
    before = sn.state.guests.copy()
    o = sn.observe(G1, pr_out_cdb(sa), pr_out_params(0xAA), GOOD)
    assert sn.state.guests == before and not o.changed and "unknown service action" in o.note


def test_longer_cdb_is_fine():
    sn = snooper()
    sn.observe(G1, pr_out_cdb(PrOutAction.REGISTER) + b"\x00" * 6, pr_out_params(0, 9), GOOD)
    assert sn.state.get(G1).key == 9


# ------------------------------------------------------------ unit attentions


def ua(sense, descriptor=False):
    return Result(Status.CHECK_CONDITION, b"", encode_sense(sense, descriptor))


@pytest.mark.parametrize(
    "sense",
    [
        Sense.RESERVATIONS_PREEMPTED,
        Sense.RESERVATIONS_RELEASED,
        Sense.REGISTRATIONS_PREEMPTED,
        Sense.POWER_ON_RESET,
        Sense.I_T_NEXUS_LOSS,
    ],
)
@pytest.mark.parametrize("descriptor", [False, True])
def test_unit_attention_on_any_command_marks_guest(sense, descriptor):
    sn = snooper(g1=g(0xAA, True, WE))
    read10 = bytes([0x28]) + bytes(9)
    o = sn.observe(G1, read10, b"", ua(sense, descriptor))
    assert o.verify and not o.changed and sn.pending_verification == {G1}
    assert sn.state.get(G1) == g(0xAA, True, WE)


def test_unit_attention_on_pr_out_marks_guest():
    sn = snooper(g1=g(0xAA))
    o = out(
        sn, G1, PrOutAction.REGISTER, rk=0xAA, sark=0xBB, status=ua(Sense.REGISTRATIONS_PREEMPTED)
    )
    assert o.verify and not o.changed and "2A/05" in o.note


@pytest.mark.parametrize(
    "result",
    [
        ua(Sense.REPORTED_LUNS_DATA_HAS_CHANGED),
        ua(Sense.MODE_PARAMETERS_CHANGED),
        Result(),
        Result(Status.CHECK_CONDITION, b"", b"\x70\x00"),
        Result(Status.CHECK_CONDITION, b"", b"\x01" * 18),
    ],
)
def test_other_answers_do_not_mark(result):
    sn = snooper(g1=g(0xAA))
    assert not sn.observe(G1, b"\x00" * 6, b"", result).verify
    assert sn.pending_verification == frozenset()


def test_unit_attention():
    assert unit_attention(ua(Sense.RESERVATIONS_PREEMPTED)) == (0x2A, 0x03)
    assert (
        unit_attention(Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_OPCODE)))
        is None
    )
    assert (
        unit_attention(Result(Status.GOOD, b"", encode_sense(Sense.RESERVATIONS_PREEMPTED)))
        is None
    )


# ------------------------------------------------------------ identity=host


def test_host_identity_shares_one_entry():
    sn = PrSnooper(mode="host")
    out(sn, G1, PrOutAction.REGISTER, sark=0xAA)
    out(sn, G2, PrOutAction.RESERVE, WE, rk=0xAA)
    assert set(sn.state.guests) == {SHARED_NEXUS}
    assert sn.state.get(SHARED_NEXUS) == g(0xAA, True, WE)
    assert sn.key_of(G2) == SHARED_NEXUS


# ------------------------------------------------------------ READ RESERVATION feedback


def test_read_reservation_none_clears_holders():
    sn = snooper(g1=g(0xAA, True, WE))
    sn.state.mark_unverified(G1)
    o = sn.apply_read_reservation(G1, ReadReservation(3, None))
    assert sn.state.get(G1) == g(0xAA) and not o.verify and o.changed


def test_read_reservation_other_key():
    sn = snooper(g1=g(0xAA, True, WE))
    sn.apply_read_reservation(G1, ReadReservation(3, 0x99, 0, EA))
    assert sn.state.get(G1) == g(0xAA)


def test_read_reservation_all_registrants():
    sn = snooper(g1=g(0xAA), g2=g(0xBB))
    sn.apply_read_reservation(G1, ReadReservation(3, 0, 0, WE_AR))
    assert sn.state.get(G1) == g(0xAA, True, WE_AR) and sn.state.get(G2) == g(0xBB, True, WE_AR)


def test_read_reservation_ambiguous_key_stays_unverified():
    sn = snooper(g1=g(0xAA), g2=g(0xAA))
    o = sn.apply_read_reservation(G1, ReadReservation(3, 0xAA, 0, WE))
    assert o.verify and G1 in sn.pending_verification


# ------------------------------------------------------------ random input


@settings(max_examples=500)
@given(
    st.binary(max_size=20),
    st.binary(max_size=80),
    st.sampled_from([0, 2, 8, 0x18, 0x28, 0x40, 0x55]),
    st.binary(max_size=30),
)
def test_garbage_never_raises(cdb, data, status, sense):
    sn = snooper(**RICH)
    before = sn.state.guests.copy()
    o = sn.observe(G1, cdb, data, Result(status, b"", sense))
    if status != Status.GOOD:
        assert sn.state.guests == before and not o.changed


@settings(max_examples=500)
@given(
    st.integers(0, 31),
    st.integers(0, 255),
    st.binary(min_size=0, max_size=64),
    st.sampled_from([G1, G2, G3]),
)
def test_garbage_pr_out_never_raises(sa, scope_type, data, guest):
    sn = snooper(**RICH)
    cdb = bytes([0x5F, sa, scope_type, 0, 0]) + len(data).to_bytes(4, "big") + b"\x00"
    sn.observe(guest, cdb, data, GOOD)
    for s in sn.state.guests.values():
        assert not s.empty
        assert s.holder == (s.rtype is not PrType.NONE)


_ACTIONS = st.sampled_from(list(ACTION_PARAMS))
_KEYS = st.sampled_from([0, 0xAA, 0xBB, 0xCC])
_TYPES = st.sampled_from([PrType.NONE, WE, EA, WE_RO, WE_AR, EA_AR])


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.sampled_from([G1, G2, G3]), _ACTIONS, _TYPES, _KEYS, _KEYS), max_size=25)
)
def test_random_good_sequences_keep_invariants(ops):
    sn = snooper()
    for guest, action, rtype, rk, sark in ops:
        out(sn, guest, action, rtype, rk, sark)
        states = sn.state.guests.values()
        holders = [s for s in states if s.holder]
        for s in states:
            assert s.holder == (s.rtype is not PrType.NONE)
        # SPC-5 5.14.10: one reservation: a single holder, or all-registrants of one type
        assert len(holders) <= 1 or len({(s.rtype, s.scope) for s in holders}) == 1
        assert all(s.rtype.all_registrants for s in holders) or len(holders) <= 1
        DevicePrState.from_dict(sn.state.to_dict())


# ------------------------------------------------------------ full status / keys feedback


def test_apply_full_status_uses_known_ports():
    sn = snooper(g1=g(0xAA, True, WE), g2=g(0xBB))
    sn.state.mark_unverified(G1)
    fs = ReadFullStatus(12, (FullStatusEntry(0xBB, False, True, 0, EA, 1, TID[G2]),))
    changes = sn.apply_full_status(fs)
    assert {c.guest for c in changes} == {G1, G2}
    assert sn.state.get(G1).empty and sn.state.get(G2) == g(0xBB, True, EA)
    assert sn.state.generation == 12 and not sn.pending_verification


def test_apply_full_status_host_identity():
    sn = PrSnooper(mode="host")
    sn.set_transport_id(G1, TID[G1])
    sn.apply_full_status([FullStatusEntry(0x5, False, False, 0, 0, 1, TID[G1])])
    assert sn.state.guests == {SHARED_NEXUS: g(0x5)}


def test_apply_keys():
    sn = snooper(g1=g(0xAA, True, WE), g2=g(0xBB))
    sn.state.mark_unverified(G1)
    r = sn.apply_keys(ReadKeys(3, (0xBB,)), ReadReservation(3, None))
    assert sn.state.get(G1).empty and sn.state.get(G2) == g(0xBB)
    assert r.undetermined() == {G2} and not sn.pending_verification


# ------------------------------------------------------------ PRgeneration in PR IN answers


@pytest.mark.parametrize("action", [0, 1, 3])
def test_pr_in_generation_change_triggers_verification(action):
    from prmigrate.scsi.pr import pr_in_cdb

    sn = snooper(g1=g(0xAA))
    cdb = pr_in_cdb(action, 0x200)
    answer = ReadKeys(7, (0xAA,)).encode()
    assert not sn.observe(
        G1, cdb, b"", Result(Status.GOOD, answer)
    ).verify  # generation unknown yet
    sn.state.generation = 7
    assert not sn.observe(G1, cdb, b"", Result(Status.GOOD, answer)).verify
    o = sn.observe(G1, cdb, b"", Result(Status.GOOD, ReadKeys(8, (0xAA,)).encode()))
    assert o.verify and not o.changed and G1 in sn.pending_verification


def test_pr_in_other_answers_ignored():
    from prmigrate.scsi.pr import pr_in_cdb

    sn = snooper(g1=g(0xAA))
    sn.state.generation = 1
    caps = pr_in_cdb(2, 8)
    assert not sn.observe(
        G1, caps, b"", Result(Status.GOOD, b"\x00\x08\x1d\x81\xea\x01\x00\x00")
    ).verify
    keys = pr_in_cdb(0, 8)
    assert not sn.observe(G1, keys, b"", Result(Status.GOOD, b"\x00\x00")).verify  # too short
    assert not sn.observe(G1, keys[:5], b"", Result(Status.GOOD, bytes(8))).verify  # bad CDB


def test_own_commands_keep_expected_generation_in_step():
    from prmigrate.scsi.pr import pr_in_cdb

    sn = snooper(g1=g(0xAA))
    sn.state.generation = 0xFFFFFFFF
    out(sn, G1, PrOutAction.REGISTER, rk=0xAA, sark=0xAB)  # bumps, wraps
    out(sn, G1, PrOutAction.RESERVE, WE, rk=0xAB)  # does not bump
    out(sn, G1, PrOutAction.REGISTER, rk=0x1, sark=0x2, status=Result(Status.RESERVATION_CONFLICT))
    assert sn.state.generation == 0
    keys = pr_in_cdb(0, 64)
    assert not sn.observe(G1, keys, b"", Result(Status.GOOD, ReadKeys(0, (0xAB,)).encode())).verify


@settings(max_examples=300)
@given(
    st.integers(0, 31),
    st.binary(max_size=12),
    st.binary(max_size=40),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_garbage_pr_in_never_raises(sa, tail, data, generation):
    sn = snooper(**RICH)
    sn.state.generation = generation
    before = sn.state.guests.copy()
    sn.observe(G1, bytes([0x5E, sa]) + tail, b"", Result(Status.GOOD, data))
    assert sn.state.guests == before
