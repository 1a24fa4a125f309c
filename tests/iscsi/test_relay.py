"""Relayed commands of the initiator core (``InitiatorCore.submit_relay``):
they complete by calling their sink, never by an event, whatever ends them.
The forwarding device's read path depends on every end reaching the sink
exactly once."""

from __future__ import annotations

from typing import Any

from prmigrate.iscsi.initiator_core import (
    CommandDone,
    ConnectionLost,
    InitiatorCore,
    TaskAborted,
    TmfDone,
    UnitAttention,
)
from prmigrate.iscsi.pdu import (
    R2T,
    DataIn,
    DataOut,
    ResponseFlags,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtResponse,
    TmfFunction,
)
from prmigrate.lun.types import Result
from prmigrate.scsi.constants import SenseKey, Status
from prmigrate.scsi.sense import Sense, encode_sense

from .test_initiator import ScriptedTarget, _core, _pdus

READ10 = bytes.fromhex("28000000001000000800") + bytes(6)  # LBA 16, 8 blocks


class Sink:
    def __init__(self) -> None:
        self.data: list[tuple[Any, int, bytes]] = []
        self.results: list[tuple[Any, Any]] = []

    def relay_data(self, token: Any, status: int, data: bytearray) -> None:
        self.data.append((token, status, bytes(data)))

    def relay_result(self, token: Any, result: Any) -> None:
        self.results.append((token, result))


def logged_in(**kw: object) -> InitiatorCore:
    core = _core(**kw)
    ScriptedTarget(core, {"TargetMRDSL": "262144"}).login()
    return core


def sent_command(core: InitiatorCore) -> ScsiCommand:
    (cmd,) = _pdus(core.data_to_send())
    assert isinstance(cmd, ScsiCommand)
    return cmd


def test_single_data_in_goes_to_relay_data_without_event() -> None:
    core = logged_in()
    sink = Sink()
    core.submit_relay(0, READ10, 4096, sink, ("t", 1))
    cmd = sent_command(core)
    assert cmd.read and cmd.expected_length == 4096 and cmd.cdb[:10] == READ10[:10]
    payload = bytes(range(256)) * 16
    wire = DataIn(cmd.itt, 0, 0, payload, True, Status.GOOD, 200, cmd.cmdsn + 1, cmd.cmdsn + 20).encode()
    assert core.receive_data(wire, 0.0) == []
    assert sink.data == [(("t", 1), Status.GOOD, payload)] and not sink.results
    assert core.outstanding == 0


def test_check_condition_goes_to_relay_result_and_unit_attention_still_reported() -> None:
    core = logged_in()
    sink = Sink()
    core.submit_relay(0, READ10, 4096, sink, 7)
    cmd = sent_command(core)
    sense = encode_sense(Sense.POWER_ON_RESET)
    rsp = ScsiResponse(cmd.itt, Status.CHECK_CONDITION, 200, cmd.cmdsn + 1, cmd.cmdsn + 20,
                       data=len(sense).to_bytes(2, "big") + sense)
    events = core.receive_data(rsp.encode(), 0.0)
    assert not any(isinstance(e, CommandDone) for e in events)
    (ua,) = [e for e in events if isinstance(e, UnitAttention)]
    assert ua.sense.key == SenseKey.UNIT_ATTENTION
    ((token, result),) = sink.results
    assert token == 7 and isinstance(result, Result)
    assert result.status == Status.CHECK_CONDITION and result.sense == sense
    assert not sink.data


def test_split_data_in_and_underflow_go_to_relay_result() -> None:
    core = logged_in()
    sink = Sink()
    core.submit_relay(0, READ10, 4096, sink, "a")
    core.submit_relay(0, READ10, 4096, sink, "b")
    a, b = _pdus(core.data_to_send())
    # a: two Data-In PDUs; b: one short Data-In and a SCSI Response with underflow
    wire = (DataIn(a.itt, 0, 0, b"x" * 2048, False).encode()  # type: ignore[attr-defined]
            + DataIn(a.itt, 1, 2048, b"y" * 2048, True, Status.GOOD, 200, 3, 30).encode()  # type: ignore[attr-defined]
            + DataIn(b.itt, 0, 0, b"z" * 512, True).encode()  # type: ignore[attr-defined]
            + ScsiResponse(b.itt, Status.GOOD, 201, 3, 30, flags=ResponseFlags.UNDERFLOW,  # type: ignore[attr-defined]
                           residual=3584).encode())
    assert core.receive_data(wire, 0.0) == []
    got = dict(sink.results)
    assert got["a"].data_in == b"x" * 2048 + b"y" * 2048 and got["a"].status == Status.GOOD
    assert got["b"].data_in == b"z" * 512
    assert not sink.data


