"""The device against a twin LU: random guest commands, same answers.

Two identical logical units (same name, so same serial and NAA designator,
same size) start in the same state. One is the backend of a passthrough
device (the in-process backend: the device's real backend nexus, no
sockets); the other, the reference, is driven directly on a nexus with the
same initiator name, ISID and target, so even TransportIDs match. Random
commands, well-formed and not (every opcode the LU knows and some it does
not, short and long CDBs, random fields, lengths near the capacity,
parameter lists of every size), go to both: the guest's answer through the
device must be the reference's answer, status, data and sense, command by
command, and the device must never raise. Side effects (writes, mode
pages, reservations, format, sanitize, stop) happen on both, so the two
stay twins.

With migrate-pr on, the device's own differences are applied to the
reference's answer: SIP_C/ATP_C cleared in REPORT CAPABILITIES, and a PR
OUT with SPEC_I_PT or ALL_TG_PT refused before it reaches the LU (the
reference is not sent that command). The tracked PR state is checked
against the backend's READ FULL STATUS at the end (``assert_tracks``).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from prmigrate.iscsi.session import fit_write
from prmigrate.lun.types import Nexus, Result
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrType
from prmigrate.scsi.sense import Sense, decode_sense

from .._seeds import extra_seeds
from .test_passthrough import G1, G2, OTHER, SHARED, Rig, run

LUN_BYTES = 1 << 20  # 2048 blocks of 512
BLOCKS = LUN_BYTES // 512


class TwinUnit(LogicalUnit):
    """A LU whose identity does not depend on its image path."""

    def __init__(self, path: Path | str, size: int | None = None) -> None:
        super().__init__(path, size, name="differential-twin")


# opcode -> CDB length; service-action opcodes get a valid action most of the time
_OPCODES: dict[int, int] = {
    0x00: 6, 0x03: 6, 0x04: 6, 0x08: 6, 0x0A: 6, 0x12: 6, 0x15: 6, 0x16: 6, 0x17: 6, 0x1A: 6,
    0x1B: 6, 0x1C: 6, 0x1D: 6, 0x1E: 6, 0x25: 10, 0x28: 10, 0x2A: 10, 0x2E: 10, 0x2F: 10,
    0x34: 10, 0x35: 10, 0x37: 10, 0x3B: 10, 0x3C: 10, 0x41: 10, 0x42: 10, 0x48: 10, 0x4C: 10,
    0x4D: 10, 0x55: 10, 0x56: 10, 0x57: 10, 0x5A: 10, 0x5E: 10, 0x5F: 10, 0x83: 16, 0x84: 16,
    0x88: 16, 0x89: 16, 0x8A: 16, 0x8B: 16, 0x8E: 16, 0x8F: 16, 0x90: 16, 0x91: 16, 0x93: 16,
    0x9C: 16, 0x9E: 16, 0x9F: 16, 0xA0: 12, 0xA3: 12, 0xA4: 12, 0xA8: 12, 0xAA: 12, 0xAE: 12,
    0xAF: 12, 0xB7: 12,
    # not implemented by the LU
    0x01: 6, 0x07: 6, 0x43: 10, 0x85: 16, 0xA1: 12, 0xA2: 12, 0xB5: 12, 0xC0: 16, 0xFF: 16,
}
# PR commands often (the device's own work), SCSI-2 RESERVE seldom: while
# it holds, every PR command conflicts (SPC-5 5.14.3) and nothing is snooped
_OPS = list(_OPCODES)
_WEIGHTS = [{0x5F: 10.0, 0x5E: 4.0, 0x16: 0.3, 0x56: 0.3, 0x17: 2.0, 0x57: 2.0}.get(op, 1.0) for op in _OPS]
_ACTIONS: dict[int, tuple[int, ...]] = {
    0x5E: (0, 1, 2, 3),  # PR IN
    0x5F: (0, 1, 2, 3, 4, 5, 6, 7, 8),  # PR OUT
    0x9E: (0x10, 0x12),  # READ CAPACITY(16), GET LBA STATUS
    0xA3: (0x0C, 0x0D),  # REPORT SUPPORTED OPERATION CODES / TMFs
    0x84: (0x00, 0x03),  # RECEIVE COPY RESULTS: COPY STATUS, OPERATING PARAMETERS
}
# where the transfer length lives (offset, size) for data-out sizing
_XFER: dict[int, tuple[int, int]] = {
    0x0A: (4, 1), 0x2A: (7, 2), 0x2E: (7, 2), 0x41: (7, 2), 0x8A: (10, 4), 0x8B: (10, 4),
    0x8E: (10, 4), 0x93: (10, 4), 0x9C: (12, 2), 0xAA: (6, 4), 0xAE: (6, 4),
}
# where the parameter list length lives, for commands that carry one
_PLIST: dict[int, tuple[int, int]] = {
    0x15: (4, 1), 0x55: (7, 2), 0x5F: (5, 4), 0x42: (7, 2), 0x4C: (7, 2), 0x1D: (3, 2),
    0x3B: (6, 3), 0x48: (7, 2), 0x83: (10, 4), 0x04: (0, 0), 0xA4: (6, 4),
}


def _put(cdb: bytearray, offset: int, size: int, value: int) -> None:
    if offset + size <= len(cdb):
        cdb[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "big")


def random_command(rng: random.Random) -> tuple[bytes, bytes]:
    """One guest command: (CDB, data-out)."""
    op = rng.choices(_OPS, _WEIGHTS)[0]
    n = _OPCODES[op]
    cdb = bytearray(n)
    cdb[0] = op
    if op in _ACTIONS and rng.random() < 0.9:
        cdb[1] = rng.choice(_ACTIONS[op]) | (cdb[1] & 0xE0 if rng.random() < 0.2 else 0)
    # LBA and transfer length near the capacity, most of the time in range
    lba = rng.choice((0, 1, rng.randrange(BLOCKS), BLOCKS - 1, BLOCKS, BLOCKS + 7, 0xFFFFFFFF))
    blocks = rng.choice((0, 1, 2, 8, rng.randrange(64)))
    if n == 10 and op not in (0x5E, 0x5F, 0x4C, 0x4D, 0x55, 0x5A, 0x3B, 0x3C, 0x42, 0x48):
        _put(cdb, 2, 4, lba)
        _put(cdb, 7, 2, blocks)
    elif n == 16 and op not in (0x83, 0x84, 0x85, 0x9E, 0x9F):
        _put(cdb, 2, 8, lba)
        _put(cdb, 10, 4, blocks)
        if op == 0x9C:
            _put(cdb, 12, 2, blocks)
            cdb[10:12] = b"\0\0"
    elif n == 12 and op in (0xA8, 0xAA, 0xAE, 0xAF):
        _put(cdb, 2, 4, lba)
        _put(cdb, 6, 4, blocks)
    elif op in (0x08, 0x0A):
        _put(cdb, 1, 3, lba & 0x1FFFFF)
        cdb[4] = blocks & 0xFF
    # allocation lengths of data-in commands
    alloc = rng.choice((0, 1, 4, 8, 24, 36, 255, 4096))
    if op in (0x1A, 0x5A):  # MODE SENSE: all pages or a known one, current or default values
        cdb[2] = rng.choice((0x00, 0x3F, 0x3F, 0x0A, 0x08, 0x1C, 0x4A, 0x8A, 0x3F | 0x40))
    elif op == 0x4D:  # LOG SENSE: cumulative values of a page
        cdb[2] = 0x40 | rng.choice((0x00, 0x0D, 0x2F, 0x15, 0x30))
    if op in (0x12, 0x1A, 0x03, 0x1C):
        if op == 0x12:
            cdb[1] = rng.choice((0, 0, 1, 1, 1))
        if op == 0x12 and cdb[1] & 1:
            cdb[2] = rng.choice((0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2, 0x8F, 0x01))
        _put(cdb, 3, 2, alloc) if op in (0x12, 0x1C) else _put(cdb, 4, 1, alloc)
    elif op in (0x5E, 0x5A, 0x4D):
        _put(cdb, 7, 2, alloc)
    elif op in (0xA0, 0xA3, 0x84, 0x37):
        _put(cdb, 6 if op != 0x84 else 10, 4, alloc)
    elif op == 0x9E:
        _put(cdb, 10, 4, alloc)
    # data-out: a transfer's worth, a parameter list, or nonsense
    data = b""
    if op in _XFER:
        off, size = _XFER[op]
        count = int.from_bytes(cdb[off:off + size], "big") if off + size <= n else 0
        if op in (0x41, 0x93):
            count = 1 if count or rng.random() < 0.5 else 0
        if op == 0x0A and count == 0:
            count = 256
        data = rng.randbytes(min(count, 64) * 512)
        if rng.random() < 0.1 and data:
            data = data[: rng.randrange(len(data))]
    elif op == 0x89:
        cdb[13] = rng.choice((0, 1, 2))
        data = rng.randbytes(cdb[13] * 2 * 512)
    elif op in _PLIST:
        length = rng.choice((24, 24, 24, 24, 0, 8, 18, 28, 36, 40, 64) if op == 0x5F else (0, 8, 18, 24, 28, 36, 40, 64))
        if op == 0x5F:
            params = bytearray(length)
            if length >= 24:
                params[0:8] = rng.choice((0, 0x1111, 0x2222)).to_bytes(8, "big")
                params[8:16] = rng.choice((0, 0x1111, 0x2222, 0x3333)).to_bytes(8, "big")
                params[20] = rng.choice((0, 0, 0, 0x01, 0x04, 0x08))  # APTPL / ALL_TG_PT / SPEC_I_PT
            cdb[2] = rng.choice((0x01, 0x03, 0x05, 0x06, 0x07, 0x08, 0x00, 0x10))
            data = bytes(params)
        else:
            data = rng.randbytes(length)
        off, size = _PLIST[op]
        if size:
            _put(cdb, off, size, len(data) if rng.random() < 0.85 else rng.choice((0, 3, 100)))
    if rng.random() < 0.25:  # noise in a byte or two (reserved bits, flags, control)
        for _ in range(rng.choice((1, 1, 2))):
            cdb[rng.randrange(1, n)] = rng.getrandbits(8)
    if rng.random() < 0.05:  # truncated CDB
        cdb = cdb[: rng.randrange(1, n)]
    return bytes(cdb), data


def masked(cdb: bytes, want: Result) -> Result:
    """The reference's answer as the device with migrate-pr on gives it."""
    if (cdb[:1] == b"\x5e" and len(cdb) > 1 and cdb[1] & 0x1F == 2 and want.status == 0
            and len(want.data_in) > 2):
        d = bytearray(want.data_in)
        d[2] &= ~0x0C
        return Result(want.status, bytes(d), want.sense)
    return want


