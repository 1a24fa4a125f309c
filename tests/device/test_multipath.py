"""device/multipath.py: a two-path device against a real ``prmigrate target``
with two ``--listen`` portals (two target ports of one LU), each path through
its own test-owned TCP proxy (tests/tcp_proxy.py) so that a path can be cut.

An independent observer (our initiator, another initiator name, logged in
straight to portal 1) reads READ FULL STATUS to see what the target has on
each path nexus.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from prmigrate.commands.host import format_status
from prmigrate.device.config import DeviceConfig
from prmigrate.device.identity import derive_isid
from prmigrate.device.passthrough import PassthroughDevice
from prmigrate.iscsi.initiator import connect
from prmigrate.iscsi.target import IscsiTarget, TargetNode
from prmigrate.lun.types import Nexus, Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import ReadFullStatus, ReadKeys, pr_in_cdb, pr_out_cdb, pr_out_params
from prmigrate.scsi.transport_id import TransportId
from tests.interop.conftest import IQN, free_loopback_port, start_target, stop, wait_listening
from tests.tcp_proxy import StoppableProxy

HOST = "iqn.2026-11.org.prmigrate:host-a"
GUEST = "iqn.2026-11.org.prmigrate:guest-1"
OBSERVER = "iqn.2026-11.org.prmigrate:observer"
KEY = 0x4D50000000000001
FRONT = "iqn.2026-11.org.prmigrate:vm1"
BS = 512


class Portals:
    def __init__(self, tmp: Path) -> None:
        while True:
            host2, port2 = free_loopback_port()
            self.t = start_target(tmp, size="8M", extra=["--listen", f"{host2}:{port2}"])
            if (self.t.host, self.t.port) != (host2, port2):
                break
            stop(self.t.proc)
        wait_listening(host2, port2, self.t.proc)
        self.addresses = [(self.t.host, self.t.port), (host2, port2)]


@pytest.fixture
def portals(tmp_path: Path) -> Iterator[Portals]:
    p = Portals(tmp_path)
    try:
        yield p
    finally:
        stop(p.t.proc)
    assert "Traceback" not in p.t.log


class Rig:
    def __init__(self, portals: Portals, tmp: Path) -> None:
        self.portals = portals
        self.tmp = tmp
        self.proxies = [StoppableProxy(a) for a in portals.addresses]
        self.dev: PassthroughDevice = None  # type: ignore[assignment]
        self.nexus = Nexus.make(GUEST, 0x23D000000001, FRONT)

    async def start(self) -> None:
        for p in self.proxies:
            await p.start()
        urls = [f"iscsi://127.0.0.1:{p.port}/{IQN}/0" for p in self.proxies]
        cfg = DeviceConfig("vm1", urls[0], IQN, machine="pc-q35-11.0", more_backends=tuple(urls[1:]))
        self.dev = PassthroughDevice(cfg, HOST, state_dir=self.tmp, fsync=False)
        await self.dev.start()
        h, p = self.portals.addresses[0]
        self.observer = await connect(f"iscsi://{h}:{p}/{IQN}/0", None, OBSERVER, 0x23D0000000F0)

    async def close(self) -> None:
        await self.observer.close()
        await self.dev.close()
        for p in self.proxies:
            await p.stop()

    async def cmd(self, cdb: bytes, data: bytes = b"", n: int | None = None) -> Result:
        r = self.dev.execute(self.nexus, cdb, data, n)
        return await r if isinstance(r, asyncio.Future) else r

    async def ok(self, cdb: bytes, data: bytes = b"", n: int | None = None) -> Result:
        for _ in range(6):  # a unit attention is the guest's to meet once per event
            r = await self.cmd(cdb, data, n)
            if r.status != Status.CHECK_CONDITION or not r.sense or (r.sense[2] & 0x0F) != 6:
                break
        assert r.status == Status.GOOD, (cdb.hex(), r)
        return r

    async def pr_out(self, action: int, rk: int = 0, sark: int = 0, rtype: int = 0) -> Result:
        params = pr_out_params(rk, sark)
        return await self.ok(pr_out_cdb(action, rtype, 0, len(params)), params)

    async def observed(self) -> ReadFullStatus:
        r = await self.observer.pr_in(PrInAction.READ_FULL_STATUS, 8192)
        assert r.status == Status.GOOD
        return ReadFullStatus.decode(bytes(r.data_in))

    def path_tid(self, path: int) -> TransportId:
        return TransportId(HOST, derive_isid("vm1", GUEST, path))

    async def write(self, lba: int, data: bytes) -> None:
        await self.ok(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, len(data) // BS, 0), data)

    async def read(self, lba: int, blocks: int) -> bytes:
        r = await self.ok(struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0), b"", blocks * BS)
        return bytes(r.data_in)


def run(portals: Portals, tmp: Path, body: object) -> None:
    async def main() -> None:
        rig = Rig(portals, tmp)
        await rig.start()
        try:
            await asyncio.wait_for(body(rig), 90)  # type: ignore[operator]
        finally:
            await rig.close()
    asyncio.run(main())


def entries_of(rfs: ReadFullStatus, rig: Rig) -> dict[int, tuple[int, bool]]:
    """path -> (key, holder) of the device's path nexuses in ``rfs``."""
    out = {}
    for e in rfs.entries:
        for path in (0, 1):
            if e.transport_id.same_port(rig.path_tid(path)):
                out[path] = (e.key, e.holder)
    return out


