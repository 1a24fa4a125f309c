"""Real VMs across pushed moves: Debian's qemu-system-x86 under TCG booting the
guest of scripts/build-guest.sh (built here when its cache is missing).

- an open-iscsi guest (iscsid + iscsiadm in the VM, network through a tap
  on a bridge in a network namespace) logged in to host A's frontend;
- a QEMU VM whose disk is the frontend LUN through virtio-scsi +
  ``scsi-block`` over ``iscsi://`` (QEMU's libiscsi is the initiator).

Inside each guest: fence_scsi's unfence sequence (REGISTER AND IGNORE
EXISTING KEY, RESERVE type 5) with sg_persist, then O_DIRECT writes, each
read back and compared, for the whole run (scripts/guest/prm-io.c). The
device moves A -> B -> A with ``prmigrate migrate``. After each move READ
FULL STATUS from an independent observer shows the guest's key and type
on the new host's nexus and nothing on the old one; the guest saw no I/O
error, no RESERVATION CONFLICT and no mismatch; its longest I/O stall per
move (the longest gap between two completions that began while ``prmigrate
migrate`` ran) is at most 500 ms. For open-iscsi, whose iscsid now and then
waits for its own 1 s timer tick to reconnect under TCG, a move over the
limit must still end within that tick, every stall less the guest's waits
on its established connections before its logins (iscsid's, seen on its
tap) must be within the limit, and more moves are made (up to six) until
two came in under it. Then another node's PREEMPT
AND ABORT of the guest's key (``prmigrate pr``) fences the VM: its next
write gets RESERVATION CONFLICT.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prmigrate.scsi.constants import PrType

from .migration_cluster import INITIATORS, ProcCluster, env
from .vm import (
    BOOT_TIMEOUT,
    GUEST_IQN,
    GUEST_KEY,
    ISCSID_ALARM_S,
    Guest,
    Qmp,
    guest_image,
    open_iscsi_guest,
)

# the first test may build the guest (scripts/build-guest.sh: QEMU and
# Debian packages from apt, a minute or two on a fresh machine)
pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]

STALL_LIMIT_US = 500_000
MOVES = (("hosta", "hostb"), ("hostb", "hosta"))
OTHER_NODE = "iqn.2026-11.org.prmigrate:node2"
OTHER_KEY = 0x6775657374320002


def _run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def holder_entries(c: ProcCluster, host: str) -> list[Any]:
    """READ FULL STATUS entries of the guest's backend nexus on ``host``."""
    return list(await c.entries_of(host, guest=GUEST_IQN))


def assert_held_by(c: ProcCluster, new: str, old: str) -> None:
    """READ FULL STATUS (observer nexus): the guest's key and type held on
    ``new``'s nexus for the guest, no registration at all of ``old``."""
    on_new = _run(holder_entries(c, new))
    assert len(on_new) == 1, f"{new}: {on_new}"
    e = on_new[0]
    assert e.key == GUEST_KEY and e.holder and e.rtype == PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, e
    every = _run(c.full_status()).entries
    on_old = [x for x in every if x.transport_id.name.lower() == INITIATORS[old]]
    assert on_old == [], f"{old} still has registrations: {on_old}"


def settle(g: Guest, limit_s: float = 10.0) -> dict[str, int]:
    """Windows after a move until the guest has completed I/O again; the
    counters added up, the stall the longest gap of them."""
    total = {"ops": 0, "errors": 0, "mismatches": 0, "max_gap_us": 0, "after_gap_us": 0}
    deadline = time.monotonic() + limit_s
    time.sleep(0.5)
    while True:
        w = g.mark()
        for k in ("ops", "errors", "mismatches"):
            total[k] += w[k]
        if w["max_gap_us"] > total["max_gap_us"]:
            total["max_gap_us"], total["after_gap_us"] = w["max_gap_us"], w["after_gap_us"]
        if w["ops"] > 20 or time.monotonic() > deadline:
            return total
        time.sleep(0.5)


