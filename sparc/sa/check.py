"""``sparc-sa check`` / ``python -m sparc.sa check``: prove a database works end to end.

The check does what an application does: it loads sparc.sa's ZCML, builds
the engine through the registered factory, and runs transactions through the
ISAScopedTransaction adapter on a table of its own, which it drops again.

Exit status: 0 when every engine passed, 1 when a check failed (unreachable
server, wrong result), 2 for bad usage or configuration. Failures are
reported in one line, and the password is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import re
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from xml.sax import SAXParseException

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.util import greenlet_spawn

from sparc.sa import options, replicas
from sparc.sa.foreign.of_sqlalchemy import max_overflow
from sparc.sa.foreign.of_zope_configuration import error_details
from sparc.sa.tx import liveness

if TYPE_CHECKING:  # needs greenlet at run time
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["CheckFailed", "Report", "check_engine", "main"]

DEFAULT_TARGET = "sqlite://"


class CheckFailed(Exception):
    """The database did not behave; the message is one line for the user."""


class ConfigProblem(Exception):
    """The target or its configuration is unusable; exit status 2."""


@dataclass
class Report:
    name: str
    url: str
    dialect: str
    driver: str
    server_version: str
    pool: str
    pre_ping: bool
    isolation_level: str
    round_trip_ms: float
    prepared: list[str] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        label = f" {self.name!r}" if self.name else ""
        return [
            f"engine{label}: OK",
            f"  url             {self.url}",
            f"  dialect         {self.dialect} (driver {self.driver})",
            f"  server version  {self.server_version}",
            f"  pool            {self.pool}",
            f"  pre-ping        {'on' if self.pre_ping else 'off'}",
            f"  isolation level {self.isolation_level}",
            f"  round trip      {self.round_trip_ms:.2f} ms (median of 5 SELECT 1)",
            "  transactions    committed 1 row, rolled back 1 row: table holds 1 row",
            *self._prepared_lines(),
            *self.replicas,
        ]

    def _prepared_lines(self) -> list[str]:
        if not self.prepared:
            return []
        return [
            f"  prepared        {len(self.prepared)} prepared transaction(s) left behind, "
            "holding their locks until resolved (see docs/zope.rst, Two-phase commit):",
            *(f"                  {gid}" for gid in self.prepared),
        ]


def check_engine(engine: Engine, name: str = "") -> Report:
    """Run the check against *engine*; raise CheckFailed with a one-line reason."""
    shown = options.hide_dsn(engine.url)
    try:
        with engine.connect() as conn:
            isolation = str(conn.get_isolation_level())
            timings = []
            for _ in range(5):
                start = time.perf_counter()
                conn.exec_driver_sql("SELECT 1").scalar()
                timings.append((time.perf_counter() - start) * 1000)
            server_version = _server_version(conn)
        _probe(engine, shown)
    except sa.exc.SQLAlchemyError as exc:  # DBAPIError (unreachable, refused...) included
        raise CheckFailed(f"{shown}: {_one_line(exc, engine)}") from None
    except (CheckFailed, ConfigProblem):
        raise
    except OSError as exc:  # some drivers raise these unwrapped
        raise CheckFailed(f"{shown}: {_one_line(exc, engine)}") from None
    except Exception as exc:
        raise _driver_refused(exc, shown) from None
    try:
        prepared = prepared_transactions(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise CheckFailed(
            f"{shown}: listing prepared transactions: {_one_line(exc, engine)}"
        ) from None
    return Report(
        name=name,
        url=shown,
        dialect=_dialect_text(engine),
        driver=engine.driver,
        server_version=server_version,
        pool=_pool_text(engine.pool),
        pre_ping=liveness.is_checked(engine),
        isolation_level=isolation,
        round_trip_ms=statistics.median(timings),
        prepared=prepared,
        replicas=replicas.describe_lines(engine),
    )


async def check_async_engine(engine: AsyncEngine, name: str = "") -> Report:
    """:func:`check_engine` for an AsyncEngine, through ISAAsyncScopedTransaction."""
    shown = options.hide_dsn(engine.url)
    try:
        try:
            async with engine.connect() as conn:
                isolation = str(await conn.get_isolation_level())
                timings = []
                for _ in range(5):
                    start = time.perf_counter()
                    (await conn.exec_driver_sql("SELECT 1")).scalar()
                    timings.append((time.perf_counter() - start) * 1000)
                server_version = await conn.run_sync(_server_version)
            await _probe_async(engine, shown)
            async with engine.connect() as conn:
                prepared = await conn.run_sync(_prepared_on)
            # The replicas' lines, as for a threaded engine; their probes run
            # on the replicas' own engines through the greenlet bridge.
            replica_lines = await greenlet_spawn(replicas.describe_lines, engine.sync_engine)
        except sa.exc.SQLAlchemyError as exc:
            raise CheckFailed(f"{shown}: {_one_line(exc, engine.sync_engine)}") from None
        except OSError as exc:  # some asyncio drivers raise these unwrapped
            raise CheckFailed(f"{shown}: {_one_line(exc, engine.sync_engine)}") from None
        except (CheckFailed, ConfigProblem):
            raise
        except Exception as exc:
            raise _driver_refused(exc, shown) from None
    finally:
        await engine.dispose()
    sync_engine = engine.sync_engine
    return Report(
        name=name,
        url=shown,
        dialect=_dialect_text(sync_engine),
        driver=f"{sync_engine.driver}, asyncio",
        server_version=server_version,
        pool=_pool_text(sync_engine.pool),
        pre_ping=liveness.is_checked(sync_engine),
        isolation_level=isolation,
        round_trip_ms=statistics.median(timings),
        prepared=prepared,
        replicas=replica_lines,
    )


def _probe(engine: Engine, shown: str) -> None:
    """A block that commits and one that rolls back, through the shared
    ISAScopedTransaction, on a table of its own made and dropped here."""
    from zope.component import getMultiAdapter

    from sparc.sa.interfaces import ISAScopedTransaction

    Base, Probe = _probe_models()
    Base.metadata.create_all(engine)
    try:
        transaction = getMultiAdapter((engine, Base), ISAScopedTransaction)
        with transaction():
            transaction.session.add(Probe(id=1, note="committed"))
        try:
            with transaction():
                transaction.session.add(Probe(id=2, note="rolled back"))
                transaction.session.flush()
                raise _RollMeBack
        except _RollMeBack:
            pass
        with transaction():
            notes = transaction.session.scalars(sa.select(Probe.note)).all()
        if notes != ["committed"]:
            raise CheckFailed(f"{shown}: expected only the committed row, found {notes!r}")
    finally:
        Base.metadata.drop_all(engine)


async def _probe_async(engine: AsyncEngine, shown: str) -> None:
    """:func:`_probe` through ISAAsyncScopedTransaction."""
    from zope.component import getMultiAdapter

    from sparc.sa.interfaces import ISAAsyncScopedTransaction

    Base, Probe = _probe_models()
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    try:
        transaction = getMultiAdapter((engine, Base), ISAAsyncScopedTransaction)
        async with transaction() as session:
            session.add(Probe(id=1, note="committed"))
        try:
            async with transaction() as session:
                session.add(Probe(id=2, note="rolled back"))
                await session.flush()
                raise _RollMeBack
        except _RollMeBack:
            pass
        async with transaction() as session:
            notes = list((await session.scalars(sa.select(Probe.note))).all())
        if notes != ["committed"]:
            raise CheckFailed(f"{shown}: expected only the committed row, found {notes!r}")
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)


def _server_version(conn: sa.Connection) -> str:
    if conn.dialect.name == "sqlite":
        import sqlite3

        return sqlite3.sqlite_version
    version = conn.dialect.server_version_info
    return ".".join(str(p) for p in version or ()) or "unknown"


def _dialect_text(engine: Engine) -> str:
    mariadb = getattr(engine.dialect, "is_mariadb", False)
    return engine.dialect.name + (", MariaDB server" if mariadb else "")


def _probe_models() -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Probe(Base):
        __tablename__ = f"sparc_sa_check_{uuid.uuid4().hex[:12]}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        note: Mapped[str] = mapped_column(sa.String(40))

    return Base, Probe


def _pool_text(pool: Any) -> str:
    size = getattr(pool, "size", None)
    text = type(pool).__name__
    if callable(size):
        text += f", size {size()}, max overflow {max_overflow(pool, '?')}"
    elif isinstance(pool, sa.pool.StaticPool):
        text += ", one connection shared by all threads"
    return text


def prepared_transactions(engine: Engine) -> list[str]:
    """The prepared (two-phase) transactions waiting on the server: a crash
    between PREPARE and COMMIT leaves them holding their locks."""
    with engine.connect() as conn:
        return _prepared_on(conn)


def _prepared_on(conn: sa.Connection) -> list[str]:
    name = conn.dialect.name
    if name == "postgresql":
        rows = conn.exec_driver_sql(
            "SELECT gid, prepared, owner FROM pg_prepared_xacts "
            "WHERE database = current_database() ORDER BY prepared"
        ).all()
        return [
            f"{gid} (prepared {when:%Y-%m-%d %H:%M:%S}, by {owner})" for gid, when, owner in rows
        ]
    if name in ("mysql", "mariadb"):
        return [str(row[3]) for row in conn.exec_driver_sql("XA RECOVER").all()]
    return []


class _RollMeBack(Exception):
    pass


def _one_line(exc: Exception, engine: Engine) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    line = text[0] if text else type(orig).__name__
    password = engine.url.password
    if password:
        line = line.replace(str(password), "***")
    return f"{type(orig).__name__}: {options.hide_secrets_in_text(line)}"


# -- targets ------------------------------------------------------------------


def load_zcml(path: pathlib.Path | None = None) -> None:
    """Load sparc.sa's configure.zcml, then the site file *path* if given."""
    from zope.configuration import xmlconfig

    import sparc.sa

    context = xmlconfig.file("configure.zcml", package=sparc.sa, execute=False)
    if path is not None:
        xmlconfig.file(str(path.resolve()), context=context, execute=False)
    context.execute_actions()


