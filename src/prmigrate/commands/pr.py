"""`prmigrate pr`: persistent reservations on any iscsi:// URL, sg_persist style.

    prmigrate pr --initiator iqn.x:host1 --isid 23d000000001 --register --sa-key 123abc URL
    prmigrate pr --read-keys URL
    prmigrate pr --reserve --key 123abc --type WE URL

Keys are hexadecimal (with or without 0x), as sg_persist takes them. Exit
status: 0 GOOD; 24 RESERVATION CONFLICT; for CHECK CONDITION the sense key
(2 NOT READY, 5 ILLEGAL REQUEST, 6 UNIT ATTENTION, 11 ABORTED COMMAND, other
keys 98); 35 when the target cannot be reached or the login fails; 97 for
other statuses or undecodable replies; 1 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

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

EXIT_SYNTAX = 1
EXIT_CONFLICT = 24
EXIT_SENSE_OTHER = 98
EXIT_TRANSPORT = 35
EXIT_OTHER = 97

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
}

# sg_persist's words for the reservation types.
TYPE_WORDS = {
    PrType.WRITE_EXCLUSIVE: "Write Exclusive",
    PrType.EXCLUSIVE_ACCESS: "Exclusive Access",
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: "Write Exclusive, registrants only",
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: "Exclusive Access, registrants only",
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: "Write Exclusive, all registrants",
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: "Exclusive Access, all registrants",
}
_TYPE_BY_SHORT: dict[str, PrType] = {t.short.upper(): t for t in PrType}


def parse_key(text: str) -> int:
    """A reservation key in hex (``0x`` optional), 64 bits."""
    t = text.strip()
    if t[:2].lower() == "0x":
        t = t[2:]
    try:
        value = int(t, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hexadecimal key: {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"key {text!r} does not fit in 64 bits")
    return value


def parse_isid(text: str) -> int:
    value = parse_key(text)
    if value >= 1 << 48:
        raise argparse.ArgumentTypeError(f"ISID {text!r} does not fit in 48 bits")
    return value


def parse_type(text: str) -> PrType | int:
    """A reservation type: WE/EA/WE_RO/EA_RO/WE_AR/EA_AR or a number 0-15
    (other numbers than 1, 3, 5-8 are sent as given, as sg_persist does)."""
    t = text.strip().upper()
    if t in _TYPE_BY_SHORT:
        return _TYPE_BY_SHORT[t]
    try:
        n = int(t, 0)
    except ValueError:
        n = -1
    if not 0 <= n <= 15:
        raise argparse.ArgumentTypeError(
            f"unknown type {text!r} (use 1,3,5,6,7,8 or WE, EA, WE_RO, EA_RO, WE_AR, EA_AR)"
        )
    return PrType(n) if n in PrType._value2member_map_ else n


def parse_transport_id(text: str) -> TransportId:
    """``iqn...`` (any session) or ``iqn...,i,0x<12 hex digits>`` (one initiator port)."""
    name, sep, isid = text.partition(",i,")
    try:
        if not sep:
            return TransportId(name.strip())
        return TransportId(name.strip(), parse_isid(isid))
    except PrDecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = __doc__.split("\n\n", 2)[2]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("url", help="iscsi://[user[%%password]@]host[:port]/target-iqn/lun")
    p.add_argument("--initiator", default=DEFAULT_INITIATOR, metavar="NAME",
                   help=f"our iSCSI initiator name (default {DEFAULT_INITIATOR})")
    p.add_argument("--isid", type=parse_isid, default=DEFAULT_ISID, metavar="HEX",
                   help=f"session ISID, 48-bit hex (default {DEFAULT_ISID:012x}); with the "
                   "initiator name it names the I_T nexus the registration belongs to")
    acts = p.add_mutually_exclusive_group(required=True)
    acts.add_argument("-k", "--read-keys", action="store_true", help="PR IN READ KEYS")
    acts.add_argument("-r", "--read-reservation", action="store_true", help="PR IN READ RESERVATION")
    acts.add_argument("-s", "--read-full-status", action="store_true", help="PR IN READ FULL STATUS")
    acts.add_argument("-c", "--report-capabilities", action="store_true",
                      help="PR IN REPORT CAPABILITIES")
    acts.add_argument("-G", "--register", action="store_true", help="PR OUT REGISTER")
    acts.add_argument("-I", "--register-ignore", action="store_true",
                      help="PR OUT REGISTER AND IGNORE EXISTING KEY")
    acts.add_argument("-R", "--reserve", action="store_true", help="PR OUT RESERVE")
    acts.add_argument("-L", "--release", action="store_true", help="PR OUT RELEASE")
    acts.add_argument("-C", "--clear", action="store_true", help="PR OUT CLEAR")
    acts.add_argument("-P", "--preempt", action="store_true", help="PR OUT PREEMPT")
    acts.add_argument("-A", "--preempt-abort", action="store_true", help="PR OUT PREEMPT AND ABORT")
    acts.add_argument("-M", "--register-move", action="store_true", help="PR OUT REGISTER AND MOVE")
    p.add_argument("-K", "--key", type=parse_key, default=0, metavar="HEX",
                   help="reservation key (RK), hex")
    p.add_argument("-S", "--sa-key", type=parse_key, default=0, metavar="HEX",
                   help="service action reservation key (SARK), hex")
    p.add_argument("-T", "--type", type=parse_type, default=PrType.NONE, metavar="TYPE",
                   help="reservation type: 1,3,5,6,7,8 or WE,EA,WE_RO,EA_RO,WE_AR,EA_AR")
    p.add_argument("-Z", "--aptpl", action="store_true", help="activate persist through power loss")
    p.add_argument("-Y", "--all-tg-pt", action="store_true", help="register on all target ports")
    p.add_argument("-X", "--transport-id", type=parse_transport_id, metavar="TID",
                   help="REGISTER AND MOVE destination: NAME or NAME,i,0xISID")
    p.add_argument("-Q", "--rel-port", type=lambda s: int(s, 0), default=1, metavar="N",
                   help="REGISTER AND MOVE relative target port identifier (default 1)")
    p.add_argument("-U", "--unreg", action="store_true",
                   help="REGISTER AND MOVE: unregister the source nexus")
    p.add_argument("--alloc-length", type=int, default=8192, metavar="N",
                   help="PR IN allocation length (default 8192)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--header-digest", action="store_true", help="require CRC32C header digests")
    p.add_argument("--data-digest", action="store_true", help="require CRC32C data digests")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="login and command timeout (default 10)")


# ------------------------------------------------------------------ output


def _hex(v: int) -> str:
    return f"0x{v:x}"


def _type_words(t: PrType | int) -> str:
    if t in PrType._value2member_map_ and PrType(t) in TYPE_WORDS:
        return TYPE_WORDS[PrType(t)]
    return f"obsolete [{int(t)}]"


def _scope_words(scope: int) -> str:
    return "LU_SCOPE" if scope == 0 else f"scope {scope}"


def format_read_keys(rk: ReadKeys) -> str:
    if not rk.keys:
        return f"  PR generation=0x{rk.generation:x}, there are NO registered reservation keys"
    lines = [f"  PR generation=0x{rk.generation:x}, {len(rk.keys)} registered reservation "
             f"key{'s' if len(rk.keys) != 1 else ''} follow{'' if len(rk.keys) != 1 else 's'}:"]
    lines += [f"    {_hex(k)}" for k in rk.keys]
    if rk.truncated:
        lines.append("    (truncated: raise --alloc-length)")
    return "\n".join(lines)


def format_read_reservation(rr: ReadReservation) -> str:
    if rr.key is None:
        return f"  PR generation=0x{rr.generation:x}, there is NO reservation held"
    return (f"  PR generation=0x{rr.generation:x}, Reservation follows:\n"
            f"    Key={_hex(rr.key)}\n"
            f"    scope: {_scope_words(rr.scope)},  type: {_type_words(rr.rtype)}")


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
        lines.append(f"      All target ports bit {'set' if e.all_tg_pt else 'clear'}")
        lines.append(f"      Relative port address: 0x{e.rel_tgt_port:x}")
        if e.holder:
            lines.append("      << Reservation holder >>")
            lines.append(f"      scope: {_scope_words(e.scope)},  type: {_type_words(e.rtype)}")
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
            "type_name": PrType(data.rtype).short if data.rtype in PrType._value2member_map_ else None}}
    if isinstance(data, ReportCapabilities):
        out: dict[str, Any] = {attr: (int(getattr(data, attr)) if attr == "allow_commands"
                                      else bool(getattr(data, attr))) for attr, _ in _CAP_LINES}
        out["types"] = sorted(t.short for t in data.types)
        out["type_mask"] = data.type_mask
        return out
    assert isinstance(data, ReadFullStatus)
    return {"generation": data.generation, "registrations": [
        {"key": _hex(e.key), "all_tg_pt": e.all_tg_pt, "holder": e.holder, "scope": e.scope,
         "type": int(e.rtype), "rel_tgt_port": e.rel_tgt_port, "transport_id": str(e.transport_id)}
        for e in data.entries]}


def describe_failure(r: Result) -> tuple[str, int, dict[str, Any]]:
    """(words, exit status, json fields) for a non-GOOD result."""
    try:
        name = Status(r.status).name.replace("_", " ")
    except ValueError:
        name = f"status 0x{int(r.status):02x}"
    info: dict[str, Any] = {"status": name}
    if r.status == Status.RESERVATION_CONFLICT:
        return name, EXIT_CONFLICT, info
    if r.status != Status.CHECK_CONDITION:
        return name, EXIT_OTHER, info
    try:
        ds = decode_sense(r.sense)
    except SenseDecodeError:
        return f"{name} (no valid sense data)", EXIT_OTHER, info
    info.update(sense_key=ds.key, asc=ds.asc, ascq=ds.ascq, sense=ds.describe())
    code = ds.key if ds.key in (2, 5, 6, 11) else EXIT_SENSE_OTHER
    return f"{name}, {ds.describe()}", code, info


# ------------------------------------------------------------------- run


def _words(action: PrInAction | PrOutAction) -> str:
    return action.name.replace("_", " ")


async def _execute(args: argparse.Namespace) -> int:
    from ..iscsi.initiator import IscsiError, connect
    from ..iscsi.login import LoginError
    from ..iscsi.url import UrlError, parse_url

    try:
        url = parse_url(args.url)
    except UrlError as exc:
        print(f"prmigrate pr: {exc}", file=sys.stderr)
        return EXIT_SYNTAX
    chosen = [name for name in (*IN_ACTIONS, *OUT_ACTIONS) if getattr(args, name)]
    name = chosen[0]
    params = b""
    if name in OUT_ACTIONS:
        action: PrInAction | PrOutAction = OUT_ACTIONS[name]
        if action is PrOutAction.REGISTER_AND_MOVE:
            if args.transport_id is None:
                print("prmigrate pr: --register-move needs --transport-id", file=sys.stderr)
                return EXIT_SYNTAX
            params = register_and_move_params(args.key, args.sa_key, args.transport_id,
                                              args.rel_port, unreg=args.unreg, aptpl=args.aptpl)
        else:
            params = pr_out_params(args.key, args.sa_key, all_tg_pt=args.all_tg_pt,
                                   aptpl=args.aptpl)
    else:
        action = IN_ACTIONS[name]
    label = f"PR {'out' if name in OUT_ACTIONS else 'in'} ({_words(action)})"
    try:
        session = await connect(
            url, initiator_name=args.initiator, isid=args.isid,
            header_digest=args.header_digest, data_digest=args.data_digest,
            login_timeout=args.timeout, command_timeout=args.timeout, reconnect=False,
        )
    except (IscsiError, LoginError, OSError) as exc:
        print(f"prmigrate pr: cannot log in to {url.portal} {url.target}: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT
    try:
        if isinstance(action, PrOutAction):
            r = await session.pr_out(action, args.type, params)
        else:
            r = await session.pr_in(action, args.alloc_length)
    except IscsiError as exc:
        print(f"prmigrate pr: {label}: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT
    finally:
        await session.close()
    if r.status != Status.GOOD:
        words, code, info = describe_failure(r)
        if args.json:
            print(json.dumps({"command": label, **info}))
        print(f"{label}: {words}", file=sys.stderr)
        return code
    if isinstance(action, PrOutAction):
        if args.json:
            print(json.dumps({"command": label, "status": "GOOD"}))
        else:
            print(f"{label}: GOOD")
        return 0
    decoders = {
        PrInAction.READ_KEYS: (ReadKeys.decode, format_read_keys),
        PrInAction.READ_RESERVATION: (ReadReservation.decode, format_read_reservation),
        PrInAction.REPORT_CAPABILITIES: (ReportCapabilities.decode, format_capabilities),
        PrInAction.READ_FULL_STATUS: (ReadFullStatus.decode, format_full_status),
    }
    decode, fmt = decoders[action]  # type: ignore[index]
    try:
        data = decode(r.data_in)  # type: ignore[operator]
    except PrDecodeError as exc:
        print(f"{label}: malformed reply: {exc}", file=sys.stderr)
        return EXIT_OTHER
    if args.json:
        print(json.dumps({"command": label, "status": "GOOD", **_json_in(action, data)}))  # type: ignore[arg-type]
    else:
        print(fmt(data))  # type: ignore[operator]
    return 0


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", 0):  # the answer is the output; session chatter only with -v
        logging.getLogger("prmigrate.iscsi").setLevel(logging.WARNING)
    return asyncio.run(_execute(args))
