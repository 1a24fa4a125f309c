"""EXTENDED COPY (83h, LID1) and RECEIVE COPY RESULTS (84h): the copy
manager of a logical unit (SPC-4 6.4, 6.18; libiscsi's ExtendedCopy and
ReceiveCopyResults families pin the sense codes).

Parameter list (SPC-4 6.4.3, LID1): a 16-byte header (LIST IDENTIFIER;
byte 1 STR 20h, LIST ID USAGE bits 4:3, PRIORITY bits 2:0; CSCD DESCRIPTOR
LIST LENGTH at 2; SEGMENT DESCRIPTOR LIST LENGTH at 8; INLINE DATA LENGTH
at 12), then the CSCD descriptors, the segment descriptors, the inline data.
The SPC-3 NRCR bit (bit 4) is the high bit of SPC-4's LIST ID USAGE.

What this copy manager supports, and the checks, in this order (all before
a byte is copied; field pointers are byte offsets in the parameter list):

| check | sense |
|---|---|
| PARAMETER LIST LENGTH 0 | GOOD, nothing done (SPC-4: not an error) |
| list shorter than 16 bytes, shorter than the header's lengths add up to, or Data-Out shorter than the CDB says | ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR |
| CSCD + segment descriptor lists longer than MAXIMUM DESCRIPTOR LIST LENGTH | PARAMETER LIST LENGTH ERROR |
| reserved header bits/bytes, LIST ID USAGE 01b, usage 11b with a LIST IDENTIFIER, INLINE DATA LENGTH > 0 | INVALID FIELD IN PARAMETER LIST |
| more CSCD descriptors than MAXIMUM CSCD DESCRIPTOR COUNT | TOO MANY TARGET DESCRIPTORS (26/06) |
| a CSCD descriptor other than E4h (identification descriptor) | UNSUPPORTED TARGET DESCRIPTOR TYPE CODE (26/07) |
| CSCD list length not a whole number of 32-byte descriptors, designator longer than 20 bytes | INVALID FIELD IN PARAMETER LIST |
| more segment descriptors than MAXIMUM SEGMENT DESCRIPTOR COUNT | TOO MANY SEGMENT DESCRIPTORS (26/08) |
| a segment descriptor other than 02h (block device to block device) | UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE (26/09) |
| 02h with DESCRIPTOR LENGTH != 18h, reserved bits set, a byte count over MAXIMUM SEGMENT LENGTH or not whole blocks of the other device | INVALID FIELD IN PARAMETER LIST |
| a CSCD DESCRIPTOR ID beyond the CSCD list | COPY ABORTED, UNREACHABLE COPY TARGET (08/04) |
| an E4h designator that is no logical unit's NAA designator | COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE (0D/02) |
| PERIPHERAL DEVICE TYPE / DISK BLOCK LENGTH not those of the LU found | COPY ABORTED, INCORRECT COPY TARGET DEVICE TYPE (0D/03) |
| a segment's source or destination range past the end of its LU | COPY ABORTED, NO ADDITIONAL SENSE (00/00), segment pointer at the LBA field |
| destination write protected (SWP) | DATA PROTECT, WRITE PROTECTED |

The range error: SPC would have the copy manager report the copy target's
own LBA OUT OF RANGE inside COPY ABORTED sense (as the CSCD's sense data),
which this copy manager does not build; libiscsi 1.19 accepts only 00/00,
08/04 and 0D/02 under COPY ABORTED. ASC 00/00 with the sense-key specific
segment pointer (SD=0: offset in the parameter list) at the offending
SOURCE/DESTINATION LBA field says what went wrong without claiming an
unreachable device.

LU ID TYPE and NUL in byte 1 of an E4h descriptor are ignored (SPC-4: the
LU identifier is not used by the identification descriptor; NUL is
obsolete), as is the RELATIVE INITIATOR PORT IDENTIFIER. STR and PRIORITY
are hints with no effect: there is one copy at a time.

A copy runs synchronously inside the command (as SANITIZE does). Segments
whose source and destination overlap on one LU copy as ``memmove`` does:
the destination ends up holding what the source held before the command.
The status of a copy whose LIST ID USAGE is 00b or 10b is held per
(I_T nexus, list identifier) for COPY STATUS, which returns it once
(the copy is always complete when COPY STATUS can run) and discards it;
I_T nexus loss drops that nexus's records, a reset all of them.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from enum import IntEnum

from ..scsi import inquiry as inq
from ..scsi.cdb import invalid_cdb, invalid_param, need
from ..scsi.constants import ExtendedCopyAction, Opcode, ReceiveCopyResultsAction
from ..scsi.sense import CheckCondition, Sense, SenseField
from .store import BlockStore

# Limits advertised by OPERATING PARAMETERS (SPC-4 6.18.4) and enforced.
MAX_CSCD_DESCRIPTORS = 8
MAX_SEGMENT_DESCRIPTORS = 16
HEADER_LEN = 16
CSCD_LEN = 32  # every E0h..E9h CSCD descriptor
B2B_LEN = 28  # segment descriptor 02h, 4-byte header included
MAX_DESCRIPTOR_LIST_LENGTH = MAX_CSCD_DESCRIPTORS * CSCD_LEN + MAX_SEGMENT_DESCRIPTORS * B2B_LEN
MAX_SEGMENT_BYTES = 4 << 20  # the LU's maximum transfer: 16 segments block the loop for 64 MiB at most
MAX_INLINE_DATA = 0
HELD_DATA_LIMIT = 0
TOTAL_CONCURRENT_COPIES = 1
MAX_CONCURRENT_COPIES = 1
MAX_DESIGNATOR_LEN = 20
COPY_CHUNK = 1 << 20

_RESERVED_FLAGS = 0xC0
_STR = 0x20
_B2B_FLAGS = 0x03  # DC 02h, CAT 01h
_DC = 0x02


class ListIdUsage(IntEnum):
    """LIST ID USAGE, SPC-4 table 112."""

    HOLD = 0
    RESERVED = 1
    DISCARD = 2
    NONE = 3


class DescriptorType(IntEnum):
    """The descriptor type codes this copy manager implements."""

    BLOCK_TO_BLOCK = 0x02  # segment descriptor, SPC-4 6.4.6.5
    IDENTIFICATION = 0xE4  # CSCD descriptor, SPC-4 6.4.5.2


IMPLEMENTED_DESCRIPTORS = (DescriptorType.BLOCK_TO_BLOCK, DescriptorType.IDENTIFICATION)


class CopyManagerStatus(IntEnum):
    """COPY MANAGER STATUS of COPY STATUS data, SPC-4 6.18.3."""

    IN_PROGRESS = 0x00
    COMPLETED = 0x01
    FAILED = 0x02


class TransferCountUnits(IntEnum):
    BYTES = 0x00
    KIB = 0x01
    MIB = 0x02
    GIB = 0x03
    TIB = 0x04
    PIB = 0x05
    EIB = 0x06


_HDR = struct.Struct(">BBH4xII")
_CSCD_HEAD = struct.Struct(">BBHBBxB")
_B2B = struct.Struct(">BBHHHxxHQQ")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class ExtendedCopyCdb:
    """EXTENDED COPY (83h): SERVICE ACTION byte 1 bits 4:0, PARAMETER LIST
    LENGTH bytes 10-13. Only the LID1 form (00h) is implemented."""

    length: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ExtendedCopyCdb:
        need(cdb, 16)
        if cdb[1] & 0x1F != ExtendedCopyAction.LID1:
            raise invalid_cdb(1, 4)
        return ExtendedCopyCdb(_U32.unpack_from(cdb, 10)[0])


@dataclass(frozen=True, slots=True)
class ReceiveCopyResultsCdb:
    """RECEIVE COPY RESULTS (84h): SERVICE ACTION byte 1 bits 4:0, LIST
    IDENTIFIER byte 2, ALLOCATION LENGTH bytes 10-13."""

    action: int
    list_id: int
    alloc: int

    @staticmethod
    def decode(cdb: bytes | memoryview) -> ReceiveCopyResultsCdb:
        need(cdb, 16)
        return ReceiveCopyResultsCdb(cdb[1] & 0x1F, cdb[2], _U32.unpack_from(cdb, 10)[0])


@dataclass(frozen=True, slots=True)
class Cscd:
    """An identification descriptor CSCD (E4h), SPC-4 6.4.5.2, with the
    block device type specific parameters (bytes 28-31)."""

    offset: int  # of the descriptor in the parameter list
    device_type: int
    code_set: int
    association: int
    designator_type: int
    designator: bytes
    block_length: int  # DISK BLOCK LENGTH; 0 unless a block device

    DESIGNATOR_FIELD = 4  # offsets within the descriptor, for sense pointers
    BLOCK_LENGTH_FIELD = 29


@dataclass(frozen=True, slots=True)
class Segment:
    """A block device to block device segment descriptor (02h), SPC-4 6.4.6.5."""

    offset: int  # of the descriptor in the parameter list
    dc: bool  # NUMBER OF BLOCKS counts destination (1) or source (0) blocks
    src: int  # CSCD descriptor IDs: indexes into the CSCD list
    dst: int
    blocks: int
    src_lba: int
    dst_lba: int

    SRC_FIELD = 4
    DST_FIELD = 6
    BLOCKS_FIELD = 10
    SRC_LBA_FIELD = 12
    DST_LBA_FIELD = 20


@dataclass(frozen=True, slots=True)
class CopyList:
    list_id: int
    usage: ListIdUsage
    priority: int
    striped: bool
    cscds: tuple[Cscd, ...]
    segments: tuple[Segment, ...]

    @property
    def held(self) -> bool:
        """Is the status kept for COPY STATUS?"""
        return self.usage in (ListIdUsage.HOLD, ListIdUsage.DISCARD)

    @staticmethod
    def decode(data: bytes | memoryview, length: int) -> CopyList | None:
        """The parameter list of ``length`` bytes (the CDB's PARAMETER LIST
        LENGTH) out of ``data`` (the Data-Out); None when ``length`` is 0."""
        if length == 0:
            return None
        if length < HEADER_LEN or len(data) < length:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        buf = memoryview(data)[:length]
        list_id, flags, cscd_len, seg_len, inline_len = _HDR.unpack_from(buf)
        if HEADER_LEN + cscd_len + seg_len + inline_len > length:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        if cscd_len + seg_len > MAX_DESCRIPTOR_LIST_LENGTH:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        if flags & _RESERVED_FLAGS:
            raise invalid_param(1, 7)
        usage = ListIdUsage((flags >> 3) & 0x03)
        if usage is ListIdUsage.RESERVED:
            raise invalid_param(1, 4)
        if usage is ListIdUsage.NONE and list_id:
            raise invalid_param(0)
        if any(buf[4:8]):
            raise invalid_param(4)
        if inline_len > MAX_INLINE_DATA:
            raise invalid_param(12)
        cscds = _decode_cscds(buf, HEADER_LEN, cscd_len)
        segments = _decode_segments(buf, HEADER_LEN + cscd_len, seg_len)
        return CopyList(list_id, usage, flags & 0x07, bool(flags & _STR), cscds, segments)


def _decode_cscds(buf: memoryview, start: int, length: int) -> tuple[Cscd, ...]:
    if -(-length // CSCD_LEN) > MAX_CSCD_DESCRIPTORS:
        raise CheckCondition(Sense.TOO_MANY_TARGET_DESCRIPTORS)
    out = []
    for off in range(start, start + length, CSCD_LEN):
        if off + CSCD_LEN > start + length:
            raise invalid_param(2)  # the list ends inside a descriptor
        if buf[off] != DescriptorType.IDENTIFICATION:
            raise CheckCondition(Sense.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, SenseField(cdb=False, field=off))
        _t, b1, _port, cs, assoc_type, dlen = _CSCD_HEAD.unpack_from(buf, off)
        if dlen > MAX_DESIGNATOR_LEN:
            raise invalid_param(off + 7)
        device_type = b1 & 0x1F
        block_length = int.from_bytes(buf[off + 29 : off + 32], "big") if device_type == 0 else 0
        out.append(Cscd(off, device_type, cs & 0x0F, (assoc_type >> 4) & 0x03, assoc_type & 0x0F,
                        bytes(buf[off + 8 : off + 8 + dlen]), block_length))
    return tuple(out)


def _decode_segments(buf: memoryview, start: int, length: int) -> tuple[Segment, ...]:
    out: list[Segment] = []
    off, end = start, start + length
    while off < end:
        if len(out) == MAX_SEGMENT_DESCRIPTORS:
            raise CheckCondition(Sense.TOO_MANY_SEGMENT_DESCRIPTORS)
        if off + 4 > end:
            raise invalid_param(8)  # the list ends inside a descriptor header
        if buf[off] != DescriptorType.BLOCK_TO_BLOCK:
            raise CheckCondition(Sense.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, SenseField(cdb=False, field=off))
        b1, dlen = buf[off + 1], int.from_bytes(buf[off + 2 : off + 4], "big")
        if dlen != B2B_LEN - 4:
            raise invalid_param(off + 2)
        if off + B2B_LEN > end:
            raise invalid_param(8)
        if b1 & ~_B2B_FLAGS:
            raise invalid_param(off + 1)
        if buf[off + 8] or buf[off + 9]:
            raise invalid_param(off + 8)
        _t, _b1, _len, src, dst, blocks, src_lba, dst_lba = _B2B.unpack_from(buf, off)
        out.append(Segment(off, bool(b1 & _DC), src, dst, blocks, src_lba, dst_lba))
        off += B2B_LEN
    return tuple(out)


def segment_abort(seg: Segment, field: int) -> CheckCondition:
    """COPY ABORTED with the segment pointer at ``field`` of ``seg``."""
    return CheckCondition(Sense.COPY_ABORTED, SenseField(cdb=False, field=seg.offset + field))


# ------------------------------------------------------------ results
@dataclass(frozen=True, slots=True)
class CopyRecord:
    """What COPY STATUS reports of one finished EXTENDED COPY."""

    status: CopyManagerStatus
    segments: int
    transferred: int  # bytes written to destinations


def copy_status(r: CopyRecord) -> bytes:
    """COPY STATUS data (SPC-4 6.18.3): 12 bytes, the transfer count in the
    smallest unit that fits its 32 bits."""
    count, units = r.transferred, TransferCountUnits.BYTES
    while count > 0xFFFFFFFF:
        count, units = -(-count // 1024), TransferCountUnits(units + 1)
    return struct.pack(">IBHBI", 8, r.status, r.segments, units, count)


def operating_parameters(block_size: int) -> bytes:
    """OPERATING PARAMETERS data (SPC-4 6.18.4). SNLID: LIST ID USAGE 11b
    (no list identifier) is supported. Granularities are log2 of bytes."""
    gran = block_size.bit_length() - 1
    body = struct.pack(
        ">B3xHHIIIII2xHBBBB3xB",
        0x01,  # SNLID
        MAX_CSCD_DESCRIPTORS,
        MAX_SEGMENT_DESCRIPTORS,
        MAX_DESCRIPTOR_LIST_LENGTH,
        MAX_SEGMENT_BYTES,
        MAX_INLINE_DATA,
        HELD_DATA_LIMIT,
        0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE: no stream devices
        TOTAL_CONCURRENT_COPIES,
        MAX_CONCURRENT_COPIES,
        gran,  # DATA SEGMENT GRANULARITY
        gran,  # INLINE DATA GRANULARITY
        gran,  # HELD DATA GRANULARITY
        len(IMPLEMENTED_DESCRIPTORS),
    ) + bytes(IMPLEMENTED_DESCRIPTORS)
    return _U32.pack(len(body)) + body


def copy_limits(block_size: int) -> inq.CopyLimits:
    """The Third-party Copy VPD page's view of the same limits."""
    gran = block_size.bit_length() - 1
    return inq.CopyLimits(
        commands=(
            (Opcode.EXTENDED_COPY, (ExtendedCopyAction.LID1,)),
            (Opcode.RECEIVE_COPY_RESULTS,
             (ReceiveCopyResultsAction.COPY_STATUS, ReceiveCopyResultsAction.OPERATING_PARAMETERS)),
        ),
        max_cscd_descriptors=MAX_CSCD_DESCRIPTORS,
        max_segment_descriptors=MAX_SEGMENT_DESCRIPTORS,
        max_descriptor_list_length=MAX_DESCRIPTOR_LIST_LENGTH,
        max_inline_data=MAX_INLINE_DATA,
        descriptor_codes=tuple(IMPLEMENTED_DESCRIPTORS),
        total_concurrent_copies=TOTAL_CONCURRENT_COPIES,
        max_identified_concurrent_copies=MAX_CONCURRENT_COPIES,
        max_segment_length=MAX_SEGMENT_BYTES,
        data_segment_granularity=gran,
        inline_data_granularity=gran,
    )


