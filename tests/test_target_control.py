"""target_control: the configuration file, argument checks, the CLI words,
and the handlers over an IscsiTarget with real logical units (the sockets
and QMP itself: tests/interop/test_target_control.py)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from prmigrate import target_control as tc
from prmigrate.iscsi.session import TargetNode
from prmigrate.iscsi.target import IscsiTarget
from prmigrate.lun.unit import LogicalUnit
from prmigrate.qmp import QmpError

IQN = "iqn.2026-11.org.prmigrate:unit"
HOST = "iqn.2026-11.org.example:host1"


def test_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "target.toml"
    cfg = tc.TargetConfig(IQN, frozenset({HOST}), {0: tmp_path / "a b.img", 7: tmp_path / 'q"uote.img'})
    cfg.save(path)
    assert tc.TargetConfig.load(path) == cfg
    assert tc.TargetConfig.load(tmp_path / "missing.toml") == tc.TargetConfig()
    open_cfg = tc.TargetConfig(IQN, None, {})
    open_cfg.save(path)
    assert tc.TargetConfig.load(path).acl is None


@pytest.mark.parametrize("text", [
    "iqn = 1", "acl = 'x'", "colour = 1", "[[lun]]\nlun = 1", "[[lun]]\nlun = -1\npath = 'x'",
    "[[lun]]\nlun = 1\npath = 'x'\n[[lun]]\nlun = 1\npath = 'y'", "not toml [", "[[lun]]\nlun = true\npath = 'x'",
])
def test_bad_config(tmp_path: Path, text: str) -> None:
    path = tmp_path / "target.toml"
    path.write_text(text)
    with pytest.raises(tc.ConfigError):
        tc.TargetConfig.load(path)


def test_merge(tmp_path: Path) -> None:
    cfg = tc.TargetConfig(IQN, frozenset({HOST}), {0: (tmp_path / "l0").resolve()})
    m = tc.merge(cfg, None, [(1, tmp_path / "l1")], ["IQN.2026-11.org.example:Host2"])
    assert m.iqn == IQN and set(m.luns) == {0, 1}
    assert m.acl == {HOST, "iqn.2026-11.org.example:host2"}
    with pytest.raises(tc.ConfigError, match="LUN 0"):
        tc.merge(cfg, None, [(0, tmp_path / "other")], None)
    with pytest.raises(tc.ConfigError, match="--iqn"):
        tc.merge(cfg, "iqn.2026-11.org.prmigrate:another", [], None)


@pytest.mark.parametrize(("value", "size"), [("64M", 64 << 20), ("1g", 1 << 30), ("512", 512), (4096, 4096),
                                             ("2MiB", 2 << 20)])
def test_parse_size(value: object, size: int) -> None:
    assert tc.parse_size(value) == size


@pytest.mark.parametrize("value", ["", "12Q", "-1", 0, True, 1.5, "M"])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(QmpError, match="'size'"):
        tc.parse_size(value)


def test_cli_words() -> None:
    assert tc.cli_request(["lun", "add", "1", "/x/l1.img"], 1 << 20) == (
        "lun-add", {"lun": 1, "path": "/x/l1.img", "size": 1 << 20})
    assert tc.cli_request(["lun", "del", "1"], None) == ("lun-del", {"lun": 1})
    assert tc.cli_request(["lun", "list"], None) == ("query-luns", {})
    assert tc.cli_request(["acl", "add", HOST], None) == ("acl-add", {"initiator": HOST})
    assert tc.cli_request(["sessions"], None) == ("query-sessions", {})
    for words in (["lun"], ["lun", "add", "1"], ["lun", "del", "x"], ["frob"]):
        with pytest.raises(ValueError):
            tc.cli_request(words, None)


@pytest.fixture
def control(tmp_path: Path):  # type: ignore[no-untyped-def]
    lu0 = LogicalUnit(tmp_path / "lun0.img", 1 << 20, lun=0)
    node = TargetNode(IQN, {0: lu0})
    target = IscsiTarget([node])
    events: list[tuple[str, dict]] = []

    def make_lu(num: int, path: Path, size: int | None) -> LogicalUnit:
        return LogicalUnit(path, size, lun=num)

    c = tc.TargetControl(target, IQN, node.luns, {0: (tmp_path / "lun0.img").resolve()}, make_lu,
                         tmp_path / "target.toml", emit=lambda n, d: events.append((n, d)))
    c.events = events  # type: ignore[attr-defined]
    yield c
    for lu in node.luns.values():
        lu.close()


def test_lun_add_del_and_the_file(control, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    info = control.lun_add({"lun": 2, "path": "lun2.img", "size": "1M"})
    assert info["size"] == 1 << 20 and (tmp_path / "lun2.img").exists()
    assert sorted(control.luns) == [0, 2]
    assert set(tc.TargetConfig.load(tmp_path / "target.toml").luns) == {0, 2}
    # REPORT LUNS of LUN 0 lists the new one (the node presents it)
    assert control.luns[0].report_luns() == [0, 2]
    control.lun_del({"lun": 2})
    assert sorted(control.luns) == [0] and (tmp_path / "lun2.img").exists()
    assert set(tc.TargetConfig.load(tmp_path / "target.toml").luns) == {0}
    assert [n for n, _ in control.events] == ["LUN_ADDED", "LUN_DELETED"]
    with pytest.raises(QmpError, match="already served"):
        control.lun_add({"lun": 3, "path": "lun0.img"})


def test_acl(control) -> None:  # type: ignore[no-untyped-def]
    assert control.query_acl({}) == {"open": True, "initiators": []}
    control.acl_add({"initiator": HOST.upper().replace("IQN", "iqn")})
    assert control.query_acl({}) == {"open": False, "initiators": [HOST]}
    assert control.node.allows(HOST) and not control.node.allows("iqn.2026-11.org.example:other")
    with pytest.raises(QmpError, match="already"):
        control.acl_add({"initiator": HOST})
    assert control.acl_del({"initiator": HOST}) == {"sessions-ended": 0}
    assert control.query_acl({}) == {"open": False, "initiators": []}
    with pytest.raises(QmpError, match="not in the ACL"):
        control.acl_del({"initiator": HOST})


def test_unsaved_change_is_not_made(control, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def fail(path: Path, data: bytes, *, fsync: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tc, "atomic_write", fail)
    with pytest.raises(QmpError, match="cannot save"):
        control.lun_add({"lun": 2, "path": "lun2.img", "size": "1M"})
    assert sorted(control.luns) == [0] and not (tmp_path / "lun2.img").exists()
    with pytest.raises(QmpError, match="cannot save"):
        control.lun_del({"lun": 0})
    with pytest.raises(QmpError, match="cannot save"):
        control.acl_add({"initiator": HOST})
    assert sorted(control.luns) == [0] and control.node.acl is None and control.events == []


def test_an_empty_acl_from_the_file_stays_closed(tmp_path: Path) -> None:
    """acl = [] in target.toml means no initiator may log in, not an open node."""
    import argparse

    from prmigrate.commands import target as cmd

    config = tmp_path / "target.toml"
    tc.TargetConfig(IQN, frozenset(), {0: tmp_path / "lun0.img"}).save(config)
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(["--config", str(config), "--size", "1M"])
    cmd._configure(args)
    args.portals = cmd.portal_groups(args.listen, args.tpgt)
    target, luns = cmd._build(args, [])
    try:
        node = target.node(IQN)
        assert node is not None and node.acl == set() and not node.allows(HOST)
    finally:
        for lu in luns.values():
            lu.close()
