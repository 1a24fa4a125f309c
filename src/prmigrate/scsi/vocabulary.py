"""One vocabulary for reservation types and keys, in every command and output.

Input: a reservation type may be given as sg_persist takes it (its number,
``--prout-type=5``), as its mnemonic (``WE_RO``, also ``we-ro``), as the
enum name (``WRITE_EXCLUSIVE_REGISTRANTS_ONLY``) or in words (``Write
Exclusive, registrants only``, ``write exclusive - registrants only``); case,
``-``/``_``/spaces and commas do not matter.

Output: one form for people, sg_persist's words (``words``), and one for
keys, sg_persist's ``0x`` and lower-case hex without leading zeros
(``format_key``). Machine-readable outputs carry the number.
"""

from __future__ import annotations

import re

from .constants import PrType

# sg_persist's words for the type codes (SPC-5 6.16.3.4, table 175); the
# codes SPC no longer defines are "obsolete [N]".
_WORDS = {
    PrType.WRITE_EXCLUSIVE: "Write Exclusive",
    PrType.EXCLUSIVE_ACCESS: "Exclusive Access",
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: "Write Exclusive, registrants only",
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: "Exclusive Access, registrants only",
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: "Write Exclusive, all registrants",
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: "Exclusive Access, all registrants",
}
TYPE_CHOICES = "1, 3, 5, 6, 7, 8 or WE, EA, WE_RO, EA_RO, WE_AR, EA_AR"


def words(t: PrType | int | str | None) -> str:
    """sg_persist's words for a type code (``None``: no reservation)."""
    if t is None:
        return "-"
    if isinstance(t, str):
        t = parse_pr_type(t)
    if t in PrType._value2member_map_ and PrType(t) in _WORDS:
        return _WORDS[PrType(t)]
    n = int(t)
    return f"obsolete [{n}]" if n < 10 else f"obsolete [0x{n:x}]"


def format_key(key: int | str) -> str:
    """A reservation key as sg_persist prints it: ``0x123abc``."""
    if isinstance(key, str):
        key = int(key, 16)
    return f"0x{key:x}"


def _norm(text: str) -> str:
    return re.sub(r"[\s,_-]+", " ", text.strip().lower()).strip()


_BY_NAME: dict[str, PrType] = {}
for _t in PrType:
    if _t is PrType.NONE:
        continue
    for _alias in (_t.short, _t.name, _WORDS[_t], _WORDS[_t].replace(",", " -")):
        _BY_NAME[_norm(_alias)] = _t


class PrTypeError(ValueError):
    """Text that names no reservation type."""


def parse_pr_type(text: str, *, allow_obsolete: bool = False) -> PrType | int:
    """A reservation type from any of the accepted spellings. A number 0-15
    that SPC does not define is returned as an int only with
    ``allow_obsolete`` (sg_persist sends such numbers as given)."""
    t = _norm(text)
    if t in _BY_NAME:
        return _BY_NAME[t]
    try:
        n = int(t, 0)
    except ValueError:
        n = -1
    if n in PrType._value2member_map_ and n != PrType.NONE:
        return PrType(n)
    if allow_obsolete and 0 <= n <= 15:
        return n
    raise PrTypeError(f"not a reservation type: {text!r} (use {TYPE_CHOICES})")
