"""Task management rules and queue (``device/tmf.py``), without I/O."""

from __future__ import annotations

from prmigrate.device.tmf import GUEST_TMFS, TmfQueue, backend_tmf, guest_function, release
from prmigrate.iscsi.pdu import TmfFunction
from prmigrate.scsi.constants import Opcode


def test_guest_resets_become_a_logical_unit_reset_of_the_backend_lun() -> None:
    for fn in (TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
        rule = GUEST_TMFS[fn]
        assert rule.backend is TmfFunction.LOGICAL_UNIT_RESET and rule.call == "lun_reset" and rule.resets
    clear = GUEST_TMFS[TmfFunction.CLEAR_TASK_SET]
    assert clear.backend is TmfFunction.CLEAR_TASK_SET and clear.call == "clear_task_set" and not clear.resets
    assert set(GUEST_TMFS) == {TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.TARGET_WARM_RESET,
                               TmfFunction.TARGET_COLD_RESET, TmfFunction.CLEAR_TASK_SET}


def test_the_frontends_reset_call_names_its_function() -> None:
    assert guest_function(False, False) is TmfFunction.LOGICAL_UNIT_RESET
    assert guest_function(False, True) is TmfFunction.LOGICAL_UNIT_RESET
    assert guest_function(True, False) is TmfFunction.TARGET_WARM_RESET
    assert guest_function(True, True) is TmfFunction.TARGET_COLD_RESET


def test_backend_functions_and_the_release_of_a_departed_holder() -> None:
    t = backend_tmf("g1", TmfFunction.TARGET_WARM_RESET)
    assert (t.key, t.what, t.call, t.release) == ("g1", "LOGICAL UNIT RESET", "lun_reset", b"")
    cdb = bytes((Opcode.RELEASE_10,)) + bytes(9)
    r = release("g1", cdb)
    assert (r.what, r.call, r.release) == ("RELEASE_10", "", cdb)


def test_functions_go_one_at_a_time_in_order() -> None:
    q = TmfQueue()
    a, b, c = (backend_tmf(k, TmfFunction.CLEAR_TASK_SET) for k in "abc")
    assert not q.busy
    assert q.add(a) is a and q.busy
    assert q.add(b) is None and q.add(c) is None  # they wait their turn
    assert q.done() is b and q.busy
    assert q.done() is c
    assert q.done() is None and not q.busy  # none left: the guest commands go
