"""The README's configuration tables name every variable the code reads, with defaults.

The variables are found in the source, not listed by hand: every call of
``env.*`` or an ``_env_*`` helper in llmsite/settings.py, every
``os.environ``/``os.getenv`` read with a literal name elsewhere in the
project, and every ``${NAME:-default}`` in scripts/run.sh. A variable added
without its README row, or a default changed on one side only, fails here
with the variable's name.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ROOT / "llmsite" / "settings.py"
PYTHON_DIRS = ["llmsite", "gateway", "chat", "monitoring", "api"]
SHELL_SCRIPTS = [ROOT / "scripts" / "run.sh"]
# A default that is not a value anyone could type (the reader's own files).
NOT_A_DEFAULT = object()
SHELL_DEFAULT = r"\$\{([A-Z][A-Z0-9_]*):-([^}]*)\}"

_ARITHMETIC = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub}


@dataclass(frozen=True)
class Read:
    """One place the code reads an environment variable."""

    name: str
    default: object
    where: str


def constant(node: ast.AST | None) -> object:
    """The value of a literal default (``10 * 1024 * 1024`` included), if it is one."""
    if node is None:
        return NOT_A_DEFAULT
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = constant(node.left), constant(node.right)
        if isinstance(left, int | float) and isinstance(right, int | float):
            return _ARITHMETIC[type(node.op)](left, right)
        return NOT_A_DEFAULT
    try:
        return ast.literal_eval(node)
    except ValueError:
        return NOT_A_DEFAULT


def _default_argument(call: ast.Call) -> ast.AST | None:
    for keyword in call.keywords:
        if keyword.arg == "default":
            return keyword.value
    return call.args[1] if len(call.args) > 1 else None


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def reads_in(path: Path) -> list[Read]:
    """Every read of a variable named by a literal in one Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    where = str(path.relative_to(ROOT))
    found = []
    for node in ast.walk(tree):
        name_node, default_node = None, None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            settings_helper = path == SETTINGS and (
                (isinstance(func, ast.Name) and func.id.startswith("_env"))
                or (
                    isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "env"
                )
            )
            environ_get = isinstance(func, ast.Attribute) and (
                (func.attr == "get" and _is_environ(func.value))
                or func.attr == "getenv"
            )
            if settings_helper or environ_get:
                name_node, default_node = node.args[0], _default_argument(node)
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            name_node = node.slice
        if isinstance(name_node, ast.Constant) and isinstance(name_node.value, str):
            if name_node.value == "DJANGO_SETTINGS_MODULE":
                continue  # Django's own, set by the entry points
            found.append(Read(name_node.value, constant(default_node), where))
    return found


def shell_reads(path: Path) -> list[Read]:
    where = str(path.relative_to(ROOT))
    return [
        Read(name, default, where)
        for name, default in re.findall(SHELL_DEFAULT, path.read_text())
    ]


def all_reads() -> list[Read]:
    files = [SETTINGS] + [
        path
        for folder in PYTHON_DIRS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "migrations" not in path.parts and path != SETTINGS
    ]
    reads = [read for path in files for read in reads_in(path)]
    return reads + [read for script in SHELL_SCRIPTS for read in shell_reads(script)]


def readme_rows() -> dict[str, str]:
    """Each variable of the configuration tables and its row's default cell."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3:
            continue
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]):
            rows[name] = cells[1]
    return rows


def spellings(value: object) -> set[str]:
    """The ways a README default cell may write a code default."""
    if isinstance(value, bool):
        return {"true" if value else "false"}
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        forms = {str(value), f"{value:,}"}
        for unit, size in (("KiB", 1024), ("MiB", 1024 * 1024)):
            if value and value % size == 0:
                forms.add(f"{value // size} {unit}")
        return forms
    if isinstance(value, list | tuple):
        return {",".join(map(str, value))} if value else {"empty"}
    if value == "":
        return {"empty"}
    return {str(value)}


def mentions(cell: str, value: object) -> bool:
    plain = cell.replace("`", "")
    return any(
        re.search(rf"(?<![\w.]){re.escape(form)}(?![\w.])", plain)
        for form in spellings(value)
    )


READS = all_reads()


def test_the_scan_finds_the_variables_it_should():
    """A scan that found nothing would pass every check below."""
    names = {read.name for read in READS}
    assert {"DEBUG", "GATEWAY_MAX_CONNECTIONS", "LLM_MODEL", "PORT"} <= names
    assert len(names) > 60


@pytest.mark.parametrize(
    "name", sorted({read.name for read in READS}), ids=lambda name: name
)
def test_every_variable_has_a_row_with_the_codes_default(name):
    rows = readme_rows()
    assert name in rows, (
        f"{name} is read from the environment "
        f"({', '.join(sorted({r.where for r in READS if r.name == name}))}) "
        "but has no row in the README's configuration tables"
    )
    for read in READS:
        if read.name == name and read.default is not NOT_A_DEFAULT:
            assert mentions(rows[name], read.default), (
                f"{name}: the README's default {rows[name]!r} does not say "
                f"{read.default!r}, the default in {read.where}"
            )


def test_a_wrong_default_is_caught():
    """The comparison itself: right spellings pass, others do not."""
    assert mentions("`100`", 100)
    assert mentions("10 MiB", 10 * 1024 * 1024)
    assert mentions("`32,000`", 32_000)
    assert mentions("`false`", False)
    assert mentions("empty", "")
    assert mentions("`5`", 5.0)
    assert not mentions("`10`", 100)
    assert not mentions("`0.5`", 5)
    assert not mentions("`true`", False)