def test_abort_and_connection_loss_reach_the_sink() -> None:
    core = logged_in()
    sink = Sink()
    core.submit_relay(0, READ10, 4096, sink, "aborted")
    core.data_to_send()
    h = core.task_management(TmfFunction.LOGICAL_UNIT_RESET, 0)
    (tmf,) = _pdus(core.data_to_send())
    events = core.receive_data(TaskMgmtResponse(tmf.itt, 0, 200, 3, 30).encode(), 0.0)  # type: ignore[attr-defined]
    assert events == [TmfDone(h, 0)]
    ((token, err),) = sink.results
    assert token == "aborted" and isinstance(err, TaskAborted)
    # a command without status is re-issued after a reconnect, then fails
    # through the sink when the session gives up
    sink.results.clear()
    core.submit_relay(0, READ10, 4096, sink, "lost")
    core.data_to_send()
    assert core.connection_lost(retry=True) == []
    assert core.outstanding == 1 and not sink.results
    assert core.fail_all(ConnectionLost("gone")) == []
    ((token, err),) = sink.results
    assert token == "lost" and isinstance(err, ConnectionLost)
    assert core.outstanding == 0


def test_relayed_and_plain_commands_mix() -> None:
    core = logged_in()
    sink = Sink()
    core.submit_relay(0, READ10, 4096, sink, 1)
    h = core.submit(0, READ10, b"", 4096)
    r, p = _pdus(core.data_to_send())
    wire = (DataIn(p.itt, 0, 0, b"p" * 4096, True, Status.GOOD, 200, 3, 30).encode()  # type: ignore[attr-defined]
            + DataIn(r.itt, 0, 0, b"r" * 4096, True, Status.GOOD, 201, 3, 30).encode())  # type: ignore[attr-defined]
    events = core.receive_data(wire, 0.0)
    assert events == [CommandDone(h, Result(Status.GOOD, bytearray(b"p" * 4096), b""))]
    assert sink.data == [(1, Status.GOOD, b"r" * 4096)]


def test_a_command_sent_after_a_reset_is_not_its_victim() -> None:
    """A LOGICAL UNIT RESET ends the commands sent before it; one sent
    after it reaches the target after it and gets its own answer."""
    core = logged_in()
    sink = Sink()
    core.submit_relay(0, READ10, 4096, sink, "before")
    core.data_to_send()
    h = core.task_management(TmfFunction.LOGICAL_UNIT_RESET, 0)
    core.submit_relay(0, READ10, 4096, sink, "after")
    tmf, after = _pdus(core.data_to_send())
    assert core.receive_data(TaskMgmtResponse(tmf.itt, 0, 200, 3, 30).encode(), 0.0) == [TmfDone(h, 0)]  # type: ignore[attr-defined]
    ((token, err),) = sink.results
    assert token == "before" and isinstance(err, TaskAborted)
    assert core.outstanding == 1
    wire = DataIn(after.itt, 0, 0, b"a" * 4096, True, Status.GOOD, 201, 3, 30).encode()  # type: ignore[attr-defined]
    assert core.receive_data(wire, 0.0) == []
    assert sink.data == [("after", Status.GOOD, b"a" * 4096)]


# ---------------------------------------------------------------- relayed writes
WRITE10 = bytes.fromhex("2a000000001000004000") + bytes(6)  # LBA 16, 64 blocks: 32 KiB


def _write_core(answers: dict[str, str] | None = None, **kw: object) -> InitiatorCore:
    """A session whose login allows immediate data (4 KiB PDUs), unsolicited
    Data-Out up to 8 KiB and bursts of 8 KiB, two R2Ts outstanding."""
    core = _core(initial_r2t=False, first_burst_length=8192, max_burst_length=8192, max_outstanding_r2t=2, **kw)
    ScriptedTarget(core, {"TargetMRDSL": "4096", **(answers or {})}).login()
    return core


