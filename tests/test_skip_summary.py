"""Without the server variables, pytest's summary says why in a line or two."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType, SimpleNamespace

ROOT = pathlib.Path(__file__).parent.parent


def root_conftest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sparc_sa_root_conftest", ROOT / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def skipped(reason: str) -> SimpleNamespace:
    return SimpleNamespace(skipped=True, longrepr=("tests/test_x.py", 1, f"Skipped: {reason}"))


def test_server_skips_are_one_line_per_variable_and_say_what_to_set() -> None:
    reports = [
        *[skipped("TEST_PG_DSN is not set, so there is no postgresql server")] * 120,
        *[skipped("TEST_PG_DSN is not set, so there is no server for asyncpg")] * 30,
        *[skipped("TEST_MYSQL_DSN is not set, so there is no mysql server")] * 100,
        skipped("SQLite locks the whole database, not rows"),
    ]
    lines = root_conftest().skip_summary(reports)
    assert lines == [
        "150 TEST_PG_DSN is not set: set it to run the PostgreSQL cases (DEVELOPERS.md)",
        "100 TEST_MYSQL_DSN is not set: set it to run the MariaDB/MySQL cases (DEVELOPERS.md)",
        "  1 SQLite locks the whole database, not rows",
    ]


def test_pytest_lists_skips_by_reason_not_one_by_one() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"-rfExX"' in text and '"-ra"' not in text
