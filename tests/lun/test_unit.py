"""LogicalUnit: every command, good and bad input, sense formats, UA rules."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from prmigrate.lun.types import Nexus, ReservationConflict, Result
from prmigrate.lun.unit import MAX_UNMAP_DESCRIPTORS, LogicalUnit
from prmigrate.scsi.constants import Status
from prmigrate.scsi.sense import CheckCondition, Sense, decode_sense

BS = 512
BLOCKS = 8192  # 4 MiB
A = Nexus.make("iqn.2026-01.test:a", 0x23D000000001, "iqn.2026-01.test:target", tpgt=1, rel_port=1)
B = Nexus.make("iqn.2026-01.test:b", 0x23D000000002, "iqn.2026-01.test:target", tpgt=1, rel_port=1)


class StubPR:
    """Stand-in for lun.pr.ReservationTable: records calls, conflicts on demand."""

    def __init__(self, ua, state_path, abort_tasks=None, log=None) -> None:
        self.ua = ua
        self.state_path = state_path
        self.abort_tasks = abort_tasks
        self.calls: list[tuple] = []
        self.conflict = False
        self.raise_out: Exception | None = None
        self.generation = 0

    def conflicts(self, nexus, cdb) -> bool:
        return self.conflict

    def persistent_reserve_in(self, nexus, cdb) -> bytes:
        self.calls.append(("in", nexus, bytes(cdb)))
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        return bytes(8)[:alloc]

    def persistent_reserve_out(self, nexus, cdb, data) -> None:
        self.calls.append(("out", nexus, bytes(cdb), bytes(data)))
        if self.raise_out is not None:
            raise self.raise_out

    def reserve(self, nexus, cdb) -> None:
        self.calls.append(("reserve", nexus))

    def release(self, nexus, cdb) -> None:
        self.calls.append(("release", nexus))

    def nexus_lost(self, nexus) -> None:
        self.calls.append(("lost", nexus))

    def reset(self) -> None:
        self.calls.append(("reset",))


def cdb(s: str) -> bytes:
    return bytes.fromhex(s)


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def check(r: Result, sense: Sense, information: int | None = None) -> None:
    assert r.status == Status.CHECK_CONDITION, r
    d = decode_sense(r.sense)
    assert (d.key, d.asc, d.ascq) == sense.value
    if information is not None:
        assert d.information == information


def good(r: Result) -> bytes:
    assert r.status == Status.GOOD, (r, r.sense and decode_sense(r.sense).describe())
    return bytes(r.data_in)


# ------------------------------------------------------------------ dispatch
def test_unknown_opcode(lu: LogicalUnit) -> None:
    check(lu.execute(A, cdb("ff 00 00 00 00 00"), b""), Sense.INVALID_OPCODE)
    check(lu.execute(A, cdb("85 00") + bytes(14), b""), Sense.INVALID_OPCODE)  # ATA PASS-THROUGH(16)


def test_short_and_empty_cdb(lu: LogicalUnit) -> None:
    check(lu.execute(A, b"", b""), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, cdb("28 00 00 00 00"), b""), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, cdb("88 00 00"), b""), Sense.INVALID_FIELD_IN_CDB)


def test_internal_error_is_hardware_error(lu: LogicalUnit, caplog) -> None:
    def boom(*a):
        raise RuntimeError("disk on fire")

    lu._dispatch[0x00] = boom
    check(lu.execute(A, bytes(6), b""), Sense.INTERNAL_TARGET_FAILURE)
    assert "internal error" in caplog.text


def test_reservation_conflict(lu: LogicalUnit) -> None:
    lu.pr.conflict = True
    r = lu.execute(A, rw10(0x28, 0, 1), b"")
    assert r.status == Status.RESERVATION_CONFLICT and r.sense == b""


# ------------------------------------------------------------------ INQUIRY
def test_standard_inquiry_golden(lu: LogicalUnit) -> None:
    d = good(lu.execute(A, cdb("12 00 00 01 04 00"), b""))
    assert len(d) == 96
    # TPGS 01b (implicit asymmetric access, REPORT TARGET PORT GROUPS), 3PC: EXTENDED COPY
    assert d[:8] == bytes((0x00, 0x00, 0x06, 0x12, 91, 0x18, 0x00, 0x02))
    assert d[8:16] == b"PRMIGRAT" and d[16:32] == b"SHARED-LUN      " and d[32:36] == b"0001"
    descs = struct.unpack_from(">8H", d, 58)
    assert descs[:6] == (0x00A0, 0x0960, 0x0460, 0x04C0, 0x05C0, 0x0600)
    assert good(lu.execute(A, cdb("12 00 00 00 24 00"), b"")) == d[:36]
    assert good(lu.execute(A, cdb("12 00 00 00 00 00"), b"")) == b""


def test_inquiry_bad_fields(lu: LogicalUnit) -> None:
    check(lu.execute(A, cdb("12 00 83 00 ff 00"), b""), Sense.INVALID_FIELD_IN_CDB)  # page without EVPD
    check(lu.execute(A, cdb("12 02 00 00 ff 00"), b""), Sense.INVALID_FIELD_IN_CDB)  # CMDDT
    check(lu.execute(A, cdb("12 01 c0 00 ff 00"), b""), Sense.INVALID_FIELD_IN_CDB)  # unknown VPD


def test_vpd_supported_and_serial(lu: LogicalUnit) -> None:
    assert good(lu.execute(A, cdb("12 01 00 00 ff 00"), b"")) == bytes.fromhex("00000007 00 80 83 8f b0 b1 b2")
    assert good(lu.execute(A, cdb("12 01 80 00 ff 00"), b"")) == bytes.fromhex("00800006") + b"SN0001"


def _designators(page: bytes) -> list[tuple[int, int, bytes]]:
    out, off = [], 4
    while off < len(page):
        n = page[off + 3]
        out.append((page[off], page[off + 1], page[off + 4 : off + 4 + n]))
        off += 4 + n
    return out


def test_vpd_device_identification(lu: LogicalUnit, tmp_path: Path) -> None:
    d = good(lu.execute(A, cdb("12 01 83 01 00 00"), b""))
    assert d[1] == 0x83 and struct.unpack_from(">H", d, 2)[0] == len(d) - 4
    ds = _designators(d)
    naa = ds[0]
    assert naa[:2] == (0x01, 0x03) and len(naa[2]) == 16 and naa[2][0] >> 4 == 6
    # stable: same name -> same NAA, different name -> different NAA
    other = LogicalUnit(tmp_path / "img2", BS * 8, name="another-lu", pr_factory=StubPR)
    d2 = good(other.execute(A, cdb("12 01 83 01 00 00"), b""))
    assert _designators(d2)[0][2] != naa[2]
    other.close()
    by_type = {(b1 & 0x3F): data for _b0, b1, data in ds[1:] if (b1 >> 4) & 3 == 1}
    assert by_type[0x14] == bytes.fromhex("00000001")  # relative target port 1
    assert by_type[0x15] == bytes.fromhex("00000001")  # target port group
    name = by_type[0x18]
    assert name.rstrip(b"\0") == b"iqn.2026-01.test:target,t,0x0001" and len(name) % 4 == 0
    assert all(b0 >> 4 == 5 for b0, b1, _ in ds if b1 & 0x80)  # PIV -> protocol iSCSI


def test_vpd_block_limits_golden(lu: LogicalUnit) -> None:
    d = good(lu.execute(A, cdb("12 01 b0 00 40 00"), b""))
    assert len(d) == 64 and d[:4] == bytes.fromhex("00b0003c")
    assert d[4] == 0x00 and d[5] == 255  # WSNZ = 0, max COMPARE AND WRITE
    max_xfer, opt, _pf, max_unmap, max_desc, gran, uga = struct.unpack_from(">7I", d, 8)
    assert max_xfer == 65536 and opt == (128 << 10) // BS
    assert max_unmap == 1 << 20 and max_desc == MAX_UNMAP_DESCRIPTORS and gran == 1
    assert uga == 0x80000000
    assert struct.unpack_from(">Q", d, 36)[0] == (64 << 20) // BS
    # WRITE ATOMIC: max 4 MiB, alignment 1, granularity 1, same limits with a boundary
    assert struct.unpack_from(">5I", d, 44) == (8192, 1, 1, 8192, 8192)


def test_vpd_block_limits_atomic_scales_with_block_size(tmp_path: Path) -> None:
    u = LogicalUnit(tmp_path / "img4k", 64 * 4096, block_size=4096, name="bs4k", pr_factory=StubPR)
    d = good(u.execute(A, cdb("12 01 b0 00 40 00"), b""))
    u.close()
    max_xfer = struct.unpack_from(">I", d, 8)[0]
    assert struct.unpack_from(">5I", d, 44) == (1024, 1, 1, 1024, 1024) and 1024 <= max_xfer


def test_atomic_unit_is_alignment_and_granularity(tmp_path: Path) -> None:
    u = LogicalUnit(tmp_path / "img", 64 * BS, name="au", pr_factory=StubPR, atomic_unit=24)
    d = good(u.execute(A, cdb("12 01 b0 00 40 00"), b""))
    assert struct.unpack_from(">5I", d, 44) == (8184, 24, 24, 8184, 8184)  # max: whole units
    check(u.execute(A, wa16(1, 24), bytes(24 * BS)), Sense.INVALID_FIELD_IN_CDB)
    check(u.execute(A, wa16(0, 8), bytes(8 * BS)), Sense.INVALID_FIELD_IN_CDB)
    good(u.execute(A, wa16(24, 24), bytes(24 * BS)))
    u.close()
    for bad in (0, 8193):
        with pytest.raises(ValueError):
            LogicalUnit(tmp_path / "img", 64 * BS, name="au", pr_factory=StubPR, atomic_unit=bad)


def test_vpd_b1_b2(lu: LogicalUnit) -> None:
    b1 = good(lu.execute(A, cdb("12 01 b1 00 40 00"), b""))
    assert b1[:6] == bytes.fromhex("00b1003c0001")
    assert good(lu.execute(A, cdb("12 01 b2 00 40 00"), b"")) == bytes.fromhex("00b20004 00 e4 02 00")


# --------------------------------------------------------------- REPORT LUNS
def test_report_luns(lu: LogicalUnit) -> None:
    assert good(lu.execute(A, cdb("a0 00 00 00 00 00 00 00 01 00 00 00"), b"")) == bytes.fromhex(
        "00000008 00000000 0000000000000000"
    )
    lu.report_luns = lambda: [3, 0, 300]
    d = good(lu.execute(A, cdb("a0 00 00 00 00 00 00 00 01 00 00 00"), b""))
    assert d[:4] == bytes.fromhex("00000018")
    assert d[8:] == bytes.fromhex("0000000000000000 0003000000000000 412c000000000000")
    check(lu.execute(A, cdb("a0 00 00 00 00 00 00 00 00 0f 00 00"), b""), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, cdb("a0 00 07 00 00 00 00 00 01 00 00 00"), b""), Sense.INVALID_FIELD_IN_CDB)


# ---------------------------------------------------- unit attentions / sense
def test_ua_reported_once_and_exempt_commands(lu: LogicalUnit) -> None:
    lu.ua.establish(A, Sense.REGISTRATIONS_PREEMPTED)
    good(lu.execute(A, cdb("12 00 00 00 24 00"), b""))  # INQUIRY does not report it
    good(lu.execute(A, cdb("a0 00 00 00 00 00 00 00 00 10 00 00"), b""))  # nor REPORT LUNS
    good(lu.execute(B, bytes(6), b""))  # other nexus unaffected
    check(lu.execute(A, bytes(6), b""), Sense.REGISTRATIONS_PREEMPTED)
    good(lu.execute(A, bytes(6), b""))


def test_ua_before_conflict_after_opcode(lu: LogicalUnit) -> None:
    lu.ua.establish(A, Sense.RESERVATIONS_RELEASED)
    lu.pr.conflict = True
    check(lu.execute(A, cdb("ff 00 00 00 00 00"), b""), Sense.INVALID_OPCODE)
    check(lu.execute(A, rw10(0x28, 0, 1), b""), Sense.RESERVATIONS_RELEASED)
    assert lu.execute(A, rw10(0x28, 0, 1), b"").status == Status.RESERVATION_CONFLICT


def test_request_sense_returns_ua(lu: LogicalUnit) -> None:
    assert good(lu.execute(A, cdb("03 00 00 00 12 00"), b"")) == bytes.fromhex(
        "70 00 00 00000000 0a 00000000 00 00 00 000000"
    )
    lu.ua.establish(A, Sense.BUS_DEVICE_RESET)
    d = good(lu.execute(A, cdb("03 01 00 00 fc 00"), b""))  # DESC=1
    assert d[:4] == bytes.fromhex("72 06 29 03")
    good(lu.execute(A, bytes(6), b""))  # cleared by REQUEST SENSE
    assert good(lu.execute(A, cdb("03 00 00 00 08 00"), b"")) == bytes.fromhex("70000000000000 0a")


def test_report_luns_clears_reported_luns_changed(lu: LogicalUnit) -> None:
    lu.ua.establish(A, Sense.REPORTED_LUNS_DATA_HAS_CHANGED)
    good(lu.execute(A, cdb("a0 00 00 00 00 00 00 00 00 10 00 00"), b""))
    good(lu.execute(A, bytes(6), b""))


def test_ua_queue_rules() -> None:
    from prmigrate.lun.ua import UnitAttentions

    ua = UnitAttentions()
    ua.establish(A, Sense.RESERVATIONS_RELEASED)
    ua.establish(A, Sense.RESERVATIONS_RELEASED)
    ua.establish(A, Sense.REGISTRATIONS_PREEMPTED)
    assert ua.peek(A) is Sense.RESERVATIONS_RELEASED
    assert ua.pop(A) is Sense.RESERVATIONS_RELEASED
    assert ua.pop(A) is Sense.REGISTRATIONS_PREEMPTED
    assert ua.pop(A) is None and not ua
    ua.establish(A, Sense.RESERVATIONS_RELEASED)
    ua.establish(A, Sense.BUS_DEVICE_RESET)  # a reset supersedes older conditions
    assert ua.pop(A) is Sense.BUS_DEVICE_RESET and ua.pop(A) is None
    ua.attach(B)
    ua.establish_all(Sense.MODE_PARAMETERS_CHANGED, except_nexus=A)
    assert ua.peek(A) is None and ua.peek(B) is Sense.MODE_PARAMETERS_CHANGED
    ua.clear(B)
    assert not ua.pending(B)


# ------------------------------------------------------------ task management
def test_lu_reset(lu: LogicalUnit) -> None:
    lu.reset(A)
    assert ("reset",) in lu.pr.calls
    good(lu.execute(A, cdb("12 00 00 00 24 00"), b""))  # INQUIRY passes
    check(lu.execute(A, bytes(6), b""), Sense.BUS_DEVICE_RESET)  # requester too (SAM-5 6.3.3)
    check(lu.execute(B, bytes(6), b""), Sense.BUS_DEVICE_RESET)
    good(lu.execute(A, bytes(6), b""))
    good(lu.execute(B, bytes(6), b""))


def test_target_warm_reset_restores_mode_pages(lu: LogicalUnit) -> None:
    _set_control(lu, A, d_sense=True)
    lu.ua.clear(B)
    lu.reset(A, target_reset=True)
    assert not lu.modes.d_sense
    r = lu.execute(A, bytes(6), b"")
    assert r.sense[0] == 0x70  # fixed format again: D_SENSE back to default
    check(r, Sense.SCSI_BUS_RESET)
    check(lu.execute(B, bytes(6), b""), Sense.SCSI_BUS_RESET)  # supersedes 2A/01


def test_target_cold_reset_reaches_every_nexus(lu: LogicalUnit) -> None:
    lu.reset(A, cold=True, target_reset=True)
    check(lu.execute(A, bytes(6), b""), Sense.POWER_ON_OCCURRED)
    check(lu.execute(B, bytes(6), b""), Sense.POWER_ON_OCCURRED)


def test_nexus_lost_and_clear_task_set(lu: LogicalUnit) -> None:
    lu.ua.establish(B, Sense.RESERVATIONS_RELEASED)
    lu.nexus_lost(B)
    assert ("lost", B) in lu.pr.calls and not lu.known(B)
    good(lu.execute(B, bytes(6), b""))
    lu.attach(B)
    assert lu.known(B)
    lu.clear_task_set(A, aborted=[A, B])
    good(lu.execute(A, bytes(6), b""))
    check(lu.execute(B, bytes(6), b""), Sense.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
    lu.clear_task_set(A, aborted=[])
    good(lu.execute(B, bytes(6), b""))
    lu.clear_task_set(B)  # unknown set of aborted tasks: every other nexus
    check(lu.execute(A, bytes(6), b""), Sense.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
    good(lu.execute(B, bytes(6), b""))


def test_abort_hook(lu: LogicalUnit) -> None:
    seen = []
    lu.pr.abort_tasks({B})  # no hook yet: ignored
    lu.abort_hook = seen.append
    lu.pr.abort_tasks({B})
    assert seen == [{B}]
    assert lu.pr.state_path.name == "lun0-pr.json"


# ------------------------------------------------------------ READ CAPACITY
def test_read_capacity(lu: LogicalUnit) -> None:
    assert good(lu.execute(A, cdb("25 00 00 00 00 00 00 00 00 00"), b"")) == struct.pack(">II", BLOCKS - 1, BS)
    check(lu.execute(A, cdb("25 00 00 00 00 01 00 00 00 00"), b""), Sense.INVALID_FIELD_IN_CDB)
    d = good(lu.execute(A, cdb("9e 10 00000000 00000000 00000020 00 00"), b""))
    assert d == struct.pack(">QI", BLOCKS - 1, BS) + bytes((0, 0, 0xC0, 0)) + bytes(16)
    assert good(lu.execute(A, cdb("9e 10 00000000 00000000 0000000c 00 00"), b"")) == d[:12]
    check(lu.execute(A, cdb("9e 1f 00000000 00000000 00000020 00 00"), b""), Sense.INVALID_FIELD_IN_CDB)


# ---------------------------------------------------------------- READ/WRITE
@pytest.mark.parametrize("op_r,op_w,enc", [(0x28, 0x2A, rw10), (0x88, 0x8A, rw16)])
def test_write_read_roundtrip(lu: LogicalUnit, op_r, op_w, enc) -> None:
    data = bytes(range(256)) * 4
    good(lu.execute(A, enc(op_w, 10, 2), data))
    assert good(lu.execute(A, enc(op_r, 10, 2), b"")) == data
    assert good(lu.execute(A, enc(op_r, 10, 0), b"")) == b""


def test_rw12_and_rw6(lu: LogicalUnit) -> None:
    good(lu.execute(A, struct.pack(">BBIIBB", 0xAA, 0, 5, 1, 0, 0), b"q" * BS))
    assert good(lu.execute(A, struct.pack(">BBIIBB", 0xA8, 0, 5, 1, 0, 0), b"")) == b"q" * BS
    good(lu.execute(A, cdb("0a 00 00 06 01 00"), b"s" * BS))
    assert good(lu.execute(A, cdb("08 00 00 05 02 00"), b"")) == b"q" * BS + b"s" * BS
    assert len(good(lu.execute(A, cdb("08 00 00 00 00 00"), b""))) == 256 * BS  # 0 -> 256


def test_rw_range_and_length_checks(lu: LogicalUnit) -> None:
    check(lu.execute(A, rw10(0x28, BLOCKS, 1), b""), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, rw10(0x28, BLOCKS - 1, 2), b""), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, rw16(0x88, 2**64 - 1, 1), b""), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, rw16(0x8A, 2**63, 1), b"x" * BS), Sense.LBA_OUT_OF_RANGE)
    lu._max_xfer = 16  # MAXIMUM TRANSFER LENGTH, shrunk to fit the small LU
    check(lu.execute(A, rw10(0x28, 0, 17), b""), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, rw10(0x2A, 0, 17), b"x" * 17 * BS), Sense.INVALID_FIELD_IN_CDB)
    good(lu.execute(A, rw10(0x28, 0, 16), b""))
    check(lu.execute(A, rw10(0x28, 0, 1, flags=0x20), b""), Sense.INVALID_FIELD_IN_CDB)  # RDPROTECT
    check(lu.execute(A, rw10(0x2A, 0, 1, flags=0x20), b"x" * BS), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, cdb("08 00 20 00 01 00"), b""), Sense.LBA_OUT_OF_RANGE)
    good(lu.execute(A, cdb("08 00 1f ff 01 00"), b""))  # last block


def test_write_short_data_out_is_check_condition(lu: LogicalUnit) -> None:
    check(lu.execute(A, rw10(0x2A, 0, 2), b"x" * BS), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, rw10(0x2A, 0, 2), b""), Sense.INVALID_FIELD_IN_CDB)


def test_fua_flushes(lu: LogicalUnit, monkeypatch) -> None:
    flushes = []
    monkeypatch.setattr(lu.store, "flush", lambda off=0, n=0: flushes.append((off, n)))
    good(lu.execute(A, rw10(0x2A, 4, 1), b"x" * BS))
    assert flushes == []
    good(lu.execute(A, rw10(0x2A, 4, 1, flags=0x08), b"x" * BS))
    assert flushes == [(4 * BS, BS)]
    good(lu.execute(A, rw10(0x28, 4, 1, flags=0x18), b""))  # DPO|FUA read is fine
    good(lu.execute(A, cdb("35 00 00 00 00 00 00 00 00 00"), b""))  # SYNCHRONIZE CACHE(10)
    assert len(flushes) == 2
    check(lu.execute(A, rw16(0x91, BLOCKS, 1), b""), Sense.LBA_OUT_OF_RANGE)


def test_write_cache_disabled_writes_through(lu: LogicalUnit, monkeypatch) -> None:
    page = bytearray(lu.modes.page(0x08, 0))
    page[2] = 0
    good(lu.execute(A, cdb("15 10 00 00 18 00"), bytes(4) + page))
    assert not lu.modes.wce
    flushes = []
    monkeypatch.setattr(lu.store, "flush", lambda off=0, n=0: flushes.append((off, n)))
    good(lu.execute(A, rw10(0x2A, 4, 1), b"x" * BS))
    assert flushes


# -------------------------------------------------------------------- VERIFY
def test_verify(lu: LogicalUnit) -> None:
    data = b"\x5a" * BS + b"\xa5" * BS
    good(lu.execute(A, rw10(0x2A, 100, 2), data))
    good(lu.execute(A, rw10(0x2F, 100, 2), b""))  # BYTCHK 0: medium only
    good(lu.execute(A, rw10(0x2F, 100, 2, flags=0x02), data))
    bad = bytearray(data)
    bad[BS + 7] ^= 1
    check(lu.execute(A, rw10(0x2F, 100, 2, flags=0x02), bytes(bad)), Sense.MISCOMPARE_DURING_VERIFY, BS + 7)
    good(lu.execute(A, rw10(0x2F, 100, 1, flags=0x06), b"\x5a" * BS))  # BYTCHK 11b
    check(lu.execute(A, rw10(0x2F, 100, 2, flags=0x06), b"\x5a" * BS), Sense.MISCOMPARE_DURING_VERIFY, BS)
    check(lu.execute(A, rw10(0x2F, 100, 2, flags=0x04), data), Sense.INVALID_FIELD_IN_CDB)  # 10b
    check(lu.execute(A, rw10(0x2F, 100, 2, flags=0x20), data), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, rw16(0x8F, BLOCKS - 1, 2), b""), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, rw10(0x2F, 100, 2, flags=0x02), b"\x5a" * BS), Sense.INVALID_FIELD_IN_CDB)
    good(lu.execute(A, struct.pack(">BBIIBB", 0xAF, 0, 100, 0, 0, 0), b""))


def test_write_and_verify(lu: LogicalUnit) -> None:
    good(lu.execute(A, rw10(0x2E, 7, 1, flags=0x02), b"w" * BS))
    good(lu.execute(A, rw16(0x8E, 8, 1), b"v" * BS))
    assert good(lu.execute(A, rw10(0x28, 7, 2), b"")) == b"w" * BS + b"v" * BS
    check(lu.execute(A, rw10(0x2E, 7, 1, flags=0x06), b"w" * BS), Sense.INVALID_FIELD_IN_CDB)


def test_orwrite(lu: LogicalUnit) -> None:
    good(lu.execute(A, rw10(0x2A, 3, 2), b"\x00" * BS + b"\x0f" * BS))
    good(lu.execute(A, rw16(0x8B, 3, 2), b"\xa5" * 2 * BS))
    assert good(lu.execute(A, rw10(0x28, 3, 2), b"")) == b"\xa5" * BS + b"\xaf" * BS
    good(lu.execute(A, rw16(0x8B, 3, 0), b""))
    check(lu.execute(A, rw16(0x8B, BLOCKS - 1, 2), b"\x01" * 2 * BS), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, rw16(0x8B, 3, 1, flags=0x20), b"\x01" * BS), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, rw16(0x8B, 3, 2), b"\x01" * BS), Sense.INVALID_FIELD_IN_CDB)


# --------------------------------------------------------- WRITE ATOMIC(16)
def wa16(lba: int, n: int, flags: int = 0, boundary: int = 0, group: int = 0) -> bytes:
    """SBC-4 5.48: LBA at 2, ATOMIC BOUNDARY at 10, TRANSFER LENGTH (2 bytes) at 12."""
    return struct.pack(">BBQHHBB", 0x9C, flags, lba, boundary, n, group, 0)


def sks(r: Result) -> bytes:
    """Fixed-format sense-key-specific bytes: C/D, BPV + bit, field pointer."""
    return r.sense[15:18]


def test_write_atomic16_roundtrip(lu: LogicalUnit) -> None:
    good(lu.execute(A, rw16(0x8A, 20, 4), b"o" * 4 * BS))
    data = bytes(range(256)) * 2 * 3
    good(lu.execute(A, wa16(21, 3, group=0x3F), data))
    assert good(lu.execute(A, rw16(0x88, 20, 4), b"")) == b"o" * BS + data
    # the READ fast path preads the same file: it sees the atomic write at once
    assert lu.read_fast(A, rw10(0x28, 21, 3)) == data
    assert lu.read_fast(A, rw16(0x88, 20, 1)) == b"o" * BS
    good(lu.execute(A, wa16(BLOCKS - 1, 1), b"e" * BS))  # the last block
    assert good(lu.execute(A, rw16(0x88, BLOCKS - 1, 1), b"")) == b"e" * BS
    good(lu.execute(A, wa16(30, 2), b"L" * 3 * BS))  # Data-Out longer than the CDB: its first blocks
    assert good(lu.execute(A, rw16(0x88, 30, 3), b"")) == b"L" * 2 * BS + bytes(BS)


def test_write_atomic16_is_one_pwrite(lu: LogicalUnit, monkeypatch) -> None:
    calls = []
    real = lu.store.write_atomic

    def spy(off, buf):
        calls.append((off, len(buf)))
        real(off, buf)

    monkeypatch.setattr(lu.store, "write_atomic", spy)
    monkeypatch.setattr(lu.store, "write", lambda *a: pytest.fail("WRITE ATOMIC used the looping write"))
    good(lu.execute(A, wa16(64, 16), b"z" * 16 * BS))
    assert calls == [(64 * BS, 16 * BS)]


def test_write_atomic16_zero_blocks_writes_nothing(lu: LogicalUnit, monkeypatch) -> None:
    """SBC-4 5.48: TRANSFER LENGTH 0 transfers and writes no blocks; not an error."""
    monkeypatch.setattr(lu.store, "write_atomic", lambda *a: pytest.fail("0 blocks written"))
    good(lu.execute(A, wa16(0, 0), b""))
    good(lu.execute(A, wa16(5, 0), b"ignored" * 100))
    good(lu.execute(A, wa16(BLOCKS, 0), b""))  # LBA + 0 does not pass the capacity
    check(lu.execute(A, wa16(BLOCKS + 1, 0), b""), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, wa16(2**63, 0), b""), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, wa16(2**64 - 1, 0), b""), Sense.LBA_OUT_OF_RANGE)


def test_write_atomic16_checks(lu: LogicalUnit) -> None:
    before = good(lu.execute(A, rw16(0x88, 0, 32), b""))
    blk = b"\xee" * BS
    for wrprotect in range(1, 8):  # no protection information: WRPROTECT must be 0
        r = lu.execute(A, wa16(0, 1, flags=wrprotect << 5), blk)
        check(r, Sense.INVALID_FIELD_IN_CDB)
        assert sks(r) == bytes((0xC8 | 7, 0, 1))
    check(lu.execute(A, wa16(BLOCKS - 1, 2), blk * 2), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, wa16(BLOCKS - 256, 512), blk * 512), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, wa16(2**63, 1), blk), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, wa16(2**64 - 1, 1), blk), Sense.LBA_OUT_OF_RANGE)
    r = lu.execute(A, wa16(0, 2), blk)  # Data-Out shorter than TRANSFER LENGTH
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert sks(r) == bytes((0xC0, 0, 12))
    # the atomic limits of the Block Limits page, shrunk to be reachable
    lu.limits = dataclasses.replace(lu.limits, max_atomic_transfer=16, max_atomic_with_boundary=8,
                                    max_atomic_boundary=4, atomic_alignment=4, atomic_granularity=2)
    r = lu.execute(A, wa16(0, 18), blk * 18)  # > MAXIMUM ATOMIC TRANSFER LENGTH
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert sks(r) == bytes((0xC0, 0, 12))
    r = lu.execute(A, wa16(0, 3), blk * 3)  # not a multiple of the granularity
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert sks(r) == bytes((0xC0, 0, 12))
    r = lu.execute(A, wa16(2, 2), blk * 2)  # LBA not a multiple of the alignment
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert sks(r) == bytes((0xC0, 0, 2))
    r = lu.execute(A, wa16(0, 2, boundary=6), blk * 2)  # > MAXIMUM ATOMIC BOUNDARY SIZE
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert sks(r) == bytes((0xC0, 0, 10))
    r = lu.execute(A, wa16(0, 10, boundary=4), blk * 10)  # > ... WITH ATOMIC BOUNDARY
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert sks(r) == bytes((0xC0, 0, 12))
    assert good(lu.execute(A, rw16(0x88, 0, 32), b"")) == before  # nothing was written
    good(lu.execute(A, wa16(4, 16), blk * 16))
    good(lu.execute(A, wa16(20, 8, boundary=4), blk * 8))
    assert good(lu.execute(A, rw16(0x88, 0, 32), b"")) == before[: 4 * BS] + blk * 24 + before[28 * BS:]


def test_write_atomic16_write_protected(lu: LogicalUnit, monkeypatch) -> None:
    good(_set_control(lu, A, swp=True))
    monkeypatch.setattr(lu.store, "write_atomic", lambda *a: pytest.fail("written while write-protected"))
    check(lu.execute(A, wa16(0, 1), b"x" * BS), Sense.WRITE_PROTECTED)
    check(lu.execute(A, wa16(0, 0), b""), Sense.WRITE_PROTECTED)
    check(lu.execute(A, wa16(0, 1, flags=0x20), b"x" * BS), Sense.INVALID_FIELD_IN_CDB)  # CDB first
    monkeypatch.undo()
    good(_set_control(lu, A))
    good(lu.execute(A, wa16(0, 1), b"x" * BS))


def test_write_atomic16_dpo_fua(lu: LogicalUnit, monkeypatch) -> None:
    flushes = []
    monkeypatch.setattr(lu.store, "flush", lambda off=0, n=0: flushes.append((off, n)))
    good(lu.execute(A, wa16(8, 2, flags=0x10), b"d" * 2 * BS))  # DPO: a hint
    assert flushes == []
    good(lu.execute(A, wa16(8, 2, flags=0x08), b"f" * 2 * BS))  # FUA: through to the medium
    good(lu.execute(A, wa16(8, 2, flags=0x18), b"g" * 2 * BS))
    assert flushes == [(8 * BS, 2 * BS)] * 2
    page = bytearray(lu.modes.page(0x08, 0))
    page[2] = 0  # WCE = 0: every write is written through
    good(lu.execute(A, cdb("15 10 00 00 18 00"), bytes(4) + page))
    good(lu.execute(A, wa16(8, 1), b"h" * BS))
    assert flushes[-1] == (8 * BS, BS)


def test_write_atomic16_short_pwrite_is_an_error(lu: LogicalUnit, monkeypatch) -> None:
    import prmigrate.lun.store as store_mod

    monkeypatch.setattr(store_mod.os, "pwrite", lambda fd, buf, off: len(buf) - 1)
    check(lu.execute(A, wa16(0, 2), b"s" * 2 * BS), Sense.INTERNAL_TARGET_FAILURE)


def test_write_atomic16_reservation_conflicts(tmp_path: Path) -> None:
    """0x9C is a write for SPC-5 PR (SBC-4 table 13) and SCSI-2 RESERVE."""
    pytest.importorskip("prmigrate.lun.pr")
    u = LogicalUnit(tmp_path / "img", 64 * BS, name="real-pr-atomic")
    blk = b"a" * BS
    reg = struct.pack(">QQ4xB3x", 0, 0xAB, 0)
    good(u.execute(A, cdb("5f 00 00 00 00 00 00 00 18 00"), reg))
    res = struct.pack(">QQ4xB3x", 0xAB, 0, 0)
    good(u.execute(A, cdb("5f 01 01 00 00 00 00 00 18 00"), res))  # WRITE EXCLUSIVE
    assert u.execute(B, wa16(0, 1), blk).status == Status.RESERVATION_CONFLICT
    assert u.execute(B, wa16(0, 0), b"").status == Status.RESERVATION_CONFLICT
    good(u.execute(B, rw10(0x28, 0, 1), b""))
    good(u.execute(A, wa16(0, 1), blk))
    good(u.execute(A, cdb("5f 02 01 00 00 00 00 00 18 00"), res))  # RELEASE
    good(u.execute(B, wa16(1, 1), blk))
    good(u.execute(A, cdb("5f 03 00 00 00 00 00 00 18 00"), res))  # CLEAR
    good(u.execute(A, cdb("16 00 00 00 00 00"), b""))  # SCSI-2 RESERVE(6)
    assert u.execute(B, wa16(2, 1), blk).status == Status.RESERVATION_CONFLICT
    good(u.execute(A, wa16(2, 1), blk))
    good(u.execute(A, cdb("17 00 00 00 00 00"), b""))
    good(u.execute(B, wa16(3, 1), blk))
    assert good(u.execute(B, rw10(0x28, 0, 4), b"")) == blk * 4
    u.close()


# ---------------------------------------------------------- PRE-FETCH / misc
def test_prefetch(lu: LogicalUnit) -> None:
    good(lu.execute(A, rw10(0x34, 0, 1, flags=0x02), b""))
    good(lu.execute(A, rw16(0x90, 0, 0), b""))
    check(lu.execute(A, rw10(0x34, BLOCKS, 1), b""), Sense.LBA_OUT_OF_RANGE)


def test_start_stop_prevent_defects(lu: LogicalUnit) -> None:
    good(lu.execute(A, cdb("1b 01 00 00 01 00"), b""))
    good(lu.execute(A, cdb("1b 00 00 00 00 00"), b""))
    check(lu.execute(A, cdb("1b 00 00 00 02 00"), b""), Sense.INVALID_FIELD_IN_CDB)  # LOEJ
    good(lu.execute(A, cdb("1e 00 00 00 01 00"), b""))
    assert good(lu.execute(A, cdb("37 00 0d 00 00 00 00 00 04 00"), b"")) == bytes.fromhex("000d0000")
    assert good(lu.execute(A, cdb("b7 0d 00 00 00 00 00 00 00 08 00 00"), b"")) == bytes.fromhex(
        "000d000000000000"
    )


# -------------------------------------------------------------- WRITE SAME
def test_write_same_writes(lu: LogicalUnit) -> None:
    blk = bytes(range(256)) * 2
    good(lu.execute(A, rw10(0x41, 20, 300), blk))
    assert good(lu.execute(A, rw10(0x28, 20, 300), b"")) == blk * 300
    good(lu.execute(A, rw16(0x93, BLOCKS - 3, 3), blk))
    assert good(lu.execute(A, rw16(0x88, BLOCKS - 3, 3), b"")) == blk * 3


def test_write_same_zero_blocks_runs_to_the_end(lu: LogicalUnit) -> None:
    blk = b"\x42" * BS
    good(lu.execute(A, rw16(0x93, BLOCKS - 5, 0), blk))
    assert good(lu.execute(A, rw16(0x88, BLOCKS - 6, 6), b"")) == bytes(BS) + blk * 5
    good(lu.execute(A, rw16(0x93, BLOCKS - 2, 0, flags=0x08), blk))  # UNMAP to the end
    assert good(lu.execute(A, rw16(0x88, BLOCKS - 3, 3), b"")) == blk + bytes(2 * BS)
    good(lu.execute(A, rw16(0x93, BLOCKS, 0), blk))  # nothing left to write
    lu.limits = dataclasses.replace(lu.limits, max_write_same=4)
    check(lu.execute(A, rw16(0x93, BLOCKS - 5, 0), blk), Sense.INVALID_FIELD_IN_CDB)  # > MAX WS LENGTH


def test_write_same_ndob_without_unmap_stays_mapped(lu: LogicalUnit) -> None:
    good(lu.execute(A, rw16(0x93, 0, 16, flags=0x01), b""))
    assert good(lu.execute(A, rw10(0x28, 0, 16), b"")) == bytes(16 * BS)
    assert lba_status(lu, 0)[0][2] == 0  # mapped


def test_write_same_unmap(lu: LogicalUnit) -> None:
    good(lu.execute(A, rw10(0x2A, 0, 64), b"\xff" * 64 * BS))
    good(lu.execute(A, rw10(0x41, 8, 16, flags=0x08), b"\xff" * BS))  # UNMAP: data ignored
    d = good(lu.execute(A, rw10(0x28, 0, 64), b""))
    assert d == b"\xff" * 8 * BS + bytes(16 * BS) + b"\xff" * 40 * BS
    good(lu.execute(A, rw16(0x93, 30, 2, flags=0x09), b""))  # UNMAP + NDOB, no data
    assert good(lu.execute(A, rw10(0x28, 30, 2), b"")) == bytes(2 * BS)
    good(lu.execute(A, rw16(0x93, 40, 1, flags=0x01), b""))  # NDOB: zeros
    assert good(lu.execute(A, rw10(0x28, 40, 1), b"")) == bytes(BS)


def test_write_same_bad(lu: LogicalUnit) -> None:
    blk = b"\x01" * BS
    check(lu.execute(A, rw10(0x41, 0, 1, flags=0x10), blk), Sense.INVALID_FIELD_IN_CDB)  # ANCHOR
    check(lu.execute(A, rw10(0x41, 0, 1, flags=0x18), blk), Sense.INVALID_FIELD_IN_CDB)  # no ANC_SUP
    check(lu.execute(A, rw10(0x41, BLOCKS + 1, 0), blk), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, rw10(0x41, 0, 1, flags=0x20), blk), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, rw10(0x41, 0, 1, flags=0x01), blk), Sense.INVALID_FIELD_IN_CDB)  # NDOB in (10)
    check(lu.execute(A, rw10(0x41, 0, 1), blk * 2), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, rw10(0x41, 0, 1), blk[:100]), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, rw16(0x93, BLOCKS, 1), blk), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, rw16(0x93, 2**63, 1), blk), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, rw16(0x93, 0, (64 << 20) // BS + 1), blk), Sense.LBA_OUT_OF_RANGE)


# ------------------------------------------------------ UNMAP / GET LBA STATUS
def unmap_list(*descs: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x42, 1 if anchor else 0, 0, 0, length, 0)


def lba_status(lu: LogicalUnit, lba: int, alloc: int = 24) -> list[tuple[int, int, int]]:
    d = good(lu.execute(A, struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0), b""))
    n = struct.unpack_from(">I", d)[0]
    assert n == len(d) - 4 or len(d) == alloc
    return [struct.unpack_from(">QIB", d, off) for off in range(8, len(d) - 15, 16)]


def test_unmap_and_get_lba_status(lu: LogicalUnit) -> None:
    good(lu.execute(A, rw10(0x2A, 0, 64), b"\xee" * 64 * BS))
    assert lba_status(lu, 0)[0] == (0, 64, 0) or lba_status(lu, 0)[0][2] == 0
    params = unmap_list((16, 16), (48, 8))
    good(lu.execute(A, unmap_cdb(len(params)), params))
    d = good(lu.execute(A, rw10(0x28, 0, 64), b""))
    assert d == b"\xee" * 16 * BS + bytes(16 * BS) + b"\xee" * 16 * BS + bytes(8 * BS) + b"\xee" * 8 * BS
    if lu.store.punch_supported:
        descs = lba_status(lu, 0, alloc=8 + 16 * 5)
        assert descs[:5] == [(0, 16, 0), (16, 16, 1), (32, 16, 0), (48, 8, 1), (56, 8, 0)]
        assert lba_status(lu, 20) == [(20, 12, 1)]
    check(lu.execute(A, struct.pack(">BBQIBB", 0x9E, 0x12, BLOCKS, 24, 0, 0), b""), Sense.LBA_OUT_OF_RANGE)


def test_unmap_bad_input(lu: LogicalUnit) -> None:
    good(lu.execute(A, unmap_cdb(0), b""))
    check(lu.execute(A, unmap_cdb(24, anchor=True), unmap_list((0, 1))), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, unmap_cdb(4), bytes(4)), Sense.PARAMETER_LIST_LENGTH_ERROR)
    check(lu.execute(A, unmap_cdb(24), bytes(10)), Sense.PARAMETER_LIST_LENGTH_ERROR)  # short Data-Out
    check(lu.execute(A, unmap_cdb(24), unmap_list((BLOCKS - 1, 2))), Sense.LBA_OUT_OF_RANGE)
    big = unmap_list(*[(i, 1) for i in range(MAX_UNMAP_DESCRIPTORS + 1)])
    check(lu.execute(A, unmap_cdb(len(big)), big), Sense.INVALID_FIELD_IN_PARAMETER_LIST)
    # nothing is unmapped when a later descriptor is bad
    good(lu.execute(A, rw10(0x2A, 0, 1), b"k" * BS))
    bad = unmap_list((0, 1), (BLOCKS, 1))
    check(lu.execute(A, unmap_cdb(len(bad)), bad), Sense.LBA_OUT_OF_RANGE)
    assert good(lu.execute(A, rw10(0x28, 0, 1), b"")) == b"k" * BS


# -------------------------------------------------------- COMPARE AND WRITE
def caw(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, n, 0, 0)


def test_compare_and_write(lu: LogicalUnit) -> None:
    good(lu.execute(A, rw10(0x2A, 9, 2), b"o" * 2 * BS))
    good(lu.execute(A, caw(9, 2), b"o" * 2 * BS + b"n" * 2 * BS))
    assert good(lu.execute(A, rw10(0x28, 9, 2), b"")) == b"n" * 2 * BS
    cmp = bytearray(b"n" * 2 * BS)
    cmp[BS + 3] = 0
    check(lu.execute(A, caw(9, 2), bytes(cmp) + b"z" * 2 * BS), Sense.MISCOMPARE_DURING_VERIFY, BS + 3)
    assert good(lu.execute(A, rw10(0x28, 9, 2), b"")) == b"n" * 2 * BS  # unchanged
    good(lu.execute(A, caw(9, 0), b""))
    # 256 blocks wrap the one-byte NUMBER OF LOGICAL BLOCKS to 0: the Data-Out
    # gives it away, and it is rejected rather than ignored
    check(lu.execute(A, caw(9, 0), b"n" * 512 * BS), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, caw(9, 1), b"n" * 4 * BS), Sense.INVALID_FIELD_IN_CDB)  # too much Data-Out
    check(lu.execute(A, caw(9, 3), b"n" * 4 * BS), Sense.INVALID_FIELD_IN_CDB)  # too little
    check(lu.execute(A, caw(BLOCKS - 1, 2), b"n" * 4 * BS), Sense.LBA_OUT_OF_RANGE)
    check(lu.execute(A, caw(0, 1, flags=0x20), b"n" * 2 * BS), Sense.INVALID_FIELD_IN_CDB)


# --------------------------------------------------------------- MODE pages
def test_mode_sense6_all_pages_golden(lu: LogicalUnit) -> None:
    d = good(lu.execute(A, cdb("1a 00 3f 00 ff 00"), b""))
    assert d[:4] == bytes((len(d) - 1, 0, 0x10, 8))
    assert d[4:12] == struct.pack(">IB", BLOCKS, 0) + BS.to_bytes(3, "big")
    assert d[12:32] == bytes.fromhex("0812 04") + bytes(17)  # caching, WCE
    assert d[32:44] == bytes.fromhex("0a0a 00 10 00 00 0000 ffff 0000")  # control
    assert d[44:56] == bytes.fromhex("1c0a 08") + bytes(9)  # IEC, DEXCPT
    assert len(d) == 56
    assert good(lu.execute(A, cdb("1a 00 3f ff ff 00"), b"")) == d  # all subpages
    assert good(lu.execute(A, cdb("1a 00 3f 00 04 00"), b"")) == d[:4]


def test_mode_sense_variants(lu: LogicalUnit) -> None:
    d = good(lu.execute(A, cdb("1a 08 0a 00 ff 00"), b""))  # DBD, control
    assert d == bytes((15, 0, 0x10, 0)) + lu.modes.page(0x0A, 0)
    ch = good(lu.execute(A, cdb("1a 08 4a 00 ff 00"), b""))  # changeable
    assert ch[4:] == bytes.fromhex("0a0a 04 00 08") + bytes(7)
    ch8 = good(lu.execute(A, cdb("1a 08 48 00 ff 00"), b""))
    assert ch8[6] == 0x04 and not any(ch8[7:])
    assert good(lu.execute(A, cdb("1a 08 8a 00 ff 00"), b"")) == d  # default
    check(lu.execute(A, cdb("1a 00 ca 00 ff 00"), b""), Sense.SAVING_PARAMETERS_NOT_SUPPORTED)
    check(lu.execute(A, cdb("1a 00 19 00 ff 00"), b""), Sense.INVALID_FIELD_IN_CDB)
    check(lu.execute(A, cdb("1a 00 0a 01 ff 00"), b""), Sense.INVALID_FIELD_IN_CDB)
    d10 = good(lu.execute(A, cdb("5a 10 08 00 00 00 00 01 00 00"), b""))  # LLBAA
    assert struct.unpack_from(">H", d10)[0] == len(d10) - 2
    assert d10[4] == 1 and struct.unpack_from(">H", d10, 6)[0] == 16
    assert struct.unpack_from(">Q4xI", d10, 8) == (BLOCKS, BS)
    assert d10[24] == 0x08


def _set_control(lu: LogicalUnit, nexus: Nexus, d_sense=False, swp=False) -> Result:
    page = bytearray(lu.modes.page(0x0A, 0))
    page[2] = (page[2] & ~0x04) | (0x04 if d_sense else 0)
    page[4] = (page[4] & ~0x08) | (0x08 if swp else 0)
    return lu.execute(nexus, cdb("15 10 00 00 10 00"), bytes(4) + page)


def test_mode_select_d_sense(lu: LogicalUnit) -> None:
    good(_set_control(lu, A, d_sense=True))
    r = lu.execute(A, rw16(0x88, 2**64 - 1, 1), b"")
    assert r.sense[0] == 0x72 and r.sense[1:4] == bytes((5, 0x21, 0))
    check(lu.execute(B, bytes(6), b""), Sense.MODE_PARAMETERS_CHANGED)  # others told
    good(lu.execute(A, bytes(6), b""))  # not the changer
    good(_set_control(lu, A))
    assert lu.execute(A, rw16(0x88, 2**64 - 1, 1), b"").sense[0] == 0x70


def test_mode_select_swp(lu: LogicalUnit) -> None:
    good(_set_control(lu, A, swp=True))
    assert good(lu.execute(A, cdb("1a 08 0a 00 ff 00"), b""))[2] & 0x80
    good(lu.execute(A, rw10(0x28, 0, 1), b""))
    check(lu.execute(A, rw10(0x2A, 0, 1), b"x" * BS), Sense.WRITE_PROTECTED)
    check(lu.execute(A, rw10(0x41, 0, 1), b"x" * BS), Sense.WRITE_PROTECTED)
    good(_set_control(lu, A))
    good(lu.execute(A, rw10(0x2A, 0, 1), b"x" * BS))


def test_mode_select_bad(lu: LogicalUnit) -> None:
    page = bytearray(lu.modes.page(0x0A, 0))
    page[3] = 0x00  # QUEUE ALGORITHM MODIFIER is not changeable
    check(lu.execute(A, cdb("15 10 00 00 10 00"), bytes(4) + page), Sense.INVALID_FIELD_IN_PARAMETER_LIST)
    check(lu.execute(A, cdb("15 10 00 00 10 00"), bytes(8)), Sense.PARAMETER_LIST_LENGTH_ERROR)
    check(lu.execute(A, cdb("15 11 00 00 10 00"), bytes(16)), Sense.INVALID_FIELD_IN_CDB)  # SP
    check(lu.execute(A, cdb("15 10 00 00 06 00"), bytes(4) + bytes((0x19, 0))), Sense.INVALID_FIELD_IN_PARAMETER_LIST)
    good(lu.execute(A, cdb("15 10 00 00 00 00"), b""))
    # MODE SELECT(10) with a block descriptor of our block size
    ok = bytes(6) + struct.pack(">H", 8) + struct.pack(">IB", 0, 0) + BS.to_bytes(3, "big") + lu.modes.page(8, 0)
    good(lu.execute(A, struct.pack(">BBxxxxxHB", 0x55, 0x10, len(ok), 0), ok))
    wrong = ok[:13] + (4096).to_bytes(3, "big") + ok[16:]
    check(lu.execute(A, struct.pack(">BBxxxxxHB", 0x55, 0x10, len(wrong), 0), wrong),
          Sense.INVALID_FIELD_IN_PARAMETER_LIST)


# ------------------------------------------ REPORT SUPPORTED OPERATION CODES
def rsoc(options: int, opcode: int = 0, sa: int = 0, rctd: bool = False, alloc: int = 65535) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, opcode, sa, alloc, 0, 0)


def test_rsoc_all(lu: LogicalUnit) -> None:
    d = good(lu.execute(A, rsoc(0), b""))
    n = struct.unpack_from(">I", d)[0]
    assert n == len(d) - 4 and n % 8 == 0
    descs = [struct.unpack_from(">BxHxBH", d, off) for off in range(4, len(d), 8)]
    ops = {(op, sa if flags & 1 else None) for op, sa, flags, _ in descs}
    assert (0x28, None) in ops and (0x9E, 0x10) in ops and (0x5F, 0x07) in ops and (0xA3, 0x0C) in ops
    # every opcode the LU dispatches is reported
    assert {op for op, _ in ops} == set(lu._dispatch)
    dr = good(lu.execute(A, rsoc(0, rctd=True), b""))
    assert struct.unpack_from(">I", dr)[0] == len(descs) * 20
    assert dr[4 + 5] & 0x02 and struct.unpack_from(">H", dr, 12)[0] == 0x0A


def test_rsoc_one_command(lu: LogicalUnit) -> None:
    d = good(lu.execute(A, rsoc(1, 0x28), b""))
    assert d == bytes.fromhex("0003000a 28 18 ffffffff 3f ffff 00")
    d = good(lu.execute(A, rsoc(1, 0x28, rctd=True), b""))
    assert d[1] == 0x83 and len(d) == 4 + 10 + 12 and d[14:16] == b"\x00\x0a"
    check(lu.execute(A, rsoc(1, 0x9E), b""), Sense.INVALID_FIELD_IN_CDB)  # has service actions
    d = good(lu.execute(A, rsoc(2, 0x9E, 0x10), b""))
    assert d[1] == 0x03 and d[4:6] == b"\x9e\x10" and struct.unpack_from(">H", d, 2)[0] == 16
    check(lu.execute(A, rsoc(2, 0x28), b""), Sense.INVALID_FIELD_IN_CDB)  # no service actions
    assert good(lu.execute(A, rsoc(1, 0xEE), b""))[1] & 0x07 == 0x01  # not supported
    assert good(lu.execute(A, rsoc(2, 0x9E, 0x1F), b""))[1] & 0x07 == 0x01
    assert good(lu.execute(A, rsoc(3, 0x28, 0x55), b""))[4] == 0x28
    check(lu.execute(A, rsoc(5), b""), Sense.INVALID_FIELD_IN_CDB)
    # WRITE ATOMIC(16): DPO|FUA, LBA, ATOMIC BOUNDARY, TRANSFER LENGTH, group
    d = good(lu.execute(A, rsoc(1, 0x9C), b""))
    assert d == bytes.fromhex("00030010 9c 18 ffffffffffffffff ffff ffff 3f 00")
    assert good(lu.execute(A, rsoc(0, alloc=4), b""))[:4] == good(lu.execute(A, rsoc(0), b""))[:4]
    # an unsupported MAINTENANCE IN service action (REPORT TIMESTAMP); A3h/0Ah
    # (REPORT TARGET PORT GROUPS) is answered now: tests/lun/test_target_ports.py
    check(lu.execute(A, cdb("a3 0f 00 00 00 00 00 00 10 00 00 00"), b""), Sense.INVALID_FIELD_IN_CDB)


# ------------------------------------------------------------ reservations
def test_reservation_commands_delegate(lu: LogicalUnit) -> None:
    good(lu.execute(A, cdb("16 00 00 00 00 00"), b""))
    good(lu.execute(A, cdb("57 00 00 00 00 00 00 00 00 00"), b""))
    assert good(lu.execute(A, cdb("5e 00 00 00 00 00 00 00 08 00"), b"")) == bytes(8)
    params = bytes(24)
    good(lu.execute(B, cdb("5f 00 00 00 00 00 00 00 18 00"), params + b"extra"))
    assert lu.pr.calls[:4] == [
        ("reserve", A),
        ("release", A),
        ("in", A, cdb("5e 00 00 00 00 00 00 00 08 00")),
        ("out", B, cdb("5f 00 00 00 00 00 00 00 18 00"), params),
    ]


def test_pr_out_errors_become_results(lu: LogicalUnit) -> None:
    check(lu.execute(A, cdb("5f 00 00 00 00 00 00 00 18 00"), bytes(10)), Sense.PARAMETER_LIST_LENGTH_ERROR)
    lu.pr.raise_out = ReservationConflict()
    assert lu.execute(A, cdb("5f 00 00 00 00 00 00 00 18 00"), bytes(24)).status == Status.RESERVATION_CONFLICT
    lu.pr.raise_out = CheckCondition(Sense.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    check(lu.execute(A, cdb("5f 02 00 00 00 00 00 00 18 00"), bytes(24)),
          Sense.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)


def test_real_reservation_table_if_present(tmp_path: Path) -> None:
    """With the real PR engine: REGISTER + RESERVE WE from A, B's write conflicts."""
    pytest.importorskip("prmigrate.lun.pr")
    u = LogicalUnit(tmp_path / "img", 64 * BS, name="real-pr")
    reg = struct.pack(">QQ4xB3x", 0, 0xAB, 0)
    good(u.execute(A, cdb("5f 00 00 00 00 00 00 00 18 00"), reg))
    res = struct.pack(">QQ4xB3x", 0xAB, 0, 0)
    good(u.execute(A, cdb("5f 01 01 00 00 00 00 00 18 00"), res))
    assert u.execute(B, rw10(0x2A, 0, 1), b"x" * BS).status == Status.RESERVATION_CONFLICT
    good(u.execute(B, rw10(0x28, 0, 1), b""))
    good(u.execute(A, rw10(0x2A, 0, 1), b"x" * BS))
    u.close()


