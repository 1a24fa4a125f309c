"""The logical unit: SPC-5 / SBC-4 command set over a file-backed block store.

``execute(nexus, cdb, data_out) -> Result`` is synchronous and pure apart from
file I/O. Order of checks for every command (SAM-5 5.14, SPC-5 5.15):

1. the CDB is long enough for its group code, and the opcode is known
   (else ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE 20/00);
2. a pending unit attention for this nexus is reported, except to INQUIRY,
   REPORT LUNS and REQUEST SENSE (which returns it as its data);
3. the reservation table decides RESERVATION CONFLICT;
4. the command runs.

``CheckCondition`` / ``ReservationConflict`` become a ``Result`` only in
``execute``; sense is descriptor format when the control page's D_SENSE is
set. Any other exception is logged and answered with HARDWARE ERROR,
INTERNAL TARGET FAILURE.

Task management (SAM-5 7, pinned in tests/lun/test_unit.py):

| event | SCSI-2 reservation | PR | mode pages | UA (to) |
|---|---|---|---|---|
| LOGICAL UNIT RESET | released | kept | kept | 29/03, every nexus |
| TARGET WARM RESET | released | kept | defaults | 29/02, every nexus |
| TARGET COLD RESET | released | kept | defaults | 29/01, every nexus |
| I_T nexus loss | released if held by it | kept | kept | none; its queue dropped |
| CLEAR TASK SET | kept | kept | kept | 2F/00, nexuses whose tasks were aborted (default: all others) |

A reset reaches every nexus that has attached, the requester included (SAM-5
6.3.3: the logical unit reset condition establishes the UA for every I_T
nexus; libiscsi's MultipathIO.Reset checks each path, the resetting one too).
After a cold reset the transport must not report the dropped sessions as
``nexus_lost``: the returning nexuses are to see 29/01 POWER ON OCCURRED.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..scsi import inquiry as inq
from ..scsi import tpg
from ..scsi.cdb import (
    BYTCHK_MASK,
    FUA,
    PROTECT_MASK,
    RW10,
    RW12,
    RW16,
    WS_ANCHOR,
    WS_NDOB,
    WS_UNMAP,
    BlockCdb,
    CdbTooShort,
    CompareAndWriteCdb,
    InquiryCdb,
    ModeSelectCdb,
    ModeSenseCdb,
    ReadCapacity10Cdb,
    ReadDefectCdb,
    ReportLunsCdb,
    ReportOpcodesCdb,
    ReportTmfsCdb,
    RequestSenseCdb,
    ServiceAction16Cdb,
    StartStopCdb,
    SupportedTmfs,
    UnmapCdb,
    WriteAtomic16Cdb,
    decode_unmap_list,
    invalid_cdb,
    invalid_param,
)
from ..scsi.constants import (
    MaintenanceIn,
    Opcode,
    ReceiveCopyResultsAction,
    ServiceActionIn16,
    Status,
)
from ..scsi.sense import CheckCondition, Sense, SenseField, encode_sense
from . import sanitize, xcopy
from .modepages import ModePages, PageControl
from .opcodes import report_supported_opcodes
from .store import BlockStore
from .types import Nexus, ReservationConflict, Result
from .ua import UA_EXEMPT, UnitAttentions

if TYPE_CHECKING:
    from .pr import ReservationTable

log = logging.getLogger(__name__)

# Limits advertised in the Block Limits VPD page (SBC-4 6.6.4), in blocks.
# MAXIMUM TRANSFER LENGTH: 65536 blocks (32 MiB at 512 bytes, what the
# conformance suite's 4-byte-length WRITE SAME test writes in one command),
# at most 64 MiB for larger blocks.
MAX_TRANSFER_BLOCKS = 65536
MAX_TRANSFER_BYTES = 64 << 20
OPTIMAL_TRANSFER_BYTES = 128 << 10
MAX_UNMAP_LBA = 1 << 20
MAX_UNMAP_DESCRIPTORS = 256
MAX_WRITE_SAME_BYTES = 64 << 20
MAX_COMPARE_AND_WRITE = 255
# WRITE ATOMIC(16) (SBC-4 4.29): at most 4 MiB per command (a power of two in
# blocks, under MAXIMUM TRANSFER LENGTH and the 16-bit TRANSFER LENGTH field),
# by default any LBA and any length (``atomic_unit`` 1; a larger unit, say a
# 4 KiB physical block's worth, becomes ATOMIC ALIGNMENT and ATOMIC TRANSFER
# LENGTH GRANULARITY). Each atomic write is one pwrite of the whole range, so
# an ATOMIC BOUNDARY (where the device server *may* split the write) is
# honoured by not splitting: the limits with a boundary equal those without.
MAX_ATOMIC_BYTES = 4 << 20

# CDB length by group code (SPC-5 4.2.5.1): opcode bits 7:5.
_GROUP_LEN = (6, 10, 10, 1, 16, 12, 1, 1)

# Byte offset of the TRANSFER LENGTH field by group code, for sense pointers.
# (An iSCSI CDB arrives padded to 16 bytes, so the opcode, not len(cdb), decides.)
_LEN_FIELD = (4, 7, 7, 0, 10, 6, 0, 0)

_WRITE_AND_VERIFY = frozenset((Opcode.WRITE_AND_VERIFY_10, Opcode.WRITE_AND_VERIFY_12, Opcode.WRITE_AND_VERIFY_16))

_GOOD = Status.GOOD
# What the iSCSI target does for each LU (iscsi.session: Connection._task_mgmt):
# ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET and TARGET
# WARM/COLD RESET; CLEAR ACA, QUERY TASK and the rest are answered
# "function not supported".
SUPPORTED_TMFS = SupportedTmfs(abort_task=True, abort_task_set=True, clear_task_set=True, lu_reset=True,
                               target_reset=True)
_CHECK = Status.CHECK_CONDITION
_RW10_unpack = RW10.unpack_from
_RW16_unpack = RW16.unpack_from
_RW12_unpack = RW12.unpack_from
_U32 = struct.Struct(">I")


def _peer_cdb(op: int, lba: int) -> bytes:
    """A one-block READ(16)/WRITE(16) CDB, for another LU's reservation check."""
    return RW16.pack(op, 0, lba, 1, 0, 0)


