"""libiscsi's conformance suite (iscsi-test-cu) against ``prmigrate target``.

The suite scores "not implemented" and skipped tests as passed, so the run
is parsed per test: every reservation test (ALL.Prin*, ALL.Prout*,
ALL.Reserve6.*) must pass without [SKIPPED]; no test in ALL may fail; skips
are counted separately; and the target's log must show the PR commands
really changed reservation state (it logs only successful PR OUT changes).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import INITIATOR1, INITIATOR2, need, start_target, stop

pytestmark = pytest.mark.interop

RESERVATION = re.compile(r"^ALL\.(Prin|Prout)[A-Za-z]*\.|^ALL\.Reserve6\.")


@dataclass
class Outcome:
    name: str
    passed: bool = False
    failed: bool = False
    skipped: bool = False
    lines: list[str] = field(default_factory=list)


def parse_cunit(text: str, family: str = "ALL") -> dict[str, Outcome]:
    """Per-test outcome from iscsi-test-cu's normal/verbose output."""
    tests: dict[str, Outcome] = {}
    suite = ""
    cur: Outcome | None = None
    for line in text.splitlines():
        m = re.match(r"^Suite: (\S+)", line)
        if m:
            suite = m.group(1)
            cur = None
            continue
        m = re.match(r"^  Test: (\S+) \.\.\.(.*)$", line)
        if m:
            cur = Outcome(f"{family}.{suite}.{m.group(1)}")
            tests[cur.name] = cur
            line = m.group(2)
        if cur is None:
            continue
        cur.lines.append(line)
        if "[SKIPPED]" in line:
            cur.skipped = True
        stripped = line.strip()
        if stripped.startswith("passed") or line.endswith("passed"):
            cur.passed = True
        if stripped == "FAILED" or line.endswith("FAILED"):
            cur.failed = True
    return tests


def run_suite(url: str, test: str, out: Path, timeout: float = 240, verbose_scsi: bool = True,
              multipath_url: str | None = None, sanitize: bool = False) -> str:
    """``multipath_url``: a second path to the same LU (iscsi-test-cu's
    MultipathIO family skips without one); ``sanitize``: -S, the suite's
    permission to send SANITIZE."""
    args = ["iscsi-test-cu", "-d", "-i", INITIATOR1, "-I", INITIATOR2, "-t", test]
    if verbose_scsi:
        args.append("-V")
    if sanitize:
        args.append("-S")
    args.append(url)
    if multipath_url:
        args.append(multipath_url)
    with open(out, "wb") as f:
        subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    return out.read_text(errors="replace")


# SANITIZE tests run with -S. ALL.Sanitize.Reset is left out: it sends an
# OVERWRITE, sleeps 3 s, and expects TEST UNIT READY / READ(16) / START STOP
# UNIT to answer NOT READY, SANITIZE IN PROGRESS (04/1Bh) and the operation
# to outlive resets and a new login. Our sanitize of the 256 MiB test LU
# completes in well under a second, so the test fails on its timing
# assumption, not on a wrong answer; it stays skipped (without -S).
SANITIZE_RUN = (
    "BlockErase", "BlockEraseReserved", "CryptoErase", "CryptoEraseReserved", "ExitFailureMode",
    "InvalidServiceAction", "Overwrite", "OverwriteReserved", "Readonly", "Reservations",
)
SANITIZE_NOT_RUN = frozenset({"ALL.Sanitize.Reset"})

# What still skips in the ALL family, exactly (a regression changes the set):
# a medium that is not removable, LBPPB < 2 (one logical block per physical block), an
# LU that is not write-protected, and Sanitize.Reset above. WriteAtomic16.VPD
# runs and passes, but logs [SKIPPED] for its misalignment and granularity
# checks, which only apply to an LU with ATOMIC ALIGNMENT / GRANULARITY >= 2;
# test_write_atomic16_with_atomic_unit runs them (--atomic-unit 8).
EXPECTED_SKIPS = frozenset(
    {"ALL.WriteAtomic16.VPD"}
    | {f"ALL.PreventAllow.{t}" for t in ("Simple", "Eject", "ITNexusLoss", "Logout", "WarmReset", "ColdReset",
                                         "LUNReset", "2ITNexuses")}
    | {"ALL.StartStopUnit.Simple", "ALL.StartStopUnit.PwrCnd", "ALL.StartStopUnit.NoLoej", "ALL.NoMedia.NoMediaSBC"}
    | {"ALL.ReadOnly.ReadOnlySBC"}
    | {"ALL.CompareAndWrite.InvalidDataOutSize", "ALL.WriteSame10.UnmapUnaligned",
       "ALL.WriteSame10.InvalidDataOutSize", "ALL.WriteSame16.UnmapUnaligned", "ALL.WriteSame16.InvalidDataOutSize"}
    | SANITIZE_NOT_RUN
)


