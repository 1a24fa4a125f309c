"""PR IN/OUT codecs: golden vectors hand-computed from SPC-5 6.16/6.17, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.scsi.constants import VALID_PR_TYPES, PrInAction, PrOutAction, PrType
from prmigrate.scsi.pr import (
    FullStatusEntry,
    PrDecodeError,
    PrInCdb,
    PrLengthError,
    PrOutCdb,
    PrOutParams,
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    RegisterAndMoveParams,
    ReportCapabilities,
    pr_in_cdb,
    pr_out_cdb,
    pr_out_params,
    register_and_move_params,
)
from prmigrate.scsi.transport_id import TransportId

TID = TransportId("iqn.a", 0x23D000000001)
TID_RAW = bytes.fromhex("45000018") + b"iqn.a,i,0x23d000000001" + bytes(2)
TID00 = TransportId("iqn.a")
TID00_RAW = bytes.fromhex("05000014") + b"iqn.a" + bytes(15)
RK = 0x0102030405060708
SARK = 0x1112131415161718


# ------------------------------------------------------------------ CDBs


def test_pr_out_cdb_golden():
    raw = bytes.fromhex("5f 04 03 00 00 00 00 00 18 00")
    cdb = PrOutCdb(PrOutAction.PREEMPT, 0, PrType.EXCLUSIVE_ACCESS, 24)
    assert cdb.encode() == raw
    assert PrOutCdb.decode(raw) == cdb
    assert pr_out_cdb(PrOutAction.PREEMPT, PrType.EXCLUSIVE_ACCESS) == raw


def test_pr_out_cdb_scope_type_and_long_length():
    raw = bytes.fromhex("5f 07 28 00 00 01 02 03 04 00")
    cdb = PrOutCdb.decode(raw)
    assert cdb.action is PrOutAction.REGISTER_AND_MOVE
    assert cdb.scope == 2 and cdb.rtype is PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    assert cdb.param_len == 0x01020304
    assert cdb.encode() == raw


def test_pr_out_cdb_unknown_codes_stay_ints():
    cdb = PrOutCdb.decode(bytes.fromhex("5f 1f 02 00 00 00 00 00 18 00"))
    assert cdb.action == 0x1F and not isinstance(cdb.action, PrOutAction)
    assert cdb.rtype == 2 and not isinstance(cdb.rtype, PrType)


def test_pr_in_cdb_golden():
    raw = bytes.fromhex("5e 03 00 00 00 00 00 12 34 00")
    assert PrInCdb(PrInAction.READ_FULL_STATUS, 0x1234).encode() == raw
    assert PrInCdb.decode(raw) == PrInCdb(PrInAction.READ_FULL_STATUS, 0x1234)
    assert pr_in_cdb(PrInAction.READ_FULL_STATUS, 0x1234) == raw


@pytest.mark.parametrize(
    "raw",
    [b"", bytes.fromhex("5f 00 00 00 00 00 00 00 18"), bytes.fromhex("5e000000000000001000")],
)
def test_pr_out_cdb_bad(raw):
    with pytest.raises(PrDecodeError):
        PrOutCdb.decode(raw)


def test_pr_in_cdb_bad():
    with pytest.raises(PrLengthError):
        PrInCdb.decode(b"\x5e\x00")
    with pytest.raises(PrDecodeError):
        PrInCdb.decode(bytes.fromhex("5f000000000000001000"))


def test_cdb_encode_range_checks():
    with pytest.raises(PrDecodeError):
        PrOutCdb(PrOutAction.REGISTER, param_len=1 << 32).encode()
    with pytest.raises(PrDecodeError):
        PrInCdb(PrInAction.READ_KEYS, 1 << 16).encode()
    with pytest.raises(PrDecodeError):
        PrOutCdb(PrOutAction.RESERVE, scope=16).encode()


# ------------------------------------------------------------- PR OUT lists

BASIC_GOLDEN = RK.to_bytes(8, "big") + SARK.to_bytes(8, "big") + bytes(4) + bytes((0x05, 0, 0, 0))


def test_basic_params_golden():
    p = PrOutParams(RK, SARK, all_tg_pt=True, aptpl=True)
    assert p.encode() == BASIC_GOLDEN
    assert PrOutParams.decode(BASIC_GOLDEN) == p
    assert pr_out_params(RK, SARK, all_tg_pt=True, aptpl=True) == BASIC_GOLDEN


def test_spec_i_pt_golden():
    raw = (
        bytes(8)
        + SARK.to_bytes(8, "big")
        + bytes(4)
        + bytes((0x08, 0, 0, 0))
        + (24 + 28).to_bytes(4, "big")
        + TID00_RAW
        + TID_RAW
    )
    p = PrOutParams(0, SARK, spec_i_pt=True, transport_ids=(TID00, TID))
    assert p.encode() == raw
    assert PrOutParams.decode(raw) == p


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        BASIC_GOLDEN[:23],
        BASIC_GOLDEN + bytes(4),  # 28 bytes without SPEC_I_PT
        bytes(20) + b"\x08" + bytes(3),  # SPEC_I_PT without the list length
        bytes(20) + b"\x08" + bytes(3) + (28).to_bytes(4, "big") + TID_RAW[:20],
        bytes(20) + b"\x08" + bytes(3) + (20).to_bytes(4, "big") + TID_RAW,
    ],
)
def test_basic_params_length_errors(raw):
    with pytest.raises(PrLengthError):
        PrOutParams.decode(raw)


def test_spec_i_pt_unknown_format_is_not_a_length_error():
    bad = bytes((0x85,)) + TID_RAW[1:]
    raw = bytes(20) + b"\x08" + bytes(3) + len(bad).to_bytes(4, "big") + bad
    with pytest.raises(PrDecodeError) as ei:
        PrOutParams.decode(raw)
    assert not isinstance(ei.value, PrLengthError)


def test_register_and_move_golden():
    raw = (
        (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + bytes((0, 0x03, 0x00, 0x02))
        + (28).to_bytes(4, "big")
        + TID_RAW
    )
    p = RegisterAndMoveParams(1, 2, True, True, 2, TID)
    assert p.encode() == raw
    assert RegisterAndMoveParams.decode(raw) == p
    assert register_and_move_params(1, 2, TID, 2, unreg=True, aptpl=True) == raw


def test_register_and_move_errors():
    good = RegisterAndMoveParams(1, 2, False, False, 1, TID).encode()
    with pytest.raises(PrLengthError):
        RegisterAndMoveParams.decode(good[:23])
    with pytest.raises(PrLengthError):
        RegisterAndMoveParams.decode(good[:-1])
    wrong_len = good[:20] + (32).to_bytes(4, "big") + good[24:] + bytes(4)
    with pytest.raises(PrLengthError):
        RegisterAndMoveParams.decode(wrong_len)


# ------------------------------------------------------------- PR IN data


def test_read_keys_golden_and_truncation():
    raw = bytes.fromhex("00000007 00000010 00000000000000aa 00000000000000bb")
    rk = ReadKeys(7, (0xAA, 0xBB))
    assert rk.encode() == raw
    assert ReadKeys.decode(raw) == rk
    cut = ReadKeys.decode(raw[:20])  # allocation length 20: one whole key
    assert cut.keys == (0xAA,) and cut.additional_length == 16 and cut.truncated
    assert ReadKeys.decode(raw[:8]).keys == ()
    with pytest.raises(PrLengthError):
        ReadKeys.decode(raw[:7])
    with pytest.raises(PrDecodeError):
        ReadKeys.decode(bytes.fromhex("00000007 00000009"))


def test_read_reservation_golden():
    raw = bytes.fromhex("00000003 00000010 000000000000abcd 00000000 00 03 0000")
    rr = ReadReservation(3, 0xABCD, 0, PrType.EXCLUSIVE_ACCESS)
    assert rr.encode() == raw
    assert ReadReservation.decode(raw) == rr
    none = bytes.fromhex("00000003 00000000")
    assert ReadReservation(3).encode() == none
    assert ReadReservation.decode(none) == ReadReservation(3)
    cut = ReadReservation.decode(raw[:12])
    assert cut.key is None and cut.additional_length == 16 and cut.truncated
    with pytest.raises(PrDecodeError):
        ReadReservation.decode(bytes.fromhex("00000003 00000008") + bytes(8))


def test_report_capabilities_golden():
    caps = ReportCapabilities(
        crh=True,
        sip_c=True,
        atp_c=True,
        ptpl_c=True,
        tmv=True,
        allow_commands=1,
        type_mask=ReportCapabilities.mask_of(VALID_PR_TYPES),
    )
    raw = bytes.fromhex("0008 1d 90 ea01 0000")
    assert caps.encode() == raw
    assert ReportCapabilities.decode(raw) == caps
    assert caps.types == VALID_PR_TYPES
    everything = ReportCapabilities(True, True, True, True, True, True, 7, True, 0xFFFF)
    assert everything.encode() == bytes.fromhex("0008 9d f1 ffff 0000")
    # A truncated reply keeps what arrived.
    assert ReportCapabilities.decode(raw[:3]).crh
    assert not ReportCapabilities.decode(raw[:3]).tmv
    with pytest.raises(PrLengthError):
        ReportCapabilities.decode(raw[:1])


def test_read_full_status_golden_and_truncation():
    e1 = FullStatusEntry(0x8, False, True, 0, PrType.WRITE_EXCLUSIVE, 1, TID)
    e2 = FullStatusEntry(0x9, True, False, 0, PrType.NONE, 2, TID00)
    raw1 = bytes.fromhex("0000000000000008 00000000 01 01 00000000 0001 0000001c") + TID_RAW
    raw2 = bytes.fromhex("0000000000000009 00000000 02 00 00000000 0002 00000018") + TID00_RAW
    raw = bytes.fromhex("00000005") + (len(raw1) + len(raw2)).to_bytes(4, "big") + raw1 + raw2
    rfs = ReadFullStatus(5, (e1, e2))
    assert rfs.encode() == raw
    assert ReadFullStatus.decode(raw) == rfs
    cut = ReadFullStatus.decode(raw[: 8 + len(raw1) + 10])
    assert cut.entries == (e1,) and cut.additional_length == 100 and cut.truncated
    assert ReadFullStatus.decode(raw[:8]).entries == ()
    with pytest.raises(PrLengthError):
        ReadFullStatus.decode(raw[:4])


# ------------------------------------------------------------- round trips

u64 = st.integers(0, (1 << 64) - 1)
names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=","),
    min_size=1,
    max_size=40,
)
tids = st.builds(TransportId, names, st.one_of(st.none(), st.integers(0, (1 << 48) - 1)))
types = st.sampled_from(list(PrType))


@given(st.sampled_from(list(PrOutAction)), st.integers(0, 15), types, st.integers(0, (1 << 32) - 1))
def test_pr_out_cdb_round_trip(action, scope, rtype, plen):
    cdb = PrOutCdb(action, scope, rtype, plen)
    assert PrOutCdb.decode(cdb.encode()) == cdb


@given(st.sampled_from(list(PrInAction)), st.integers(0, 0xFFFF))
def test_pr_in_cdb_round_trip(action, alloc):
    cdb = PrInCdb(action, alloc)
    assert PrInCdb.decode(cdb.encode()) == cdb


@given(u64, u64, st.booleans(), st.booleans(), st.booleans(), st.lists(tids, max_size=4))
def test_params_round_trip(rk, sark, spec, atp, aptpl, tl):
    p = PrOutParams(rk, sark, spec, atp, aptpl, tuple(tl) if spec else ())
    assert PrOutParams.decode(p.encode()) == p


@given(u64, u64, st.booleans(), st.booleans(), st.integers(0, 0xFFFF), tids)
def test_move_round_trip(rk, sark, unreg, aptpl, port, tid):
    p = RegisterAndMoveParams(rk, sark, unreg, aptpl, port, tid)
    assert RegisterAndMoveParams.decode(p.encode()) == p


@given(st.integers(0, (1 << 32) - 1), st.lists(u64, max_size=10))
def test_read_keys_round_trip(gen, keys):
    r = ReadKeys(gen, tuple(keys))
    assert ReadKeys.decode(r.encode()) == r


@given(st.integers(0, (1 << 32) - 1), st.one_of(st.none(), u64), st.integers(0, 15), types)
def test_read_reservation_round_trip(gen, key, scope, rtype):
    r = ReadReservation(gen, key, scope if key is not None else 0, rtype if key is not None else 0)
    assert ReadReservation.decode(r.encode()) == r


@given(*(st.booleans(),) * 6, st.integers(0, 7), st.booleans(), st.integers(0, 0xFFFF))
def test_caps_round_trip(a, b, c, d, e, f, allow, ptpl_a, mask):
    r = ReportCapabilities(a, b, c, d, e, f, allow, ptpl_a, mask)
    assert ReportCapabilities.decode(r.encode()) == r


entries = st.builds(
    FullStatusEntry,
    u64,
    st.booleans(),
    st.booleans(),
    st.integers(0, 15),
    types,
    st.integers(0, 0xFFFF),
    tids,
)


@given(st.integers(0, (1 << 32) - 1), st.lists(entries, max_size=5), st.integers(0, 400))
def test_full_status_round_trip_and_any_truncation(gen, ents, cut):
    r = ReadFullStatus(gen, tuple(ents))
    raw = r.encode()
    assert ReadFullStatus.decode(raw) == r
    if cut >= 8:
        part = ReadFullStatus.decode(raw[:cut])
        assert part.entries == r.entries[: len(part.entries)]
        assert part.additional_length == len(raw) - 8


@given(st.binary(max_size=120))
def test_decoders_raise_only_typed_errors(raw):
    for dec in (
        PrOutCdb.decode,
        PrInCdb.decode,
        PrOutParams.decode,
        RegisterAndMoveParams.decode,
        ReadKeys.decode,
        ReadReservation.decode,
        ReportCapabilities.decode,
        ReadFullStatus.decode,
    ):
        try:
            dec(raw)
        except PrDecodeError:
            pass
