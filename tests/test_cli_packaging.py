"""Packaging: man pages and bash completion generated from the argparse
definitions, current in the repository and installed by the package; the
version in one place."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prmigrate

ROOT = Path(__file__).resolve().parents[1]
from prmigrate.cli import COMMANDS  # noqa: E402


def _generate(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_man_completion.py"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)


def test_generation_works_and_the_committed_files_are_current(tmp_path: Path) -> None:
    pytest.importorskip("argparse_manpage")  # the dev extra
    pytest.importorskip("shtab")
    r = _generate(tmp_path)
    assert r.returncode == 0, r.stderr
    pr_page = (tmp_path / "man" / "prmigrate-pr.1").read_text()
    assert pr_page.startswith('.TH PRMIGRATE\\-PR "1"')
    for opt in ("param\\-rk", "prout\\-type", "relative\\-target\\-port", "read\\-full\\-status"):
        assert opt in pr_page, opt
    assert "24 RESERVATION CONFLICT" in pr_page
    completion = (tmp_path / "completion" / "prmigrate").read_text()
    assert "--param-sark" in completion and "complete" in completion
    for name in ("prmigrate", *(f"prmigrate-{c}" for c in COMMANDS)):
        generated = (tmp_path / "man" / f"{name}.1").read_text()
        committed = (ROOT / "man" / f"{name}.1").read_text()
        assert generated == committed, f"man/{name}.1 is stale: run scripts/gen_man_completion.py"
    assert completion == (ROOT / "completion" / "prmigrate").read_text(), "completion is stale"


def test_man_renders_the_pr_page() -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    r = subprocess.run(["man", "-l", str(ROOT / "man" / "prmigrate-pr.1")], capture_output=True,
                       text=True, timeout=60, env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "prmigrate-pr - persistent reservations" in r.stdout
    assert "--param-rk RK" in r.stdout


def test_version_is_single_sourced() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'version = {attr = "prmigrate.__version__"}' in text
    assert "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]
    r = subprocess.run([sys.executable, "-m", "prmigrate", "--version"], capture_output=True,
                       text=True, timeout=30)
    assert r.stdout == f"prmigrate {prmigrate.__version__}\n"


def test_the_wheel_installs_the_man_pages_and_completion(tmp_path: Path) -> None:
    """Build the wheel from a copy of the tree (no network, no build
    isolation), install it under a private prefix, then `man prmigrate-pr`
    finds the page there."""
    src = tmp_path / "src-copy"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("prmigrate-*.whl")
    assert wheel.name.startswith(f"prmigrate-{prmigrate.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    data = f"prmigrate-{prmigrate.__version__}.data/data/"
    for name in ("prmigrate", *(f"prmigrate-{c}" for c in COMMANDS)):
        assert f"{data}share/man/man1/{name}.1" in names, name
    assert data + "share/bash-completion/completions/prmigrate" in names
    meta = zipfile.ZipFile(wheel).read(f"prmigrate-{prmigrate.__version__}.dist-info/METADATA").decode()
    assert "Classifier: Operating System :: POSIX :: Linux" in meta and "Project-URL:" in meta
    prefix = tmp_path / "prefix"
    # --ignore-installed: the package is also installed (editable) in this
    # environment, and pip would otherwise skip a wheel of the same version
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--prefix",
                        str(prefix), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (prefix / "share" / "man" / "man1" / "prmigrate-pr.1").is_file()
    if shutil.which("man"):
        r = subprocess.run(["man", "-M", str(prefix / "share" / "man"), "prmigrate-pr"],
                           capture_output=True, text=True, timeout=60,
                           env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "MANPAGER": "cat"})
        assert r.returncode == 0, r.stderr
        assert "prmigrate-pr - persistent reservations" in r.stdout


# ------------------------------------------------------------------ docs


def test_docs_name_every_device_key_and_pr_exit_status() -> None:
    from prmigrate.commands import pr
    from prmigrate.device.config import _KEYS

    text = (ROOT / "docs" / "cli.md").read_text()
    for key in _KEYS:
        assert f"| `{key}` |" in text or f"`{key}=`" in text, key
    readme = (ROOT / "README.md").read_text()
    for code in (pr.EXIT_SYNTAX, pr.EXIT_NOT_READY, pr.EXIT_MEDIUM_HARD, pr.EXIT_ILLEGAL_REQUEST,
                 pr.EXIT_UNIT_ATTENTION, pr.EXIT_FILE_ERROR, pr.EXIT_CONFLICT, pr.EXIT_CONTRADICT):
        assert f"| {code} |" in text, code
        assert f"{code} " in readme.split("sg3_utils' exit status")[1][:1200], code


def test_host_toml_example_is_a_valid_configuration(tmp_path: Path) -> None:
    from prmigrate.host.config import load_toml

    cfg = load_toml(ROOT / "docs" / "examples" / "host.toml").validate()
    (dev,) = cfg.devices
    assert cfg.name == "hosta" and dev.name == "vm1"
    assert dev.target_iqn == "iqn.2026-11.org.prmigrate:shared"
    assert dev.frontend_iqn == "iqn.2026-11.org.prmigrate:vm1"


def test_target_example_parses() -> None:
    import shlex

    from prmigrate.cli import build_parser

    script = (ROOT / "docs" / "examples" / "target.sh").read_text()
    command = script.split("exec ", 1)[1].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[0] == "prmigrate"
    args = build_parser("target").parse_args(words[1:])
    assert args.iqn == "iqn.2026-11.org.prmigrate:shared" and args.size == 256 << 20
