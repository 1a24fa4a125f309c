"""INQUIRY data and VPD pages (scsi/inquiry.py): golden bytes per page,
parsed back field by field where the layout is spelled out in SPC-5 / SBC-4."""

from __future__ import annotations

import hashlib
import struct

from prmigrate.scsi.inquiry import (
    NAA_COMPANY_ID,
    SUPPORTED_VPD,
    BlockLimits,
    CopyLimits,
    Identity,
    VpdPage,
    naa6,
    relative_target_port,
    standard_inquiry,
    vpd_block_characteristics,
    vpd_block_limits,
    vpd_device_id,
    vpd_lbp,
    vpd_serial,
    vpd_supported,
    vpd_third_party_copy,
)

IDENT = Identity("PRMIG", "virtual disk", "0.1", "SN42", "lu-a")


def test_standard_inquiry_golden() -> None:
    b = standard_inquiry(IDENT)
    assert len(b) == 96
    assert b[:8] == bytes([0x00, 0x00, 0x06, 0x12, 91, 0x00, 0x00, 0x02])
    assert b[8:16] == b"PRMIG   "
    assert b[16:32] == b"virtual disk    "
    assert b[32:36] == b"0.1 "
    # version descriptors: SAM-5, iSCSI, SPC-4, SBC-3, SPC-5, SBC-4
    assert struct.unpack(">6H", b[58:70]) == (0x00A0, 0x0960, 0x0460, 0x04C0, 0x05C0, 0x0600)
    assert b[70:] == bytes(26)
    assert standard_inquiry(IDENT, protect=True, third_party_copy=True)[5] == 0x09  # PROTECT, 3PC


def test_vendor_fields_are_ascii_padded_and_cut() -> None:
    b = standard_inquiry(Identity("A-LONG-VENDOR", "p\u00e9", "12345", "s", "n"))
    assert b[8:16] == b"A-LONG-V"
    assert b[16:32] == b"p?".ljust(16)
    assert b[32:36] == b"1234"


def test_vpd_supported_and_serial_golden() -> None:
    assert vpd_supported() == bytes([0, 0x00, 0, 7, 0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2])
    assert tuple(SUPPORTED_VPD) == tuple(sorted(SUPPORTED_VPD))  # ascending (SPC-5 7.7.17)
    assert vpd_serial(IDENT) == bytes([0, 0x80, 0, 4]) + b"SN42"


def test_naa6_layout() -> None:
    d = naa6("lu-a")
    assert len(d) == 16
    hi, ext = struct.unpack(">QQ", d)
    assert hi >> 60 == 6
    assert (hi >> 36) & 0xFFFFFF == NAA_COMPANY_ID
    h = int.from_bytes(hashlib.sha256(b"lu-a").digest()[:13], "big")
    assert hi & ((1 << 36) - 1) == h >> 68
    assert ext == h & ((1 << 64) - 1)
    assert naa6("lu-a") == d and naa6("lu-b") != d  # stable, per name


def _designators(page: bytes) -> list[tuple[int, int, bytes]]:
    """(byte 0, byte 1, designator) of each descriptor of a page 83h."""
    assert page[1] == VpdPage.DEVICE_ID
    assert struct.unpack(">H", page[2:4])[0] == len(page) - 4
    out, off = [], 4
    while off < len(page):
        n = page[off + 3]
        out.append((page[off], page[off + 1], page[off + 4 : off + 4 + n]))
        off += 4 + n
    assert off == len(page)
    return out


def test_device_id_designators() -> None:
    page = vpd_device_id(IDENT, target="iqn.x:t", tpgt=2, rel_port=3, port_group=1)
    ds = _designators(page)
    assert ds[0] == (0x01, 0x03, naa6("lu-a"))  # binary, LU, NAA
    assert ds[1] == (0x02, 0x01, b"PRMIG   SN42")  # ASCII, LU, T10 vendor id
    assert ds[2] == (0x51, 0x94, bytes([0, 0, 0, 3]))  # iSCSI PIV, target port, relative port
    assert ds[3] == (0x51, 0x95, bytes([0, 0, 0, 1]))  # target port group
    assert ds[4] == (0x53, 0x98, b"iqn.x:t,t,0x0002\0" + bytes(3))  # SCSI name of the port
    assert ds[5] == (0x53, 0xA8, b"iqn.x:t\0")  # SCSI name of the target device
    assert all(len(d) % 4 == 0 for _, b1, d in ds if b1 & 0x0F == 8)
    assert len(_designators(vpd_device_id(IDENT, target=None, tpgt=1, rel_port=1))) == 4


