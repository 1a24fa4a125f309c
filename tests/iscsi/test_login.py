"""Login text codec, negotiation table, stage machine and CHAP (RFC 7143 6, 12, 13)."""

from __future__ import annotations

import hashlib

import pytest

from prmigrate.iscsi.chap import (
    ChapAuthenticator,
    ChapClient,
    ChapCredentials,
    chap_md5,
    decode_binary,
    encode_binary,
)
from prmigrate.iscsi.login import (
    KEYS,
    Kind,
    LoginError,
    LoginStages,
    Negotiation,
    Role,
    Stage,
    TextAccumulator,
    decode_text,
    encode_text,
)
from prmigrate.iscsi.pdu import LoginStatus

# -- text codec ---------------------------------------------------------------

TEXT_GOLDEN = [
    ([("InitiatorName", "iqn.2026-11.org.x:i1"), ("SessionType", "Normal")],
     b"InitiatorName=iqn.2026-11.org.x:i1\0SessionType=Normal\0"),
    ([("HeaderDigest", "CRC32C,None"), ("MaxBurstLength", "262144")],
     b"HeaderDigest=CRC32C,None\0MaxBurstLength=262144\0"),
    ([("X-com.example.key", "a=b")], b"X-com.example.key=a=b\0"),
    ([], b""),
]


@pytest.mark.parametrize(("pairs", "wire"), TEXT_GOLDEN)
def test_text_golden(pairs, wire):
    assert encode_text(pairs) == wire
    assert decode_text(wire) == pairs


def test_text_typed_values_use_table_format():
    assert encode_text([("InitialR2T", False), ("MaxConnections", 1)]) == b"InitialR2T=No\0MaxConnections=1\0"


@pytest.mark.parametrize("bad", [b"novalue\0", b"=x\0", b"\xff\xfe=1\0", b"K" * 64 + b"=1\0", b"TargetAlias=" + b"a" * 256 + b"\0"])
def test_text_malformed(bad):
    with pytest.raises(LoginError) as ei:
        decode_text(bad)
    assert ei.value.status == LoginStatus.INITIATOR_ERROR


def test_text_accumulator_joins_split_pairs():
    wire = b"InitiatorName=iqn.x\0TargetName=iqn.y\0"
    for cut in range(1, len(wire)):
        acc = TextAccumulator()
        assert acc.add(wire[:cut], more=True) is None
        assert acc.add(wire[cut:], more=False) == [("InitiatorName", "iqn.x"), ("TargetName", "iqn.y")]


def test_text_accumulator_limit():
    acc = TextAccumulator(limit=100)
    with pytest.raises(LoginError):
        for _ in range(10):
            acc.add(b"A=" + b"b" * 20 + b"\0", more=True)


# -- key table ------------------------------------------------------------------


def test_table_defaults_rfc7143():
    d = {k: s.default for k, s in KEYS.items()}
    assert d["InitialR2T"] is True and KEYS["InitialR2T"].kind is Kind.OR
    assert d["ImmediateData"] is True and KEYS["ImmediateData"].kind is Kind.AND
    assert d["MaxRecvDataSegmentLength"] == 8192 and KEYS["MaxRecvDataSegmentLength"].kind is Kind.DECLARATIVE
    assert d["MaxBurstLength"] == 262144 and d["FirstBurstLength"] == 65536
    assert d["DefaultTime2Wait"] == 2 and KEYS["DefaultTime2Wait"].kind is Kind.MAX
    assert d["DefaultTime2Retain"] == 20 and d["MaxOutstandingR2T"] == 1
    assert d["ErrorRecoveryLevel"] == 0 and d["MaxConnections"] == 1


# -- negotiation -----------------------------------------------------------------

# (key, target local value, initiator offer, expected answer)
NEGOTIATION = [
    ("InitialR2T", False, "No", "No"),
    ("InitialR2T", False, "Yes", "Yes"),
    ("InitialR2T", True, "No", "Yes"),
    ("ImmediateData", True, "No", "No"),
    ("ImmediateData", False, "Yes", "No"),
    ("MaxBurstLength", 262144, "1048576", "262144"),
    ("MaxBurstLength", 262144, "4096", "4096"),
    ("FirstBurstLength", 65536, "0x1000", "4096"),
    ("DefaultTime2Wait", 2, "0", "2"),
    ("DefaultTime2Retain", 20, "0", "0"),
    ("MaxOutstandingR2T", 16, "1", "1"),
    ("ErrorRecoveryLevel", 0, "2", "0"),
    ("HeaderDigest", ("CRC32C", "None"), "None,CRC32C", "None"),
    ("HeaderDigest", ("CRC32C", "None"), "CRC32C,None", "CRC32C"),
    ("DataDigest", ("None",), "CRC32C", "Reject"),
    ("MaxBurstLength", 262144, "1", "Reject"),
    ("MaxBurstLength", 262144, "many", "Reject"),
    ("InitialR2T", True, "Maybe", "Reject"),
    ("X-vendor-key", None, "1", "NotUnderstood"),
]


