import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.device.reconcile import (
    ReconcileError,
    UnknownKind,
    reconcile_full_status,
    reconcile_keys,
)
from prmigrate.device.state import DevicePrState, GuestPrState
from prmigrate.scsi.constants import PrType
from prmigrate.scsi.pr import FullStatusEntry, ReadFullStatus, ReadKeys, ReadReservation
from prmigrate.scsi.transport_id import TransportId

HOST = "iqn.h:host"
G1, G2 = "iqn.a:g1", "iqn.a:g2"
T1, T2 = TransportId(HOST, 0x800000000001), TransportId(HOST, 0x800000000002)
IDS = {G1: T1, G2: T2}
OTHER = TransportId("iqn.z:other", 0x1)
WE, EA, WE_AR = (
    PrType.WRITE_EXCLUSIVE,
    PrType.EXCLUSIVE_ACCESS,
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
)


def g(key=0, holder=False, rtype=PrType.NONE, aptpl=False, scope=0):
    return GuestPrState(key, aptpl, holder, rtype, scope)


def state(**guests):
    s = DevicePrState()
    for name, v in guests.items():
        s.set(f"iqn.a:{name}", v)
    return s


def e(tid, key, holder=False, rtype=PrType.NONE, port=1, all_tg_pt=False):
    return FullStatusEntry(key, all_tg_pt, holder, 0, rtype if holder else 0, port, tid)


def test_exact_match_no_changes():
    s = state(g1=g(0xAA, True, WE, aptpl=True), g2=g(0xBB))
    fs = ReadFullStatus(9, (e(T1, 0xAA, True, WE), e(T2, 0xBB), e(OTHER, 0xCC)))
    new, changes = reconcile_full_status(s, fs, IDS)
    assert changes == [] and new.generation == 9
    assert new.get(G1) == g(
        0xAA, True, WE, aptpl=True
    )  # APTPL kept: FULL STATUS does not report it


def test_preempted_registration_dropped():
    s = state(g1=g(0xAA, True, WE), g2=g(0xBB))
    s.mark_unverified(G1)
    new, changes = reconcile_full_status(s, [e(OTHER, 0xCC, True, EA), e(T2, 0xBB)], IDS)
    assert new.get(G1).empty and new.get(G2) == g(0xBB)
    assert [c.guest for c in changes] == [G1] and "gone" in changes[0].reason
    assert not new.unverified
    assert s.get(G1).key == 0xAA  # input untouched


def test_reservation_taken_outside_the_guest_is_adopted():
    s = state(g1=g(0xAA))
    new, changes = reconcile_full_status(s, [e(T1, 0xAA, True, EA)], IDS)
    assert new.get(G1) == g(0xAA, True, EA)
    assert "adopted" in changes[0].reason


def test_registration_made_outside_the_guest_is_found():
    new, changes = reconcile_full_status(DevicePrState(), [e(T2, 0x77)], IDS)
    assert new.get(G2) == g(0x77) and changes[0].guest == G2


def test_key_changed_behind_our_back_drops_aptpl():
    s = state(g1=g(0xAA, aptpl=True))
    new, _ = reconcile_full_status(s, [e(T1, 0xAB)], IDS)
    assert new.get(G1) == g(0xAB)


def test_same_key_on_another_initiator_is_not_ours():
    # migration: the destination host registered the same key and took the reservation
    s = state(g1=g(0xAA, True, WE))
    dest = TransportId("iqn.h:host2", 0x800000000001)
    new, _ = reconcile_full_status(s, [e(T1, 0xAA), e(dest, 0xAA, True, WE)], IDS)
    assert new.get(G1) == g(0xAA)


def test_isid_and_name_case_matter_correctly():
    upper = TransportId(HOST.upper(), T1.isid)
    other_isid = TransportId(HOST, 0x800000000009)
    new, _ = reconcile_full_status(DevicePrState(), [e(upper, 0x1), e(other_isid, 0x2)], IDS)
    assert new.get(G1) == g(0x1) and new.get(G2).empty


def test_name_only_entry_applies_to_every_port_of_the_name():
    new, _ = reconcile_full_status(DevicePrState(), [e(TransportId(HOST), 0x5)], IDS)
    assert new.get(G1) == g(0x5) and new.get(G2) == g(0x5)


def test_several_target_ports_prefers_holder_entry():
    new, _ = reconcile_full_status(
        DevicePrState(), [e(T1, 0x5, port=1), e(T1, 0x5, True, EA, port=2)], IDS
    )
    assert new.get(G1) == g(0x5, True, EA)


def test_all_registrants_every_registrant_holds():
    fs = [e(T1, 0x1, True, WE_AR), e(T2, 0x2, True, WE_AR), e(OTHER, 0x3, True, WE_AR)]
    new, _ = reconcile_full_status(DevicePrState(), fs, IDS)
    assert new.get(G1) == g(0x1, True, WE_AR) and new.get(G2) == g(0x2, True, WE_AR)


def test_guests_outside_nexus_ids_are_kept():
    s = state(g1=g(0xAA), g3=g(0x33))
    s.mark_unverified("iqn.a:g3")
    new, _ = reconcile_full_status(s, [], {G1: T1})
    assert new.get(G1).empty and new.get("iqn.a:g3") == g(0x33)
    assert new.unverified == {"iqn.a:g3"}


def test_truncated_full_status_refused():
    fs = ReadFullStatus.decode(ReadFullStatus(1, (e(T1, 0x1), e(T2, 0x2))).encode()[:40])
    assert fs.truncated
    with pytest.raises(ReconcileError):
        reconcile_full_status(DevicePrState(), fs, IDS)


