"""`prmigrate pr`: persistent reservations on any iscsi:// URL, sg_persist style.

    prmigrate pr --initiator iqn.2026-11.org.example:node1 -k URL
    prmigrate pr --initiator iqn.2026-11.org.example:node1 --out --register --param-sark=123abc URL
    prmigrate pr --initiator iqn.2026-11.org.example:node1 --out --reserve --param-rk=123abc --prout-type=1 URL

sg_persist's options are accepted as they are (short and long; the older
prmigrate spellings --key, --sa-key, --type, --aptpl, --all-tg-pt and
--rel-port are kept as aliases) and the output has sg_persist's wording. As
with sg_persist, no action means READ KEYS, keys are hexadecimal (0x
optional), --prout-type takes the type's number (or, here, a name: WE, EA,
WE_RO, EA_RO, WE_AR, EA_AR), --alloc-length is hex and --maxlen decimal.
Unlike sg_persist, --out is optional before a PR OUT action and no INQUIRY
is sent first (as if -n were given).

Exit status (sg3_utils' values): 0 success; 1 syntax error in the command
line; 2 NOT READY; 3 MEDIUM or HARDWARE ERROR; 5 ILLEGAL REQUEST (other
than an invalid operation code); 6 UNIT ATTENTION; 7 DATA PROTECT; 9
ILLEGAL REQUEST, invalid operation code; 11 ABORTED COMMAND; 15 the target
cannot be reached or the login fails; 24 RESERVATION CONFLICT; 26 BUSY; 27
TASK SET FULL; 29 TASK ABORTED; 31 contradicting or missing options; 33
the command timed out; 97 malformed response; 98 other sense data; 99
other errors (the connection failed after the command was sent).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from .. import __version__
from ..lun.types import Result
from ..scsi.constants import PrInAction, PrOutAction, PrType, Status
from ..scsi.pr import (
    ReadFullStatus,
    ReadKeys,
    ReadReservation,
    ReportCapabilities,
    pr_out_params,
    register_and_move_params,
)
from ..scsi.sense import SenseDecodeError, decode_sense
from ..scsi.transport_id import PrDecodeError, TransportId
from ..scsi.vocabulary import TYPE_CHOICES, PrTypeError, format_key, parse_pr_type, words
from . import _args

# sg3_utils' exit status values (sg3_utils(8), EXIT STATUS).
EXIT_OK = 0
EXIT_SYNTAX = 1
EXIT_NOT_READY = 2
EXIT_MEDIUM_HARD = 3
EXIT_ILLEGAL_REQUEST = 5
EXIT_UNIT_ATTENTION = 6
EXIT_DATA_PROTECT = 7
EXIT_INVALID_OP = 9
EXIT_COPY_ABORTED = 10
EXIT_ABORTED_COMMAND = 11
EXIT_MISCOMPARE = 14
EXIT_FILE_ERROR = 15
EXIT_NO_SENSE = 20
EXIT_RECOVERED = 21
EXIT_CONFLICT = 24
EXIT_CONDITION_MET = 25
EXIT_BUSY = 26
EXIT_TASK_SET_FULL = 27
EXIT_ACA_ACTIVE = 28
EXIT_TASK_ABORTED = 29
EXIT_CONTRADICT = 31
EXIT_TIMEOUT = 33
EXIT_MALFORMED = 97
EXIT_SENSE_OTHER = 98
EXIT_OTHER = 99
EXIT_TRANSPORT = EXIT_FILE_ERROR  # the old name: the "device" cannot be opened

# sense key -> (exit status, sg3_utils' category words)
SENSE_EXITS = {
    0x0: (EXIT_NO_SENSE, "No sense key"),
    0x1: (EXIT_RECOVERED, "Recovered error"),
    0x2: (EXIT_NOT_READY, "Not ready"),
    0x3: (EXIT_MEDIUM_HARD, "Medium or hardware error"),
    0x4: (EXIT_MEDIUM_HARD, "Medium or hardware error"),
    0x5: (EXIT_ILLEGAL_REQUEST, "Illegal request"),
    0x6: (EXIT_UNIT_ATTENTION, "Unit attention"),
    0x7: (EXIT_DATA_PROTECT, "Data protect"),
    0x8: (EXIT_MEDIUM_HARD, "Medium or hardware error"),  # BLANK CHECK
    0xA: (EXIT_COPY_ABORTED, "Copy aborted"),
    0xB: (EXIT_ABORTED_COMMAND, "Aborted command"),
    0xE: (EXIT_MISCOMPARE, "Miscompare"),
}
# SCSI status other than GOOD and CHECK CONDITION -> (exit status, words)
STATUS_EXITS = {
    Status.RESERVATION_CONFLICT: (EXIT_CONFLICT, "Reservation conflict"),
    Status.CONDITION_MET: (EXIT_CONDITION_MET, "Condition met"),
    Status.BUSY: (EXIT_BUSY, "Busy"),
    Status.TASK_SET_FULL: (EXIT_TASK_SET_FULL, "Task set full"),
    Status.ACA_ACTIVE: (EXIT_ACA_ACTIVE, "ACA active"),
    Status.TASK_ABORTED: (EXIT_TASK_ABORTED, "Task aborted"),
}
ASC_INVALID_OPCODE = 0x20

DEFAULT_INITIATOR = "iqn.2026-11.org.prmigrate:pr-tool"
DEFAULT_ISID = 0x23D000000001

IN_ACTIONS = {
    "read_keys": PrInAction.READ_KEYS,
    "read_reservation": PrInAction.READ_RESERVATION,
    "report_capabilities": PrInAction.REPORT_CAPABILITIES,
    "read_full_status": PrInAction.READ_FULL_STATUS,
}
OUT_ACTIONS = {
    "register": PrOutAction.REGISTER,
    "register_ignore": PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
    "reserve": PrOutAction.RESERVE,
    "release": PrOutAction.RELEASE,
    "clear": PrOutAction.CLEAR,
    "preempt": PrOutAction.PREEMPT,
    "preempt_abort": PrOutAction.PREEMPT_AND_ABORT,
    "register_move": PrOutAction.REGISTER_AND_MOVE,
    "replace_lost": PrOutAction.REPLACE_LOST_RESERVATION,
}
# sg_persist's names of the service actions, as in "PR out (Register): ..."
# (two tables: the IntEnums of PR IN and PR OUT share values)
IN_WORDS: dict[PrInAction, str] = {
    PrInAction.READ_KEYS: "Read keys",
    PrInAction.READ_RESERVATION: "Read reservation",
    PrInAction.REPORT_CAPABILITIES: "Report capabilities",
    PrInAction.READ_FULL_STATUS: "Read full status",
}
OUT_WORDS: dict[PrOutAction, str] = {
    PrOutAction.REGISTER: "Register",
    PrOutAction.RESERVE: "Reserve",
    PrOutAction.RELEASE: "Release",
    PrOutAction.CLEAR: "Clear",
    PrOutAction.PREEMPT: "Preempt",
    PrOutAction.PREEMPT_AND_ABORT: "Preempt and abort",
    PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY: "Register and ignore existing key",
    PrOutAction.REGISTER_AND_MOVE: "Register and move",
    PrOutAction.REPLACE_LOST_RESERVATION: "Replace lost reservation",
}
TYPE_WORDS: dict[PrType, str] = {t: words(t) for t in PrType if t is not PrType.NONE}


def _hex_number(text: str, what: str, bits: int) -> int:
    t = text.strip()
    if t[:2].lower() == "0x":
        t = t[2:]
    try:
        value = int(t, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hexadecimal {what}: {text!r}") from None
    if not 0 <= value < 1 << bits:
        raise argparse.ArgumentTypeError(f"{what} {text!r} does not fit in {bits} bits")
    return value


def parse_key(text: str) -> int:
    """A reservation key in hex (``0x`` optional), 64 bits."""
    return _hex_number(text, "key", 64)


def parse_isid(text: str) -> int:
    """An ISID in hex (``0x`` optional), 48 bits."""
    return _hex_number(text, "ISID", 48)


def parse_rtpi(text: str) -> int:
    """A relative target port identifier in hex, as sg_persist's -Q takes it."""
    return _hex_number(text, "relative target port identifier", 16)