def refused_by_mask(cdb: bytes, data: bytes) -> bool:
    """A PR OUT the device refuses with migrate-pr on (SPEC_I_PT, ALL_TG_PT)."""
    if cdb[:1] != b"\x5f" or len(cdb) < 9 or cdb[1] & 0x1F not in (0, 1, 2, 3, 4, 5, 6, 8):
        return False  # not PR OUT, no PARAMETER LIST LENGTH, REGISTER AND MOVE or no action
    return min(len(data), int.from_bytes(cdb[5:9], "big")) >= 24 and bool(data[20] & 0x0C)


async def twin_answer(ref: LogicalUnit, nexus: Nexus, cdb: bytes, data: bytes, fake: bool) -> Result:
    """The twin's answer to what the backend LU gets: the CDB as is (fake),
    or as our target hands it to its LU: padded to the 16-byte CDB field,
    and a block WRITE fitted to the EDTL the device sent (its data-out's
    length), as ``fit_write`` does."""
    if not fake:
        cdb = cdb.ljust(16, b"\0")
        if data:
            fit = fit_write(cdb, data, len(data), ref.block_size)
            if fit is not None:
                fitted, data, _, _ = fit
                if fitted is None:
                    return Result()
                cdb, data = fitted, bytes(data)
    r = ref.execute(nexus, cdb, data)
    return await r if isinstance(r, asyncio.Future) else r