# ------------------------------------------------------------------- fuzzing
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ_OPS = sorted(
    {0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x37,
     0x41, 0x42, 0x55, 0x5A, 0x83, 0x84, 0x88, 0x89, 0x8A, 0x8B, 0x8E, 0x8F, 0x90, 0x91, 0x93, 0x9C, 0x9E, 0xA0, 0xA3,
     0xA8, 0xAA, 0xAE, 0xAF, 0xB7, 0x5E, 0x5F, 0x16, 0x17, 0x56, 0x57, 0xFF}
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(_FUZZ_OPS),
    rest=st.binary(max_size=17),
    data=st.binary(max_size=2048),
    small_lba=st.booleans(),
)
def test_fuzz_never_internal_error(lu: LogicalUnit, op: int, rest: bytes, data: bytes, small_lba: bool) -> None:
    """Arbitrary CDB bytes and Data-Out never raise, and never end in an
    internal target failure: every bad input has a proper sense."""
    body = bytearray(rest)
    if small_lba and len(body) >= 9:
        body[1:5] = bytes(4)  # keep LBAs small so the command gets past range checks
        body[1:9] = bytes(8) if op >= 0x80 else body[1:9]
    r = lu.execute(A, bytes((op,)) + bytes(body), data)
    assert r.status in (Status.GOOD, Status.CHECK_CONDITION, Status.RESERVATION_CONFLICT)
    if r.status == Status.CHECK_CONDITION:
        d = decode_sense(r.sense)
        assert (d.key, d.asc, d.ascq) != Sense.INTERNAL_TARGET_FAILURE.value
    lu.ua.clear(A)