def parse_alloc_hex(text: str) -> int:
    """--alloc-length: hex, 0-8192 (sg_persist's -l)."""
    n = _hex_number(text, "allocation length", 16)
    if n > 8192:
        raise argparse.ArgumentTypeError(f"allocation length {text!r} is more than 8192 (0x2000)")
    return n


def parse_maxlen(text: str) -> int:
    """--maxlen: decimal, or hex with 0x or an h suffix (sg_persist's -m)."""
    t = text.strip().lower()
    try:
        n = int(t[2:], 16) if t.startswith("0x") else int(t[:-1], 16) if t.endswith("h") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an allocation length: {text!r}") from None
    if not 0 <= n <= 8192:
        raise argparse.ArgumentTypeError(f"allocation length {text!r} is not in 0-8192")
    return n


def parse_type(text: str) -> PrType | int:
    """A reservation type: its number 0-15 (numbers SPC does not define are
    sent as given, as sg_persist does) or any name of scsi/vocabulary.py."""
    try:
        return parse_pr_type(text, allow_obsolete=True)
    except PrTypeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_transport_id(text: str) -> TransportId:
    """``iqn...`` (any session) or ``iqn...,i,0x<12 hex digits>`` (one initiator port)."""
    name, sep, isid = text.partition(",i,")
    try:
        if not sep:
            return TransportId(name.strip())
        return TransportId(name.strip(), parse_isid(isid))
    except PrDecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *a: Any, **k: Any) -> None:
        print(f"prmigrate pr {__version__}")
        parser.exit(0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = __doc__.split("\n\n", 2)[2]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.usage_status = EXIT_SYNTAX  # type: ignore[attr-defined]  # sg3_utils: 1 for a syntax error
    p.add_argument("url", nargs="?", metavar="URL",
                   help="iscsi://[user[%%password]@]host[:port]/target-iqn/lun")
    p.add_argument("-d", "--device", dest="device_url", metavar="URL",
                   help="the URL as an option (sg_persist's --device=DEVICE)")
    p.add_argument("--initiator", default=DEFAULT_INITIATOR, metavar="NAME", type=_args.iscsi_name,
                   help=f"our iSCSI initiator name (default {DEFAULT_INITIATOR})")
    p.add_argument("--isid", type=parse_isid, default=DEFAULT_ISID, metavar="HEX",
                   help=f"session ISID, 48-bit hex (default {DEFAULT_ISID:012x}); with the "
                   "initiator name it names the I_T nexus the registration belongs to")
    p.add_argument("-i", "--in", dest="prin", action="store_true",
                   help="PR IN command (the default)")
    p.add_argument("-o", "--out", dest="prout", action="store_true",
                   help="PR OUT command (optional here; sg_persist requires it)")
    acts = p.add_mutually_exclusive_group()
    acts.add_argument("-k", "--read-keys", action="store_true", help="PR In: Read Keys (default)")
    acts.add_argument("-r", "--read-reservation", action="store_true", help="PR In: Read Reservation")
    acts.add_argument("-s", "--read-full-status", "--read-status", action="store_true",
                      help="PR In: Read Full Status")
    acts.add_argument("-c", "--report-capabilities", action="store_true",
                      help="PR In: Report Capabilities")
    acts.add_argument("-G", "--register", action="store_true", help="PR Out: Register")
    acts.add_argument("-I", "--register-ignore", action="store_true",
                      help="PR Out: Register and Ignore Existing Key")
    acts.add_argument("-R", "--reserve", action="store_true", help="PR Out: Reserve")
    acts.add_argument("-L", "--release", action="store_true", help="PR Out: Release")
    acts.add_argument("-C", "--clear", action="store_true", help="PR Out: Clear")
    acts.add_argument("-P", "--preempt", action="store_true", help="PR Out: Preempt")
    acts.add_argument("-A", "--preempt-abort", action="store_true", help="PR Out: Preempt and Abort")
    acts.add_argument("-M", "--register-move", action="store_true", help="PR Out: Register and Move")
    acts.add_argument("-z", "--replace-lost", action="store_true",
                      help="PR Out: Replace Lost Reservation")
    p.add_argument("-K", "--param-rk", "--key", dest="key", type=parse_key, default=0, metavar="RK",
                   help="PR Out parameter reservation key (hex; --key is the old spelling)")
    p.add_argument("-S", "--param-sark", "--sa-key", dest="sa_key", type=parse_key, default=0,
                   metavar="SARK", help="PR Out parameter service action reservation key "
                   "(hex; --sa-key is the old spelling)")
    p.add_argument("-T", "--prout-type", "--type", dest="type", type=parse_type, default=PrType.NONE,
                   metavar="TYPE", help=f"PR Out type field: {TYPE_CHOICES} (--type is the old spelling)")
    p.add_argument("-Z", "--param-aptpl", "--aptpl", dest="aptpl", action="store_true",
                   help="PR Out parameter APTPL (activate persist through power loss)")
    p.add_argument("-Y", "--param-alltgpt", "--all-tg-pt", dest="all_tg_pt", action="store_true",
                   help="PR Out parameter ALL_TG_PT (register on all target ports)")
    p.add_argument("-X", "--transport-id", type=parse_transport_id, metavar="TID",
                   help="Register and Move destination: iqn... or iqn...,i,0xISID")
    p.add_argument("-Q", "--relative-target-port", "--rel-port", dest="rel_port", type=parse_rtpi,
                   default=1, metavar="RTPI",
                   help="Register and Move relative target port identifier, hex (default 1; "
                        "sg_persist's default 0 names no port)")
    p.add_argument("-U", "--unreg", "--param-unreg", dest="unreg", action="store_true",
                   help="Register and Move: unregister the source nexus")
    p.add_argument("-l", "--alloc-length", type=parse_alloc_hex, default=None, metavar="LEN",
                   help="PR In allocation length, hex (default 2000, i.e. 8192)")
    p.add_argument("-m", "--maxlen", type=parse_maxlen, default=None, metavar="LEN",
                   help="PR In allocation length, decimal (or 0x.. / ..h)")
    p.add_argument("-H", "--hex", action="count", default=0,
                   help="PR In response in hex (twice: the whole response)")
    p.add_argument("-n", "--no-inquiry", action="store_true",
                   help="accepted for sg_persist's sake: no INQUIRY is sent anyway")
    p.add_argument("-y", "--readonly", action="store_true",
                   help="accepted for sg_persist's sake (nothing is opened)")
    p.add_argument("-V", "--version", action=_Version, nargs=0, help="print the version and exit")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--header-digest", action="store_true", help="require CRC32C header digests")
    p.add_argument("--data-digest", action="store_true", help="require CRC32C data digests")
    p.add_argument("--timeout", type=_args.seconds, default=10.0, metavar="SECONDS",
                   help="login and command timeout (default 10)")


# ------------------------------------------------------------------ output


_hex = format_key
_type_words = words


def _scope_type(scope: int, rtype: PrType | int) -> str:
    # sg_persist: "scope: LU_SCOPE,  type: ..." or "scope: N  type: ..."
    return (f"scope: LU_SCOPE,  type: {words(rtype)}" if scope == 0
            else f"scope: {scope}  type: {words(rtype)}")


def hex_dump(data: bytes) -> str:
    """Bytes as sg3_utils prints them with -H: the offset in two hex digits
    at column 1, then 16 bytes a line from column 8, one extra space after
    the eighth; trailing spaces dropped."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        lines.append(f" {off:02x}     {left}" + (f"  {right}" if right else ""))
    return "\n".join(lines)


def format_read_keys(rk: ReadKeys) -> str:
    if not rk.keys:
        return f"  PR generation=0x{rk.generation:x}, there are NO registered reservation keys"
    lines = [f"  PR generation=0x{rk.generation:x}, {len(rk.keys)} registered reservation "
             f"key{'s' if len(rk.keys) != 1 else ''} follow{'' if len(rk.keys) != 1 else 's'}:"]
    lines += [f"    {_hex(k)}" for k in rk.keys]
    if rk.truncated:
        lines.append("    (truncated: raise --maxlen)")
    return "\n".join(lines)


def format_read_reservation(rr: ReadReservation) -> str:
    if rr.key is None:
        return f"  PR generation=0x{rr.generation:x}, there is NO reservation held"
    return (f"  PR generation=0x{rr.generation:x}, Reservation follows:\n"
            f"    Key={_hex(rr.key)}\n"
            f"    {_scope_type(rr.scope, rr.rtype)}")


_CAP_LINES = [
    ("rlr_c", "Replace Lost Reservation Capable(RLR_C)"),
    ("crh", "Compatible Reservation Handling(CRH)"),
    ("sip_c", "Specify Initiator Ports Capable(SIP_C)"),
    ("atp_c", "All Target Ports Capable(ATP_C)"),
    ("ptpl_c", "Persist Through Power Loss Capable(PTPL_C)"),
    ("tmv", "Type Mask Valid(TMV)"),
    ("allow_commands", "Allow Commands"),
    ("ptpl_a", "Persist Through Power Loss Active(PTPL_A)"),
]
_MASK_ORDER = [
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS, PrType.WRITE_EXCLUSIVE,
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
]


def format_capabilities(rc: ReportCapabilities) -> str:
    lines = ["Report capabilities response:"]
    lines += [f"  {words}: {int(getattr(rc, attr))}" for attr, words in _CAP_LINES]
    if rc.tmv:
        lines.append("    Support indicated in Type mask:")
        lines += [f"      {TYPE_WORDS[t]}: {int(t in rc.types)}" for t in _MASK_ORDER]
    return "\n".join(lines)


def format_full_status(fs: ReadFullStatus) -> str:
    if not fs.entries:
        return f"  PR generation=0x{fs.generation:x}\n  No full status descriptors"
    lines = [f"  PR generation=0x{fs.generation:x}"]
    for e in fs.entries:
        lines.append(f"    Key={_hex(e.key)}")
        if e.all_tg_pt:
            lines.append("      All target ports bit set")
        else:
            lines.append("      All target ports bit clear")
            lines.append(f"      Relative port address: 0x{e.rel_tgt_port:x}")
        if e.holder:
            lines.append("      << Reservation holder >>")
            lines.append(f"      {_scope_type(e.scope, e.rtype)}")
        else:
            lines.append("      not reservation holder")
        lines.append("      Transport Id of initiator:")
        kind = "iSCSI name and session id" if e.transport_id.isid is not None else "iSCSI name"
        lines.append(f"        {kind}: {e.transport_id}")
    return "\n".join(lines)


def _json_in(action: PrInAction, data: Any) -> dict[str, Any]:
    if isinstance(data, ReadKeys):
        return {"generation": data.generation, "keys": [_hex(k) for k in data.keys],
                "truncated": data.truncated}
    if isinstance(data, ReadReservation):
        if data.key is None:
            return {"generation": data.generation, "reservation": None}
        return {"generation": data.generation, "reservation": {
            "key": _hex(data.key), "scope": data.scope, "type": int(data.rtype),
            "type_name": words(data.rtype)}}
    if isinstance(data, ReportCapabilities):
        out: dict[str, Any] = {attr: (int(getattr(data, attr)) if attr == "allow_commands"
                                      else bool(getattr(data, attr))) for attr, _ in _CAP_LINES}
        out["types"] = [words(t) for t in sorted(data.types)]
        out["type_mask"] = data.type_mask
        return out
    assert isinstance(data, ReadFullStatus)
    return {"generation": data.generation, "registrations": [
        {"key": _hex(e.key), "all_tg_pt": e.all_tg_pt, "holder": e.holder, "scope": e.scope,
         "type": int(e.rtype), "type_name": words(e.rtype) if e.holder else None,
         "rel_tgt_port": e.rel_tgt_port, "transport_id": str(e.transport_id)}
        for e in data.entries]}


def describe_failure(r: Result, action: PrInAction | PrOutAction | None = None) -> tuple[str, int, dict[str, Any]]:
    """(sg_persist's words, sg3_utils' exit status, json fields) for a
    result other than GOOD."""
    try:
        name = Status(r.status).name.replace("_", " ")
    except ValueError:
        name = f"status 0x{int(r.status):02x}"
    info: dict[str, Any] = {"status": name}
    if r.status in STATUS_EXITS:
        code, text = STATUS_EXITS[Status(r.status)]
        return text, code, info
    if r.status != Status.CHECK_CONDITION:
        return f"Some other error/warning has occurred ({name})", EXIT_OTHER, info
    try:
        ds = decode_sense(r.sense)
    except SenseDecodeError:
        return "Some other sense data problem (no valid sense data)", EXIT_SENSE_OTHER, info
    info.update(sense_key=ds.key, asc=ds.asc, ascq=ds.ascq, sense=ds.describe())
    detail = f"\n  sense: {ds.describe()}"
    if ds.key == 0x5 and ds.asc == ASC_INVALID_OPCODE:
        return "command not supported" + detail, EXIT_INVALID_OP, info
    if ds.key == 0x5:
        return ("bad field in cdb or parameter list (perhaps unsupported service action)"
                + detail, EXIT_ILLEGAL_REQUEST, info)
    code, text = SENSE_EXITS.get(ds.key, (EXIT_SENSE_OTHER, "Some other sense data problem"))
    return text + detail, code, info


# ------------------------------------------------------------------- run


def action_words(action: PrInAction | PrOutAction) -> str:
    if isinstance(action, PrOutAction):
        return OUT_WORDS[action]
    return IN_WORDS[action]


def _label(action: PrInAction | PrOutAction) -> str:
    return f"PR {'out' if isinstance(action, PrOutAction) else 'in'} ({action_words(action)})"


class _Usage(Exception):
    def __init__(self, text: str, code: int) -> None:
        super().__init__(text)
        self.code = code


def _choose(args: argparse.Namespace) -> tuple[PrInAction | PrOutAction, bytes]:
    """The action and PR OUT parameter list the options ask for."""
    chosen = [name for name in (*IN_ACTIONS, *OUT_ACTIONS) if getattr(args, name)]
    name = chosen[0] if chosen else "read_keys"  # sg_persist: no action is READ KEYS
    if name in IN_ACTIONS:
        if args.prout:
            raise _Usage("--out needs a PR OUT action (e.g. --register)", EXIT_CONTRADICT)
        return IN_ACTIONS[name], b""
    if args.prin:
        raise _Usage(f"--in contradicts --{name.replace('_', '-')}", EXIT_CONTRADICT)
    action = OUT_ACTIONS[name]
    if action is PrOutAction.REGISTER_AND_MOVE:
        if args.transport_id is None:
            raise _Usage("--register-move needs --transport-id", EXIT_CONTRADICT)
        return action, register_and_move_params(args.key, args.sa_key, args.transport_id,
                                                args.rel_port, unreg=args.unreg, aptpl=args.aptpl)
    return action, pr_out_params(args.key, args.sa_key, all_tg_pt=args.all_tg_pt, aptpl=args.aptpl)


def _hex_answer(action: PrInAction, data: bytes, level: int) -> str:
    """-H as sg_persist prints it: once, the generation and additional length
    and then the descriptors; twice, the whole response."""
    if action is PrInAction.REPORT_CAPABILITIES:
        return hex_dump(data[:8])
    add_len = int.from_bytes(data[4:8], "big") if len(data) >= 8 else 0
    if level > 1:
        return hex_dump(data[:add_len + 8])
    gen = int.from_bytes(data[0:4], "big") if len(data) >= 4 else 0
    body = hex_dump(data[8:8 + add_len])
    return f"  PR generation=0x{gen:x}, Additional length={add_len}" + (f"\n{body}" if body else "")


async def _execute(args: argparse.Namespace) -> int:
    from ..iscsi.initiator import IscsiError, connect
    from ..iscsi.login import LoginError
    from ..iscsi.url import UrlError, parse_url

    text = args.device_url or args.url
    if args.device_url and args.url and args.device_url != args.url:
        print("prmigrate pr: give the URL once (--device or the argument)", file=sys.stderr)
        return EXIT_CONTRADICT
    if not text:
        print("prmigrate pr: no URL given (iscsi://host[:port]/target-iqn/lun)", file=sys.stderr)
        return EXIT_SYNTAX
    try:
        url = parse_url(text)
    except UrlError as exc:
        print(f"prmigrate pr: {exc}", file=sys.stderr)
        return EXIT_SYNTAX
    try:
        action, params = _choose(args)
    except _Usage as e:
        print(f"prmigrate pr: {e}", file=sys.stderr)
        return e.code
    label = _label(action)
    alloc = args.maxlen if args.maxlen is not None else (
        args.alloc_length if args.alloc_length is not None else 8192)
    try:
        session = await connect(
            url, initiator_name=args.initiator, isid=args.isid,
            header_digest=args.header_digest, data_digest=args.data_digest,
            login_timeout=args.timeout, command_timeout=args.timeout, reconnect=False,
        )
    except (IscsiError, LoginError, OSError, TimeoutError) as exc:
        print(f"prmigrate pr: cannot log in to {url.portal} {url.target}: {exc or 'timed out'}",
              file=sys.stderr)
        return EXIT_FILE_ERROR
    try:
        if isinstance(action, PrOutAction):
            r = await session.pr_out(action, args.type, params)
        else:
            r = await session.pr_in(action, alloc)
    except TimeoutError:
        print(f"{label}: SCSI command timeout", file=sys.stderr)
        return EXIT_TIMEOUT
    except IscsiError as exc:
        print(f"{label}: Some other error/warning has occurred: {exc}", file=sys.stderr)
        return EXIT_OTHER
    finally:
        await session.close()
    if r.status != Status.GOOD:
        text, code, info = describe_failure(r, action)
        if args.json:
            print(json.dumps({"command": label, **info}))
        print(f"{label}: {text}", file=sys.stderr)
        return code
    if isinstance(action, PrOutAction):
        if args.json:
            print(json.dumps({"command": label, "status": "GOOD"}))
        else:
            print(f"PR out: command ({action_words(action)}) successful")
        return EXIT_OK
    data = bytes(r.data_in)
    if args.hex and not args.json:
        print(_hex_answer(action, data, args.hex))
        return EXIT_OK
    decoders = {
        PrInAction.READ_KEYS: (ReadKeys.decode, format_read_keys),
        PrInAction.READ_RESERVATION: (ReadReservation.decode, format_read_reservation),
        PrInAction.REPORT_CAPABILITIES: (ReportCapabilities.decode, format_capabilities),
        PrInAction.READ_FULL_STATUS: (ReadFullStatus.decode, format_full_status),
    }
    decode, fmt = decoders[action]  # type: ignore[index]
    try:
        parsed = decode(data)  # type: ignore[operator]
    except PrDecodeError as exc:
        print(f"{label}: Malformed response: {exc}", file=sys.stderr)
        return EXIT_MALFORMED
    if args.json:
        print(json.dumps({"command": label, "status": "GOOD", **_json_in(action, parsed)}))  # type: ignore[arg-type]
    else:
        print(fmt(parsed))  # type: ignore[operator]
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    import asyncio

    if not getattr(args, "verbose", 0):  # the answer is the output; session chatter only with -v
        logging.getLogger("prmigrate.iscsi").setLevel(logging.WARNING)
    return asyncio.run(_execute(args))