def test_path_zero_keeps_the_single_path_isid() -> None:
    assert derive_isid("vm1", GUEST) == derive_isid("vm1", GUEST, 0)
    assert derive_isid("vm1", GUEST, 1) not in (derive_isid("vm1", GUEST), derive_isid("vm1", GUEST, 2))
    assert derive_isid("vm1", GUEST, 1) >> 46 == 0b10  # Random format, as path 0's


@pytest.mark.parametrize("rtype", [t for t in PrType if t is not PrType.NONE])
def test_register_on_every_path_reserve_on_one_guest_sees_one_nexus(portals: Portals, tmp_path: Path,
                                                                    rtype: PrType) -> None:
    async def body(rig: Rig) -> None:
        await rig.pr_out(PrOutAction.REGISTER, 0, KEY)
        await rig.pr_out(PrOutAction.RESERVE, KEY, 0, rtype)
        seen = entries_of(await rig.observed(), rig)
        assert {p: k for p, (k, _) in seen.items()} == {0: KEY, 1: KEY}, seen
        holders = [p for p, (_, h) in seen.items() if h]
        assert holders == ([0, 1] if rtype.all_registrants else [0]), seen
        # the guest: its key once, one entry, the reservation unchanged
        keys = ReadKeys.decode(bytes((await rig.ok(pr_in_cdb(PrInAction.READ_KEYS, 255), b"", 255)).data_in))
        assert keys.keys == (KEY,)
        rfs = ReadFullStatus.decode(bytes((await rig.ok(pr_in_cdb(PrInAction.READ_FULL_STATUS, 1024), b"",
                                                        1024)).data_in))
        mine = [e for e in rfs.entries if e.transport_id.name == HOST]
        assert len(mine) == 1 and mine[0].key == KEY and mine[0].holder
        # the device's verification takes both path nexuses as the guest's
        await rig.dev.verify("test")
        st = rig.dev.snooper.state.get(GUEST)
        assert st.key == KEY and st.holder and st.rtype == rtype
        # media access works (round robin or the holder's path)
        data = os.urandom(4 * BS)
        await rig.write(8, data)
        assert await rig.read(8, 4) == data
        d = rig.dev.describe()
        paths = d["backend-nexus"][GUEST]["paths"]  # type: ignore[index]
        assert [(p["state"], p["registered"]) for p in paths] == [("up", True), ("up", True)], paths
        assert paths[1]["nexus"] == str(rig.path_tid(1))
        # host --status prints every path of the nexus
        text = format_status([d])
        for i in (0, 1):
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"backend path {i} (guest {GUEST})"))
            assert str(rig.path_tid(i)) in line and ", up, registered" in line, text
            assert (", holder" in line) == (i == 0 or rtype.all_registrants), line
        await rig.pr_out(PrOutAction.RELEASE, KEY, 0, rtype)
        await rig.pr_out(PrOutAction.REGISTER, KEY, 0)
        assert entries_of(await rig.observed(), rig) == {}

    run(portals, tmp_path, body)


