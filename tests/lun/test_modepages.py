"""Mode pages (lun/modepages.py): golden page bytes, the changeable masks,
MODE SELECT that validates everything before it changes anything."""

from __future__ import annotations

import pytest

from prmigrate.lun.modepages import PAGE_ORDER, ModePage, ModePages, PageControl
from prmigrate.scsi.sense import CheckCondition, Sense

# SBC-4 6.5.5 Caching: 20 bytes, WCE (byte 2 bit 2) set.
CACHING = bytes([0x08, 18, 0x04]) + bytes(17)
# SPC-5 7.5.10 Control: 12 bytes, QUEUE ALGORITHM MODIFIER 1, BUSY TIMEOUT FFFFh.
CONTROL = bytes([0x0A, 10, 0x00, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])
# SPC-5 7.5.14 Informational Exceptions Control: 12 bytes, DEXCPT set.
IEC = bytes([0x1C, 10, 0x08]) + bytes(9)


def test_current_pages_are_the_golden_defaults() -> None:
    mp = ModePages()
    assert mp.page(ModePage.CACHING, PageControl.CURRENT) == CACHING
    assert mp.page(ModePage.CONTROL, PageControl.CURRENT) == CONTROL
    assert mp.page(ModePage.INFORMATIONAL_EXCEPTIONS, PageControl.CURRENT) == IEC
    assert mp.page(ModePage.CONTROL, PageControl.DEFAULT) == CONTROL
    assert (mp.wce, mp.d_sense, mp.swp) == (True, False, False)


def test_changeable_masks_name_only_the_changeable_bits() -> None:
    mp = ModePages()
    assert mp.page(ModePage.CACHING, PageControl.CHANGEABLE) == bytes([0x08, 18, 0x04]) + bytes(17)
    assert mp.page(ModePage.CONTROL, PageControl.CHANGEABLE) == bytes([0x0A, 10, 0x04, 0, 0x08]) + bytes(7)
    assert mp.page(ModePage.INFORMATIONAL_EXCEPTIONS, PageControl.CHANGEABLE) == bytes([0x1C, 10]) + bytes(10)


def test_all_pages_in_ascending_order_and_unknown_page() -> None:
    mp = ModePages()
    assert [int(p) for p in PAGE_ORDER] == sorted(int(p) for p in PAGE_ORDER)
    assert mp.pages(ModePage.ALL, PageControl.CURRENT) == CACHING + CONTROL + IEC
    assert mp.pages(0x19, PageControl.CURRENT) is None


def _control(byte2: int = 0, byte4: int = 0) -> bytes:
    b = bytearray(CONTROL)
    b[2], b[4] = byte2, byte4
    return bytes(b)


def test_select_changes_changeable_bits_and_round_trips() -> None:
    mp = ModePages()
    header = bytes(4)  # mode parameter header (6): the pages start at 4
    cache_off = bytearray(CACHING)
    cache_off[2] = 0
    assert mp.select(header + bytes(cache_off) + _control(0x04, 0x08), 4) is True
    assert (mp.wce, mp.d_sense, mp.swp) == (False, True, True)
    assert mp.page(ModePage.CONTROL, PageControl.CURRENT) == _control(0x04, 0x08)
    assert mp.page(ModePage.CONTROL, PageControl.DEFAULT) == CONTROL  # defaults stay
    # the same pages again change nothing
    assert mp.select(header + bytes(cache_off) + _control(0x04, 0x08), 4) is False
    # PS (byte 0 bit 7) is reserved in MODE SELECT and ignored
    assert mp.select(bytes([0x80 | 0x08]) + CACHING[1:], 0) is True
    assert mp.wce is True


def _refused(mp: ModePages, data: bytes) -> CheckCondition:
    before = {p: mp.page(p, PageControl.CURRENT) for p in PAGE_ORDER}
    with pytest.raises(CheckCondition) as e:
        mp.select(data, 0)
    assert {p: mp.page(p, PageControl.CURRENT) for p in PAGE_ORDER} == before
    return e.value


@pytest.mark.parametrize(
    ("data", "sense", "byte", "bit"),
    [
        (bytes(_control(0x04))[:1], Sense.PARAMETER_LIST_LENGTH_ERROR, None, None),  # no page length
        (_control(0x04)[:8], Sense.PARAMETER_LIST_LENGTH_ERROR, None, None),  # page cut short
        (bytes([0x40 | 0x0A]) + CONTROL[1:], Sense.INVALID_FIELD_IN_PARAMETER_LIST, 0, 6),  # SPF
        (bytes([0x19, 6]) + bytes(6), Sense.INVALID_FIELD_IN_PARAMETER_LIST, 0, None),  # unknown page
        (bytes([0x0A, 11]) + CONTROL[2:] + b"\0", Sense.INVALID_FIELD_IN_PARAMETER_LIST, 1, None),  # length
        (_control(0x04 | 0x01), Sense.INVALID_FIELD_IN_PARAMETER_LIST, 2, None),  # a bit not changeable
    ],
)
def test_select_refusals_point_at_the_byte_and_change_nothing(
    data: bytes, sense: Sense, byte: int | None, bit: int | None
) -> None:
    err = _refused(ModePages(), data)
    assert err.sense is sense
    if byte is None:
        assert err.field is None
    else:
        assert err.field is not None and (err.field.cdb, err.field.field, err.field.bit) == (False, byte, bit)


def test_a_bad_second_page_leaves_the_good_first_page_unapplied() -> None:
    """SPC-5 6.12: a MODE SELECT that fails changes no parameter."""
    mp = ModePages()
    cache_off = bytearray(CACHING)
    cache_off[2] = 0
    err = _refused(mp, bytes(cache_off) + _control(0x01))
    assert err.field is not None and err.field.field == len(CACHING) + 2
    assert mp.wce is True
