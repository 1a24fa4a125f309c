"""Mutual x509 TLS on the migration channel, with real processes.

The certificates are made here with the ``openssl`` command line (a CA, and
per host a server and a client certificate, in directories laid out like
QEMU's ``tls-creds-x509``). The source's daemon reaches the destination
through a TCP proxy owned by the test that records every byte: with TLS the
recording holds no form of the guest's reservation key (big-endian bytes,
decimal as the state stream's JSON carries it, hexadecimal), without TLS
the same recording does (so the search can find it). A destination whose
certificate another CA signed, and a source whose client certificate
another CA signed, and a source whose client certificate is in the
destination's ``ca-crl.pem``, are refused: ``prmigrate migrate`` exits non-zero naming
TLS and the certificate, the destination records ``MIGRATION_REFUSED`` with
the reason, and the guest keeps its reservation on the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prmigrate.scsi.constants import PrOutAction, PrType
from prmigrate.scsi.pr import pr_out_params

from .migration_cluster import GUEST, ProcCluster
from .test_migration_e2e import guest_session

pytestmark = pytest.mark.interop

KEY = 0x5A17C0DE9E57B00C


def _need_openssl() -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line is missing (Debian package openssl)")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    key, cert = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return cert, key


def make_leaf(d: Path, ca: tuple[Path, Path], stem: str, cn: str) -> None:
    """``<stem>-cert.pem`` and ``<stem>-key.pem`` in ``d``, signed by ``ca``."""
    d.mkdir(parents=True, exist_ok=True)
    ext = d / f"{stem}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{stem}-key.pem", "-out", f"{stem}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-set_serial", str(abs(hash((d, stem))) % (1 << 60) + 1), "-days", "2",
             "-extfile", str(ext), "-out", f"{stem}-cert.pem", cwd=d)
    ext.unlink()
    (d / f"{stem}.csr").unlink()


def tls_dir(d: Path, trust: tuple[Path, Path], host: str, server_ca: tuple[Path, Path] | None = None,
            client_ca: tuple[Path, Path] | None = None) -> Path:
    """A host's directory: trusts ``trust``; its certificates signed by it
    unless another CA is given."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(trust[0], d / "ca-cert.pem")
    make_leaf(d, server_ca or trust, "server", host)
    make_leaf(d, client_ca or trust, "client", host)
    return d


@contextlib.contextmanager
def tls_cluster(workdir: Path, host_args: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    c = ProcCluster(workdir, host_args=host_args)
    c.start()
    try:
        yield c
    except BaseException:
        print(c.dump_logs())
        raise
    finally:
        c.stop()


class RecordingProxy:
    """A TCP proxy that forwards both directions and keeps every byte."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.to_dst = bytearray()
        self.to_src = bytearray()
        self.server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _client(self, r_src: asyncio.StreamReader, w_src: asyncio.StreamWriter) -> None:
        try:
            r_dst, w_dst = await asyncio.open_connection(*self.target)
        except OSError:
            w_src.close()
            return
        await asyncio.gather(self._pipe(r_src, w_dst, self.to_dst), self._pipe(r_dst, w_src, self.to_src),
                             return_exceptions=True)

    @staticmethod
    async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while data := await r.read(65536):
                record += data
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def recorded(self) -> bytes:
        return bytes(self.to_dst) + bytes(self.to_src)


def key_forms(key: int) -> list[bytes]:
    """Every way the key could travel: SCSI's big-endian bytes, the state
    stream's decimal JSON integer, hexadecimal text."""
    return [key.to_bytes(8, "big"), str(key).encode(), f"{key:x}".encode(), f"{key:X}".encode()]


def _events(c: ProcCluster, host: str) -> list[dict[str, Any]]:
    path = c.workdir / f"{host}-state" / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _refusals(c: ProcCluster, host: str) -> list[str]:
    out = []
    for ev in _events(c, host):
        if ev.get("event") == "MIGRATION_REFUSED":
            data = ev.get("data", ev)
            out.append(str(data.get("reason", "")))
    return out


def _run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _reserve(c: ProcCluster) -> Any:
    s = await guest_session(c.frontend_url("hosta"))
    r = await s.pr_out(PrOutAction.REGISTER, 0, pr_out_params(0, KEY))
    assert r.good, r
    r = await s.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE, pr_out_params(KEY, 0))
    assert r.good, r
    return s


