"""A Pyramid app as pyramid-cookiecutter-starter makes it (pyramid_tm,
pyramid_retry with 3 attempts, WebTest), with sparc.sa's lookup and
``with tx():`` in its views, against the same app wired the
cookiecutter's zope.sqlalchemy way.

Each request leaves the rows its outcome calls for: a write 1; a write then
an exception 0; a TransientError on the first attempt 1; a real
serialization failure (40001, PostgreSQL SERIALIZABLE) on the first attempt
1; a TransientError on every attempt 0; a write then ``request.tm.doom()``
0. Both wirings, with the cookiecutter's
``pyramid_tm.explicit_manager`` hook and with pyramid_tm's default manager,
on SQLite (in memory and on a file), PostgreSQL and MariaDB.

The same six requests, and the same rows, with the cookiecutter app migrated
to ``config.include("sparc.sa")`` (the engine built from its ``sqlalchemy.``
settings, views using ``request.tx`` or, after ``config.hook_zca()``, the
plain lookup), through WebTest and through a real waitress server on
127.0.0.1; and what the include registers, and says when a lookup misses.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
import transaction
import webtest
from sqlalchemy.engine import Engine
from transaction.interfaces import TransientError

from .conftest import CheckoutCounter, backend_dsn, checked_out, count_rows, make_engine
from .pyramid_app import (
    LOOKUPS,
    MANAGERS,
    WIRINGS,
    ViewFailure,
    included_main,
    main,
    make_models,
)

# (path, expected rows, exception the request ends with or None)
SCENARIOS: dict[str, tuple[str, int, type[BaseException] | None]] = {
    "write": ("/write", 1, None),
    "write-then-exception": ("/fail", 0, ViewFailure),
    "transient-first-attempt": ("/transient", 1, None),
    "serialization-failure-first-attempt": ("/serialize", 1, None),
    "transient-every-attempt": ("/always", 0, TransientError),
    "doomed": ("/doom", 0, None),
}
APP_BACKENDS = ("sqlite", "sqlite-file", "postgresql", "mysql")


def app_engine(backend: str, tmp_path: pathlib.Path) -> Engine:
    """The backend's engine; on PostgreSQL SERIALIZABLE, so that the
    interleaved transaction of ``/serialize`` fails with 40001."""
    dsn = backend_dsn(backend, tmp_path)
    kwargs: dict[str, Any] = {}
    if backend == "postgresql":
        kwargs["isolation_level"] = "SERIALIZABLE"
    engine = make_engine(dsn, **kwargs)
    engine.__dict__["_test_counter"] = CheckoutCounter(engine)
    return engine


@pytest.fixture
def pyramid_env(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[SimpleNamespace]:
    yield from app_environment(request.param, tmp_path)


def app_environment(backend: str, tmp_path: pathlib.Path) -> Iterator[SimpleNamespace]:
    """The body of an app test's fixture: the engine, the models with one
    counter row, and after the test, no connection left checked out."""
    engine = app_engine(backend, tmp_path)
    models = make_models()
    models.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(models.Counter.__table__).values(id=1, value=0))
    yield SimpleNamespace(engine=engine, models=models, backend=backend)
    transaction.abort()  # the default manager is the thread's: leave it clean
    try:
        left = checked_out(engine)
        models.Base.metadata.drop_all(engine)
    finally:
        engine.dispose()
    assert left == 0, f"{left} connection(s) still checked out after the requests"


def _cases() -> Iterator[Any]:
    for backend in APP_BACKENDS:
        for scenario in SCENARIOS:
            if scenario.startswith("serialization") and backend != "postgresql":
                continue  # provoked on PostgreSQL SERIALIZABLE only
            yield pytest.param(backend, scenario, id=f"{backend}-{scenario}")


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize(("pyramid_env", "scenario"), list(_cases()), indirect=["pyramid_env"])
def test_rows_per_request(
    pyramid_env: SimpleNamespace, scenario: str, manager: str, wiring: str
) -> None:
    path, rows, error = SCENARIOS[scenario]
    env = pyramid_env
    app = webtest.TestApp(
        main(engine=env.engine, models=env.models, wiring=wiring, manager=manager)
    )
    if error is None:
        assert app.get(path).text == "ok"
    else:
        with pytest.raises(error):
            app.get(path)
    assert count_rows(env.engine, env.models.Item) == rows
    assert checked_out(env.engine) == 0


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize("pyramid_env", APP_BACKENDS, indirect=True)
def test_rows_of_the_issue_in_one_app(
    pyramid_env: SimpleNamespace, manager: str, wiring: str
) -> None:
    """The five requests one after another in one app, as the issue counted
    them, and a doomed one: 1, 0, 1, 1, 0, 0 new rows (the serialization case on PostgreSQL only;
    MariaDB runs the other four)."""
    env = pyramid_env
    app = webtest.TestApp(
        main(engine=env.engine, models=env.models, wiring=wiring, manager=manager)
    )
    seen = []
    for name, (path, _rows, _error) in SCENARIOS.items():
        if name.startswith("serialization") and env.backend != "postgresql":
            continue
        before = count_rows(env.engine, env.models.Item)
        with contextlib.suppress(ViewFailure, TransientError):
            app.get(path)
        seen.append(count_rows(env.engine, env.models.Item) - before)
    expected = [
        r
        for n, (_p, r, _e) in SCENARIOS.items()
        if env.backend == "postgresql" or not n.startswith("serialization")
    ]
    assert seen == expected


@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize("pyramid_env", ["postgresql"], indirect=True)
def test_the_serialization_failure_is_real(
    pyramid_env: SimpleNamespace, manager: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/serialize``'s first attempt really fails with SQLSTATE 40001, and
    sparc.sa hands it to pyramid_retry as a TransientError: with a single
    attempt, the request ends with RetryableDatabaseError."""
    from sparc.sa.exceptions import RetryableDatabaseError

    from . import pyramid_app

    # pyramid_tm re-raises a view's error `from None`, which clears its
    # __cause__: note the cause as the view raised it.
    raised: list[tuple[BaseException, BaseException | None]] = []
    view = pyramid_app.sparc_serialize

    def noting(request: Any) -> Any:
        try:
            return view(request)
        except BaseException as error:
            raised.append((error, error.__cause__))
            raise

    monkeypatch.setattr(pyramid_app, "sparc_serialize", noting)
    env = pyramid_env
    wsgi = main(engine=env.engine, models=env.models, wiring="sparc", manager=manager, attempts=1)
    with pytest.raises(RetryableDatabaseError):
        webtest.TestApp(wsgi).get("/serialize")
    assert len(raised) == 1
    error, cause = raised[0]
    assert isinstance(error, TransientError)
    assert isinstance(cause, sa.exc.DBAPIError), repr(cause)
    assert getattr(cause.orig, "sqlstate", None) == "40001"
    assert count_rows(env.engine, env.models.Item) == 0


