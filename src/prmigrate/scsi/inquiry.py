"""Standard INQUIRY data and VPD pages (SPC-5 6.6, 7.7; SBC-4 6.6).

Pure encoders: the logical unit passes its identity and limits in, gets the
full (untruncated) page back and truncates it to the allocation length.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

from .constants import DeviceType, ProtocolId


class VpdPage(IntEnum):
    SUPPORTED = 0x00
    UNIT_SERIAL = 0x80
    DEVICE_ID = 0x83
    THIRD_PARTY_COPY = 0x8F
    BLOCK_LIMITS = 0xB0
    BLOCK_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2


SUPPORTED_VPD = tuple(VpdPage)


class VersionDescriptor(IntEnum):
    """SPC-5 table 7.7.x version descriptor values."""

    SAM_5 = 0x00A0
    ISCSI = 0x0960
    SPC_4 = 0x0460
    SPC_5 = 0x05C0
    SBC_3 = 0x04C0
    SBC_4 = 0x0600


# The standard VERSION field is 06h (SPC-4): the conformance suite accepts
# 04h..06h only, and SPC-4 is what every initiator keys features on. The
# descriptors also name SPC-5 / SBC-4, whose features we implement.
STANDARD_VERSION = 0x06
VERSION_DESCRIPTORS = (
    VersionDescriptor.SAM_5,
    VersionDescriptor.ISCSI,
    VersionDescriptor.SPC_4,
    VersionDescriptor.SBC_3,
    VersionDescriptor.SPC_5,
    VersionDescriptor.SBC_4,
)

# Placeholder IEEE company id for NAA designators; replace with an assigned
# OUI before shipping. The 36 + 64 vendor bits come from a hash of the LU name.
NAA_COMPANY_ID = 0x000000


class CodeSet(IntEnum):
    BINARY = 1
    ASCII = 2
    UTF8 = 3


class Association(IntEnum):
    LU = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class DesignatorType(IntEnum):
    VENDOR = 0
    T10 = 1
    EUI64 = 2
    NAA = 3
    RELATIVE_TARGET_PORT = 4
    TARGET_PORT_GROUP = 5
    LU_GROUP = 6
    MD5 = 7
    SCSI_NAME = 8


def relative_target_port(vpd83: bytes | memoryview) -> int | None:
    """The RELATIVE TARGET PORT IDENTIFIER designator (type 4h, association
    01b target port; SPC-5 7.7.6.5) of a VPD 83h page: the target port the
    command that read it came through. None when the page has none."""
    mv = memoryview(vpd83)
    if len(mv) < 4:
        return None
    end = min(len(mv), 4 + int.from_bytes(mv[2:4], "big"))
    off = 4
    while off + 4 <= end:
        dlen = mv[off + 3]
        if off + 4 + dlen > end:
            return None
        assoc, dtype = (mv[off + 1] >> 4) & 0x3, mv[off + 1] & 0x0F
        if assoc == Association.TARGET_PORT and dtype == DesignatorType.RELATIVE_TARGET_PORT and dlen >= 4:
            return int.from_bytes(mv[off + 6 : off + 8], "big") or None
        off += 4 + dlen
    return None


@dataclass(frozen=True, slots=True)
class Identity:
    vendor: str
    product: str
    revision: str
    serial: str
    name: str  # stable id the NAA designator derives from


def _ascii(s: str, n: int) -> bytes:
    b = s.encode("ascii", "replace")[:n]
    return b.ljust(n, b" ")


def standard_inquiry(
    ident: Identity, *, protect: bool = False, third_party_copy: bool = False, tpgs: int = 0
) -> bytes:
    """96 bytes of standard INQUIRY data (SPC-5 6.6.2). ``third_party_copy``
    sets 3PC: the LU's copy manager takes EXTENDED COPY."""
    b = bytearray(96)
    b[0] = DeviceType.DIRECT_ACCESS  # peripheral qualifier 000b
    b[2] = STANDARD_VERSION
    b[3] = 0x10 | 0x02  # HISUP, RESPONSE DATA FORMAT 2
    b[4] = len(b) - 5
    # SCCS/ACC 0, TPGS (bits 5:4: asymmetric access, scsi/tpg.py), 3PC, PROTECT
    b[5] = (0x01 if protect else 0x00) | (0x08 if third_party_copy else 0x00) | (tpgs & 0x3) << 4
    b[6] = 0x00
    b[7] = 0x02  # CMDQUE
    b[8:16] = _ascii(ident.vendor, 8)
    b[16:32] = _ascii(ident.product, 16)
    b[32:36] = _ascii(ident.revision, 4)
    for i, vd in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", b, 58 + 2 * i, vd)
    return bytes(b)


