"""The VM demo's virtual machine: Debian's ``qemu-system-x86_64`` under TCG
booting the small guest of ``scripts/build-guest.sh``, its disk a frontend
LUN through virtio-scsi + ``scsi-block`` over ``iscsi://``, and a QMP
client for QEMU's own live migration.

The guest program (``scripts/guest/prm-io.c``) runs fence_scsi's unfence
(REGISTER AND IGNORE EXISTING KEY, RESERVE type 5) with sg_persist, then
writes O_DIRECT blocks and reads each back; it prints ``PRM what k=v ...``
lines on the serial console (QEMU's stdout) and takes commands there
(``mark``: the counters since the previous mark; ``pause``; ``fence``: one
write, its status; ``quit``). The console follows the VM: after a
migration the destination QEMU's stdout carries it.

Every QEMU runs under ``timeout`` (killed after ``time_limit`` whatever
happens to the demo) and is killed by ``kill()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

BOOT_TIMEOUT = 120.0  # TCG on a loaded 2-core machine: the boot takes 3-20 s
_KV = re.compile(r"(\w+)=(\S+)")


class VmError(Exception):
    """A VM or its QMP did not do what the demo needs (the message says what)."""


def build_script() -> Path | None:
    """``scripts/build-guest.sh`` of this source tree, or $PRMIGRATE_BUILD_GUEST."""
    env = os.environ.get("PRMIGRATE_BUILD_GUEST")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[3] / "scripts" / "build-guest.sh"
    return here if here.is_file() else None


async def guest_image(timeout: float = 1200.0) -> Path:
    """The cache directory with ``vmlinuz`` and ``initrd.img``; the script
    installs QEMU and builds the guest from Debian packages when missing
    (a minute or two), else answers at once."""
    script = build_script()
    if script is None:
        raise VmError("the VM demo builds its guest with scripts/build-guest.sh of a prmigrate source "
                      "tree (or $PRMIGRATE_BUILD_GUEST): not found next to this installation")
    proc = await asyncio.create_subprocess_exec("bash", str(script), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise VmError(f"{script} took longer than {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise VmError(f"{script} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    cache = Path(out.decode().strip().splitlines()[-1])
    if not (cache / "vmlinuz").is_file() or not (cache / "initrd.img").is_file():
        raise VmError(f"{script}: no guest in {cache}")
    if shutil.which("qemu-system-x86_64") is None:
        raise VmError("qemu-system-x86_64 not found after scripts/build-guest.sh")
    return cache


def parse_prm(line: str) -> tuple[str, dict[str, str]] | None:
    """``PRM what k=v k=v`` -> (what, {k: v}); None for any other line."""
    if "PRM " not in line:
        return None
    rest = line.split("PRM ", 1)[1]
    return rest.split(" ", 1)[0], dict(_KV.findall(rest))


class Qmp:
    """A QMP client on QEMU's ``-qmp unix:PATH,server=on,wait=off``: one
    command at a time, events skipped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path, timeout: float = 30.0) -> Qmp:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path))
                break
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise VmError(f"QMP {path} does not answer") from None
                await asyncio.sleep(0.1)
        q = cls(reader, writer)
        await asyncio.wait_for(reader.readline(), timeout)  # the greeting
        await q.execute("qmp_capabilities")
        return q

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise VmError(f"QMP {command}: QEMU closed its monitor")
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise VmError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class Qemu:
    """One QEMU of the VM (the first boots it; the others wait with ``-incoming``)."""

    def __init__(self, image: Path, workdir: Path, name: str, url: str, *, initiator: str, key: int,
                 incoming: Path | None = None, time_limit: float = 900.0) -> None:
        self.name, self.workdir = name, workdir
        self.qmp_path = workdir / f"{name}.qmp"
        append = f"console=ttyS0 panic=-1 loglevel=4 prm.mode=libiscsi prm.key={key:#x}"
        self.argv = ["timeout", "-k", "5", str(int(time_limit)), "qemu-system-x86_64", "-accel", "tcg",
                     "-m", "256", "-nographic", "-no-reboot", "-kernel", str(image / "vmlinuz"),
                     "-initrd", str(image / "initrd.img"), "-append", append,
                     "-device", "virtio-scsi-pci",
                     "-drive", f"file={url},if=none,id=d0,format=raw,cache=none",
                     "-device", "scsi-block,drive=d0", "-iscsi", f"initiator-name={initiator}",
                     "-nic", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming is not None:
            self.argv += ["-incoming", f"unix:{incoming}"]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._seen = 0
        self._new = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._qmp: Qmp | None = None

    @property
    def console_path(self) -> Path:
        return self.workdir / f"{self.name}.console"

    async def start(self) -> Qemu:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.console_path, "wb") as log:
            while raw := await self.proc.stdout.readline():
                log.write(raw)
                log.flush()
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._new.set()
        self._new.set()

    async def qmp(self) -> Qmp:
        if self._qmp is None:
            self._qmp = await Qmp.connect(self.qmp_path)
        return self._qmp

    async def wait(self, what: str, timeout: float = 30.0) -> dict[str, str]:
        """The next ``PRM what`` line; ``PRM halt``/``fatal`` or QEMU's exit first is an error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while self._seen < len(self.lines):
                parsed = parse_prm(self.lines[self._seen])
                self._seen += 1
                if parsed is None:
                    continue
                if parsed[0] == what:
                    return parsed[1]
                if parsed[0] in ("halt", "fatal"):
                    raise VmError(f"the guest in {self.name} stopped: {self.lines[self._seen - 1]}")
            if self.proc is not None and self.proc.returncode is not None:
                raise VmError(f"{self.name} exited ({self.proc.returncode}) before 'PRM {what}'")
            left = deadline - loop.time()
            if left <= 0:
                raise VmError(f"no 'PRM {what}' from {self.name} in {timeout:.0f} s")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), min(left, 0.5))

    def send(self, command: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")

    async def mark(self) -> dict[str, int]:
        self.send("mark")
        return {k: int(v) for k, v in (await self.wait("window")).items()}

    def lines_of(self, what: str) -> list[dict[str, str]]:
        return [p[1] for p in map(parse_prm, self.lines) if p is not None and p[0] == what]

    async def status(self) -> str:
        return str((await (await self.qmp()).execute("query-status"))["status"])

    async def migration(self) -> dict[str, Any]:
        return dict(await (await self.qmp()).execute("query-migrate"))

    async def wait_migration(self, wanted: set[str], timeout: float = 120.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            m = await self.migration()
            if m.get("status") in wanted:
                return m
            if m.get("status") not in ("setup", "active", "device", "pre-switchover", "cancelling"):
                raise VmError(f"{self.name}: migration {m.get('status')}: {m.get('error-desc', '')}")
            if loop.time() > deadline:
                raise VmError(f"{self.name}: migration still {m.get('status')} after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def exited(self, timeout: float) -> bool:
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def kill(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        if self.proc is not None and self.proc.returncode is None:
            # SIGTERM: ``timeout`` passes it on to QEMU (a SIGKILL would end only ``timeout``)
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