def _lun_entry(lun: int) -> bytes:
    """SAM-5 4.7: peripheral (00b) addressing below 256, flat space (01b) above."""
    if lun < 256:
        return bytes((0, lun, 0, 0, 0, 0, 0, 0))
    return bytes((0x40 | ((lun >> 8) & 0x3F), lun & 0xFF, 0, 0, 0, 0, 0, 0))


class LogicalUnit:
    def __init__(
        self,
        store_path: Path | str,
        size_bytes: int | None = None,
        *,
        lun: int = 0,
        block_size: int = 512,
        serial: str | None = None,
        name: str | None = None,
        state_dir: Path | None = None,
        vendor: str = "PRMIGRAT",
        product: str = "SHARED-LUN",
        revision: str = "0001",
        pr_factory: Callable[..., ReservationTable] | None = None,
        atomic_unit: int = 1,
    ) -> None:
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two >= 512")
        self.lun = lun
        self.block_size = block_size
        self.store = BlockStore(store_path, size_bytes)
        self.blocks = self.store.size // block_size
        self.name = name or str(Path(store_path).resolve())
        self.serial = serial or inq.naa6(self.name).hex()[-16:]
        self.ident = inq.Identity(vendor, product, revision, self.serial, self.name)
        self.ua = UnitAttentions()
        self.modes = ModePages()
        self.report_luns: Callable[[], list[int]] = lambda: [self.lun]
        # The target ports of the SCSI target device, relative target port
        # identifier -> iSCSI target portal group tag (one port per portal
        # group); the iSCSI target sets it (iscsi/target.py). Each port is its
        # own target port group of the same number (REPORT TARGET PORT GROUPS).
        self.target_ports: Callable[[], Mapping[int, int]] = lambda: {1: 1}
        # Logical units an EXTENDED COPY may name as copy source or
        # destination (E4h descriptors carrying their NAA designator): this
        # LU alone unless the target gives the LUs of its node.
        self.copy_peers: Callable[[], Iterable[LogicalUnit]] = lambda: (self,)
        self.naa = inq.naa6(self.name)
        self._copy_results: dict[tuple[Nexus, int], xcopy.CopyRecord] = {}
        self.abort_hook: Callable[[set[Nexus]], None] | None = None
        self.log = logging.LoggerAdapter(log, {"lun": lun})
        if pr_factory is None:
            from .pr import ReservationTable

            pr_factory = ReservationTable
        state_path = Path(state_dir) / f"lun{lun}-pr.json" if state_dir else None
        self.pr: ReservationTable = pr_factory(self.ua, state_path, abort_tasks=self._abort_tasks, log=self.log)
        if hasattr(self.pr, "target_ports"):
            self.pr.target_ports = lambda: self.target_ports()  # REGISTER AND MOVE checks its port
        self._fd = self.store.fd
        self._max_xfer = min(MAX_TRANSFER_BLOCKS, MAX_TRANSFER_BYTES // block_size)
        max_atomic = min(self._max_xfer, MAX_ATOMIC_BYTES // block_size, 0xFFFF)
        if not 1 <= atomic_unit <= max_atomic:
            raise ValueError(f"atomic unit {atomic_unit} is not 1..{max_atomic} blocks")
        max_atomic -= max_atomic % atomic_unit  # a whole number of units
        self.limits = inq.BlockLimits(
            max_transfer=self._max_xfer,
            optimal_transfer=OPTIMAL_TRANSFER_BYTES // block_size,
            max_unmap_lba=MAX_UNMAP_LBA,
            max_unmap_descriptors=MAX_UNMAP_DESCRIPTORS,
            max_write_same=MAX_WRITE_SAME_BYTES // block_size,
            max_compare_and_write=MAX_COMPARE_AND_WRITE,
            max_atomic_transfer=max_atomic,
            atomic_alignment=atomic_unit,
            atomic_granularity=atomic_unit,
            max_atomic_with_boundary=max_atomic,
            max_atomic_boundary=max_atomic,
        )
        self._std_inquiry = inq.standard_inquiry(self.ident, third_party_copy=True, tpgs=tpg.Tpgs.IMPLICIT)
        self._dispatch: dict[int, Callable[[Nexus, bytes, bytes | memoryview], Result]] = {
            Opcode.READ_10: self._read10,
            Opcode.READ_16: self._read16,
            Opcode.WRITE_10: self._write10,
            Opcode.WRITE_16: self._write16,
            Opcode.READ_6: self._read_block,
            Opcode.READ_12: self._read12,
            Opcode.WRITE_6: self._write_block,
            Opcode.WRITE_12: self._write_block,
            Opcode.TEST_UNIT_READY: self._test_unit_ready,
            Opcode.INQUIRY: self._inquiry,
            Opcode.REPORT_LUNS: self._report_luns,
            Opcode.REQUEST_SENSE: self._request_sense,
            Opcode.READ_CAPACITY_10: self._read_capacity10,
            Opcode.SERVICE_ACTION_IN_16: self._service_action_in16,
            Opcode.VERIFY_10: self._verify,
            Opcode.VERIFY_12: self._verify,
            Opcode.VERIFY_16: self._verify,
            Opcode.WRITE_AND_VERIFY_10: self._write_block,
            Opcode.WRITE_AND_VERIFY_12: self._write_block,
            Opcode.WRITE_AND_VERIFY_16: self._write_block,
            Opcode.SYNCHRONIZE_CACHE_10: self._synchronize_cache,
            Opcode.SYNCHRONIZE_CACHE_16: self._synchronize_cache,
            Opcode.WRITE_SAME_10: self._write_same,
            Opcode.WRITE_SAME_16: self._write_same,
            Opcode.UNMAP: self._unmap,
            Opcode.SANITIZE: self._sanitize,
            Opcode.COMPARE_AND_WRITE: self._compare_and_write,
            Opcode.ORWRITE_16: self._orwrite,
            Opcode.WRITE_ATOMIC_16: self._write_atomic16,
            Opcode.EXTENDED_COPY: self._extended_copy,
            Opcode.RECEIVE_COPY_RESULTS: self._receive_copy_results,
            Opcode.PRE_FETCH_10: self._prefetch,
            Opcode.PRE_FETCH_16: self._prefetch,
            Opcode.MODE_SENSE_6: self._mode_sense,
            Opcode.MODE_SENSE_10: self._mode_sense,
            Opcode.MODE_SELECT_6: self._mode_select,
            Opcode.MODE_SELECT_10: self._mode_select,
            Opcode.MAINTENANCE_IN: self._maintenance_in,
            Opcode.START_STOP_UNIT: self._start_stop_unit,
            Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: self._prevent_allow,
            Opcode.READ_DEFECT_DATA_10: self._read_defect_data,
            Opcode.READ_DEFECT_DATA_12: self._read_defect_data,
            Opcode.RESERVE_6: self._reserve,
            Opcode.RESERVE_10: self._reserve,
            Opcode.RELEASE_6: self._release,
            Opcode.RELEASE_10: self._release,
            Opcode.PERSISTENT_RESERVE_IN: self._pr_in,
            Opcode.PERSISTENT_RESERVE_OUT: self._pr_out,
        }

    # ------------------------------------------------------------------ core
    def execute(self, nexus: Nexus, cdb: bytes, data_out: bytes | memoryview = b"") -> Result:
        try:
            if not cdb:
                raise CdbTooShort(-1, 6, 0)
            op = cdb[0]
            handler = self._dispatch.get(op)
            if handler is None:
                raise CheckCondition(Sense.INVALID_OPCODE, SenseField(cdb=True, field=0))
            if len(cdb) < _GROUP_LEN[op >> 5]:
                raise CdbTooShort(op, _GROUP_LEN[op >> 5], len(cdb))
            ua = self.ua
            if ua._q and nexus in ua._q and op not in UA_EXEMPT:
                sense = ua.pop(nexus)
                if sense is not None:  # the queue of nexus is never empty
                    return Result(_CHECK, b"", encode_sense(sense, self.modes.d_sense))
            if self.pr.conflicts(nexus, cdb):
                return Result(Status.RESERVATION_CONFLICT)
            return handler(nexus, cdb, data_out)
        except CheckCondition as e:
            return Result(_CHECK, b"", e.encode(self.modes.d_sense))
        except ReservationConflict:
            return Result(Status.RESERVATION_CONFLICT)
        except Exception:
            self.log.exception("lun %d: internal error on CDB %s from %s", self.lun, bytes(cdb[:16]).hex(), nexus)
            return Result(_CHECK, b"", encode_sense(Sense.INTERNAL_TARGET_FAILURE, self.modes.d_sense))

    # ----------------------------------------------------- nexus / task mgmt
    def attach(self, nexus: Nexus) -> None:
        self.ua.attach(nexus)

    def known(self, nexus: Nexus) -> bool:
        return self.ua.known(nexus)

    def nexus_lost(self, nexus: Nexus) -> None:
        self.pr.nexus_lost(nexus)
        self.ua.detach(nexus)
        for key in [k for k in self._copy_results if k[0] == nexus]:
            del self._copy_results[key]

    def reset(self, nexus: Nexus, cold: bool = False, target_reset: bool = False) -> None:
        self.pr.reset()
        self.ua.attach(nexus)
        self._copy_results.clear()
        if cold:
            self.modes = ModePages()
            self.ua.establish_all(Sense.POWER_ON_OCCURRED)
        elif target_reset:
            self.modes = ModePages()
            self.ua.establish_all(Sense.SCSI_BUS_RESET)
        else:
            self.ua.establish_all(Sense.BUS_DEVICE_RESET)
        self.log.info(
            "lun %d: %s reset from %s", self.lun, "cold" if cold else "warm target" if target_reset else "LU", nexus
        )

    def clear_task_set(self, nexus: Nexus, aborted: Iterable[Nexus] | None = None) -> None:
        """SAM-5 7.4 with TAS=0: 2F/00 COMMANDS CLEARED BY ANOTHER INITIATOR to
        each other nexus that lost tasks. The transport knows which those are
        and passes them as ``aborted``; without it, every other nexus is told."""
        targets = self.ua.nexuses if aborted is None else aborted
        self.ua.establish_many(Sense.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR, (n for n in targets if n != nexus))

    def _abort_tasks(self, nexuses: set[Nexus]) -> None:
        if self.abort_hook is not None:
            self.abort_hook(nexuses)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------- helpers
    def _check_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.blocks:
            raise CheckCondition(Sense.LBA_OUT_OF_RANGE)

    def _check_writable(self) -> None:
        if self.modes.swp:
            raise CheckCondition(Sense.WRITE_PROTECTED)

    def _data(self, data_out: bytes | memoryview, length: int, field: int) -> memoryview:
        """The first ``length`` bytes of Data-Out; fewer is a CDB/transfer mismatch."""
        if len(data_out) < length:
            raise invalid_cdb(field)
        return memoryview(data_out)[:length]

    # ------------------------------------------------------- read / write
    # READ(10) and READ(16) are the hot path: checks of _do_read inlined.
    def _read10(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        _, flags, lba, _g, n, _c = _RW10_unpack(cdb)
        if flags & PROTECT_MASK or lba + n > self.blocks or n > self._max_xfer or not n:
            return self._do_read(flags, lba, n)
        bs = self.block_size
        return Result(_GOOD, os.pread(self._fd, n * bs, lba * bs))

    def _read16(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        _, flags, lba, n, _g, _c = _RW16_unpack(cdb)
        if flags & PROTECT_MASK or lba + n > self.blocks or n > self._max_xfer or not n:
            return self._do_read(flags, lba, n)
        bs = self.block_size
        return Result(_GOOD, os.pread(self._fd, n * bs, lba * bs))

    def read_fast(self, nexus: Nexus, cdb: bytes) -> bytes | None:
        """The data of a READ(10)/READ(16) that ends GOOD with nothing to
        report, or None: then ``execute`` must run it (UA pending, possible
        reservation conflict, protection bits, range or length errors, other
        opcodes). Nothing is consumed on None, so the transport can fall back
        without changing the outcome; the checks are those of ``execute``
        in the same order (SAM-5 5.14: UA, then conflict)."""
        op = cdb[0]
        if op == 0x28 and len(cdb) >= 10:
            _, flags, lba, _g, n, _c = _RW10_unpack(cdb)
        elif op == 0x88 and len(cdb) >= 16:
            _, flags, lba, n, _g, _c = _RW16_unpack(cdb)
        else:
            return None
        if flags & PROTECT_MASK or lba + n > self.blocks or n > self._max_xfer or not n:
            return None
        q = self.ua._q
        if q and nexus in q:
            return None
        if self.pr.conflicts(nexus, cdb):
            return None
        bs = self.block_size
        return os.pread(self._fd, n * bs, lba * bs)

    def write_fast(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> bool:
        """Write a WRITE(10)/WRITE(16) that ends GOOD with nothing to report
        and return True, or return False with nothing written: then
        ``execute`` must run it (UA pending, possible reservation conflict,
        protection bits, FUA or write cache off (a flush), write protection,
        range or length errors, data not exactly the CDB's length, other
        opcodes). The checks are those of ``execute`` and ``_do_write``; a
        write that raises is run again by ``execute``, which answers it."""
        op = cdb[0]
        if op == 0x2A and len(cdb) >= 10:
            _, flags, lba, _g, n, _c = _RW10_unpack(cdb)
        elif op == 0x8A and len(cdb) >= 16:
            _, flags, lba, n, _g, _c = _RW16_unpack(cdb)
        else:
            return False
        bs = self.block_size
        if flags & (PROTECT_MASK | FUA) or lba + n > self.blocks or n > self._max_xfer or not n or len(data) != n * bs:
            return False
        q = self.ua._q
        if q and nexus in q:
            return False
        modes = self.modes
        if modes.swp or not modes.wce or self.pr.conflicts(nexus, cdb):
            return False
        self.store.write(lba * bs, data)
        return True

    def _read12(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        _, flags, lba, n, _g, _c = _RW12_unpack(cdb)
        return self._do_read(flags, lba, n)

    def _read_block(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        c = BlockCdb.decode(cdb)
        return self._do_read(c.flags, c.lba, c.blocks)

    def _do_read(self, flags: int, lba: int, n: int) -> Result:
        # SBC-4 5.16: RDPROTECT != 0 without protection information is invalid.
        if flags & PROTECT_MASK:
            raise invalid_cdb(1, 7)
        if lba + n > self.blocks:
            raise CheckCondition(Sense.LBA_OUT_OF_RANGE)
        if n > self._max_xfer:
            raise invalid_cdb(7)
        if not n:
            return Result()
        bs = self.block_size
        # The page cache is coherent with the image, so FUA reads need no flush.
        return Result(_GOOD, os.pread(self._fd, n * bs, lba * bs))

    def _write10(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        _, flags, lba, _g, n, _c = _RW10_unpack(cdb)
        return self._do_write(0x2A, flags, lba, n, data)

    def _write16(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        _, flags, lba, n, _g, _c = _RW16_unpack(cdb)
        return self._do_write(0x8A, flags, lba, n, data)

    def _write_block(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        c = BlockCdb.decode(cdb)
        return self._do_write(cdb[0], c.flags, c.lba, c.blocks, data)

    def _do_write(self, op: int, flags: int, lba: int, n: int, data: bytes | memoryview) -> Result:
        """WRITE(6/10/12/16) and WRITE AND VERIFY(10/12/16), SBC-4 5.37-5.47."""
        if flags & PROTECT_MASK:
            raise invalid_cdb(1, 7)
        verify = op in _WRITE_AND_VERIFY
        if verify and (flags & BYTCHK_MASK) >> 1 not in (0, 1):
            raise invalid_cdb(1, 1)
        if self.modes.swp:
            raise CheckCondition(Sense.WRITE_PROTECTED)
        if lba + n > self.blocks:
            raise CheckCondition(Sense.LBA_OUT_OF_RANGE)
        if n > self._max_xfer:
            raise invalid_cdb(_LEN_FIELD[op >> 5])
        if not n:
            return Result()
        bs = self.block_size
        length = n * bs
        if len(data) < length:
            raise invalid_cdb(_LEN_FIELD[op >> 5])
        self.store.write(lba * bs, data if len(data) == length else memoryview(data)[:length])
        # FUA (SBC-4 5.40) and WRITE AND VERIFY write through to the medium;
        # with the write cache disabled (WCE=0) every write does.
        if (flags & FUA and op != Opcode.WRITE_6) or verify or not self.modes.wce:
            self.store.flush(lba * bs, length)
        return Result()

    def _verify(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """VERIFY(10/12/16), SBC-4 5.33-5.35. BYTCHK 00b: medium check only;
        01b: compare blocks; 11b: compare one block against each; 10b reserved."""
        c = BlockCdb.decode(cdb)
        if c.flags & PROTECT_MASK:
            raise invalid_cdb(1, 7)
        bytchk = (c.flags & BYTCHK_MASK) >> 1
        if bytchk == 2:
            raise invalid_cdb(1, 2)
        self._check_range(c.lba, c.blocks)
        field = _LEN_FIELD[cdb[0] >> 5]
        if c.blocks > self._max_xfer:
            raise invalid_cdb(field)
        if not c.blocks or bytchk == 0:
            return Result()
        bs = self.block_size
        medium = self.store.read(c.lba * bs, c.blocks * bs)
        expect = bytes(self._data(data, bs, field)) * c.blocks if bytchk == 3 else self._data(data, c.blocks * bs, field)
        self._compare(medium, expect)
        return Result()

    @staticmethod
    def _compare(medium: bytes, expect: bytes | memoryview) -> None:
        if medium != expect:
            exp = bytes(expect)
            off = next(i for i in range(len(medium)) if medium[i] != exp[i])
            # SBC-4 5.3 / 5.33: INFORMATION = offset of the first miscompare.
            raise CheckCondition(Sense.MISCOMPARE_DURING_VERIFY, information=off)

    def _compare_and_write(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """COMPARE AND WRITE, SBC-4 5.3: Data-Out is n verify blocks + n write blocks."""
        c = CompareAndWriteCdb.decode(cdb)
        if c.flags & PROTECT_MASK:
            raise invalid_cdb(1, 7)
        if c.blocks > MAX_COMPARE_AND_WRITE:
            raise invalid_cdb(13)
        self._check_writable()
        self._check_range(c.lba, c.blocks)
        bs = self.block_size
        length = c.blocks * bs
        # The Data-Out must be exactly 2 x NUMBER OF LOGICAL BLOCKS; checked
        # before the 0-block shortcut so that 256 blocks, which wraps the
        # one-byte field to 0, is rejected instead of silently ignored.
        if len(data) != 2 * length:
            raise invalid_cdb(13)
        if not c.blocks:
            return Result()
        view = memoryview(data)
        self._compare(self.store.read(c.lba * bs, length), view[:length])
        self.store.write(c.lba * bs, view[length:])
        if c.flags & FUA or not self.modes.wce:
            self.store.flush(c.lba * bs, length)
        return Result()

    def _orwrite(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """ORWRITE(16), SBC-4 5.10: the medium becomes medium OR Data-Out."""
        c = BlockCdb.decode(cdb)
        if c.flags & PROTECT_MASK:
            raise invalid_cdb(1, 7)
        self._check_writable()
        self._check_range(c.lba, c.blocks)
        if c.blocks > self._max_xfer:
            raise invalid_cdb(10)
        if not c.blocks:
            return Result()
        bs = self.block_size
        length = c.blocks * bs
        buf = self._data(data, length, 10)
        old = self.store.read(c.lba * bs, length)
        merged = (int.from_bytes(old, "big") | int.from_bytes(buf, "big")).to_bytes(length, "big")
        self.store.write(c.lba * bs, merged)
        if c.flags & FUA or not self.modes.wce:
            self.store.flush(c.lba * bs, length)
        return Result()

    def _write_atomic16(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """WRITE ATOMIC(16), SBC-4 5.48: every block of the range or none.

        Checked before the medium changes, in WRITE(16)'s order: WRPROTECT
        != 0 (no protection information) -> INVALID FIELD 1/7; SWP -> WRITE
        PROTECTED; range -> LBA OUT OF RANGE; then the atomic limits of the
        Block Limits page, INVALID FIELD IN CDB pointing at the field:
        ATOMIC BOUNDARY > MAXIMUM ATOMIC BOUNDARY SIZE (byte 10); TRANSFER
        LENGTH > MAXIMUM ATOMIC TRANSFER LENGTH (WITH ATOMIC BOUNDARY when
        the boundary is not 0) or not a multiple of ATOMIC TRANSFER LENGTH
        GRANULARITY (byte 12); LBA not a multiple of ATOMIC ALIGNMENT (byte
        2). TRANSFER LENGTH 0 writes nothing and is not an error.

        All or nothing: the whole range is one pwrite (``write_atomic``).
        The LU runs on the event loop's one thread, so no other command
        (READ fast path included: it preads the same file, there is no cache
        to invalidate) runs between the write's first and last byte.
        """
        c = WriteAtomic16Cdb.decode(cdb)
        if c.flags & PROTECT_MASK:
            raise invalid_cdb(1, 7)
        self._check_writable()
        self._check_range(c.lba, c.blocks)
        bl = self.limits
        if c.boundary > bl.max_atomic_boundary:
            raise invalid_cdb(WriteAtomic16Cdb.BOUNDARY_FIELD)
        limit = bl.max_atomic_with_boundary if c.boundary else bl.max_atomic_transfer
        if c.blocks > limit or c.blocks % (bl.atomic_granularity or 1):
            raise invalid_cdb(WriteAtomic16Cdb.LENGTH_FIELD)
        if c.lba % (bl.atomic_alignment or 1):
            raise invalid_cdb(WriteAtomic16Cdb.LBA_FIELD)
        if not c.blocks:
            return Result()
        bs = self.block_size
        length = c.blocks * bs
        buf = self._data(data, length, WriteAtomic16Cdb.LENGTH_FIELD)
        self.store.write_atomic(c.lba * bs, buf)
        if c.flags & FUA or not self.modes.wce:
            self.store.flush(c.lba * bs, length)
        return Result()

    def _synchronize_cache(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """SYNCHRONIZE CACHE(10/16), SBC-4 5.27: 0 blocks means to the end."""
        c = BlockCdb.decode(cdb)
        self._check_range(c.lba, c.blocks)
        self.store.flush(c.lba * self.block_size, c.blocks * self.block_size)
        return Result()

    def _prefetch(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """PRE-FETCH(10/16), SBC-4 5.11. There is no LU cache of its own, so
        blocks are never "transferred to the cache": status GOOD, not CONDITION
        MET; the OS is hinted to read ahead."""
        c = BlockCdb.decode(cdb)
        self._check_range(c.lba, c.blocks)
        bs = self.block_size
        length = (c.blocks or self.blocks - c.lba) * bs
        if hasattr(os, "posix_fadvise") and length:
            os.posix_fadvise(self._fd, c.lba * bs, length, os.POSIX_FADV_WILLNEED)
        return Result()

    # ------------------------------------------------- provisioning
    def _write_same(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """WRITE SAME(10/16), SBC-4 5.48/5.49.

        - WRPROTECT != 0: INVALID FIELD IN CDB (no protection information).
        - ANCHOR without UNMAP, or ANCHOR at all (ANC_SUP = 0): INVALID FIELD.
        - 0 blocks: from LBA to the last block (WSNZ = 0 in Block Limits).
        - more than MAXIMUM WRITE SAME LENGTH: INVALID FIELD.
        - NDOB (16 only): no Data-Out, the block is zeros.
        - UNMAP: the range is deallocated (reads back zero, LBPRZ = 1)
          whatever the data, as the conformance suite expects; without
          UNMAP the blocks stay mapped (written, zeros included).
        """
        c = BlockCdb.decode(cdb)
        f = c.flags
        sixteen = cdb[0] == Opcode.WRITE_SAME_16
        if f & PROTECT_MASK:
            raise invalid_cdb(1, 7)
        if f & WS_ANCHOR:
            raise invalid_cdb(1, 4)
        ndob = sixteen and bool(f & WS_NDOB)
        if not sixteen and f & WS_NDOB:
            raise invalid_cdb(1, 0)
        self._check_writable()
        self._check_range(c.lba, c.blocks)
        blocks = c.blocks or self.blocks - c.lba
        len_field = 10 if sixteen else 7
        if blocks > self.limits.max_write_same:
            raise invalid_cdb(len_field)
        bs = self.block_size
        if ndob:
            block: bytes | memoryview = bytes(bs)
        else:
            if len(data) != bs:
                raise invalid_cdb(len_field)
            block = data
        if not blocks:
            return Result()
        if f & WS_UNMAP:
            self.store.unmap(c.lba * bs, blocks * bs)
        elif ndob:
            self.store.write_zeros(c.lba * bs, blocks * bs)
        else:
            self.store.write_same(c.lba * bs, block, blocks)
        if not self.modes.wce:
            self.store.flush(c.lba * bs, blocks * bs)
        return Result()

    def _unmap(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """UNMAP, SBC-4 5.32: all descriptors are checked before any is applied."""
        c = UnmapCdb.decode(cdb)
        if c.anchor:
            raise invalid_cdb(1, 0)
        if c.length == 0:
            return Result()
        if c.length < 8 or len(data) < c.length:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        self._check_writable()
        descs = decode_unmap_list(memoryview(data)[: c.length])
        if len(descs) > MAX_UNMAP_DESCRIPTORS:
            raise invalid_param(2)
        total = 0
        for i, d in enumerate(descs):
            if d.lba + d.blocks > self.blocks:
                raise CheckCondition(Sense.LBA_OUT_OF_RANGE)
            total += d.blocks
            if d.blocks > MAX_UNMAP_LBA or total > MAX_UNMAP_LBA:
                raise invalid_param(8 + 16 * i + 8)
        bs = self.block_size
        for d in descs:
            self.store.unmap(d.lba * bs, d.blocks * bs)
        return Result()

    def _sanitize(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """SANITIZE, SBC-4 5.30 (lun/sanitize.py): every check before the
        medium changes; write protection (SWP) refuses all but EXIT FAILURE MODE."""
        c = sanitize.SanitizeCdb.decode(cdb)
        action = c.action
        if action == sanitize.SanitizeAction.OVERWRITE:
            params = sanitize.OverwriteParams.decode(data, c.length, self.block_size)
        elif c.length:
            raise invalid_cdb(7)
        if action == sanitize.SanitizeAction.EXIT_FAILURE_MODE:
            return Result()
        self._check_writable()
        if action == sanitize.SanitizeAction.OVERWRITE:
            sanitize.overwrite(self.store, self.blocks, self.block_size, params)
        else:
            sanitize.erase(self.store, self.blocks, self.block_size)
        self.log.info("lun %d: sanitized (%s) by %s", self.lun, action.name, nexus)
        return Result()

    # ------------------------------------------------------- copy manager
    def _extended_copy(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """EXTENDED COPY (LID1), SPC-4 6.4 (lun/xcopy.py): the parameter list
        and every segment are checked before a byte is copied; the copy then
        runs to completion inside the command."""
        c = xcopy.ExtendedCopyCdb.decode(cdb)
        plist = xcopy.CopyList.decode(data, c.length)
        if plist is None:
            return Result()
        key = (nexus, plist.list_id)
        self._copy_results.pop(key, None)  # a new copy with this list identifier
        try:
            plan = [self._plan_segment(nexus, plist, seg) for seg in plist.segments]
        except CheckCondition as e:
            if plist.held and e.sense.key == Sense.COPY_ABORTED.key:
                self._copy_results[key] = xcopy.CopyRecord(xcopy.CopyManagerStatus.FAILED, 0, 0)
            raise
        done = moved = 0
        try:
            for src, src_off, dst, dst_off, length in plan:
                xcopy.copy_range(src.store, src_off, dst.store, dst_off, length)
                done += 1
                moved += length
        except OSError:
            if plist.held:
                self._copy_results[key] = xcopy.CopyRecord(xcopy.CopyManagerStatus.FAILED, done, moved)
            raise
        for dst in {id(p[2]): p[2] for p in plan}.values():
            if not dst.modes.wce:
                dst.store.flush()
        if plist.held:
            self._copy_results[key] = xcopy.CopyRecord(xcopy.CopyManagerStatus.COMPLETED, done, moved)
        return Result()

    def _plan_segment(
        self, nexus: Nexus, plist: xcopy.CopyList, seg: xcopy.Segment
    ) -> tuple[LogicalUnit, int, LogicalUnit, int, int]:
        """(source LU, byte offset, destination LU, byte offset, length) of
        one block to block segment, or the sense that stops the copy."""
        Seg = xcopy.Segment
        src = self._copy_target(plist, seg, seg.src, Seg.SRC_FIELD)
        dst = self._copy_target(plist, seg, seg.dst, Seg.DST_FIELD)
        length = seg.blocks * (dst.block_size if seg.dc else src.block_size)
        if length % src.block_size or length % dst.block_size or length > xcopy.MAX_SEGMENT_BYTES:
            raise invalid_param(seg.offset + Seg.BLOCKS_FIELD)
        if seg.src_lba + length // src.block_size > src.blocks:
            raise xcopy.segment_abort(seg, Seg.SRC_LBA_FIELD)
        if seg.dst_lba + length // dst.block_size > dst.blocks:
            raise xcopy.segment_abort(seg, Seg.DST_LBA_FIELD)
        dst._check_writable()
        # Another LU of the node is read and written on the same I_T nexus:
        # its reservations decide as for a READ(16) / WRITE(16) from it.
        if src is not self and src.pr.conflicts(nexus, _peer_cdb(Opcode.READ_16, seg.src_lba)):
            raise ReservationConflict
        if dst is not self and dst.pr.conflicts(nexus, _peer_cdb(Opcode.WRITE_16, seg.dst_lba)):
            raise ReservationConflict
        return src, seg.src_lba * src.block_size, dst, seg.dst_lba * dst.block_size, length

    def _copy_target(self, plist: xcopy.CopyList, seg: xcopy.Segment, index: int, field: int) -> LogicalUnit:
        """The LU a segment's CSCD DESCRIPTOR ID names: an E4h descriptor
        whose designator is the NAA designator (binary, LU association) this
        LU or a copy peer reports in VPD page 83h."""
        if index >= len(plist.cscds):
            raise CheckCondition(Sense.UNREACHABLE_COPY_TARGET, SenseField(cdb=False, field=seg.offset + field))
        d = plist.cscds[index]
        found = None
        if (d.code_set, d.association, d.designator_type) == (
            inq.CodeSet.BINARY, inq.Association.LU, inq.DesignatorType.NAA
        ):
            found = next((lu for lu in self.copy_peers() if lu.naa == d.designator), None)
        if found is None:
            raise CheckCondition(Sense.COPY_TARGET_DEVICE_NOT_REACHABLE,
                                 SenseField(cdb=False, field=d.offset + xcopy.Cscd.DESIGNATOR_FIELD))
        if d.device_type != 0:
            raise CheckCondition(Sense.INCORRECT_COPY_TARGET_DEVICE_TYPE, SenseField(cdb=False, field=d.offset + 1))
        if d.block_length != found.block_size:
            raise CheckCondition(Sense.INCORRECT_COPY_TARGET_DEVICE_TYPE,
                                 SenseField(cdb=False, field=d.offset + xcopy.Cscd.BLOCK_LENGTH_FIELD))
        return found

    def _receive_copy_results(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """RECEIVE COPY RESULTS, SPC-4 6.18: COPY STATUS of this nexus's
        last copy with the LIST IDENTIFIER (discarded once wholly returned),
        OPERATING PARAMETERS. No copy known: INVALID FIELD IN CDB at byte 2."""
        c = xcopy.ReceiveCopyResultsCdb.decode(cdb)
        action = xcopy.check_results_action(c.action)
        if action == ReceiveCopyResultsAction.OPERATING_PARAMETERS:
            return Result(_GOOD, xcopy.operating_parameters(self.block_size)[: c.alloc])
        record = self._copy_results.get((nexus, c.list_id))
        if record is None:
            raise invalid_cdb(2)
        out = xcopy.copy_status(record)
        if c.alloc >= len(out):
            del self._copy_results[(nexus, c.list_id)]
        return Result(_GOOD, out[: c.alloc])

    def _get_lba_status(self, lba: int, alloc: int) -> bytes:
        """GET LBA STATUS, SBC-4 5.8: descriptors of mapped / deallocated runs
        from ``lba``, as many as the allocation length holds (at least one)."""
        if lba >= self.blocks:
            raise CheckCondition(Sense.LBA_OUT_OF_RANGE)
        bs = self.block_size
        room = max(1, min(64, (alloc - 8) // 16))
        out = bytearray()
        pos = lba
        while pos < self.blocks and len(out) < room * 16:
            want = min(self.blocks - pos, 0xFFFFFFFF)
            mapped, run = self.store.is_mapped(pos * bs, want * bs)
            end_byte = pos * bs + run
            end = -(-end_byte // bs) if mapped else end_byte // bs
            end = max(end, pos + 1)
            out += struct.pack(">QIB3x", pos, end - pos, 0 if mapped else 1)
            pos = end
        return struct.pack(">I4x", len(out) + 4) + bytes(out)

    # --------------------------------------------------------- SPC basics
    def _test_unit_ready(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        return Result()

    def _inquiry(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        c = InquiryCdb.decode(cdb)
        if c.cmddt:
            raise invalid_cdb(1, 1)
        if not c.evpd:
            if c.page:
                raise invalid_cdb(2)
            return Result(_GOOD, self._std_inquiry[: c.alloc])
        page = c.page
        if page == inq.VpdPage.SUPPORTED:
            out = inq.vpd_supported()
        elif page == inq.VpdPage.UNIT_SERIAL:
            out = inq.vpd_serial(self.ident)
        elif page == inq.VpdPage.DEVICE_ID:
            out = inq.vpd_device_id(self.ident, target=nexus.target, tpgt=nexus.tpgt, rel_port=nexus.rel_port,
                                    port_group=nexus.rel_port)
        elif page == inq.VpdPage.THIRD_PARTY_COPY:
            out = inq.vpd_third_party_copy(xcopy.copy_limits(self.block_size))
        elif page == inq.VpdPage.BLOCK_LIMITS:
            out = inq.vpd_block_limits(self.limits)
        elif page == inq.VpdPage.BLOCK_CHARACTERISTICS:
            out = inq.vpd_block_characteristics()
        elif page == inq.VpdPage.LOGICAL_BLOCK_PROVISIONING:
            out = inq.vpd_lbp(lbprz=True)
        else:
            raise invalid_cdb(2)
        return Result(_GOOD, out[: c.alloc])

    def _report_luns(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """REPORT LUNS, SPC-5 6.33; clears 3F/0E for this nexus."""
        c = ReportLunsCdb.decode(cdb)
        if c.select not in (0x00, 0x01, 0x02):
            raise invalid_cdb(2)
        if c.alloc < 16:
            raise invalid_cdb(6)
        luns = sorted(set(self.report_luns())) if c.select != 0x01 else []
        body = b"".join(_lun_entry(n) for n in luns)
        self.ua.discard(nexus, Sense.REPORTED_LUNS_DATA_HAS_CHANGED)
        return Result(_GOOD, (struct.pack(">I4x", len(body)) + body)[: c.alloc])

    def _request_sense(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """REQUEST SENSE, SPC-5 6.39: a pending UA is returned (and cleared)."""
        c = RequestSenseCdb.decode(cdb)
        sense = self.ua.pop(nexus) or Sense.NO_SENSE
        return Result(_GOOD, encode_sense(sense, c.desc)[: c.alloc])

    def _read_capacity10(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        c = ReadCapacity10Cdb.decode(cdb)
        if not c.pmi and c.lba:
            raise invalid_cdb(2)  # SBC-4 5.19: LBA must be 0 when PMI is 0
        last = min(self.blocks - 1, 0xFFFFFFFF)
        return Result(_GOOD, struct.pack(">II", last, self.block_size))

    def read_capacity16(self) -> bytes:
        """READ CAPACITY(16) data, SBC-4 5.20.2: LBPME | LBPRZ, 1 block per physical block."""
        b = bytearray(32)
        struct.pack_into(">QI", b, 0, self.blocks - 1, self.block_size)
        b[14] = 0x80 | 0x40  # LBPME, LBPRZ
        return bytes(b)

    def _service_action_in16(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        c = ServiceAction16Cdb.decode(cdb)
        if c.action == ServiceActionIn16.READ_CAPACITY_16:
            return Result(_GOOD, self.read_capacity16()[: c.alloc])
        if c.action == ServiceActionIn16.GET_LBA_STATUS:
            return Result(_GOOD, self._get_lba_status(c.lba, c.alloc)[: c.alloc])
        raise invalid_cdb(1, 4)

    # ------------------------------------------------------------ mode
    def _mode_sense(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """MODE SENSE(6/10), SPC-5 6.14/6.15."""
        c = ModeSenseCdb.decode(cdb)
        if c.pc == PageControl.SAVED:
            raise CheckCondition(Sense.SAVING_PARAMETERS_NOT_SUPPORTED)
        if c.subpage not in (0x00, 0xFF):
            raise invalid_cdb(3)
        pages = self.modes.pages(c.page, c.pc)
        if pages is None or (c.subpage == 0xFF and c.page != 0x3F):
            raise invalid_cdb(2, 5)
        bs = self.block_size
        if c.dbd:
            bd = b""
        elif c.llbaa:
            bd = struct.pack(">Q4xI", self.blocks, bs)
        else:
            bd = struct.pack(">IB", min(self.blocks, 0xFFFFFFFF), 0) + bs.to_bytes(3, "big")
        dsp = (0x80 if self.modes.swp else 0) | 0x10  # WP, DPOFUA (SBC-4 6.5.1)
        if c.ten:
            body = bd + pages
            hdr = struct.pack(">HBBBxH", 6 + len(body), 0, dsp, 1 if len(bd) == 16 else 0, len(bd))
        else:
            body = bd + pages
            hdr = bytes((min(3 + len(body), 255), 0, dsp, len(bd)))
        return Result(_GOOD, (hdr + body)[: c.alloc])

    def _mode_select(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """MODE SELECT(6/10), SPC-5 6.12/6.13. Saving is not supported."""
        c = ModeSelectCdb.decode(cdb)
        if c.sp:
            raise invalid_cdb(1, 0)
        if c.length == 0:
            return Result()
        if not c.pf:
            raise invalid_cdb(1, 4)
        hlen = 8 if c.ten else 4
        if c.length < hlen or len(data) < c.length:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        buf = memoryview(data)[: c.length]
        bdl = struct.unpack_from(">H", buf, 6)[0] if c.ten else buf[3]
        if hlen + bdl > c.length:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        if bdl not in (0, 8, 16):
            raise invalid_param(6 if c.ten else 3)
        if bdl:
            blen = int.from_bytes(buf[hlen + bdl - 3 : hlen + bdl], "big")
            if blen not in (0, self.block_size):
                raise invalid_param(hlen + bdl - 3)
        if self.modes.select(buf, hlen + bdl):
            # SPC-5 6.12: other nexuses learn of changed shared parameters.
            self.ua.establish_all(Sense.MODE_PARAMETERS_CHANGED, except_nexus=nexus)
        return Result()

    # -------------------------------------------------- misc SBC commands
    def _start_stop_unit(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """START STOP UNIT, SBC-4 5.25: the medium is not removable, so LOEJ is
        invalid; power conditions and START are accepted and the LU stays ready."""
        c = StartStopCdb.decode(cdb)
        if c.loej:
            raise invalid_cdb(4, 1)
        return Result()

    def _prevent_allow(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """PREVENT ALLOW MEDIUM REMOVAL, SBC-4 5.13: nothing to lock (RMB = 0)."""
        if cdb[4] & 0x03 > 1:
            raise invalid_cdb(4, 1)
        return Result()

    def _read_defect_data(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        """READ DEFECT DATA(10/12), SBC-4 5.17/5.18: an empty list."""
        c = ReadDefectCdb.decode(cdb)
        flags = (0x10 if c.plist else 0) | (0x08 if c.glist else 0) | c.fmt
        out = bytes((0, flags, 0, 0, 0, 0, 0, 0)) if c.twelve else bytes((0, flags, 0, 0))
        return Result(_GOOD, out[: c.alloc])

    # ------------------------------------------------------ reservations
    def _reserve(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        self.pr.reserve(nexus, cdb)
        return Result()

    def _release(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        self.pr.release(nexus, cdb)
        return Result()

    def _pr_in(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        return Result(_GOOD, self.pr.persistent_reserve_in(nexus, cdb))

    def _pr_out(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        length = _U32.unpack_from(cdb, 5)[0]
        if len(data) < length:
            raise CheckCondition(Sense.PARAMETER_LIST_LENGTH_ERROR)
        self.pr.persistent_reserve_out(nexus, cdb, memoryview(data)[:length])
        return Result()

    # ------------------------------ REPORT SUPPORTED OPERATION CODES / TMFs
    def _maintenance_in(self, nexus: Nexus, cdb: bytes, data: bytes | memoryview) -> Result:
        sa = cdb[1] & 0x1F
        if sa == MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS:
            t = ReportTmfsCdb.decode(cdb)
            if t.alloc < 4:
                raise invalid_cdb(6)
            return Result(_GOOD, SUPPORTED_TMFS.encode(t.repd)[: t.alloc])
        if sa == MaintenanceIn.REPORT_TARGET_PORT_GROUPS:
            return self._report_target_port_groups(cdb)
        if sa != MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES:
            raise invalid_cdb(1, 4)
        c = ReportOpcodesCdb.decode(cdb)
        return Result(_GOOD, report_supported_opcodes(c)[: c.alloc])

    def _report_target_port_groups(self, cdb: bytes) -> Result:
        """REPORT TARGET PORT GROUPS (SPC-5 6.36): one group per target port,
        numbered like it, every one active/optimized (implicit ALUA: the
        state never changes, all paths are equal)."""
        c = tpg.ReportTpgCdb.decode(cdb)
        groups = [tpg.TargetPortGroup(port, (port,)) for port in sorted(self.target_ports())]
        return Result(_GOOD, tpg.encode_report(groups, c.fmt)[: c.alloc])
