"""A two-path device (issue 16, item 2) against real peers.

- libiscsi's ``iscsi-test-cu``: the MultipathIO family and the reservation
  families run through a two-path device (``backend=`` twice, to the two
  portals of one ``prmigrate target``; the host frontend given as both of
  the suite's paths) give the same per-test results as directly against
  the target's two portals;
- tgt serving one LU on two portals as the backend (tgt has no READ FULL
  STATUS): the guest registers and reserves, an observer's READ KEYS lists
  the key once per path nexus while the guest's lists it once; a path cut
  (a test-owned TCP proxy per path) while the guest writes: no error, no
  lost write, the path registered again when it is back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from prmigrate.iscsi.initiator import Session, connect
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import ReadKeys, ReadReservation, pr_out_params
from tests.tcp_proxy import StoppableProxy

from .conftest import IQN, free_loopback_port, need, start_target, stop, wait_listening
from .migration_cluster import free_port
from .test_conformance import RESERVATION, run_suite
from .test_multiport_target import RESERVATION_FAMILIES
from .test_transparency import (
    device_spec,
    differences,
    result_map,
    start_host,
    summary,
    zero_block_256,
)

pytestmark = pytest.mark.interop

GUEST = "iqn.2026-11.org.prmigrate:mp-guest"
OBSERVER = "iqn.2026-11.org.prmigrate:mp-observer"
TGT_IQN = "iqn.2026-11.org.prmigrate:tgt-two-portals"
KEY = 0x4D50A00000000001
FAMILIES = RESERVATION_FAMILIES + ",ALL.MultipathIO"


def test_iscsi_test_cu_through_a_two_path_device_as_directly(tmp_path: Path) -> None:
    need("iscsi-test-cu")
    while True:
        host2, port2 = free_loopback_port()
        t = start_target(tmp_path, size="64M", extra=["--listen", f"{host2}:{port2}"])
        if (t.host, t.port) != (host2, port2):
            break
        stop(t.proc)
    try:
        wait_listening(host2, port2, t.proc)
        url1, url2 = t.url(), f"iscsi://{host2}:{port2}/{IQN}/0"
        direct = run_suite(url1, FAMILIES, tmp_path / "direct.txt", timeout=300, multipath_url=url2)
        zero_block_256(url1)  # MultipathIO.CompareAndWrite needs LBA 256 as a fresh image has it
        host = start_host(tmp_path, device_spec(url1, extra=f",backend={url2}"))
        try:
            via = run_suite(host.url(), FAMILIES, tmp_path / "via.txt", timeout=300, multipath_url=host.url())
            paths = host.call("query-devices")[0]["backend-nexus"]
        finally:
            rc = stop(host.proc)
        a, b = result_map(direct), result_map(via)
        print(f"\ndirect:    {summary(a)}\nvia host:  {summary(b)}")
        assert len([n for n in a if RESERVATION.search(n)]) == 27, sorted(a)
        assert any(n.startswith("ALL.MultipathIO.") for n in a), sorted(a)
        assert not differences(a, b), differences(a, b)
        # the suite's guests had one backend nexus per path
        assert paths and all(len(nx["paths"]) == 2 for nx in paths.values()), paths
        assert "Traceback" not in host.log and rc == 0, host.log[-3000:]
    finally:
        stop(t.proc)


# ---------------------------------------------------------------- tgt


class TwoPortalTgt:
    def __init__(self, tmp: Path) -> None:
        from tests.iscsi.test_initiator import TGTADM, TGTD, Tgt

        if not (TGTD and TGTADM):
            pytest.fail("tgt (tgtd/tgtadm) is not installed: apt-get install tgt")
        self.tgt = Tgt(tmp)
        self.tgt.start()
        self.port2 = free_port("127.0.0.1")
        self.tgt.adm("--mode", "portal", "--op", "new", "--param", f"portal=127.0.0.1:{self.port2}")
        self.tgt.add_target(1, TGT_IQN, 32 << 20)
        wait_listening("127.0.0.1", self.port2, None)
        self.addresses = [("127.0.0.1", self.tgt.port), ("127.0.0.1", self.port2)]


@pytest.fixture
def tgt2(tmp_path: Path) -> Iterator[TwoPortalTgt]:
    t = TwoPortalTgt(tmp_path)
    try:
        yield t
    finally:
        t.tgt.stop()


async def _keys(s: Session) -> tuple[int, ...]:
    r = await s.pr_in(PrInAction.READ_KEYS, 8192)
    assert r.status == Status.GOOD, r
    return ReadKeys.decode(bytes(r.data_in)).keys


def test_tgt_two_portals_register_reserve_cut_a_path(tgt2: TwoPortalTgt, tmp_path: Path) -> None:
    need("tgtd")

    async def go() -> None:
        proxies = [StoppableProxy(a) for a in tgt2.addresses]
        for p in proxies:
            await p.start()
        urls = [f"iscsi://127.0.0.1:{p.port}/{TGT_IQN}/1" for p in proxies]
        host = await asyncio.to_thread(start_host, tmp_path, device_spec(urls[0], extra=f",backend={urls[1]}"))
        observer = guest = None
        try:
            h, port = tgt2.addresses[0]
            observer = await connect(f"iscsi://{h}:{port}/{TGT_IQN}/1", None, OBSERVER, 0x23D0000000E1)
            guest = await connect(host.url(), initiator_name=GUEST, isid=0x23D0000000E2, command_timeout=30)
            assert (await guest.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))).good
            assert (await guest.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(KEY, 0))).good
            assert await _keys(observer) == (KEY, KEY)  # one registration per path nexus
            assert await _keys(guest) == (KEY,)  # the guest sees one
            rr = ReadReservation.decode(bytes((await guest.pr_in(PrInAction.READ_RESERVATION, 255)).data_in))
            assert rr.key == KEY and rr.rtype == PrType.WRITE_EXCLUSIVE

            written: dict[int, bytes] = {}
            enough = asyncio.Event()

            async def writer(first: int) -> None:
                i = 0
                while not enough.is_set():
                    lba, data = first + (i % 32), os.urandom(512)
                    await guest.write(lba, data)  # raises on anything but GOOD
                    written[lba] = data
                    i += 1

            w = asyncio.gather(*(writer(100 + 50 * k) for k in range(3)))
            await asyncio.sleep(0.3)
            await proxies[0].stop()  # the holder's path
            await asyncio.sleep(2.5)
            assert await _keys(observer) == (KEY,)  # the reservation moved, path 0's registration went with it
            rr = ReadReservation.decode(bytes((await observer.pr_in(PrInAction.READ_RESERVATION, 255)).data_in))
            assert rr.key == KEY and rr.rtype == PrType.WRITE_EXCLUSIVE
            await proxies[0].start()
            for _ in range(100):
                if await _keys(observer) == (KEY, KEY):
                    break
                await asyncio.sleep(0.1)
            assert await _keys(observer) == (KEY, KEY)  # registered again
            await asyncio.sleep(0.3)
            enough.set()
            await w
            for lba, data in written.items():
                assert await guest.read(lba, 1) == data, lba
        finally:
            for s in (guest, observer):
                if s is not None:
                    await s.close()
            for p in proxies:
                await p.stop()
            rc = await asyncio.to_thread(stop, host.proc)
        assert "Traceback" not in host.log and rc == 0, host.log[-3000:]

    asyncio.run(asyncio.wait_for(go(), 120))
