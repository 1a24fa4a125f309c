"""What the shared target says: READ FULL STATUS from a bystander, and the
fencing probe that writes from a host's old nexus.

The observer is its own I_T nexus (its own initiator name) straight to the
shared target, never registered: PR IN is allowed to any nexus under every
reservation type (SPC-5 5.14.2 table), so it sees the registrations and the
holder without disturbing anyone.

The probe logs in to the target as a host's backend nexus (the host's
initiator name + the ISID that host used for the guest) and sends one WRITE
to a scratch block outside the guest's region: RESERVATION CONFLICT there is
the proof that the host is fenced.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..iscsi.initiator import IscsiError, Session, connect, describe_result
from ..lun.types import Result
from ..scsi.constants import Opcode, PrInAction, PrType, Status
from ..scsi.pr import PrDecodeError, ReadFullStatus
from ..scsi.vocabulary import format_key, words

OBSERVER_INITIATOR = "iqn.2026-11.org.prmigrate:observer"
OBSERVER_ISID = 0x23D0000000AB
_UA_RETRIES = 8


@dataclass(frozen=True, slots=True)
class Registration:
    initiator: str
    isid: int | None
    key: int
    holder: bool
    rtype: PrType | int
    scope: int

    @property
    def port(self) -> str:
        return self.initiator if self.isid is None else f"{self.initiator},i,0x{self.isid:012x}"

    def is_port(self, initiator: str, isid: int) -> bool:
        return self.initiator.lower() == initiator.lower() and self.isid == isid

    def to_dict(self, label: str | None = None) -> dict[str, Any]:
        return {
            "port": self.port,
            "initiator": self.initiator,
            "isid": None if self.isid is None else f"0x{self.isid:012x}",
            "host": label,
            "key": format_key(self.key),
            "holder": self.holder,
            "type": words(self.rtype) if self.holder else None,
            "scope": self.scope if self.holder else None,
        }




@dataclass(frozen=True, slots=True)
class PrSnapshot:
    generation: int
    registrations: tuple[Registration, ...]

    @property
    def holders(self) -> list[Registration]:
        return [r for r in self.registrations if r.holder]

    def of_port(self, initiator: str, isid: int) -> list[Registration]:
        return [r for r in self.registrations if r.is_port(initiator, isid)]

    def to_dict(self, labels: dict[str, str]) -> dict[str, Any]:
        def label(r: Registration) -> str | None:
            return labels.get(r.initiator.lower())

        holders = self.holders
        return {
            "generation": self.generation,
            "registrations": [r.to_dict(label(r)) for r in self.registrations],
            "holder": holders[0].to_dict(label(holders[0])) if holders else None,
        }


class Observer:
    """A never-registered nexus on the shared target."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session: Session | None = None

    async def open(self) -> None:
        self.session = await connect(self.url, initiator_name=OBSERVER_INITIATOR,
                                     isid=OBSERVER_ISID, login_timeout=5.0, reconnect=True)

    async def full_status(self) -> PrSnapshot:
        assert self.session is not None
        r = await self.session.pr_in(PrInAction.READ_FULL_STATUS, 8192)
        if r.status != Status.GOOD:
            raise IscsiError(f"READ FULL STATUS: {describe_result(r)}")
        try:
            rfs = ReadFullStatus.decode(bytes(r.data_in))
        except PrDecodeError as e:
            raise IscsiError(f"READ FULL STATUS data: {e}") from e
        return PrSnapshot(
            rfs.generation,
            tuple(
                Registration(e.transport_id.name, e.transport_id.isid, e.key, e.holder,
                             e.rtype, e.scope)
                for e in rfs.entries
            ),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


@dataclass(frozen=True, slots=True)
class ProbeResult:
    port: str
    lba: int
    status: str  # "RESERVATION CONFLICT", "GOOD", ...
    fenced: bool
    unit_attentions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "nexus": self.port,
            "lba": self.lba,
            "status": self.status,
            "fenced": self.fenced,
            "unit_attentions": list(self.unit_attentions),
        }


async def probe_write(url: str, initiator: str, isid: int, lba: int,
                      block_size: int = 512) -> ProbeResult:
    """One WRITE(16) of a zero block at ``lba`` from the nexus (initiator,
    ISID); unit attentions owed to that nexus are collected and retried."""
    from ..scsi.sense import SenseDecodeError, decode_sense

    port = f"{initiator},i,0x{isid:012x}"
    session = await connect(url, initiator_name=initiator, isid=isid, login_timeout=5.0,
                            reconnect=False)
    uas: list[str] = []
    try:
        bs = block_size
        cdb = struct.pack(">BBQIBB", Opcode.WRITE_16, 0, lba, 1, 0, 0)

        def met(ua: Result) -> None:
            try:
                uas.append(decode_sense(ua.sense).describe())
            except SenseDecodeError:
                uas.append("unit attention")

        r = await session.submit_retrying(session.lun, cdb, bytes(bs), tries=_UA_RETRIES, on_retry=met)
    finally:
        await session.close()
    return ProbeResult(port, lba, describe_result(r),
                       r.status == Status.RESERVATION_CONFLICT, tuple(uas))
