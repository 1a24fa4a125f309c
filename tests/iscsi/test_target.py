"""The asyncio target against a raw PDU client: login, data path, TMF,
sessions, async LU results, CHAP, ACL, redirection, discovery."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest

from prmigrate.iscsi import pdu as P
from prmigrate.iscsi.login import decode_text
from prmigrate.iscsi.session import ChapConfig, TargetSettings
from prmigrate.lun.types import Result
from prmigrate.scsi.constants import Status

from ._target_helpers import ASYNC_OP, INITIATOR, TARGET, Client, make_target


def run_async(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        return asyncio.run(asyncio.wait_for(fn(*a, **kw), 30))

    return wrapper


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


@run_async
async def test_login_and_read_write_round_trip():
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        rsp = await c.login()
        assert rsp.status == 0 and rsp.tsih != 0
        assert ("TargetPortalGroupTag", "1") in decode_text(rsp.data)
        assert rsp.maxcmdsn - rsp.expcmdsn + 1 >= 64
        payload = bytes(range(256)) * 800  # 204800 bytes: immediate + R2T bursts
        payload = payload[: 400 * 512]
        final, _ = await c.command(write10(10, 400), data_out=payload)
        assert final.status == 0
        assert lu.data[10 * 512 : 410 * 512] == payload
        final, data = await c.command(read10(10, 400), edtl=400 * 512, read=True)
        assert isinstance(final, P.DataIn) and final.status == 0  # phase collapse
        assert data == payload
        assert [s.nexus.initiator for s in target.sessions(TARGET)] == [INITIATOR.lower()]
        await c.close()
    finally:
        await target.close()
    assert lu.lost and lu.lost[0].initiator == INITIATOR.lower()


@run_async
async def test_data_in_split_at_peer_mrdsl_and_residuals():
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login()  # we declared MaxRecvDataSegmentLength=8192
        itt = c.next_itt()
        c.send_pdu(P.ScsiCommand(itt=itt, lun=0, cdb=read10(0, 64), cmdsn=c.cmdsn, expected_length=64 * 512, read=True))
        c.cmdsn += 1
        pdus = [await c.recv() for _ in range(4)]
        assert [p.datasn for p in pdus] == [0, 1, 2, 3]
        assert all(len(p.data) == 8192 for p in pdus)
        assert pdus[-1].status == 0 and pdus[-1].final and pdus[0].status is None
        # underflow: EDTL larger than the data
        final, data = await c.command(read10(0, 1), edtl=4096, read=True)
        assert final.flags & P.ResponseFlags.UNDERFLOW and final.residual == 4096 - 512
        # overflow: EDTL smaller than the data
        final, data = await c.command(read10(0, 2), edtl=512, read=True)
        assert final.flags & P.ResponseFlags.OVERFLOW and final.residual == 512 and len(data) == 512
        # check condition: SCSI Response with sense, no phase collapse
        final, _ = await c.command(read10(1 << 30, 1), edtl=512, read=True)
        assert isinstance(final, P.ScsiResponse) and final.status == Status.CHECK_CONDITION
        assert final.sense[2] & 0x0F == 5
        await c.close()
    finally:
        await target.close()


@run_async
async def test_write_residuals_follow_scsi_length():
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login()
        lu.data[0:1024] = b"a" * 1024
        final, _ = await c.command(write10(0, 1), data_out=b"b" * 1024)  # EDTL 2 blocks > 1 block
        assert final.status == 0 and final.flags & P.ResponseFlags.UNDERFLOW and final.residual == 512
        assert lu.data[0:1024] == b"b" * 512 + b"a" * 512
        final, _ = await c.command(write10(0, 2), data_out=b"c" * 512)  # EDTL 1 block < 2 blocks
        assert final.status == 0 and final.flags & P.ResponseFlags.OVERFLOW and final.residual == 512
        assert lu.data[0:1024] == b"c" * 512 + b"a" * 512
        await c.close()
    finally:
        await target.close()


@run_async
async def test_write_overflow_beyond_32_bits_saturates_the_residual():
    """A WRITE(16) of 2^32 - 1 blocks with one block of Data-Out: the
    overflow (about 2 TiB) does not fit the 32-bit Residual Count, which
    saturates; the connection stays up (it used to end in an internal
    error, and an initiator re-issuing the command looped)."""
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login()
        write16 = bytes((0x8A, 0)) + (0).to_bytes(8, "big") + (0xFFFFFFFF).to_bytes(4, "big") + bytes(2)
        final, _ = await c.command(write16, data_out=b"z" * 512)  # (this LU has no WRITE(16): 20/00)
        assert isinstance(final, P.ScsiResponse) and final.flags & P.ResponseFlags.OVERFLOW
        assert final.residual == 0xFFFFFFFF
        final, _ = await c.command(write10(1, 1), data_out=b"w" * 512)  # the session goes on
        assert final.status == 0 and not final.flags
        await c.close()
    finally:
        await target.close()


@run_async
async def test_write_atomic_is_never_cut_to_an_overflowing_edtl(tmp_path):
    """WRITE ATOMIC(16) with less Data-Out than its transfer length: the
    LU gets the CDB as sent (not a shorter atomic write of the first
    blocks), refuses the short data, and nothing is written; the response
    still reports the overflow."""
    from prmigrate.iscsi.session import TargetNode
    from prmigrate.iscsi.target import IscsiTarget
    from prmigrate.lun.unit import LogicalUnit

    lu = LogicalUnit(tmp_path / "lu.img", 1 << 20)
    target = IscsiTarget([TargetNode(TARGET, {0: lu})])
    (host, port), *_ = await target.start("127.0.0.1", 0)
    try:
        c = await Client.connect(host, port)
        await c.login()
        atomic = bytes((0x9C, 0)) + (8).to_bytes(8, "big") + bytes(2) + (2).to_bytes(2, "big") + bytes(2)
        final, _ = await c.command(atomic, data_out=b"x" * 512)  # EDTL 1 block < 2 blocks
        assert final.status == Status.CHECK_CONDITION and final.sense[2] & 0x0F == 5  # ILLEGAL REQUEST
        assert final.flags & P.ResponseFlags.OVERFLOW and final.residual == 512
        assert lu.store.read(8 * 512, 1024) == bytes(1024)
        final, _ = await c.command(atomic, data_out=b"y" * 1024)
        assert final.status == 0 and not final.flags
        assert lu.store.read(8 * 512, 1024) == b"y" * 1024
        await c.close()
    finally:
        await target.close()


@run_async
async def test_digests_and_nop():
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        c.hd = c.dd = True
        rsp = await c.login()
        assert rsp.status == 0 and c.hd
        c.send_pdu(P.NopOut(itt=77, cmdsn=c.cmdsn, data=b"ping!"))
        nop = await c.recv()
        assert isinstance(nop, P.NopIn) and nop.itt == 77 and nop.data == b"ping!"
        final, data = await c.command(read10(0, 20), edtl=20 * 512, read=True)
        assert final.status == 0 and len(data) == 20 * 512
        await c.close()
    finally:
        await target.close()


@run_async
async def test_cmdsn_window_drops_and_reorders():
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        rsp = await c.login()
        exp = rsp.expcmdsn
        # beyond MaxCmdSN: dropped silently
        c.send_pdu(P.NopOut(itt=1, cmdsn=rsp.maxcmdsn + 1, immediate=False))
        # below ExpCmdSN: dropped silently
        c.send_pdu(P.NopOut(itt=2, cmdsn=(exp - 1) & 0xFFFFFFFF, immediate=False))
        # out of order within the window: answered in CmdSN order
        c.send_pdu(P.NopOut(itt=4, cmdsn=exp + 1, immediate=False))
        c.send_pdu(P.NopOut(itt=3, cmdsn=exp, immediate=False))
        a, b = await c.recv(), await c.recv()
        assert (a.itt, b.itt) == (3, 4)
        assert b.expcmdsn == exp + 2
        await c.close()
    finally:
        await target.close()


@run_async
async def test_future_result_does_not_block_and_dropped_when_gone():
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login()
        itt = c.next_itt()
        c.send_pdu(P.ScsiCommand(itt=itt, lun=0, cdb=bytes([ASYNC_OP]) + bytes(5), cmdsn=c.cmdsn, expected_length=4, read=True))
        c.cmdsn += 1
        final, _ = await c.command(bytes(6))  # TUR answered while the first is pending
        assert final.status == 0
        assert final.maxcmdsn - final.expcmdsn + 1 == 127  # the pending command holds a slot
        assert len(lu.futures) == 1
        lu.futures[0].set_result(Result(Status.GOOD, b"WXYZ"))
        done = await c.recv()
        assert isinstance(done, P.DataIn) and done.itt == itt and done.data == b"WXYZ"
        # pending while the connection goes away: the result is dropped
        c.send_pdu(P.ScsiCommand(itt=c.next_itt(), lun=0, cdb=bytes([ASYNC_OP]) + bytes(5), cmdsn=c.cmdsn, expected_length=4, read=True))
        c.cmdsn += 1
        await asyncio.sleep(0.1)
        await c.close()
        await asyncio.sleep(0.1)
        lu.futures[1].set_result(Result(Status.GOOD, b"late"))
        await asyncio.sleep(0.05)
        c2 = await Client.connect(host, port)
        assert (await c2.login(isid=0x400000000009)).status == 0
        await c2.close()
    finally:
        await target.close()


@run_async
async def test_task_management():
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login()
        nexus = target.sessions(TARGET)[0].nexus
        for fn in (P.TmfFunction.LOGICAL_UNIT_RESET, P.TmfFunction.CLEAR_TASK_SET,
                   P.TmfFunction.TARGET_WARM_RESET, P.TmfFunction.ABORT_TASK_SET):
            c.send_pdu(P.TaskMgmtRequest(itt=c.next_itt(), function=fn, cmdsn=c.cmdsn, lun=0))
            rsp = await c.recv()
            assert isinstance(rsp, P.TaskMgmtResponse) and rsp.response == P.TmfResponse.FUNCTION_COMPLETE
        assert lu.resets == [(nexus, False, False), (nexus, False, True)]
        assert lu.cleared == [nexus]
        # abort of a task that completed: does not exist
        final, _ = await c.command(bytes(6))
        c.send_pdu(P.TaskMgmtRequest(itt=c.next_itt(), function=P.TmfFunction.ABORT_TASK, cmdsn=c.cmdsn,
                                     referenced_itt=c.itt - 1, ref_cmdsn=c.cmdsn - 1))
        rsp = await c.recv()
        assert rsp.response == P.TmfResponse.TASK_DOES_NOT_EXIST
        # abort of a pending async task: complete, and its result is never sent
        itt = c.next_itt()
        c.send_pdu(P.ScsiCommand(itt=itt, lun=0, cdb=bytes([ASYNC_OP]) + bytes(5), cmdsn=c.cmdsn, expected_length=4, read=True))
        c.cmdsn += 1
        c.send_pdu(P.TaskMgmtRequest(itt=c.next_itt(), function=P.TmfFunction.ABORT_TASK, cmdsn=c.cmdsn,
                                     referenced_itt=itt, ref_cmdsn=c.cmdsn - 1))
        rsp = await c.recv()
        assert rsp.response == P.TmfResponse.FUNCTION_COMPLETE
        lu.futures[-1].set_result(Result(Status.GOOD, b"gone"))
        c.send_pdu(P.NopOut(itt=999, cmdsn=c.cmdsn))
        assert (await c.recv()).itt == 999
        # wrong LUN
        c.send_pdu(P.TaskMgmtRequest(itt=c.next_itt(), function=P.TmfFunction.LOGICAL_UNIT_RESET, cmdsn=c.cmdsn, lun=5))
        assert (await c.recv()).response == P.TmfResponse.LUN_DOES_NOT_EXIST
        # cold reset: answered, then every session of the node is dropped
        c.send_pdu(P.TaskMgmtRequest(itt=c.next_itt(), function=P.TmfFunction.TARGET_COLD_RESET, cmdsn=c.cmdsn))
        assert (await c.recv()).response == P.TmfResponse.FUNCTION_COMPLETE
        assert await c.closed()
        assert lu.resets[-1] == (nexus, True, True)
    finally:
        await target.close()


@run_async
async def test_reinstatement_keeps_nexus_and_logout_ends_it():
    target, node, lu, host, port = await make_target()
    try:
        c1 = await Client.connect(host, port)
        await c1.login(isid=0x400000000042)
        c2 = await Client.connect(host, port)
        rsp = await c2.login(isid=0x400000000042)
        assert rsp.status == 0
        assert await c1.closed()
        await asyncio.sleep(0.05)
        assert lu.lost == []  # the nexus continues in the new session
        assert len(target.sessions(TARGET)) == 1
        c2.send_pdu(P.LogoutRequest(itt=c2.next_itt(), reason=P.LogoutReason.CLOSE_SESSION, cmdsn=c2.cmdsn))
        rsp = await c2.recv()
        assert isinstance(rsp, P.LogoutResponse) and rsp.response == 0 and rsp.time2wait == 2
        assert await c2.closed()
        await asyncio.sleep(0.05)
        assert len(lu.lost) == 1 and lu.lost[0].isid == 0x400000000042
        assert target.sessions(TARGET) == []
    finally:
        await target.close()


@run_async
async def test_request_logout_and_drop_sessions():
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login()
        assert target.request_logout(TARGET, wait=3) == 1
        msg = await c.recv()
        assert isinstance(msg, P.AsyncMessage) and msg.event == P.AsyncEvent.LOGOUT_REQUEST and msg.parameter3 == 3
        assert target.request_logout(TARGET, wait=0, enforce=True) == 1
        assert isinstance(await c.recv(), P.AsyncMessage)
        assert await c.closed(timeout=3)  # not logged out in time: dropped
        c = await Client.connect(host, port)
        await c.login()
        assert target.drop_sessions(TARGET, initiator="iqn.other") == 0
        assert target.drop_sessions(TARGET, initiator=INITIATOR.upper()) == 1
        assert await c.closed()
        assert len(lu.lost) == 2
    finally:
        await target.close()


@run_async
async def test_request_logout_with_time2wait_adds_event_3():
    """Event 1 (log out now), then event 3 with Parameter2 = Time2Wait and
    Parameter3 = DefaultTime2Retain: the initiator may log in again at once
    (open-iscsi otherwise waits the negotiated DefaultTime2Wait); its logout
    is answered as usual and the connection ends."""
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login()
        assert target.request_logout(TARGET, wait=0, time2wait=0) == 1
        first, second = await c.recv(), await c.recv()
        assert isinstance(first, P.AsyncMessage) and first.event == P.AsyncEvent.LOGOUT_REQUEST
        assert first.parameter3 == 0
        assert isinstance(second, P.AsyncMessage) and second.event == P.AsyncEvent.SESSION_DROP
        assert (second.parameter2, second.parameter3) == (0, target.settings.default_time2retain)
        assert second.statsn == first.statsn + 1
        c.send_pdu(P.LogoutRequest(itt=c.next_itt(), reason=P.LogoutReason.CLOSE_SESSION, cmdsn=c.cmdsn))
        rsp = await c.recv()
        assert isinstance(rsp, P.LogoutResponse) and rsp.response == 0
        assert await c.closed()
    finally:
        await target.close()


@pytest.mark.parametrize("mutual", [False, True])
@run_async
async def test_chap(mutual):
    chap = ChapConfig("alice", "alice-secret1", "tgt" if mutual else None, "target-secret" if mutual else None)
    target, node, lu, host, port = await make_target({"chap": chap})
    try:
        c = await Client.connect(host, port)
        rsp = await c.login(chap=("alice", "alice-secret1"), mutual=("tgt", "target-secret") if mutual else None)
        assert rsp.status == 0
        await c.close()
        bad = await Client.connect(host, port)
        rsp = await bad.login(chap=("alice", "wrong-secret!"), isid=0x400000000002)
        assert rsp.status == P.LoginStatus.AUTHENTICATION_FAILURE
        assert await bad.closed()
        none = await Client.connect(host, port)
        rsp = await none.login(isid=0x400000000003)  # straight to operational stage
        assert rsp.status == P.LoginStatus.AUTHENTICATION_FAILURE
    finally:
        await target.close()


@run_async
async def test_acl_redirect_unknown_target_and_discovery(caplog):
    caplog.set_level(logging.INFO, "prmigrate.iscsi.target")
    target, node, lu, host, port = await make_target({"acl": {"iqn.2026-11.org.prmigrate:Client"}})
    try:
        c = await Client.connect(host, port)
        assert (await c.login()).status == 0  # ACL compares case-insensitively
        other = await Client.connect(host, port)
        assert (await other.login(initiator="iqn.x:intruder")).status == P.LoginStatus.AUTHORIZATION_FAILURE
        unknown = await Client.connect(host, port)
        assert (await unknown.login(target="iqn.x:nope")).status == P.LoginStatus.NOT_FOUND
        disc = await Client.connect(host, port)
        assert (await disc.login(target=None)).status == 0
        disc.send_pdu(P.TextRequest(itt=disc.next_itt(), cmdsn=disc.cmdsn, data=b"SendTargets=All\0"))
        rsp = await disc.recv()
        pairs = decode_text(rsp.data)
        assert ("TargetName", TARGET) in pairs
        assert ("TargetAddress", f"{host}:{port},1") in pairs
        node.redirect = ("127.0.0.3", 3261, 2)
        moved = await Client.connect(host, port)
        rsp = await moved.login(isid=0x400000000005)
        assert rsp.status == P.LoginStatus.TARGET_MOVED_TEMPORARILY
        assert ("TargetAddress", "127.0.0.3:3261,2") in decode_text(rsp.data)
        assert await moved.closed()
    finally:
        await target.close()
    text = caplog.text
    assert "login to" in text and "AUTHORIZATION_FAILURE" in text and "TARGET_MOVED_TEMPORARILY" in text


@run_async
async def test_unsolicited_data_out_with_initial_r2t_no():
    target, node, lu, host, port = await make_target(settings=TargetSettings(initial_r2t=False))
    try:
        c = await Client.connect(host, port)
        rsp = await c.login(keys=[("InitialR2T", "No"), ("ImmediateData", "No"), ("FirstBurstLength", "16384")])
        assert ("InitialR2T", "No") in decode_text(rsp.data)
        payload = bytes(range(256)) * 256  # 64 KiB: 16 KiB unsolicited, then R2Ts
        final, _ = await c.command(write10(0, 128), data_out=payload, immediate_data=False, unsolicited=16384)
        assert final.status == 0 and lu.data[: len(payload)] == payload
        await c.close()
    finally:
        await target.close()


@run_async
async def test_keepalive_nop_in():
    target, node, lu, host, port = await make_target(keepalive=0.1)
    try:
        c = await Client.connect(host, port)
        await c.login()
        nop = await c.recv(timeout=2)
        assert isinstance(nop, P.NopIn) and nop.itt == P.RESERVED_TAG and nop.ttt != P.RESERVED_TAG
        c.send_pdu(P.NopOut(itt=P.RESERVED_TAG, cmdsn=c.cmdsn, ttt=nop.ttt))
        nop2 = await c.recv(timeout=2)
        assert isinstance(nop2, P.NopIn)
        assert await c.closed(timeout=3)  # second ping not answered
    finally:
        await target.close()


@run_async
async def test_writes_announcing_large_data_cost_no_memory_until_it_comes():
    """Eight WRITEs each announcing 64 MiB (the most a task may carry) and
    sending no data: the target allocates nothing for them (a write task's
    buffer grows with its Data-Out), and the session keeps answering."""
    import tracemalloc

    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login()
        tracemalloc.start()
        try:
            for _ in range(8):
                c.send_pdu(P.ScsiCommand(itt=c.next_itt(), lun=0, cdb=write10(0, 128), cmdsn=c.cmdsn,
                                         exp_statsn=c.statsn, expected_length=64 << 20, write=True))
                c.cmdsn += 1
            tur = c.next_itt()
            c.send_pdu(P.ScsiCommand(itt=tur, lun=0, cdb=bytes(6), cmdsn=c.cmdsn, exp_statsn=c.statsn))
            c.cmdsn += 1
            r2ts = 0
            while True:
                pdu = await c.recv()
                if isinstance(pdu, P.R2T):
                    r2ts += 1
                    continue
                assert isinstance(pdu, P.ScsiResponse) and pdu.itt == tur and pdu.status == 0
                break
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r2ts >= 8  # each write was taken and asked for its data
        assert peak < 16 << 20, peak  # not 8 x 64 MiB
        await c.close()
    finally:
        await target.close()


@run_async
async def test_write_bursts_answered_in_reverse_order_land_whole():
    """Data-Out for a later R2T first: the growing task buffer keeps a gap
    for the earlier burst and the write lands byte for byte."""
    target, node, lu, host, port = await make_target()
    try:
        c = await Client.connect(host, port)
        await c.login(keys=[("ImmediateData", "No"), ("MaxBurstLength", "16384"), ("MaxOutstandingR2T", "4")])
        payload = bytes(range(256)) * 256  # 64 KiB: four 16 KiB bursts
        itt = c.next_itt()
        c.send_pdu(P.ScsiCommand(itt=itt, lun=0, cdb=write10(8, 128), cmdsn=c.cmdsn, exp_statsn=c.statsn,
                                 expected_length=len(payload), write=True))
        c.cmdsn += 1
        r2ts = [await c.recv() for _ in range(4)]
        assert all(isinstance(r, P.R2T) for r in r2ts), r2ts
        for r in reversed(r2ts):
            chunk = payload[r.offset : r.offset + r.length]
            for i, off in enumerate(range(0, len(chunk), 8192)):
                c.send_pdu(P.DataOut(itt=itt, ttt=r.ttt, datasn=i, offset=r.offset + off,
                                     data=chunk[off : off + 8192], final=off + 8192 >= len(chunk), lun=0))
        rsp = await c.recv()
        assert isinstance(rsp, P.ScsiResponse) and rsp.status == 0
        assert lu.data[8 * 512 : 8 * 512 + len(payload)] == payload
        await c.close()
    finally:
        await target.close()