@pytest.mark.parametrize("rtype", [PrType.WRITE_EXCLUSIVE, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS])
def test_a_path_cut_during_writes_loses_nothing_and_comes_back_registered(portals: Portals, tmp_path: Path,
                                                                         rtype: PrType) -> None:
    async def body(rig: Rig) -> None:
        await rig.pr_out(PrOutAction.REGISTER, 0, KEY)
        await rig.pr_out(PrOutAction.RESERVE, KEY, 0, rtype)
        written: dict[int, bytes] = {}

        enough = asyncio.Event()
        sent = [0]

        async def writer(first: int) -> None:  # four at once, without pause: some are in flight at the cut
            i = 0
            while not enough.is_set():
                lba = first + 2 * (i % 32)
                data = os.urandom(2 * BS)
                await rig.write(lba, data)
                written[lba] = data
                i += 1
                sent[0] += 1

        w = asyncio.gather(*(writer(16 + 64 * k) for k in range(4)))
        await asyncio.sleep(0.3)
        await rig.proxies[0].stop()  # path 0: the holder's
        await asyncio.sleep(2.5)
        seen = entries_of(await rig.observed(), rig)
        if rtype.all_registrants:
            assert seen[1] == (KEY, True), seen
        else:  # the reservation moved to path 1's nexus, path 0's registration went with the PREEMPT
            assert seen == {1: (KEY, True)}, seen
        await rig.proxies[0].start()  # the same port: path 0 comes back
        for _ in range(100):
            paths = rig.dev.describe()["backend-nexus"][GUEST]["paths"]  # type: ignore[index]
            if all(p["state"] == "up" and p["registered"] for p in paths):
                break
            await asyncio.sleep(0.1)
        assert all(p["state"] == "up" and p["registered"] for p in paths), paths
        seen = entries_of(await rig.observed(), rig)
        assert {p: k for p, (k, _) in seen.items()} == {0: KEY, 1: KEY}, seen
        before = sent[0]
        await asyncio.sleep(0.3)
        enough.set()
        await w
        assert sent[0] > before  # writing went on all along
        for lba, data in written.items():
            assert await rig.read(lba, 2) == data, lba

    run(portals, tmp_path, body)


def test_every_path_down_a_command_waits_for_one_to_come_back(portals: Portals, tmp_path: Path) -> None:
    """With every path down the set holds the command (the single-path
    behaviour, up to HOLD_TIMEOUT); a path back answers it."""
    async def body(rig: Rig) -> None:
        await rig.pr_out(PrOutAction.REGISTER, 0, KEY)
        data = os.urandom(BS)
        for p in rig.proxies:
            await p.stop()
        await asyncio.sleep(1.5)  # both paths seen down
        paths = rig.dev.describe()["backend-nexus"][GUEST]["paths"]  # type: ignore[index]
        assert [p["state"] for p in paths] == ["down", "down"], paths
        write = asyncio.ensure_future(rig.write(40, data))
        await asyncio.sleep(1.5)  # longer than a path's own hold: the set still holds it
        assert not write.done()
        await rig.proxies[1].start()
        await asyncio.wait_for(write, 8)
        assert await rig.read(40, 1) == data
        await rig.proxies[0].start()

    run(portals, tmp_path, body)


def test_paths_to_different_luns_are_refused(portals: Portals, tmp_path: Path) -> None:
    """Path 1 reaches a target of the same name whose LUN 0 is another
    logical unit (its own NAA designator): the device does not start."""
    async def main() -> str:
        other = IscsiTarget([TargetNode(IQN, {0: LogicalUnit(tmp_path / "other.img", 1 << 20, name="another")})])
        (host, port), *_ = await other.start("127.0.0.1", 0)
        h, p = portals.addresses[0]
        cfg = DeviceConfig("vm1", f"iscsi://{h}:{p}/{IQN}/0", IQN, machine="pc-q35-11.0",
                           more_backends=(f"iscsi://{host}:{port}/{IQN}/0",))
        dev = PassthroughDevice(cfg, HOST, fsync=False)
        try:
            await dev.start()
        except Exception as exc:  # noqa: BLE001 - the refusal under test
            return str(exc)
        finally:
            await dev.close()
            await other.close()
        return ""

    text = asyncio.run(main())
    assert "reaches another logical unit" in text and "every backend= must name the same LUN" in text, text


