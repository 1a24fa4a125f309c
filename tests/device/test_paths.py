"""device/paths.py: the multipath decisions, without I/O."""

from __future__ import annotations

import pytest

from prmigrate.device.paths import (
    PR_OUT_ROUTES,
    Path,
    PathSet,
    PathState,
    Route,
    lu_designators,
    rewrite_pr_in,
    same_lu,
)
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType
from prmigrate.scsi.inquiry import Identity, vpd_device_id
from prmigrate.scsi.pr import FullStatusEntry, ReadFullStatus, ReadKeys, pr_in_cdb
from prmigrate.scsi.transport_id import TransportId

HOST = "iqn.2026-11.org.prmigrate:host-a"
K, OTHER = 0x1111, 0x2222
TIDS = [TransportId(HOST, 0x800000000001), TransportId(HOST, 0x800000000002), TransportId(HOST, 0x800000000003)]
ELSE = TransportId("iqn.2026-11.org.prmigrate:else", 0x23D000000001)


def three(up: bool = True) -> PathSet:
    ps = PathSet([Path(f"iscsi://p{i}", t) for i, t in enumerate(TIDS)])
    for i in range(3):
        ps.mark(i, PathState.UP if up else PathState.DOWN)
    return ps


def registered(ps: PathSet, key: int = K) -> PathSet:
    ps.answered(0, PrOutAction.REGISTER, 0, 0, 0, key, False)
    for op in ps.fan_out(0, key, False, False):
        ps.registered_on(op.path, op.sark)
    return ps


def test_every_service_action_has_a_route_with_its_clause() -> None:
    assert set(PR_OUT_ROUTES) == set(PrOutAction)
    assert all("SPC-5" in why for _, why in PR_OUT_ROUTES.values())
    every = {a for a, (r, _) in PR_OUT_ROUTES.items() if r is Route.EVERY_PATH}
    assert every == {PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY}


def test_register_fans_out_as_raiek_on_the_other_paths_not_down() -> None:
    ps = three()
    ps.mark(2, PathState.DOWN)
    ps.answered(0, PrOutAction.REGISTER, 0, 0, 0, K, True)
    ops = ps.fan_out(0, K, True, False)
    assert [(o.path, o.action, o.rk, o.sark, o.aptpl) for o in ops] == [
        (1, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0, K, True)]
    ps.registered_on(1, K)
    assert [p.registered for p in ps.paths] == [True, True, False]
    assert ps.usable() == [0, 1]  # path 2 registers when it is back
    assert ps.back_op(2) is not None and ps.back_op(2).sark == K  # type: ignore[union-attr]


@pytest.mark.parametrize("rtype", [t for t in PrType if t is not PrType.NONE])
def test_media_access_path_rule(rtype: PrType) -> None:
    ps = registered(three())
    ps.answered(0, PrOutAction.RESERVE, rtype, 0, K, 0, False)
    seen = {ps.media_path() for _ in range(9)}
    if rtype in (PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS):
        assert seen == {0} and ps.holder == 0  # SPC-5 5.14.2: the holder's nexus only
    else:
        assert seen == {0, 1, 2}  # every registered nexus has access: round robin
    assert ps.holder == (None if rtype.all_registrants else 0)


def test_no_key_round_robins_over_paths_up() -> None:
    ps = three()
    ps.mark(1, PathState.DOWN)
    assert {ps.media_path() for _ in range(6)} == {0, 2}
    ps.mark(1, PathState.REGISTERING)
    assert {ps.media_path() for _ in range(6)} == {0, 2}  # a registering path carries nothing


def test_preempt_of_own_key_moves_and_unregisters_the_others() -> None:
    ps = registered(three())
    ps.answered(0, PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, 0, K, 0, False)
    ps.mark(0, PathState.DOWN)
    ops = ps.holder_lost()
    assert [(o.path, o.action, o.rtype, o.rk, o.sark) for o in ops] == [
        (1, PrOutAction.PREEMPT, PrType.WRITE_EXCLUSIVE, K, K)]
    again = ps.answered(1, PrOutAction.PREEMPT, PrType.WRITE_EXCLUSIVE, 0, K, K, False)
    assert again == [2]  # path 0 is down: it registers when it is back
    assert ps.holder == 1 and [p.registered for p in ps.paths] == [False, True, False]
    assert ps.media_path() == 1


def test_holder_lost_moves_nothing_under_all_registrants_or_without_survivor() -> None:
    ps = registered(three())
    ps.answered(0, PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, 0, K, 0, False)
    ps.mark(0, PathState.DOWN)
    assert ps.holder_lost() == []
    ps = registered(three())
    ps.answered(0, PrOutAction.RESERVE, PrType.EXCLUSIVE_ACCESS, 0, K, 0, False)
    for i in range(3):
        ps.mark(i, PathState.DOWN)
    assert ps.holder_lost() == [] and ps.media_path() is None


