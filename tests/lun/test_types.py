"""lun/types.py: the contract's Result and its one unit attention test."""

from __future__ import annotations

from prmigrate.lun.types import GOOD, Result, unit_attention
from prmigrate.scsi.constants import Status
from prmigrate.scsi.sense import Sense, encode_sense

RESET_UA = encode_sense(Sense.BUS_DEVICE_RESET)


def test_unit_attention_of_a_result() -> None:
    assert unit_attention(Result(Status.CHECK_CONDITION, b"", RESET_UA)) == (0x29, 0x03)
    assert unit_attention(Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.INVALID_OPCODE))) is None
    assert unit_attention(Result(Status.CHECK_CONDITION, b"", b"\x70")) is None
    assert unit_attention(Result(Status.GOOD, b"", RESET_UA)) is None  # sense only counts with CHECK CONDITION
    assert unit_attention(GOOD) is None