# -- config.include("sparc.sa") -------------------------------------------------------

INCLUDED_BACKENDS = ("sqlite-file", "postgresql", "mysql")  # the app builds its own engine


def _included_cases() -> Iterator[Any]:
    for backend in INCLUDED_BACKENDS:
        for scenario in SCENARIOS:
            if scenario.startswith("serialization") and backend != "postgresql":
                continue
            yield pytest.param(backend, scenario, id=f"{backend}-{scenario}")


@pytest.fixture
def included_env(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[SimpleNamespace]:
    """Tables made through an engine of the test's own; the app gets only the
    settings, as an INI file would give them (text values)."""
    from zope.component import getSiteManager

    backend = request.param
    dsn = backend_dsn(backend, tmp_path)
    engine = make_engine(dsn)
    models = make_models()
    models.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(models.Counter.__table__).values(id=1, value=0))
    settings = {"sqlalchemy.url": dsn, "sqlalchemy.pool_size": "3", "sqlalchemy.echo": "false"}
    if backend == "postgresql":
        settings["sqlalchemy.isolation_level"] = "SERIALIZABLE"
    apps: list[Any] = []

    def make_app(lookup: str, attempts: int = 3) -> Any:
        app = included_main(settings, models=models, lookup=lookup, attempts=attempts)
        apps.append(app)
        return app

    yield SimpleNamespace(engine=engine, models=models, backend=backend, make_app=make_app)
    getSiteManager.reset()  # undo config.hook_zca()
    transaction.abort()
    left = {}
    for app in apps:
        from sparc.sa.interfaces import ISAEngine

        app_engine = app.registry.getUtility(ISAEngine)
        left[str(app_engine.url)] = app_engine.pool.checkedout()
        app_engine.dispose()
    try:
        models.Base.metadata.drop_all(engine)
    finally:
        engine.dispose()
    assert not any(left.values()), f"connections still checked out: {left}"