def move_and_measure(c: ProcCluster, g: Guest, moves: int = len(MOVES)) -> list[dict[str, int]]:
    """``moves`` moves (A -> B, B -> A, ...) while the guest writes; per move
    its window's counters and ``stall_us``, the longest gap in the guest's
    I/O that began while ``prmigrate migrate`` ran (a gap elsewhere is the
    machine's, not the move's: TCG on a loaded host)."""
    windows = []
    for _ in range(3):
        g.mark()  # a fresh window for the first move; calibrates the clock mapping
    for i in range(moves):
        src, dst = MOVES[i % 2]
        t0 = time.monotonic()
        rc, out = _run(c.migrate(src, dst))
        t1 = time.monotonic()
        assert rc == 0, out
        w = settle(g)
        w["stall_us"] = int(g.stall_during(t0, t1)[0] * 1e6)
        if g.connects is not None:  # how long the guest sat on its new connections before its logins
            waits = g.connects.login_waits(t0, time.monotonic())
            w["login_wait_us"] = int(max(waits, default=0.0) * 1e6)
            w["waits_us"] = int(sum(waits) * 1e6)
        windows.append(w)
        assert w["errors"] == 0 and w["mismatches"] == 0, (src, dst, w, g.console_tail())
        assert w["ops"] > 0, (src, dst, w)
        assert_held_by(c, dst, src)
    assert not g.lines_of("error"), g.lines_of("error")
    assert not g.lines_of("mismatch"), g.lines_of("mismatch")
    return windows


def pr_tool(c: ProcCluster, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "prmigrate.cli", "pr", "--initiator", OTHER_NODE,
                        "--isid", "23d000000077", *args, c.target_url],
                       capture_output=True, text=True, timeout=60, env=env(), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def fence_from_other_node(c: ProcCluster, g: Guest) -> None:
    """fence_scsi's fence: the other node registers, then PREEMPT AND ABORT
    type 5 of the guest's key; the guest's next write is refused. The
    guest's load is paused first (a fenced node is one that stopped
    answering): what happens to a command in flight at the PREEMPT AND
    ABORT is not what this checks."""
    g.send("pause")
    g.wait("paused", 60)
    pr_tool(c, "-I", "-S", f"{OTHER_KEY:x}")
    pr_tool(c, "-A", "-K", f"{OTHER_KEY:x}", "-S", f"{GUEST_KEY:x}", "-T", "5")
    keys = pr_tool(c, "-k")
    assert f"{GUEST_KEY:x}" not in keys.lower(), keys
    g.send("fence")
    kv = g.wait("fence", 60)
    assert kv["sg_status"] == "0x18", kv  # RESERVATION CONFLICT
    assert kv["write_errno"] != "0", kv


@pytest.fixture(scope="module")
def image() -> Path:
    return guest_image()


def test_open_iscsi_guest_across_pushed_moves(tmp_path: Path, image: Path) -> None:
    with open_iscsi_guest(image, tmp_path) as (c, g):
        try:
            g.wait("ready", BOOT_TIMEOUT)
            g.wait("io")
            assert_held_by(c, "hosta", "hostb")
            time.sleep(0.5)
            # A -> B -> A, and up to two more round trips while fewer than
            # two moves came in under the limit: iscsid polls a new
            # connection's TCP connect for 1 ms and, when the handshake took
            # longer (under TCG on a busy host it now and then does), looks
            # again only at its next 1 s alarm. The guest's tap shows it: the
            # connection established, and iscsid's Login Request about 1 s
            # later (login_wait_us). A move over the limit must be that case.
            windows: list[dict[str, int]] = []
            for _ in range(3):
                windows += move_and_measure(c, g, moves=2)
                if sum(w["stall_us"] <= STALL_LIMIT_US for w in windows) >= 2:
                    break
            stalls = [w["stall_us"] for w in windows]
            waits = [w["login_wait_us"] for w in windows]
            rest = [max(0, w["stall_us"] - w["waits_us"]) for w in windows]
            print(f"open-iscsi guest: longest I/O stall per move {stalls} us; "
                  f"longest wait on an established connection before its login: {waits} us; "
                  f"stall less those waits: {rest} us")
            assert sum(st <= STALL_LIMIT_US for st in stalls) >= 2, (stalls, waits, g.console_tail())
            for st, wait, r in zip(stalls, waits, rest, strict=True):
                # over the limit only by iscsid's 1 s alarm, and within it;
                # what is left of every stall once iscsid's own waits are
                # taken out (the handover, the logins, the redirect) is
                # within the limit
                assert st <= STALL_LIMIT_US or wait >= ISCSID_ALARM_S * 1e6, (stalls, waits)
                assert st <= STALL_LIMIT_US + 1_100_000, (stalls, waits)
                assert r <= STALL_LIMIT_US, (stalls, waits, rest)
            fence_from_other_node(c, g)
        except BaseException:
            print(c.dump_logs())
            print(g.console_tail(80))
            raise