_DETAIL = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


def zcml_problem(exc: BaseException, path: pathlib.Path) -> str:
    """'<file>, line <n>: <message>' for an error zope.configuration raised."""
    where, line, message = str(path), None, ""
    evalue = getattr(exc, "evalue", None)
    info = getattr(exc, "info", None)
    if isinstance(evalue, SAXParseException):
        where = evalue.getSystemId() or where
        line, message = evalue.getLineNumber(), evalue.getMessage()
    elif isinstance(evalue, BaseException):
        if getattr(info, "file", None):
            where, line = info.file, info.line  # type: ignore[union-attr]
        message = f"{type(evalue).__name__}: {evalue}"
    else:
        parts = [" ".join(str(arg) for arg in exc.args)]
        for detail in error_details(exc) or ():
            found = _DETAIL.search(str(detail))
            if found:
                where, line = found["file"], int(found["line"])
            else:  # what went wrong underneath, minus the exception's module path
                parts.append(re.sub(r"^[\w.]+\.(\w+): ", r"\1: ", str(detail)))
        message = ": ".join(parts)
    message = options.hide_secrets_in_text(" ".join(message.split()))
    return f"{where}, line {line}: {message}" if line is not None else f"{where}: {message}"


def engines_for(target: str) -> list[tuple[str, Engine | AsyncEngine]]:
    """Build the engines *target* names: a DSN, a YAML file or a ZCML file."""
    from zope.component import createObject, getUtilitiesFor

    from sparc.sa.engine import FACTORY_NAME
    from sparc.sa.interfaces import ISAAsyncEngine, ISAEngine

    path = pathlib.Path(target)
    looks_like_file = "://" not in target and (path.suffix or path.exists())
    if looks_like_file and path.suffix.lower() == ".zcml":
        if not path.is_file():
            raise ConfigProblem(f"no such ZCML file: {target!r}")
        try:
            load_zcml(path)
        except Exception as exc:
            raise ConfigProblem(zcml_problem(exc, path)) from None
        found = sorted(
            [*getUtilitiesFor(ISAEngine), *getUtilitiesFor(ISAAsyncEngine)],
            key=lambda item: item[0],
        )
        if not found:
            raise ConfigProblem(f"{target!r} declares no <sa:engine>")
        return [(name or "(unnamed)", engine) for name, engine in found]
    try:
        load_zcml()
        if looks_like_file:
            config: Any = options.read_config_file(path)
        else:
            config = {"dsn": target}
        return [("", createObject(FACTORY_NAME, config))]
    except (TypeError, ValueError, ImportError) as exc:
        raise ConfigProblem(str(exc)) from None
    except RecursionError:
        raise ConfigProblem(f"{target!r}: nested too deeply") from None
    except Exception as exc:  # e.g. sqlalchemy.exc.ArgumentError from create_engine()
        raise ConfigProblem(options.hide_secrets_in_text(f"{type(exc).__name__}: {exc}")) from None


