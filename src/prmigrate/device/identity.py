"""Who the device is, towards the backend and towards the guest.

Backend identity (SPC-5 5.14, RFC 7143 4.4.3)
---------------------------------------------
A persistent reservation belongs to an I_T nexus, and an iSCSI initiator port
is (initiator name, ISID). QEMU's weakness is that every guest of a host is
the same initiator port (docs/limitations.md, 3). Here each guest initiator of a device gets its own
backend session under the HOST's initiator name with its own ISID, so the
backend keeps a separate registration per guest:

* the ISID is derived deterministically from (device name, guest initiator
  name): the same guest reconnecting, or the host daemon restarting,
  reinstates the same nexus (RFC 7143 4.4.3: same initiator name + ISID
  reinstates the session) and finds its registrations where it left them;
* guests of one device, and the same guest on two devices, get different
  ISIDs (40 bits of SHA-256, so a collision is ~1e-12 per pair);
* the ISID uses the **Random** format of RFC 7143 10.12.5: T = 10b in the top
  two bits (0x80 in byte 0), A = 0 (reserved), B and C (24 bits) and the
  qualifier D (16 bits) from the hash. (T = 11b is *reserved* in RFC 7143, so
  it is not used; T = 00b OUI and 01b EN would need an assigned number.) Since
  the T field differs from the OUI-format ISIDs that open-iscsi (0x00023d...)
  and libiscsi use, a derived ISID never equals theirs.

With ``identity=host`` every guest of the device shares one nexus: ISID from
the device name alone, and the tracked state has one entry, ``SHARED_NEXUS``
(QEMU's behaviour, kept for comparison).

Guest-facing identity
---------------------
``DeviceIdentity`` is what the guest sees: standard INQUIRY data, VPD pages
(80h unit serial number, 83h device identification, ...) and the capacity,
captured from the backend once, presented verbatim by the device, and carried
by the migration stream so that the destination answers byte for byte the
same (libiscsi refuses a reconnect whose VPD 80h serial changed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from ..scsi.transport_id import TransportId

ISID_FORMAT_RANDOM = 0b10  # RFC 7143 10.12.5, T field
ISID_T_SHIFT = 46
ISID_MASK = 0xFFFFFFFFFFFF
_ISID_DOMAIN = b"prmigrate backend ISID v1\x00"

# The key of the single tracked entry when all guests share the backend nexus.
SHARED_NEXUS = "*"


class IdentityMode(StrEnum):
    GUEST = "guest"  # one backend nexus per guest initiator (default)
    HOST = "host"  # one backend nexus for all guests of the device (QEMU's)


class IdentityError(ValueError):
    """Identity data that cannot be parsed or serialised."""


def no_logical_unit(inquiry_std: bytes, read_capacity: bytes | None) -> str | None:
    """Why the backend's answers show no logical unit at the LUN (None:
    there is one). SPC-5 6.7.2: peripheral qualifier 011b (or any but 000b),
    no LU at this LUN; READ CAPACITY then fails too."""
    qualifier = inquiry_std[0] >> 5 if inquiry_std else None
    if qualifier == 0 and read_capacity is not None:
        return None
    return (f"INQUIRY peripheral qualifier {'?' if qualifier is None else qualifier}"
            f"{', READ CAPACITY failed' if read_capacity is None else ''}")


def derive_isid(device: str, guest: str | None, path: int = 0) -> int:
    """The ISID of the backend session of ``guest`` on ``device`` (``None``:
    the device's shared session) on path ``path`` of a multipath device
    (``device/paths.py``). Random format T = 10b, A = 0. Path 0 is the
    single-path ISID, unchanged, so registrations and journals made with
    one path stay the device's; paths 1.. hash the path number in too."""
    if not device:
        raise IdentityError("device name must not be empty")
    if path < 0:
        raise IdentityError(f"path {path} is negative")
    material = _ISID_DOMAIN + device.encode("utf-8") + b"\x00"
    material += b"\x01" + guest.lower().encode("utf-8") if guest is not None else b"\x00"
    if path:
        material += b"\x00path\x00" + path.to_bytes(4, "big")
    digest = hashlib.sha256(material).digest()
    bcd = int.from_bytes(digest[:5], "big")  # B (16) | C (8) | D (16) = 40 bits
    return (ISID_FORMAT_RANDOM << ISID_T_SHIFT) | bcd


def isid_format(isid: int) -> int:
    """The T field (top two bits) of a 48-bit ISID."""
    return (isid >> ISID_T_SHIFT) & 0b11


@dataclass(frozen=True, slots=True)
class BackendPort:
    """The backend initiator port a guest's commands go out on."""

    initiator: str  # the host's initiator name
    isid: int

    @property
    def transport_id(self) -> TransportId:
        return TransportId(self.initiator.lower(), self.isid)

    def __str__(self) -> str:
        return str(self.transport_id)


def state_key(mode: IdentityMode | str, guest: str) -> str:
    """The ``DevicePrState`` key under which ``guest``'s PR state is tracked."""
    return SHARED_NEXUS if IdentityMode(mode) is IdentityMode.HOST else guest.lower()


def backend_port(
    mode: IdentityMode | str, host_initiator: str, device: str, guest: str, path: int = 0
) -> BackendPort:
    """The backend initiator port of ``guest`` on ``device`` (on ``path``)."""
    shared = IdentityMode(mode) is IdentityMode.HOST
    return BackendPort(host_initiator.lower(), derive_isid(device, None if shared else guest, path))


def nexus_transport_ids(
    mode: IdentityMode | str, host_initiator: str, device: str, guests: Iterable[str]
) -> dict[str, TransportId]:
    """``{state key: TransportId}`` for the given guests, as reconcile wants it."""
    return {
        state_key(mode, g): backend_port(mode, host_initiator, device, g).transport_id
        for g in guests
    }


# --------------------------------------------------------------- guest-facing


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(v: object, what: str) -> bytes | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise IdentityError(f"{what}: expected a hex string")
    try:
        return bytes.fromhex(v)
    except ValueError as e:
        raise IdentityError(f"{what}: not hexadecimal") from e


def _ascii(b: bytes) -> str:
    return b.decode("ascii", "replace").strip(" \x00")


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What the guest sees of the LUN: raw pages plus the fields parsed from them.

    ``inquiry_std`` and ``vpd`` (page code -> whole page, header included) are
    presented verbatim; the parsed fields are for logs, checks and display.
    """

    inquiry_std: bytes
    vpd: dict[int, bytes] = field(default_factory=dict)
    capacity_blocks: int = 0  # number of logical blocks (last LBA + 1)
    block_size: int = 512
    read_capacity16: bytes | None = None  # raw READ CAPACITY(16) data when captured

    def __post_init__(self) -> None:
        if len(self.inquiry_std) < 36:
            raise IdentityError(f"standard INQUIRY data is {len(self.inquiry_std)} bytes, needs 36")

    # -- parsed fields (SPC-5 6.7.2, 7.7.4, 7.7.3)
    @property
    def vendor(self) -> str:
        return _ascii(self.inquiry_std[8:16])

    @property
    def product(self) -> str:
        return _ascii(self.inquiry_std[16:32])

    @property
    def revision(self) -> str:
        return _ascii(self.inquiry_std[32:36])

    @property
    def vpd80(self) -> bytes | None:
        return self.vpd.get(0x80)

    @property
    def vpd83(self) -> bytes | None:
        return self.vpd.get(0x83)

    @property
    def serial(self) -> str | None:
        page = self.vpd80
        if page is None or len(page) < 4:
            return None
        n = int.from_bytes(page[2:4], "big")
        return _ascii(page[4 : 4 + n])

    @property
    def naa_id(self) -> str | None:
        """The first NAA designator (type 3h) of VPD 83h, as hex."""
        for _assoc, dtype, value in self.designators():
            if dtype == 0x3:
                return value.hex()
        return None

    def designators(self) -> list[tuple[int, int, bytes]]:
        """(association, designator type, designator) of every VPD 83h descriptor."""
        page = self.vpd83
        out: list[tuple[int, int, bytes]] = []
        if page is None or len(page) < 4:
            return out
        end = min(len(page), 4 + int.from_bytes(page[2:4], "big"))
        off = 4
        while off + 4 <= end:
            dlen = page[off + 3]
            if off + 4 + dlen > end:
                break
            out.append(
                (
                    (page[off + 1] >> 4) & 0x3,
                    page[off + 1] & 0x0F,
                    bytes(page[off + 4 : off + 4 + dlen]),
                )
            )
            off += 4 + dlen
        return out

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_blocks * self.block_size

    # -- capture
    @staticmethod
    def capture(
        inquiry_std: bytes,
        vpd: dict[int, bytes] | None = None,
        read_capacity: bytes | None = None,
    ) -> DeviceIdentity:
        """Build from backend answers; ``read_capacity`` is READ CAPACITY(16)
        data (>= 12 bytes) or READ CAPACITY(10) data (8 bytes)."""
        blocks, bsize, rc16 = 0, 512, None
        if read_capacity is not None:
            if len(read_capacity) >= 12:
                blocks = int.from_bytes(read_capacity[0:8], "big") + 1
                bsize = int.from_bytes(read_capacity[8:12], "big")
                rc16 = bytes(read_capacity)
            elif len(read_capacity) >= 8:
                blocks = int.from_bytes(read_capacity[0:4], "big") + 1
                bsize = int.from_bytes(read_capacity[4:8], "big")
            else:
                raise IdentityError(f"READ CAPACITY data is {len(read_capacity)} bytes")
        return DeviceIdentity(bytes(inquiry_std), dict(vpd or {}), blocks, bsize, rc16)

    def same_lun(self, other: DeviceIdentity) -> bool:
        """Both views name the same logical unit (serial and NAA agree)."""
        return not self.differences(other, fields=("serial", "naa_id"))

    def differences(
        self,
        other: DeviceIdentity,
        fields: tuple[str, ...] = (
            "vendor",
            "product",
            "serial",
            "naa_id",
            "capacity_blocks",
            "block_size",
        ),
    ) -> list[str]:
        """Human-readable differences between two identities."""
        return [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in fields
            if getattr(self, name) != getattr(other, name)
        ]

    # -- serialisation (the migration stream)
    def to_dict(self) -> dict[str, object]:
        return {
            "inquiry_std": self.inquiry_std.hex(),
            "vpd": {f"{code:02x}": page.hex() for code, page in sorted(self.vpd.items())},
            "capacity_blocks": self.capacity_blocks,
            "block_size": self.block_size,
            "read_capacity16": _hex(self.read_capacity16),
        }

    @staticmethod
    def from_dict(d: dict[str, object]) -> DeviceIdentity:
        if not isinstance(d, dict):
            raise IdentityError("device identity: expected a mapping")
        std = _unhex(d.get("inquiry_std"), "inquiry_std")
        if std is None:
            raise IdentityError("device identity: inquiry_std missing")
        raw_vpd = d.get("vpd", {})
        if not isinstance(raw_vpd, dict):
            raise IdentityError("device identity: vpd must be a mapping")
        vpd: dict[int, bytes] = {}
        for code, page in raw_vpd.items():
            try:
                c = int(str(code), 16)
            except ValueError as e:
                raise IdentityError(f"VPD page code {code!r} is not hex") from e
            data = _unhex(page, f"VPD page {code}")
            if data is not None:
                vpd[c] = data
        try:
            blocks = int(d.get("capacity_blocks", 0))  # type: ignore[call-overload]
            bsize = int(d.get("block_size", 512))  # type: ignore[call-overload]
        except (TypeError, ValueError) as e:
            raise IdentityError("device identity: bad capacity") from e
        return DeviceIdentity(
            std, vpd, blocks, bsize, _unhex(d.get("read_capacity16"), "read_capacity16")
        )
