"""QEMU's own live migration of a VM whose disk is a frontend LUN, the device
and its reservation pulled by the destination host on first use.

Debian's qemu-system-x86 under TCG boots the guest of scripts/build-guest.sh
(built here when its cache is missing); its disk is virtio-scsi +
``scsi-block`` over ``iscsi://`` on host A's frontend. Inside the guest:
fence_scsi's unfence sequence (REGISTER AND IGNORE EXISTING KEY, RESERVE
type 5) with sg_persist, then O_DIRECT writes, each read back and compared,
for the whole run (scripts/guest/prm-io.c).

A move of the VM from host S to host D, as an orchestrator (or
contrib/libvirt/hooks/qemu) does it:

1. ``prmigrate device add --host D.sock name=vm1,backend=...,incoming-from=S``
   (the incoming device: it answers the open-time commands at once);
2. a QEMU started on D with ``-incoming`` whose drive is D's URL;
3. plain QMP ``migrate`` on the source QEMU (no pause before switchover, no
   hook inside QEMU); the source QEMU quits once it completed.

Required after each move: READ FULL STATUS from an independent observer
shows the guest's key and type on D's nexus and nothing on S's; the guest
saw no I/O error, no RESERVATION CONFLICT and no mismatch; after the last
move another node's PREEMPT AND ABORT of the guest's key fences the VM on
B. A VM migration cancelled before its switchover (QMP ``migrate_cancel``
in ``pre-switchover``, or a destination QEMU killed mid-way) leaves the
reservation on A with the guest running there, and the incoming device can
be deleted. A ``pc-q35-10.2`` device (migrate-pr off) leaves the
reservation on A's nexus: the device moves, its reservation does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from prmigrate.scsi.constants import PrType

from .migration_cluster import ProcCluster
from .test_vm import _run, assert_held_by, fence_from_other_node, settle
from .vm import GUEST_IQN, GUEST_KEY, guest_image
from .vm_migration import VmRun, delete_device, start_cluster

pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]

@pytest.fixture(scope="module")
def image() -> Path:
    return guest_image()


@contextmanager
def running_vm(tmp_path: Path, image: Path, **kw: Any) -> Iterator[VmRun]:
    """The cluster and the VM booted on A holding its reservation; logs printed on failure, all stopped at the end."""
    c = ProcCluster(tmp_path, **kw)
    run = None
    try:
        start_cluster(c)
        run = VmRun(c, image, tmp_path)
        run.boot()
        assert_held_by(c, "hosta", "hostb")
        yield run
    except BaseException:
        print(run.dump() if run else c.dump_logs())
        raise
    finally:
        if run:
            run.stop()
        c.stop()


def test_vm_migrated_by_qemu_takes_its_reservation_along_there_and_back_then_fenced(
        tmp_path: Path, image: Path) -> None:
    with running_vm(tmp_path, image) as run:
        c = run.c
        for src, dst in (("hosta", "hostb"), ("hostb", "hosta"), ("hosta", "hostb")):
            w = settle(run.move(dst).guest)
            assert w["errors"] == 0 and w["mismatches"] == 0 and w["ops"] > 0, (src, dst, w)
            assert_held_by(c, dst, src)
        run.assert_clean()
        fence_from_other_node(c, run.vm.guest)  # the VM, now on B, is fenced


def test_vm_migrations_cancelled_before_switchover_leave_the_reservation_on_a(
        tmp_path: Path, image: Path) -> None:
    with running_vm(tmp_path, image) as run:
        c = run.c
        src = run.vm
        # 1. QMP migrate_cancel while paused in pre-switchover
        dst, sock = run.destination("hostb")
        src.qmp.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "pause-before-switchover", "state": True}]})
        src.qmp.execute("migrate", {"uri": f"unix:{sock}"})
        assert src.wait_migration({"pre-switchover"}) == "pre-switchover"
        src.qmp.execute("migrate_cancel")
        assert src.wait_migration({"cancelled"}) == "cancelled"
        assert dst.exited(30), "the destination QEMU did not end after the cancelled migration"
        check_still_on_a(c, run)
        # 2. a destination QEMU killed during the migration
        src.qmp.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "pause-before-switchover", "state": False}]})
        src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})  # 1 MiB/s: long enough to kill
        dst, sock = run.destination("hostb")
        src.qmp.execute("migrate", {"uri": f"unix:{sock}"})
        assert src.wait_migration({"active"}) == "active"
        dst.kill()
        assert src.wait_migration({"failed", "cancelled"}) == "failed"
        check_still_on_a(c, run)
        run.assert_clean()


def check_still_on_a(c: ProcCluster, run: VmRun) -> None:
    """The guest runs on A, writing without error, the reservation on A's
    nexus; the incoming device on B took nothing and is deleted."""
    assert run.vm.status() == "running"
    w = settle(run.vm.guest)
    assert w["errors"] == 0 and w["mismatches"] == 0 and w["ops"] > 0, w
    assert_held_by(c, "hosta", "hostb")
    delete_device(c, "hostb")
    devices = _run(c.call("hosta", "query-devices"))
    assert [d["name"] for d in devices] == ["vm1"]


def test_vm_migration_with_migrate_pr_off_leaves_the_reservation_on_a(tmp_path: Path, image: Path) -> None:
    with running_vm(tmp_path, image, machine="pc-q35-10.2") as run:
        c = run.c
        settle(run.move("hostb").guest)
        _run(c.wait_device("hostb"))
        _run(c.wait_device("hosta", present=False))
        # the device moved, its reservation did not: the key and type stay on
        # A's nexus, B's nexus holds nothing ...
        on_a = _run(c.entries_of("hosta", guest=GUEST_IQN))
        assert len(on_a) == 1 and on_a[0].key == GUEST_KEY and on_a[0].holder, on_a
        assert on_a[0].rtype == PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
        assert _run(c.entries_of("hostb", guest=GUEST_IQN)) == []
        # ... so the guest's writes through B are refused (docs/design.md:
        # QEMU's migrate-pr=off), with RESERVATION CONFLICT and nothing else
        errors: list[dict[str, Any]] = run.vm.guest.lines_of("error")
        assert errors and {e["sg_status"] for e in errors} == {"0x18"}, errors
        assert not run.vm.guest.lines_of("mismatch")
