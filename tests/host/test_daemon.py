"""The host daemon in-process: a backend LUN on our target, the daemon's
guest frontend, guests logging in with our initiator, the control socket."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import sys
from pathlib import Path

import pytest

from prmigrate.device.config import DeviceConfig, parse_device_spec
from prmigrate.device.identity import derive_isid
from prmigrate.host.config import HostConfig
from prmigrate.host.control import CommandError, control_call, control_events
from prmigrate.host.daemon import HostDaemon, default_frontend_iqn
from prmigrate.iscsi.initiator import ConnectionLost, LoginError, connect
from prmigrate.iscsi.target import IscsiTarget, TargetNode
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.constants import PrInAction, PrOutAction, PrType
from prmigrate.scsi.pr import ReadFullStatus, pr_out_params

SHARED = "iqn.2026-11.org.prmigrate:shared"
HOST = "iqn.2026-11.org.prmigrate:hosta"
G1 = "iqn.2026-11.org.prmigrate:g1"
G2 = "iqn.2026-11.org.prmigrate:g2"


def run(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lu = LogicalUnit(tmp / "shared.img", 8 << 20)
        self.lu1 = LogicalUnit(tmp / "shared1.img", 4 << 20, lun=1)
        self.backend = IscsiTarget([TargetNode(SHARED, {0: self.lu, 1: self.lu1})])
        self.daemon: HostDaemon = None  # type: ignore[assignment]

    async def start(self, *specs: str) -> HostDaemon:
        ip = f"127.0.0.{random.randint(2, 250)}"
        (_, self.bport), *_ = await self.backend.start(ip, 0)
        self.backend_url = f"iscsi://{ip}:{self.bport}/{SHARED}"
        cfg = HostConfig(
            name="hosta", initiator=HOST, listen=[(ip, 0)], control=self.tmp / "ctl.sock",
            state_dir=self.tmp / "state",
            devices=[parse_device_spec(s.format(backend=self.backend_url)) for s in specs],
        ).validate()
        self.daemon = HostDaemon(cfg)
        await self.daemon.start()
        self.fhost, self.fport = self.daemon.listening[0]
        return self.daemon

    def url(self, node: str) -> str:
        return f"iscsi://{self.fhost}:{self.fport}/{node}/0"

    async def guest(self, name: str, node: str = "iqn.2026-11.org.prmigrate:vm1", isid: int = 0x23D000000001):
        return await connect(self.url(node), initiator_name=name, isid=isid, reconnect=False)

    async def close(self) -> None:
        await self.daemon.close()
        await self.backend.close()

    def backend_isids(self) -> set[int]:
        return {s.isid for s in self.backend.sessions(SHARED)}


VM1 = "name=vm1,backend={backend}/0,target=iqn.2026-11.org.prmigrate:vm1,machine=pc-q35-11.0"


@run
async def test_guests_reach_the_lun_through_the_frontend(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start(VM1)
    g1 = await w.guest(G1)
    g2 = await w.guest(G2)
    await g1.read_capacity16()
    await g1.write(0, b"\x5a" * 4096)
    assert await g2.read(0, 8) == b"\x5a" * 4096
    r = await g1.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 0x1111))
    assert r.good
    r = await g1.pr_out(PrOutAction.RESERVE, PrType.EXCLUSIVE_ACCESS, pr_out_params(0x1111, 0))
    assert r.good
    r = await g2.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 0x2222))
    assert r.good
    # each guest is its own backend nexus, under the host's name
    assert {derive_isid("vm1", G1), derive_isid("vm1", G2)} <= w.backend_isids()
    rfs = ReadFullStatus.decode(bytes((await g2.pr_in(PrInAction.READ_FULL_STATUS)).data_in))
    assert {e.transport_id.name for e in rfs.entries} == {HOST}
    (dev,) = await control_call(w.daemon.config.control, "query-devices")
    assert dev["migrate-pr"] is True and dev["machine"] == "pc-q35-11.0"
    st = dev["pr-state"]["guests"]
    assert st[G1]["key"] == "0x1111" and st[G1]["holder"] and st[G1]["type"] == "Exclusive Access"
    assert st[G2]["key"] == "0x2222" and not st[G2]["holder"]
    assert dev["backend-nexus"][G1]["isid"] == f"0x{derive_isid('vm1', G1):012x}"
    assert dev["backend-nexus"][G1]["initiator"] == HOST
    assert dev["frontend"]["node"] == "iqn.2026-11.org.prmigrate:vm1"
    # a guest leaving ends its backend nexus; its registration stays (PR are persistent)
    await g2.close()
    for _ in range(100):
        if derive_isid("vm1", G2) not in w.backend_isids():
            break
        await asyncio.sleep(0.02)
    assert derive_isid("vm1", G2) not in w.backend_isids()
    assert derive_isid("vm1", G1) in w.backend_isids()
    await g1.close()
    await w.close()


@run
async def test_acl_and_identity_host(tmp_path: Path) -> None:
    w = World(tmp_path)
    spec = VM1 + f",guests={G1},identity=host"
    await w.start(spec)
    with pytest.raises(LoginError):
        await w.guest(G2)
    g1 = await w.guest(G1)
    assert (await g1.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 7))).good
    assert derive_isid("vm1", None) in w.backend_isids()
    (dev,) = await control_call(w.daemon.config.control, "query-devices")
    assert list(dev["pr-state"]["guests"]) == ["*"] and dev["properties"]["identity"] == "host"
    await g1.close()
    await w.close()


@run
async def test_control_api(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start(VM1)
    ctl = w.daemon.config.control
    machines = await control_call(ctl, "query-machines")
    by = {m["name"]: m for m in machines}
    assert by["pc-q35-10.2"]["migrate-pr-default"] is False and by["q35"]["alias-of"] == "pc-q35-11.0"
    with pytest.raises(CommandError) as e:
        await control_call(ctl, "no-such-command")
    assert e.value.cls == "CommandNotFound"
    with pytest.raises(CommandError) as e:
        await control_call(ctl, "device-verify", {"device": "nope"})
    assert e.value.cls == "DeviceNotFound"
    assert (await control_call(ctl, "device-verify", {"device": "vm1"})) == {"changes": []}

    async def echo(args):
        await asyncio.sleep(0)
        return {"echo": args}

    w.daemon.control.register_command("x-echo", echo)
    assert await control_call(ctl, "x-echo", {"a": 1}) == {"echo": {"a": 1}}
    assert "x-echo" in [c["name"] for c in await control_call(ctl, "query-commands")]
    # raw protocol: QMP greeting, negotiation, bad JSON, ids
    reader, writer = await asyncio.open_unix_connection(str(ctl))
    greeting = json.loads(await reader.readline())
    assert greeting["QMP"]["version"]["package"].startswith("prmigrate ")
    assert greeting["QMP"]["capabilities"] == []
    writer.write(b'{"execute": "query-host"}')
    await writer.drain()
    answer = json.loads(await reader.readline())
    assert answer["error"]["class"] == "CommandNotFound" and "qmp_capabilities" in answer["error"]["desc"]
    writer.write(b'{"execute": "qmp_capabilities"}')
    await writer.drain()
    assert json.loads(await reader.readline()) == {"return": {}}
    writer.write(b"{not json}\n" + json.dumps({"execute": "query-host", "id": 5}).encode() + b"\n")
    await writer.drain()
    assert json.loads(await reader.readline())["error"]["class"] == "GenericError"
    answer = json.loads(await reader.readline())
    assert answer["id"] == 5 and answer["return"]["initiator"] == HOST
    writer.close()
    await w.close()


@run
async def test_events_and_runtime_devices(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start(VM1)
    ctl = w.daemon.config.control
    events: list[dict] = []
    seen = asyncio.Event()

    async def listen() -> None:
        async for ev in control_events(ctl):
            events.append(ev)
            if ev["event"] == "PR_STATE_CHANGED":
                seen.set()

    task = asyncio.ensure_future(listen())
    await asyncio.sleep(0.1)
    cfg = DeviceConfig("vm9", f"{w.backend_url}/1", SHARED, lun=1)
    dev = await w.daemon.add_device(cfg)
    assert w.daemon.get_device("vm9") is dev
    g = await w.guest(G1, default_frontend_iqn("vm9"))
    assert (await g.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 9))).good
    await asyncio.wait_for(seen.wait(), 5)
    kinds = [e["event"] for e in events]
    assert "DEVICE_ADDED" in kinds and "PR_STATE_CHANGED" in kinds
    change = next(e for e in events if e["event"] == "PR_STATE_CHANGED")
    assert change["data"]["device"] == "vm9" and change["data"]["changes"][0]["after"]["key"] == "0x9"
    await g.close()
    journal = tmp_path / "state" / "vm9.pr.json"
    assert journal.exists()
    await w.daemon.remove_device("vm9", forget_state=True)
    assert not journal.exists()
    with pytest.raises(CommandError):
        w.daemon.get_device("vm9")
    task.cancel()
    await w.close()


@run
async def test_moved_record_redirects_and_a_bad_one_is_ignored(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A ``<device>.moved.json`` left by a move: the daemon publishes a
    redirect for the device instead of starting it; an unreadable record is
    logged and ignored (the device is served)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "vm1.moved.json").write_text(json.dumps(
        {"device": "vm1", "node": "iqn.2026-11.org.prmigrate:vm1", "host": "127.0.0.9", "port": 3299,
         "tpgt": 1}))
    (state / "vm2.moved.json").write_text("{not json")
    w = World(tmp_path)
    d = await w.start(VM1, VM1.replace("vm1", "vm2"))
    try:
        assert sorted(d.devices) == ["vm2"] and d.moved["vm1"]["port"] == 3299
        from prmigrate.commands.host import format_status

        moved = d._cmd_query_host({})["moved"]
        assert moved == {"vm1": "127.0.0.9:3299"}
        assert format_status([], moved) == "device vm1: moved to 127.0.0.9:3299 (guest logins redirected there)"
        node = d.target.node("iqn.2026-11.org.prmigrate:vm1")
        assert node is not None and node.redirect == ("127.0.0.9", 3299, 1) and not node.luns
        with pytest.raises(ConnectionLost, match=r"127\.0\.0\.9:3299"):  # redirected there
            await w.guest(G1)
        assert "vm2.moved.json" in caplog.text and "not valid JSON" in caplog.text
        g = await w.guest(G1, "iqn.2026-11.org.prmigrate:vm2")
        await g.close()
        # vm2 is served here: its (unreadable) record went when it was exposed
        assert not (state / "vm2.moved.json").exists()
        assert (state / "vm1.moved.json").exists()
    finally:
        await w.close()


def _printed_forms(answer: object, where: str = "") -> list[tuple[str, object]]:
    """Every ``key``/``type``/``type_name`` value in a JSON answer, with its path."""
    found: list[tuple[str, object]] = []
    if isinstance(answer, dict):
        for k, v in answer.items():
            if k in ("key", "type", "type_name") and not isinstance(v, dict | list):
                found.append((f"{where}.{k}", v))
            found += _printed_forms(v, f"{where}.{k}")
    elif isinstance(answer, list):
        for i, v in enumerate(answer):
            found += _printed_forms(v, f"{where}[{i}]")
    return found


@run
async def test_query_devices_and_pr_json_print_the_vocabulary(tmp_path: Path) -> None:
    """One spelling of each type and one form of keys: query-devices and
    ``prmigrate pr --json`` both print sg_persist's words and ``0x123abc``."""
    from prmigrate.scsi.vocabulary import format_key, words

    w = World(tmp_path)
    await w.start(VM1)
    try:
        g1 = await w.guest(G1)
        assert (await g1.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, 0x123ABC))).good
        rtype = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
        assert (await g1.pr_out(PrOutAction.RESERVE, rtype, pr_out_params(0x123ABC, 0))).good
        (dev,) = await control_call(w.daemon.config.control, "query-devices")
        forms = _printed_forms(dev)
        assert (".pr-state.guests." + G1 + ".key", "0x123abc") in forms, forms
        assert (".pr-state.guests." + G1 + ".type", "Write Exclusive, registrants only") in forms, forms
        for path, v in forms:
            if path.endswith(".key"):
                assert isinstance(v, str) and v == format_key(int(v, 16)), (path, v)
            else:
                assert v is None or v == words(str(v)), (path, v)
        answers = {}
        for what in ("--read-reservation", "--read-full-status", "--read-keys"):
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "prmigrate.cli", "pr", "--json", what, "--timeout", "10",
                "--initiator", G2, w.url("iqn.2026-11.org.prmigrate:vm1"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(p.communicate(), 20)
            assert p.returncode == 0, err
            answers[what] = json.loads(out)
        assert answers["--read-reservation"]["reservation"]["key"] == "0x123abc", answers
        assert answers["--read-keys"]["keys"] == ["0x123abc"], answers
        forms = _printed_forms(answers)
        assert any(v == "Write Exclusive, registrants only" for _, v in forms), forms
        for path, v in forms:
            if path.endswith(".key"):
                assert isinstance(v, str) and v == format_key(int(v, 16)), (path, v)
            elif path.endswith(".type_name"):
                assert v is None or v == words(str(v)), (path, v)
            else:  # the number sg_persist takes, with its words beside it
                assert isinstance(v, int), (path, v)
        await g1.close()
    finally:
        await w.close()
