import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prmigrate.device import journal as jmod
from prmigrate.device.journal import (
    Intent,
    JournalCorrupt,
    JournalError,
    JournalVersionError,
    PrJournal,
)
from prmigrate.device.state import DevicePrState, GuestPrState
from prmigrate.scsi.constants import PrOutAction, PrType
from prmigrate.scsi.pr import pr_out_cdb, pr_out_params


def _state(key=0x1234, holder=True):
    s = DevicePrState()
    s.set(
        "iqn.a:g1",
        GuestPrState(key, True, holder, PrType.WRITE_EXCLUSIVE if holder else PrType.NONE),
    )
    s.set("iqn.a:g2", GuestPrState(0x99))
    s.generation = 7
    return s


def test_missing_file_is_none(tmp_path):
    assert PrJournal(tmp_path / "vm1.json").load() is None


def test_save_load_round_trip_and_seq(tmp_path):
    p = tmp_path / "vm1.json"
    j = PrJournal(p)
    assert j.load() is None
    assert j.save(_state()) == 1
    assert j.save(_state(0x55)) == 2
    rec = PrJournal(p).load()
    assert rec is not None and rec.seq == 2 and not rec.needs_reconcile
    assert rec.state.to_dict() == _state(0x55).to_dict()
    # a new writer after a restart continues the sequence
    j2 = PrJournal(p)
    j2.load()
    assert j2.save(DevicePrState()) == 3
    assert PrJournal(p).load().state.guests == {}


def test_save_without_load_keeps_seq_increasing(tmp_path):
    p = tmp_path / "vm1.json"
    j = PrJournal(p)
    for _ in range(4):
        j.save(_state())
    assert PrJournal(p).save(_state()) == 5


def test_state_is_copied(tmp_path):
    s = _state()
    j = PrJournal(tmp_path / "j")
    j.save(s)
    s.set("iqn.a:g1", GuestPrState())
    assert PrJournal(tmp_path / "j").load().state.get("iqn.a:g1").key == 0x1234


def test_unverified_marks_survive(tmp_path):
    s = _state()
    s.mark_unverified("IQN.A:G2")
    PrJournal(tmp_path / "j").save(s)
    assert PrJournal(tmp_path / "j").load().state.unverified == {"iqn.a:g2"}


CDB = pr_out_cdb(PrOutAction.PREEMPT, PrType.WRITE_EXCLUSIVE)
PARAMS = pr_out_params(0x1234, 0x1234)


def test_intent_then_commit(tmp_path):
    p = tmp_path / "j"
    j = PrJournal(p)
    j.save(_state())
    intent = j.begin("IQN.A:G1", CDB, PARAMS)
    rec = PrJournal(p).load()  # what a restart right now would see
    assert rec.needs_reconcile and rec.intents == (intent,)
    assert (
        rec.intents[0].guest == "iqn.a:g1" and rec.intents[0].service_action == PrOutAction.PREEMPT
    )
    assert rec.intents[0].data_out == PARAMS
    assert rec.recovered_state().unverified == {"iqn.a:g1"}
    assert not rec.state.unverified
    j.commit(intent, _state(0x77))
    rec = PrJournal(p).load()
    assert not rec.needs_reconcile and rec.state.get("iqn.a:g1").key == 0x77


def test_commit_without_state_keeps_state(tmp_path):
    j = PrJournal(tmp_path / "j")
    j.save(_state())
    i = j.begin("g", CDB, PARAMS)
    j.commit(i)
    rec = PrJournal(tmp_path / "j").load()
    assert rec.state.to_dict() == _state().to_dict() and rec.intents == ()


def test_concurrent_intents_and_restart(tmp_path):
    p = tmp_path / "j"
    j = PrJournal(p)
    a = j.begin("g1", CDB, PARAMS)
    b = j.begin("g2", CDB, PARAMS)
    assert a.id != b.id
    j.commit(a, _state())
    # crash here: restart sees b pending
    j2 = PrJournal(p)
    rec = j2.load()
    assert [i.id for i in rec.intents] == [b.id]
    c = j2.begin("g3", CDB, PARAMS)
    assert c.id > b.id
    j2.clear_intents(DevicePrState())
    assert PrJournal(p).load().intents == ()


def test_atomic_replace_leaves_no_partial_file(tmp_path, monkeypatch):
    p = tmp_path / "j"
    j = PrJournal(p)
    j.save(_state())
    before = p.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(jmod.os, "replace", boom)
    with pytest.raises(JournalError):
        j.save(_state(0x55))
    assert p.read_bytes() == before  # the old record is intact
    monkeypatch.undo()
    assert j.save(_state(0x55)) == 2  # seq not burnt by the failed write


