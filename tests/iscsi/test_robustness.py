"""Bad input never crashes the target: malformed PDUs, wrong digests, absurd
lengths, unknown opcodes, out-of-order login, truncated CDBs and random
garbage get a Reject or a closed connection plus a log line, while another
session keeps being served."""

from __future__ import annotations

import asyncio
import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prmigrate.iscsi import pdu as P
from prmigrate.iscsi.session import Connection, TargetNode
from prmigrate.iscsi.target import IscsiTarget

from ._target_helpers import TARGET, Client, MemoryLU, make_target
from .test_target import run_async


async def _healthy(host: str, port: int, isid: int) -> None:
    c = await Client.connect(host, port)
    assert (await c.login(isid=isid)).status == 0
    final, _ = await c.command(bytes(6))
    assert final.status == 0
    await c.close()


async def _logged_in(host: str, port: int, isid: int = 0x400000000001, **kw) -> Client:
    c = await Client.connect(host, port)
    for k, v in kw.items():
        setattr(c, k, v)
    assert (await c.login(isid=isid)).status == 0
    return c


def _nop(c: Client, itt: int = 5) -> bytes:
    return P.NopOut(itt=itt, cmdsn=c.cmdsn).encode(c.hd, c.dd)


@run_async
async def test_absurd_data_length_closes_connection(caplog):
    caplog.set_level(logging.WARNING, "prmigrate.iscsi.target")
    target, node, lu, host, port = await make_target()
    try:
        c = await _logged_in(host, port)
        bad = bytearray(_nop(c))
        bad[5:8] = b"\xff\xff\xff"
        c.send(bytes(bad) + bytes(100))
        rej = await c.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.PROTOCOL_ERROR
        assert await c.closed()
        await _healthy(host, port, 0x400000000002)
    finally:
        await target.close()
    assert "rejected PDU" in caplog.text


@run_async
async def test_header_digest_error_closes_connection(caplog):
    caplog.set_level(logging.WARNING, "prmigrate.iscsi.target")
    target, node, lu, host, port = await make_target()
    try:
        c = await _logged_in(host, port, hd=True)
        bad = bytearray(_nop(c))
        bad[50] ^= 0xFF  # digest byte
        c.send(bytes(bad))
        await c.recv()  # the Reject
        assert await c.closed()
        await _healthy(host, port, 0x400000000002)
    finally:
        await target.close()
    assert "header digest" in caplog.text


@run_async
async def test_data_digest_error_is_rejected_and_connection_continues():
    target, node, lu, host, port = await make_target()
    try:
        c = await _logged_in(host, port, dd=True)
        bad = bytearray(P.NopOut(itt=9, cmdsn=c.cmdsn, data=b"12345678").encode(False, True))
        bad[-1] ^= 0xFF
        c.send(bytes(bad))
        rej = await c.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.DATA_DIGEST_ERROR
        assert rej.data[:1] == bytes(bad[:1])
        c.send_pdu(P.NopOut(itt=10, cmdsn=c.cmdsn))
        assert (await c.recv()).itt == 10
    finally:
        await target.close()


@run_async
async def test_unknown_opcode_and_snack_rejected():
    target, node, lu, host, port = await make_target()
    try:
        c = await _logged_in(host, port)
        bad = bytearray(_nop(c))
        bad[0] = 0x1D
        c.send(bytes(bad))
        rej = await c.recv()
        assert rej.reason == P.RejectReason.COMMAND_NOT_SUPPORTED and rej.data == bytes(bad)
        c.send_pdu(P.SnackRequest(itt=3, type=P.SnackType.STATUS))
        assert (await c.recv()).reason == P.RejectReason.COMMAND_NOT_SUPPORTED
        # a target opcode sent by the initiator
        c.send_pdu(P.NopIn(itt=1, ttt=P.RESERVED_TAG, statsn=0, expcmdsn=0, maxcmdsn=0))
        assert isinstance(await c.recv(), P.Reject)
        c.send_pdu(P.NopOut(itt=11, cmdsn=c.cmdsn))
        assert (await c.recv()).itt == 11
    finally:
        await target.close()