@pytest.mark.parametrize("lookup", LOOKUPS)
@pytest.mark.parametrize(
    ("included_env", "scenario"), list(_included_cases()), indirect=["included_env"]
)
def test_included_app_rows_per_request(
    included_env: SimpleNamespace, scenario: str, lookup: str
) -> None:
    """The cookiecutter app on ``config.include("sparc.sa")`` leaves the rows
    each request's outcome calls for, with ``request.tx`` and with the plain
    lookup after ``config.hook_zca()``."""
    from sparc.sa.interfaces import ISAEngine

    path, rows, error = SCENARIOS[scenario]
    env = included_env
    wsgi = env.make_app(lookup)
    app = webtest.TestApp(wsgi)
    if error is None:
        assert app.get(path).text == "ok"
    else:
        with pytest.raises(error):
            app.get(path)
    assert count_rows(env.engine, env.models.Item) == rows
    assert wsgi.registry.getUtility(ISAEngine).pool.checkedout() == 0


@pytest.mark.parametrize("included_env", INCLUDED_BACKENDS, indirect=True)
def test_included_app_over_waitress(included_env: SimpleNamespace) -> None:
    """The same requests over HTTP, served by waitress on 127.0.0.1 (its
    worker threads, a connection per request): 1, 0, 1, 1 (PostgreSQL), 0 new
    rows, then 0 for the doomed one, and 500 for the requests that fail."""
    import urllib.error
    import urllib.request

    from webtest.http import StopableWSGIServer

    env = included_env
    server = StopableWSGIServer.create(env.make_app("request"), host="127.0.0.1")
    try:
        # Listening since create(): requests wait in the backlog until its
        # thread serves them (server.wait() would leave a socket open).
        assert server.adj.host == "127.0.0.1"
        seen = []
        for name, (path, _rows, error) in SCENARIOS.items():
            if name.startswith("serialization") and env.backend != "postgresql":
                continue
            before = count_rows(env.engine, env.models.Item)
            try:
                with urllib.request.urlopen(server.application_url + path[1:], timeout=20) as r:
                    status, body = r.status, r.read()
            except urllib.error.HTTPError as exc:
                with exc:
                    status, body = exc.code, b""
            assert (status, body) == ((200, b"ok") if error is None else (500, b"")), name
            seen.append(count_rows(env.engine, env.models.Item) - before)
    finally:
        server.shutdown()
        server.runner.join(timeout=10)
    assert not server.runner.is_alive(), "waitress did not stop"
    expected = [
        r
        for n, (_p, r, _e) in SCENARIOS.items()
        if env.backend == "postgresql" or not n.startswith("serialization")
    ]
    assert seen == expected


@pytest.mark.parametrize("included_env", ["sqlite-file"], indirect=True)
def test_include_builds_the_engine_from_the_settings(included_env: SimpleNamespace) -> None:
    """``sqlalchemy.`` settings (text, as from an INI file) become the engine
    of the app registry's unnamed ISAEngine utility, converted."""
    from sparc.sa.interfaces import ISAEngine

    app = included_env.make_app("request")
    engine = app.registry.getUtility(ISAEngine)
    assert engine.url.database == included_env.engine.url.database
    assert engine.pool.size() == 3
    assert engine.echo is False


def test_include_registers_what_configure_zcml_registers() -> None:
    """The app registry gets the same factory, adapters and utilities as the
    global registry gets from configure.zcml, without any ZCML."""
    from pyramid.config import Configurator
    from zope.component import getGlobalSiteManager
    from zope.configuration import xmlconfig
    from zope.interface.interfaces import IInterface

    import sparc.sa

    with Configurator(settings={}) as config:
        config.include("sparc.sa")
    with Configurator(settings={}) as plain:  # Pyramid's own registrations
        pass
    xmlconfig.file("configure.zcml", package=sparc.sa)

    def registrations(registry: Any) -> tuple[set[Any], set[Any]]:
        adapters = {
            (tuple(r.required), r.provided, r.name, r.factory)
            for r in registry.registeredAdapters()
        }
        utilities = {
            (r.provided, r.name, type(r.component) if r.name == "" else r.component)
            for r in registry.registeredUtilities()
            if not r.provided.isOrExtends(IInterface)
        }
        return adapters, utilities

    # Pyramid's own registrations, and request.tx's (an IRequestExtensions).
    pyramid_own = registrations(plain.registry)
    included = tuple(
        {
            r
            for r in mine
            if r[:-1] not in {p[:-1] for p in own}
            and not r[1 if len(r) == 4 else 0].__module__.startswith("pyramid.")
        }
        for mine, own in zip(registrations(config.registry), pyramid_own, strict=True)
    )
    zcml = registrations(getGlobalSiteManager())
    assert included == zcml
    assert len(included[0]) >= 9 and len(included[1]) >= 8


