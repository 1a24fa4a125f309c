"""What the target may ask of a logical unit beyond ``lun.types.LogicalUnitLike``.

An LU is served by ``execute(nexus, cdb, data_out)`` alone. It may offer
more, and the target connection (``session.py``) then uses it; each optional
contract is a ``Protocol`` here, and a connection asks an LU which ones it
implements once (``contracts_of``), not per command:

``ReadFast``
    ``read_fast(nexus, cdb) -> bytes | None``: the data of a READ(10)/(16)
    that ends GOOD with nothing to report, answered from the receive buffer
    without a ``Result`` (``lun/unit.py``); None: ``execute`` runs it.
``RelayRead``
    ``relay_read(nexus, cdb, edtl, sink, token) -> bool``: a read forwarded
    as is and answered through the connection as ``RelaySink``
    (``relay_data`` / ``relay_result``); False: not taken, ``execute`` runs
    it (the passthrough device).
``RelayWrite``
    ``relay_write(nexus, cdb, data, sink, token) -> bool``: a write whose
    data (all of it, the EDTL's) is forwarded as is and answered through the
    connection as ``RelaySink`` (``relay_data`` with GOOD, or
    ``relay_result``); False: not taken, ``execute_then`` runs it.
``WriteFast``
    ``write_fast(nexus, cdb, data) -> bool``: a WRITE(10)/(16) whose data
    (all of it, exactly what its CDB asks for) came as immediate data,
    written at once when it ends GOOD with nothing to report; False: nothing
    is written and ``execute`` runs it (``lun/unit.py``).
``ExecuteThen``
    ``execute_then(nexus, cdb, data_out, done) -> Result | None``: None when
    the answer comes later through ``done(result)`` (a callback instead of
    a Future; the passthrough device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..lun.types import Nexus, Result
from .initiator_core import RelaySink


@runtime_checkable
class ReadFast(Protocol):
    def read_fast(self, nexus: Nexus, cdb: bytes) -> bytes | None:
        ...


@runtime_checkable
class RelayRead(Protocol):
    def relay_read(self, nexus: Nexus, cdb: bytes, edtl: int, sink: RelaySink, token: Any) -> bool:
        ...


@runtime_checkable
class RelayWrite(Protocol):
    def relay_write(self, nexus: Nexus, cdb: bytes, data: Any, sink: RelaySink, token: Any) -> bool:
        ...


@runtime_checkable
class WriteFast(Protocol):
    def write_fast(self, nexus: Nexus, cdb: bytes, data: Any) -> bool:
        ...


@runtime_checkable
class ExecuteThen(Protocol):
    def execute_then(
        self, nexus: Nexus, cdb: bytes, data_out: Any, done: Callable[[Any], None]
    ) -> Result | None:
        ...


@dataclass(frozen=True, slots=True)
class LuContracts:
    """The optional contracts one LU implements, as bound methods (None: not offered)."""

    read_fast: Callable[[Nexus, bytes], bytes | None] | None
    relay_read: Callable[[Nexus, bytes, int, RelaySink, Any], bool] | None
    execute_then: Callable[[Nexus, bytes, Any, Callable[[Any], None]], Result | None] | None
    relay_write: Callable[[Nexus, bytes, Any, RelaySink, Any], bool] | None = None
    write_fast: Callable[[Nexus, bytes, Any], bool] | None = None


NONE = LuContracts(None, None, None, None)


def contracts_of(lu: object) -> LuContracts:
    """Which optional contracts ``lu`` implements (asked once per LU)."""
    if lu is None:
        return NONE
    return LuContracts(
        lu.read_fast if isinstance(lu, ReadFast) else None,
        lu.relay_read if isinstance(lu, RelayRead) else None,
        lu.execute_then if isinstance(lu, ExecuteThen) else None,
        lu.relay_write if isinstance(lu, RelayWrite) else None,
        lu.write_fast if isinstance(lu, WriteFast) else None,
    )
