"""Devices added and deleted at run time: the control commands device-add
and device-del, the record under the state directory (restart, fail
closed), and ``prmigrate device add|del|list`` against a running daemon."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from prmigrate.commands.device import spec_arguments
from prmigrate.device.config import ConfigError
from prmigrate.host.control import CommandError, control_call
from prmigrate.host.daemon import HostDaemon, default_frontend_iqn
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType
from prmigrate.scsi.pr import ReadReservation, pr_out_params

from .test_daemon import G1, G2, SHARED, VM1, World, run

KEY = 0xABCD


def vm2_args(w: World) -> dict:
    return {"name": "vm2", "backend": f"{w.backend_url}/1", "machine": "pc-q35-11.0",
            "guests": [G2], "migrate-pr": True}


async def restart(w: World) -> HostDaemon:
    await w.daemon.close()
    w.daemon = HostDaemon(w.daemon.config)
    await w.daemon.start()
    w.fhost, w.fport = w.daemon.listening[0]
    return w.daemon


async def io_loop(session, stop: asyncio.Event) -> int:
    """Reads and writes on vm1 until told to stop; every one must succeed."""
    n = 0
    while not stop.is_set():
        blob = os.urandom(512)
        await session.write(50 + n % 8, blob)
        assert await session.read(50 + n % 8, 1) == blob
        n += 1
        await asyncio.sleep(0.002)
    return n


@run
async def test_device_add_and_del_at_run_time_leave_the_other_guests_alone(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start(VM1)
    ctl = w.daemon.config.control
    try:
        g1 = await w.guest(G1)
        assert (await g1.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))).good
        assert (await g1.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(KEY, 0))).good
        backend_isids = w.backend_isids()
        stop = asyncio.Event()
        io = asyncio.ensure_future(io_loop(g1, stop))
        await asyncio.sleep(0.05)

        ans = await control_call(ctl, "device-add", vm2_args(w))
        assert ans["device"] == "vm2" and ans["persistent"] is True
        assert ans["node"] == default_frontend_iqn("vm2")
        record = json.loads((tmp_path / "state" / "devices.json").read_text())
        assert record["devices"]["vm2"]["backend"] == f"{w.backend_url}/1"
        assert (tmp_path / "state" / "devices.json").stat().st_mode & 0o777 == 0o600
        g2 = await w.guest(G2, default_frontend_iqn("vm2"), isid=0x23D000000002)
        assert (await g2.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 5))).good
        devices = {d["name"]: d for d in await control_call(ctl, "query-devices")}
        assert devices["vm2"]["added-at-run-time"] and not devices["vm1"]["added-at-run-time"]

        # refused while a guest is logged in, with a clear reason
        with pytest.raises(CommandError) as e:
            await control_call(ctl, "device-del", {"device": "vm2"})
        assert e.value.cls == "GenericError"
        assert "1 guest session(s) logged in" in e.value.desc and G2 in e.value.desc
        assert "force" in e.value.desc
        await g2.close()
        await asyncio.sleep(0.05)
        assert await control_call(ctl, "device-del", {"device": "vm2"}) == {"device": "vm2", "configured": False}
        assert "vm2" not in w.daemon.devices
        assert not (tmp_path / "state" / "devices.json").exists()
        assert not (tmp_path / "state" / "vm2.pr.json").exists()

        stop.set()
        assert await io > 0
        # vm1's guest never noticed: same session, same backend nexus, reservation kept
        assert w.backend_isids() >= backend_isids
        rr = ReadReservation.decode(bytes((await g1.pr_in(PrInAction.READ_RESERVATION)).data_in))
        assert rr.key == KEY and rr.rtype == PrType.WRITE_EXCLUSIVE
        await g1.close()
    finally:
        await w.close()


@run
async def test_a_device_added_at_run_time_survives_a_restart_until_deleted(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start(VM1)
    try:
        await control_call(w.daemon.config.control, "device-add", vm2_args(w))
        g2 = await w.guest(G2, default_frontend_iqn("vm2"), isid=0x23D000000002)
        assert (await g2.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 5))).good
        await g2.close()
        await restart(w)
        assert set(w.daemon.devices) == {"vm1", "vm2"}
        dev = w.daemon.get_device("vm2")
        assert dev.config.guests == frozenset({G2}) and dev.lun == 1
        # its journal came back with it
        assert dev.snooper.state.to_dict()
        # deleted with force while a guest is logged in
        g2 = await w.guest(G2, default_frontend_iqn("vm2"), isid=0x23D000000002)
        assert (await control_call(w.daemon.config.control, "device-del",
                                   {"device": "vm2", "force": True}))["device"] == "vm2"
        await g2.close()
        await restart(w)
        assert set(w.daemon.devices) == {"vm1"}
    finally:
        await w.close()


@run
async def test_device_add_fails_closed_when_it_cannot_be_recorded(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start(VM1)
    try:
        # the atomic write's temporary file cannot be created (root ignores modes)
        (tmp_path / "state" / ".devices.json.tmp").mkdir()
        with pytest.raises(CommandError) as e:
            await control_call(w.daemon.config.control, "device-add", vm2_args(w))
        assert e.value.cls == "GenericError" and "cannot record the device" in e.value.desc
        assert "vm2" not in w.daemon.devices
        assert w.daemon.target.node(default_frontend_iqn("vm2")) is None
        assert "vm2" not in w.daemon.runtime
        assert {s.isid for s in w.backend.sessions(SHARED)} == w.backend_isids()
    finally:
        await w.close()


@run
async def test_device_add_checks_its_arguments(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start(VM1)
    ctl = w.daemon.config.control
    try:
        bad = [
            ({"name": "vm2"}, "Parameter 'backend' is missing"),
            ({**vm2_args(w), "lun": "1"}, "Invalid parameter type for 'lun', expected: integer"),
            ({**vm2_args(w), "migrate-pr": "on"}, "Invalid parameter type for 'migrate-pr', expected: boolean"),
            ({**vm2_args(w), "colour": "red"}, "Parameter 'colour' is unexpected"),
            ({**vm2_args(w), "identity": "nobody"}, "identity"),
            ({**vm2_args(w), "name": "vm1"}, "device 'vm1' exists"),
        ]
        for arguments, words in bad:
            with pytest.raises(CommandError) as e:
                await control_call(ctl, "device-add", arguments)
            assert e.value.cls == "GenericError" and words in e.value.desc, (arguments, e.value.desc)
        with pytest.raises(CommandError) as e:
            await control_call(ctl, "device-del", {"device": "nope"})
        assert e.value.cls == "DeviceNotFound"
        # a backend that cannot be reached: an error, nothing added or recorded
        with pytest.raises(CommandError) as e:
            await control_call(ctl, "device-add", {**vm2_args(w), "backend": f"iscsi://127.0.0.1:9/{SHARED}/1"})
        assert "vm2" not in w.daemon.devices and not (tmp_path / "state" / "devices.json").exists()
        assert set(w.daemon.devices) == {"vm1"}
    finally:
        await w.close()


def test_spec_arguments_types_the_spec() -> None:
    args = spec_arguments("name=vm2,backend=iscsi://h/iqn.x:s/1,lun=1,migrate-pr=off,guests=iqn.a:g+iqn.a:h")
    assert args == {"name": "vm2", "backend": "iscsi://h/iqn.x:s/1", "lun": 1, "migrate-pr": False,
                    "guests": ["iqn.a:g", "iqn.a:h"]}
    with pytest.raises(ConfigError):
        spec_arguments("name=vm2")


def test_prmigrate_device_cli(tmp_path: Path) -> None:
    async def cli(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "prmigrate.cli", "device", *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, out.decode(), err.decode()

    async def main() -> None:
        w = World(tmp_path)
        await w.start(VM1)
        ctl = str(w.daemon.config.control)
        try:
            code, out, err = await cli("add", "--host", ctl, f"name=vm2,backend={w.backend_url}/1,guests={G2}")
            assert code == 0, err
            assert out.startswith("added vm2: iscsi://") and default_frontend_iqn("vm2") in out
            code, out, _ = await cli("list", "--host", ctl)
            assert code == 0
            assert "vm1: backend" in out and "vm2: backend" in out and "added at run time" in out
            code, out, _ = await cli("list", "--host", ctl, "--json")
            assert {d["name"] for d in json.loads(out)} == {"vm1", "vm2"}
            g2 = await w.guest(G2, default_frontend_iqn("vm2"), isid=0x23D000000002)
            code, _, err = await cli("del", "--host", ctl, "vm2")
            assert code == 1 and "logged in" in err
            code, out, _ = await cli("del", "--host", ctl, "vm2", "--force")
            assert code == 0 and out.strip() == "deleted vm2"
            await g2.close()
            code, out, _ = await cli("del", "--host", ctl, "vm1", "--force")
            assert code == 0 and "configuration file" in out
            code, _, err = await cli("add", "--host", ctl, "name=vm3")
            assert code == 2 and "backend" in err
            code, _, err = await cli("list", "--host", str(tmp_path / "nope.sock"))
            assert code == 2 and "nope.sock" in err
        finally:
            await w.close()

    asyncio.run(asyncio.wait_for(main(), 90))


@run
async def test_reload_uses_the_device_paths_and_keeps_a_device_in_use(tmp_path: Path) -> None:
    import dataclasses

    from prmigrate.device.config import parse_device_spec

    w = World(tmp_path)
    await w.start(VM1)
    try:
        g1 = await w.guest(G1)
        cfg = w.daemon.config
        vm2 = parse_device_spec(f"name=vm2,backend={w.backend_url}/1")
        # vm1 gone from the file while its guest is logged in; the portal changed
        new = dataclasses.replace(cfg, devices=[vm2], listen=[("127.0.0.1", 1)])
        result = await w.daemon.reload(new)
        assert result["added"] == ["vm2"] and result["removed"] == []
        assert "guest session(s) logged in" in result["refused"]["vm1"]
        assert result["restart-needed"] == ["listen"]
        assert set(w.daemon.devices) == {"vm1", "vm2"}
        assert {d.name for d in w.daemon.config.devices} == {"vm1", "vm2"}
        assert "vm2" not in w.daemon.runtime  # configured, not recorded as added at run time
        assert (await g1.read(0, 1)) is not None
        await g1.close()
        await asyncio.sleep(0.05)
        result = await w.daemon.reload(dataclasses.replace(cfg, devices=[vm2]))
        assert result["removed"] == ["vm1"] and result["refused"] == {}
        assert set(w.daemon.devices) == {"vm2"}
        # a device added at run time is not the configuration's to remove
        await control_call(cfg.control, "device-add", {"name": "vm3", "backend": f"{w.backend_url}/1",
                                                      "frontend": "iqn.2026-11.org.prmigrate:vm3"})
        result = await w.daemon.reload(dataclasses.replace(cfg, devices=[vm2]))
        assert result == {"added": [], "removed": [], "refused": {}, "restart-needed": []}
        assert set(w.daemon.devices) == {"vm2", "vm3"}
    finally:
        await w.close()


@run
async def test_a_configured_device_deleted_at_run_time_comes_back_with_the_next_reload(tmp_path: Path) -> None:
    import dataclasses

    w = World(tmp_path)
    await w.start(VM1)
    try:
        cfg = dataclasses.replace(w.daemon.config, devices=list(w.daemon.config.devices))
        ans = await control_call(w.daemon.config.control, "device-del", {"device": "vm1"})
        assert ans == {"device": "vm1", "configured": True} and not w.daemon.devices
        result = await w.daemon.reload(cfg)
        assert result["added"] == ["vm1"] and set(w.daemon.devices) == {"vm1"}
    finally:
        await w.close()
