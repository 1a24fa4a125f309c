"""The I_T nexus (SPC-5 4.6; SAM-5 4.7): who sends a command to whom.

Defined here, below every layer that names a nexus (TransportIDs in
``transport_id.py``, logical units in ``lun/``, the iSCSI target, the
device); ``lun.types.Nexus`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus: (initiator port, target port). SPC-5 4.6; the iSCSI
    port names are RFC 7143 4.2.7.

    ``initiator`` is stored lower-cased: iSCSI names compare case-insensitively.
    ``isid`` is the 48-bit session identifier; together they name the
    initiator port (``name,i,0x<isid>``). ``target``/``tpgt`` name the target
    port; ``rel_port`` is its relative target port identifier.
    """

    initiator: str
    isid: int
    target: str
    tpgt: int = 1
    rel_port: int = 1

    @staticmethod
    def make(initiator: str, isid: int, target: str, tpgt: int = 1, rel_port: int = 1) -> Nexus:
        return Nexus(initiator.lower(), isid & 0xFFFFFFFFFFFF, target.lower(), tpgt, rel_port)

    @property
    def initiator_port(self) -> str:
        return f"{self.initiator},i,0x{self.isid:012x}"

    def __str__(self) -> str:
        return f"{self.initiator_port}->{self.target},t,{self.tpgt}"
