"""A logical unit behind several target ports (one per iSCSI portal group):
each I_T nexus kept apart by the PR engine (SPC-5 5.14), ALL_TG_PT across
ports, READ FULL STATUS per port, REGISTER AND MOVE to a named port, and what
the LU reports of its ports: VPD 83h designators, TPGS in standard INQUIRY,
REPORT TARGET PORT GROUPS (golden bytes)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from prmigrate.lun.pr import ReservationTable
from prmigrate.lun.types import Nexus, ReservationConflict
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, Status
from prmigrate.scsi.pr import ReportCapabilities, pr_out_cdb, register_and_move_params
from prmigrate.scsi.sense import Sense, decode_sense
from prmigrate.scsi.tpg import AccessState, ReportTpgCdb, RtpgFormat, TargetPortGroup, decode_report
from prmigrate.scsi.transport_id import TransportId

from .test_pr import UaLog, check, full, keys, out, pr_in, register, reserve

T = "iqn.2026-01.test:target"
PORTS = {1: 1, 2: 2}  # relative target port -> portal group tag
A1 = Nexus.make("iqn.host:a", 0x1, T, tpgt=1, rel_port=1)
A2 = Nexus.make("iqn.host:a", 0x1, T, tpgt=2, rel_port=2)  # the same initiator port through portal group 2
B1 = Nexus.make("iqn.host:b", 0x1, T, tpgt=1, rel_port=1)
B2 = Nexus.make("iqn.host:b", 0x1, T, tpgt=2, rel_port=2)
K, KB = 0xA1, 0xB2
WE, WE_RO = PrType.WRITE_EXCLUSIVE, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
WRITE10 = bytes((0x2A,)) + bytes(9)


@pytest.fixture
def ua() -> UaLog:
    return UaLog()


@pytest.fixture
def t(ua: UaLog) -> ReservationTable:
    table = ReservationTable(ua, None)
    table.target_ports = lambda: PORTS
    return table


# ----------------------------------------------------------- the PR engine

def test_one_initiator_port_through_two_target_ports_is_two_nexuses(t, ua):
    register(t, A1, K)
    assert t.registration_of(A1) is not None and t.registration_of(A2) is None
    register(t, A2, KB)  # its own registration, with its own key
    assert keys(t) == [K, KB]
    reserve(t, A1, K, WE_RO)
    assert t.is_holder(A1) and not t.is_holder(A2)
    assert not t.conflicts(A2, WRITE10)  # registered: WE_RO lets it write
    out(t, A2, PrOutAction.REGISTER, KB, 0)  # A2 unregisters; A1's registration and reservation stay
    assert t.registration_of(A2) is None and t.is_holder(A1)
    assert t.conflicts(A2, WRITE10)
    ua.clear()
    out(t, A1, PrOutAction.CLEAR, K)
    assert ua.of(A2) == []  # nothing was registered on A2 any more
    assert ua.of(A1) == []  # the cause gets no unit attention


def test_read_full_status_reports_the_relative_target_port_of_each_registration(t):
    register(t, A1, K)
    register(t, A2, K)
    register(t, B2, KB)
    reserve(t, A2, K, WE)
    entries = [(e.key, e.rel_tgt_port, e.transport_id.name, e.holder, e.all_tg_pt) for e in full(t).entries]
    assert entries == [(K, 1, "iqn.host:a", False, False), (K, 2, "iqn.host:a", True, False),
                       (KB, 2, "iqn.host:b", False, False)]


def test_all_tg_pt_registers_the_initiator_port_on_every_target_port(t, ua):
    register(t, A1, K, all_tg_pt=True)
    assert t.registration_of(A2) is not None
    reserve(t, A2, K, WE)  # acting on port 2 under the ALL_TG_PT registration
    assert t.is_holder(A1) and t.is_holder(A2)  # one registration: every nexus of it holds
    (entry,) = full(t).entries  # SPC-5 6.16.5: one descriptor for all the I_T nexuses
    assert entry.all_tg_pt and entry.holder and entry.rtype == WE
    assert t.conflicts(B1, WRITE10) and t.conflicts(B2, WRITE10)
    with pytest.raises(ReservationConflict):  # port 2 sees the registration of port 1
        register(t, A2, KB)


def test_all_tg_pt_registration_ends_on_every_port_at_once(t, ua):
    """Our choice (SPC-5 leaves it open, implementations differ): a nexus
    acting under an ALL_TG_PT registration changes or removes it for every
    target port, so one descriptor always describes it truthfully."""
    register(t, A1, K, all_tg_pt=True)
    out(t, A2, PrOutAction.REGISTER, K, KB)  # key change from port 2
    assert t.registration_of(A1).key == KB and keys(t) == [KB]
    out(t, A2, PrOutAction.REGISTER, KB, 0)  # unregister from port 2
    assert t.registration_of(A1) is None and keys(t) == []


def test_preempt_sends_the_unit_attention_to_the_preempted_port_only(t, ua):
    register(t, A1, K)
    register(t, A2, K)
    register(t, B1, KB)
    reserve(t, B1, KB, WE)
    # the preempted nexuses were seen on their ports (their commands passed here)
    t.conflicts(A1, WRITE10)
    t.conflicts(A2, WRITE10)
    ua.clear()
    out(t, B1, PrOutAction.PREEMPT, KB, K, WE)
    assert ua.of(A1) == [Sense.REGISTRATIONS_PREEMPTED]
    assert ua.of(A2) == [Sense.REGISTRATIONS_PREEMPTED]  # with its own portal group tag
    assert keys(t) == [KB]


def test_report_capabilities_advertises_all_target_ports(t):
    caps = ReportCapabilities.decode(pr_in(t, PrInAction.REPORT_CAPABILITIES))
    assert caps.atp_c


def _move(t, nexus, rk, sark, tid, port, unreg=False):
    data = register_and_move_params(rk, sark, tid, port, unreg=unreg)
    t.persistent_reserve_out(nexus, pr_out_cdb(PrOutAction.REGISTER_AND_MOVE, PrType.NONE, 0, len(data)), data)


def test_register_and_move_honours_the_relative_target_port(t, ua):
    register(t, A1, K)
    reserve(t, A1, K, WE)
    _move(t, A1, K, KB, TransportId.of(B1), 2)
    assert t.is_holder(B2) and not t.is_holder(B1)  # the destination is B's nexus on port 2
    assert t.registration_of(B1) is None
    (a, b) = full(t).entries
    assert (b.key, b.rel_tgt_port, b.holder) == (KB, 2, True) and not a.holder


def test_register_and_move_to_a_port_that_does_not_exist_changes_nothing(t):
    register(t, A1, K)
    reserve(t, A1, K, WE)
    gen = t.generation
    for port in (0, 3):
        with check(Sense.INVALID_FIELD_IN_PARAMETER_LIST) as e:
            _move(t, A1, K, KB, TransportId.of(B1), port)
        assert e.value.field is not None and e.value.field.field == 18
    assert t.is_holder(A1) and keys(t) == [K] and t.generation == gen


# ----------------------------------------------------------- the logical unit

@pytest.fixture
def lu(tmp_path: Path) -> Iterator[LogicalUnit]:
    u = LogicalUnit(tmp_path / "img", 64 * 512, name="two-ports", serial="SN0002", state_dir=tmp_path)
    u.target_ports = lambda: {1: 1, 2: 7}
    yield u
    u.close()


def good(r) -> bytes:
    assert r.status == Status.GOOD, decode_sense(r.sense) if r.sense else r
    return bytes(r.data_in)


def test_standard_inquiry_says_implicit_asymmetric_access(lu):
    d = good(lu.execute(A1, bytes.fromhex("120000006000"), b""))
    assert (d[5] >> 4) & 0x3 == 0b01  # TPGS: implicit ALUA (SPC-5 6.6.2)


def _designators(page: bytes) -> dict[tuple[int, int], bytes]:
    out, off = {}, 4
    while off < len(page):
        assoc_type, n = page[off + 1], page[off + 3]
        out[((assoc_type >> 4) & 0x3, assoc_type & 0xF)] = page[off + 4: off + 4 + n]
        off += 4 + n
    return out


def test_vpd_83_names_the_target_port_and_group_of_the_nexus(lu):
    b7 = Nexus.make("iqn.host:b", 0x1, "iqn.2026-01.test:target", tpgt=7, rel_port=2)
    for nexus, port in ((A1, 1), (b7, 2)):
        d = _designators(good(lu.execute(nexus, bytes.fromhex("120183010000"), b"")))
        assert d[(1, 4)] == struct.pack(">HH", 0, port)  # relative target port (SPC-5 7.7.6.6.7)
        assert d[(1, 5)] == struct.pack(">HH", 0, port)  # target port group (SPC-5 7.7.6.6.8)
        name = d[(1, 8)].rstrip(b"\0").decode()
        assert name == f"{nexus.target},t,0x{nexus.tpgt:04x}"


# REPORT TARGET PORT GROUPS, SPC-5 6.36: RETURN DATA LENGTH, then per group:
# PREF|state, support bits (AO_SUP), group, reserved, status, vendor, port
# count, and 4 bytes per port (2 obsolete, relative target port identifier).
RTPG_TWO = bytes.fromhex(
    "00000018"
    "00 01 0001 00 00 00 01" "0000 0001"
    "00 01 0002 00 00 00 01" "0000 0002"
)


def test_report_target_port_groups_golden(lu):
    assert good(lu.execute(A1, ReportTpgCdb.encode(1024), b"")) == RTPG_TWO
    ext = good(lu.execute(A1, ReportTpgCdb.encode(1024, RtpgFormat.EXTENDED), b""))
    assert ext == bytes.fromhex("0000001c 10 00 0000") + RTPG_TWO[4:]
    assert good(lu.execute(A1, ReportTpgCdb.encode(6), b"")) == RTPG_TWO[:6]  # truncated, length kept
    groups = decode_report(ext)
    assert [(g.group, g.ports, g.state) for g in groups] == [(1, (1,), AccessState.ACTIVE_OPTIMIZED),
                                                              (2, (2,), AccessState.ACTIVE_OPTIMIZED)]


def test_report_target_port_groups_of_a_single_port_lu(tmp_path):
    u = LogicalUnit(tmp_path / "one", 64 * 512, name="one-port")
    try:
        assert good(u.execute(A1, ReportTpgCdb.encode(64), b"")) == bytes.fromhex("0000000c 00010001 00000001 00000001")
    finally:
        u.close()


def test_report_target_port_groups_bad_format(lu):
    cdb = bytearray(ReportTpgCdb.encode(64))
    cdb[1] |= 0b010 << 5  # PARAMETER DATA FORMAT 010b: reserved
    r = lu.execute(A1, bytes(cdb), b"")
    assert r.status == Status.CHECK_CONDITION
    assert decode_sense(r.sense).asc == 0x24  # INVALID FIELD IN CDB


def test_target_port_group_codec_round_trip_and_bounds():
    g = TargetPortGroup(5, (3, 4), AccessState.STANDBY,
                        frozenset({AccessState.ACTIVE_OPTIMIZED, AccessState.STANDBY, AccessState.TRANSITIONING}),
                        pref=True)
    raw = g.encode()
    assert raw[:2] == bytes((0x82, 0x85))
    assert TargetPortGroup.decode(raw) == (g, len(raw))
    with pytest.raises(ValueError):
        TargetPortGroup.decode(raw[:-1])
    with pytest.raises(ValueError):
        TargetPortGroup(0, (1,))
    with pytest.raises(ValueError):
        TargetPortGroup(1, ())


def test_register_and_move_to_the_same_initiator_port_on_another_target_port(t, ua):
    """The destination I_T nexus differs from the caller's by its target port
    alone: allowed (SPC-5 5.14.8 asks only for another I_T nexus)."""
    register(t, A1, K)
    reserve(t, A1, K, WE)
    _move(t, A1, K, KB, TransportId.of(A1), 2, unreg=True)
    assert t.is_holder(A2) and t.registration_of(A1) is None
    assert [(e.key, e.rel_tgt_port, e.holder) for e in full(t).entries] == [(KB, 2, True)]
    assert not t.conflicts(A2, WRITE10) and t.conflicts(A1, WRITE10)
