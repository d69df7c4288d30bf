"""In a real Zope: blocks commit with the request, exactly once, or not at all.

A Zope 6 instance (ZPublisher, ZODB on a MappingStorage) publishes browser
views in process through WebTest; the site's ZCML includes sparc.sa and
declares an <sa:engine> and an <sa:transaction>. Zope's start-up is global to
its process, so each scenario runs in tests/zope_site/scenarios.py, in a
process of its own, and reports what the site saw.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("Zope2", reason="Zope is a test extra: pip install -e '.[test]'")
pytest.importorskip("webtest", reason="WebTest is a test extra: pip install -e '.[test]'")

from .conftest import backend_dsn

SCENARIOS = pathlib.Path(__file__).parent / "zope_site" / "scenarios.py"


def run(dsn: str, which: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCENARIOS), dsn, which],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", ["sqlite-file", "postgresql", "mysql"])
def test_one_request_leaves_its_rows_exactly_once_or_not_at_all(
    backend: str, tmp_path: pathlib.Path
) -> None:
    """The table of issue 8: rows one request leaves, in a real Zope."""
    seen = run(backend_dsn(backend, tmp_path), "rows")
    expected = {
        "writes and returns": (1, "200", 1),
        "raises after its block": (0, "ValueError", 1),
        "conflict once, retried": (1, "200", 2),
        "conflict on every attempt": (0, "ConflictError", 4),  # 1 + 3 retries
    }
    for case, (rows, status, attempts) in expected.items():
        assert seen[case]["rows"] == rows, (case, seen[case])
        assert seen[case]["status"] == status, (case, seen[case])
        assert seen[case]["attempts"] == attempts, (case, seen[case])
        assert seen[case]["checked_out"] == 0, (case, seen[case])


@pytest.mark.parametrize("backend", ["sqlite-file", "postgresql", "mysql"])
def test_writes_outside_blocks_go_with_the_published_request(
    backend: str, tmp_path: pathlib.Path
) -> None:
    """A view writes through ``tx.session`` outside any block, as with
    zope.sqlalchemy's registered session: the write commits with a request
    that succeeds and is aborted with one that raises or is doomed, and the
    next request's block, on the same thread, commits its own row alone."""
    seen = run(backend_dsn(backend, tmp_path), "outside")
    expected = {
        "writes and returns": ("200", ["returns"]),
        "writes, flushes and raises": ("ValueError", []),
        "writes and raises": ("ValueError", []),
        "writes and dooms": ("200", []),
    }
    for n, (case, (status, rows)) in enumerate(expected.items()):
        assert (seen[case]["status"], seen[case]["rows"]) == (status, rows), (case, seen[case])
        assert seen[case]["checked_out"] == 0, (case, seen[case])
        assert seen[case]["next status"] == "200", (case, seen[case])
        assert seen[case]["next rows"] == [f"next{n}"], (case, seen[case])
        assert seen[case]["next checked_out"] == 0, (case, seen[case])


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_concurrent_serializable_increments_are_retried_by_the_publisher(
    backend: str, tmp_path: pathlib.Path
) -> None:
    """Four clients, ten increments each, of one counter at SERIALIZABLE:
    the database's conflicts reach ZPublisher as TransientErrors and it
    retries the requests; the counter ends exact."""
    seen = run(backend_dsn(backend, tmp_path), "serializable")
    assert seen["errors"] == []
    assert seen["value"] == 40
    assert seen["attempts"] > 40, "no request was retried: the test proved nothing"
    assert seen["checked_out"] == 0


def test_zodb_and_postgresql_in_two_phase_commit_neither_when_a_vote_fails(
    tmp_path: pathlib.Path,
) -> None:
    seen = run(backend_dsn("postgresql", tmp_path), "twophase")
    both = seen["both commit"]
    assert (both["status"], both["rows"], both["zodb"]) == ("200", 1, "both")
    for case in ("ZODB vote fails", "SQL vote fails"):
        failed = seen[case]
        assert failed["status"] != "200", (case, failed)
        assert failed["rows"] == 0, (case, failed)
        assert failed["zodb"] == "both", (case, failed)  # ZODB kept the earlier value
        assert failed["prepared"] == 0, (case, failed)
        assert failed["checked_out"] == 0, (case, failed)


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_connection_killed_just_after_it_went_back_to_the_pool(
    backend: str, tmp_path: pathlib.Path
) -> None:
    """The server kills a connection just after a request returned it.

    MariaDB: a request skips the ping of a connection returned a moment
    ago, so it meets the connection dead; the publisher publishes it again
    on a fresh one. PostgreSQL: the request's check of its checkout is its
    BEGIN, which meets the dead connection, and SQLAlchemy replaces it
    before the view runs. Either way the client sees one success and one
    row."""
    seen = run(backend_dsn(backend, tmp_path), "killed")
    assert seen["status"] == "200"
    assert seen["rows"] == 1
    assert seen["attempts"] == (1 if backend == "postgresql" else 2), seen
    assert seen["new connection"]
    assert seen["checked_out"] == 0
