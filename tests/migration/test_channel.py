"""The authenticated channel: handshake, refusal, integrity, replay, framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.migration.channel import (
    Abort,
    Ack,
    Authenticated,
    Channel,
    ChannelState,
    Described,
    MsgType,
    Pull,
    Pulled,
    Resume,
    Role,
    Rollback,
    Setup,
    SetupOk,
    State,
    TakeoverDone,
    Watch,
    decode_payload,
    encode_payload,
)
from prmigrate.migration.errors import (
    AbortReason,
    AuthenticationFailed,
    ChannelClosed,
    ChannelError,
    FrameError,
    IntegrityError,
    ReplayError,
)
from prmigrate.migration.plan import MovePort
from prmigrate.scsi.transport_id import TransportId

SECRET = b"cluster-secret-0123456789"
CN, SN = bytes(range(32)), bytes(range(32, 64))


def pair(client_secret: bytes = SECRET, server_secret: bytes = SECRET) -> tuple[Channel, Channel]:
    return Channel(Role.CLIENT, client_secret, CN, "src-host"), Channel(Role.SERVER, server_secret, SN, "dst-host")


def handshake(c: Channel, s: Channel) -> None:
    c.start()
    assert s.receive_data(c.data_to_send()) == []
    assert c.receive_data(s.data_to_send()) == []
    assert s.receive_data(c.data_to_send()) == [Authenticated("src-host")]
    assert c.receive_data(s.data_to_send()) == [Authenticated("dst-host")]
    assert c.is_open and s.is_open


MESSAGES = [
    Setup("m-1", b"PRMS\x00\x01stream"),
    Setup("m-2", b"PRMS", "qemu"),
    SetupOk({"iqn.g1": 0xAA}, True),
    SetupOk({"iqn.g1": 0xAA}, True, {"iqn.g1": MovePort(TransportId("iqn.2026-12.test:hostb", 0x23D000000042), 2)}),
    State(b"PRMS..."),
    TakeoverDone(1, 850),
    Resume(),
    Rollback(AbortReason.TIMEOUT, "no TAKEOVER_DONE"),
    Abort(AbortReason.PR_TAKEOVER, "conflict", preempted=True),
    Ack(MsgType.RESUME),
    Ack(MsgType.ROLLBACK, preempted=True),
    Watch("vm1", "127.0.0.3:4444"),
    Described(b"PRMS..."),
    Pull(),
    Pulled(True, ""),
    Pulled(False, "destination unreachable"),
]


def test_golden_hello() -> None:
    c, _ = pair()
    c.start()
    assert c.data_to_send() == bytes.fromhex("0000002c" "01" "0001") + CN + b"\x08src-host"


def test_handshake_and_every_message_both_ways() -> None:
    c, s = pair()
    handshake(c, s)
    for m in MESSAGES:
        c.send(m)
        assert s.receive_data(c.data_to_send()) == [m]
        s.send(m)
        assert c.receive_data(s.data_to_send()) == [m]


def test_byte_at_a_time_and_batched() -> None:
    c, s = pair()
    c.start()
    for b in c.data_to_send():
        s.receive_data(bytes([b]))
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    for m in MESSAGES:
        c.send(m)
    wire = c.data_to_send()
    got = []
    for i in range(len(wire)):
        got += s.receive_data(wire[i : i + 1])
    assert got == MESSAGES


def test_client_with_wrong_secret_refused_by_server() -> None:
    c, s = pair(client_secret=b"not-the-secret-xxxxxx")
    c.start()
    s.receive_data(c.data_to_send())
    # The client detects the server's proof does not match its (wrong) secret.
    with pytest.raises(AuthenticationFailed):
        c.receive_data(s.data_to_send())
    assert c.state is ChannelState.CLOSED
    with pytest.raises(ChannelClosed):
        c.send(Resume())


def test_server_refuses_client_proof_made_without_secret() -> None:
    c, s = pair()
    c.start()
    s.receive_data(c.data_to_send())
    s.data_to_send()
    # An attacker cannot compute AUTH; a random proof is refused.
    with pytest.raises(AuthenticationFailed):
        s.receive_data(bytes.fromhex("00000021" "03") + b"\x00" * 32)
    assert s.state is ChannelState.CLOSED


def test_server_with_wrong_secret_gets_no_state() -> None:
    c, s = pair(server_secret=b"impostor-secret-xxxxxxxx")
    c.start()
    s.receive_data(c.data_to_send())
    with pytest.raises(AuthenticationFailed):
        c.receive_data(s.data_to_send())
    with pytest.raises(ChannelClosed):
        c.send(Setup("m", b"state"))


def test_message_before_authentication_refused() -> None:
    c, s = pair()
    c2, s2 = pair()
    handshake(c2, s2)
    c2.send(Setup("m", b"x"))
    with pytest.raises(AuthenticationFailed):
        s.receive_data(c2.data_to_send())
    with pytest.raises(ChannelClosed):
        c.send(Setup("m", b"x"))


def test_tampered_frame() -> None:
    c, s = pair()
    handshake(c, s)
    c.send(State(b"PRMS-state"))
    wire = bytearray(c.data_to_send())
    wire[-40] ^= 0x01
    with pytest.raises(IntegrityError):
        s.receive_data(bytes(wire))
    with pytest.raises(ChannelClosed):
        s.receive_data(b"")


def test_replay_and_reorder() -> None:
    c, s = pair()
    handshake(c, s)
    c.send(Resume())
    first = c.data_to_send()
    s.receive_data(first)
    with pytest.raises(ReplayError):
        s.receive_data(first)
    c2, s2 = pair()
    handshake(c2, s2)
    c2.send(Resume())
    a = c2.data_to_send()
    c2.send(Ack(MsgType.RESUME))
    b = c2.data_to_send()
    with pytest.raises(ReplayError):
        s2.receive_data(b + a)


def test_frame_from_another_session_fails_mac() -> None:
    c1, s1 = pair()
    handshake(c1, s1)
    c2 = Channel(Role.CLIENT, SECRET, bytes(32), "src-host")
    s2 = Channel(Role.SERVER, SECRET, SN, "dst-host")
    handshake(c2, s2)
    c1.send(Resume())
    with pytest.raises(IntegrityError):
        s2.receive_data(c1.data_to_send())


def test_reflected_nonce_refused() -> None:
    s = Channel(Role.SERVER, SECRET, SN, "dst")
    with pytest.raises(AuthenticationFailed):
        s.receive_data(bytes.fromhex("00000024" "01" "0001") + SN + b"\x00")


def test_oversized_and_unknown_frames() -> None:
    s = Channel(Role.SERVER, SECRET, SN, "dst")
    with pytest.raises(FrameError):
        s.receive_data(b"\x00\x01\x00\x00\x01")  # handshake frames are small
    s = Channel(Role.SERVER, SECRET, SN, "dst")
    with pytest.raises(FrameError):
        s.receive_data(b"\x00\x00\x00\x01\x7f")
    s = Channel(Role.SERVER, SECRET, SN, "dst")
    with pytest.raises(FrameError):
        s.receive_data(b"\x00\x00\x00\x01\x03")  # AUTH before HELLO


def test_bad_payloads() -> None:
    with pytest.raises(FrameError):
        decode_payload(MsgType.SETUP, encode_payload(Setup("m", b"x", "bogus")))
    with pytest.raises(FrameError):
        decode_payload(MsgType.SETUP_OK, encode_payload(SetupOk({"g": 0})))
    with pytest.raises(FrameError):
        decode_payload(MsgType.RESUME, encode_payload(Abort()))
    with pytest.raises(FrameError):
        decode_payload(MsgType.ACK, b"\x00\x00\x00\x10{}")
    body = b'{"detail":"","preempted":false,"reason":999}'
    newer = decode_payload(MsgType.ABORT, len(body).to_bytes(4, "big") + body)
    assert isinstance(newer, Abort) and newer.reason is AbortReason.UNSPECIFIED


def test_setup_ok_without_a_move_is_the_same_as_before() -> None:
    """The move field appears only for a REGISTER AND MOVE plan: a SETUP_OK
    without one is byte for byte what a peer without the field sends and
    accepts; with one, it names the destination nexus and its target port."""
    assert encode_payload(SetupOk({"g": 1}, True)) == _payload(b'{"read_full_status":true,"registered":{"g":1}}')
    moved = encode_payload(SetupOk({"g": 1}, True, {"g": MovePort(TransportId("iqn.x:b", 0x23D000000042), 2)}))
    assert moved == _payload(b'{"move":{"g":["iqn.x:b,i,0x23d000000042",2]},"read_full_status":true,"registered":{"g":1}}')
    for bad in (b'{"move":{},"read_full_status":true,"registered":{"g":1}}',
                b'{"move":{"g":["iqn.x:b",2]},"read_full_status":true,"registered":{"g":1}}',
                b'{"move":{"g":["iqn.x:b,i,0x23d000000042",0]},"read_full_status":true,"registered":{"g":1}}',
                b'{"move":[1],"read_full_status":true,"registered":{"g":1}}',
                b'{"extra":1,"read_full_status":true,"registered":{"g":1}}'):
        with pytest.raises(FrameError):
            decode_payload(MsgType.SETUP_OK, _payload(bad))


def _payload(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        Channel(Role.CLIENT, b"short", CN)
    with pytest.raises(ValueError):
        Channel(Role.CLIENT, SECRET, b"x")
    with pytest.raises(ChannelError):
        Channel(Role.SERVER, SECRET, SN).start()


@given(st.binary(max_size=200))
def test_garbage_to_server_is_typed(data: bytes) -> None:
    s = Channel(Role.SERVER, SECRET, SN, "dst")
    try:
        events = s.receive_data(data)
    except ChannelError:
        return
    assert not any(isinstance(e, Authenticated) for e in events)


@given(st.integers(0, 200), st.integers(0, 7))
def test_any_bit_flip_after_auth_is_caught(pos: int, bit: int) -> None:
    c, s = pair()
    handshake(c, s)
    c.send(Setup("m", b"PRMS-state-bytes"))
    wire = bytearray(c.data_to_send())
    wire[pos % len(wire)] ^= 1 << bit
    try:
        events = s.receive_data(bytes(wire))
    except ChannelError:
        return
    assert events == []  # a flipped length field can only make it wait for more
