"""Argument types shared by the subcommands.

Each is an argparse ``type=`` callable that raises ``ArgumentTypeError``
with a sentence saying what was expected, so that a bad value reads
``argument --size: not a size: '12Q' (a number with K, M, G or T)`` rather
than naming a Python function. Nothing here imports more than ``re``.
"""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """A byte count: a number with an optional K, M, G or T (binary)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    digits = t[: len(t) - len(unit)]
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (a positive number with K, M, G or T, e.g. 256M)")
    return int(digits) * _UNITS[unit]


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6; an empty HOST is 127.0.0.1)."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"not an address: {text!r} (HOST:PORT with PORT 0-65535, e.g. 127.0.0.1:3260)")
    return host.strip("[]") or "127.0.0.1", int(port)


def port_address(text: str) -> str:
    """``HOST:PORT`` checked and kept as text (for options passed on as given)."""
    listen_address(text)
    return text.strip()


# RFC 7143 4.2.7.2 (iSCSI name formats): "iqn." date "." reversed domain name
# [":" anything]; "eui." 16 hex digits (EUI-64); "naa." 16 or 32 hex digits.
# RFC 7143 4.2.7.1: at most 223 bytes; after stringprep (RFC 3722) only
# lower-case ASCII letters, digits, '-', '.' and ':' remain (names compare
# case-insensitively, so upper case is accepted as typed).
_IQN = re.compile(r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?"
                  r"(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[a-z0-9.:-]*)?")
_EUI = re.compile(r"eui\.[0-9a-f]{16}")
_NAA = re.compile(r"naa\.([0-9a-f]{16}|[0-9a-f]{32})")
MAX_NAME = 223


def iscsi_name(text: str) -> str:
    """An iSCSI name in one of RFC 7143's three forms."""
    name = text.strip()
    low = name.lower()
    if len(name.encode()) <= MAX_NAME and any(
            p.fullmatch(low) for p in (_IQN, _EUI, _NAA)):
        return name
    raise argparse.ArgumentTypeError(
        f"not an iSCSI name: {text!r} (RFC 7143 4.2.7.2: iqn.YYYY-MM.reversed.domain[:id], "
        "eui. and 16 hex digits, or naa. and 16 or 32 hex digits; at most 223 bytes)")


def seconds(text: str) -> float:
    """A positive duration in seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (seconds, more than 0)")
    return value


def count(text: str) -> int:
    """A whole number of at least 0."""
    t = text.strip()
    if not t.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(t)