def test_clear_and_unregister_forget_the_key() -> None:
    ps = registered(three())
    ps.answered(0, PrOutAction.CLEAR, 0, 0, K, 0, False)
    assert ps.key == 0 and not any(p.registered for p in ps.paths)
    ps = registered(three())
    ps.answered(0, PrOutAction.RESERVE, PrType.EXCLUSIVE_ACCESS, 0, K, 0, False)
    ps.answered(0, PrOutAction.REGISTER, 0, 0, K, 0, False)
    assert ps.key == 0 and ps.holder is None


def test_read_keys_lists_the_guests_key_once() -> None:
    ps = registered(three())
    data = ReadKeys(7, (K, OTHER, K, K)).encode()
    out = ReadKeys.decode(rewrite_pr_in(pr_in_cdb(PrInAction.READ_KEYS, 255), data, 255, [ps]))
    assert out.keys == (K, OTHER) and out.generation == 7 and not out.truncated
    # another host with the same key keeps its listing: only our extra paths go
    data = ReadKeys(7, (K, K, K, K)).encode()
    assert ReadKeys.decode(rewrite_pr_in(pr_in_cdb(PrInAction.READ_KEYS, 255), data, 255, [ps])).keys == (K, K)
    # cut to the guest's allocation length, the additional length telling the whole
    cut = rewrite_pr_in(pr_in_cdb(PrInAction.READ_KEYS, 12), ReadKeys(7, (K, OTHER, K, K)).encode(), 12, [ps])
    assert len(cut) == 12 and ReadKeys.decode(cut).additional_length == 16


def test_read_full_status_shows_one_entry_the_holders() -> None:
    ps = registered(three())
    ps.answered(1, PrOutAction.RESERVE, PrType.EXCLUSIVE_ACCESS, 0, K, 0, False)
    ents = tuple(FullStatusEntry(K, False, i == 1, 0, PrType.EXCLUSIVE_ACCESS if i == 1 else 0, i + 1, t)
                 for i, t in enumerate(TIDS)) + (FullStatusEntry(OTHER, False, False, 0, 0, 1, ELSE),)
    data = ReadFullStatus(3, ents).encode()
    out = ReadFullStatus.decode(rewrite_pr_in(pr_in_cdb(PrInAction.READ_FULL_STATUS, 4096), data, 4096, [ps]))
    assert [(e.transport_id, e.holder) for e in out.entries] == [(TIDS[1], True), (ELSE, False)]
    # not a PR IN to rewrite: as it came
    assert rewrite_pr_in(pr_in_cdb(PrInAction.READ_RESERVATION, 255), b"\x00" * 8, 255, [ps]) == b"\x00" * 8


def test_lu_designators_ignore_the_target_port_ones() -> None:
    lu, lu1 = (Identity("PRMIGRAT", "LU", "0001", s, n) for s, n in (("a1", "iqn.x:shared/0"),
                                                                       ("b2", "iqn.x:shared/1")))
    page1 = vpd_device_id(lu, target="iqn.x:shared", rel_port=1, tpgt=1, port_group=1)
    page2 = vpd_device_id(lu, target="iqn.x:shared", rel_port=2, tpgt=2, port_group=2)
    other = vpd_device_id(lu1, target="iqn.x:shared", rel_port=1, tpgt=1)
    assert len(lu_designators(page1)) == 2 and page1 != page2  # NAA and T10 vendor ID
    assert same_lu([page1, page2]) and not same_lu([page1, other])


def test_every_guest_of_the_device_is_one_nexus_in_a_pr_in_answer() -> None:
    a = PathSet([Path("p0", TIDS[0]), Path("p1", TIDS[1])])
    b = PathSet([Path("p0", TransportId(HOST, 0x80000000000A)), Path("p1", TransportId(HOST, 0x80000000000B))])
    for i in range(2):
        a.mark(i, PathState.UP)
        b.mark(i, PathState.UP)
    registered(a)
    registered(b, OTHER)
    keys = ReadKeys(1, (K, K, OTHER, OTHER)).encode()
    assert ReadKeys.decode(rewrite_pr_in(pr_in_cdb(PrInAction.READ_KEYS, 255), keys, 255, [a, b])).keys == (K, OTHER)
    b.answered(1, PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, 0, OTHER, 0, False)
    ents = (FullStatusEntry(K, False, False, 0, 0, 1, TIDS[0]), FullStatusEntry(K, False, False, 0, 0, 2, TIDS[1]),
            FullStatusEntry(OTHER, False, False, 0, 0, 1, b.paths[0].transport_id),
            FullStatusEntry(OTHER, False, True, 0, 1, 2, b.paths[1].transport_id))
    out = ReadFullStatus.decode(rewrite_pr_in(pr_in_cdb(PrInAction.READ_FULL_STATUS, 4096),
                                              ReadFullStatus(2, ents).encode(), 4096, [a, b]))
    assert [(e.transport_id, e.holder) for e in out.entries] == [(TIDS[0], False), (b.paths[1].transport_id, True)]