def test_a_reserve_on_a_path_just_cut_is_carried_on_another(portals: Portals, tmp_path: Path) -> None:
    """The RESERVE goes out on path 0 the moment its connection is cut: it
    is held there, answered BUSY, and sent again on path 1 after a look
    at what the LU has (READ FULL STATUS): the guest gets GOOD and the
    reservation is path 1's nexus's."""
    async def body(rig: Rig) -> None:
        await rig.pr_out(PrOutAction.REGISTER, 0, KEY)
        await rig.proxies[0].stop()
        await rig.pr_out(PrOutAction.RESERVE, KEY, 0, PrType.EXCLUSIVE_ACCESS)
        seen = entries_of(await rig.observed(), rig)
        assert seen[1] == (KEY, True) and not seen.get(0, (0, False))[1], seen
        data = os.urandom(BS)
        await rig.write(60, data)
        assert await rig.read(60, 1) == data
        await rig.proxies[0].start()

    run(portals, tmp_path, body)


def test_scsi2_reserve_keeps_the_guest_on_its_path(portals: Portals, tmp_path: Path) -> None:
    """RESERVE(6) is one I_T nexus's (SPC-2 5.5.1): the guest's commands
    stay on that path until RELEASE(6), then spread again."""
    async def body(rig: Rig) -> None:
        await rig.ok(bytes([0x16, 0, 0, 0, 0, 0]))
        for lba in range(70, 80):  # round robin would meet RESERVATION CONFLICT on the other path
            data = os.urandom(BS)
            await rig.write(lba, data)
            assert await rig.read(lba, 1) == data
        await rig.ok(bytes([0x17, 0, 0, 0, 0, 0]))
        assert rig.dev.describe()["backend-nexus"][GUEST]["paths"]  # type: ignore[index]

    run(portals, tmp_path, body)


