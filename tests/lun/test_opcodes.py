"""REPORT SUPPORTED OPERATION CODES (lun/opcodes.py, SPC-5 6.35): the table's
invariants, golden one-command descriptors, the all-commands list parsed back."""

from __future__ import annotations

import struct

import pytest

from prmigrate.lun.opcodes import TABLE, has_service_actions, report_supported_opcodes
from prmigrate.scsi.cdb import ReportOpcodesCdb
from prmigrate.scsi.constants import Opcode, PrInAction, PrOutAction
from prmigrate.scsi.sense import CheckCondition, Sense


def cdb(options: int, opcode: int = 0, action: int = 0, rctd: bool = False) -> ReportOpcodesCdb:
    raw = struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, opcode, action, 4096, 0, 0)
    return ReportOpcodesCdb.decode(raw)


def test_table_invariants() -> None:
    keys = [(i.opcode, i.action) for i in TABLE]
    assert len(keys) == len(set(keys))  # each command once
    for i in TABLE:
        assert i.usage[0] == i.opcode  # CDB USAGE DATA byte 0 is the opcode
        assert i.usage[-1] == 0  # CONTROL byte: no vendor bits
        assert len(i.usage) in (6, 10, 12, 16)
        if i.action is not None:
            assert has_service_actions(i.opcode)
            if i.opcode in (Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT):
                assert i.usage[1] == i.action  # SA field holds the action (SPC-5 6.35.3)
    assert not has_service_actions(Opcode.READ_16)
    # REPLACE LOST RESERVATION is not offered
    assert (Opcode.PERSISTENT_RESERVE_OUT, PrOutAction.REPLACE_LOST_RESERVATION) not in keys
    assert all((Opcode.PERSISTENT_RESERVE_IN, a) in keys for a in PrInAction)


def test_one_command_golden() -> None:
    # options 1: READ(16) has no service actions: SUPPORT 011b, CDB size 16, usage data
    out = report_supported_opcodes(cdb(1, Opcode.READ_16))
    assert out == bytes([0, 0x03, 0, 16, 0x88, 0x18]) + b"\xff" * 12 + bytes([0x3F, 0])
    # with RCTD: CTDP set, then the timeouts descriptor (length 0Ah, nominal, recommended)
    out = report_supported_opcodes(cdb(1, Opcode.TEST_UNIT_READY, rctd=True))
    assert out == bytes([0, 0x83, 0, 6]) + bytes(6) + struct.pack(">HxBII", 0x0A, 0, 1, 30)


def test_one_service_action_golden() -> None:
    out = report_supported_opcodes(cdb(2, Opcode.PERSISTENT_RESERVE_OUT, PrOutAction.PREEMPT))
    assert out == bytes([0, 0x03, 0, 10, 0x5F, 0x04, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0])
    # options 3: the service action counts only for an opcode that has them
    assert report_supported_opcodes(cdb(3, Opcode.READ_16, 0x1234)) == report_supported_opcodes(
        cdb(1, Opcode.READ_16)
    )
    assert report_supported_opcodes(cdb(3, Opcode.PERSISTENT_RESERVE_OUT, PrOutAction.PREEMPT)) == out


def test_not_supported() -> None:
    assert report_supported_opcodes(cdb(1, 0xC0)) == bytes([0, 0x01, 0, 0])
    assert report_supported_opcodes(cdb(2, Opcode.PERSISTENT_RESERVE_OUT, 0x1F)) == bytes([0, 0x01, 0, 0])


@pytest.mark.parametrize(
    ("c", "byte", "bit"),
    [
        (cdb(1, Opcode.PERSISTENT_RESERVE_IN), 3, None),  # opcode alone, but it has service actions
        (cdb(2, Opcode.READ_16, 1), 4, None),  # a service action for an opcode without them
        (cdb(4), 2, 0),  # reserved reporting option
    ],
)
def test_invalid_requests_point_at_the_cdb_field(c: ReportOpcodesCdb, byte: int, bit: int | None) -> None:
    with pytest.raises(CheckCondition) as e:
        report_supported_opcodes(c)
    assert e.value.sense is Sense.INVALID_FIELD_IN_CDB
    assert e.value.field is not None
    assert (e.value.field.cdb, e.value.field.field, e.value.field.bit) == (True, byte, bit)


@pytest.mark.parametrize("rctd", [False, True])
def test_all_commands_parse_back_to_the_table(rctd: bool) -> None:
    out = report_supported_opcodes(cdb(0, rctd=rctd))
    (length,) = struct.unpack(">I", out[:4])
    assert length == len(out) - 4
    seen, off = [], 4
    step = 8 + (12 if rctd else 0)
    for info in TABLE:
        op, sa, flags, usage_len = struct.unpack(">BxHxBH", out[off : off + 8])
        seen.append((op, sa if flags & 0x01 else None, usage_len))
        assert bool(flags & 0x02) == rctd  # CTDP
        if rctd:
            assert out[off + 8 : off + 20] == struct.pack(">HxBII", 0x0A, 0, info.nominal, info.recommended)
        off += step
    assert off == len(out)
    assert seen == [(i.opcode, i.action, len(i.usage)) for i in TABLE]
