"""A two-path device migrating A -> B -> A (issue 16, item 3).

``prmigrate target`` with two portals (two target ports of one LU); the
device on each host reaches the LU on both (``backend=`` twice), one
backend nexus per path. For register-only and every reservation type, the
guest (our initiator) writes continuously while the device moves there
and back. After each move, READ FULL STATUS from an independent observer
shows the guest's key on both of the new host's path nexuses, the
reservation on one of them (on both for all-registrants types), nothing
of the old host on any path; the move had one PR round trip in its pause;
no write failed and every acknowledged write reads back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from prmigrate.device.identity import derive_isid
from prmigrate.scsi.constants import PrType

from .migration_cluster import GUEST, INITIATORS, SHARED, ProcCluster, cluster, free_port
from .test_migration_e2e import KEY, RTYPES, Writer, _run, guest_session, take_reservation

pytestmark = pytest.mark.interop

SECOND = "127.0.0.5"  # the target's second portal


async def path_entries(c, host: str) -> dict[int, tuple[int, bool, int]]:  # type: ignore[no-untyped-def]
    """path -> (key, holder, type) of ``host``'s path nexuses of the guest."""
    rfs = await c.full_status()
    out = {}
    for e in rfs.entries:
        for path in (0, 1):
            if e.transport_id.name.lower() == INITIATORS[host] and e.transport_id.isid == derive_isid(
                    "vm1", GUEST, path):
                out[path] = (e.key, e.holder, int(e.rtype))
    return out


async def settled(c, host: str, rtype: PrType | None = None,  # type: ignore[no-untyped-def]
                  gone: str | None = None) -> dict[int, tuple[int, bool, int]]:
    """The new host's paths once its other path registered again (right
    after the move) and, with ``gone``, nothing is left of that host's."""
    seen: dict[int, tuple[int, bool, int]] = {}
    for _ in range(50):
        seen = await path_entries(c, host)
        if set(seen) == {0, 1} and (gone is None or not await path_entries(c, gone)):
            return seen
        await asyncio.sleep(0.1)
    return seen


@contextmanager
def two_path_cluster(tmp_path: Path) -> Iterator[tuple[ProcCluster, str]]:
    """The migration cluster with the target's second portal and the
    device's second ``backend=`` on it: (the cluster, that URL)."""
    port2 = free_port(SECOND)
    second = f"iscsi://{SECOND}:{port2}/{SHARED}/0"
    with cluster(tmp_path, target_args=["--listen", f"{SECOND}:{port2}"], more_backends=[second]) as c:
        yield c, second


@pytest.mark.parametrize("rtype", RTYPES, ids=lambda t: "register-only" if t is None else t.name)
def test_two_path_device_moves_there_and_back(tmp_path: Path, rtype: PrType | None) -> None:
    with two_path_cluster(tmp_path) as (c, _):

        async def go() -> None:
            s = await guest_session(c.frontend_url("hosta"))
            try:
                await take_reservation(s, rtype)
                seen = await settled(c, "hosta", rtype)
                assert {p: k for p, (k, _, _) in seen.items()} == {0: KEY, 1: KEY}, seen
                w = Writer(s)
                for src, dst in (("hosta", "hostb"), ("hostb", "hosta")):
                    await asyncio.sleep(0.2)
                    code, out = await c.migrate(src, dst)
                    assert code == 0, out
                    if rtype not in (None, PrType(7), PrType(8)):
                        assert "PR round trips in the pause: 1" in out, out
                    await c.wait_device(dst, True)
                    seen = await settled(c, dst, rtype)
                    assert {p: k for p, (k, _, _) in seen.items()} == {0: KEY, 1: KEY}, seen
                    holders = sorted(p for p, (_, h, _) in seen.items() if h)
                    if rtype is None:
                        assert holders == [], seen
                    elif rtype.all_registrants:
                        assert holders == [0, 1], seen
                    else:
                        assert len(holders) == 1 and seen[holders[0]][2] == rtype, seen
                    assert await path_entries(c, src) == {}, "something of the old host is left"
                    q = await c.call(dst, "query-devices")
                    paths = q[0]["backend-nexus"][GUEST]["paths"]
                    assert [p["registered"] for p in paths] == [True, True], paths
                await asyncio.sleep(0.2)
                await w.stop()
                assert not w.bad, w.bad
                assert await w.verify() > 10
            finally:
                await s.close()

        _run(go(), timeout=150)




def test_two_path_device_on_tgt_with_two_portals_moves_there_and_back(tmp_path: Path) -> None:
    """The same with tgt serving the LU on two portals (no READ FULL STATUS:
    the observer counts keys): after each move the key is registered twice
    (the new host's two path nexuses), the WRITE EXCLUSIVE reservation
    carries it, and the guest's writes went on."""
    from prmigrate.iscsi.initiator import connect
    from prmigrate.scsi.constants import PrInAction
    from prmigrate.scsi.pr import ReadKeys, ReadReservation
    from tests.iscsi.test_initiator import TGTADM, TGTD, Tgt

    from .conftest import wait_listening

    if not (TGTD and TGTADM):
        pytest.fail("tgt (tgtd/tgtadm) is not installed: apt-get install tgt")
    t = Tgt(tmp_path)
    t.start()
    try:
        port2 = free_port("127.0.0.1")
        t.adm("--mode", "portal", "--op", "new", "--param", f"portal=127.0.0.1:{port2}")
        t.add_target(1, SHARED, 64 << 20)
        wait_listening("127.0.0.1", port2, None)
        url1, url2 = f"iscsi://127.0.0.1:{t.port}/{SHARED}/1", f"iscsi://127.0.0.1:{port2}/{SHARED}/1"
        with cluster(tmp_path, backend=url1, more_backends=[url2]) as c:

            async def go() -> None:
                obs = await connect(url1, initiator_name="iqn.2026-11.org.prmigrate:mp-obs", isid=0x23D000000079,
                                    reconnect=False, command_timeout=10)
                s = await guest_session(c.frontend_url("hosta"))
                try:
                    await take_reservation(s, PrType.WRITE_EXCLUSIVE)
                    w = Writer(s)
                    for src, dst in (("hosta", "hostb"), ("hostb", "hosta")):
                        await asyncio.sleep(0.2)
                        code, out = await c.migrate(src, dst)
                        assert code == 0, out
                        assert "PR round trips in the pause: 1" in out, out
                        await c.wait_device(dst, True)
                        keys: tuple[int, ...] = ()
                        for _ in range(50):
                            keys = ReadKeys.decode(bytes((await obs.pr_in(PrInAction.READ_KEYS)).data_in)).keys
                            if len(keys) == 2:
                                break
                            await asyncio.sleep(0.1)
                        assert keys == (KEY, KEY), keys  # the new host's two paths, nothing of the old
                        rr = ReadReservation.decode(bytes((await obs.pr_in(PrInAction.READ_RESERVATION)).data_in))
                        assert rr.key == KEY and int(rr.rtype) == PrType.WRITE_EXCLUSIVE, rr
                        q = await c.call(dst, "query-devices")
                        assert [p["registered"] for p in q[0]["backend-nexus"][GUEST]["paths"]] == [True, True]
                    await asyncio.sleep(0.2)
                    await w.stop()
                    assert not w.bad, w.bad
                    assert await w.verify() > 10
                finally:
                    await s.close()
                    await obs.close()

            _run(go(), timeout=150)
    finally:
        t.stop()
