"""The layering of the source tree, checked on the source text.

Every package imports only packages at its level or below it (the order
is ``LEVELS``: ``scsi/`` imports nothing of ours, ``migration/`` no
``host/``), and no module of ours imports a module that in turn leads back to it (no
import cycle). Imports inside functions and under ``if TYPE_CHECKING:``
count too: a lazy import or a type named from above is an arrow all the
same. See docs/design.md for what each layer is.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "prmigrate"

# Lower first. ``prmigrate`` is the package itself (``__version__``); ``aio``
# holds asyncio helpers, ``logprefix`` the log adapter that prefixes a
# peer's name, and ``qmp``, ``lock``, ``sdnotify`` and ``logfiles`` the
# daemons' control and life-cycle helpers: none imports anything of ours.
# ``counters`` (the data path's plain counters) imports only ``scsi``.
# ``target_control`` is the target daemon's control plane, beside the host
# daemon; ``metrics`` (the Prometheus export) reads the target's and the
# host daemon's objects.
LEVELS: tuple[frozenset[str], ...] = (
    frozenset({"scsi"}),
    frozenset({"prmigrate", "aio", "logprefix", "qmp", "lock", "sdnotify", "logfiles", "counters", "lun"}),
    frozenset({"iscsi"}),
    frozenset({"device"}),
    frozenset({"migration"}),
    frozenset({"host", "target_control", "metrics"}),
    frozenset({"demo", "commands", "cli", "__main__"}),
)


def _level(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for i, names in enumerate(LEVELS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any level of LEVELS (add its package there)")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module of ours, at run time?, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def resolve(name: str) -> str | None:
        # the longest prefix of ``name`` that is one of our modules
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == ROOT and (m := resolve(alias.name)):
                    found.append((m, runtime, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == ROOT:
                for alias in node.names:
                    m = resolve(f"{target}.{alias.name}")
                    if m:
                        found.append((m, runtime, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(tree, True)
    return found


MODULES = _modules()
KNOWN = set(MODULES)
GRAPH = {m: _imports(m, p, KNOWN) for m, p in MODULES.items()}


def test_every_package_has_a_level() -> None:
    for m in MODULES:
        _level(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_a_layer_above(module: str) -> None:
    mine = _level(module)
    up = [f"line {line}: {m}" for m, _, line in GRAPH[module] if _level(m) > mine]
    assert not up, f"{module} imports from a layer above it: {', '.join(up)}"


def test_scsi_imports_nothing_of_ours_but_scsi() -> None:
    for module, edges in GRAPH.items():
        if module.startswith(f"{ROOT}.scsi"):
            assert all(m.startswith(f"{ROOT}.scsi") for m, _, _ in edges), (module, edges)


def test_there_is_no_import_cycle() -> None:
    runtime = {m: {t for t, _, _ in edges if t != m} for m, edges in GRAPH.items()}
    # A package's __init__ is imported by each of its modules' imports:
    # count an edge to ``a.b.c`` as one to ``a.b`` too (``a.b`` runs first).
    for m in list(runtime):
        for t in list(runtime[m]):
            parent = t.rpartition(".")[0]
            while parent and parent in runtime and not m.startswith(parent + ".") and m != parent:
                runtime[m].add(parent)
                parent = parent.rpartition(".")[0]
    cycles = [sorted(c) for c in _strongly_connected(runtime) if len(c) > 1]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_lazy_and_type_only_imports(tmp_path: Path) -> None:
    """The checker itself: it finds imports inside functions and under
    TYPE_CHECKING (told apart: the second never runs)."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n"
        "    from ..lun.types import Result\n"
        "def f():\n"
        "    from ..iscsi.pdu import Pdu\n"
    )
    probe = tmp_path / "a.py"
    probe.write_text(src)
    known = {"prmigrate.scsi.b", "prmigrate.lun.types", "prmigrate.iscsi.pdu"}
    edges = _imports("prmigrate.scsi.a", probe, known)
    assert sorted(edges) == [
        ("prmigrate.iscsi.pdu", True, 6),
        ("prmigrate.lun.types", False, 4),
        ("prmigrate.scsi.b", True, 2),
    ]