def test_libiscsi_vm_across_pushed_moves_then_fenced(tmp_path: Path, image: Path) -> None:
    c = ProcCluster(tmp_path)
    c.start()
    url = c.frontend_url("hosta")
    g = Guest(image, tmp_path, "libiscsi-vm", {"mode": "libiscsi", "key": hex(GUEST_KEY)},
              ["-device", "virtio-scsi-pci",
               "-drive", f"file={url},if=none,id=d0,format=raw,cache=none",
               "-device", "scsi-block,drive=d0", "-iscsi", f"initiator-name={GUEST_IQN}", "-nic", "none"])
    try:
        g.start()
        g.wait("ready", BOOT_TIMEOUT)
        g.wait("io")
        assert_held_by(c, "hosta", "hostb")
        time.sleep(0.5)
        windows = move_and_measure(c, g)
        stalls = [w["stall_us"] for w in windows]
        print(f"libiscsi VM: longest I/O stall per move {stalls} us")
        assert max(stalls) <= STALL_LIMIT_US, (stalls, g.console_tail())
        fence_from_other_node(c, g)
    except BaseException:
        print(c.dump_logs())
        print(g.console_tail(80))
        raise
    finally:
        g.stop()
        c.stop()


def test_libiscsi_vm_migrated_by_qemu_then_its_device_pushed(tmp_path: Path, image: Path) -> None:
    """What works today without incoming devices: QEMU's own live migration
    (QMP ``migrate`` to a QEMU started with ``-incoming`` whose drive is host
    A's URL too), then ``prmigrate migrate`` moves the device to B: the VM
    keeps its reservation throughout and ends with it on B's nexus; its
    writes and read-backs never fail."""
    c = ProcCluster(tmp_path)
    c.start()
    url = c.frontend_url("hosta")

    def vm(name: str, extra: list[str]) -> Guest:
        return Guest(image, tmp_path, name, {"mode": "libiscsi", "key": hex(GUEST_KEY)},
                     ["-device", "virtio-scsi-pci",
                      "-drive", f"file={url},if=none,id=d0,format=raw,cache=none",
                      "-device", "scsi-block,drive=d0", "-iscsi", f"initiator-name={GUEST_IQN}",
                      "-nic", "none", "-qmp", f"unix:{tmp_path / (name + '.qmp')},server=on,wait=off", *extra])

    src = vm("vm-source", [])
    dst = vm("vm-destination", ["-incoming", f"unix:{tmp_path / 'migration.sock'}"])
    qmp: list[Qmp] = []
    try:
        src.start()
        src.wait("ready", BOOT_TIMEOUT)
        src.wait("io")
        assert_held_by(c, "hosta", "hostb")
        src.mark()
        dst.start()  # opens its drive (host A's URL) at start: a second login of the guest's name
        qmp += [Qmp(tmp_path / "vm-source.qmp"), Qmp(tmp_path / "vm-destination.qmp")]
        qmp[0].execute("migrate", {"uri": f"unix:{tmp_path / 'migration.sock'}"})
        deadline = time.monotonic() + 120
        while (status := qmp[0].execute("query-migrate")["status"]) != "completed":  # type: ignore[index]
            assert status in ("setup", "active", "device", "pre-switchover"), status
            assert time.monotonic() < deadline, "QEMU's migration did not complete"
            time.sleep(0.2)
        assert qmp[1].execute("query-status")["status"] == "running"  # type: ignore[index]
        src.kill()  # the source QEMU (paused after its migration) quits: its session ends
        time.sleep(1.0)
        for _ in range(3):
            w = dst.mark()  # the window since the source's last mark: the VM migration in it
            assert w["errors"] == 0 and w["mismatches"] == 0, (w, dst.console_tail())
        assert w["ops"] > 0, w
        assert_held_by(c, "hosta", "hostb")  # the VM moved, the device not yet
        rc, out = _run(c.migrate("hosta", "hostb"))
        assert rc == 0, out
        w = settle(dst)
        assert w["errors"] == 0 and w["mismatches"] == 0 and w["ops"] > 0, (w, dst.console_tail())
        assert_held_by(c, "hostb", "hosta")
        assert not dst.lines_of("error") and not src.lines_of("error")
        assert not dst.lines_of("mismatch") and not src.lines_of("mismatch")
    except BaseException:
        print(c.dump_logs())
        print(src.console_tail(40))
        print(dst.console_tail(40))
        raise
    finally:
        for q in qmp:
            q.close()
        src.kill()
        dst.stop()
        c.stop()