@run_async
async def test_truncated_extended_cdb_rejected():
    target, node, lu, host, port = await make_target()
    try:
        c = await _logged_in(host, port)
        cmd = bytearray(P.ScsiCommand(itt=1, lun=0, cdb=bytes(32), cmdsn=c.cmdsn).encode())
        cmd[48:50] = b"\x00\x40"  # AHSLength says 64 bytes in a 20-byte AHS
        c.send(bytes(cmd))
        assert (await c.recv()).reason == P.RejectReason.INVALID_PDU_FIELD
        c.send_pdu(P.NopOut(itt=12, cmdsn=c.cmdsn))
        assert (await c.recv()).itt == 12
    finally:
        await target.close()


@run_async
async def test_out_of_order_login(caplog):
    caplog.set_level(logging.INFO, "prmigrate.iscsi.target")
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)  # SCSI command before login
        c.send_pdu(P.ScsiCommand(itt=1, lun=0, cdb=bytes(6), cmdsn=0))
        assert await c.closed()
        c = await Client.connect(host, port)  # login starting in full feature phase
        c.send_pdu(P.LoginRequest(isid=1, tsih=0, itt=0, cid=0, cmdsn=0, exp_statsn=0, csg=3, nsg=3, transit=True,
                                  data=b"InitiatorName=iqn.x\0TargetName=" + TARGET.encode() + b"\0"))
        rsp = await c.recv()
        assert isinstance(rsp, P.LoginResponse) and rsp.status == P.LoginStatus.INITIATOR_ERROR
        assert await c.closed()
        c = await Client.connect(host, port)  # no InitiatorName
        c.send_pdu(P.LoginRequest(isid=1, tsih=0, itt=0, cid=0, cmdsn=0, exp_statsn=0, csg=1, nsg=3, transit=True,
                                  data=b"TargetName=" + TARGET.encode() + b"\0"))
        assert (await c.recv()).status == P.LoginStatus.MISSING_PARAMETER
        c = await Client.connect(host, port)  # malformed text
        c.send_pdu(P.LoginRequest(isid=1, tsih=0, itt=0, cid=0, cmdsn=0, exp_statsn=0, csg=1, nsg=3, transit=True,
                                  data=b"garbage-without-equals\0"))
        assert (await c.recv()).status == P.LoginStatus.INITIATOR_ERROR
        c = await _logged_in(host, port)  # login PDU in full feature phase
        c.send_pdu(P.LoginRequest(isid=1, tsih=0, itt=0, cid=0, cmdsn=0, exp_statsn=0, csg=1, nsg=3, transit=True))
        assert (await c.recv()).reason == P.RejectReason.PROTOCOL_ERROR
        await _healthy(host, port, 0x400000000003)
    finally:
        await target.close()
    assert "refused" in caplog.text


@run_async
async def test_bad_data_out_sequence_fails_task_only():
    target, node, lu, host, port = await make_target()
    try:
        c = await _logged_in(host, port)
        c.send_pdu(P.ScsiCommand(itt=50, lun=0, cdb=bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 4, 0]), cmdsn=c.cmdsn,
                                 expected_length=2048, write=True))
        c.cmdsn += 1
        r2t = await c.recv()
        assert isinstance(r2t, P.R2T) and r2t.length == 2048
        c.send_pdu(P.DataOut(itt=50, ttt=r2t.ttt, datasn=7, offset=0, data=bytes(1024), final=False))
        c.send_pdu(P.DataOut(itt=50, ttt=r2t.ttt, datasn=8, offset=1024, data=bytes(1024), final=True))
        rsp = await c.recv()
        assert isinstance(rsp, P.ScsiResponse) and rsp.status == 2 and rsp.sense[12] == 0x4B
        c.send_pdu(P.DataOut(itt=51, ttt=5, datasn=0, offset=0, data=bytes(4)))  # unknown task
        assert (await c.recv()).reason == P.RejectReason.INVALID_PDU_FIELD
        c.send_pdu(P.NopOut(itt=13, cmdsn=c.cmdsn))
        assert (await c.recv()).itt == 13
    finally:
        await target.close()


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6), login_first=st.booleans())
def test_random_garbage_on_the_socket(garbage, login_first):
    async def go():
        target, node, lu, host, port = await make_target()
        try:
            if login_first:
                c = await _logged_in(host, port)
            else:
                c = await Client.connect(host, port)
            for g in garbage:
                c.send(g)
            await asyncio.sleep(0.02)
            await c.close()
            await _healthy(host, port, 0x400000000077)
        finally:
            await target.close()

    asyncio.run(asyncio.wait_for(go(), 20))


