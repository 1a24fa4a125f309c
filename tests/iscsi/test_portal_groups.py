"""Target portal groups of the iSCSI target (iscsi/target.py): each is one
target port; one initiator port logged in through two groups is two
sessions and two I_T nexuses (RFC 7143 4.4.3); SendTargets lists every
portal with its group's tag (RFC 7143 12.11, appendix D); the logical units
learn the target ports (REPORT TARGET PORT GROUPS, VPD 83h). Also the
``--listen HOST:PORT[,TPGT]`` option of ``prmigrate target``."""

from __future__ import annotations

import argparse
import asyncio
import functools
from pathlib import Path

import pytest

from prmigrate.commands.target import StartError, parse_portal, portal_groups
from prmigrate.iscsi import pdu as P
from prmigrate.iscsi.login import decode_text
from prmigrate.iscsi.session import TargetNode
from prmigrate.iscsi.target import IscsiTarget, PortalGroup
from prmigrate.lun.unit import LogicalUnit
from prmigrate.scsi.tpg import ReportTpgCdb, decode_report

from ._target_helpers import TARGET, Client, MemoryLU

ISID = 0x400000000001


def run_async(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        return asyncio.run(asyncio.wait_for(fn(*a, **kw), 30))

    return wrapper


async def two_groups(lu=None, tags=(1, 2)):
    lu = lu if lu is not None else MemoryLU()
    target = IscsiTarget([TargetNode(TARGET, {0: lu})])
    portals = []
    for tag in tags:
        (host, port), *_ = await target.start("127.0.0.1", 0, tpgt=tag)
        portals.append((host, port))
    return target, lu, portals


async def send_targets(host: str, port: int) -> list[tuple[str, str]]:
    disc = await Client.connect(host, port)
    try:
        assert (await disc.login(target=None)).status == 0
        disc.send_pdu(P.TextRequest(itt=disc.next_itt(), cmdsn=disc.cmdsn, data=b"SendTargets=All\0"))
        return decode_text((await disc.recv()).data)
    finally:
        await disc.close()


@run_async
async def test_groups_are_target_ports_with_relative_ids_in_order():
    target, lu, portals = await two_groups(tags=(5, 3))
    try:
        assert [(g.tpgt, g.rel_port) for g in target.portal_groups.values()] == [(5, 1), (3, 2)]
        assert target.target_ports() == {1: 5, 2: 3}
        # a second portal of group 3: the same target port
        (h, p), *_ = await target.start("127.0.0.1", 0, tpgt=3)
        assert target.portal_groups[3].portals == [portals[1], (h, p)] and target.target_ports() == {1: 5, 2: 3}
    finally:
        await target.close()


@run_async
async def test_one_initiator_port_through_two_groups_is_two_nexuses():
    target, lu, [(h1, p1), (h2, p2)] = await two_groups()
    try:
        a, b = await Client.connect(h1, p1), await Client.connect(h2, p2)
        ra, rb = await a.login(isid=ISID), await b.login(isid=ISID)
        assert ra.status == 0 and rb.status == 0
        assert ("TargetPortalGroupTag", "1") in decode_text(ra.data)
        assert ("TargetPortalGroupTag", "2") in decode_text(rb.data)
        for c in (a, b):
            rsp, _ = await c.command(bytes(6))  # TEST UNIT READY on each path
            assert rsp.status == 0
        n1, n2 = lu.seen[-2:]
        assert (n1.rel_port, n1.tpgt, n2.rel_port, n2.tpgt) == (1, 1, 2, 2)
        assert n1.initiator_port == n2.initiator_port and n1 != n2
        assert len(target.sessions(TARGET)) == 2 and lu.attached == [n1, n2]
        # the same ISID again through group 2 reinstates that session only
        b2 = await Client.connect(h2, p2)
        assert (await b2.login(isid=ISID)).status == 0
        assert await b.closed()
        rsp, _ = await a.command(bytes(6))
        assert rsp.status == 0 and lu.lost == []  # the nexus continues: nothing lost
        await a.close()
        for _ in range(100):
            if lu.lost:
                break
            await asyncio.sleep(0.01)
        assert lu.lost == [n1]  # group 1's nexus ended, group 2's lives on
        assert [s.nexus for s in target.sessions(TARGET)] == [n2]
        await b2.close()
    finally:
        await target.close()


@run_async
async def test_send_targets_lists_every_portal_with_its_tag():
    target, lu, [(h1, p1), (h2, p2)] = await two_groups()
    try:
        own_first = [("TargetName", TARGET), ("TargetAddress", f"{h1}:{p1},1"), ("TargetAddress", f"{h2}:{p2},2")]
        assert await send_targets(h1, p1) == own_first
        assert await send_targets(h2, p2) == [own_first[0], own_first[2], own_first[1]]
    finally:
        await target.close()


def test_wildcard_portal_is_advertised_as_the_address_reached():
    g = PortalGroup(2, 2, [("0.0.0.0", 3261), ("::", 3261), ("127.0.0.9", 3262)])
    assert g.addresses("127.0.0.5") == [("127.0.0.5", 3261), ("127.0.0.9", 3262)]
    with pytest.raises(ValueError):
        PortalGroup(1, 0)
    with pytest.raises(ValueError):
        PortalGroup(70000, 1)


@run_async
async def test_logical_units_learn_the_target_ports(tmp_path: Path):
    lu = LogicalUnit(tmp_path / "img", 1 << 20, name="lu")
    target, _, [(h1, p1), (h2, p2)] = await two_groups(lu, tags=(1, 8))
    try:
        c = await Client.connect(h2, p2)
        assert (await c.login()).status == 0
        rsp, data = await c.command(ReportTpgCdb.encode(256), read=True, edtl=256)
        assert rsp.status == 0
        assert [(g.group, g.ports) for g in decode_report(data)] == [(1, (1,)), (2, (2,))]
        rsp, page = await c.command(bytes.fromhex("120183010000"), read=True, edtl=256)
        assert rsp.status == 0 and b"iqn.2026-11.org.prmigrate:test,t,0x0008\0" in page
        assert bytes.fromhex("0000 0002") in page  # relative target port 2
        # a LUN added at run time learns them too
        lu1 = LogicalUnit(tmp_path / "img1", 1 << 20, lun=1, name="lu1")
        target.add_lun(TARGET, 1, lu1)
        assert lu1.target_ports() == {1: 1, 2: 8}
        await c.close()
    finally:
        await target.close()
        lu.close()
        lu1.close()


@run_async
async def test_a_portal_without_a_group_serves_as_before():
    lu = MemoryLU()
    target = IscsiTarget([TargetNode(TARGET, {0: lu}, tpgt=4)])
    (h, p), *_ = await target.start("127.0.0.1", 0)
    try:
        assert target.portal_groups == {} and target.target_ports() == {1: 1}
        c = await Client.connect(h, p)
        rsp = await c.login()
        assert ("TargetPortalGroupTag", "4") in decode_text(rsp.data)
        await c.command(bytes(6))
        assert (lu.seen[-1].tpgt, lu.seen[-1].rel_port) == (4, 1)
        assert await send_targets(h, p) == [("TargetName", TARGET), ("TargetAddress", f"{h}:{p},4")]
        await c.close()
    finally:
        await target.close()


# ------------------------------------------------------- prmigrate target --listen

def test_parse_portal():
    assert parse_portal("127.0.0.1:3260") == ("127.0.0.1", 3260, None)
    assert parse_portal("127.0.0.1:3261,7") == ("127.0.0.1", 3261, 7)
    assert parse_portal("[::1]:3260,2") == ("::1", 3260, 2)
    for bad in ("127.0.0.1", "127.0.0.1:x", "127.0.0.1:3260,", "127.0.0.1:3260,t", "h:99999", "h:1,70000"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_portal(bad)


def test_portal_groups_of_the_listen_options():
    a, b = ("127.0.0.1", 3260, None), ("127.0.0.2", 3260, None)
    assert portal_groups(None, None) == [("127.0.0.1", 3260, 1)]
    assert portal_groups([a], None) == [("127.0.0.1", 3260, 1)]
    assert portal_groups([a], 5) == [("127.0.0.1", 3260, 5)]  # --tpgt: a single --listen, as before
    assert portal_groups([a, b], None) == [("127.0.0.1", 3260, 1), ("127.0.0.2", 3260, 2)]
    assert portal_groups([a, ("127.0.0.2", 3260, 9)], None) == [("127.0.0.1", 3260, 1), ("127.0.0.2", 3260, 9)]
    with pytest.raises(StartError, match="--tpgt goes with a single --listen"):
        portal_groups([a, b], 3)
