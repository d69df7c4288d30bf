"""Without the server variables, pytest's summary says why in a line or two."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
from types import ModuleType, SimpleNamespace

import pytest

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


# -- the usual local servers, probed when the variables are unset ----------------------


def test_an_unset_variable_names_the_usual_server_when_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conftest = root_conftest()
    monkeypatch.delenv("TEST_PG_DSN", raising=False)
    monkeypatch.setenv("TEST_MYSQL_DSN", "")  # set, though empty: left alone
    asked: list[str] = []

    def answers(dsn: str) -> bool:
        asked.append(dsn)
        return True

    monkeypatch.setattr(conftest, "answers", answers)
    conftest.pytest_configure(None)
    assert asked == ["postgresql+psycopg://postgres@127.0.0.1:5432/test"]
    assert os.environ["TEST_PG_DSN"] == asked[0]
    assert os.environ["TEST_MYSQL_DSN"] == ""
    (line,) = conftest.pytest_report_header(None)
    assert line.startswith("TEST_PG_DSN was unset; PostgreSQL answers at postgresql+psycopg://")


def test_when_nothing_answers_the_skip_line_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conftest = root_conftest()
    monkeypatch.delenv("TEST_MYSQL_DSN", raising=False)
    monkeypatch.setenv("TEST_PG_DSN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    monkeypatch.setattr(conftest, "answers", lambda dsn: False)
    conftest.pytest_configure(None)
    assert "TEST_MYSQL_DSN" not in os.environ
    assert conftest.pytest_report_header(None) == []
    lines = conftest.skip_summary([skipped("TEST_MYSQL_DSN is not set, so there is no mysql")] * 3)
    assert lines == [
        "3 TEST_MYSQL_DSN is not set and nothing answers at "
        "mysql+pymysql://root@127.0.0.1:3306/test: set it to run the MariaDB/MySQL cases "
        "(DEVELOPERS.md)"
    ]


def test_the_probe_says_no_when_nothing_listens() -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conftest = root_conftest()
    assert conftest.answers(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test") is False
    assert conftest.answers(f"mysql+pymysql://root@127.0.0.1:{port}/test") is False


@pytest.mark.parametrize("variable", ["TEST_PG_DSN", "TEST_MYSQL_DSN"])
def test_the_probe_says_yes_to_a_server_that_answers(variable: str) -> None:
    dsn = os.environ.get(variable)
    if not dsn:
        pytest.skip(f"{variable} is not set, so there is no server to probe")
    assert root_conftest().answers(dsn) is True