def test_fsync_file_and_directory(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(jmod.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    PrJournal(tmp_path / "j").save(_state())
    assert len(calls) == 2  # the temp file, then the directory


def test_no_temp_file_left(tmp_path):
    PrJournal(tmp_path / "j").save(_state())
    assert sorted(os.listdir(tmp_path)) == ["j"]


def _valid_bytes(tmp_path):
    p = tmp_path / "v"
    j = PrJournal(p)
    j.save(_state())
    j.begin("g", CDB, PARAMS)
    return p.read_bytes()


@pytest.mark.parametrize("cut", [0, 1, 10, 50, -2, -10])
def test_truncated_file_is_corrupt(tmp_path, cut):
    raw = _valid_bytes(tmp_path)
    p = tmp_path / "j"
    p.write_bytes(raw[:cut] if cut >= 0 else raw[:cut])
    with pytest.raises(JournalCorrupt):
        PrJournal(p).load()


def test_trailing_newline_cut_is_fine(tmp_path):
    raw = _valid_bytes(tmp_path)
    assert PrJournal.decode(raw[:-1]).seq == 2


def test_bit_flip_fails_checksum(tmp_path):
    raw = _valid_bytes(tmp_path)
    obj = json.loads(raw)
    obj["state"]["guests"]["iqn.a:g1"]["key"] += 1
    with pytest.raises(JournalCorrupt, match="checksum"):
        PrJournal.decode(json.dumps(obj).encode())


@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"\xff\xfe", b"[]", b"{}", b'{"format": "other"}', b"null", b"[" * 100000],
)
def test_garbage_is_corrupt(raw):
    with pytest.raises(JournalCorrupt):
        PrJournal.decode(raw)


def _resign(obj):
    obj.pop("crc32", None)
    obj["crc32"] = jmod.zlib.crc32(jmod._canonical(obj))
    return json.dumps(obj).encode()


def test_newer_version_refused(tmp_path):
    obj = json.loads(_valid_bytes(tmp_path))
    obj["version"] = 2
    with pytest.raises(JournalVersionError):
        PrJournal.decode(_resign(obj))


@pytest.mark.parametrize(
    "patch",
    [
        {"seq": -1},
        {"seq": "1"},
        {"state": []},
        {"state": {"guests": {"g": {"key": "x"}}}},
        {"state": {"guests": {"g": {"rtype": 2}}}},
        {"state": {"guests": {"g": 5}}},
        {"intents": {}},
        {"intents": [5]},
        {"intents": [{"id": 1, "guest": "g", "cdb": "zz"}]},
        {"version": "1"},
    ],
)
def test_well_signed_but_invalid_records_are_corrupt(tmp_path, patch):
    obj = json.loads(_valid_bytes(tmp_path)) | patch
    with pytest.raises(JournalCorrupt):
        PrJournal.decode(_resign(obj))


def test_unreadable_path_is_journal_error(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(JournalError):
        PrJournal(d).load()


def test_remove(tmp_path):
    j = PrJournal(tmp_path / "j")
    j.save(_state())
    j.remove()
    j.remove()
    assert PrJournal(tmp_path / "j").load() is None


def test_intent_round_trip():
    i = Intent(3, "g", CDB, PARAMS)
    assert Intent.from_dict(i.to_dict()) == i
    assert Intent(1, "g", b"").service_action is None


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(raw):
    try:
        PrJournal.decode(raw)
    except JournalCorrupt:
        pass


@settings(max_examples=200, deadline=None)  # writes files: a loaded machine is slow
@given(st.data())
def test_random_truncation_or_flip_of_a_record(tmp_path_factory, data):
    raw = _valid_bytes(tmp_path_factory.mktemp("j"))
    cut = data.draw(st.integers(0, len(raw)))
    mutated = bytearray(raw[:cut])
    if mutated and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] ^= data.draw(st.integers(1, 255))
    try:
        rec = PrJournal.decode(bytes(mutated))
    except JournalCorrupt:
        return
    assert rec.state.to_dict() == PrJournal.decode(raw).state.to_dict()  # only whitespace damage


def test_failed_begin_leaves_no_intent(tmp_path, monkeypatch):
    """A PR OUT whose intent could not be written is not forwarded, so the
    intent must not ride along with a later write either (nor a temp file
    cut short hold the space of a full disk)."""
    p = tmp_path / "j"
    j = PrJournal(p)
    j.save(_state())

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jmod.os, "replace", full)
    cdb = pr_out_cdb(PrOutAction.REGISTER, 0, 0, 24)
    with pytest.raises(JournalError):
        j.begin("iqn.a:g1", cdb, pr_out_params(0, 0x77))
    assert j.pending_intents == ()
    assert sorted(os.listdir(tmp_path)) == ["j"]
    monkeypatch.undo()
    j.save(_state(0x55))
    rec = PrJournal(p).load()
    assert rec is not None and rec.intents == () and not rec.needs_reconcile