# ---------------------------------------------------------------- the device
# Every module of ``device/`` is either part of the sans-IO device core
# (no asyncio, socket or time: the clock is a parameter, docs/design.md) or
# of its asyncio shell, which only moves commands, answers and timers.
# A new module goes in one of the two.
DEVICE_SHELL = frozenset({"passthrough", "sessions", "monitor"})
# ``incoming.py`` is the asyncio gate of an incoming device (its rules,
# ``answered_before_move``, are plain functions there).
DEVICE_GATE = frozenset({"incoming"})
# ``multipath.py`` is the asyncio shell of a guest's path set (``paths.py``
# its rules): to the device it is one initiator ``Session``, opened by
# ``sessions.py`` when a device has several backends.
DEVICE_PATHS = frozenset({"multipath"})
DEVICE_CORE = frozenset({
    "__init__", "config", "core", "datain", "describe", "errors", "frontends", "identity", "journal",
    "links", "machine", "mask", "paths", "plans", "reconcile", "snapshot", "snoop", "state", "tmf", "verify",
})
# The device's asyncio shell in code lines (no blank line, comment or
# docstring): 663 before its decisions moved to links.py, tmf.py, plans.py
# and verify.py, 389 after; 300 once the relayed commands' eligibility rule,
# the per-kind answer handling, the PR OUT port's plan, the logins
# (links.Login), the verification retry's deadline and the LU's nexus
# events were the core's too (the fast paths, execute_then's plain forward
# and the relayed reads and writes, are 33 of them, imports 40). Lower the
# bound as the shell shrinks, never raise it.
DEVICE_SHELL_BOUND = 300
IO_MODULES = frozenset({"asyncio", "socket", "time", "selectors", "threading"})


def _device_modules() -> set[str]:
    return {p.stem for p in (SRC / ROOT / "device").glob("*.py")}


def test_every_device_module_is_core_or_shell() -> None:
    roles = [DEVICE_SHELL, DEVICE_GATE, DEVICE_PATHS, DEVICE_CORE]
    for name in sorted(_device_modules()):
        assert sum(name in r for r in roles) == 1, f"device/{name}.py: put it in DEVICE_CORE or DEVICE_SHELL"
    assert set().union(*roles) <= _device_modules(), "a module listed here is gone"


def _io_imports(path: Path) -> list[str]:
    """Standard library I/O modules ``path`` imports (anywhere in it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        found += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] in IO_MODULES]
    return found


@pytest.mark.parametrize("name", sorted(DEVICE_CORE))
def test_device_core_module_imports_no_io(name: str) -> None:
    found = _io_imports(SRC / ROOT / "device" / f"{name}.py")
    assert not found, f"device/{name}.py is sans-IO but imports {', '.join(found)}"


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not a docstring
    (of the module, a class or a function)."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str
            ):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER, tokenize.ENCODING}
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstrings)


def test_code_lines_counts_code_only() -> None:
    src = (
        '"""Module\n\ndocstring."""\n'
        "# a comment\n"
        "\n"
        "def f(a,\n"
        "      b):  # trailing comment\n"
        '    """Doc."""\n'
        "    x = '''not a\n"
        "    docstring'''\n"
        "    return x\n"
    )
    assert code_lines(src) == 5


def test_device_shell_is_small() -> None:
    counts = {n: code_lines((SRC / ROOT / "device" / f"{n}.py").read_text()) for n in sorted(DEVICE_SHELL)}
    total = sum(counts.values())
    assert total <= DEVICE_SHELL_BOUND, f"device shell: {total} code lines ({counts}), bound {DEVICE_SHELL_BOUND}"
