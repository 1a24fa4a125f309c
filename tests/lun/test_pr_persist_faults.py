"""Fail closed: a PR OUT whose APTPL state cannot be saved is not applied.

The store fails (ENOSPC, EROFS, EIO from the write, the rename or the
directory's fsync); the command ends with CHECK CONDITION, NOT READY, LOGICAL
UNIT COMMUNICATION FAILURE and one error log line, and the table is exactly
as before: registrations (and their order), reservation, PRgeneration, APTPL,
the state file, and no unit attention queued nor task aborted. Once the store
works again the same command succeeds.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator

import pytest

from prmigrate.lun import persist
from prmigrate.lun.pr import ReservationTable
from prmigrate.lun.types import Nexus
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType, SenseKey, Status
from prmigrate.scsi.pr import pr_in_cdb, pr_out_cdb, pr_out_params, register_and_move_params
from prmigrate.scsi.sense import Sense, sense_triple
from prmigrate.scsi.transport_id import TransportId

from .test_pr import EA_RO, KB, KC, WE_AR, A, B, C, K, UaLog, check, out, register, reserve

WE = PrType.WRITE_EXCLUSIVE


class FailingStore:
    """Makes the state file's writes fail with ``err`` while ``failing``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where: str = "write") -> None:
        self.failing = False
        self.err = errno.ENOSPC
        self.where = where
        real_write, real_replace, real_fsync_dir, real_unlink = (
            persist.os.write, persist.os.replace, persist.fsync_dir, persist.Path.unlink,
        )

        def write(fd: int, data: object) -> int:
            if self.failing and self.where == "write":
                raise OSError(self.err, "injected")
            return real_write(fd, data)  # type: ignore[arg-type]

        def replace(src: object, dst: object) -> None:
            if self.failing and self.where == "rename":
                raise OSError(self.err, "injected")
            real_replace(src, dst)  # type: ignore[arg-type]

        def fsync_dir(directory: object) -> None:
            if self.failing and self.where == "fsync_dir":
                raise OSError(errno.EIO, "injected")
            real_fsync_dir(directory)  # type: ignore[arg-type]

        def unlink(path: persist.Path, missing_ok: bool = False) -> None:
            if self.failing and self.where in ("write", "rename"):
                raise OSError(self.err, "injected")
            real_unlink(path, missing_ok)

        monkeypatch.setattr(persist.os, "write", write)
        monkeypatch.setattr(persist.os, "replace", replace)
        monkeypatch.setattr(persist, "fsync_dir", fsync_dir)
        monkeypatch.setattr(persist.Path, "unlink", unlink)


def state_of(t: ReservationTable) -> tuple[object, ...]:
    """Everything a PR OUT may change, in the order READ FULL STATUS reports."""
    pr_in = {a: t.persistent_reserve_in(A, pr_in_cdb(a, 0xFFFF)) for a in PrInAction}
    return (t.registrations, t.reservation, t.generation, t.aptpl, pr_in)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FailingStore:
    return FailingStore(monkeypatch)


@pytest.fixture
def table(tmp_path, ua: UaLog) -> Iterator[ReservationTable]:
    t = ReservationTable(ua, tmp_path / "lun0-pr.json")
    register(t, A, K, aptpl=True)
    register(t, B, KB, aptpl=True)
    reserve(t, A, K, EA_RO)
    ua.clear()
    yield t


@pytest.fixture
def ua() -> UaLog:
    return UaLog()


MOVE_TO_C = register_and_move_params(K, KC, TransportId.of(C), 1, aptpl=True)

# (description, the PR OUT): each changes the state and needs a save.
COMMANDS = [
    ("register", lambda t: register(t, C, KC, aptpl=True)),
    ("register without APTPL (removes the file)", lambda t: register(t, C, KC)),
    ("change key", lambda t: out(t, B, PrOutAction.REGISTER, KB, 0x77, aptpl=True)),
    ("unregister the holder (2A/04 to B)", lambda t: out(t, A, PrOutAction.REGISTER, K, 0, aptpl=True)),
    ("release (2A/04 to B)", lambda t: out(t, A, PrOutAction.RELEASE, K, 0, EA_RO)),
    ("clear (2A/03 to B)", lambda t: out(t, A, PrOutAction.CLEAR, K, 0)),
    ("preempt (2A/05 to A)", lambda t: out(t, B, PrOutAction.PREEMPT, KB, K, WE)),
    ("preempt and abort", lambda t: out(t, B, PrOutAction.PREEMPT_AND_ABORT, KB, K, WE)),
    ("register and move", lambda t: t.persistent_reserve_out(
        A, pr_out_cdb(PrOutAction.REGISTER_AND_MOVE, EA_RO, 0, len(MOVE_TO_C)), MOVE_TO_C)),
]


