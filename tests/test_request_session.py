"""A request's session goes with its request, as users of the
cookiecutter's ``request.dbsession`` see it, over HTTP.

The app (tests/request_session_app.py) is pyramid-cookiecutter-starter's,
migrated to ``config.include("sparc.sa")``: pyramid_tm (with the
cookiecutter's ``pyramid_tm.explicit_manager`` and with pyramid_tm's default
manager), pyramid_retry with 3 attempts, and views that call
``request.dbsession.add(...)`` with no ``with tx():`` block. Each request
leaves the rows its outcome calls for, as zope.sqlalchemy's registered
session does: a write that returns 200, 1; a write then an exception, 0; a
write then ``request.tm.doom()``, 0; a TransientError on the first attempt,
1; a real serialization failure on the first attempt (PostgreSQL
SERIALIZABLE), 1; a read-only view, 0; a write then an exception that an
exception view renders, itself writing a row, 0; a write made through
``request.dbsession`` in a finished callback, after pyramid_tm ended the
request's transaction, is refused with JoinedTransactionError and left to
no later request; a write, then a block that fails
and whose error the view catches, the write alone; writes whose flush
fails when the request commits (a duplicate key), 0. After every request the pool has
nothing checked out, and the next request on the same worker thread, whose
``with tx():`` block writes one row, commits that row alone: no write of an
aborted or doomed request crosses into it.

Through WebTest (single-threaded: every request on the test's thread) and
through a real waitress server on 127.0.0.1 with one worker thread, on
SQLite (in memory and on a file), PostgreSQL and MariaDB.
"""

from __future__ import annotations

import contextlib
import pathlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
import webtest

from sparc.sa.exceptions import JoinedTransactionError

from .conftest import checked_out, names
from .request_session_app import MANAGERS, ViewFailure, main
from .test_pyramid import APP_BACKENDS, app_environment

# (path, names of the rows it leaves, what the request ends with: the
# exception it raises, the status of an error page, or None for 200)
SCENARIOS: dict[str, tuple[str, list[str], type[BaseException] | int | None]] = {
    "write": ("/write", ["write"], None),
    "write-then-exception": ("/fail", [], ViewFailure),
    "write-then-exception-view": ("/handled", [], 500),
    "pending-write-then-exception": ("/fail?pending=1", [], ViewFailure),
    "doomed": ("/doom", [], None),
    "transient-first-attempt": ("/transient", ["transient"], None),
    "serialization-failure-first-attempt": ("/serialize", ["serialize"], None),
    "read-only": ("/read", [], None),
    "write-then-a-failing-block": ("/mixed", ["outside"], None),
    "write-that-fails-at-commit": ("/duplicate", [], sa.exc.IntegrityError),
    "write-after-the-request-ended": ("/late", [], JoinedTransactionError),
    "flushed-write-after-the-request-ended": ("/late?flush=1", [], JoinedTransactionError),
}


def _applies(scenario: str, backend: str) -> bool:
    # The serialization failure is provoked on PostgreSQL SERIALIZABLE only.
    return backend == "postgresql" or not scenario.startswith("serialization")


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[SimpleNamespace]:
    yield from app_environment(request.param, tmp_path)


def _cases() -> Iterator[Any]:
    for backend in APP_BACKENDS:
        for scenario in SCENARIOS:
            if _applies(scenario, backend):
                yield pytest.param(backend, scenario, id=f"{backend}-{scenario}")


@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize(("env", "scenario"), list(_cases()), indirect=["env"])
def test_a_request_session_goes_with_its_request(
    env: SimpleNamespace, scenario: str, manager: str
) -> None:
    """Through WebTest: the rows each request's outcome calls for, nothing
    checked out, and the next request's block commits its own row alone."""
    path, expected, error = SCENARIOS[scenario]
    app = webtest.TestApp(main(engine=env.engine, models=env.models, manager=manager))
    if error is None:
        response = app.get(path)
        assert response.status_int == 200
        assert response.text == ("0" if path == "/read" else "ok")
    elif isinstance(error, int):
        assert app.get(path, status=error).text == "error"
    else:
        with pytest.raises(error):
            app.get(path)
    assert names(env.engine, env.models.Item) == expected
    assert checked_out(env.engine) == 0

    assert app.get("/block").text == "ok"
    assert names(env.engine, env.models.Item) == sorted([*expected, "block"])
    assert checked_out(env.engine) == 0


@contextlib.contextmanager
def _one_thread_waitress(app: Any) -> Iterator[str]:
    """Serve *app* with waitress on 127.0.0.1 (an ephemeral port) with a
    single worker thread, as tests/test_pyramid.py serves its app; yields
    the base URL and stops the server afterwards."""
    from webtest.http import StopableWSGIServer

    server = StopableWSGIServer.create(app, host="127.0.0.1", threads=1)
    try:
        assert server.adj.host == "127.0.0.1" and server.adj.threads == 1
        yield server.application_url
    finally:
        server.shutdown()
        server.runner.join(timeout=10)
    assert not server.runner.is_alive(), "waitress did not stop"


def _fetch(url: str) -> tuple[int, str, str | None]:
    """GET *url*: status, body, and the X-Worker header (the serving thread)."""
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read().decode(), r.headers.get("X-Worker")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, "", exc.headers.get("X-Worker")


@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize("env", APP_BACKENDS, indirect=True)
def test_a_request_session_goes_with_its_request_over_waitress(
    env: SimpleNamespace, manager: str
) -> None:
    """Over HTTP, one waitress worker thread: every request of the table,
    each followed by a request whose block writes one row, one after
    another on that thread. Each leaves its own rows and nothing else, and
    the pool has nothing checked out between requests."""
    app = main(engine=env.engine, models=env.models, manager=manager)
    workers = set()
    committed: list[str] = []
    with _one_thread_waitress(app) as url:
        for scenario, (path, expected, error) in SCENARIOS.items():
            if not _applies(scenario, env.backend):
                continue
            status, body, worker = _fetch(url + path[1:])
            if error is None:
                workers.add(worker)
                assert status == 200, scenario
                assert body == (str(len(committed)) if path == "/read" else "ok"), scenario
            elif isinstance(error, int):
                workers.add(worker)
                assert status == error, scenario
            else:
                assert status == 500, scenario
            committed += expected
            assert names(env.engine, env.models.Item) == sorted(committed), scenario
            assert checked_out(env.engine) == 0, scenario

            status, body, worker = _fetch(url + "block")
            workers.add(worker)
            assert (status, body) == (200, "ok"), scenario
            committed.append("block")
            assert names(env.engine, env.models.Item) == sorted(committed), scenario
            assert checked_out(env.engine) == 0, scenario
    # (waitress's own 500 page carries no header of the app's)
    assert len(workers) == 1 and None not in workers, workers
