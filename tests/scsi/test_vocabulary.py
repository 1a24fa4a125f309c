"""scsi/vocabulary.py: every accepted spelling of a reservation type, one printed form."""

from __future__ import annotations

import pytest

from prmigrate.scsi.constants import PrType
from prmigrate.scsi.vocabulary import PrTypeError, format_key, parse_pr_type, words

SPELLINGS = {
    PrType.WRITE_EXCLUSIVE: ["1", "0x1", "WE", "we", "WRITE_EXCLUSIVE", "Write Exclusive"],
    PrType.EXCLUSIVE_ACCESS: ["3", "EA", "exclusive access"],
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: [
        "5", "WE_RO", "we-ro", "WRITE_EXCLUSIVE_REGISTRANTS_ONLY",
        "Write Exclusive, registrants only", "WRITE EXCLUSIVE - REGISTRANTS ONLY"],
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: ["6", "EA_RO", "ea-ro"],
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: ["7", "WE_AR", "Write Exclusive, all registrants"],
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: ["8", "ea_ar", "EXCLUSIVE_ACCESS_ALL_REGISTRANTS"],
}


@pytest.mark.parametrize("rtype,text", [(t, s) for t, ss in SPELLINGS.items() for s in ss])
def test_every_spelling(rtype: PrType, text: str) -> None:
    assert parse_pr_type(text) is rtype


def test_one_printed_form_is_sg_persists() -> None:
    assert [words(t) for t in SPELLINGS] == [
        "Write Exclusive", "Exclusive Access", "Write Exclusive, registrants only",
        "Exclusive Access, registrants only", "Write Exclusive, all registrants",
        "Exclusive Access, all registrants"]
    assert words(2) == "obsolete [2]" and words(0xB) == "obsolete [0xb]" and words(None) == "-"
    assert words("WRITE_EXCLUSIVE") == "Write Exclusive"  # the control API's enum names


@pytest.mark.parametrize("bad", ["", "0", "2", "16", "we_xx", "write"])
def test_refused(bad: str) -> None:
    with pytest.raises(PrTypeError, match="not a reservation type"):
        parse_pr_type(bad)


def test_obsolete_numbers_only_when_asked() -> None:
    assert parse_pr_type("2", allow_obsolete=True) == 2
    assert parse_pr_type("15", allow_obsolete=True) == 15
    with pytest.raises(PrTypeError):
        parse_pr_type("16", allow_obsolete=True)


def test_keys_print_one_way() -> None:
    assert format_key(0xABC) == "0xabc"
    assert format_key("0x0000000000000abc") == "0xabc"
    assert format_key(0) == "0x0"
    assert format_key((1 << 64) - 1) == "0xffffffffffffffff"
