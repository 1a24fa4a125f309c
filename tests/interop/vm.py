"""Real VMs for the interop tests and the VM benchmark.

- ``guest_image()``: the small Linux guest of ``scripts/build-guest.sh``
  (built when its cache is missing or its recipe changed);
- ``Guest``: Debian's ``qemu-system-x86_64`` under TCG booting that guest;
  its serial console is QEMU's stdin/stdout, on which the guest prints
  ``PRM key=value ...`` lines and takes the test program's commands
  (``mark``, ``fence``, ``quit``: scripts/guest/prm-io.c);
- ``netns()``: a network namespace with a bridge and a tap for a guest that
  needs a network (open-iscsi inside the VM). The calling thread enters it,
  so every socket it creates and every process it starts is inside; it is
  left and deleted at the end. Nothing is routed outside it.

Every process is bounded in time and stopped at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .migration_cluster import FRONTEND, HOSTS, INITIATORS, SECRET, Proc, ProcCluster, free_port

ROOT = Path(__file__).resolve().parents[2]
BUILD_GUEST = ROOT / "scripts" / "build-guest.sh"
GUEST_IQN = "iqn.2026-11.org.prmigrate:vmguest1"
GUEST_KEY = 0x6775657374310001
BOOT_TIMEOUT = 90.0  # TCG on a loaded 2-core machine: the boot takes 3-10 s
# The open-iscsi guest's QEMU runs ahead of the host's other processes. Its
# TCP handshakes are emulated (TCG), and iscsid polls a new connection's
# connect for 1 ms and, when it is not done by then, looks again only at its
# next 1 s alarm. A handshake held up while other work takes both cores
# meets that alarm: beside two CPU-bound processes 1 connection in 13 at
# nice 0, 1 in 74 at this value; with nothing else running, 1 in 450-900 at
# either (bench_vm.py --tap-only, README "VM moves"). Under KVM a handshake
# takes microseconds.
OPEN_ISCSI_NICE = -10
# A Connect.login_wait this long or longer is iscsid's 1 s alarm (its other
# waits are milliseconds).
ISCSID_ALARM_S = 0.9


def guest_image() -> Path:
    """The cache directory holding ``vmlinuz`` and ``initrd.img`` (the build
    downloads Debian packages: call it outside a network namespace)."""
    p = subprocess.run(["bash", str(BUILD_GUEST)], capture_output=True, text=True, timeout=900, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"scripts/build-guest.sh failed ({p.returncode}):\n{p.stderr[-4000:]}")
    cache = Path(p.stdout.strip().splitlines()[-1])
    assert (cache / "vmlinuz").is_file() and (cache / "initrd.img").is_file(), cache
    return cache


_KV = re.compile(r"(\w+)=(\S+)")


def parse_prm(line: str) -> tuple[str, dict[str, str]]:
    """``PRM what k=v k=v`` -> (what, {k: v})."""
    rest = line.split("PRM ", 1)[1]
    what = rest.split(" ", 1)[0]
    return what, dict(_KV.findall(rest))


@dataclass
class Guest:
    """One QEMU VM booting the test guest; ``qemu_args`` adds its disk or NIC."""

    image: Path  # guest_image(): called before entering a network namespace
    workdir: Path
    name: str
    append: dict[str, str]
    qemu_args: list[str]
    memory: str = "256"
    time_limit: float = 900.0  # QEMU is killed after this long whatever happens to us
    nice: int = 0  # QEMU's nice value (below 0: ahead of the host's other processes)
    proc: subprocess.Popen[bytes] | None = None
    connects: ConnectWatch | None = None  # its TCP connections, when it has a network
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _seen: int = 0
    # per mark: (our time at its middle, guest clock - ours, round trip), seconds
    _marks: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.console"

    def start(self) -> Guest:
        cache = self.image
        append = "console=ttyS0 panic=-1 loglevel=4 " + " ".join(f"prm.{k}={v}" for k, v in self.append.items())
        args = [*(["nice", "-n", str(self.nice)] if self.nice else []),
                "timeout", "-k", "5", str(int(self.time_limit)), "qemu-system-x86_64", "-accel", "tcg", "-m", self.memory, "-nographic", "-no-reboot",
                "-kernel", str(cache / "vmlinuz"), "-initrd", str(cache / "initrd.img"),
                "-append", append, *self.qemu_args]
        (self.workdir / f"{self.name}.cmdline").write_text(" ".join(args) + "\n")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "wb") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip("\r\n")
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()

    def wait(self, what: str, timeout: float = 30.0) -> dict[str, str]:
        """The next ``PRM what ...`` line after the last one returned; a
        ``PRM halt`` line or QEMU's exit first is an error."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._seen < len(self.lines):
                    line = self.lines[self._seen]
                    self._seen += 1
                    if "PRM " not in line:
                        continue
                    kind, kv = parse_prm(line)
                    if kind == what:
                        return kv
                    if kind in ("halt", "fatal") and what != kind:
                        raise AssertionError(f"guest {self.name} stopped: {line}\n{self.console_tail()}")
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"QEMU exited ({self.proc.returncode}) before 'PRM {what}'\n"
                                         f"{self.console_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no 'PRM {what}' from {self.name} in {timeout} s\n{self.console_tail()}")
                self._cond.wait(min(left, 0.5))

    def lines_of(self, what: str) -> list[dict[str, str]]:
        with self._cond:
            return [parse_prm(ln)[1] for ln in self.lines if "PRM " in ln and parse_prm(ln)[0] == what]

    def console_tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def send(self, command: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def mark(self, timeout: float = 30.0) -> dict[str, int]:
        """Counters of the window since the previous mark (and start a new
        one). Each mark also maps the guest's clock to ours: the guest's
        ``now_us`` against the middle of our send and receive."""
        h0 = time.monotonic()
        self.send("mark")
        kv = {k: int(v) for k, v in self.wait("window", timeout).items()}
        h1 = time.monotonic()
        self._marks.append(((h0 + h1) / 2, kv["now_us"] / 1e6 - (h0 + h1) / 2, h1 - h0))
        return kv

    def _mapping(self, at: float) -> tuple[float, float]:
        """(offset, uncertainty) of the guest clock near our time ``at``: from
        the last marks before it, the one with the shortest round trip (the
        guest's TCG clock may run at a slightly different rate, so a mapping
        from long ago would drift)."""
        before = [m for m in self._marks if m[0] <= at] or self._marks[:1]
        assert before, "mark() first"
        mid, offset, rt = min(before[-3:], key=lambda m: m[2])
        return offset, max(rt, 0.02) + 0.01 * max(0.0, at - mid)

    def stalls(self) -> list[tuple[float, float, float | None]]:
        """Every gap of 20 ms or more between two I/O completions in the
        guest so far: (its start on the guest's clock, its length, the
        latency of the first command after it), seconds."""
        out: list[tuple[float, float, float | None]] = []
        with self._cond:
            prm = [parse_prm(ln) for ln in self.lines if "PRM " in ln]
        for what, kv in prm:
            if what == "stall":
                gap = int(kv["gap_us"]) / 1e6
                out.append((int(kv["at_us"]) / 1e6 - gap, gap, None))
            elif what == "after" and out and out[-1][2] is None:
                out[-1] = (out[-1][0], out[-1][1], int(kv["lat_us"]) / 1e6)
        return out

    def stall_during(self, start: float, end: float) -> tuple[float, float | None]:
        """The longest gap that began between ``start`` and ``end`` (our
        clock, widened by the clock mapping's uncertainty) -- the stall a
        move run in that interval caused -- and the latency of the command
        after it; (0.0, None) when no gap reached 20 ms."""
        offset, slack = self._mapping(start)
        lo, hi = start + offset - slack, end + offset + slack
        found = [(g, a) for t, g, a in self.stalls() if lo <= t <= hi]
        return max(found, key=lambda x: x[0], default=(0.0, None))


    def kill(self) -> None:
        """End QEMU now (a VM paused after its migration answers nothing)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.send("quit")
            self.proc.wait(15)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Qmp:
    """A minimal QMP client on QEMU's ``-qmp unix:PATH,server=on,wait=off``."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.reader = self.sock.makefile("r")
        json.loads(self.reader.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        msg: dict[str, object] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = json.loads(self.reader.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            # an event: skip

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


# ------------------------------------------------------------ network namespace

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Net:
    """A private network for guests: bridge ``br0`` with the host daemons'
    addresses, one tap per guest."""

    name: str
    prefix: str  # "10.77.0"
    taps: tuple[str, ...]

    def addr(self, n: int) -> str:
        return f"{self.prefix}.{n}"


def _remove_stale_namespaces() -> None:
    """Namespaces of ours left by a process that was killed (prmvm-PID-...)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir("/run/netns"):
            m = re.fullmatch(r"prmvm-(\d+)-\d+", entry)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                subprocess.run(["ip", "netns", "del", entry], capture_output=True, timeout=10, check=False)


@contextlib.contextmanager
def netns(taps: int = 1, prefix: str = "10.77.0", host_ids: tuple[int, ...] = (1, 2, 3)) -> Iterator[Net]:
    """A fresh network namespace (lo up; br0 with PREFIX.1, .2, .3/24; taps
    tap0.. on br0), entered by the calling thread for the duration."""
    _remove_stale_namespaces()
    name = f"prmvm-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    _ip("netns", "add", name)
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    entered = False
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "br0", "type", "bridge")
        for h in host_ids:
            _ip("-n", name, "addr", "add", f"{prefix}.{h}/24", "dev", "br0")
        _ip("-n", name, "link", "set", "br0", "up")
        tap_names = tuple(f"tap{i}" for i in range(taps))
        for t in tap_names:
            _ip("-n", name, "tuntap", "add", "dev", t, "mode", "tap")
            _ip("-n", name, "link", "set", t, "master", "br0", "up")
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(fd)
            entered = True
        finally:
            os.close(fd)
        yield Net(name, prefix, tap_names)
    finally:
        if entered:
            _setns(orig)
        os.close(orig)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)


@dataclass
class Connect:
    """One TCP connection the guest opened (our monotonic clock, seconds):
    its SYN, the end of its handshake (the guest's first ACK) and its first
    data (open-iscsi: iscsid's Login Request)."""

    to: str  # "ADDR:PORT"
    syn: float
    answered: float | None = None  # the host's SYN-ACK, as it went into the tap
    established: float | None = None
    first_data: float | None = None

    @property
    def login_wait(self) -> float | None:
        """How long the guest sat on an established connection before it
        sent anything: iscsid polls a new connection's TCP connect for 1 ms
        and, when the handshake took longer, looks again only at its next
        1 s alarm, so this is about 1 s exactly when it waited for it."""
        if self.established is None or self.first_data is None:
            return None
        return self.first_data - self.established


class ConnectWatch:
    """The TCP connections a guest opens, seen on its tap (an AF_PACKET
    socket, so it must be made inside the guest's network namespace): the
    guest's SYN, the host's SYN-ACK, the guest's first ACK and its first
    frame carrying data."""

    def __init__(self, ifname: str, guest_ip: str) -> None:
        self._ip = socket.inet_aton(guest_ip)
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.bind((ifname, 0))
        self._sock.settimeout(0.2)
        self._open: dict[tuple[bytes, int, int], Connect] = {}
        self.connects: list[Connect] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                frame = self._sock.recv(96)
            except TimeoutError:
                continue
            except OSError:
                return
            self._frame(time.monotonic(), frame)

    def _frame(self, t: float, f: bytes) -> None:
        # Ethernet II, IPv4 (RFC 791), TCP (RFC 9293): the guest's frames and the SYN-ACKs to it
        if len(f) < 54 or f[12:14] != b"\x08\x00" or f[23] != 6:
            return
        ihl = (f[14] & 0x0F) * 4
        tcp = 14 + ihl
        if len(f) < tcp + 14:
            return
        sport, dport = struct.unpack_from("!HH", f, tcp)
        flags = f[tcp + 13]
        if f[30:34] == self._ip:  # to the guest: only a SYN-ACK matters
            if flags & 0x12 == 0x12:
                with self._lock:
                    c = self._open.get((f[26:30], sport, dport))
                    if c is not None and c.answered is None:
                        c.answered = t
            return
        if f[26:30] != self._ip:
            return
        payload = struct.unpack_from("!H", f, 16)[0] - ihl - (f[tcp + 12] >> 4) * 4
        key = (f[30:34], dport, sport)
        with self._lock:
            if flags & 0x12 == 0x02:  # SYN
                c = Connect(f"{socket.inet_ntoa(f[30:34])}:{dport}", t)
                self._open[key] = c
                self.connects.append(c)
                return
            c = self._open.get(key)
            if c is None:
                return
            if c.established is None and flags & 0x10:
                c.established = t
            if payload > 0:
                c.first_data = t
                del self._open[key]

    def between(self, start: float, end: float) -> list[Connect]:
        """The connections whose SYN went out between ``start`` and ``end``."""
        with self._lock:
            return [c for c in self.connects if start <= c.syn <= end]

    def login_waits(self, start: float, end: float) -> list[float]:
        """The ``login_wait`` of each connection opened between ``start``
        and ``end`` that got that far (its longest is the one to mark, their
        sum what the guest itself spent of a move)."""
        return [w for c in self.between(start, end) if (w := c.login_wait) is not None]

    def stop(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close()


# ------------------------------------------------------------ the cluster

@dataclass
class VmCluster(ProcCluster):
    """ProcCluster whose host daemons listen on chosen addresses (a guest
    in a network namespace reaches them on the bridge)."""

    addresses: dict[str, str] = field(default_factory=lambda: dict(HOSTS))

    def _start_host(self, name: str, with_device: bool) -> Proc:
        addr = self.addresses[name]
        port, mport = free_port(addr), free_port(addr)
        control = self.workdir / f"{name}.sock"
        secret = self.workdir / f"{name}.secret"
        secret.write_text(self.secrets.get(name, SECRET) + "\n")
        verbose = ["-v", "-v"] if os.environ.get("PRMIGRATE_TEST_DEBUG") else []
        args = [sys.executable, "-m", "prmigrate.cli", *verbose, "host", "--name", name,
                "--initiator", INITIATORS[name], "--listen", f"{addr}:{port}",
                "--control", str(control), "--state-dir", str(self.workdir / f"{name}-state"),
                "--migrate-listen", f"{addr}:{mport}", "--secret-file", str(secret)]
        if with_device:
            args += ["--device", self.device_spec()]
        return self._launch_host(name, args, addr, port, control, mport)


def frontend_portal(c: ProcCluster, name: str) -> str:
    p = c.procs[name]
    return f"{p.host}:{p.port}"


@contextlib.contextmanager
def open_iscsi_guest(image: Path, workdir: Path,
                     nice: int = OPEN_ISCSI_NICE) -> Iterator[tuple[ProcCluster, Guest]]:
    """Hosts A and B in a network namespace and a started open-iscsi guest
    logged in to A's frontend over a tap (stopped again at the end); its
    QEMU at ``nice``."""
    with netns(taps=1) as net:
        c = VmCluster(workdir, addresses={"hosta": net.addr(2), "hostb": net.addr(3)})
        c.start()
        g = Guest(image, workdir, "open-iscsi", {
            "mode": "openiscsi", "ip": f"{net.addr(10)}/24", "portal": frontend_portal(c, "hosta"),
            "target": FRONTEND, "iqn": GUEST_IQN, "key": hex(GUEST_KEY), "neighbours": f"{net.addr(2)},{net.addr(3)}"},
            ["-netdev", f"tap,id=n0,ifname={net.taps[0]},script=no,downscript=no",
             "-device", "virtio-net-pci,netdev=n0,romfile=", "-nic", "none"], nice=nice)
        g.connects = ConnectWatch(net.taps[0], net.addr(10))
        try:
            yield c, g.start()
        finally:
            g.stop()
            g.connects.stop()
            c.stop()
