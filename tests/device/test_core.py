"""The device core alone: fed events, no event loop, no backend."""

from __future__ import annotations

from typing import Any

import pytest

from prmigrate.device.config import DeviceConfig
from prmigrate.device.core import (
    OWN_COMMANDS,
    DeviceCore,
    DeviceError,
    Forward,
    Kind,
    Purpose,
    UaRetry,
)
from prmigrate.device.identity import DeviceIdentity
from prmigrate.device.snapshot import DeviceSnapshot, SnapshotError
from prmigrate.device.state import DevicePrState, GuestPrState
from prmigrate.lun.types import Nexus, Result
from prmigrate.scsi.constants import Opcode, PrOutAction, PrType, SenseKey, Status
from prmigrate.scsi.pr import pr_out_cdb, pr_out_params
from prmigrate.scsi.sense import Sense, encode_sense, sense_triple

G1 = "iqn.2026-11.org.prmigrate:guest1"
BACKEND = "iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/0"
SHARED = "iqn.2026-11.org.prmigrate:shared"
HOST = "iqn.2026-11.org.prmigrate:hosta"
TUR = bytes(6)
IDENT = DeviceIdentity(b"\x00" * 36, {}, 16, 512)
UA = Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.RESERVATIONS_PREEMPTED))


class Core(DeviceCore):
    """A core whose verification requests are recorded, as a shell would get them."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(DeviceConfig("vm1", BACKEND, SHARED, machine="pc-q35-11.0", **kw), HOST,
                         identity=IDENT)
        self.wanted: list[str] = []

    def want_verify(self, reason: str = "state in doubt") -> None:
        self.wanted.append(reason)


def nexus(isid: int = 0x23D000000001) -> Nexus:
    return Nexus.make(G1, isid, "iqn.2026-11.org.prmigrate:vm1")


def route(core: Core, n: Nexus, cdb: bytes, data: bytes = b"") -> Result | Forward:
    b = core.backend_for(n.initiator)
    b.attach(n)
    return core.route(b, n, cdb, data, None)


def test_the_core_needs_no_event_loop_socket_or_clock() -> None:
    from pathlib import Path

    import prmigrate.device as pkg

    for name in ("core", "verify", "describe", "snapshot", "datain", "frontends", "snoop", "errors",
                 "links", "tmf", "plans"):
        source = (Path(pkg.__file__).parent / f"{name}.py").read_text()
        for banned in ("import asyncio", "import socket", "import time", "from time ", "from asyncio "):
            assert banned not in source, (name, banned)


def test_plain_command_is_forwarded_with_the_cdbs_data_in_length() -> None:
    core = Core()
    f = route(core, nexus(), bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0)))
    assert isinstance(f, Forward) and f.kind is Kind.PLAIN and f.data_in_len == 4 * 512


def test_owed_unit_attention_comes_first_then_the_command_goes() -> None:
    core = Core()
    core.owe(G1, [encode_sense(Sense.POWER_ON_RESET)])
    r = route(core, nexus(), TUR)
    assert isinstance(r, Result) and sense_triple(r.sense) == (SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    assert isinstance(route(core, nexus(), TUR), Forward)


def test_report_luns_is_answered_by_the_core() -> None:
    core = Core()
    r = route(core, nexus(), bytes((Opcode.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0)))
    assert isinstance(r, Result) and r.status == Status.GOOD
    assert bytes(r.data_in) == bytes((0, 0, 0, 8, 0, 0, 0, 0)) + bytes(8)


def test_pr_out_with_spec_i_pt_is_refused_with_migrate_pr_on() -> None:
    core = Core(migrate_pr=True)
    params = pr_out_params(0, 0x11, spec_i_pt=True)
    r = route(core, nexus(), pr_out_cdb(PrOutAction.REGISTER, PrType.NONE, 0, len(params)), params)
    assert isinstance(r, Result) and r.status == Status.CHECK_CONDITION


def test_pr_out_answer_is_snooped_and_a_doubtful_unit_attention_asks_for_verification() -> None:
    core = Core()
    params = pr_out_params(0, 0x11)
    f = route(core, nexus(), pr_out_cdb(PrOutAction.REGISTER, PrType.NONE, 0, len(params)), params)
    assert isinstance(f, Forward) and f.kind is Kind.PR_OUT
    core.pr_out_answered(G1, f.cdb, f.data_out, Result(Status.GOOD), f.intent)
    assert core.snooper.state.get(G1).key == 0x11
    b = core.backend_for(G1)
    core.unit_attention_met(b, 0x2A, 0x03)  # RESERVATIONS PREEMPTED: the state is in doubt
    assert core.wanted == ["unit attention 2A/03"] and G1 in core.snooper.state.unverified


def test_a_pr_out_without_an_answer_puts_the_state_in_doubt() -> None:
    core = Core()
    core.pr_out_lost(G1, None)
    assert G1 in core.snooper.state.unverified and core.wanted == ["state in doubt"]


def test_hold_queues_and_take_held_gives_them_back_in_order() -> None:
    core = Core()
    assert not core.held
    core.hold()
    assert core.held and core.take_held() == [] and not core.held
    core.hold()
    assert core.discard_held() == 0 and core.held


def test_snapshot_has_the_streams_shape_and_restores() -> None:
    core = Core()
    core.restore(DevicePrState({G1: GuestPrState(0x22)}), None, {G1: [(6, 0x2A, 0x03), Sense.POWER_ON_RESET]})
    snap = core.snapshot()
    assert isinstance(snap, DeviceSnapshot) and snap.name == "vm1"
    assert snap.pr.get(G1).key == 0x22 and snap.ua == {G1: ((0x2A, 0x03), (0x29, 0x00))}
    assert snap.device_config().name == "vm1" and snap.device_identity() == IDENT
    other = Core()
    other.restore(snap.pr, snap.device_identity(), dict(snap.ua))
    assert other.snapshot() == snap


def test_snapshot_needs_the_identity() -> None:
    core = Core()
    core.identity = None
    with pytest.raises(DeviceError, match="identity not captured"):
        core.snapshot()


def test_a_bad_snapshot_config_is_a_snapshot_error() -> None:
    with pytest.raises(SnapshotError):
        DeviceSnapshot("vm1", {}, IDENT.to_dict()).device_config()


def test_ua_retry_keeps_what_it_met_and_what_is_owed_by_purpose() -> None:
    lost = Result(Status.CHECK_CONDITION, b"", encode_sense(Sense.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR))
    owed = {}
    for purpose in Purpose:
        retry = UaRetry(purpose)
        for r in (UA, lost, Result(Status.GOOD)):
            retry.note(r)
        assert retry.met == [bytes(UA.sense), bytes(lost.sense)]
        owed[purpose] = [sense_triple(s) for s in retry.owed]
    ua, cleared = (6, 0x2A, 0x03), (6, 0x2F, 0x00)
    assert owed == {
        Purpose.GUEST: [ua, cleared],
        Purpose.MIGRATION: [cleared],  # 2A/xx: the migration's own
        Purpose.MONITOR: [],
        Purpose.RELEASE: [ua, cleared],
    }
    assert [p for p in Purpose if OWN_COMMANDS[p].tracked] == [Purpose.GUEST]


