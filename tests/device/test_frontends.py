"""SharedNexus: per-frontend-nexus unit attentions and SCSI-2 reservation
of a shared backend nexus (device/frontends.py)."""

from __future__ import annotations

import pytest

from prmigrate.device.frontends import (
    MAX_QUEUED,
    SharedNexus,
    Verdict,
    drops_scsi2,
    release_cdb,
    request_sense_data,
)
from prmigrate.lun.types import Nexus, Result
from prmigrate.scsi.constants import Opcode, Status
from prmigrate.scsi.sense import Sense, encode_sense, sense_triple

G = "iqn.2026-11.org.prmigrate:guest1"
N1 = Nexus.make(G, 0x23D000000001, "iqn.2026-11.org.prmigrate:vm1")
N2 = Nexus.make(G, 0x23D000000002, "iqn.2026-11.org.prmigrate:vm1")
N3 = Nexus.make(G, 0x23D000000003, "iqn.2026-11.org.prmigrate:vm1")
RESET_UA = encode_sense(Sense.BUS_DEVICE_RESET)
PREEMPTED = encode_sense(Sense.REGISTRATIONS_PREEMPTED)
RELEASED = encode_sense(Sense.RESERVATIONS_RELEASED)
TUR = bytes(6)
READ16 = bytes((0x88,)) + bytes(15)
RESERVE6 = bytes((Opcode.RESERVE_6, 0, 0, 0, 0, 0))
RELEASE6 = bytes((Opcode.RELEASE_6, 0, 0, 0, 0, 0))
RESERVE10 = bytes((Opcode.RESERVE_10,)) + bytes(9)
GOOD = Result()


def shared(*nexuses: Nexus) -> SharedNexus:
    s = SharedNexus()
    for n in nexuses:
        s.attach(n)
    return s


# ---------------------------------------------------------------- unit attentions


def test_a_ua_reported_to_one_frontend_is_queued_for_the_others() -> None:
    s = shared(N1, N2, N3)
    assert s.establish(RESET_UA, N1) == 2
    assert s.take_ua(N1, 0x00) is None  # N1 had it from the backend
    assert s.take_ua(N2, 0x00) == RESET_UA
    assert s.take_ua(N2, 0x00) is None  # reported once
    assert s.take_ua(N3, 0x00) == RESET_UA
    assert not s.uas


def test_a_ua_reported_to_no_frontend_is_queued_for_all() -> None:
    s = shared(N1, N2)
    assert s.establish(PREEMPTED) == 2
    assert s.take_ua(N1, 0x00) == PREEMPTED and s.take_ua(N2, 0x00) == PREEMPTED


def test_a_frontend_attaching_later_gets_no_older_ua() -> None:
    s = shared(N1, N2)
    s.establish(RESET_UA, N1)
    s.attach(N3)
    assert s.take_ua(N3, 0x00) is None
    assert s.take_ua(N2, 0x00) == RESET_UA


@pytest.mark.parametrize("op", [Opcode.INQUIRY, Opcode.REPORT_LUNS])
def test_inquiry_and_report_luns_do_not_take_a_ua(op: int) -> None:
    s = shared(N1, N2)
    s.establish(RESET_UA, N1)
    assert s.take_ua(N2, op) is None
    assert s.take_ua(N2, Opcode.REQUEST_SENSE) == RESET_UA  # REQUEST SENSE returns it


def test_queue_rules_of_lun_ua() -> None:
    s = shared(N1, N2)
    s.establish(PREEMPTED, N1)
    s.establish(PREEMPTED, N1)  # no duplicate
    s.establish(RELEASED, N1)
    assert s.uas[N2] == [PREEMPTED, RELEASED]
    s.establish(RESET_UA, N1)  # a reset makes the earlier ones moot
    assert s.uas[N2] == [RESET_UA]
    s.uas.clear()
    for ascq in range(MAX_QUEUED + 2):
        raw = bytearray(PREEMPTED)
        raw[13] = ascq
        s.establish(bytes(raw), N1)
    assert len(s.uas[N2]) == MAX_QUEUED and s.uas[N2][0][13] == 2


def test_report_luns_clears_3f0e_only() -> None:
    s = shared(N1, N2)
    s.establish(encode_sense(Sense.REPORTED_LUNS_DATA_HAS_CHANGED), N1)
    s.establish(PREEMPTED, N1)
    s.discard_ua(N2, 0x3F, 0x0E)
    assert s.uas[N2] == [PREEMPTED]
    s.discard_ua(N2, 0x2A, 0x05)
    assert not s.uas


def test_pending_uas_lists_each_condition_once() -> None:
    s = shared(N1, N2, N3)
    s.establish(PREEMPTED, N1)
    s.establish(RELEASED, N2)
    assert s.pending_uas() == [PREEMPTED, RELEASED]


def test_sole_is_the_one_unburdened_frontend() -> None:
    s = shared(N1)
    assert s.sole == N1
    s.attach(N2)
    assert s.sole is None
    s.establish(RESET_UA, N1)
    s.detach(N1)
    assert s.sole is None  # N2 has a UA queued
    assert s.take_ua(N2, 0x00) == RESET_UA
    assert s.sole == N2
    s.pause(True)
    assert s.sole is None
    s.pause(False)
    assert s.sole == N2
    s.detach(N2)
    assert s.sole is None and not s.frontends