def test_unknown_type_code_in_entry():
    new, _ = reconcile_full_status(
        DevicePrState(), [FullStatusEntry(0x1, False, True, 0, 0xF, 1, T1)], IDS
    )
    assert new.get(G1).key == 0x1  # never raises; the type is unknown
    assert new.get(G1).rtype is PrType.NONE


# ------------------------------------------------------------ READ KEYS fallback


def test_keys_missing_key_dropped():
    s = state(g1=g(0xAA, True, WE), g2=g(0xBB))
    r = reconcile_keys(s, ReadKeys(4, (0xBB,)), ReadReservation(4, None))
    assert r.state.get(G1).empty and r.state.get(G2) == g(0xBB)
    assert [c.guest for c in r.changes] == [G1]
    assert r.undetermined() == {G2} and r.unknown[0].kind is UnknownKind.KEY_OWNER
    assert r.state.generation == 4 and not r.state.unverified


def test_keys_no_reservation_clears_holder():
    r = reconcile_keys(state(g1=g(0xAA, True, WE)), ReadKeys(1, (0xAA,)), ReadReservation(1, None))
    assert r.state.get(G1) == g(0xAA)


def test_keys_reservation_with_other_key():
    r = reconcile_keys(
        state(g1=g(0xAA, True, WE)), ReadKeys(1, (0xAA, 0xCC)), ReadReservation(1, 0xCC, 0, EA)
    )
    assert r.state.get(G1) == g(0xAA)


def test_keys_all_registrants():
    r = reconcile_keys(
        state(g1=g(0xAA), g2=g(0xBB)), ReadKeys(1, (0xAA, 0xBB)), ReadReservation(1, 0, 0, WE_AR)
    )
    assert r.state.get(G1) == g(0xAA, True, WE_AR) and r.state.get(G2) == g(0xBB, True, WE_AR)


def test_keys_our_holder_keeps_it_with_type_update():
    r = reconcile_keys(
        state(g1=g(0xAA, True, WE)), ReadKeys(1, (0xAA,)), ReadReservation(1, 0xAA, 0, EA)
    )
    assert r.state.get(G1) == g(0xAA, True, EA)
    assert r.undetermined(frozenset({UnknownKind.RESERVATION_OWNER})) == frozenset()


def test_keys_cannot_tell_who_holds_our_key():
    # Not tracked as holder, but a reservation carries our key: ours (taken outside the
    # guest) or another initiator's registered with the same key? Kept, reported.
    s = state(g1=g(0xAA))
    s.mark_unverified(G1)
    r = reconcile_keys(s, ReadKeys(1, (0xAA, 0xAA)), ReadReservation(1, 0xAA, 0, WE))
    assert r.state.get(G1) == g(0xAA)
    assert {u.kind for u in r.unknown} == {UnknownKind.KEY_OWNER, UnknownKind.RESERVATION_OWNER}
    assert G1 in r.state.unverified
    assert "cannot tell" in r.unknown[-1].describe()


def test_keys_two_guests_same_key():
    r = reconcile_keys(
        state(g1=g(0xAA, True, WE), g2=g(0xAA)),
        ReadKeys(1, (0xAA, 0xAA)),
        ReadReservation(1, 0xAA, 0, WE),
    )
    assert r.state.get(G1) == g(0xAA, True, WE)
    assert r.undetermined(frozenset({UnknownKind.RESERVATION_OWNER})) == {G1, G2}


def test_keys_truncated_refused():
    rk = ReadKeys.decode(ReadKeys(1, (1, 2, 3)).encode()[:20])
    with pytest.raises(ReconcileError):
        reconcile_keys(DevicePrState(), rk, ReadReservation(1, None))


_KEY = st.sampled_from([0x1, 0x2, 0x3])
_GS = st.sampled_from([PrType.NONE, WE, EA, WE_AR])


@given(
    st.dictionaries(
        st.sampled_from([G1, G2, "iqn.a:g3"]), st.tuples(_KEY, st.booleans(), _GS), max_size=3
    ),
    st.lists(
        st.tuples(st.sampled_from([T1, T2, OTHER, TransportId(HOST)]), _KEY, st.booleans(), _GS),
        max_size=6,
    ),
)
def test_full_status_reconcile_is_idempotent(guests, entries):
    s = DevicePrState()
    for name, (key, holder, t) in guests.items():
        s.set(
            name,
            GuestPrState(
                key,
                False,
                holder and t is not PrType.NONE,
                t if holder and t is not PrType.NONE else PrType.NONE,
            ),
        )
    ents = [e(tid, key, holder and t is not PrType.NONE, t) for tid, key, holder, t in entries]
    once, _ = reconcile_full_status(s, ents, IDS)
    twice, changes = reconcile_full_status(once, ents, IDS)
    assert changes == [] and twice.to_dict() == once.to_dict()


@given(
    st.dictionaries(st.sampled_from([G1, G2]), st.tuples(_KEY, st.booleans(), _GS), max_size=2),
    st.lists(_KEY, max_size=4),
    st.one_of(st.none(), _KEY),
    st.integers(0, 15),
)
def test_keys_reconcile_never_raises_and_only_drops_what_is_proven(guests, keys, rkey, rtype):
    s = DevicePrState()
    for name, (key, holder, t) in guests.items():
        holder = holder and t is not PrType.NONE
        s.set(name, GuestPrState(key, False, holder, t if holder else PrType.NONE))
    rr = ReadReservation(1, rkey, 0, rtype if rkey is not None else 0)
    r = reconcile_keys(s, ReadKeys(1, tuple(keys)), rr)
    for name, before in s.guests.items():
        after = r.state.get(name)
        assert after.key in (before.key, 0)
        assert after.empty == (before.key not in keys)