def check_results_action(action: int) -> ReceiveCopyResultsAction:
    if action not in (ReceiveCopyResultsAction.COPY_STATUS, ReceiveCopyResultsAction.OPERATING_PARAMETERS):
        raise invalid_cdb(1, 4)
    return ReceiveCopyResultsAction(action)


# ------------------------------------------------------------ data
def copy_range(src: BlockStore, src_off: int, dst: BlockStore, dst_off: int, length: int) -> None:
    """Copy ``length`` bytes. Overlapping ranges of one store copy as
    ``memmove``: backwards when the destination lies above the source, so
    no source byte is overwritten before it has been read. Disjoint ranges
    go through ``copy_file_range`` (the kernel copies, or shares extents),
    falling back to pread/pwrite where it is refused."""
    if length <= 0 or (src is dst and src_off == dst_off):
        return
    overlap = src is dst and src_off < dst_off + length and dst_off < src_off + length
    if not overlap and _copy_file_range(src.fd, src_off, dst.fd, dst_off, length):
        return
    if overlap and dst_off > src_off:
        end = length
        while end > 0:
            n = min(COPY_CHUNK, end)
            end -= n
            dst.write(dst_off + end, src.read(src_off + end, n))
        return
    done = 0
    while done < length:
        n = min(COPY_CHUNK, length - done)
        dst.write(dst_off + done, src.read(src_off + done, n))
        done += n


def _copy_file_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> bool:
    """True when copy_file_range copied everything; False (nothing or a
    prefix copied, which the caller then copies again) when refused."""
    cfr = getattr(os, "copy_file_range", None)
    if cfr is None:
        return False
    done = 0
    try:
        while done < length:
            n = cfr(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
            if n <= 0:
                return False
            done += n
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            return False
        raise
    return True
