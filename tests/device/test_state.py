import pytest

from prmigrate.device.state import DevicePrState, GuestPrState, StateChange, describe_guest
from prmigrate.scsi.constants import PrType


def test_round_trip_with_unverified():
    s = DevicePrState({"iqn.a:g1": GuestPrState(0xAA, True, True, PrType.EXCLUSIVE_ACCESS)}, 4)
    s.mark_unverified("IQN.A:G1")
    d = s.to_dict()
    assert d["unverified"] == ["iqn.a:g1"]
    back = DevicePrState.from_dict(d)
    assert back == s and not back.verified


def test_first_layout_still_reads_and_writes():
    old = {
        "guests": {"IQN.A:G1": {"key": 5, "aptpl": False, "holder": False, "rtype": 0, "scope": 0}},
        "generation": None,
    }
    s = DevicePrState.from_dict(old)
    assert s.get("iqn.a:g1").key == 5 and s.verified
    assert "unverified" not in s.to_dict()  # an empty set is not written


def test_copy_is_independent():
    s = DevicePrState({"g": GuestPrState(1)})
    c = s.copy()
    c.set("g", GuestPrState())
    c.mark_unverified("g")
    assert s.get("g").key == 1 and s.verified


@pytest.mark.parametrize(
    "bad",
    [
        {"guests": []},
        {"guests": {"g": 5}},
        {"guests": {"g": {"key": "1"}}},
        {"guests": {"g": {"key": -1}}},
        {"guests": {"g": {"key": 1 << 64}}},
        {"guests": {"g": {"key": 1, "rtype": 2}}},
        {"guests": {"g": {"key": 1, "scope": 16}}},
        {"guests": {"g": {"key": True}}},
        {"guests": {}, "unverified": "g"},
    ],
)
def test_from_dict_rejects_with_value_error(bad):
    with pytest.raises(ValueError):
        DevicePrState.from_dict(bad)


def test_describe():
    c = StateChange(
        "g", GuestPrState(), GuestPrState(0x1A, True, True, PrType.WRITE_EXCLUSIVE, 0), "registered"
    )
    assert c.describe() == "g: unregistered -> key 0x1a aptpl, holds Write Exclusive (registered)"
    assert describe_guest(GuestPrState(2)) == "key 0x2"
