"""PDU codec: golden byte vectors (RFC 7143 11), framing fed whole, byte by
byte and with trailing data, digests and typed errors."""

from __future__ import annotations

import pytest

from prmigrate.iscsi import pdu as P
from prmigrate.iscsi.digest import digest_bytes


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


Z16 = "00" * 16
READ10 = "28 00 00000000 00 0008 00 000000000000"

# (name, typed PDU, exact wire bytes without digests). Hand-assembled from the
# field layouts of RFC 7143 11.x.
GOLDEN: list[tuple[str, P.Pdu, bytes]] = [
    (
        "nop-out ping",
        P.NopOut(itt=1, cmdsn=5, exp_statsn=7),
        h("40 80 0000 00 000000 0000000000000000 00000001 ffffffff 00000005 00000007" + Z16),
    ),
    (
        "nop-out with data",
        P.NopOut(itt=2, cmdsn=5, exp_statsn=7, data=b"abcde"),
        h("40 80 0000 00 000005 0000000000000000 00000002 ffffffff 00000005 00000007" + Z16)
        + b"abcde\0\0\0",
    ),
    (
        "nop-in reply",
        P.NopIn(itt=1, ttt=P.RESERVED_TAG, statsn=7, expcmdsn=5, maxcmdsn=68),
        h("20 80 0000 00 000000 0000000000000000 00000001 ffffffff 00000007 00000005 00000044"
          + "00" * 12),
    ),
    (
        "scsi command read(10)",
        P.ScsiCommand(itt=0x10, lun=0, cdb=h(READ10), cmdsn=1, exp_statsn=2,
                      expected_length=4096, read=True),
        h("01 c1 0000 00 000000 0000000000000000 00000010 00001000 00000001 00000002" + READ10),
    ),
    (
        "scsi command write(10) lun 3 immediate data",
        P.ScsiCommand(itt=0x11, lun=3, cdb=h("2a 00 00000000 00 0001 00 000000000000"), cmdsn=2,
                      exp_statsn=2, expected_length=512, write=True, data=b"\x55" * 512),
        h("01 a1 0000 00 000200 0003000000000000 00000011 00000200 00000002 00000002"
          "2a 00 00000000 00 0001 00 000000000000") + b"\x55" * 512,
    ),
    (
        "scsi response check condition with sense",
        P.ScsiResponse(itt=0x10, status=2, statsn=3, expcmdsn=2, maxcmdsn=65,
                       data=P.sense_segment(h("70 00 05 00000000 0a 00000000 24 00 00 000000"))),
        h("21 80 0002 00 000014 0000000000000000 00000010 00000000 00000003 00000002 00000041"
          "00000000 00000000 00000000")
        + h("0012 70 00 05 00000000 0a 00000000 24 00 00 000000"),
    ),
    (
        "scsi response underflow",
        P.ScsiResponse(itt=7, status=0, statsn=9, expcmdsn=4, maxcmdsn=67,
                       flags=P.ResponseFlags.UNDERFLOW, residual=512),
        h("21 82 0000 00 000000 0000000000000000 00000007 00000000 00000009 00000004 00000043"
          "00000000 00000000 00000200"),
    ),
    (
        "data-in with status (phase collapse)",
        P.DataIn(itt=0x10, datasn=0, offset=0, data=b"\x01\x02\x03", final=True, status=0,
                 statsn=3, expcmdsn=2, maxcmdsn=65),
        h("25 81 0000 00 000003 0000000000000000 00000010 ffffffff 00000003 00000002 00000041"
          "00000000 00000000 00000000") + b"\x01\x02\x03\0",
    ),
    (
        "data-in middle sequence",
        P.DataIn(itt=0x10, datasn=1, offset=8192, data=b"\xaa" * 4, final=False,
                 expcmdsn=2, maxcmdsn=65),
        h("25 00 0000 00 000004 0000000000000000 00000010 ffffffff 00000000 00000002 00000041"
          "00000001 00002000 00000000") + b"\xaa" * 4,
    ),
    (
        "data-out",
        P.DataOut(itt=0x11, ttt=0x1234, datasn=2, offset=16384, data=b"\x00" * 8, final=True,
                  exp_statsn=4, lun=1),
        h("05 80 0000 00 000008 0001000000000000 00000011 00001234 00000000 00000004 00000000"
          "00000002 00004000 00000000") + bytes(8),
    ),
    (
        "r2t",
        P.R2T(itt=0x11, ttt=0x1234, r2tsn=0, offset=512, length=65536, statsn=4, expcmdsn=3,
              maxcmdsn=66, lun=1),
        h("31 80 0000 00 000000 0001000000000000 00000011 00001234 00000004 00000003 00000042"
          "00000000 00000200 00010000"),
    ),
    (
        "task management abort task",
        P.TaskMgmtRequest(itt=0x20, function=P.TmfFunction.ABORT_TASK, cmdsn=9, exp_statsn=5,
                          lun=0, referenced_itt=0x10, ref_cmdsn=8),
        h("42 81 0000 00 000000 0000000000000000 00000020 00000010 00000009 00000005 00000008"
          "00000000 0000000000000000"),
    ),
    (
        "task management response",
        P.TaskMgmtResponse(itt=0x20, response=P.TmfResponse.TASK_DOES_NOT_EXIST, statsn=6,
                           expcmdsn=9, maxcmdsn=72),
        h("22 80 0100 00 000000 0000000000000000 00000020 00000000 00000006 00000009 00000048"
          + "00" * 12),
    ),
    (
        "login request operational -> full feature",
        P.LoginRequest(isid=0x400001370000, tsih=0, itt=0, cid=0, cmdsn=0, exp_statsn=0,
                       csg=1, nsg=3, transit=True, data=b"SessionType=Normal\0"),
        h("43 87 00 00 00 000013 400001370000 0000 00000000 0000 0000 00000000 00000000" + Z16)
        + b"SessionType=Normal\0\0",
    ),
    (
        "login response redirect",
        P.LoginResponse(isid=0x400001370000, tsih=0, itt=0, statsn=0, expcmdsn=0, maxcmdsn=0,
                        csg=1, nsg=0, transit=False, status=P.LoginStatus.TARGET_MOVED_TEMPORARILY,
                        data=b"TargetAddress=127.0.0.3:3260,1\0"),
        h("23 04 00 00 00 00001f 400001370000 0000 00000000 00000000 00000000 00000000 00000000"
          "01 01 00000000000000000000") + b"TargetAddress=127.0.0.3:3260,1\0\0",
    ),
    (
        "text request sendtargets",
        P.TextRequest(itt=3, cmdsn=1, exp_statsn=1, data=b"SendTargets=All\0"),
        h("04 80 0000 00 000010 0000000000000000 00000003 ffffffff 00000001 00000001" + Z16)
        + b"SendTargets=All\0",
    ),
    (
        "text response",
        P.TextResponse(itt=3, statsn=1, expcmdsn=2, maxcmdsn=65, data=b"TargetName=iqn.x\0"),
        h("24 80 0000 00 000011 0000000000000000 00000003 ffffffff 00000001 00000002 00000041"
          + "00" * 12) + b"TargetName=iqn.x\0\0\0\0",
    ),
    (
        "logout request close session",
        P.LogoutRequest(itt=9, reason=P.LogoutReason.CLOSE_SESSION, cmdsn=12, exp_statsn=10),
        h("46 80 0000 00 000000 0000000000000000 00000009 0000 0000 0000000c 0000000a" + Z16),
    ),
    (
        "logout response",
        P.LogoutResponse(itt=9, response=P.LogoutResponseCode.SUCCESS, statsn=10, expcmdsn=13,
                         maxcmdsn=76, time2wait=2, time2retain=20),
        h("26 80 0000 00 000000 0000000000000000 00000009 00000000 0000000a 0000000d 0000004c"
          "00000000 0002 0014 00000000"),
    ),
    (
        "async message logout request",
        P.AsyncMessage(event=P.AsyncEvent.LOGOUT_REQUEST, statsn=11, expcmdsn=13, maxcmdsn=76,
                       parameter3=2),
        h("32 80 0000 00 000000 0000000000000000 ffffffff ffffffff 0000000b 0000000d 0000004c"
          "01 00 0000 0000 0002 00000000"),
    ),
    (
        "reject protocol error",
        P.Reject(reason=P.RejectReason.PROTOCOL_ERROR, statsn=3, expcmdsn=2, maxcmdsn=65,
                 data=bytes(range(48))),
        h("3f 80 0400 00 000030 0000000000000000 ffffffff 00000000 00000003 00000002 00000041"
          "00000000 0000000000000000") + bytes(range(48)),
    ),
    (
        "snack",
        P.SnackRequest(itt=5, type=P.SnackType.STATUS, exp_statsn=3, begrun=2, runlength=1),
        h("10 81 0000 00 000000 0000000000000000 00000005 ffffffff 00000000 00000003 00000000"
          "00000000 00000002 00000001"),
    ),
]


