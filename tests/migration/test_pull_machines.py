"""The watch channel's machines (migration/pull.py): both ends, their tables,
the pull, its failures, the source's own handover; and the two ends run
against each other over a real (in-memory) channel."""

from __future__ import annotations

import pytest

from prmigrate.device.state import DevicePrState
from prmigrate.migration.channel import (
    Abort,
    Authenticated,
    Channel,
    Described,
    Message,
    Pull,
    Pulled,
    Role,
    Watch,
)
from prmigrate.migration.errors import AbortReason, EventNotAllowed
from prmigrate.migration.machine import (
    Action,
    Cancel,
    ChannelLost,
    ChannelUp,
    Connect,
    Finished,
    Log,
    SendMessage,
    Start,
)
from prmigrate.migration.pull import (
    PULL_CLIENT_TABLE,
    PULL_SERVER_TABLE,
    Arrived,
    DescribeDevice,
    DescriptionReady,
    DeviceDescribed,
    DeviceMissing,
    Disconnect,
    MigrationEnded,
    PullClient,
    PullClientState,
    PullNow,
    PullResult,
    PullServer,
    PullServerState,
    SessionsBack,
    SessionsGone,
    StartMigration,
)
from prmigrate.migration.stream import DeviceSnapshot, encode_snapshot

C, P = PullClientState, PullServerState
IDENTITY = {"inquiry_std": "00" * 36, "capacity_blocks": 8, "block_size": 512}
STREAM = encode_snapshot(DeviceSnapshot("vm1", {"name": "vm1"}, IDENTITY, DevicePrState()))


def sent(actions: list[Action]) -> list[Message]:
    return [a.message for a in actions if isinstance(a, SendMessage)]


def acts(actions: list[Action]) -> list[Action]:
    """The actions that do something (not the log lines or the end report)."""
    return [a for a in actions if not isinstance(a, Log | Finished)]


def results(actions: list[Action]) -> list[PullResult]:
    return [a for a in actions if isinstance(a, PullResult)]


def described_client() -> PullClient:
    m = PullClient("vm1", "127.0.0.3:4444")
    assert Connect() in m.handle(Start(), 0)
    assert sent(m.handle(ChannelUp(), 0.1)) == [Watch("vm1", "127.0.0.3:4444")]
    out = m.handle(Described(STREAM), 0.2)
    assert [type(a) for a in out if isinstance(a, DescriptionReady)] == [DescriptionReady]
    assert m.state is C.WAITING and m.described
    return m


def watched_server() -> PullServer:
    m = PullServer()
    assert acts(m.handle(Watch("vm1", "127.0.0.3:4444"), 0)) == [DescribeDevice("vm1")]
    assert sent(m.handle(DeviceDescribed(STREAM), 0)) == [Described(STREAM)]
    assert m.state is P.WATCHED
    return m


# ---------------------------------------------------------------- destination


def test_a_command_pulls_and_the_answer_settles_it() -> None:
    m = described_client()
    out = m.handle(PullNow(), 1)
    assert sent(out) == [Pull()] and m.state is C.PULLING
    assert acts(m.handle(PullNow(), 1.1)) == []  # one pull answers every held command
    assert m.pulls == 1
    out = m.handle(Pulled(True), 1.5)
    assert results(out) == [PullResult(True, "")]
    assert m.state is C.ARRIVED and m.finished
    assert any(isinstance(a, Finished) for a in out)


def test_a_refused_pull_fails_the_held_commands_and_the_next_pulls_again() -> None:
    m = described_client()
    m.handle(PullNow(), 1)
    out = m.handle(Pulled(False, "takeover refused"), 1.2)
    assert results(out) == [PullResult(False, "takeover refused")]
    assert m.state is C.WAITING
    assert sent(m.handle(PullNow(), 2)) == [Pull()]
    assert m.pulls == 2


def test_a_lost_channel_fails_the_pull_and_the_next_command_reconnects() -> None:
    m = described_client()
    m.handle(PullNow(), 1)
    out = m.handle(ChannelLost("reset"), 1.1)
    assert results(out) == [PullResult(False, "reset")] and Disconnect() in out
    assert m.state is C.DISCONNECTED
    assert Connect() in m.handle(PullNow(), 2)
    assert m.state is C.CONNECTING
    m.handle(ChannelUp(), 2.1)
    out = m.handle(Described(STREAM), 2.2)  # described again: the pending pull goes out
    assert sent(out) == [Pull()] and m.state is C.PULLING
    assert not any(isinstance(a, DescriptionReady) for a in out)  # the device exists already


def test_an_unreachable_source_fails_the_pull_at_its_timer() -> None:
    m = described_client()
    m.handle(ChannelLost("source restarted"), 1)
    m.handle(PullNow(), 2)
    assert m.get_timer() == pytest.approx(2 + m.connect_timeout)
    out = m.handle_timer(2 + m.connect_timeout)
    assert results(out) and not results(out)[0].success
    assert m.state is C.DISCONNECTED


