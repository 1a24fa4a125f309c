"""The device state stream: what the source sends so the destination can
recreate the device and take over its persistent reservations.

Modelled on QEMU's vmstate (a header, named and versioned sections, an end
marker), but every part of it is bounded and refused when unknown::

    stream   = header section* end
    header   = magic "PRMS" | format version u16                     (6 bytes)
    section  = 0x01 | name_len u8 | name (ASCII) | inst_len u8 | instance (UTF-8)
             | section version u16 | fields_len u32 | fields
    end      = 0xFF | section count u32 | CRC-32 (zlib) of all preceding bytes u32

All integers big-endian. ``fields`` is canonical JSON (UTF-8, sorted keys, no
spaces, no NaN): one object whose keys each section validates strictly. JSON
rather than a typed TLV because the reservation keys are 64-bit integers
(JSON integers are exact in Python) and the device/identity dicts already
exist; the framing around it is what must be, and is, strict.

Sections, per device (the instance id is the device name), in this order:

``device`` (v1, required)          ``{"config": DeviceConfig.to_dict()}``
``device/identity`` (v1, required) ``DeviceIdentity.to_dict()``: INQUIRY, VPD
                                   pages (80h serial, 83h ids...), capacity
``device/pr`` (v1, optional)       sent only when some guest has PR state (QEMU
                                   sends ``scsi-disk/pr`` only when key != 0);
                                   per guest key, aptpl, holder, type, scope
``device/ua`` (v1, optional)       sent only when unit attentions are pending:
                                   per guest a list of (ASC, ASCQ)

Rules (each refusal is a typed ``StreamError``):

- wrong magic -> ``BadMagic``; a format or section version above what we read
  (or below the oldest we still read) -> ``UnsupportedVersion``;
- an unknown section name -> ``UnknownSection`` (never skipped: a newer source
  that adds state must not have it silently dropped);
- a section out of order, repeated, or for an instance not opened by a
  ``device`` section; fields missing, unknown or of the wrong type ->
  ``SectionError``;
- the buffer ends early -> ``StreamTruncated``; bytes after the end marker ->
  ``StreamTrailingData``; count or CRC mismatch -> ``SectionError``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..device.snapshot import DeviceSnapshot
from ..device.state import DevicePrState, GuestPrState
from ..scsi.constants import PrType
from ..scsi.vocabulary import words
from .errors import (
    BadMagic,
    SectionError,
    StreamTrailingData,
    StreamTruncated,
    UnknownSection,
    UnsupportedVersion,
)

MAGIC = b"PRMS"
FORMAT_VERSION = 1
TAG_SECTION = 0x01
TAG_END = 0xFF

MAX_FIELDS_LEN = 1 << 20  # one section's JSON
MAX_SECTIONS = 4096
MAX_UA_PER_GUEST = 64
MAX_GUESTS = 1024
U64_MAX = (1 << 64) - 1

_HEADER = struct.Struct(">4sH")
_U8 = struct.Struct(">B")
_VERSION_LEN = struct.Struct(">HI")
_END = struct.Struct(">II")
_U32 = struct.Struct(">I")

SECTION_DEVICE = "device"
SECTION_IDENTITY = "device/identity"
SECTION_PR = "device/pr"
SECTION_UA = "device/ua"


@dataclass(frozen=True, slots=True)
class SectionSpec:
    version: int  # what we write
    min_version: int  # oldest we still read
    required: bool


# Order matters: sections of one instance must appear in this order.
SECTIONS: dict[str, SectionSpec] = {
    SECTION_DEVICE: SectionSpec(1, 1, True),
    SECTION_IDENTITY: SectionSpec(1, 1, True),
    SECTION_PR: SectionSpec(1, 1, False),
    SECTION_UA: SectionSpec(1, 1, False),
}
_ORDER = {name: i for i, name in enumerate(SECTIONS)}


@dataclass(frozen=True, slots=True)
class Section:
    """One framed section: the unit of the wire format."""

    name: str
    instance: str
    version: int
    fields: Mapping[str, Any]


# ---------------------------------------------------------------- framing


def _canonical_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SectionError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise SectionError(f"JSON constant {name} is not allowed")


def _parse_json(raw: bytes | memoryview, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(
            bytes(raw).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except SectionError as e:
        raise SectionError(f"{where}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SectionError(f"{where}: fields are not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SectionError(f"{where}: fields must be a JSON object")
    return obj


def encode_sections(sections: Sequence[Section]) -> bytes:
    """Frame ``sections`` into a stream (header, sections, end)."""
    if len(sections) > MAX_SECTIONS:
        raise SectionError(f"{len(sections)} sections, at most {MAX_SECTIONS}")
    out = bytearray(_HEADER.pack(MAGIC, FORMAT_VERSION))
    for s in sections:
        name = s.name.encode("ascii")
        inst = s.instance.encode("utf-8")
        body = _canonical_json(s.fields)
        if not 0 < len(name) <= 255 or len(inst) > 255:
            raise SectionError(f"section name/instance too long: {s.name!r}/{s.instance!r}")
        if len(body) > MAX_FIELDS_LEN:
            raise SectionError(f"{s.name}[{s.instance}]: {len(body)} bytes of fields, at most {MAX_FIELDS_LEN}")
        out += _U8.pack(TAG_SECTION) + _U8.pack(len(name)) + name + _U8.pack(len(inst)) + inst
        out += _VERSION_LEN.pack(s.version, len(body)) + body
    out += _U8.pack(TAG_END) + _U32.pack(len(sections))
    out += _U32.pack(zlib.crc32(out) & 0xFFFFFFFF)
    return bytes(out)


class _Reader:
    __slots__ = ("mv", "off")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.mv = memoryview(data).cast("B")
        self.off = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.off + n > len(self.mv):
            raise StreamTruncated(f"stream ends inside {what} (needs {n} bytes at offset {self.off}, has {len(self.mv) - self.off})")
        chunk = self.mv[self.off : self.off + n]
        self.off += n
        return chunk

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size, what))


def decode_sections(data: bytes | bytearray | memoryview) -> list[Section]:
    """Parse the framing; check names and versions against ``SECTIONS``."""
    r = _Reader(data)
    magic, version = r.unpack(_HEADER, "the stream header")
    if magic != MAGIC:
        raise BadMagic(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"stream format version {version}, this reader reads {FORMAT_VERSION}")
    sections: list[Section] = []
    while True:
        (tag,) = r.unpack(_U8, "a section tag")
        if tag == TAG_END:
            end_at = r.off
            count, crc = r.unpack(_END, "the end marker")
            if r.off != len(r.mv):
                raise StreamTrailingData(f"{len(r.mv) - r.off} bytes after the end marker")
            if count != len(sections):
                raise SectionError(f"end marker counts {count} sections, stream has {len(sections)}")
            # CRC over everything up to and including the count.
            expect = zlib.crc32(r.mv[: end_at + 4]) & 0xFFFFFFFF
            if crc != expect:
                raise SectionError(f"stream CRC {crc:08x} != {expect:08x}")
            return sections
        if tag != TAG_SECTION:
            raise SectionError(f"unknown record tag 0x{tag:02x} at offset {r.off - 1}")
        if len(sections) >= MAX_SECTIONS:
            raise SectionError(f"more than {MAX_SECTIONS} sections")
        (nlen,) = r.unpack(_U8, "a section name length")
        raw_name = bytes(r.take(nlen, "a section name"))
        (ilen,) = r.unpack(_U8, "an instance id length")
        raw_inst = bytes(r.take(ilen, "an instance id"))
        try:
            name = raw_name.decode("ascii")
            inst = raw_inst.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SectionError(f"section name or instance id is not text: {e}") from None
        spec = SECTIONS.get(name)
        if spec is None:
            raise UnknownSection(f"unknown section {name!r} (instance {inst!r})")
        sver, flen = r.unpack(_VERSION_LEN, f"the header of section {name!r}")
        if not spec.min_version <= sver <= spec.version:
            raise UnsupportedVersion(f"section {name!r} version {sver}, this reader reads {spec.min_version}..{spec.version}")
        if flen > MAX_FIELDS_LEN:
            raise SectionError(f"section {name!r}: {flen} bytes of fields, at most {MAX_FIELDS_LEN}")
        body = r.take(flen, f"the fields of section {name!r}")
        sections.append(Section(name, inst, sver, _parse_json(body, f"{name}[{inst}]")))


# ---------------------------------------------------------------- field schemas


def _int(v: Any, where: str, lo: int = 0, hi: int = U64_MAX) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SectionError(f"{where}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise SectionError(f"{where}: expected true/false, got {v!r}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 255:
        raise SectionError(f"{where}: expected a non-empty name, got {v!r}")
    return v


def _hex(v: Any, where: str, nullable: bool = False) -> str | None:
    if v is None and nullable:
        return None
    if not isinstance(v, str) or len(v) % 2 or len(v) > 2 * 0x10000:
        raise SectionError(f"{where}: expected hex bytes, got {v!r}")
    try:
        bytes.fromhex(v)
    except ValueError:
        raise SectionError(f"{where}: expected hex bytes, got {v!r}") from None
    return v


def _mapping(v: Any, where: str, limit: int = MAX_GUESTS) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > limit:
        raise SectionError(f"{where}: expected a mapping of at most {limit} entries")
    return v


def _exact_keys(d: Mapping[str, Any], required: set[str], optional: set[str], where: str) -> None:
    missing = required - d.keys()
    unknown = d.keys() - required - optional
    if missing or unknown:
        raise SectionError(f"{where}: missing {sorted(missing)}, unknown {sorted(unknown)}")


def _check_device(f: Mapping[str, Any], where: str) -> None:
    _exact_keys(f, {"config"}, set(), where)
    _mapping(f["config"], f"{where}.config", 64)


def _check_identity(f: Mapping[str, Any], where: str) -> None:
    _exact_keys(f, {"inquiry_std", "capacity_blocks", "block_size"}, {"vpd", "read_capacity16"}, where)
    _hex(f["inquiry_std"], f"{where}.inquiry_std")
    _int(f["capacity_blocks"], f"{where}.capacity_blocks")
    _int(f["block_size"], f"{where}.block_size", 1, 1 << 31)
    _hex(f.get("read_capacity16"), f"{where}.read_capacity16", nullable=True)
    for code, page in _mapping(f.get("vpd", {}), f"{where}.vpd", 256).items():
        if len(code) != 2:
            raise SectionError(f"{where}.vpd: page code {code!r} is not two hex digits")
        _hex(code, f"{where}.vpd")
        _hex(page, f"{where}.vpd.{code}")


_GUEST_KEYS = {"key", "aptpl", "holder", "rtype", "scope"}


def _guest_pr(f: Mapping[str, Any], where: str) -> GuestPrState:
    if not isinstance(f, dict):
        raise SectionError(f"{where}: expected a mapping")
    _exact_keys(f, _GUEST_KEYS, set(), where)
    key = _int(f["key"], f"{where}.key")
    rtype_raw = _int(f["rtype"], f"{where}.rtype", 0, 15)
    try:
        rtype = PrType(rtype_raw)
    except ValueError:
        raise SectionError(f"{where}.rtype: {rtype_raw} is not a reservation type") from None
    holder = _bool(f["holder"], f"{where}.holder")
    # SPC-5 5.14.9: only a registered I_T nexus can hold a reservation.
    if holder and (key == 0 or rtype is PrType.NONE):
        raise SectionError(f"{where}: a holder needs a key and a type")
    if not holder and rtype is not PrType.NONE:
        raise SectionError(f"{where}: a type without holding the reservation")
    return GuestPrState(key, _bool(f["aptpl"], f"{where}.aptpl"), holder, rtype, _int(f["scope"], f"{where}.scope", 0, 15))


def _pr_from_fields(f: Mapping[str, Any], where: str) -> DevicePrState:
    _exact_keys(f, {"guests", "generation"}, {"unverified"}, where)
    gen = f["generation"]
    if gen is not None:
        _int(gen, f"{where}.generation", 0, 0xFFFFFFFF)
    guests = {
        _str(name, f"{where}.guests").lower(): _guest_pr(g, f"{where}.guests[{name}]")
        for name, g in _mapping(f["guests"], f"{where}.guests").items()
    }
    holders = [g for g in guests.values() if g.holder]
    # SPC-5 5.14.10: one holder, or every registrant of an all-registrants type.
    if len({g.rtype for g in holders}) > 1 or (len(holders) > 1 and not holders[0].rtype.all_registrants):
        raise SectionError(f"{where}: inconsistent holders {[(g.key, words(g.rtype)) for g in holders]}")
    unverified = f.get("unverified", [])
    if not isinstance(unverified, list) or len(unverified) > MAX_GUESTS:
        raise SectionError(f"{where}.unverified: expected a list of guest names")
    state = DevicePrState({k: v for k, v in guests.items() if not v.empty}, gen)
    names = {_str(n, f"{where}.unverified").lower() for n in unverified}
    if names and hasattr(state, "unverified"):
        state.unverified = names  # type: ignore[attr-defined]
    return state


def _pr_to_fields(pr: DevicePrState) -> dict[str, Any]:
    out: dict[str, Any] = {
        "generation": pr.generation,
        "guests": {
            name: {"key": g.key, "aptpl": g.aptpl, "holder": g.holder, "rtype": int(g.rtype), "scope": g.scope}
            for name, g in sorted(pr.guests.items())
            if not g.empty
        },
    }
    unverified = getattr(pr, "unverified", None)
    if unverified:
        out["unverified"] = sorted(unverified)
    return out


def _ua_from_fields(f: Mapping[str, Any], where: str) -> dict[str, tuple[tuple[int, int], ...]]:
    _exact_keys(f, {"guests"}, set(), where)
    out: dict[str, tuple[tuple[int, int], ...]] = {}
    for name, lst in _mapping(f["guests"], f"{where}.guests").items():
        w = f"{where}.guests[{name}]"
        if not isinstance(lst, list) or not 0 < len(lst) <= MAX_UA_PER_GUEST:
            raise SectionError(f"{w}: expected 1..{MAX_UA_PER_GUEST} (ASC, ASCQ) pairs")
        pairs = []
        for item in lst:
            if not isinstance(item, list) or len(item) != 2:
                raise SectionError(f"{w}: expected [ASC, ASCQ], got {item!r}")
            pairs.append((_int(item[0], w, 0, 255), _int(item[1], w, 0, 255)))
        out[_str(name, w).lower()] = tuple(pairs)
    return out


_CHECKS: dict[str, Callable[[Mapping[str, Any], str], Any]] = {
    SECTION_DEVICE: _check_device,
    SECTION_IDENTITY: _check_identity,
    SECTION_PR: _pr_from_fields,
    SECTION_UA: _ua_from_fields,
}


# ---------------------------------------------------------------- snapshots


def snapshot_sections(snap: DeviceSnapshot) -> list[Section]:
    """The sections of one device; ``device/pr`` and ``device/ua`` only when non-empty."""
    out = [
        Section(SECTION_DEVICE, snap.name, SECTIONS[SECTION_DEVICE].version, {"config": dict(snap.config)}),
        Section(SECTION_IDENTITY, snap.name, SECTIONS[SECTION_IDENTITY].version, dict(snap.identity)),
    ]
    if snap.pr.has_state:
        out.append(Section(SECTION_PR, snap.name, SECTIONS[SECTION_PR].version, _pr_to_fields(snap.pr)))
    ua = {g.lower(): [list(p) for p in pairs] for g, pairs in sorted(snap.ua.items()) if pairs}
    if ua:
        out.append(Section(SECTION_UA, snap.name, SECTIONS[SECTION_UA].version, {"guests": ua}))
    for s in out:  # refuse to write what we would refuse to read
        _CHECKS[s.name](s.fields, f"{s.name}[{s.instance}]")
    return out


def encode_stream(snapshots: Sequence[DeviceSnapshot]) -> bytes:
    names = [s.name for s in snapshots]
    if len(set(names)) != len(names):
        raise SectionError(f"duplicate device in stream: {names}")
    return encode_sections([sec for snap in snapshots for sec in snapshot_sections(snap)])


def decode_stream(data: bytes | bytearray | memoryview) -> tuple[DeviceSnapshot, ...]:
    """Decode a whole stream into per-device snapshots, in stream order."""
    devices: dict[str, dict[str, Any]] = {}
    current: str | None = None
    last = -1
    for s in decode_sections(data):
        where = f"{s.name}[{s.instance}]"
        value = _CHECKS[s.name](s.fields, where)
        if s.name == SECTION_DEVICE:
            if current is not None:
                _finish(current, devices[current])
            if s.instance in devices:
                raise SectionError(f"{where}: device appears twice")
            cfg_name = s.fields["config"].get("name")
            if cfg_name is not None and cfg_name != s.instance:
                raise SectionError(f"{where}: config names device {cfg_name!r}")
            current, last = s.instance, _ORDER[s.name]
            devices[current] = {"config": s.fields["config"]}
            continue
        if current is None or s.instance != current:
            raise SectionError(f"{where}: not preceded by its {SECTION_DEVICE!r} section")
        if _ORDER[s.name] <= last:
            raise SectionError(f"{where}: out of order or repeated")
        last = _ORDER[s.name]
        devices[current][s.name] = dict(s.fields) if s.name == SECTION_IDENTITY else value
    if current is not None:
        _finish(current, devices[current])
    return tuple(
        DeviceSnapshot(
            name,
            d["config"],
            d[SECTION_IDENTITY],
            d.get(SECTION_PR, DevicePrState()),
            d.get(SECTION_UA, {}),
            SectionError,
        )
        for name, d in devices.items()
    )


def _finish(name: str, d: Mapping[str, Any]) -> None:
    for sname, spec in SECTIONS.items():
        if spec.required and sname != SECTION_DEVICE and sname not in d:
            raise SectionError(f"device {name!r}: required section {sname!r} missing")


def encode_snapshot(snap: DeviceSnapshot) -> bytes:
    return encode_stream([snap])


def decode_snapshot(data: bytes | bytearray | memoryview) -> DeviceSnapshot:
    """Decode a stream that must hold exactly one device."""
    snaps = decode_stream(data)
    if len(snaps) != 1:
        raise SectionError(f"expected one device in the stream, found {len(snaps)}")
    return snaps[0]
