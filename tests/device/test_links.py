"""The link table (``device/links.py``) alone: events in, actions out, no
event loop and no backend."""

from __future__ import annotations

from typing import Any

from prmigrate.device.config import DeviceConfig
from prmigrate.device.errors import DeviceError
from prmigrate.device.identity import DeviceIdentity
from prmigrate.device.links import ABORTED, BUSY, Action, Do, LinkTable, Waiting
from prmigrate.iscsi.initiator_core import HOLD_TIMEOUT, PERSISTENT, IscsiError
from prmigrate.iscsi.pdu import TmfFunction
from prmigrate.lun.types import Nexus, Result
from prmigrate.scsi.constants import Opcode, Status
from prmigrate.scsi.sense import Sense, encode_sense

G1 = "iqn.2026-11.org.prmigrate:guest1"
G2 = "iqn.2026-11.org.prmigrate:guest2"
BACKEND = "iscsi://127.0.0.1:3260/iqn.2026-11.org.prmigrate:shared/0"
SHARED = "iqn.2026-11.org.prmigrate:shared"
HOST = "iqn.2026-11.org.prmigrate:hosta"
RESERVE6 = bytes((Opcode.RESERVE_6, 0, 0, 0, 0, 0))


class Table(LinkTable):
    def __init__(self) -> None:
        super().__init__(DeviceConfig("vm1", BACKEND, SHARED, machine="pc-q35-11.0"), HOST,
                         identity=DeviceIdentity(b"\x00" * 36, {}, 16, 512))
        self._session_options = {"queue_depth": 4}

    def want_verify(self, reason: str = "state in doubt") -> None:
        pass


def nexus(guest: str = G1, isid: int = 0x23D000000001) -> Nexus:
    return Nexus.make(guest, isid, "iqn.2026-11.org.prmigrate:vm1")


def cmd(i: int) -> Waiting:
    return Waiting(bytes((0x28,)) + bytes(9), b"", 512, f"token{i}")


def dos(actions: list[Action]) -> list[Do]:
    return [a.do for a in actions]


def opened(t: Table, guest: str = G1) -> Any:
    """The shell's side of an Open: the handle, then the session."""
    b = t.link(guest)
    b.opening = "task"
    b.session, b.opening = object(), None
    return b


def test_commands_wait_in_order_for_the_login_then_go() -> None:
    t = Table()
    b = t.link(G1)
    assert dos(t.queue(b, cmd(1))) == [Do.OPEN]
    b.opening = "task"  # the shell keeps its handle there
    assert t.queue(b, cmd(2)) == []  # opening already
    b.session, b.opening = object(), None
    [send] = t.opened(b)
    assert send.do is Do.SEND and send.link is b and [c.token for c in send.commands] == ["token1", "token2"]
    assert b.waiting == []


def test_a_login_given_up_answers_busy() -> None:
    t = Table()
    b = t.link(G1)
    t.queue(b, cmd(1))
    t.queue(b, cmd(2))
    [answer] = t.open_failed(b)
    assert answer.do is Do.ANSWER and answer.result is BUSY and len(answer.commands) == 2
    assert BUSY.status == Status.BUSY
    assert t.open_failed(b) == []  # nothing waits any more


def test_a_task_management_function_holds_every_backend_nexus() -> None:
    t = Table()
    b1, b2 = opened(t, G1), t.link(G2)
    n1 = nexus()
    b1.attach(n1)
    b2.attach(nexus(G2))
    [run] = t.guest_tmf(n1, TmfFunction.LOGICAL_UNIT_RESET)
    assert run.do is Do.TMF and run.tmf is not None and run.tmf.call == "lun_reset" and run.tmf.key == b1.key
    assert b1.paused and b2.paused and b1.sole is None  # no fast path meanwhile
    assert t.queue(b1, cmd(1)) == []  # open: waits for the function, no login
    assert dos(t.queue(b2, cmd(2))) == [Do.OPEN]  # not open: logs in meanwhile
    b2.session = object()
    assert t.opened(b2) == []  # logged in: still waits for the function
    assert t.guest_tmf(n1, TmfFunction.CLEAR_TASK_SET) == []  # waits its turn
    nxt = t.tmf_done()
    assert dos(nxt) == [Do.TMF] and nxt[0].tmf is not None and nxt[0].tmf.call == "clear_task_set"
    done = t.tmf_done()
    assert sorted(a.link.key for a in done if a.link is not None) == sorted([b1.key, b2.key])
    assert dos(done) == [Do.SEND, Do.SEND] and not b1.paused and b1.sole is n1


def test_no_function_for_a_backend_nexus_not_open() -> None:
    t = Table()
    t.link(G1).attach(nexus())
    assert t.guest_tmf(nexus(), TmfFunction.TARGET_WARM_RESET) == []
    assert not t.tmfs.busy


def test_the_last_frontend_closes_the_link_unless_held() -> None:
    t = Table()
    b = opened(t)
    n = nexus()
    b.attach(n)
    [close] = t.frontend_gone(n)
    assert close.do is Do.CLOSE and close.link is b
    b.closing = "task"
    assert t.unused(b) == []  # closing already
    t2 = Table()
    b2 = opened(t2)
    b2.attach(n)
    t2.hold()
    assert t2.frontend_gone(n) == []  # the migration decides
    held, closing = t2.resumed()
    assert held == [] and dos(closing) == [Do.CLOSE]


def test_a_departed_scsi2_holder_gets_its_release_sent_like_a_function() -> None:
    t = Table()
    b = opened(t)
    n1, n2 = nexus(isid=0x23D000000001), nexus(isid=0x23D000000002)
    b.attach(n1)
    b.attach(n2)
    b.observe(n1, RESERVE6, Result(), registered=False)
    assert b.holder == n1
    [run] = t.frontend_gone(n1)  # n2 keeps the backend nexus
    assert run.do is Do.TMF and run.tmf is not None and run.tmf.release[0] == Opcode.RELEASE_6
    assert b.paused


def test_closing_drops_the_scsi2_reservation_and_hands_over_the_session() -> None:
    t = Table()
    b = opened(t)
    n = nexus()
    b.attach(n)
    b.observe(n, RESERVE6, Result(), registered=False)
    session = b.session
    assert t.closing_started(b) is session and b.session is None and b.holder is None
    assert t.closing_started(b) is None


def test_shut_fails_what_waits_and_refuses_new_sessions() -> None:
    t = Table()
    b = t.link(G1)
    t.queue(b, cmd(1))
    [answer] = t.shut()
    assert answer.do is Do.ANSWER and isinstance(answer.result, DeviceError) and b.waiting == []
    try:
        t.want_session(b)
    except DeviceError:
        pass
    else:
        raise AssertionError("a closed device opened a session")


def test_a_command_the_session_will_not_send() -> None:
    t = Table()
    bad = t.not_forwarded(bytes(6), ValueError("CDB too long"))
    assert bad.sense == encode_sense(Sense.INVALID_FIELD_IN_CDB)
    assert t.not_forwarded(bytes(6), IscsiError("no connection")) is ABORTED


def test_session_options_keep_the_devices_own_and_add_the_callbacks() -> None:
    t = Table()
    opts = t.session_options("event", "reconnect")
    assert opts["queue_depth"] == 4  # the device's own wins
    assert opts["reconnect_policy"] is PERSISTENT and opts["hold_timeout"] == HOLD_TIMEOUT
    assert opts["on_async_event"] == "event" and opts["on_reconnect"] == "reconnect"
    assert "on_reconnect" not in t.session_options()