async def run_twins(tmp_path: Path, seed: int, migrate_pr: bool, fake: bool, many: bool) -> None:
    """1,000 random commands from G1 alone, or (``many``) from G1, G2 (two
    guests of the device, two backend nexuses) and the other host, which
    sends its commands to both LUs directly: its PR OUTs preempt, clear and
    register around the guests, whose device learns it from the unit
    attentions and verification (checked by ``assert_tracks`` at the end)."""
    rng = random.Random(seed * 7919 + migrate_pr + (1 << 20 if many else 0))
    rig = Rig(tmp_path, fake=fake, migrate_pr=migrate_pr, unit=TwinUnit, lun_size=LUN_BYTES)
    ref = TwinUnit(tmp_path / "twin.img", LUN_BYTES)
    ref.attach(rig.other)  # the rig's other host
    await rig.start()
    guests = (G1, G2) if many else (G1,)
    twin: dict[str, Nexus] = {}
    for guest in guests:
        assert (await rig.cmd(guest, bytes(6))).good  # opens the guest's backend nexus
        port = rig.dev.port_of(guest)
        twin[guest] = Nexus.make(port.initiator, port.isid, SHARED)
        assert twin[guest] in rig.lu.ua.nexuses  # the twin serves the same nexus itself
        ref.attach(twin[guest])
        assert ref.execute(twin[guest], bytes(6)).good
    actors = [G1] * 6 + [G2] * 3 + [OTHER] * 2 if many else [G1]
    history: list[str] = []
    for i in range(1000):
        who = rng.choice(actors)
        cdb, data = random_command(rng)
        if not fake:
            cdb = cdb.ljust(16, b"\0")  # as a guest frontend hands it over: the PDU's CDB field
        history.append(f"{i} {who.rsplit(':', 1)[1]}: {cdb.hex()} +{len(data)}")
        if who == OTHER:
            got = rig.lu.execute(rig.other, cdb, data)
            want = ref.execute(rig.other, cdb, data)
        else:
            got = await rig.cmd(who, cdb, data)
            if migrate_pr and refused_by_mask(cdb, data):
                assert (got.status, decode_sense(got.sense).known) == (
                    2, Sense.INVALID_FIELD_IN_PARAMETER_LIST), history[-5:]
                continue
            want = await twin_answer(ref, twin[who], cdb, data, fake)
            if migrate_pr:
                want = masked(cdb, want)
        assert isinstance(got, Result) and isinstance(want, Result)
        assert (got.status, bytes(got.data_in), bytes(got.sense)) == (
            want.status, bytes(want.data_in), bytes(want.sense)
        ), "\n".join(history[-8:])
    assert len(history) == 1000
    # a random STOP may have left the LU not ready, a RESERVE(6) reserved
    # (it keeps READ FULL STATUS from the other host)
    for cdb in [bytes.fromhex("1b0000000100")] * 3 + [bytes.fromhex("170000000000")]:
        for guest in guests:
            got, want = await rig.cmd(guest, cdb), ref.execute(twin[guest], cdb)
            assert (got.status, bytes(got.sense)) == (want.status, bytes(want.sense))
        rig.lu.execute(rig.other, cdb)
    await rig.dev.drain()
    if _only_unsignalled_all_registrants_holding(rig.tracked(), rig.backend_view()):
        # the other host took an all-registrants reservation while a guest
        # was registered: the guest became a holder and nothing tells the
        # device (a RESERVE bumps no PRgeneration and sets no unit attention).
        # Its next verification (before every migration, on demand) shows it.
        await rig.dev.verify("all-registrants reservation of another initiator")
    await rig.assert_tracks()
    await rig.close()
    ref.close()


