"""The whole guest path against a twin target, over iSCSI on both sides.

A guest (our initiator) sends random commands to a guest frontend (our
target serving the passthrough device, which reaches its backend LU through
our initiator and target); the same commands go, on a second session, to a
twin LU served directly by our target. The twin session logs in with the
device's backend initiator name and ISID, so TransportIDs in PR IN data
match. Unlike ``test_differential.py`` (which calls the device directly),
the Expected Data Transfer Length here is random too: shorter, equal or
longer than what the CDB asks, so the frontend's read relay, its residual
handling and its write fitting (``fit_write``) are on the path. Every
answer (status, data, sense) must be the twin's.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from prmigrate.iscsi.initiator import connect
from prmigrate.iscsi.target import IscsiTarget, TargetNode

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


@pytest.mark.parametrize(("seed", "migrate_pr"), [(1, False), (2, True), (3, False)])
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
    port = rig.dev._port(G1)
    mirror = await connect(f"iscsi://{th}:{tp}/{TWIN}/0", initiator_name=port.initiator, isid=port.isid,
                           reconnect=False, command_timeout=10)
    try:
        while (await mirror.submit(0, bytes(16), b"", 0)).status != 0:  # its first-contact UA
            pass
        while (await guest.submit(0, bytes(16), b"", 0)).status != 0:
            pass
        history: list[str] = []
        for i in range(600):
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
