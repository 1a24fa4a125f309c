"""Plain counters kept by the data path, exported by ``metrics.py`` at scrape time.

Nothing here takes a lock, calls a library or reads a clock: the iSCSI
connection (``iscsi/session.py``) adds integers to a ``LuCounters`` of the
logical unit a command is for, and a Prometheus collector reads them when it
is scraped (on the event loop's thread, see ``metrics.py``). A counter only
grows while the process lives, as Prometheus expects.

Latency histograms are fixed bucket arrays: bucket ``i`` counts the commands
answered in less than ``2**i`` microseconds (``LATENCY_BOUNDS_US``), the last
one everything slower. The bucket of a latency is the bit length of its
microseconds (``latency_bucket``), one integer operation.
"""

from __future__ import annotations

from .scsi.constants import Status as _Status
from .scsi.sense import unit_attention_of

READ, WRITE, OTHER = 0, 1, 2
KINDS = ("read", "write", "other")

# READ(6/10/12/16) and the commands that write the medium with data from the
# initiator (WRITE, WRITE AND VERIFY, WRITE ATOMIC(16)); everything else
# (PR, INQUIRY, SYNCHRONIZE CACHE, UNMAP, WRITE SAME, ...) is "other".
_READ_OPS = (0x08, 0x28, 0xA8, 0x88)
_WRITE_OPS = (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x9C)
KIND_OF = bytes(READ if op in _READ_OPS else WRITE if op in _WRITE_OPS else OTHER for op in range(256))

LATENCY_BOUNDS_US = tuple(1 << i for i in range(22))  # 1 us .. 2.1 s, then +Inf
N_BUCKETS = len(LATENCY_BOUNDS_US) + 1
_LAST = N_BUCKETS - 1

PR_OUT = 0x5F
_CONFLICT = int(_Status.RESERVATION_CONFLICT)
_CHECK = int(_Status.CHECK_CONDITION)


def latency_bucket(ns: int) -> int:
    """Index of the bucket for a latency of ``ns`` nanoseconds."""
    b = (ns // 1000).bit_length()
    return b if b < _LAST else _LAST


class LuCounters:
    """What the target did for one logical unit (all its connections)."""

    __slots__ = ("commands", "bytes", "latency", "latency_ns", "statuses", "conflicts",
                 "unit_attentions", "pr_out", "batch", "in_batch")

    def __init__(self) -> None:
        self.commands = [0, 0, 0]  # by kind (READ, WRITE, OTHER)
        self.bytes = [0, 0, 0]  # bytes the commands asked to move (their EDTL)
        # every answer goes into one latency bucket: their sum is the number
        # of answers, and GOOD ones are that minus the other statuses
        self.latency = [[0] * N_BUCKETS for _ in KINDS]
        self.latency_ns = [0, 0, 0]  # sum of the latencies, for the histogram's _sum
        self.statuses: dict[int, int] = {}  # SCSI status other than GOOD -> answers
        self.conflicts = 0  # RESERVATION CONFLICT answers
        self.unit_attentions = 0  # CHECK CONDITION with sense key UNIT ATTENTION
        self.pr_out: dict[tuple[int, int], int] = {}  # (service action, status) -> answers
        # answers of the connection's current read event, by kind: their
        # latency is taken once (close_batch) when its answers are written
        self.batch = [0, 0, 0]
        self.in_batch = False

    def latencies(self, kind: int, n: int, ns: int) -> None:
        """``n`` commands of ``kind`` answered ``ns`` after they came."""
        self.latency[kind][latency_bucket(ns)] += n
        self.latency_ns[kind] += n * ns

    def close_batch(self, ns: int) -> None:
        """The answers counted in ``batch`` were written ``ns`` after their read event."""
        b = (ns // 1000).bit_length()
        if b > _LAST:
            b = _LAST
        batch = self.batch
        r, w, o = batch
        if r:
            self.latency[0][b] += r
            self.latency_ns[0] += r * ns
        if w:
            self.latency[1][b] += w
            self.latency_ns[1] += w * ns
        if o:
            self.latency[2][b] += o
            self.latency_ns[2] += o * ns
        batch[0] = batch[1] = batch[2] = 0
        self.in_batch = False

    def answered(self, status: int, sense: bytes | bytearray | memoryview | None, pr_action: int) -> None:
        """An answer's status (``pr_action`` >= 0: the service action of a PR
        OUT); GOOD answers other than PR OUT need no call."""
        if status:
            st = self.statuses
            st[status] = st.get(status, 0) + 1
        if status == _CONFLICT:
            self.conflicts += 1
        elif status == _CHECK and sense and unit_attention_of(sense) is not None:
            self.unit_attentions += 1
        if pr_action >= 0:
            key = (pr_action, status)
            self.pr_out[key] = self.pr_out.get(key, 0) + 1

    def answers(self) -> int:
        return sum(sum(buckets) for buckets in self.latency)

    def good(self) -> int:
        """GOOD answers: every answer but those with another status."""
        return self.answers() - sum(self.statuses.values())


def pr_action_of(cdb: bytes | bytearray | memoryview) -> int:
    """The service action of a PERSISTENT RESERVE OUT CDB, else -1."""
    return cdb[1] & 0x1F if len(cdb) > 1 and cdb[0] == PR_OUT else -1