def test_a_single_path_device_given_a_second_path_keeps_its_registration(portals: Portals, tmp_path: Path) -> None:
    """Restarted with one more backend=, a device's guest keeps path 0's
    nexus (the single-path ISID): its registration and reservation are
    still its own, the journal verifies, and the new path registers
    before it carries I/O."""
    async def main() -> None:
        proxies = [StoppableProxy(a) for a in portals.addresses]
        for p in proxies:
            await p.start()
        urls = [f"iscsi://127.0.0.1:{p.port}/{IQN}/0" for p in proxies]
        nexus = Nexus.make(GUEST, 0x23D000000001, FRONT)

        async def cmd(dev: PassthroughDevice, cdb: bytes, data: bytes = b"", n: int | None = None) -> Result:
            for _ in range(6):
                r = dev.execute(nexus, cdb, data, n)
                r = await r if isinstance(r, asyncio.Future) else r
                if r.status != Status.CHECK_CONDITION or (r.sense[2] & 0x0F) != 6:
                    return r
            return r

        one = PassthroughDevice(DeviceConfig("vm1", urls[0], IQN, machine="pc-q35-11.0"), HOST,
                                state_dir=tmp_path, fsync=False)
        await one.start()
        params = pr_out_params(0, KEY)
        assert (await cmd(one, pr_out_cdb(PrOutAction.REGISTER, 0, 0, len(params)), params)).status == Status.GOOD
        params = pr_out_params(KEY, 0)
        r = await cmd(one, pr_out_cdb(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, 0, len(params)), params)
        assert r.status == Status.GOOD
        await one.close()
        two = PassthroughDevice(DeviceConfig("vm1", urls[0], IQN, machine="pc-q35-11.0",
                                             more_backends=(urls[1],)), HOST, state_dir=tmp_path, fsync=False)
        await two.start()  # the journal's state verified: path 0's nexus is the guest's
        try:
            st = two.snooper.state.get(GUEST)
            assert st.key == KEY and st.holder and st.rtype == PrType.WRITE_EXCLUSIVE
            r = await cmd(two, pr_in_cdb(PrInAction.READ_KEYS, 255), b"", 255)
            assert ReadKeys.decode(bytes(r.data_in)).keys == (KEY,)
            paths = two.describe()["backend-nexus"][GUEST]["paths"]  # type: ignore[index]
            assert [(p["registered"], p["holder"]) for p in paths] == [(True, True), (True, False)], paths
            data = os.urandom(BS)
            assert (await cmd(two, struct.pack(">BBIBHB", 0x2A, 0, 90, 0, 1, 0), data)).status == Status.GOOD
        finally:
            await two.close()
            for p in proxies:
                await p.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_path_down_at_the_start_joins_registered_when_it_comes_up(portals: Portals, tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(portals, tmp_path)
        for p in rig.proxies:
            await p.start()
        port1 = rig.proxies[1].port
        await rig.proxies[1].stop()  # path 1 unreachable from the first login on
        rig.proxies[1].port = port1
        urls = [f"iscsi://127.0.0.1:{p.port}/{IQN}/0" for p in rig.proxies]
        cfg = DeviceConfig("vm1", urls[0], IQN, machine="pc-q35-11.0", more_backends=(urls[1],))
        rig.dev = PassthroughDevice(cfg, HOST, state_dir=tmp_path, fsync=False)
        await rig.dev.start()
        h, p = portals.addresses[0]
        rig.observer = await connect(f"iscsi://{h}:{p}/{IQN}/0", None, OBSERVER, 0x23D0000000F0)
        try:
            await rig.pr_out(PrOutAction.REGISTER, 0, KEY)
            await rig.pr_out(PrOutAction.RESERVE, KEY, 0, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
            assert entries_of(await rig.observed(), rig) == {0: (KEY, True)}
            await rig.proxies[1].start()
            for _ in range(100):
                seen = entries_of(await rig.observed(), rig)
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.1)
            assert seen == {0: (KEY, True), 1: (KEY, False)}, seen
            for lba in range(100, 110):
                await rig.write(lba, bytes([lba]) * BS)
            assert await rig.read(100, 1) == bytes([100]) * BS
        finally:
            await rig.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_guest_preempts_another_host_and_holds_on_one_path(portals: Portals, tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        other = 0x07E0000000000001
        for action, rtype, rk, sark in ((PrOutAction.REGISTER, 0, 0, other),
                                        (PrOutAction.RESERVE, PrType.EXCLUSIVE_ACCESS, other, 0)):
            assert (await rig.observer.pr_out(action, rtype, pr_out_params(rk, sark))).good
        await rig.pr_out(PrOutAction.REGISTER, 0, KEY)
        await rig.pr_out(PrOutAction.PREEMPT, KEY, other, PrType.WRITE_EXCLUSIVE)
        rfs = await rig.observed()
        assert not [e for e in rfs.entries if e.key == other], rfs  # the other host is gone
        seen = entries_of(rfs, rig)
        assert sorted((p, k, h) for p, (k, h) in seen.items()) == [(0, KEY, True), (1, KEY, False)], seen
        for _ in range(20):  # the read back after the PREEMPT
            if rig.dev.describe()["backend-nexus"][GUEST]["paths"][0]["holder"]:  # type: ignore[index]
                break
            await asyncio.sleep(0.05)
        data = os.urandom(BS)
        await rig.write(120, data)  # under WE: the holder's path only
        assert await rig.read(120, 1) == data

    run(portals, tmp_path, body)


def test_another_hosts_preempt_reaches_the_guest_once(portals: Portals, tmp_path: Path) -> None:
    """Another host's PREEMPT removes the guest's registration on both path
    nexuses; the target queues REGISTRATIONS PREEMPTED (2A/05) on each. The
    guest meets it once (the primary path's), the other path's is retried
    there, and no path registers the fenced key again."""
    async def body(rig: Rig) -> None:
        other = 0x07E0000000000002
        await rig.pr_out(PrOutAction.REGISTER, 0, KEY)
        assert (await rig.observer.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, other))).good
        r = await rig.observer.pr_out(PrOutAction.PREEMPT, PrType.WRITE_EXCLUSIVE, pr_out_params(other, KEY))
        assert r.good, r
        uas = 0
        for _ in range(8):
            r = await rig.cmd(bytes(6))  # TEST UNIT READY
            if r.status == Status.CHECK_CONDITION and (r.sense[2] & 0x0F) == 6:
                assert (r.sense[12], r.sense[13]) == (0x2A, 0x05), r.sense.hex()
                uas += 1
            else:
                assert r.status == Status.GOOD, r
        assert uas == 1
        assert entries_of(await rig.observed(), rig) == {}  # the fencing stands
        await rig.proxies[1].stop()  # a path that goes and comes back does not undo it
        await asyncio.sleep(0.5)
        await rig.proxies[1].start()
        await asyncio.sleep(2.0)
        assert entries_of(await rig.observed(), rig) == {}

    run(portals, tmp_path, body)
