"""`prmigrate pr` run as a subprocess against tgtd and prmigrate's own target."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from prmigrate.commands.pr import parse_key, parse_transport_id, parse_type
from prmigrate.scsi.constants import PrType
from prmigrate.scsi.transport_id import TransportId
from tests.iscsi.test_initiator import (
    PRM_TARGET,
    TARGET,
    PrmTarget,
    Tgt,
    needs_tgt,
)

H1 = ("--initiator", "iqn.2026-11.org.prmigrate:host1", "--isid", "23d000000001")
H2 = ("--initiator", "iqn.2026-11.org.prmigrate:host2", "--isid", "0x23d000000002")


def pr(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prmigrate.cli", "pr", *args, "--timeout", "10", url],
        capture_output=True, text=True, timeout=60,
    )


# --------------------------------------------------------------- parsing


def test_parse_key_is_hex_like_sg_persist() -> None:
    assert parse_key("123abc") == 0x123ABC
    assert parse_key("0x123ABC") == 0x123ABC
    assert parse_key("ffffffffffffffff") == (1 << 64) - 1


@pytest.mark.parametrize("bad", ["xyz", "1" * 17, ""])
def test_parse_key_rejects(bad: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_key(bad)


@pytest.mark.parametrize(
    "text,want",
    [("WE", PrType.WRITE_EXCLUSIVE), ("ea", PrType.EXCLUSIVE_ACCESS), ("WE_RO", PrType(5)),
     ("EA_RO", PrType(6)), ("we_ar", PrType(7)), ("EA_AR", PrType(8)), ("3", PrType(3)),
     ("0x8", PrType(8)), ("2", 2), ("we-ro", PrType(5)),
     ("WRITE_EXCLUSIVE_REGISTRANTS_ONLY", PrType(5)), ("Exclusive Access, all registrants", PrType(8)),
     ("write exclusive - registrants only", PrType(5))],
)
def test_parse_type(text: str, want: object) -> None:
    assert parse_type(text) == want


def test_parse_transport_id() -> None:
    assert parse_transport_id("iqn.x:h3") == TransportId("iqn.x:h3")
    assert parse_transport_id("iqn.x:h3,i,0x23d000000003") == TransportId("iqn.x:h3", 0x23D000000003)


def test_bad_url_is_a_syntax_error() -> None:
    r = pr("http://127.0.0.1/iqn.x/0", "--read-keys")
    assert r.returncode == 1 and "not an iscsi:// URL" in r.stderr


def test_unreachable_portal_exits_35() -> None:
    from tests.iscsi.test_initiator import free_port

    r = pr(f"iscsi://127.0.0.1:{free_port()}/iqn.x:none/0", "--read-keys")
    assert r.returncode == 15 and "cannot log in" in r.stderr  # sg3_utils: cannot open


def test_no_action_is_read_keys_like_sg_persist() -> None:
    from tests.iscsi.test_initiator import free_port

    r = pr(f"iscsi://127.0.0.1:{free_port()}/iqn.2026-11.org.x:none/0")
    assert r.returncode == 15 and "cannot log in" in r.stderr  # it tried: READ KEYS


# ------------------------------------------------------------------ tgtd


@pytest.fixture(scope="module")
def tgt_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import shutil

    if not (shutil.which("tgtd") and shutil.which("tgtadm")):
        pytest.skip("tgt (tgtd/tgtadm) is not installed")
    t = Tgt(tmp_path_factory.mktemp("tgt-pr"))
    try:
        t.start()
        t.add_target(1, TARGET)
        yield f"iscsi://127.0.0.1:{t.port}/{TARGET}/1"
    finally:
        t.stop()


@needs_tgt
def test_tgt_register_and_read_keys(tgt_url: str) -> None:
    r = pr(tgt_url, "--read-keys", *H1)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "  PR generation=0x0, there are NO registered reservation keys\n"
    assert pr(tgt_url, "--register", "--sa-key", "123abc", *H1).returncode == 0
    assert pr(tgt_url, "--register", "--sa-key", "0x456", *H2).returncode == 0
    r = pr(tgt_url, "--read-keys", *H1)
    assert r.returncode == 0
    assert r.stdout == (
        "  PR generation=0x2, 2 registered reservation keys follow:\n    0x123abc\n    0x456\n"
    )
    r = pr(tgt_url, "--read-keys", "--json", *H2)
    assert json.loads(r.stdout) == {
        "command": "PR in (Read keys)", "status": "GOOD", "generation": 2,
        "keys": ["0x123abc", "0x456"], "truncated": False,
    }
    r = pr(tgt_url, "--read-reservation", *H1)
    assert r.returncode == 0
    assert r.stdout == "  PR generation=0x2, there is NO reservation held\n"


@needs_tgt
def test_tgt_report_capabilities(tgt_url: str) -> None:
    r = pr(tgt_url, "--report-capabilities", "--json", *H1)
    assert r.returncode == 0, r.stderr
    caps = json.loads(r.stdout)
    assert caps["tmv"] is True
    assert caps["types"] == [
        "Write Exclusive", "Exclusive Access", "Write Exclusive, registrants only",
        "Exclusive Access, registrants only", "Write Exclusive, all registrants",
        "Exclusive Access, all registrants"]
    r = pr(tgt_url, "--report-capabilities", *H1)
    assert r.stdout.startswith("Report capabilities response:\n")
    assert "      Write Exclusive: 1\n" in r.stdout


@needs_tgt
def test_tgt_read_full_status_is_not_implemented(tgt_url: str) -> None:
    """tgt does not implement READ FULL STATUS (REFERENCE 3): the error is
    reported in words and the exit status is the sense key."""
    r = pr(tgt_url, "--read-full-status", *H1)
    assert r.returncode == 5
    assert r.stderr.startswith(
        "PR in (Read full status): bad field in cdb or parameter list (perhaps unsupported "
        "service action)\n  sense: ILLEGAL REQUEST: INVALID FIELD IN CDB")
    r = pr(tgt_url, "--read-full-status", "--json", *H1)
    info = json.loads(r.stdout)
    assert info["status"] == "CHECK CONDITION" and (info["sense_key"], info["asc"]) == (5, 0x24)


@needs_tgt
def test_tgt_unregistered_reserve_conflicts(tgt_url: str) -> None:
    h3 = ("--initiator", "iqn.2026-11.org.prmigrate:host3", "--isid", "3")
    r = pr(tgt_url, "--reserve", "--key", "999", "--type", "WE", *h3)
    assert r.returncode == 24
    assert r.stderr == "PR out (Reserve): Reservation conflict\n"


# ------------------------------------------------- prmigrate target


@pytest.fixture(scope="module")
def prm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    t = PrmTarget(tmp_path_factory.mktemp("prm-pr"))
    try:
        t.start()
        yield f"iscsi://127.0.0.1:{t.port}/{PRM_TARGET}/0"
    finally:
        t.stop()


def test_prm_full_cycle(prm_url: str) -> None:
    """Each step is a new session with the same initiator name and ISID, hence
    the same I_T nexus and registration."""
    u = prm_url
    assert pr(u, "--register", "--sa-key", "123abc", *H1).returncode == 0
    assert pr(u, "--register-ignore", "--sa-key", "456", *H2).returncode == 0
    r = pr(u, "--reserve", "--key", "123abc", "--type", "WE", *H1)
    assert (r.returncode, r.stdout) == (0, "PR out: command (Reserve) successful\n")
    r = pr(u, "--read-reservation", *H2)
    assert r.stdout == (
        "  PR generation=0x2, Reservation follows:\n    Key=0x123abc\n"
        "    scope: LU_SCOPE,  type: Write Exclusive\n"
    )
    r = pr(u, "--read-full-status", *H2)
    assert r.returncode == 0
    assert "    Key=0x123abc\n" in r.stdout and "      << Reservation holder >>\n" in r.stdout
    assert "iSCSI name and session id: iqn.2026-11.org.prmigrate:host1,i,0x23d000000001" in r.stdout
    # errors in words
    r = pr(u, "--release", "--key", "123abc", "--type", "EA", *H1)
    assert r.returncode == 5
    assert "ILLEGAL REQUEST: INVALID RELEASE OF PERSISTENT RESERVATION" in r.stderr
    r = pr(u, "--reserve", "--key", "456", "--type", "EA", *H2)
    assert r.returncode == 24
    r = pr(u, "--reserve", "--key", "123abc", "--type", "2", *H1)  # obsolete type
    assert r.returncode == 5 and "ILLEGAL REQUEST: INVALID FIELD IN CDB" in r.stderr
    # the takeover a migration does: PREEMPT with the holder's key
    r = pr(u, "--preempt", "--key", "456", "--sa-key", "123abc", "--type", "WE_RO", *H2)
    assert r.returncode == 0, r.stderr
    r = pr(u, "--read-reservation", "--json", *H1)
    assert json.loads(r.stdout)["reservation"] == {
        "key": "0x456", "scope": 0, "type": 5, "type_name": "Write Exclusive, registrants only"}
    r = pr(u, "--read-keys", *H1)
    assert r.stdout == "  PR generation=0x3, 1 registered reservation key follows:\n    0x456\n"
    # REGISTER AND MOVE to a third initiator port, keeping our registration
    r = pr(u, "--register-move", "--key", "456", "--sa-key", "789",
           "--transport-id", "iqn.2026-11.org.prmigrate:host3,i,0x3", "--rel-port", "1", *H2)
    assert r.returncode == 0, r.stderr
    r = pr(u, "--read-full-status", "--json", *H1)
    regs = {e["key"]: e for e in json.loads(r.stdout)["registrations"]}
    assert regs["0x789"]["holder"] and not regs["0x456"]["holder"]
    assert regs["0x789"]["transport_id"] == "iqn.2026-11.org.prmigrate:host3,i,0x000000000003"
    r = pr(u, "--register-move", "--key", "456", "--sa-key", "1", *H2)
    assert r.returncode == 31 and "--transport-id" in r.stderr  # sg3_utils: option missing
    r = pr(u, "--clear", "--key", "456", *H2)
    assert r.returncode == 0
    r = pr(u, "--read-keys", "--json", *H1)
    assert json.loads(r.stdout)["keys"] == [] and json.loads(r.stdout)["generation"] == 5


def test_prm_report_capabilities(prm_url: str) -> None:
    r = pr(prm_url, "--report-capabilities", "--json", *H1)
    caps = json.loads(r.stdout)
    assert r.returncode == 0 and caps["ptpl_c"] and caps["sip_c"] and caps["atp_c"]


def test_prm_preempt_abort_and_aptpl(prm_url: str) -> None:
    u = prm_url
    assert pr(u, "--register", "--sa-key", "a1", "--aptpl", *H1).returncode == 0
    assert pr(u, "--register", "--sa-key", "b2", *H2).returncode == 0
    assert pr(u, "--reserve", "--key", "a1", "--type", "EA", *H1).returncode == 0
    r = pr(u, "--preempt-abort", "--key", "b2", "--sa-key", "a1", "--type", "EA", *H2)
    assert r.returncode == 0, r.stderr
    r = pr(u, "--read-reservation", "--json", *H2)
    assert json.loads(r.stdout)["reservation"]["key"] == "0xb2"
    assert pr(u, "--clear", "--key", "b2", *H2).returncode == 0


# ----------------------------------------------- sg_persist's conventions
#
# sg3_utils' sg_persist needs a SCSI device (a block or sg node), which this
# machine does not have, so its answers cannot be compared live. The
# expected texts below are sg_persist's output for the same parameter data,
# written from its documented formats (sg_persist(8), sg3_utils(8) and the
# printf formats of sg_persist.c: "PR out: command (%s) successful",
# "  PR generation=0x%x, %d registered reservation keys follow:",
# "    scope: LU_SCOPE,  type: %s", the -H layout of sg_lib's hex dump).


def test_sg_persist_long_options_full_cycle(prm_url: str) -> None:
    u = prm_url
    h3 = ("--initiator", "iqn.2026-11.org.prmigrate:host3", "--isid", "0x3")
    h4 = ("--initiator", "iqn.2026-11.org.prmigrate:host4", "--isid", "0x4")
    r = pr(u, "--out", "--register", "--param-sark=123abc", *h3)
    assert (r.returncode, r.stdout) == (0, "PR out: command (Register) successful\n"), r.stderr
    r = pr(u, "-o", "-I", "-S", "0x456", "-Z", *h4)
    assert (r.returncode, r.stdout) == (
        0, "PR out: command (Register and ignore existing key) successful\n"), r.stderr
    r = pr(u, "--out", "--reserve", "--param-rk=123abc", "--prout-type=5", *h3)
    assert r.returncode == 0, r.stderr
    r = pr(u, "--in", "--read-reservation", *h4)
    gen = int(re.search(r"generation=0x([0-9a-f]+)", r.stdout)[1], 16)  # type: ignore[index]
    assert r.stdout.replace(f"0x{gen:x}", "0x2", 1) == ("  PR generation=0x2, Reservation follows:\n    Key=0x123abc\n"
                        "    scope: LU_SCOPE,  type: Write Exclusive, registrants only\n")
    r = pr(u, "-k", "-n", *h4)  # -n: sg_persist's "no INQUIRY", accepted
    assert r.stdout.replace(f"0x{gen:x}", "0x2", 1) == ("  PR generation=0x2, 2 registered reservation keys follow:\n"
                        "    0x123abc\n    0x456\n")
    # -H: generation and additional length, then the descriptors in hex
    r = pr(u, "-k", "-H", *h4)
    assert r.stdout.replace(f"0x{gen:x}", "0x2", 1) == ("  PR generation=0x2, Additional length=16\n"
                        " 00     00 00 00 00 00 12 3a bc  00 00 00 00 00 00 04 56\n"), r.stdout
    r = pr(u, "-k", "-HH", *h4)
    assert r.stdout == (f" 00     00 00 00 {gen:02x} 00 00 00 10  00 00 00 00 00 12 3a bc\n"
                        " 10     00 00 00 00 00 00 04 56\n")
    r = pr(u, "--read-status", *h4)
    assert r.returncode == 0
    assert "      All target ports bit clear\n      Relative port address: 0x1\n" in r.stdout
    assert "      scope: LU_SCOPE,  type: Write Exclusive, registrants only\n" in r.stdout
    # usage: sg3_utils' exit status 1, and contradictions 31
    r = pr(u, "--in", "--register", *h4)
    assert r.returncode == 31 and "--in contradicts --register" in r.stderr
    r = pr(u, "--prout-type=nonsense", "-R", *h4)
    assert r.returncode == 1 and "argument -T/--prout-type/--type: not a reservation type" in r.stderr
    r = pr(u, "--param-rk=xyz", "-R", *h4)
    assert r.returncode == 1 and "not a hexadecimal key: 'xyz'" in r.stderr
    r = pr(u, "--no-such-option", *h4)
    assert r.returncode == 1 and "unrecognized arguments: --no-such-option" in r.stderr
    # RELEASE with the wrong type: ILLEGAL REQUEST, exit 5
    r = pr(u, "--out", "--release", "--param-rk=123abc", "--prout-type=1", *h3)
    assert r.returncode == 5
    assert r.stderr.startswith("PR out (Release): bad field in cdb or parameter list")
    assert "INVALID RELEASE OF PERSISTENT RESERVATION" in r.stderr
    r = pr(u, "--out", "--clear", "--param-rk=456", "-d", u, *h4)
    assert r.returncode == 0, r.stderr


def test_sg_persist_version_and_help() -> None:
    import prmigrate

    for opt in ("-V", "--version"):
        r = subprocess.run([sys.executable, "-m", "prmigrate", "pr", opt], capture_output=True,
                           text=True, timeout=30)
        assert (r.returncode, r.stdout) == (0, f"prmigrate pr {prmigrate.__version__}\n")
    r = subprocess.run([sys.executable, "-m", "prmigrate", "pr", "--help"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0
    for opt in ("--param-rk", "--param-sark", "--prout-type", "--param-aptpl", "--param-alltgpt",
                "--relative-target-port", "--replace-lost", "--read-status", "--hex", "--no-inquiry",
                "--maxlen", "--alloc-length", "--transport-id", "--unreg", "--device"):
        assert opt in r.stdout, opt
    assert "1 syntax error" in r.stdout and "24 RESERVATION CONFLICT" in r.stdout


def test_hex_dump_layout() -> None:
    from prmigrate.commands.pr import hex_dump

    assert hex_dump(bytes(range(20))) == (
        " 00     00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f\n"
        " 10     10 11 12 13")
    assert hex_dump(b"") == ""