def test_a_pull_without_an_answer_times_out() -> None:
    m = described_client()
    m.handle(PullNow(), 1)
    out = m.handle_timer(1 + m.pull_timeout)
    assert results(out) == [PullResult(False, "pulling took longer than allowed")]
    assert m.state is C.DISCONNECTED


def test_no_description_means_no_device() -> None:
    m = PullClient("vm1", "b:1")
    m.handle(Start(), 0)
    m.handle(ChannelUp(), 0)
    out = m.handle(Abort(AbortReason.DEVICE, "device 'vm1' is not served here"), 0.1)
    assert m.state is C.CLOSED and Disconnect() in out and m.reason is AbortReason.DEVICE
    m = PullClient("vm1", "b:1")
    m.handle(Start(), 0)
    m.handle(ChannelLost("connection refused"), 0.1)
    assert m.state is C.CLOSED


def test_a_description_of_another_device_is_refused() -> None:
    m = PullClient("vm2", "b:1")
    m.handle(Start(), 0)
    m.handle(ChannelUp(), 0)
    m.handle(Described(STREAM), 0.1)
    assert m.state is C.CLOSED and not m.described


def test_arrival_by_another_migration_ends_the_watch() -> None:
    m = described_client()  # the source handed over on its own, or a push
    m.handle(PullNow(), 1)
    out = m.handle(Arrived(), 1.5)
    assert results(out) == [PullResult(True, "arrived")] and m.state is C.ARRIVED


def test_delete_ends_the_watch_and_fails_what_waits() -> None:
    m = described_client()
    m.handle(PullNow(), 1)
    out = m.handle(Cancel(AbortReason.CANCELLED, "incoming device deleted"), 1.1)
    assert results(out) == [PullResult(False, "incoming device deleted")]
    assert m.state is C.CLOSED


def test_the_client_table_refuses_what_it_does_not_list() -> None:
    m = PullClient("vm1", "b:1")
    with pytest.raises(EventNotAllowed):
        m.handle(Pulled(True), 0)  # nothing asked yet
    m = described_client()
    with pytest.raises(EventNotAllowed):
        m.handle(Described(STREAM), 1)  # described twice on one channel
    assert m.state is C.WAITING


# ---------------------------------------------------------------- source


def test_a_pull_starts_the_pushed_migration_and_reports_it() -> None:
    m = watched_server()
    assert acts(m.handle(Pull(), 1)) == [StartMigration("vm1", "127.0.0.3:4444")]
    assert m.state is P.MIGRATING
    assert acts(m.handle(Pull(), 1.1)) == []  # the running migration answers it
    out = m.handle(MigrationEnded(True), 2)
    assert sent(out) == [Pulled(True, "")] and m.state is P.HANDED_OVER


def test_a_failed_migration_keeps_serving_and_the_next_pull_tries_again() -> None:
    m = watched_server()
    m.handle(Pull(), 1)
    out = m.handle(MigrationEnded(False, "pr-takeover: conflict"), 2)
    assert sent(out) == [Pulled(False, "pr-takeover: conflict")] and m.state is P.WATCHED
    assert StartMigration("vm1", "127.0.0.3:4444") in m.handle(Pull(), 3)
    assert m.migrations == 2


def test_the_last_session_gone_hands_over_after_the_grace() -> None:
    m = watched_server()
    m.handle(SessionsBack(), 0.5)
    m.handle(SessionsGone(), 1)
    assert m.state is P.IDLE_WAIT and m.get_timer() == pytest.approx(1 + m.grace)
    assert acts(m.handle_timer(1 + m.grace / 2)) == []
    out = m.handle_timer(1 + m.grace)
    assert StartMigration("vm1", "127.0.0.3:4444") in out and m.state is P.MIGRATING


def test_a_session_back_within_the_grace_keeps_the_device() -> None:
    m = watched_server()
    m.handle(SessionsGone(), 1)
    m.handle(SessionsBack(), 1.2)  # the guest reconnected (a transient drop)
    assert m.state is P.WATCHED and m.get_timer() is None


def test_a_missing_device_is_refused() -> None:
    m = PullServer()
    m.handle(Watch("vm9", "b:1"), 0)
    out = m.handle(DeviceMissing("device 'vm9' is not served here"), 0)
    assert sent(out) == [Abort(AbortReason.DEVICE, "device 'vm9' is not served here")]
    assert m.state is P.CLOSED


def test_a_watcher_gone_is_forgotten() -> None:
    m = watched_server()
    m.handle(ChannelLost("closed"), 1)
    assert m.state is P.CLOSED and m.finished


def test_the_server_table_refuses_a_pull_before_watch() -> None:
    with pytest.raises(EventNotAllowed):
        PullServer().handle(Pull(), 0)


