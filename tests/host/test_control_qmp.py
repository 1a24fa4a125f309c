"""The host daemon's control socket driven by ``qemu.qmp`` (QEMU's own
Python QMP client): query-devices, typed argument errors, a migration's
events, and a deeply nested request answered with an error."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from ..migration.service_rig import Cluster, run


@run(40)
async def test_qemu_qmp_client_queries_and_receives_migration_events(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    qmp = QMPClient("hosta")
    try:
        await qmp.connect(str(tmp_path / "hosta.sock"))
        assert qmp.greeting is not None
        assert qmp.greeting.QMP.version["package"].startswith("prmigrate ")
        (dev,) = await qmp.execute("query-devices")
        assert dev["name"] == "vm1"
        assert (await qmp.execute("query-devices", {"device": "vm1"}))[0]["name"] == "vm1"
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("query-devices", {"device": 1})
        assert e.value.error_class == "GenericError"
        assert e.value.error.error.desc == "Invalid parameter type for 'device', expected: string"
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("migrate", {"device": "vm1", "to": "h:1", "speed": 9})
        assert e.value.error.error.desc == "Parameter 'speed' is unexpected"
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        h, p = c.migration_address("hostb")
        statuses: list[str] = []
        with qmp.listener("MIGRATION") as listener:
            started = await qmp.execute("migrate", {"device": "vm1", "to": f"{h}:{p}"})
            async for ev in listener:
                assert ev["data"]["id"] == started["id"]
                assert set(ev["timestamp"]) == {"seconds", "microseconds"}
                statuses.append(ev["data"]["status"])
                if ev["data"].get("finished"):
                    assert ev["data"]["success"] is True
                    break
        assert statuses[-1] == "completed" and "handover" in statuses
        (rec,) = await qmp.execute("query-migrate", {"device": "vm1"})
        assert rec["success"] is True
    finally:
        await qmp.disconnect()
        await c.close()


@run(30)
async def test_deeply_nested_request_gets_an_error_and_the_connection_lives(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    await c.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "hosta.sock"))
        assert "QMP" in json.loads(await reader.readline())
        deep = b"[" * 500000 + b"]" * 500000
        writer.write(b'{"execute": "qmp_capabilities"}{"execute": "query-host", "arguments": '
                     + deep + b'}{"execute": "query-host", "id": 1}')
        await writer.drain()
        assert json.loads(await reader.readline()) == {"return": {}}
        err = json.loads(await reader.readline())
        assert err["error"]["class"] == "GenericError"
        assert "nesting depth" in err["error"]["desc"]
        answer = json.loads(await reader.readline())
        assert answer["id"] == 1 and answer["return"]["name"] == "hosta"
        writer.close()
    finally:
        await c.close()
