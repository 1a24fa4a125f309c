"""CRC32C header and data digests (RFC 7143 12.1, 11.1).

The digest is the CRC32C (Castagnoli) of the covered bytes, sent as a 32-bit
value in little-endian byte order: the digest of 32 zero bytes, 0x8A9136AA,
travels as ``aa 36 91 8a``. Header digests cover the BHS and AHS; data
digests cover the data segment including its padding.
"""

from __future__ import annotations

import struct

import google_crc32c

DIGEST_LEN = 4
_LE32 = struct.Struct("<I")

_value = google_crc32c.value
_extend = google_crc32c.extend


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data``; pass the previous value in ``crc`` to continue."""
    if type(data) is not bytes:
        data = bytes(data)
    if crc:
        return _extend(crc, data)
    return _value(data)


def digest_bytes(*parts: bytes | bytearray | memoryview) -> bytes:
    """The 4 wire bytes of the CRC32C over the concatenation of ``parts``."""
    crc = 0
    for p in parts:
        if len(p):
            if type(p) is not bytes:
                p = bytes(p)  # google_crc32c wants a read-only buffer
            crc = _extend(crc, p) if crc else _value(p)
    return _LE32.pack(crc)


def wire_value(digest: bytes | bytearray | memoryview) -> int:
    """Decode the 4 wire bytes of a digest to its CRC32C value."""
    return _LE32.unpack_from(digest)[0]
