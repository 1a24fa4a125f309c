"""QMP core (fed bytes whole, byte by byte, with trailing data) and its
asyncio shell, driven by our client and by ``qemu.qmp``'s."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prmigrate.qmp import (
    ArgType,
    Call,
    CommandSpec,
    CommandTable,
    JsonSplitter,
    QmpClient,
    QmpError,
    QmpServer,
    QmpSession,
    Send,
    arg,
    greeting,
    qmp_call,
)

TABLE = CommandTable([
    CommandSpec("query-devices"),
    CommandSpec("migrate", (arg("device", ArgType.STRING), arg("to", ArgType.STRING),
                            arg("pr", ArgType.BOOLEAN, optional=True),
                            arg("timeout", ArgType.NUMBER, optional=True),
                            arg("lun", ArgType.INTEGER, optional=True))),
    CommandSpec("device-add", (arg("name", ArgType.STRING),), extra=ArgType.STRING),
])
NEGOTIATE = b'{"execute": "qmp_capabilities"}'


def session(negotiated: bool = True) -> QmpSession:
    s = QmpSession(TABLE, greeting("1.2.3"))
    if negotiated:
        (a,) = s.feed(NEGOTIATE)
        assert isinstance(a, Send) and json.loads(a.data) == {"return": {}}
    return s


def answers(s: QmpSession, data: bytes) -> list[dict | Call]:
    return [json.loads(a.data) if isinstance(a, Send) else a for a in s.feed(data)]


def test_greeting_has_qemus_shape() -> None:
    g = json.loads(QmpSession(TABLE, greeting("0.1.0")).hello())
    assert g == {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0},
                                     "package": "prmigrate 0.1.0"},
                         "capabilities": []}}
    assert QmpSession(TABLE).hello().endswith(b"\r\n")


def test_commands_are_refused_until_negotiation() -> None:
    s = session(negotiated=False)
    (a,) = answers(s, b'{"execute": "query-devices", "id": 1}')
    assert a == {"error": {"class": "CommandNotFound",
                           "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                 "id": 1}
    assert s.event("X", {}, 1.0) is None
    (a,) = answers(s, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert a["error"] == {"class": "GenericError", "desc": "Capability 'oob' not available"}
    assert not s.negotiated
    (a,) = answers(s, b'{"execute": "qmp_capabilities", "id": "x"}')
    assert a == {"return": {}, "id": "x"}
    (a,) = answers(s, b'{"execute": "qmp_capabilities"}')
    assert a["error"]["class"] == "CommandNotFound"
    assert "already complete" in a["error"]["desc"]


def test_calls_carry_arguments_and_id_and_answers_echo_it() -> None:
    s = session()
    (c,) = answers(s, b'{"execute": "migrate", "arguments": {"device": "vm1", "to": "h:1"}, "id": {"n": [1]}}')
    assert isinstance(c, Call)
    assert (c.command, c.arguments, c.id) == ("migrate", {"device": "vm1", "to": "h:1"}, {"n": [1]})
    assert json.loads(s.answer(c, {"ok": 1})) == {"return": {"ok": 1}, "id": {"n": [1]}}
    assert json.loads(s.answer(c, None)) == {"return": {}, "id": {"n": [1]}}
    assert json.loads(s.fail(c, QmpError("DeviceNotFound", "no vm1"))) == {
        "error": {"class": "DeviceNotFound", "desc": "no vm1"}, "id": {"n": [1]}}
    (c,) = answers(s, b'{"execute": "query-devices"}')
    assert isinstance(c, Call) and not c.has_id
    assert json.loads(s.answer(c, [])) == {"return": []}


@pytest.mark.parametrize(("request_", "cls", "desc"), [
    (b'{"execute": "nope", "id": 3}', "CommandNotFound", "The command nope has not been found"),
    (b'{"execute": "migrate", "arguments": {"device": "vm1"}, "id": 3}', "GenericError",
     "Parameter 'to' is missing"),
    (b'{"execute": "migrate", "arguments": {"device": "vm1", "to": "h:1", "bogus": 1}, "id": 3}',
     "GenericError", "Parameter 'bogus' is unexpected"),
    (b'{"execute": "migrate", "arguments": {"device": 7, "to": "h:1"}, "id": 3}',
     "GenericError", "Invalid parameter type for 'device', expected: string"),
    (b'{"execute": "migrate", "arguments": {"device": "d", "to": "h", "pr": 1}, "id": 3}',
     "GenericError", "Invalid parameter type for 'pr', expected: boolean"),
    (b'{"execute": "migrate", "arguments": {"device": "d", "to": "h", "lun": true}, "id": 3}',
     "GenericError", "Invalid parameter type for 'lun', expected: integer"),
    (b'{"execute": "migrate", "arguments": {"device": "d", "to": "h", "lun": 1.5}, "id": 3}',
     "GenericError", "Invalid parameter type for 'lun', expected: integer"),
    (b'{"execute": "device-add", "arguments": {"name": "d", "backend": 5}, "id": 3}',
     "GenericError", "Invalid parameter type for 'backend', expected: string"),
    (b'{"execute": "migrate", "arguments": [], "id": 3}', "GenericError",
     "QMP input member 'arguments' must be an object"),
    (b'{"execute": 5, "id": 3}', "GenericError", "QMP input member 'execute' must be a string"),
    (b'{"id": 3}', "GenericError", "QMP input lacks member 'execute'"),
    (b'{"execute": "query-devices", "extra": 1, "id": 3}', "GenericError",
     "QMP input member 'extra' is unexpected"),
    (b'{"exec-oob": "query-devices", "id": 3}', "GenericError",
     "Out-of-band execution is not supported"),
])
def test_bad_requests_are_answered_in_qemus_words(request_: bytes, cls: str, desc: str) -> None:
    (a,) = answers(session(), request_)
    assert a == {"error": {"class": cls, "desc": desc}, "id": 3}


def test_number_accepts_ints_and_floats_extra_arguments_are_typed() -> None:
    s = session()
    (c,) = answers(s, b'{"execute": "migrate", "arguments": {"device": "d", "to": "h", "timeout": 2}}')
    assert isinstance(c, Call)
    (c,) = answers(s, b'{"execute": "migrate", "arguments": {"device": "d", "to": "h", "timeout": 2.5}}')
    assert isinstance(c, Call)
    (c,) = answers(s, b'{"execute": "device-add", "arguments": {"name": "d", "backend": "x", "serial": "s"}}')
    assert isinstance(c, Call) and c.arguments["serial"] == "s"


def test_requests_are_a_json_stream_not_lines() -> None:
    s = session()
    stream = (b'{"execute": "query-devices", "id": 1}{"execute":"query-devices","id":2}  \n'
              b'{"execute": "migrate",\n "arguments": {"device": "a}{\\"", "to": "x"},\n "id": 3}')
    got = answers(s, stream)
    assert [c.id for c in got] == [1, 2, 3]  # type: ignore[union-attr]
    assert got[2].arguments["device"] == 'a}{"'  # type: ignore[union-attr]
    # the same bytes one at a time
    s2 = session()
    calls = []
    for b in stream:
        calls += answers(s2, bytes([b]))
    assert [c.id for c in calls] == [1, 2, 3]  # type: ignore[union-attr]


def test_non_objects_and_broken_json_get_errors_and_the_stream_goes_on() -> None:
    s = session()
    got = answers(s, b'42 [1, 2] "str" nul} {"execute": "query-devices", "id": 9}')
    assert [g["error"]["class"] for g in got[:-1]] == ["GenericError"] * 5  # type: ignore[index]
    assert got[0]["error"]["desc"] == "QMP input must be a JSON object"  # type: ignore[index]
    assert got[3]["error"]["desc"].startswith("JSON parse error")  # type: ignore[index]
    assert isinstance(got[-1], Call) and got[-1].id == 9


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deep_nesting_is_an_error_reply_not_a_crash(opener: bytes) -> None:
    s = session()
    closer = b"]" if opener == b"[" else b"}"
    deep = opener * 100000 + b"1" + closer * 100000
    got = answers(s, b'{"execute": "query-devices", "arguments": {"x": ' + deep + b'}, "id": 1}'
                  + b'{"execute": "query-devices", "id": 2}')
    assert got[0] == {"error": {"class": "GenericError",
                                "desc": "JSON nesting depth exceeds maximum (64)"}}
    assert isinstance(got[1], Call) and got[1].id == 2
    assert len(s._splitter._buf) == 0


def test_depth_at_the_bound_is_accepted() -> None:
    s = session()
    deep = b"[" * 62 + b"]" * 62  # 62 + the request object + arguments = 64
    (a,) = answers(s, b'{"execute": "device-add", "arguments": {"name": "d", "x": ' + deep + b'}}')
    assert a["error"]["desc"] == "Invalid parameter type for 'x', expected: string"  # type: ignore[index]
    (a,) = answers(s, b'{"execute": "device-add", "arguments": {"x": [' + deep + b']}}')
    assert a["error"]["desc"] == "JSON nesting depth exceeds maximum (64)"  # type: ignore[index]


def test_oversized_request_is_skipped_without_being_buffered() -> None:
    s = QmpSession(TABLE, greeting("1.0.0"), max_size=1000)
    s.feed(NEGOTIATE)
    big = b'{"execute": "query-devices", "arguments": {"x": "' + b"a" * 5000
    assert s.feed(big) == []
    assert len(s._splitter._buf) == 0
    got = answers(s, b'a"}}{"execute": "query-devices", "id": 2}')
    assert got[0] == {"error": {"class": "GenericError",
                                "desc": "JSON request exceeds maximum size (1000 bytes)"}}
    assert isinstance(got[1], Call) and got[1].id == 2


def test_events_after_negotiation_with_the_time_passed_in() -> None:
    s = session()
    ev = json.loads(s.event("MIGRATION", {"device": "vm1"}, 1700000000.25))  # type: ignore[arg-type]
    assert ev == {"event": "MIGRATION", "data": {"device": "vm1"},
                  "timestamp": {"seconds": 1700000000, "microseconds": 250000}}


@given(st.lists(st.dictionaries(st.sampled_from(["execute", "id", "arguments"]),
                                st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                             lambda c: st.lists(c, max_size=3)
                                             | st.dictionaries(st.text(max_size=5), c, max_size=3),
                                             max_leaves=8)),
                max_size=5),
       st.integers(1, 7))
def test_splitter_cuts_any_object_stream_at_object_boundaries(objs: list[dict], step: int) -> None:
    data = b"".join(json.dumps(o).encode() for o in objs)
    sp = JsonSplitter()
    chunks = []
    for i in range(0, len(data), step):
        chunks += sp.feed(data[i:i + step])
    assert [json.loads(c.text) for c in chunks] == objs


# -- the shell --------------------------------------------------------------


def _server(tmp: Path) -> QmpServer:
    srv = QmpServer(tmp / "qmp.sock", "0.1.0")
    srv.register(CommandSpec("echo", (arg("value", ArgType.ANY),)), lambda a: {"echo": a["value"]})

    async def slow(a: dict) -> str:
        await asyncio.sleep(0.01)
        return "done"

    def broken(a: dict) -> None:
        raise RuntimeError("bug")

    def refuse(a: dict) -> None:
        raise QmpError("DeviceNotFound", "no such device")

    srv.register("slow", slow)
    srv.register("broken", broken)
    srv.register("refuse", refuse)
    return srv


def test_server_with_our_client(tmp_path: Path) -> None:
    async def main() -> None:
        srv = _server(tmp_path)
        await srv.start()
        assert (tmp_path / "qmp.sock").stat().st_mode & 0o777 == 0o600
        try:
            assert await qmp_call(srv.path, "echo", {"value": [1]}) == {"echo": [1]}
            assert await qmp_call(srv.path, "slow") == "done"
            with pytest.raises(QmpError) as e:
                await qmp_call(srv.path, "broken")
            assert (e.value.cls, e.value.desc) == ("GenericError", "RuntimeError: bug")
            with pytest.raises(QmpError) as e:
                await qmp_call(srv.path, "refuse")
            assert e.value.cls == "DeviceNotFound"
            names = [c["name"] for c in await qmp_call(srv.path, "query-commands")]
            assert {"echo", "slow", "qmp_capabilities", "query-commands"} <= set(names)
            client = await QmpClient.connect(srv.path)
            srv.event("HELLO", {"n": 1})
            events = client.events()
            ev = await asyncio.wait_for(events.__anext__(), 5)
            assert ev["event"] == "HELLO" and ev["data"] == {"n": 1}
            await client.close()
        finally:
            await srv.close()
        assert not (tmp_path / "qmp.sock").exists()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_server_raw_stream_without_newlines_and_deep_json(tmp_path: Path) -> None:
    async def main() -> None:
        srv = _server(tmp_path)
        await srv.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(srv.path))
            assert "QMP" in json.loads(await reader.readline())
            writer.write(NEGOTIATE + b'{"execute": "echo", "arguments": {"value": '
                         + b"[" * 200000 + b"]" * 200000 + b'}, "id": 1}'
                         + b'{"execute": "echo", "arguments": {"value": 2}, "id": 2}')
            await writer.drain()
            assert json.loads(await reader.readline()) == {"return": {}}
            err = json.loads(await reader.readline())
            assert err["error"]["class"] == "GenericError" and "depth" in err["error"]["desc"]
            assert json.loads(await reader.readline()) == {"return": {"echo": 2}, "id": 2}
            writer.close()
        finally:
            await srv.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_server_with_qemu_qmp_client(tmp_path: Path) -> None:
    from qemu.qmp import ExecuteError, QMPClient

    async def main() -> None:
        srv = _server(tmp_path)
        await srv.start()
        try:
            qmp = QMPClient("test")
            await qmp.connect(str(srv.path))
            assert qmp.greeting is not None
            assert await qmp.execute("echo", {"value": "x"}) == {"echo": "x"}
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("echo", {"value": 1, "more": 2})
            assert e.value.error_class == "GenericError"
            assert "'more'" in e.value.error.error.desc
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("nope")
            assert e.value.error_class == "CommandNotFound"
            with qmp.listener() as listener:
                srv.event("MIGRATION", {"device": "vm1", "status": "completed"})
                ev = await asyncio.wait_for(listener.get(), 5)
            assert ev["event"] == "MIGRATION" and ev["data"]["status"] == "completed"
            await qmp.disconnect()
        finally:
            await srv.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_server_that_never_started_leaves_the_socket_file_alone(tmp_path: Path) -> None:
    other = tmp_path / "qmp.sock"
    other.write_text("another daemon's socket")
    asyncio.run(QmpServer(other, "0.1.0").close())
    assert other.exists()