def test_parse_cunit_sample():
    sample = (
        "Suite: ProutRegister\n  Test: Simple ...passed\n"
        "Suite: Reserve6\n  Test: Simple ...    [SKIPPED] not implemented\npassed\n"
        "  Test: Bad ...    [FAILED] x\nFAILED\n"
    )
    t = parse_cunit(sample)
    assert t["ALL.ProutRegister.Simple"].passed and not t["ALL.ProutRegister.Simple"].skipped
    assert t["ALL.Reserve6.Simple"].skipped
    assert t["ALL.Reserve6.Bad"].failed


def test_iscsi_test_cu_all(tmp_path: Path):
    need("iscsi-test-cu")
    t = start_target(tmp_path)
    try:
        # the same LU as the second path: MultipathIO runs (two sessions,
        # one nexus each). Its CompareAndWrite test expects zeros at LBAs
        # 0-256 but zeroes only 0-255 (libiscsi 1.19): it passes on the
        # fresh image of this test, fails on an image whose LBA 256 an
        # earlier run left non-zero.
        text = run_suite(t.url(), "ALL", tmp_path / "iscsi-test-cu.txt", multipath_url=t.url())
        sanitize_text = run_suite(t.url(), ",".join(f"ALL.Sanitize.{n}" for n in SANITIZE_RUN),
                                  tmp_path / "sanitize.txt", sanitize=True)
    finally:
        stop(t.proc)
    tests = parse_cunit(text)
    sanitized = parse_cunit(sanitize_text)
    assert sorted(sanitized) == sorted(f"ALL.Sanitize.{n}" for n in SANITIZE_RUN), sanitize_text[-2000:]
    tests.update(sanitized)
    assert len(tests) >= 200, text[-2000:]
    failed = sorted(n for n, o in tests.items() if o.failed or not o.passed)
    skipped = sorted(n for n, o in tests.items() if o.skipped)
    reservation = {n: o for n, o in tests.items() if RESERVATION.search(n)}
    print(f"ALL: {len(tests)} tests, {len(tests) - len(failed) - len(skipped)} passed, "
          f"{len(skipped)} skipped, {len(failed)} failed; reservation {len(reservation)}")
    assert not failed, failed
    assert set(skipped) == EXPECTED_SKIPS, (sorted(set(skipped) - EXPECTED_SKIPS), sorted(EXPECTED_SKIPS - set(skipped)))
    assert len(tests) == 230 and len(skipped) == 20
    assert "sanitized (OVERWRITE)" in t.log and "sanitized (BLOCK_ERASE)" in t.log
    assert len(reservation) == 27, sorted(reservation)
    assert not [n for n, o in reservation.items() if o.skipped], "reservation tests skipped"
    assert all(o.passed for o in reservation.values())
    # the PR commands really ran: the suite sent them ...
    pr_sends = len(re.findall(r"Send PROUT/", text))
    assert pr_sends >= 50
    assert "not implemented" not in "\n".join(line for o in reservation.values() for line in o.lines).lower()
    # ... and the target executed them with GOOD status (state changes are
    # logged by the logical unit only when a PR OUT succeeds)
    log = t.log
    for word in ("registered", "reserved", "released", "preempt", "clear"):
        assert re.search(rf"prmigrate\.lun[\w.]*: .*{word}", log, re.IGNORECASE), word
    assert "Traceback" not in log