def revoke(ca: tuple[Path, Path], cert: Path, crl: Path) -> None:
    """Revoke ``cert`` and write the CA's CRL to ``crl`` (``openssl ca``)."""
    d = ca[0].parent / "ca-db"
    d.mkdir(exist_ok=True)
    (d / "index.txt").touch()
    if not (d / "crlnumber").exists():
        (d / "crlnumber").write_text("01\n")
    cnf = d / "ca.cnf"
    cnf.write_text(f"[ca]\ndefault_ca = d\n[d]\ndatabase = {d / 'index.txt'}\ncrlnumber = {d / 'crlnumber'}\n"
                   f"certificate = {ca[0]}\nprivate_key = {ca[1]}\ndefault_md = sha256\n"
                   "default_crl_days = 2\n")
    _openssl("ca", "-config", str(cnf), "-revoke", str(cert), cwd=d)
    _openssl("ca", "-config", str(cnf), "-gencrl", "-out", str(crl), cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _need_openssl()
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root / "ca", "prmigrate-test-ca")
    rogue = make_ca(root / "rogue", "someone-else-ca")
    revoked_a = tls_dir(root / "hosta-revoked", ca, "hosta")
    hostb_crl = tls_dir(root / "hostb-crl", ca, "hostb")
    revoke(ca, revoked_a / "client-cert.pem", hostb_crl / "ca-crl.pem")
    return {
        "hosta-revoked": revoked_a,
        "hostb-crl": hostb_crl,
        "hosta": tls_dir(root / "hosta", ca, "hosta"),
        "hostb": tls_dir(root / "hostb", ca, "hostb"),
        "hostb-rogue-server": tls_dir(root / "hostb-rogue", ca, "hostb", server_ca=rogue),
        "hosta-rogue-client": tls_dir(root / "hosta-rogue", ca, "hosta", client_ca=rogue),
    }


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_migration_over_tls_hides_the_key(tmp_path: Path, pki: dict[str, Any], tls: bool) -> None:
    host_args = ({"hosta": ["--migrate-tls-dir", str(pki["hosta"])],
                  "hostb": ["--migrate-tls-dir", str(pki["hostb"])]} if tls else {})
    with tls_cluster(tmp_path, host_args) as c:

        async def go() -> None:
            s = await _reserve(c)
            proxy = RecordingProxy(("127.0.0.3", c.procs["hostb"].migrate_port))
            to = await proxy.start()
            try:
                code, out = await c.migrate("hosta", "hostb", to=to)
            finally:
                await proxy.close()
            assert code == 0, out
            await c.wait_device("hostb", True)
            (b,) = await c.entries_of("hostb")
            assert b.key == KEY and b.holder and b.rtype == PrType.WRITE_EXCLUSIVE
            assert await c.entries_of("hosta") == []
            # the guest runs on B after the redirect
            r = await s.pr_out(PrOutAction.REGISTER, 0, pr_out_params(KEY, KEY))
            assert r.good, r
            await s.close()
            wire = proxy.recorded
            assert len(proxy.to_dst) > 200 and len(proxy.to_src) > 50, (len(proxy.to_dst), len(proxy.to_src))
            found = [f for f in key_forms(KEY) if f in wire]
            if tls:
                assert wire[:1] == b"\x16" and proxy.to_src[:1] == b"\x16", wire[:8]  # TLS handshake records
                assert found == [], f"the reservation key is readable on the wire: {found}"
                assert b"SETUP" not in wire and b"config" not in wire
                assert "mutual TLS" in c.procs["hosta"].log
            else:
                assert found, "no form of the key in the plain capture: the search would prove nothing"

        _run(go())


@pytest.mark.parametrize("who", ["destination", "source", "revoked"])
def test_untrusted_certificate_is_refused(tmp_path: Path, pki: dict[str, Any], who: str) -> None:
    if who == "destination":  # B's server certificate comes from another CA
        host_args = {"hosta": ["--migrate-tls-dir", str(pki["hosta"])],
                     "hostb": ["--migrate-tls-dir", str(pki["hostb-rogue-server"])]}
    elif who == "revoked":  # A's client certificate is in B's ca-crl.pem
        host_args = {"hosta": ["--migrate-tls-dir", str(pki["hosta-revoked"])],
                     "hostb": ["--migrate-tls-dir", str(pki["hostb-crl"])]}
    else:  # A's client certificate comes from another CA
        host_args = {"hosta": ["--migrate-tls-dir", str(pki["hosta-rogue-client"])],
                     "hostb": ["--migrate-tls-dir", str(pki["hostb"])]}
    with tls_cluster(tmp_path, host_args) as c:

        async def go() -> None:
            s = await _reserve(c)
            before = len(_refusals(c, "hostb"))
            code, out = await c.migrate("hosta", "hostb")
            assert code != 0, out
            assert "stays on the source" in out, out
            if who == "destination":
                assert "TLS: the peer's certificate is not trusted" in out, out
            else:
                assert re.search(r"TLS: (the peer refused our certificate|\S+ closed the connection before "
                                 r"answering \(it may not trust our certificate\))", out), out
            for _ in range(50):
                refusals = [r for r in _refusals(c, "hostb")[before:] if "certificate" in r]
                if refusals:
                    break
                await asyncio.sleep(0.1)
            # a TLS client closes without an alert when it does not trust
            # the server; a server refusing a client certificate sends one
            expected = ("TLS: the peer closed the connection during the handshake (it may not trust our "
                        "certificate" if who == "destination" else "TLS: the peer's certificate is not trusted")
            if who == "revoked":
                expected = "TLS: the peer's certificate is not trusted (certificate revoked)"
            assert any(expected in r for r in refusals), _refusals(c, "hostb")
            assert "refused: TLS" in c.procs["hostb"].log
            # nothing moved: the guest keeps its reservation on A and is served there
            devs = [d["name"] for d in await c.call("hostb", "query-devices")]
            assert devs == []
            (a,) = await c.entries_of("hosta")
            assert a.key == KEY and a.holder
            r = await s.pr_out(PrOutAction.REGISTER, 0, pr_out_params(KEY, KEY))
            assert r.good, r
            await s.close()

        _run(go())


def test_tls_dir_must_be_complete(tmp_path: Path, pki: dict[str, Any]) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(pki["hosta"] / "ca-cert.pem", partial / "ca-cert.pem")
    secret = tmp_path / "s.secret"
    secret.write_text("interop-cluster-secret-0123456789\n")
    from .migration_cluster import env

    p = subprocess.run(
        [sys.executable, "-m", "prmigrate.cli", "host", "--name", "hosta", "--listen", "127.0.0.2:1",
         "--secret-file", str(secret), "--migrate-tls-dir", str(partial), "--device",
         f"name=vm1,backend=iscsi://127.0.0.1:1/{GUEST}/0"],
        capture_output=True, text=True, timeout=60, env=env())
    assert p.returncode != 0
    assert "missing server-cert.pem, server-key.pem, client-cert.pem, client-key.pem" in p.stderr + p.stdout