def test_write_sends_immediate_unsolicited_and_solicited_data_and_ends_without_result() -> None:
    """A relayed 32 KiB write: 4 KiB immediate, the rest of the first burst
    unsolicited, then what each R2T asks for, in the R2Ts' order even when
    they come out of offset order; GOOD ends at ``relay_data``, no event."""
    core = _write_core()
    sink = Sink()
    payload = bytes(range(256)) * 128
    core.submit_relay(0, WRITE10, 0, sink, ("w", 1), data_out=bytearray(payload))
    cmd, unsolicited = _pdus(core.data_to_send())
    assert isinstance(cmd, ScsiCommand) and cmd.write and not cmd.final and cmd.expected_length == len(payload)
    assert cmd.data == payload[:4096]
    assert isinstance(unsolicited, DataOut) and unsolicited.ttt == 0xFFFFFFFF and unsolicited.final
    assert (unsolicited.offset, unsolicited.data) == (4096, payload[4096:8192])
    got = bytearray(len(payload))
    got[:8192] = payload[:8192]
    for ttt, offset in ((7, 24576), (8, 8192), (9, 16384)):  # out of offset order
        wire = R2T(cmd.itt, ttt, ttt - 7, offset, 8192, 0, 2, 30).encode()
        assert core.receive_data(wire, 0.0) == []
        outs = _pdus(core.data_to_send())
        assert [o.ttt for o in outs] == [ttt, ttt] and outs[-1].final  # type: ignore[attr-defined]
        for o in outs:
            assert isinstance(o, DataOut) and offset <= o.offset < offset + 8192
            got[o.offset : o.offset + len(o.data)] = o.data
    assert bytes(got) == payload
    rsp = ScsiResponse(cmd.itt, Status.GOOD, 200, cmd.cmdsn + 1, cmd.cmdsn + 20)
    assert core.receive_data(rsp.encode(), 0.0) == []
    assert sink.data == [(("w", 1), Status.GOOD, b"")] and not sink.results
    assert core.outstanding == 0


def test_write_with_data_digests() -> None:
    core = _write_core({"DataDigest": "CRC32C"}, data_digest=True)
    assert core.params.data_digest
    sink = Sink()
    payload = b"\x5a" * 8192
    core.submit_relay(0, WRITE10[:7] + b"\x00\x10" + WRITE10[9:], 0, sink, "d", data_out=payload)
    cmd, out = _pdus(core.data_to_send(), data_digest=True)  # digests checked while framing
    assert cmd.data + out.data == payload  # type: ignore[attr-defined]
    rsp = ScsiResponse(cmd.itt, Status.GOOD, 200, cmd.cmdsn + 1, cmd.cmdsn + 20)  # type: ignore[attr-defined]
    assert core.receive_data(rsp.encode(data_digest=True), 0.0) == []
    assert sink.data == [("d", Status.GOOD, b"")]


def test_write_check_condition_and_residual_go_to_relay_result() -> None:
    core = _write_core()
    sink = Sink()
    small = WRITE10[:7] + b"\x00\x01" + WRITE10[9:]  # one block
    core.submit_relay(0, small, 0, sink, "cc", data_out=b"x" * 512)
    core.submit_relay(0, small, 0, sink, "res", data_out=b"y" * 512)
    a, b = _pdus(core.data_to_send())
    sense = encode_sense(Sense.LBA_OUT_OF_RANGE)
    wire = (ScsiResponse(a.itt, Status.CHECK_CONDITION, 200, 3, 30,  # type: ignore[attr-defined]
                         data=len(sense).to_bytes(2, "big") + sense).encode()
            + ScsiResponse(b.itt, Status.GOOD, 201, 3, 30, flags=ResponseFlags.UNDERFLOW,  # type: ignore[attr-defined]
                           residual=12).encode())
    assert core.receive_data(wire, 0.0) == []
    got = dict(sink.results)
    assert got["cc"].status == Status.CHECK_CONDITION and got["cc"].sense == sense
    assert got["res"].status == Status.GOOD
    assert not sink.data


def test_write_lost_with_the_connection_is_sent_again_with_its_data_then_fails_through_the_sink() -> None:
    core = _write_core()
    sink = Sink()
    payload = b"\xa5" * 4096
    core.submit_relay(0, WRITE10[:7] + b"\x00\x08" + WRITE10[9:], 0, sink, "lost", data_out=payload)
    core.data_to_send()
    assert core.connection_lost(retry=True) == []
    assert core.outstanding == 1 and not sink.results
    ScriptedTarget(core, {"TargetMRDSL": "4096"}).login()
    (again,) = _pdus(core.data_to_send())
    assert isinstance(again, ScsiCommand) and again.data == payload
    assert core.connection_lost(retry=True) == []
    assert core.fail_all(ConnectionLost("gone")) == []
    ((token, err),) = sink.results
    assert token == "lost" and isinstance(err, ConnectionLost)
    assert not sink.data and core.outstanding == 0