def _only_unsignalled_all_registrants_holding(tracked: dict, backend: dict) -> bool:
    """True when the tracked state differs from the backend's only by guests
    that hold an all-registrants reservation (as every registrant does) and
    are tracked as registered with the same key but not holding."""
    if tracked.keys() != backend.keys() or tracked == backend:
        return False
    for guest, want in backend.items():
        got = tracked[guest]
        if got == want:
            continue
        if not (want.holder and PrType(want.rtype).all_registrants and not got.holder
                and got.key == want.key):
            return False
    return True


@pytest.mark.parametrize(("seed", "migrate_pr", "fake"), [
    (1, False, True), (2, False, True), (3, False, True), (1, True, True), (2, True, True), (3, True, True),
    (4, False, False), (5, True, False),
] + [(s, bool(s & 1), bool(s & 2)) for s in extra_seeds()])
@run
async def test_random_commands_answered_like_the_twin_lu(tmp_path: Path, seed: int, migrate_pr: bool,
                                                         fake: bool) -> None:
    """One guest. fake: the device reaches its LU in process; else through
    our initiator and target on a loopback port, where every CDB travels
    in the 16-byte CDB field (the twin gets it padded the same way)."""
    await run_twins(tmp_path, seed, migrate_pr, fake, many=False)


@pytest.mark.parametrize(("seed", "migrate_pr", "fake"), [
    (1, False, True), (2, True, True), (3, True, True), (4, True, False),
] + [(s, bool(s & 1), bool(s & 2)) for s in extra_seeds()])
@run
async def test_two_guests_and_another_host_answered_like_the_twin_lu(
    tmp_path: Path, seed: int, migrate_pr: bool, fake: bool
) -> None:
    """Two guests of the device and another host sending to the LU
    directly, interleaved at random: every guest answer is the twin's, and
    the PR state the device tracks is the backend's at the end."""
    await run_twins(tmp_path, seed, migrate_pr, fake, many=True)
