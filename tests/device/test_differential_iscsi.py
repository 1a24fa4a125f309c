"""The whole guest path against a twin target, over iSCSI on both sides.

A guest (our initiator) sends random commands to a guest frontend (our
target serving the passthrough device, which reaches its backend LU through
our initiator and target); the same commands go, on a second session, to a
twin LU served directly by our target. The twin session logs in with the
device's backend initiator name and ISID, so TransportIDs in PR IN data
match. Unlike ``test_differential.py`` (which calls the device directly),
the Expected Data Transfer Length here is random too: shorter, equal or
longer than what the CDB asks, so the frontend's read relay, its residual
handling and its write fitting (``fit_write``) are on the path; now and
then a task management function (LU reset, CLEAR/ABORT TASK SET, target
warm/cold reset) goes to both as well. Every answer (status, data, sense;
the function's response) must be the twin's.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from prmigrate.iscsi.initiator import Session, TmfError, connect
from prmigrate.iscsi.target import IscsiTarget, TargetNode
from prmigrate.lun.types import Result
from prmigrate.scsi.constants import SenseKey, Status
from prmigrate.scsi.sense import SenseDecodeError, decode_sense

from .._seeds import extra_seeds
from .test_differential import LUN_BYTES, TwinUnit, masked, random_command, refused_by_mask
from .test_passthrough import G1, SHARED, Rig, run

FRONTEND = "iqn.2026-11.org.prmigrate:vm1"
TWIN = SHARED  # same name: VPD 83h names the target


def edtl_for(rng: random.Random, cdb: bytes, data: bytes) -> int:
    """The data-in length the guest asks for: none with data-out, else a
    guess around what the CDB transfers (the device's own rule), or random."""
    from prmigrate.device.passthrough import expected_in_len

    if data:
        return 0
    want = expected_in_len(cdb)
    pick = rng.choice((want, want, want, 0, max(0, want - 512), want + 512, rng.randrange(0, 9000)))
    return min(pick, 0xFFFFFFFF)  # what an EDTL field carries


def _ua(r: Result) -> tuple[int, int] | None:
    """The unit attention an answer reports: as CHECK CONDITION, or as the
    data of a REQUEST SENSE (GOOD, sense data as data-in)."""
    sense = r.sense if r.status == Status.CHECK_CONDITION else r.data_in if r.status == Status.GOOD else b""
    try:
        d = decode_sense(sense) if sense else None
    except SenseDecodeError:
        return None
    return (d.asc, d.ascq) if d is not None and d.key == SenseKey.UNIT_ATTENTION else None


async def _tmf(session: Session, fn: str) -> int:
    """The function's response code (0: FUNCTION COMPLETE)."""
    call = getattr(session, fn)
    try:
        return await (call(0) if fn in ("lun_reset", "clear_task_set", "abort_task_set") else call())
    except TmfError as e:
        return e.response


@pytest.mark.parametrize(("seed", "migrate_pr"), [(1, False), (2, True), (3, False)]
                         + [(s, bool(s & 1)) for s in extra_seeds()])
@run
async def test_guest_path_answers_like_a_twin_target(tmp_path: Path, seed: int, migrate_pr: bool) -> None:
    rng = random.Random(seed)
    rig = Rig(tmp_path, migrate_pr=migrate_pr, unit=TwinUnit, lun_size=LUN_BYTES)
    await rig.start()
    frontend = IscsiTarget([TargetNode(FRONTEND, {0: rig.dev})])
    twin_lu = TwinUnit(tmp_path / "twin.img", LUN_BYTES)
    twin_lu.attach(rig.other)
    twin = IscsiTarget([TargetNode(TWIN, {0: twin_lu})])
    host = f"127.0.0.{random.randint(2, 250)}"
    (fh, fp), *_ = await frontend.start(host, 0)
    (th, tp), *_ = await twin.start(host, 0)
    guest = await connect(f"iscsi://{fh}:{fp}/{FRONTEND}/0", initiator_name=G1, isid=0x23D000000031,
                          reconnect=False, command_timeout=10)
    assert (await guest.submit(0, bytes(16), b"", 0)).status in (0, 2)  # opens the device's nexus
    port = rig.dev.port_of(G1)
    mirror = await connect(f"iscsi://{th}:{tp}/{TWIN}/0", initiator_name=port.initiator, isid=port.isid,
                           reconnect=False, command_timeout=10)
    try:
        while (await mirror.submit(0, bytes(16), b"", 0)).status != 0:  # its first-contact UA
            pass
        while (await guest.submit(0, bytes(16), b"", 0)).status != 0:
            pass
        history: list[str] = []
        warm_reset = False
        for i in range(600):
            if rng.random() < 0.03:  # a task management function, on both
                # (no TARGET COLD RESET: it ends every connection, RFC 7143 11.5.1)
                fn = rng.choice(("lun_reset", "clear_task_set", "abort_task_set", "target_warm_reset"))
                history.append(f"{i}: {fn}")
                a = await _tmf(guest, fn)
                b = await _tmf(mirror, fn)
                assert a == b, "\n".join(history[-6:])
                warm_reset = warm_reset or fn == "target_warm_reset"
                continue
            cdb, data = random_command(rng)
            if len(cdb) > 16:
                continue
            n = edtl_for(rng, cdb.ljust(16, b"\0"), data)
            history.append(f"{i}: {cdb.hex()} +{len(data)} edtl {n}")
            got = await guest.submit(0, cdb, data, n)
            if migrate_pr and refused_by_mask(cdb.ljust(16, b"\0"), data):
                assert got.status == 2, history[-3:]
                continue
            want = await mirror.submit(0, cdb, data, n)
            if migrate_pr:
                want = masked(cdb, want)
            if warm_reset and _ua(got) == (0x29, 0x03) and _ua(want) == (0x29, 0x02):
                # the device runs a guest's target reset as a LU reset of the
                # backend LUN (never a reset of the shared target): the guest
                # learns of it as BUS DEVICE RESET FUNCTION OCCURRED, where a
                # target of its own says SCSI BUS RESET OCCURRED
                want = got
            if _ua(want) is not None:
                warm_reset = False
            assert (got.status, bytes(got.data_in), bytes(got.sense)) == (
                want.status, bytes(want.data_in), bytes(want.sense)
            ), "\n".join(history[-6:])
        assert len(history) >= 550
    finally:
        await asyncio.gather(guest.close(), mirror.close(), return_exceptions=True)
        await frontend.close()
        await twin.close()
        await rig.close()
        twin_lu.close()


@run
async def test_guest_asking_gigabytes_for_a_short_answer_costs_the_host_no_memory(tmp_path: Path) -> None:
    """A guest's REPORT LUNS and READ DEFECT DATA(12) with allocation lengths
    and EDTLs of about 3 GiB (what a random guest found): answered like the
    short answer or an error, and neither the frontend, the device's
    backend session nor the target allocates the EDTL."""
    import tracemalloc

    rig = Rig(tmp_path, migrate_pr=True, unit=TwinUnit, lun_size=LUN_BYTES)
    await rig.start()
    frontend = IscsiTarget([TargetNode(FRONTEND, {0: rig.dev})])
    host = f"127.0.0.{random.randint(2, 250)}"
    (fh, fp), *_ = await frontend.start(host, 0)
    guest = await connect(f"iscsi://{fh}:{fp}/{FRONTEND}/0", initiator_name=G1, isid=0x23D000000031,
                          reconnect=False, command_timeout=10)
    try:
        while (await guest.submit(0, bytes(16), b"", 0)).status != 0:  # its first-contact UAs
            pass
        tracemalloc.start()
        try:
            for cdb in (bytes.fromhex("a00000000000c00002010000"),  # REPORT LUNS, 3 GiB
                        bytes.fromhex("b70000000000b4000000009c")):  # READ DEFECT DATA(12)
                r = await guest.submit(0, cdb, b"", 0xC0000201)
                assert r.status in (Status.GOOD, Status.CHECK_CONDITION), r
                assert len(r.data_in) < 4096
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 32 << 20, peak
    finally:
        await guest.close()
        await frontend.close()
        await rig.close()