def installed_version() -> str:
    """sparc.sa's version as installed (its distribution's metadata)."""
    from importlib import metadata

    try:
        return metadata.version("sparc.sa")
    except metadata.PackageNotFoundError:
        return "(not installed: no distribution metadata for sparc.sa)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparc-sa",
        description="sparc.sa: SQLAlchemy engines and scoped transactions for Zope.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="build the engine(s) and run a committed and a rolled-back transaction",
        description=(
            "Build an engine through sparc.sa's registered factory, run one "
            "committed and one rolled-back transaction through the "
            "ISAScopedTransaction adapter on a temporary table, and report."
        ),
    )
    check.add_argument(
        "target",
        nargs="?",
        default=DEFAULT_TARGET,
        help=(
            "a SQLAlchemy URL, a YAML file in the configure.yaml shape, or a ZCML "
            "file whose <sa:engine> declarations are all checked "
            f"(default: {DEFAULT_TARGET}, an in-memory SQLite database)"
        ),
    )
    args = parser.parse_args(argv)
    try:
        return _run(args.target)
    except BrokenPipeError:
        # The reader went away (``sparc-sa check | head -1``): say nothing more,
        # and let the interpreter's last flush write to nowhere, not raise.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("sparc-sa check: interrupted", file=sys.stderr)
        return 130