@pytest.mark.parametrize("where", ["write", "rename", "fsync_dir"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize(("what", "command"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_failed_save_changes_nothing(tmp_path, monkeypatch, caplog, ua, what, command, err, where):
    store = FailingStore(monkeypatch, where)
    store.err = err
    aborted: list[set[Nexus]] = []
    path = tmp_path / "lun0-pr.json"
    t = ReservationTable(ua, path, abort_tasks=aborted.append)
    register(t, A, K, aptpl=True)
    register(t, B, KB, aptpl=True)
    reserve(t, A, K, EA_RO)
    ua.clear()
    before, file_before = state_of(t), path.read_bytes()
    store.failing = True
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prmigrate"), check(Sense.LOGICAL_UNIT_COMMUNICATION_FAILURE):
        command(t)
    assert state_of(t) == before
    assert path.read_bytes() == file_before  # the old state, also after a non-durable rename
    assert [p.name for p in tmp_path.iterdir()] == ["lun0-pr.json"]  # no temporary file left
    assert ua.events == [] and aborted == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not applied" in errors[0].getMessage()
    # Space is back: the same command is applied, with its unit attentions.
    store.failing = False
    command(t)
    assert state_of(t) != before
    if t.aptpl:
        assert ReservationTable(UaLog(), path).registrations == t.registrations
    else:
        assert not path.exists()


def test_uas_and_aborts_follow_a_successful_save(tmp_path, ua):
    aborted: list[set[Nexus]] = []
    t = ReservationTable(ua, tmp_path / "lun0-pr.json", abort_tasks=aborted.append)
    for n, key in ((A, K), (B, KB), (C, KC)):
        register(t, n, key, aptpl=True)
    reserve(t, A, K, EA_RO)
    out(t, B, PrOutAction.PREEMPT_AND_ABORT, KB, K, WE)
    # the type changed: 2A/04 to the remaining C, 2A/05 to the preempted A
    assert sorted(ua.events, key=str) == sorted(
        [(C, Sense.RESERVATIONS_RELEASED), (A, Sense.REGISTRATIONS_PREEMPTED)], key=str)
    assert aborted == [{A}]


def test_first_aptpl_register_fails_closed(tmp_path, ua, store):
    path = tmp_path / "lun0-pr.json"
    t = ReservationTable(ua, path)
    register(t, A, K)  # no APTPL: nothing written, nothing to fail
    store.failing = True
    register(t, B, KB)  # still no APTPL: no file touched, so no failure
    with check(Sense.LOGICAL_UNIT_COMMUNICATION_FAILURE):
        register(t, C, KC, aptpl=True)
    assert [r.key for r in t.registrations] == [K, KB] and not t.aptpl and t.generation == 2
    assert not path.exists()


def test_reserve_fails_closed(table, store):
    out(table, A, PrOutAction.RELEASE, K, 0, EA_RO)
    register(table, C, KC, aptpl=True)
    before = state_of(table)
    store.failing = True
    with check(Sense.LOGICAL_UNIT_COMMUNICATION_FAILURE):
        reserve(table, C, KC, WE_AR)
    assert state_of(table) == before and table.reservation is None


def test_logical_unit_answers_not_ready(tmp_path, store):
    lu = LogicalUnit(tmp_path / "img", 1 << 20, state_dir=tmp_path)
    try:
        data = pr_out_params(0, K, aptpl=True)
        cdb = pr_out_cdb(PrOutAction.REGISTER, 0, 0, len(data))
        store.failing = True
        r = lu.execute(A, cdb, data)
        assert r.status == Status.CHECK_CONDITION
        assert sense_triple(r.sense) == (SenseKey.NOT_READY, 0x08, 0x00)
        assert lu.pr.registrations == () and lu.pr.generation == 0
        store.failing = False
        assert lu.execute(A, cdb, data).status == Status.GOOD
        assert lu.pr.registration_of(A) is not None
    finally:
        lu.close()
