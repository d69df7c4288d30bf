"""<sa:engine> and <sa:transaction>, as a site uses them."""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import sys
import textwrap
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool
from zope import component
from zope.configuration import xmlconfig
from zope.configuration.config import ConfigurationConflictError
from zope.configuration.exceptions import ConfigurationError

from sparc.sa.interfaces import IEngineCreatedEvent, ISAEngine, ISAScopedTransaction
from sparc.sa.zcml import NAMESPACE

from .conftest import server_dsn

HEAD = f"""<configure xmlns="http://namespaces.zope.org/zope" xmlns:sa="{NAMESPACE}">
  <include package="sparc.sa" />"""


@pytest.fixture
def app(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """An importable application module with a declarative base and unique tables."""
    token = uuid.uuid4().hex[:10]
    name = f"siteapp_{token}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            import sqlalchemy as sa
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
            from zope.component import adapter
            from sparc.sa.interfaces import IEngineCreatedEvent

            class Base(DeclarativeBase):
                pass

            class Item(Base):
                __tablename__ = "sparc_site_item_{token}"
                id: Mapped[int] = mapped_column(primary_key=True)
                name: Mapped[str] = mapped_column(sa.String(40))

            class Parent(Base):
                __tablename__ = "sparc_site_parent_{token}"
                id: Mapped[int] = mapped_column(primary_key=True)

            class Child(Base):
                __tablename__ = "sparc_site_child_{token}"
                id: Mapped[int] = mapped_column(primary_key=True)
                parent_id: Mapped[int] = mapped_column(sa.ForeignKey(Parent.id))

            events = []

            @adapter(IEngineCreatedEvent)
            def remember(event):
                events.append(event)

            not_a_base = object()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    yield SimpleNamespace(name=name, module=module, dir=tmp_path)
    sys.modules.pop(name, None)


def write(directory: pathlib.Path, body: str, name: str = "site.zcml") -> pathlib.Path:
    path = directory / name
    path.write_text(f"{HEAD}\n{textwrap.dedent(body)}\n</configure>\n")
    return path


def load(path: pathlib.Path) -> None:
    xmlconfig.file(str(path))


def test_site_with_two_engines_and_their_transactions(
    app: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SITE_PG", server_dsn("postgresql"))
    monkeypatch.setenv("SITE_SQLITE", f"sqlite:///{app.dir / 'site.db'}")
    site = write(
        app.dir,
        f"""
        <subscriber handler="{app.name}.remember" />
        <sa:engine name="local" dsn="${{SITE_SQLITE}}" pool_size="2" />
        <sa:engine name="pg" dsn="${{SITE_PG}}" pool_size="3" max_overflow="0"
                   connect_args.application_name="sparc-site-test" />
        <sa:transaction name="local" engine="local" base="{app.name}.Base" />
        <sa:transaction name="pg" engine="pg" base="{app.name}.Base" />
        """,
    )
    load(site)
    Item = app.module.Item
    engines = dict(component.getUtilitiesFor(ISAEngine))
    assert sorted(engines) == ["local", "pg"]
    try:
        for name, engine in engines.items():
            transaction = component.getUtility(ISAScopedTransaction, name=name)
            assert transaction is component.getMultiAdapter(
                (engine, app.module.Base), ISAScopedTransaction
            )
            assert transaction.engine is engine
            app.module.Base.metadata.create_all(engine)
            with transaction():
                transaction.session.add(Item(id=1, name=f"via-{name}"))
            with pytest.raises(RuntimeError), transaction():
                transaction.session.add(Item(id=2, name="rolled back"))
                raise RuntimeError("roll this block back")
            with engine.connect() as conn:
                kept = conn.execute(sa.select(Item.name)).scalars().all()
            assert kept == [f"via-{name}"]
        with engines["pg"].connect() as conn:
            assert conn.exec_driver_sql("show application_name").scalar() == "sparc-site-test"
        assert engines["pg"].pool.size() == 3
        # the subscriber saw each engine once, with the configuration
        assert sorted(e.config["dsn"] for e in app.module.events) == sorted(
            e.url.render_as_string(hide_password=True) for e in engines.values()
        )
        assert [e.engine for e in app.module.events].count(engines["pg"]) == 1
    finally:
        for engine in engines.values():
            component.getUtility(ISAScopedTransaction, name="pg").session.close()
            app.module.Base.metadata.drop_all(engine)
            engine.dispose()


def test_every_option_as_an_attribute_converted_from_text(app: SimpleNamespace) -> None:
    load(
        write(
            app.dir,
            """
            <sa:engine dsn="sqlite://" poolclass="NullPool" echo="no" hide_parameters="yes"
                       isolation_level="read uncommitted" query_cache_size="0"
                       execution_options.stream_results="true"
                       connect_args.timeout="7" connect_args.uri="false"
                       connect_args.check_same_thread="false" />
            """,
        )
    )
    engine = component.getUtility(ISAEngine)
    seen: dict[str, Any] = {}
    sa.event.listen(engine, "do_connect", lambda d, r, a, kw: seen.update(kw))
    with engine.connect() as conn:
        assert conn.get_isolation_level() == "READ UNCOMMITTED"
    assert type(engine.pool) is NullPool
    assert engine.echo is False and engine.hide_parameters is True
    assert engine.get_execution_options()["stream_results"] is True
    assert seen == {"timeout": 7, "uri": False, "check_same_thread": False}


def test_config_file_relative_to_the_zcml_file_and_overridden_by_attributes(
    app: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOL_RECYCLE", "1800")
    conf = app.dir / "conf"
    conf.mkdir()
    (conf / "engine.yaml").write_text(
        "SQLAlchemyEngine:\n"
        f"  dsn: sqlite:///{app.dir / 'f.db'}\n"
        "  kwargs:\n"
        "    pool_size: 4\n"
        "    pool_recycle: ${POOL_RECYCLE}\n"
        "    connect_args: {timeout: 3}\n"
    )
    load(
        write(
            conf,
            '<sa:engine name="f" config="engine.yaml" pool_size="6" connect_args.uri="false" />',
        )
    )
    engine = component.getUtility(ISAEngine, name="f")
    assert engine.pool.size() == 6 and engine.pool._recycle == 1800
    seen: dict[str, Any] = {}
    sa.event.listen(engine, "do_connect", lambda d, r, a, kw: seen.update(kw))
    with engine.connect():
        pass
    assert seen["timeout"] == 3 and seen["uri"] is False
    engine.dispose()


def test_environment_defaults_and_dollar_escape(
    app: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UNSET_POOL", raising=False)
    monkeypatch.setenv("EMPTY", "")
    load(
        write(
            app.dir,
            """
            <sa:engine dsn="sqlite://" poolclass="${UNSET_POOL:-NullPool}"
                       logging_name="cost$$${EMPTY:-x}" />
            """,
        )
    )
    engine = component.getUtility(ISAEngine)
    assert type(engine.pool) is NullPool
    assert engine.logging_name == "cost$x"


def test_engines_are_built_when_actions_run_not_when_parsed(app: SimpleNamespace) -> None:
    seen: list[object] = []
    component.provideHandler(seen.append, [IEngineCreatedEvent])
    import sparc.sa

    context = xmlconfig.file("configure.zcml", package=sparc.sa, execute=False)
    xmlconfig.string(
        f'{HEAD}<sa:engine dsn="sqlite://" /></configure>', context=context, execute=False
    )
    assert seen == []
    context.execute_actions()
    assert len(seen) == 1


# -- mistakes ---------------------------------------------------------------------


def error_of(path: pathlib.Path) -> str:
    with pytest.raises((ConfigurationError, ConfigurationConflictError)) as raised:
        load(path)
    return str(raised.value)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('<sa:engine dsn="sqlite://" pool_sise="3" />', ["'pool_sise'", "'pool_size'"]),
        ('<sa:engine dsn="sqlite://" pool_size="three" />', ["'pool_size'", "'three'"]),
        ('<sa:engine dsn="sqlite://" pool_pre_ping="perhaps" />', ["'pool_pre_ping'"]),
        ('<sa:engine dsn="sqlite://" poolclass="NoPool" />', ["'poolclass'", "NoPool"]),
        ('<sa:engine dsn="sqlite://" echo.level="1" />', ["'echo.level'", "connect_args.KEY"]),
        ('<sa:engine pool_size="3" />', ["'dsn'"]),
        ('<sa:engine dsn="${SPARC_SA_SURELY_UNSET}" />', ["'SPARC_SA_SURELY_UNSET'", "'dsn'"]),
        ('<sa:engine dsn="nosuch://h/d" />', ["nosuch"]),
        ('<sa:engine config="missing.yaml" />', ["'config'", "missing.yaml"]),
        ('<sa:engine config="bad.yaml" />', ["'config'", "bad.yaml", "line 2"]),
        ('<sa:engine config="empty.yaml" />', ["'config'", "empty.yaml", "no engine config"]),
        (
            '<sa:engine dsn="sqlite://" /><sa:transaction engine="other" base="{app}.Base" />',
            ["'engine'", "'other'", "registered engines: ''"],
        ),
        ('<sa:engine dsn="sqlite://" /><sa:transaction base="{app}.not_a_base" />', ["'base'"]),
        (
            '<sa:engine dsn="sqlite://" /><sa:transaction base="{app}.Item.nope" />',
            ["'base'", "cannot import", ".Item.nope"],
        ),
        ('<sa:transaction base="{app}.Base" />', ["no <sa:engine> named ''"]),
    ],
)
def test_bad_configuration_fails_at_configuration_time_with_file_and_line(
    app: SimpleNamespace, body: str, words: list[str]
) -> None:
    (app.dir / "bad.yaml").write_text("SQLAlchemyEngine:\n  dsn: [unclosed\n")
    (app.dir / "empty.yaml").write_text("# nothing here\n")
    site = write(app.dir, body.replace("{app}", app.name))
    message = error_of(site)
    assert str(site) in message and "line 3" in message, message
    for word in words:
        assert word in message, (word, message)
    assert not list(component.getUtilitiesFor(ISAScopedTransaction))


def test_conflicting_names_are_conflicts(app: SimpleNamespace) -> None:
    message = error_of(
        write(
            app.dir, '<sa:engine name="x" dsn="sqlite://" /><sa:engine name="x" dsn="sqlite://" />'
        )
    )
    assert "Conflicting configuration actions" in message and "'x'" in message
    message = error_of(
        write(
            app.dir,
            f"""
            <sa:engine name="y" dsn="sqlite://" />
            <utility name="y" provides="sparc.sa.interfaces.ISAEngine"
                     component="{app.name}.not_a_base" />
            """,
        )
    )
    assert "Conflicting configuration actions" in message


@pytest.mark.parametrize(
    "body",
    [
        '<sa:engine dsn="postgresql+psycopg://u:hunter2@h/d" pool_sise="1" />',
        '<sa:engine dsn="postgresql+psycopg://u:hunter2@h/d" pool_size="x" />',
        '<sa:engine dsn="postgresql+psycopg://u@h/d" connect_args.password="hunter2"\n'
        '           pool_size="x" />',
        '<sa:engine name="n" dsn="postgresql+psycopg://u:hunter2@h/d" />'
        '<sa:engine name="n" dsn="sqlite://" />',
        '<sa:engine dsn="postgresql+psycopg://u:hunter2@h/d" />'
        '<sa:transaction engine="nope" base="{app}.Base" />',
        '<sa:engine dsn="postgresql+psycopg://u@h/d" connect_args.api_key="hunter2"\n'
        '           pool_sise="1" />',
    ],
)
def test_password_never_in_configuration_errors(app: SimpleNamespace, body: str) -> None:
    message = error_of(write(app.dir, body.replace("{app}", app.name)))
    assert "hunter2" not in message, message


def test_the_sqlite_foreign_keys_subscriber(app: SimpleNamespace) -> None:
    load(
        write(
            app.dir,
            f"""
            <subscriber handler="sparc.sa.events.sqlite_foreign_keys" />
            <sa:engine dsn="sqlite://" />
            <sa:transaction base="{app.name}.Base" />
            """,
        )
    )
    transaction = component.getUtility(ISAScopedTransaction)
    app.module.Base.metadata.create_all(transaction.engine)
    with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"), transaction():
        transaction.session.add(app.module.Child(id=1, parent_id=42))
    with transaction():
        transaction.session.add(app.module.Parent(id=42))
        transaction.session.flush()
        transaction.session.add(app.module.Child(id=1, parent_id=42))
    transaction.engine.dispose()


def test_plone_finds_the_package_through_z3c_autoinclude() -> None:
    points = importlib.metadata.entry_points(group="z3c.autoinclude.plugin")
    ours = [p for p in points if p.dist is not None and p.dist.name in ("sparc.sa", "sparc_sa")]
    assert [(p.name, p.value) for p in ours] == [("target", "plone")]


def test_check_command_checks_every_engine_of_a_zcml_file(app: SimpleNamespace) -> None:
    import subprocess

    site = write(
        app.dir,
        f"""
        <sa:engine name="one" dsn="sqlite://" />
        <sa:engine name="two" dsn="sqlite:///{app.dir / "two.db"}" />
        """,
    )
    result = subprocess.run(
        [sys.executable, "-m", "sparc.sa", "check", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "engine 'one': OK" in result.stdout and "engine 'two': OK" in result.stdout
    bad = write(app.dir, '<sa:engine dsn="sqlite://" pool_size="x" />', "bad.zcml")
    result = subprocess.run(
        [sys.executable, "-m", "sparc.sa", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "bad.zcml" in result.stderr and "'pool_size'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_join_mode_sets_the_shared_manager(app: SimpleNamespace) -> None:
    load(
        write(
            app.dir,
            f"""
            <sa:engine dsn="sqlite://" />
            <sa:transaction name="a" base="{app.name}.Base" join="never" />
            <sa:transaction name="b" base="{app.name}.Base" join="never" />
            """,
        )
    )
    manager = component.getUtility(ISAScopedTransaction, name="a")
    assert manager is component.getUtility(ISAScopedTransaction, name="b")
    assert manager.join == "never"
    engine = component.getUtility(ISAEngine)
    assert component.getMultiAdapter((engine, app.module.Base), ISAScopedTransaction) is manager
    engine.dispose()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            '<sa:engine dsn="sqlite://" />'
            '<sa:transaction name="a" base="{app}.Base" join="never" />\n'
            '  <sa:transaction name="b" base="{app}.Base" join="always" />',
            ["disagrees", "join='never'", "site.zcml"],
        ),
        (
            '<sa:engine dsn="sqlite://" /><sa:transaction base="{app}.Base" join="maybe" />',
            ["'join' must be 'auto', 'always' or 'never'", "'maybe'"],
        ),
        (
            '<sa:engine dsn="sqlite://" /><sa:transaction base="{app}.Base" twophase="true" />',
            ["'twophase' is not supported by SQLite"],
        ),
        (
            '<sa:engine dsn="sqlite://" /><sa:transaction base="{app}.Item" />',
            ["mapped model class", "declarative base"],
        ),
    ],
)
def test_bad_join_configuration_is_a_configuration_error(
    app: SimpleNamespace, body: str, words: list[str]
) -> None:
    message = error_of(write(app.dir, body.replace("{app}", app.name)))
    for word in words:
        assert word in message, (word, message)
    for _, engine in component.getUtilitiesFor(ISAEngine):
        engine.dispose()


@pytest.mark.parametrize("server", ["postgresql", "mysql"])
def test_the_migration_guides_rows_verbatim_give_zope_sqlalchemys_outcomes(
    app: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, server: str
) -> None:
    """A z3c.saconfig site moved with docs/migrating.rst's rows (no ``join``
    attribute), and a script under ``transaction.manager.attempts(3)``: a
    success 1 row, an error after the block 0, a TransientError on the first
    attempt 1 after a retry, a doom 0."""
    transaction = pytest.importorskip("transaction")
    from transaction.interfaces import DoomedTransaction, TransientError

    monkeypatch.setenv("SITE_DSN", server_dsn(server))
    load(
        write(
            app.dir,
            f"""
            <sa:engine name="" dsn="${{SITE_DSN}}" />
            <sa:transaction name="" engine="" base="{app.name}.Base" />
            """,
        )
    )
    engine = component.getUtility(ISAEngine)
    Item = app.module.Item
    app.module.Base.metadata.create_all(engine)
    tx = component.getUtility(ISAScopedTransaction)

    def attempts(body: Any) -> int:
        ran = 0
        for attempt in transaction.manager.attempts(3):
            with attempt:
                ran += 1
                body(ran)
        return ran

    def write_row(name: str) -> None:
        with tx():
            tx.session.add(Item(name=name))

    def count() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(Item.__table__)).scalar_one()

    def after_the_block(n: int) -> None:
        write_row("error after the block")
        raise ValueError("after the block")

    def transient(n: int) -> None:
        write_row(f"transient {n}")
        if n == 1:
            raise TransientError("again")

    def doomed(n: int) -> None:
        write_row("doomed")
        transaction.get().doom()

    try:
        assert attempts(lambda n: write_row("success")) == 1
        assert count() == 1
        with pytest.raises(ValueError, match="after the block"):
            attempts(after_the_block)
        assert count() == 1
        assert attempts(transient) == 2
        assert count() == 2
        with pytest.raises(DoomedTransaction):
            attempts(doomed)
        assert count() == 2
        assert engine.pool.checkedout() == 0
    finally:
        transaction.abort()
        app.module.Base.metadata.drop_all(engine)
        engine.dispose()