@pytest.mark.parametrize(("name", "pdu", "wire"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_encode_golden(name, pdu, wire):
    assert pdu.encode() == wire
    assert len(wire) % 4 == 0


@pytest.mark.parametrize(("name", "pdu", "wire"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_decode_golden(name, pdu, wire):
    (raw,) = P.frame_all(wire)
    assert P.decode_pdu(raw) == pdu


ALL_WIRE = b"".join(w for _, _, w in GOLDEN)
ALL_PDUS = [p for _, p, _ in GOLDEN]


def _frame(chunks, **kw):
    reader = P.PduReader(max_data_length=1 << 20, **kw)
    out = []
    for c in chunks:
        reader.feed(c)
        out.extend(P.decode_pdu(r) for r in reader)
    return out, reader


def test_stream_whole():
    got, reader = _frame([ALL_WIRE])
    assert got == ALL_PDUS and reader.buffered == 0


def test_stream_byte_by_byte():
    got, reader = _frame([ALL_WIRE[i : i + 1] for i in range(len(ALL_WIRE))])
    assert got == ALL_PDUS and reader.buffered == 0


def test_stream_trailing_partial_pdu_is_kept():
    tail = GOLDEN[3][2][:30]
    got, reader = _frame([ALL_WIRE + tail])
    assert got == ALL_PDUS and reader.buffered == 30
    reader.feed(GOLDEN[3][2][30:])
    assert [P.decode_pdu(r) for r in reader] == [GOLDEN[3][1]]


@pytest.mark.parametrize("hd,dd", [(True, False), (False, True), (True, True)])
def test_digests_round_trip(hd, dd):
    wire = b"".join(p.encode(hd, dd) for p in ALL_PDUS)
    got, reader = _frame([wire[i : i + 7] for i in range(0, len(wire), 7)], header_digest=hd, data_digest=dd)
    assert got == ALL_PDUS


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
def test_missing_counts_down_to_each_whole_pdu(hd, dd):
    """Fed one byte at a time, ``missing`` is the bytes still to come of
    the head PDU's BHS and, once its BHS is in, of the whole PDU; 0 exactly
    when ``next_pdu`` returns it."""
    wire = b"".join(p.encode(hd, dd) for p in ALL_PDUS)
    reader = P.PduReader(max_data_length=1 << 20, header_digest=hd, data_digest=dd)
    ends = []
    at = 0
    for p in ALL_PDUS:
        at += len(p.encode(hd, dd))
        ends.append(at)
    assert reader.missing() == 48
    got = []
    for i in range(len(wire)):
        reader.feed(wire[i : i + 1])
        end = next(e for e in ends if e > i)
        start = max([0] + [e for e in ends if e <= i])
        assert reader.missing() == (start + 48 if i + 1 < start + 48 else end) - i - 1
        raw = reader.next_pdu()
        assert (raw is None) == (end != i + 1)
        if raw is not None:
            got.append(P.decode_pdu(raw))
            assert reader.missing() == 48
    assert got == ALL_PDUS


def test_missing_is_0_for_a_header_next_pdu_refuses():
    wire = bytearray(GOLDEN[0][2])
    wire[5:8] = b"\xff\xff\xff"  # a data segment above max_data_length: next_pdu raises
    reader = P.PduReader(max_data_length=8192)
    reader.feed(wire)
    assert reader.missing() == 0
    with pytest.raises(P.ProtocolError):
        reader.next_pdu()
    assert reader.missing() == 0  # the stream failed: next_pdu raises again


def test_header_digest_golden():
    pdu = GOLDEN[0][1]
    wire = pdu.encode(header_digest=True)
    assert wire[48:] == digest_bytes(wire[:48])
    assert len(wire) == 52


def test_data_digest_covers_padding():
    pdu = GOLDEN[1][1]  # 5 data bytes + 3 pad
    wire = pdu.encode(data_digest=True)
    assert wire[-4:] == digest_bytes(b"abcde\0\0\0")


def test_bad_header_digest_is_fatal():
    wire = bytearray(GOLDEN[0][1].encode(header_digest=True))
    wire[-1] ^= 1
    reader = P.PduReader(header_digest=True)
    reader.feed(wire)
    with pytest.raises(P.ProtocolError) as ei:
        reader.next_pdu()
    assert ei.value.fatal and ei.value.header == bytes(wire[:48])


def test_bad_data_digest_skips_pdu_and_continues():
    bad = bytearray(GOLDEN[1][1].encode(data_digest=True))
    bad[-1] ^= 0xFF
    good = GOLDEN[0][1].encode(data_digest=True)
    reader = P.PduReader(data_digest=True)
    reader.feed(bytes(bad) + good)
    with pytest.raises(P.ProtocolError) as ei:
        reader.next_pdu()
    assert ei.value.reason == P.RejectReason.DATA_DIGEST_ERROR and not ei.value.fatal
    assert P.decode_pdu(reader.next_pdu()) == GOLDEN[0][1]


def test_absurd_length_is_fatal():
    wire = bytearray(GOLDEN[0][2])
    wire[5:8] = b"\xff\xff\xff"
    reader = P.PduReader(max_data_length=8192)
    reader.feed(wire)
    with pytest.raises(P.ProtocolError) as ei:
        reader.next_pdu()
    assert ei.value.fatal
    with pytest.raises(P.ProtocolError):
        reader.next_pdu()


def test_unknown_opcode():
    wire = bytearray(GOLDEN[0][2])
    wire[0] = 0x1C
    (raw,) = P.frame_all(bytes(wire))
    with pytest.raises(P.ProtocolError) as ei:
        P.decode_pdu(raw)
    assert ei.value.reason == P.RejectReason.COMMAND_NOT_SUPPORTED


def test_extended_cdb_ahs_round_trip():
    cdb = bytes(range(32))
    cmd = P.ScsiCommand(itt=1, lun=0, cdb=cdb, cmdsn=1)
    wire = cmd.encode(header_digest=True)
    assert wire[4] == 5  # 20 bytes of AHS: 3 header + 1 reserved + 16 CDB bytes
    got = P.decode_pdu(P.frame_all(wire, header_digest=True)[0])
    assert got.cdb == cdb


def test_lun_encoding():
    assert P.encode_lun(0) == 0
    assert P.encode_lun(5) == 0x0005 << 48
    assert P.encode_lun(300) == (0x4000 | 300) << 48
    for lun in (0, 1, 255, 256, 0x3FFF):
        assert P.decode_lun(P.encode_lun(lun)) == lun


def test_login_status_parts():
    assert P.LoginStatus.TARGET_MOVED_TEMPORARILY.status_class == 1
    assert P.LoginStatus.AUTHENTICATION_FAILURE.detail == 1
