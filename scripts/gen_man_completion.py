"""Generate the man pages and the bash completion from the argparse definitions.

    python3 scripts/gen_man_completion.py [--out DIR]

Writes DIR/man/prmigrate.1, DIR/man/prmigrate-COMMAND.1 for each
subcommand (argparse-manpage) and DIR/completion/prmigrate (shtab's bash
completion); DIR defaults to the repository. The outputs are committed and
installed by the package (pyproject.toml, [tool.setuptools.data-files]:
share/man/man1 and share/bash-completion/completions), so run this after
changing an option; tests/test_cli_packaging.py fails while they are stale.
Needs the dev extra (``pip install '.[dev]'``: argparse-manpage, shtab).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import shtab  # noqa: E402
from argparse_manpage.manpage import Manpage  # noqa: E402

from prmigrate import __version__  # noqa: E402
from prmigrate.cli import COMMANDS, build_parser  # noqa: E402

# Fixed, so that the pages do not change with the day they are generated.
PAGE_DATE = "2026-12-01"
MANUAL = "prmigrate manual"
SEE_ALSO = "prmigrate(1), " + ", ".join(f"prmigrate-{c}(1)" for c in COMMANDS) + ", sg_persist(8)"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("no subcommands")


def page(parser: argparse.ArgumentParser, description: str, name: str) -> str:
    m = Manpage(parser)
    m.prog = name  # the page's name (prmigrate-pr); the synopsis keeps "prmigrate pr"
    m.source = f"prmigrate {__version__}"
    m.manual = MANUAL
    m.date = PAGE_DATE
    m.description = description
    text = str(m)
    return text.rstrip("\n") + f"\n.SH \"SEE ALSO\"\n{SEE_ALSO}\n"


def generate(out: Path) -> list[Path]:
    parser = build_parser(full=True)
    written = []
    (out / "man").mkdir(parents=True, exist_ok=True)
    (out / "completion").mkdir(parents=True, exist_ok=True)
    pages = {"prmigrate": page(parser, parser.description or "", "prmigrate")}
    for name, sub in subparsers(parser).items():
        sub.prog = f"prmigrate {name}"
        pages[f"prmigrate-{name}"] = page(sub, COMMANDS[name], f"prmigrate-{name}")
    for name, text in pages.items():
        path = out / "man" / f"{name}.1"
        path.write_text(text)
        written.append(path)
    path = out / "completion" / "prmigrate"
    path.write_text(shtab.complete(parser, shell="bash"))
    written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="where man/ and completion/ go")
    for path in generate(ap.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
