import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.device.mask import PrFilter, mask_pr_in, refuse_pr_out
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType
from prmigrate.scsi.pr import pr_in_cdb, pr_out_cdb, pr_out_params, register_and_move_params
from prmigrate.scsi.sense import Sense, decode_sense
from prmigrate.scsi.transport_id import TransportId

CAPS_CDB = pr_in_cdb(PrInAction.REPORT_CAPABILITIES, 8)
LIO_CAPS = bytes([0x00, 0x08, 0x1D, 0x81, 0xEA, 0x01, 0x00, 0x00])  # LIO: byte 2 = 0x1D


def test_mask_clears_sip_c_and_atp_c_only():
    out = mask_pr_in(CAPS_CDB, LIO_CAPS)
    assert out == bytes([0x00, 0x08, 0x11, 0x81, 0xEA, 0x01, 0x00, 0x00])


def test_mask_all_bits_set():
    assert mask_pr_in(CAPS_CDB, b"\x00\x08\xff\xff")[2] == 0xF3


@pytest.mark.parametrize("n", [0, 1, 2])
def test_short_answers_unchanged(n):
    data = LIO_CAPS[:n]
    assert mask_pr_in(CAPS_CDB, data) is data


@pytest.mark.parametrize("n", range(3, 9))
def test_truncated_answers_masked(n):
    out = mask_pr_in(CAPS_CDB, LIO_CAPS[:n])
    assert len(out) == n and out[2] == 0x11


def test_other_commands_untouched():
    data = bytes(LIO_CAPS)
    for cdb in (
        pr_in_cdb(PrInAction.READ_KEYS),
        pr_in_cdb(PrInAction.READ_FULL_STATUS),
        b"\x12" + bytes(5),
        b"",
        b"\x5e",
    ):
        assert mask_pr_in(cdb, data) is data


def test_disabled_masks_nothing():
    assert mask_pr_in(CAPS_CDB, LIO_CAPS, enabled=False) is LIO_CAPS
    assert PrFilter(False).mask_pr_in(CAPS_CDB, LIO_CAPS) is LIO_CAPS
    assert PrFilter(True).mask_pr_in(CAPS_CDB, LIO_CAPS)[2] == 0x11


REG = pr_out_cdb(PrOutAction.REGISTER)


@pytest.mark.parametrize("flag,bit", [("spec_i_pt", 3), ("all_tg_pt", 2)])
def test_refuse_spec_i_pt_and_all_tg_pt(flag, bit):
    params = pr_out_params(0, 0x1234, **{flag: True})
    cc = refuse_pr_out(REG, params)
    assert cc is not None and cc.sense is Sense.INVALID_FIELD_IN_PARAMETER_LIST
    assert (
        cc.field is not None and not cc.field.cdb and cc.field.field == 20 and cc.field.bit == bit
    )
    sense = cc.encode()
    assert decode_sense(sense).known is Sense.INVALID_FIELD_IN_PARAMETER_LIST
    # SKSV | C/D=0 | BPV | bit, field pointer 20
    assert sense[15:18] == bytes([0x80 | 0x08 | bit, 0, 20])


def test_refuse_spec_i_pt_with_transport_ids():
    tid = TransportId("iqn.x:other", 1)
    params = pr_out_params(0, 1, spec_i_pt=True, transport_ids=[tid])
    assert refuse_pr_out(REG, params) is not None


@pytest.mark.parametrize(
    "action", [a for a in PrOutAction if a is not PrOutAction.REGISTER_AND_MOVE]
)
def test_every_basic_action_refused(action):
    assert (
        refuse_pr_out(
            pr_out_cdb(action, PrType.WRITE_EXCLUSIVE), pr_out_params(1, 2, all_tg_pt=True)
        )
        is not None
    )
    assert (
        refuse_pr_out(pr_out_cdb(action, PrType.WRITE_EXCLUSIVE), pr_out_params(1, 2, aptpl=True))
        is None
    )


def test_register_and_move_byte_20_is_not_flags():
    tid = TransportId("iqn.x:" + "a" * 300, 5)  # TransportID length's low byte has bits 2/3 set
    params = register_and_move_params(1, 2, tid)
    assert params[20] | params[21] | params[22] | params[23]
    assert refuse_pr_out(pr_out_cdb(PrOutAction.REGISTER_AND_MOVE), params) is None


def test_disabled_or_short_forwarded():
    params = pr_out_params(0, 1, spec_i_pt=True)
    assert refuse_pr_out(REG, params, enabled=False) is None
    assert PrFilter(False).refuse_pr_out(REG, params) is None
    assert refuse_pr_out(REG, params[:20]) is None
    assert refuse_pr_out(b"\x5f", params) is None
    assert refuse_pr_out(CAPS_CDB, params) is None


@given(st.binary(max_size=16), st.binary(max_size=64))
def test_garbage_never_raises(cdb, data):
    out = mask_pr_in(cdb, data)
    assert len(out) == len(data)
    refuse_pr_out(cdb, data)


def test_only_the_parameter_list_the_cdb_names_counts():
    """PARAMETER LIST LENGTH (CDB bytes 5-8) bounds what is judged: the
    flags byte of data beyond a short list is not the guest's, and a list
    shorter than 24 bytes goes to the backend (which answers PARAMETER
    LIST LENGTH ERROR, as for any such PR OUT)."""
    params = pr_out_params(0, 1, all_tg_pt=True) + bytes(16)  # 40 bytes of data-out
    assert refuse_pr_out(pr_out_cdb(PrOutAction.REGISTER, param_len=24), params) is not None
    assert refuse_pr_out(pr_out_cdb(PrOutAction.CLEAR, param_len=3), params) is None
    assert refuse_pr_out(pr_out_cdb(PrOutAction.REGISTER, param_len=23), params) is None
    assert refuse_pr_out(pr_out_cdb(PrOutAction.REGISTER, param_len=40), params[:23]) is None
    assert refuse_pr_out(pr_out_cdb(PrOutAction.REGISTER, param_len=24)[:8], params) is None
