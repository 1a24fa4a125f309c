import pytest

from prmigrate.device.config import ConfigError, DeviceConfig, parse_device_spec, split_spec
from prmigrate.device.identity import IdentityMode

URL = "iscsi://10.0.0.5:3260/iqn.2026-01.org.example:lun/0"


def test_full_spec():
    c = parse_device_spec(
        f"name=vm1,backend={URL},target=iqn.2026-01.org.example:lun,machine=pc-q35-11.0,"
        "migrate-pr=on,guests=iqn.a:G1+iqn.a:g2,identity=guest"
    )
    assert c.name == "vm1" and c.backend_url == URL
    assert c.target_iqn == "iqn.2026-01.org.example:lun" and c.lun == 0
    assert c.machine == "pc-q35-11.0" and c.migrate_pr is True
    assert c.guests == frozenset({"iqn.a:g1", "iqn.a:g2"})
    assert c.identity is IdentityMode.GUEST
    assert c.effective_migrate_pr
    assert c.allows("IQN.A:G1") and not c.allows("iqn.a:g3")


def test_minimal_spec_defaults():
    c = parse_device_spec(f"name=d,backend={URL.replace('/0', '/3')}")
    assert c.target_iqn == "iqn.2026-01.org.example:lun" and c.lun == 3
    assert c.migrate_pr is None and c.guests is None and c.identity is IdentityMode.GUEST
    assert c.machine == "pc-q35-11.0" and c.effective_migrate_pr  # alias resolved at configuration


def test_old_machine_default_off_and_explicit_on():
    assert not parse_device_spec(
        f"name=d,backend={URL},machine=pc-i440fx-10.2"
    ).effective_migrate_pr
    assert parse_device_spec(
        f"name=d,backend={URL},machine=pc-i440fx-10.2,migrate-pr=on"
    ).effective_migrate_pr


def test_portal_url_needs_target():
    c = parse_device_spec("name=d,backend=iscsi://h:3261,target=iqn.x:t,lun=2,identity=host")
    assert c.target_iqn == "iqn.x:t" and c.lun == 2 and c.identity is IdentityMode.HOST
    with pytest.raises(ConfigError, match="target"):
        parse_device_spec("name=d,backend=iscsi://h:3261")


def test_double_comma_escape():
    assert split_spec("a=x,,y,b=2") == [("a", "x,y"), ("b", "2")]


@pytest.mark.parametrize(
    "spec,match",
    [
        (f"name=d,backend={URL},bogus=1", "unknown device property"),
        (f"name=d,name=e,backend={URL}", "twice"),
        ("name=d", "backend"),
        (f"backend={URL}", "name"),
        (f"name=d,backend={URL},machine=pc-q35-8.0", "unknown machine"),
        (f"name=d,backend={URL},migrate-pr=maybe", "on/off"),
        (f"name=d,backend={URL},identity=vm", "identity"),
        (f"name=d,backend={URL},target=iqn.other:x,frontend=iqn.f:x", "disagrees"),
        (f"name=d,backend={URL},lun=1", "disagrees"),
        (f"name=d,backend={URL},lun=x", "number"),
        ("name=d,backend=http://x/y/0", "backend"),
        (f"name=d,backend={URL},,", "bad LUN"),  # ",," is an escaped comma
        (f"name=d,backend={URL},", "empty item"),
        (f"name=d,backend={URL},guests=", "guest list"),
        (f"name=a/b,backend={URL}", "device name"),
        (f"name=d,backend={URL},novalue", "key=value"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_device_spec(spec)


def test_dict_round_trip_and_spec_round_trip():
    c = parse_device_spec(
        f"name=vm1,backend={URL},machine=pc-q35-10.1,migrate-pr=off,guests=iqn.a:g1,identity=host"
    )
    d = c.to_dict()
    assert d["version"] == 1 and d["guests"] == ["iqn.a:g1"] and d["identity"] == "host"
    assert DeviceConfig.from_dict(d) == c
    assert DeviceConfig.from_dict(d | {"future_key": 1}) == c
    assert parse_device_spec(c.to_spec()) == c


@pytest.mark.parametrize(
    "patch",
    [
        {"version": 2},
        {"migrate_pr": "on"},
        {"guests": "iqn.a:g1"},
        {"lun": "0"},
        {"identity": "x"},
        {"name": 5},
        {"machine": "zz"},
    ],
)
def test_from_dict_rejects(patch):
    d = parse_device_spec(f"name=vm1,backend={URL}").to_dict() | patch
    with pytest.raises(ConfigError):
        DeviceConfig.from_dict(d)


def test_frozen():
    c = parse_device_spec(f"name=vm1,backend={URL}")
    with pytest.raises(AttributeError):
        c.name = "x"  # type: ignore[misc]


def test_target_differing_from_the_url_names_the_frontend_node():
    c = parse_device_spec(f"name=vm1,backend={URL},target=iqn.2026-11.org.prmigrate:vm1")
    assert c.target_iqn == "iqn.2026-01.org.example:lun"
    assert c.frontend_iqn == "iqn.2026-11.org.prmigrate:vm1"
    assert parse_device_spec(c.to_spec()) == c
    assert DeviceConfig.from_dict(c.to_dict()) == c
    c2 = parse_device_spec(f"name=vm1,backend={URL},frontend=iqn.x:f")
    assert c2.frontend_iqn == "iqn.x:f" and c2.target_iqn == "iqn.2026-01.org.example:lun"


@pytest.mark.parametrize(
    "alias,name", [("pc", "pc-i440fx-11.0"), ("Q35", "pc-q35-11.0"), ("pc-q35-9.1", "pc-q35-9.1")]
)
def test_machine_alias_resolved_and_carried(alias, name):
    c = parse_device_spec(f"name=vm1,backend={URL},machine={alias}")
    assert c.machine == name
    assert c.to_dict()["machine"] == name and DeviceConfig.from_dict(c.to_dict()) == c


URL2 = "iscsi://10.0.0.6:3260/iqn.2026-01.org.example:lun/0"


def test_backend_given_twice_is_two_paths_and_round_trips():
    c = parse_device_spec(f"name=vm1,backend={URL},backend={URL2}")
    assert c.backend_url == URL and c.more_backends == (URL2,) and c.backend_urls == (URL, URL2)
    assert parse_device_spec(c.to_spec()) == c
    assert DeviceConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["more_backends"] == [URL2]


def test_one_path_config_is_unchanged():
    c = parse_device_spec(f"name=vm1,backend={URL}")
    assert c.more_backends == () and c.backend_urls == (URL,)
    assert "more_backends" not in c.to_dict() and c.to_spec().count("backend=") == 1
    # a dict written before multipath existed loads as one path
    old = {k: v for k, v in c.to_dict().items()}
    assert DeviceConfig.from_dict(old) == c


@pytest.mark.parametrize("second, match", [
    ("iscsi://10.0.0.6:3260/iqn.2026-01.org.example:other/0", "every path must name target"),
    ("iscsi://10.0.0.6:3260/iqn.2026-01.org.example:lun/1", "every path must name target"),
    (URL, "same backend URL is given twice"),
    ("http://x", "backend"),
])
def test_paths_to_another_target_or_lun_are_refused(second, match):
    with pytest.raises(ConfigError, match=match):
        parse_device_spec(f"name=vm1,backend={URL},backend={second}")


def test_a_portal_only_path_takes_the_device_target():
    c = parse_device_spec(f"name=vm1,backend={URL},backend=iscsi://10.0.0.6:3261")
    assert c.more_backends == ("iscsi://10.0.0.6:3261",)