def test_write_atomic16_with_atomic_unit(tmp_path: Path):
    """WRITE ATOMIC(16) on an LU with ATOMIC ALIGNMENT = GRANULARITY = 8
    blocks: every WriteAtomic16 test passes and none skips (VPD sends a
    misaligned and a sub-granularity write and expects INVALID FIELD IN CDB)."""
    need("iscsi-test-cu")
    t = start_target(tmp_path, size="64M", extra=["--atomic-unit", "8"])
    try:
        text = run_suite(t.url(), "ALL.WriteAtomic16", tmp_path / "wa16.txt", timeout=120)
    finally:
        stop(t.proc)
    tests = parse_cunit(text)
    assert sorted(tests) == sorted(f"ALL.WriteAtomic16.{n}" for n in (
        "Simple", "BeyondEol", "ZeroBlocks", "WriteProtect", "DpoFua", "VPD")), text[-2000:]
    assert all(o.passed and not o.failed and not o.skipped for o in tests.values()), text[-2000:]
    assert text.count("INVALID_FIELD_IN_CDB") >= 9  # 7 WRPROTECT values, misaligned, granularity
    assert "Traceback" not in t.log


XCOPY_TESTS = (
    *(f"ALL.ExtendedCopy.{t}" for t in ("Simple", "ParamHdr", "DescrLimits", "DescrType", "ValidTgtDescr",
                                        "ValidSegDescr")),
    "ALL.ReceiveCopyResults.CopyStatus", "ALL.ReceiveCopyResults.OpParams",
)


def test_extended_copy_and_receive_copy_results(tmp_path: Path):
    """Both families run and pass without [SKIPPED]; the suite saw the copy
    manager's limits and each error sense it tests. (ValidTgtDescr leaves
    out its NUL-bit check for an SPC-4 LU, silently: NUL is obsolete.)"""
    need("iscsi-test-cu")
    t = start_target(tmp_path, size="64M")
    try:
        text = run_suite(t.url(), "ALL.ExtendedCopy,ALL.ReceiveCopyResults", tmp_path / "xcopy.txt", timeout=120)
    finally:
        stop(t.proc)
    tests = parse_cunit(text)
    assert sorted(tests) == sorted(XCOPY_TESTS), text[-2000:]
    assert all(o.passed and not o.failed and not o.skipped for o in tests.values()), text[-2000:]
    assert "max_target_desc=8, max_seg_desc=16" in text
    refused = "EXTENDEDCOPY returned CHECK_CONDITION ILLEGAL_REQUEST(0x05) "
    for ascq in ("(null)(0x2606)", "(null)(0x2607)", "(null)(0x2608)", "(null)(0x2609)",
                 "PARAMETER_LIST_LENGTH_ERROR(0x1a00)"):
        assert refused + ascq in text, ascq
    aborted = "EXTENDEDCOPY returned CHECK_CONDITION COPY ABORTED(0x0a) (null)"
    assert aborted + "(0x0804)" in text  # CSCD index beyond the list
    assert aborted + "(0x0000)" in text  # destination range beyond the LU
    assert "Traceback" not in t.log


def test_libiscsi_chap_mutual_and_acl(tmp_path: Path):
    need("iscsi-inq")
    t = start_target(tmp_path, size="16M", extra=[
        "--chap-user", "alice", "--chap-secret", "alice-secret1", "--mutual-user", "tgt",
        "--mutual-secret", "target-secret1", "--acl", INITIATOR1])
    try:
        base = f"{t.host}:{t.port}/{t.iqn}/0"

        def inq(initiator: str, cred: str, query: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(["iscsi-inq", "-i", initiator, f"iscsi://{cred}@{base}{query}"],
                                  capture_output=True, text=True, timeout=30, check=False)

        ok = inq(INITIATOR1, "alice%alice-secret1", "?target_user=tgt&target_password=target-secret1")
        assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout, ok.stderr
        assert inq(INITIATOR1, "alice%wrong-secret").returncode != 0
        assert inq(INITIATOR2, "alice%alice-secret1", "?target_user=tgt&target_password=target-secret1").returncode != 0
    finally:
        stop(t.proc)
    log = t.log
    assert "CHAP authenticated as alice" in log
    assert "AUTHENTICATION_FAILURE" in log and "AUTHORIZATION_FAILURE" in log


def test_libiscsi_with_header_digests(tmp_path: Path):
    need("iscsi-test-cu")
    t = start_target(tmp_path, extra=["--digests", "require"])
    try:
        text = run_suite(t.url(), "ALL.Write10", tmp_path / "w.txt", timeout=120, verbose_scsi=False)
        text += run_suite(t.url(), "ALL.Read10", tmp_path / "r.txt", timeout=120, verbose_scsi=False)
    finally:
        stop(t.proc)
    tests = parse_cunit(text)
    assert len(tests) >= 10 and all(o.passed and not o.failed for o in tests.values()), text[-2000:]
    assert "hd=True" in t.log