def _run(target: str) -> int:
    try:
        engines = engines_for(target)
    except ConfigProblem as exc:
        print(f"sparc-sa check: configuration error: {_flat(exc)}", file=sys.stderr)
        return 2
    status = 0
    for name, engine in engines:
        label = f" {name!r}" if name else ""
        try:
            if hasattr(engine, "sync_engine"):  # an AsyncEngine
                report = asyncio.run(check_async_engine(cast("AsyncEngine", engine), name))
            else:
                report = check_engine(engine, name)
        except CheckFailed as exc:
            print(f"sparc-sa check: engine{label} FAILED: {_flat(exc)}", file=sys.stderr)
            status = max(status, 1)
        except ConfigProblem as exc:
            print(
                f"sparc-sa check: engine{label}: configuration error: {_flat(exc)}",
                file=sys.stderr,
            )
            status = 2
        else:
            print("\n".join(report.lines()))
        finally:
            if not hasattr(engine, "sync_engine"):
                engine.dispose()
                for replica in replicas.replicas(engine):
                    replica.dispose()
    sys.stdout.flush()  # a closed pipe shows here, inside main(), not at exit
    return status


def _flat(exc: Exception) -> str:
    """The message on one line (every message here is made with secrets hidden)."""
    return " ".join(str(exc).split())


def _driver_refused(exc: Exception, shown: str) -> ConfigProblem:
    """A driver that raised something other than a database error while
    connecting choked on the URL's arguments (PyMySQL's ``?charset=bogus``
    raises AttributeError): the configuration's fault, reported in one line."""
    text = options.hide_secrets_in_text(" ".join(str(exc).split())) or type(exc).__name__
    return ConfigProblem(
        f"{shown}: the driver refused the connection's arguments: {type(exc).__name__}: {text}"
    )