@pytest.mark.parametrize(("key", "mine", "offer", "answer"), NEGOTIATION)
def test_target_answers(key, mine, offer, answer):
    local = {key: mine} if mine is not None else {}
    t = Negotiation(Role.TARGET, local)
    assert t.receive([(key, offer)], Stage.OPERATIONAL) == [(key, answer)]


def test_both_roles_agree():
    t = Negotiation(Role.TARGET, {"HeaderDigest": ("CRC32C", "None"), "MaxRecvDataSegmentLength": 262144,
                                  "InitialR2T": False, "MaxOutstandingR2T": 8})
    i = Negotiation(Role.INITIATOR, {"HeaderDigest": "CRC32C,None", "MaxBurstLength": 1 << 20,
                                     "FirstBurstLength": 1 << 20, "InitialR2T": False,
                                     "MaxOutstandingR2T": 4})
    offer = i.offer(["HeaderDigest", "DataDigest", "InitialR2T", "ImmediateData", "MaxBurstLength",
                     "FirstBurstLength", "MaxOutstandingR2T", "MaxRecvDataSegmentLength"])
    answer = t.receive(offer, Stage.OPERATIONAL)
    assert ("MaxRecvDataSegmentLength", "262144") in answer
    assert i.receive(answer, Stage.OPERATIONAL) == []
    assert not i.pending
    pi, pt = i.params(), t.params()
    assert pi.header_digest and pt.header_digest and not pi.data_digest
    assert pi.max_xmit_data_segment_length == 262144 and pt.max_xmit_data_segment_length == 8192
    assert pt.max_recv_data_segment_length == 262144
    assert pi.max_burst_length == pt.max_burst_length == 262144
    assert pi.first_burst_length == pt.first_burst_length == 65536  # the target's limit
    assert pi.initial_r2t is pt.initial_r2t is False
    assert pi.max_outstanding_r2t == pt.max_outstanding_r2t == 4


def test_initiator_rejects_contradicting_answer():
    i = Negotiation(Role.INITIATOR, {"MaxBurstLength": 4096})
    i.offer(["MaxBurstLength", "ImmediateData"])
    with pytest.raises(LoginError):
        i.receive([("MaxBurstLength", "8192")], Stage.OPERATIONAL)
    i2 = Negotiation(Role.INITIATOR, {"ImmediateData": False})
    i2.offer(["ImmediateData"])
    with pytest.raises(LoginError):
        i2.receive([("ImmediateData", "Yes")], Stage.OPERATIONAL)


def test_key_offered_twice_fails():
    t = Negotiation(Role.TARGET)
    t.receive([("MaxBurstLength", "4096")], Stage.OPERATIONAL)
    with pytest.raises(LoginError):
        t.receive([("MaxBurstLength", "4096")], Stage.OPERATIONAL)


def test_keys_out_of_phase():
    t = Negotiation(Role.TARGET)
    assert t.receive([("AuthMethod", "None")], Stage.OPERATIONAL) == [("AuthMethod", "Reject")]
    assert t.receive([("SendTargets", "All")], Stage.OPERATIONAL) == [("SendTargets", "Reject")]
    with pytest.raises(LoginError):
        t.receive([("TargetAlias", "x")], Stage.OPERATIONAL)  # only a target sends it


def test_declarations_recorded():
    t = Negotiation(Role.TARGET)
    t.receive([("InitiatorName", "iqn.a"), ("SessionType", "Discovery")], Stage.SECURITY)
    assert t.declared == {"InitiatorName": "iqn.a", "SessionType": "Discovery"}
    with pytest.raises(LoginError):
        Negotiation(Role.TARGET).receive([("SessionType", "Weird")], Stage.SECURITY)


# -- stages ------------------------------------------------------------------------


def test_stages_security_operational_full():
    s = LoginStages()
    s.request(0, 1, True)
    assert s.respond(True) == (Stage.SECURITY, Stage.OPERATIONAL, True)
    s.request(1, 3, True)
    assert s.respond(True) == (Stage.OPERATIONAL, Stage.FULL_FEATURE, True)
    assert s.complete


def test_stages_target_holds_back():
    s = LoginStages()
    s.request(0, 3, True)
    assert s.respond(False) == (Stage.SECURITY, Stage.SECURITY, False)
    s.request(0, 3, True)
    assert s.respond(True)[2] and s.complete


@pytest.mark.parametrize(
    ("requests", "bad"),
    [
        ([(3, 3, True, False)], "start in full feature"),
        ([(2, 3, True, False)], "reserved CSG"),
        ([(1, 0, True, False)], "back to security"),
        ([(1, 1, True, False)], "transit to same stage"),
        ([(0, 1, True, True)], "T and C"),
        ([(0, 1, False, False), (1, 3, True, False)], "CSG jumps without transit"),
    ],
)
def test_stage_errors(requests, bad):
    s = LoginStages()
    with pytest.raises(LoginError):
        for csg, nsg, t, c in requests:
            s.request(csg, nsg, t, c)
            s.respond(True)