def _vpd(page: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", DeviceType.DIRECT_ACCESS, page, len(payload)) + payload


def vpd_supported() -> bytes:
    return _vpd(VpdPage.SUPPORTED, bytes(SUPPORTED_VPD))


def vpd_serial(ident: Identity) -> bytes:
    return _vpd(VpdPage.UNIT_SERIAL, ident.serial.encode("ascii", "replace"))


def naa6(name: str, company_id: int = NAA_COMPANY_ID) -> bytes:
    """NAA IEEE Registered Extended (NAA 6) designator, 16 bytes (SPC-5 7.7.6.6.5)."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:13], "big")
    vsid = h >> (104 - 36)  # 36 bits
    ext = h & ((1 << 64) - 1)
    hi = (6 << 60) | ((company_id & 0xFFFFFF) << 36) | vsid
    return struct.pack(">QQ", hi, ext)


def designator(codeset: int, assoc: int, dtype: int, data: bytes, piv: bool = False) -> bytes:
    b0 = codeset & 0x0F
    b1 = (assoc << 4) | dtype
    if piv:
        b0 |= ProtocolId.ISCSI << 4
        b1 |= 0x80
    return bytes((b0, b1, 0, len(data))) + data


def _name_string(s: str) -> bytes:
    """SCSI name string: UTF-8, NUL terminated, padded to a multiple of 4."""
    b = s.encode() + b"\x00"
    return b + bytes(-len(b) % 4)


def vpd_device_id(
    ident: Identity, *, target: str | None, tpgt: int, rel_port: int, port_group: int = 1
) -> bytes:
    """Device Identification (83h), SPC-5 7.7.6."""
    d = designator(CodeSet.BINARY, Association.LU, DesignatorType.NAA, naa6(ident.name))
    d += designator(
        CodeSet.ASCII, Association.LU, DesignatorType.T10, _ascii(ident.vendor, 8) + ident.serial.encode()
    )
    d += designator(
        CodeSet.BINARY, Association.TARGET_PORT, DesignatorType.RELATIVE_TARGET_PORT,
        struct.pack(">HH", 0, rel_port), piv=True,
    )
    d += designator(
        CodeSet.BINARY, Association.TARGET_PORT, DesignatorType.TARGET_PORT_GROUP,
        struct.pack(">HH", 0, port_group), piv=True,
    )
    if target:
        d += designator(
            CodeSet.UTF8, Association.TARGET_PORT, DesignatorType.SCSI_NAME,
            _name_string(f"{target},t,0x{tpgt:04x}"), piv=True,
        )
        d += designator(
            CodeSet.UTF8, Association.TARGET_DEVICE, DesignatorType.SCSI_NAME,
            _name_string(target), piv=True,
        )
    return _vpd(VpdPage.DEVICE_ID, d)


class ThirdPartyCopyDescriptor(IntEnum):
    """Third-party copy descriptor types of the Third-party Copy VPD page (SPC-4 7.8.17)."""

    SUPPORTED_COMMANDS = 0x0001
    PARAMETER_DATA = 0x0004
    SUPPORTED_DESCRIPTORS = 0x0008
    SUPPORTED_CSCD_DESCRIPTOR_IDS = 0x000C
    GENERAL_COPY_OPERATIONS = 0x8001


@dataclass(frozen=True, slots=True)
class CopyLimits:
    """What the copy manager supports, for the Third-party Copy VPD page."""

    commands: tuple[tuple[int, tuple[int, ...]], ...]  # (opcode, service actions)
    max_cscd_descriptors: int
    max_segment_descriptors: int
    max_descriptor_list_length: int
    max_inline_data: int
    descriptor_codes: tuple[int, ...]
    total_concurrent_copies: int
    max_identified_concurrent_copies: int
    max_segment_length: int
    data_segment_granularity: int  # log2 of bytes
    inline_data_granularity: int


def _tpc_descriptor(dtype: int, body: bytes) -> bytes:
    """A third-party copy descriptor: type, length, body padded to a multiple of 4."""
    body += bytes(-len(body) % 4)
    return struct.pack(">HH", dtype, len(body)) + body


def vpd_third_party_copy(c: CopyLimits) -> bytes:
    """Third-party Copy (8Fh), SPC-4 7.8.17: the descriptors an EXTENDED COPY
    (LID1) copy manager must report. No CSCD descriptor IDs beyond the
    0000h-07FFh list indexes are supported (an empty list)."""
    cmds = b"".join(bytes((op, len(sas), *sas)) for op, sas in c.commands)
    d = _tpc_descriptor(ThirdPartyCopyDescriptor.SUPPORTED_COMMANDS, bytes((len(cmds),)) + cmds)
    d += _tpc_descriptor(
        ThirdPartyCopyDescriptor.PARAMETER_DATA,
        struct.pack(">4xHHII12x", c.max_cscd_descriptors, c.max_segment_descriptors,
                    c.max_descriptor_list_length, c.max_inline_data),
    )
    d += _tpc_descriptor(
        ThirdPartyCopyDescriptor.SUPPORTED_DESCRIPTORS, bytes((len(c.descriptor_codes), *c.descriptor_codes))
    )
    d += _tpc_descriptor(ThirdPartyCopyDescriptor.SUPPORTED_CSCD_DESCRIPTOR_IDS, struct.pack(">H", 0))
    d += _tpc_descriptor(
        ThirdPartyCopyDescriptor.GENERAL_COPY_OPERATIONS,
        struct.pack(">IIIBB18x", c.total_concurrent_copies, c.max_identified_concurrent_copies,
                    c.max_segment_length, c.data_segment_granularity, c.inline_data_granularity),
    )
    return _vpd(VpdPage.THIRD_PARTY_COPY, d)


@dataclass(frozen=True, slots=True)
class BlockLimits:
    max_transfer: int  # blocks
    optimal_transfer: int
    max_unmap_lba: int
    max_unmap_descriptors: int
    max_write_same: int
    max_compare_and_write: int = 1
    optimal_granularity: int = 1
    unmap_granularity: int = 1
    max_prefetch: int = 0
    # WRITE ATOMIC (SBC-4 4.29, 6.6.4), in blocks; all 0: atomic writes not supported.
    max_atomic_transfer: int = 0
    atomic_alignment: int = 0  # 0: no alignment constraint
    atomic_granularity: int = 0  # 0: no granularity constraint
    max_atomic_with_boundary: int = 0  # TRANSFER LENGTH limit when ATOMIC BOUNDARY != 0
    max_atomic_boundary: int = 0  # largest ATOMIC BOUNDARY; 0: only boundary 0


def vpd_block_limits(bl: BlockLimits) -> bytes:
    """Block Limits (B0h), SBC-4 6.6.4; page length 3Ch."""
    b = bytearray(0x3C)
    # offsets below are of the full page minus the 4-byte header
    b[0] = 0x00  # WSNZ = 0: WRITE SAME with 0 blocks runs to the last block
    b[1] = bl.max_compare_and_write
    struct.pack_into(">H", b, 2, bl.optimal_granularity)
    struct.pack_into(">I", b, 4, bl.max_transfer)
    struct.pack_into(">I", b, 8, bl.optimal_transfer)
    struct.pack_into(">I", b, 12, bl.max_prefetch)
    struct.pack_into(">I", b, 16, bl.max_unmap_lba)
    struct.pack_into(">I", b, 20, bl.max_unmap_descriptors)
    struct.pack_into(">I", b, 24, bl.unmap_granularity)
    struct.pack_into(">I", b, 28, 0x80000000)  # UGAVALID, alignment 0
    struct.pack_into(">Q", b, 32, bl.max_write_same)
    struct.pack_into(
        ">5I", b, 40, bl.max_atomic_transfer, bl.atomic_alignment, bl.atomic_granularity,
        bl.max_atomic_with_boundary, bl.max_atomic_boundary,
    )
    return _vpd(VpdPage.BLOCK_LIMITS, bytes(b))


def vpd_block_characteristics() -> bytes:
    """Block Device Characteristics (B1h), SBC-4 6.6.2: non-rotating medium.

    Page byte 7: WABEREQ 01b and WACEREQ 01b: after a SANITIZE BLOCK ERASE /
    CRYPTOGRAPHIC ERASE, reads complete GOOD (the blocks read as zero)."""
    b = bytearray(0x3C)
    struct.pack_into(">H", b, 0, 0x0001)  # MEDIUM ROTATION RATE: non-rotating
    b[3] = 0x40 | 0x10  # WABEREQ 01b, WACEREQ 01b
    return _vpd(VpdPage.BLOCK_CHARACTERISTICS, bytes(b))


def vpd_lbp(*, lbprz: bool = True) -> bytes:
    """Logical Block Provisioning (B2h), SBC-4 6.6.6.

    Byte 5: LBPU 80h (UNMAP), LBPWS 40h (WRITE SAME(16) UNMAP), LBPWS10 20h,
    LBPRZ (bits 4:2, 001b = unmapped blocks read as zero); byte 6:
    PROVISIONING TYPE 2 (thin).
    """
    b5 = 0x80 | 0x40 | 0x20 | (0x04 if lbprz else 0)
    return _vpd(VpdPage.LOGICAL_BLOCK_PROVISIONING, bytes((0, b5, 0x02, 0)))