def test_cdbs_padded_to_16_bytes(lu: LogicalUnit) -> None:
    """iSCSI carries every CDB in a 16-byte field: trailing zeros change nothing."""
    pad = bytes(6)
    good(lu.execute(A, rw10(0x2A, 2, 1) + pad, b"p" * BS))
    assert good(lu.execute(A, rw10(0x28, 2, 1) + pad, b"")) == b"p" * BS
    assert good(lu.execute(A, cdb("08 00 00 02 01 00") + bytes(10), b"")) == b"p" * BS
    assert len(good(lu.execute(A, cdb("12 00 00 00 24 00") + bytes(10), b""))) == 36
    r = lu.execute(A, rw10(0x2A, 2, 2) + pad, b"p" * BS)  # short Data-Out
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert r.sense[15:18] == bytes((0xC0, 0, 7))  # points at TRANSFER LENGTH of the 10-byte CDB
    r = lu.execute(A, rw16(0x8A, 2, 2), b"p" * BS)
    assert r.sense[15:18] == bytes((0xC0, 0, 10))


# ------------------------------------- REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
def test_report_supported_tmfs(lu: LogicalUnit) -> None:
    """SPC-5: ATS ATSS CTSS LURS TRS (what the iSCSI target does), the
    extended form with REPD (additional length 0Ch, no timeouts), cut to
    the allocation length; an allocation length under 4 is refused."""
    assert good(lu.execute(A, cdb("a30d00000000 00000004 0000"), b"")) == bytes((0xDA, 0, 0, 0))
    ext = good(lu.execute(A, cdb("a30d80000000 00000100 0000"), b""))
    assert ext == bytes((0xDA, 0, 0, 0x0C)) + bytes(12)
    assert good(lu.execute(A, cdb("a30d80000000 00000006 0000"), b"")) == ext[:6]
    r = lu.execute(A, cdb("a30d00000000 00000003 0000"), b"")
    check(r, Sense.INVALID_FIELD_IN_CDB)
    assert r.sense[15] & 0xC0 == 0xC0 and r.sense[16:18] == b"\x00\x06"  # SKSV, C/D: CDB byte 6
    check(lu.execute(A, cdb("a30d0000"), b""), Sense.INVALID_FIELD_IN_CDB)  # short CDB
    check(lu.execute(A, cdb("a30e00000000 00000004 0000"), b""), Sense.INVALID_FIELD_IN_CDB)