def _bare_app(settings: dict[str, Any], *, hook_zca: bool = False) -> Any:
    from pyramid.config import Configurator

    with Configurator(settings=settings) as config:
        if hook_zca:
            config.hook_zca()
        config.include("sparc.sa")
        return config.make_wsgi_app()


def test_lookup_with_and_without_hook_zca() -> None:
    """Without hook_zca, the app registry (passed, or its own method) finds the
    manager and a bare getMultiAdapter() says where to look; with hook_zca,
    the bare lookup finds it during a request."""
    from pyramid.scripting import prepare
    from zope.component import getMultiAdapter, getSiteManager

    from sparc.sa.interfaces import ISAEngine, ISAScopedTransaction
    from sparc.sa.mismatch import NotRegisteredError

    models = make_models()
    app = _bare_app({"sqlalchemy.url": "sqlite://", "sparc.sa.base": models.Base})
    registry = app.registry
    engine = registry.getUtility(ISAEngine)
    manager = registry.getMultiAdapter((engine, models.Base), ISAScopedTransaction)
    assert getMultiAdapter((engine, models.Base), ISAScopedTransaction, context=registry) is manager
    with pytest.raises(NotRegisteredError, match=r"config\.hook_zca\(\).*request\.registry"):
        getMultiAdapter((engine, models.Base), ISAScopedTransaction)
    env = prepare(registry=registry)
    try:
        assert env["request"].tx is manager
    finally:
        env["closer"]()
    engine.dispose()

    app = _bare_app({"sqlalchemy.url": "sqlite://"}, hook_zca=True)
    try:
        engine = app.registry.getUtility(ISAEngine)
        env = prepare(registry=app.registry)
        try:
            found = getMultiAdapter((engine, models.Base), ISAScopedTransaction)
            assert found is app.registry.getMultiAdapter(
                (engine, models.Base), ISAScopedTransaction
            )
        finally:
            env["closer"]()
        engine.dispose()
    finally:
        getSiteManager.reset()


def test_forgotten_zcml_include_says_what_to_include(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine from the factory, and no configure.zcml: the lookup's error
    names the include (a ComponentLookupError still)."""
    from zope.component import ComponentLookupError, getMultiAdapter

    from sparc.sa import mismatch
    from sparc.sa.engine import engine_from_config
    from sparc.sa.interfaces import ISAScopedTransaction

    monkeypatch.setattr(mismatch, "_in_pyramid_registry", False)
    engine = engine_from_config({"dsn": "sqlite://"})
    try:
        with pytest.raises(ComponentLookupError, match=re.escape('<include package="sparc.sa" />')):
            getMultiAdapter((engine, make_models().Base), ISAScopedTransaction)
    finally:
        engine.dispose()


def test_request_tx_without_a_base_says_what_to_set() -> None:
    from pyramid.scripting import prepare

    from sparc.sa.interfaces import ISAEngine

    app = _bare_app({"sqlalchemy.url": "sqlite://"})
    env = prepare(registry=app.registry)
    try:
        with pytest.raises(LookupError, match=r"'sparc\.sa\.base'"):
            env["request"].tx  # noqa: B018
    finally:
        env["closer"]()
        app.registry.getUtility(ISAEngine).dispose()


def test_include_without_an_engine_setting_registers_no_engine() -> None:
    from pyramid.scripting import prepare

    from sparc.sa.pyramid import request_transaction

    app = _bare_app({})
    env = prepare(registry=app.registry)
    try:
        with pytest.raises(LookupError, match=r"'sqlalchemy\.url'"):
            request_transaction(env["request"], make_models().Base)
    finally:
        env["closer"]()


def test_import_sparc_sa_does_not_import_pyramid() -> None:
    import subprocess
    import sys

    code = "import sys, sparc.sa; sparc.sa.includeme; print('pyramid' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


def test_an_engine_handed_over_in_the_settings_is_registered_as_is() -> None:
    """``sparc.sa.engine`` (the cookiecutter's ``dbengine`` test hook): that
    engine, and none built from the ``sqlalchemy.`` settings; anything else
    there is refused with the setting's name."""
    from sparc.sa.engine import engine_from_config
    from sparc.sa.interfaces import ISAEngine

    mine = engine_from_config({"dsn": "sqlite://"})
    app = _bare_app({"sparc.sa.engine": mine, "sqlalchemy.url": "postgresql+nosuch://h/d"})
    assert app.registry.getUtility(ISAEngine) is mine
    mine.dispose()
    with pytest.raises(TypeError, match=r"setting 'sparc\.sa\.engine' must be an engine"):
        _bare_app({"sparc.sa.engine": "sqlite://"})