def test_detach_drops_the_queue() -> None:
    s = shared(N1, N2)
    s.establish(RESET_UA, N1)
    assert s.detach(N2) is None
    s.attach(N2)
    assert s.take_ua(N2, 0x00) is None


# ------------------------------------------------------------- SCSI-2 reservation


def test_reserve_good_makes_its_frontend_the_holder() -> None:
    s = shared(N1, N2)
    assert s.observe(N1, RESERVE6, GOOD, registered=False) is not None
    assert s.holder == N1
    assert s.observe(N1, RESERVE6, GOOD, registered=False) is None  # again: no change
    assert s.check(N2, READ16) is Verdict.CONFLICT
    assert s.check(N2, TUR) is Verdict.CONFLICT
    assert s.check(N2, RESERVE6) is Verdict.CONFLICT  # SPC-2 7.21
    assert s.check(N2, RELEASE6) is Verdict.GOOD  # SPC-2 7.19: no effect
    assert s.check(N2, bytes((Opcode.INQUIRY, 0, 0, 0, 36, 0))) is Verdict.FORWARD
    assert s.check(N2, bytes((Opcode.REQUEST_SENSE, 0, 0, 0, 18, 0))) is Verdict.FORWARD
    assert s.check(N2, bytes((Opcode.PERSISTENT_RESERVE_IN,)) + bytes(9)) is Verdict.CONFLICT
    # the answers of other statuses change nothing
    s.observe(N1, RELEASE6, Result(Status.RESERVATION_CONFLICT), registered=False)
    assert s.holder == N1
    s.observe(N2, RELEASE6, GOOD, registered=False)  # not the holder's
    assert s.holder == N1
    assert s.observe(N1, RELEASE6, GOOD, registered=False) is not None
    assert s.holder is None


def test_reserve_of_a_registered_guest_is_not_tracked() -> None:
    s = shared(N1, N2)
    note = s.observe(N1, RESERVE6, GOOD, registered=True)
    assert note is not None and "not tracked" in note
    assert s.holder is None


def test_failed_reserve_is_not_tracked() -> None:
    s = shared(N1)
    s.observe(N1, RESERVE6, Result(Status.RESERVATION_CONFLICT), registered=False)
    assert s.holder is None


@pytest.mark.parametrize("reserve,release_op", [(RESERVE6, Opcode.RELEASE_6),
                                                (RESERVE10, Opcode.RELEASE_10)])
def test_holder_leaving_asks_for_the_matching_release(reserve: bytes, release_op: int) -> None:
    s = shared(N1, N2)
    s.observe(N1, reserve, GOOD, registered=False)
    cdb = s.detach(N1)
    assert cdb is not None and cdb[0] == release_op and len(cdb) == (6 if release_op == 0x17 else 10)
    assert s.holder is None
    assert s.detach(N2) is None


def test_last_holder_leaving_asks_for_nothing() -> None:
    s = shared(N1, N2)
    s.observe(N2, RESERVE6, GOOD, registered=False)
    assert s.detach(N1) is None  # not the holder
    assert s.holder == N2
    assert s.detach(N2) is None  # the backend nexus closes: its loss releases it
    assert s.holder is None


def test_drop_reservation() -> None:
    s = shared(N1, N2)
    s.observe(N1, RESERVE6, GOOD, registered=False)
    assert s.drop_reservation() == N1 and s.holder is None
    assert s.detach(N1) is None


# ------------------------------------------------------------------- helpers


@pytest.mark.parametrize("asc,ascq,drops", [(0x29, 0x00, True), (0x29, 0x03, True), (0x29, 0x07, True),
                                            (0x2A, 0x03, True), (0x2A, 0x04, True),
                                            (0x2A, 0x05, False), (0x2A, 0x01, False),
                                            (0x3F, 0x0E, False)])
def test_drops_scsi2(asc: int, ascq: int, drops: bool) -> None:
    assert drops_scsi2(asc, ascq) is drops


def test_request_sense_data_in_the_asked_format() -> None:
    fixed = request_sense_data(RESET_UA, bytes((0x03, 0, 0, 0, 252, 0)))
    assert fixed == RESET_UA
    desc = request_sense_data(RESET_UA, bytes((0x03, 1, 0, 0, 252, 0)))
    assert desc[0] == 0x72 and sense_triple(desc) == (6, 0x29, 0x03)
    back = request_sense_data(desc, bytes((0x03, 0, 0, 0, 252, 0)))
    assert back[0] == 0x70 and sense_triple(back) == (6, 0x29, 0x03)
    assert request_sense_data(RESET_UA, bytes((0x03, 0, 0, 0, 8, 0))) == RESET_UA[:8]


def test_release_cdb() -> None:
    assert release_cdb(Opcode.RESERVE_6) == bytes((0x17, 0, 0, 0, 0, 0))
    assert release_cdb(Opcode.RESERVE_10) == bytes((0x57,)) + bytes(9)
