"""The README's configuration table lists every environment variable the code reads, with the code's default.

The variables are found in the code itself: the fields of `Settings`, the `os.environ.get` calls of the
gunicorn config, and the `${NAME:-default}` expansions of the shell scripts and the Procfile.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TABLE_HEADING = "## Configuration (environment)"


def spelled(value: object) -> str:
    """A default as the README writes it: switches as 1/0, whole floats without `.0`."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def settings_variables() -> dict[str, str]:
    """`Settings.from_env` reads each field from its upper-case name."""
    return {field.name.upper(): spelled(field.default) for field in fields(Settings)}


def gunicorn_variables() -> dict[str, str]:
    """`os.environ.get("NAME", "default")` in deploy/gunicorn.conf.py."""
    source = (ROOT / "deploy" / "gunicorn.conf.py").read_text()
    return dict(re.findall(r"""os\.environ\.get\(\s*['"](\w+)['"]\s*,\s*['"]([^'"]*)['"]""", source))


def shell_variables() -> dict[str, str]:
    """`${NAME:-default}` in bin/ and the Procfile."""
    found: dict[str, str] = {}
    for path in [ROOT / "Procfile", *sorted((ROOT / "bin").iterdir())]:
        found.update(re.findall(r"\$\{(\w+):-([^}]*)\}", path.read_text()))
    return found


def variables_read_by_tests() -> dict[str, str]:
    """`os.environ.get("NAME", "default")` in the tests' own modules."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        found.update(re.findall(r"""os\.environ\.get\(\s*['"](\w+)['"]\s*,\s*['"]([^'"]*)['"]""", path.read_text()))
    return found


READERS: dict[str, Callable[[], dict[str, str]]] = {
    "shared/settings.py": settings_variables,
    "deploy/gunicorn.conf.py": gunicorn_variables,
    "bin/ and Procfile": shell_variables,
}


def documented() -> dict[str, str]:
    """`{variable: default cell}` for each row of the README's configuration table."""
    text = README.read_text()
    assert TABLE_HEADING in text, f"README.md has no {TABLE_HEADING!r} section"
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]):
            rows[name] = cells[1]
    return rows


def states(cell: str, default: str) -> bool:
    """Whether the table's default cell gives `default` as a whole word (600 is not in 3600)."""
    return re.search(rf"(?<![\w./:]){re.escape(default)}(?![\w./:])", cell.replace("`", "")) is not None


def test_the_table_is_found_and_parsed():
    assert {"PORT", "REDIS_URL", "MAX_SEQ_LEN"} <= set(documented())


@pytest.mark.parametrize("reader", READERS)
def test_every_variable_the_code_reads_has_a_row(reader):
    read = READERS[reader]()
    assert read, f"found no environment variables in {reader}: the test no longer recognises how it reads them"
    missing = sorted(set(read) - set(documented()))
    assert not missing, f"read by {reader} but missing from README.md's configuration table: {missing}"


@pytest.mark.parametrize("reader", READERS)
def test_each_row_gives_the_default_the_code_uses(reader):
    table = documented()
    wrong = {name: f"code says {default!r}, README says {table[name]!r}"
             for name, default in READERS[reader]().items() if name in table and not states(table[name], default)}
    assert not wrong, f"defaults in {reader} differ from README.md's configuration table: {wrong}"


def test_every_row_is_a_variable_something_reads():
    read = set(variables_read_by_tests())
    for variables in READERS.values():
        read |= set(variables())
    unread = sorted(set(documented()) - read)
    assert not unread, f"README.md's configuration table lists variables nothing reads: {unread}"