def test_block_limits_golden() -> None:
    bl = BlockLimits(max_transfer=2048, optimal_transfer=256, max_unmap_lba=8192,
                     max_unmap_descriptors=16, max_write_same=65535, max_atomic_transfer=8)
    page = vpd_block_limits(bl)
    assert page[:4] == bytes([0, 0xB0, 0, 0x3C])
    assert len(page) == 4 + 0x3C
    p = page[4:]  # SBC-4 table "Block Limits VPD page" offsets minus the header
    assert (p[0], p[1]) == (0, 1)
    assert struct.unpack(">H", p[2:4])[0] == 1
    assert struct.unpack(">7I", p[4:32]) == (2048, 256, 0, 8192, 16, 1, 0x80000000)
    assert struct.unpack(">Q", p[32:40])[0] == 65535
    assert struct.unpack(">5I", p[40:60]) == (8, 0, 0, 0, 0)


def test_block_characteristics_and_lbp_golden() -> None:
    b1 = vpd_block_characteristics()
    assert b1[:8] == bytes([0, 0xB1, 0, 0x3C, 0x00, 0x01, 0x00, 0x50])
    assert b1[8:] == bytes(0x3C - 4)
    assert vpd_lbp() == bytes([0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0])
    assert vpd_lbp(lbprz=False) == bytes([0, 0xB2, 0, 4, 0, 0xE0, 0x02, 0])


def test_third_party_copy_descriptors() -> None:
    c = CopyLimits(
        commands=((0x83, (0x00,)), (0x84, (0x03,))), max_cscd_descriptors=2,
        max_segment_descriptors=1, max_descriptor_list_length=1024, max_inline_data=0,
        descriptor_codes=(0x02, 0xE4), total_concurrent_copies=1, max_identified_concurrent_copies=1,
        max_segment_length=1 << 20, data_segment_granularity=9, inline_data_granularity=0,
    )
    page = vpd_third_party_copy(c)
    assert page[:2] == bytes([0, 0x8F])
    assert struct.unpack(">H", page[2:4])[0] == len(page) - 4
    descs, off = {}, 4
    while off < len(page):
        dtype, n = struct.unpack(">HH", page[off : off + 4])
        assert n % 4 == 0
        descs[dtype] = page[off + 4 : off + 4 + n]
        off += 4 + n
    assert list(descs) == [0x0001, 0x0004, 0x0008, 0x000C, 0x8001]
    assert descs[0x0001] == bytes([6, 0x83, 1, 0x00, 0x84, 1, 0x03, 0])
    assert descs[0x0004][4:16] == struct.pack(">HHII", 2, 1, 1024, 0)
    assert descs[0x0008] == bytes([2, 0x02, 0xE4, 0])
    assert descs[0x000C] == bytes(4)
    assert descs[0x8001][:14] == struct.pack(">IIIBB", 1, 1, 1 << 20, 9, 0)


def test_relative_target_port_of_vpd83() -> None:
    """SPC-5 7.7.6.5: the type 4h designator with association 01b."""
    for port in (1, 2, 0xFFFF):
        page = vpd_device_id(IDENT, target="iqn.t", tpgt=port, rel_port=port, port_group=7)
        assert relative_target_port(page) == port
    assert relative_target_port(b"") is None and relative_target_port(b"\x00\x83\x00\x00") is None
    # a type 4h designator of the logical unit (association 00b) is not a port
    lu_only = b"\x00\x83\x00\x08" + b"\x01\x04\x00\x04\x00\x00\x00\x05"
    assert relative_target_port(lu_only) is None
    # cut short inside a descriptor: nothing invented
    page = vpd_device_id(IDENT, target=None, tpgt=1, rel_port=3)
    assert relative_target_port(page[:-3]) in (None, 3)
    assert relative_target_port(page[:30]) is None