@pytest.mark.parametrize("tbl", [PULL_CLIENT_TABLE, PULL_SERVER_TABLE])
def test_terminal_states_have_no_exits(tbl: dict) -> None:
    terminal = {C.ARRIVED, C.CLOSED, P.HANDED_OVER, P.CLOSED}
    assert not [k for k in tbl if k[0] in terminal]


# ---------------------------------------------------------------- both, over a channel


def test_both_ends_over_a_real_channel() -> None:
    secret = b"cluster-secret-0123456789"
    cc = Channel(Role.CLIENT, secret, bytes(range(32)), "hostb|iqn.b")
    sc = Channel(Role.SERVER, secret, bytes(range(32, 64)), "hosta|127.0.0.2:3260")
    client, server = PullClient("vm1", "127.0.0.3:4444"), PullServer()
    log: list[str] = []

    def run_client(actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendMessage):
                cc.send(a.message)
            log.append(type(a).__name__)

    def run_server(actions: list[Action], now: float) -> None:
        for a in actions:
            if isinstance(a, SendMessage):
                sc.send(a.message)
            elif isinstance(a, DescribeDevice):
                run_server(server.handle(DeviceDescribed(STREAM), now), now)
            elif isinstance(a, StartMigration):
                log.append(f"migrate {a.device} -> {a.to}")
                run_server(server.handle(MigrationEnded(True), now), now)

    def pump(now: float) -> None:
        for _ in range(6):
            for ev in sc.receive_data(cc.data_to_send()):
                if not isinstance(ev, Authenticated):
                    run_server(server.handle(ev, now), now)
            for ev in cc.receive_data(sc.data_to_send()):
                run_client(client.handle(ChannelUp() if isinstance(ev, Authenticated) else ev, now))

    run_client(client.handle(Start(), 0))
    cc.start()
    pump(0)
    assert client.state is C.WAITING and server.state is P.WATCHED
    run_client(client.handle(PullNow(), 1))
    pump(1)
    assert "migrate vm1 -> 127.0.0.3:4444" in log
    assert client.state is C.ARRIVED and server.state is P.HANDED_OVER


# ---------------------------------------------------------------- random runs

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CLIENT_EVENTS = [Start(), ChannelUp(), Described(STREAM), PullNow(), Pulled(True), Pulled(False, "no"),
                 Abort(AbortReason.DEVICE, "gone"), ChannelLost("cut"), Arrived(),
                 Cancel(AbortReason.CANCELLED, "deleted"), "timer"]
SERVER_EVENTS = [Watch("vm1", "b:1"), DeviceDescribed(STREAM), DeviceMissing("gone"), Pull(), SessionsGone(),
                 SessionsBack(), MigrationEnded(True), MigrationEnded(False, "no"), ChannelLost("cut"),
                 Cancel(AbortReason.CANCELLED), "timer"]


def _feed(m, ev, now: float) -> list[Action] | None:  # type: ignore[no-untyped-def]
    if ev == "timer":
        t = m.get_timer()
        return m.handle_timer(t) if t is not None else []
    if not m.allowed(ev):
        with pytest.raises(EventNotAllowed):
            m.handle(ev, now)
        return None
    return m.handle(ev, now)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(range(len(CLIENT_EVENTS))), max_size=25))
@example([0, 3, 1, 6])  # a pull asked before the description, then the source refuses
def test_random_client_runs_answer_every_pull(seq: list[int]) -> None:
    """Every PullNow is answered (PullResult) by the time nothing more can
    answer it: in WAITING, DISCONNECTED or a terminal state no pull is pending."""
    m = PullClient("vm1", "b:1")
    asked = answered = 0
    for i, k in enumerate(seq):
        ev = CLIENT_EVENTS[k]
        before = m.state
        out = _feed(m, ev, float(i))
        if out is None:
            assert m.state is before
            continue
        asked += isinstance(ev, PullNow)
        answered += len(results(out))
        if m.state in (C.WAITING, C.DISCONNECTED) or m.finished:
            assert not m.pending, (m.state, seq)
        if m.pending:
            assert m.state in (C.CONNECTING, C.WATCHING, C.PULLING)
    if asked:
        assert answered or m.pending


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(range(len(SERVER_EVENTS))), max_size=25))
def test_random_server_runs_start_one_migration_at_a_time(seq: list[int]) -> None:
    m = PullServer(grace=1.0)
    running = 0
    for i, k in enumerate(seq):
        ev = SERVER_EVENTS[k]
        out = _feed(m, ev, float(i))
        if out is None:
            continue
        if isinstance(ev, MigrationEnded) and running:
            running -= 1
        running += sum(isinstance(a, StartMigration) for a in out)
        assert running <= 1, seq
        assert (m.state is P.MIGRATING) == (running == 1) or m.finished