def _sans_io_connection():
    lu = MemoryLU()
    target = IscsiTarget([TargetNode(TARGET, {0: lu})])
    sent: list[bytes] = []
    closed: list[bool] = []
    conn = Connection(target, "fuzz", ("127.0.0.1", 3260), lambda parts: sent.append(b"".join(parts)),
                      lambda: closed.append(True))
    return conn, sent, closed


_LOGIN = P.LoginRequest(
    isid=0x400000000001, tsih=0, itt=1, cid=0, cmdsn=0, exp_statsn=0, csg=1, nsg=3, transit=True,
    data=b"InitiatorName=iqn.x:fuzz\0TargetName=" + TARGET.encode() + b"\0SessionType=Normal\0",
).encode()

_VALID = [
    P.NopOut(itt=2, cmdsn=0).encode(),
    P.ScsiCommand(itt=3, lun=0, cdb=bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), cmdsn=0, expected_length=512, read=True).encode(),
    P.ScsiCommand(itt=4, lun=0, cdb=bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), cmdsn=1, expected_length=512, write=True).encode(),
    P.DataOut(itt=4, ttt=1, datasn=0, offset=0, data=bytes(512)).encode(),
    P.TaskMgmtRequest(itt=5, function=1, cmdsn=2).encode(),
    P.TextRequest(itt=6, cmdsn=2, data=b"SendTargets=All\0").encode(),
]


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=120),
            st.sampled_from(_VALID),
            st.builds(lambda v, i, b: v[:i] + bytes([b]) + v[i + 1 :], st.sampled_from(_VALID),
                      st.integers(0, 47), st.integers(0, 255)),
        ),
        max_size=8,
    ),
    cut=st.integers(1, 64),
    login=st.booleans(),
)
def test_sans_io_connection_survives_any_bytes(chunks, cut, login):
    conn, sent, closed = _sans_io_connection()
    stream = (_LOGIN if login else b"") + b"".join(chunks)
    for i in range(0, len(stream), cut):
        conn.data_received(stream[i : i + cut])
    # whatever happened, what we sent frames as valid PDUs
    P.frame_all(b"".join(sent), max_data_length=1 << 24)


@run_async
async def test_text_requests_malformed_and_continued():
    target, node, lu, host, port = await make_target()
    try:
        c = await _logged_in(host, port)
        c.send_pdu(P.TextRequest(itt=c.next_itt(), cmdsn=c.cmdsn, data=b"no-equals-sign\0"))
        c.cmdsn += 1
        assert (await c.recv()).reason == P.RejectReason.INVALID_PDU_FIELD
        c.send_pdu(P.TextRequest(itt=c.next_itt(), cmdsn=c.cmdsn, final=False, cont=True, data=b"SendTarg"))
        c.cmdsn += 1
        ack = await c.recv()
        assert isinstance(ack, P.TextResponse) and not ack.final and ack.data == b""
        c.send_pdu(P.TextRequest(itt=c.itt, cmdsn=c.cmdsn, data=b"ets=All\0MaxBurstLength=512\0X-foo=1\0"))
        c.cmdsn += 1
        from prmigrate.iscsi.login import decode_text

        pairs = decode_text((await c.recv()).data)
        assert ("TargetName", TARGET) in pairs
        assert ("MaxBurstLength", "Reject") in pairs and ("X-foo", "NotUnderstood") in pairs
    finally:
        await target.close()