def test_first_burst_capped_by_max_burst():
    t = Negotiation(Role.TARGET, {"FirstBurstLength": 1 << 20})
    t.receive([("FirstBurstLength", "1048576"), ("MaxBurstLength", "65536")], Stage.OPERATIONAL)
    assert t.params().first_burst_length == 65536


def test_initiator_stage_checks():
    s = LoginStages()
    s.offered(Stage.SECURITY, Stage.OPERATIONAL)
    with pytest.raises(LoginError):
        s.response(0, 3, True)  # target skipped past the requested stage
    s = LoginStages()
    s.offered(Stage.OPERATIONAL, Stage.FULL_FEATURE)
    s.response(1, 3, True)
    assert s.complete


# -- CHAP ---------------------------------------------------------------------------


def _counter():
    n = iter(range(1, 1 << 16))
    return lambda k: bytes(next(n) & 0xFF for _ in range(k))


def test_chap_md5_definition():
    assert chap_md5(7, b"secret", b"\x01\x02") == hashlib.md5(b"\x07secret\x01\x02").digest()


def test_binary_encodings():
    assert encode_binary(b"\x01\xab") == "0x01ab"
    assert decode_binary("0x01AB") == b"\x01\xab"
    assert decode_binary("0xabc") == b"\x0a\xbc"
    assert decode_binary("0bAas=") == b"\x01\xab"
    for bad in ("01ab", "0xzz", "0b***"):
        with pytest.raises(ValueError):
            decode_binary(bad)


def test_chap_one_way_golden():
    target = ChapAuthenticator({"alice": b"alicesecret12"}, random=_counter())
    client = ChapClient(ChapCredentials.make("alice", "alicesecret12"))
    challenge = target.step(dict(client.start()))
    assert challenge == [("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0x" + bytes(range(2, 18)).hex())]
    reply = client.step(dict(challenge))
    expected = hashlib.md5(b"\x01alicesecret12" + bytes(range(2, 18))).hexdigest()
    assert reply == [("CHAP_N", "alice"), ("CHAP_R", "0x" + expected)]
    assert target.step(dict(reply)) == [] and target.done and target.user == "alice"
    assert client.done


def test_chap_mutual():
    target = ChapAuthenticator({"alice": b"alicesecret12"}, mutual=ChapCredentials.make("tgt", "targetsecret1"))
    client = ChapClient(ChapCredentials.make("alice", "alicesecret12"),
                        mutual=ChapCredentials.make("tgt", "targetsecret1"))
    reply = client.step(dict(target.step(dict(client.start()))))
    assert {k for k, _ in reply} == {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
    answer = target.step(dict(reply))
    assert [k for k, _ in answer] == ["CHAP_N", "CHAP_R"]
    client.step(dict(answer))
    assert client.done and target.done


def test_chap_failures():
    def run(secret_t, secret_i, mutual_t=None, mutual_i=None):
        target = ChapAuthenticator({"alice": secret_t}, mutual=mutual_t)
        client = ChapClient(ChapCredentials("alice", secret_i), mutual=mutual_i)
        answer = target.step(dict(client.step(dict(target.step(dict(client.start()))))))
        client.step(dict(answer))

    with pytest.raises(LoginError) as ei:
        run(b"right-secret", b"wrong-secret")
    assert ei.value.status == LoginStatus.AUTHENTICATION_FAILURE
    with pytest.raises(LoginError):  # target demands mutual, client does not
        run(b"s" * 12, b"s" * 12, mutual_t=ChapCredentials("t", b"x" * 12))
    with pytest.raises(LoginError):  # client asks mutual, target not configured
        run(b"s" * 12, b"s" * 12, mutual_i=ChapCredentials("t", b"x" * 12))
    with pytest.raises(LoginError):  # target answers with the wrong mutual secret
        run(b"s" * 12, b"s" * 12, mutual_t=ChapCredentials("t", b"x" * 12), mutual_i=ChapCredentials("t", b"y" * 12))


def test_chap_reflection_refused():
    rnd = _counter()
    target = ChapAuthenticator({"alice": b"s" * 12}, mutual=ChapCredentials("t", b"x" * 12), random=rnd)
    ch = dict(target.step({"CHAP_A": "5"}))
    resp = chap_md5(int(ch["CHAP_I"]), b"s" * 12, decode_binary(ch["CHAP_C"]))
    with pytest.raises(LoginError):
        target.step({"CHAP_N": "alice", "CHAP_R": encode_binary(resp), "CHAP_I": "9", "CHAP_C": ch["CHAP_C"]})


def test_chap_algorithm_refused():
    with pytest.raises(LoginError):
        ChapAuthenticator({}).step({"CHAP_A": "6,7"})
