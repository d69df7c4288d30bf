"""The engine factory, registered as ``sparc.sa.engine.engine_from_config``.

::

    engine = component.createObject(
        'sparc.sa.engine.engine_from_config',
        {'dsn': 'postgresql+psycopg://app@db/app', 'kwargs': {'pool_size': '5'}})
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy
import zope.event
from sqlalchemy.engine import URL, Engine
from zope.component.factory import Factory

from sparc.sa import mismatch, options, replicas
from sparc.sa.connections import fork, resets
from sparc.sa.events import EngineCreatedEvent
from sparc.sa.interfaces import ISAEngine
from sparc.sa.legacy import package_path
from sparc.sa.tx import liveness, sqlitebegin

if TYPE_CHECKING:  # needs greenlet at run time
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "DEFAULT_PREFIX",
    "FACTORY_NAME",
    "ISAEngine",
    "SAEngineFromConfig",
    "SAEngineFromConfigFactory",
    "engine_from_config",
    "from_prefixed",
]

logger = logging.getLogger(__name__)

# A package to the import system, for sparc.sa 1.x's submodule paths
# (``sparc.sa.engine.engine``); see sparc.sa.legacy.
__path__ = package_path(__name__)

#: The name of the IFactory utility registered by configure.zcml.
FACTORY_NAME = "sparc.sa.engine.engine_from_config"

_INVALID_ARGS = re.compile(r"Invalid argument\(s\) (?P<names>.+?) sent to create_engine\(\)")
_CONFIGURATION = re.compile(r"using configuration (?P<combo>[\w/]+)")


def engine_from_config(
    configuration: Mapping[str, Any] | None = None,
    prefix: str | None = None,
    *,
    SQLAlchemyEngine: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Engine | AsyncEngine:
    """Build a SQLAlchemy engine from ``{'dsn': ..., 'kwargs': {...}}``.

    SQLAlchemy's own signature is accepted too, as Pyramid's cookiecutter
    calls it: ``engine_from_config(settings, 'sqlalchemy.', **overrides)``
    (``prefix`` and ``configuration`` may also be passed by keyword). The
    keys that start with *prefix* are the engine's: ``<prefix>url`` is the
    DSN, every other one a create_engine() option, and keyword arguments
    override them. A mapping without ``'dsn'`` whose keys start with
    ``'sqlalchemy.'`` is read that way even without a prefix.

    A DSN that names an asyncio driver (``postgresql+asyncpg``,
    ``postgresql+psycopg_async``, ``sqlite+aiosqlite``, ``mysql+asyncmy``,
    ``mysql+aiomysql``) gives an ``AsyncEngine`` (an ISAAsyncEngine provider),
    with the same conversions, defaults and errors.

    The mapping may also be wrapped as ``{'SQLAlchemyEngine': {...}}`` (the
    1.x ``configure.yaml`` shape), or passed as the ``SQLAlchemyEngine``
    keyword as sparc.sa 1.x accepted it.

    String option values are converted (``'5'`` to 5, ``'yes'`` to True,
    ``'StaticPool'`` to the class); see :mod:`sparc.sa.options`. An in-memory
    SQLite database is shared by all threads, and a server database gets
    ``pool_pre_ping=True``, unless the config says otherwise.

    Errors are raised before any connection is attempted: ``TypeError`` for a
    config of the wrong shape or an option create_engine() does not accept,
    ``ValueError`` for a missing dsn or a value that cannot be converted.
    No message contains the password.

    After the engine is built, an :class:`~sparc.sa.interfaces.IEngineCreatedEvent`
    is notified.

    .. versionchanged:: 2.0
       String values are converted, the defaults above are applied, bad input
       fails early with a message naming the key, and the event is notified.
    """
    config = _given_config(configuration, prefix, SQLAlchemyEngine, kwargs)
    section, replica_options = replicas.split_config(options.unwrap(config))
    url, kwargs = options.normalize(section)
    shown = options.hide_dsn(url)
    if options.is_async_url(url):
        aengine = _async_engine(url, kwargs, shown)
        if replica_options is not None:
            replicas.attach(aengine.sync_engine, replica_options, engine_from_config)
        return aengine
    return _sync_engine(url, kwargs, shown, config, replica_options)


#: SQLAlchemy's default prefix for engine_from_config(settings, prefix).
DEFAULT_PREFIX = "sqlalchemy."


def _is_prefixed(config: object) -> bool:
    """A mapping in SQLAlchemy's shape (``sqlalchemy.url`` ...) rather than 1.x's."""
    return (
        isinstance(config, Mapping)
        and "dsn" not in config
        and options.WRAPPER_KEY not in config
        and any(isinstance(k, str) and k.startswith(DEFAULT_PREFIX) for k in config)
    )


def from_prefixed(
    configuration: object, prefix: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``{'dsn': ..., 'kwargs': {...}}`` from SQLAlchemy's shape: the keys of
    *configuration* that start with *prefix* (``<prefix>url`` the DSN, the
    others create_engine() options), then *overrides* on top.

    Each value is converted as the factory converts it, and an error names
    the setting it came from (``'sqlalchemy.pool_size'``), never a password.
    """
    if not isinstance(configuration, Mapping):
        raise TypeError(
            f"engine_from_config(configuration, prefix={prefix!r}) needs a mapping of "
            f"settings such as {{{prefix + 'url'!r}: 'dialect+driver://...'}}, "
            f"got {type(configuration).__name__}"
        )
    if not isinstance(prefix, str):
        raise TypeError(
            f"prefix must be a string such as 'sqlalchemy.', got {type(prefix).__name__}"
        )
    section: dict[str, Any] = {
        key[len(prefix) :]: value
        for key, value in configuration.items()
        if isinstance(key, str) and key.startswith(prefix)
    }
    section.update(overrides or {})
    dsn = section.pop("url", None)
    if dsn in (None, ""):
        found = sorted(prefix + key for key in section)
        raise ValueError(
            f"engine configuration has no {prefix + 'url'!r}: expected a SQLAlchemy URL "
            "such as 'postgresql+psycopg://user:password@host/dbname' or 'sqlite://'"
            + (
                f"; settings with the prefix {prefix!r}: {', '.join(map(repr, found))}"
                if found
                else f"; no setting starts with {prefix!r}"
            )
        )

    def where(name: str) -> str:
        if name in (overrides or {}):
            return f"keyword argument {name!r}"
        return f"setting {prefix + name!r}"

    try:
        url = options.parse_dsn(dsn)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where('url')}: {exc}") from None
    for name, value in section.items():
        # Converted here only to name the setting in the error; the factory
        # converts the original value again.
        try:
            options.convert_option(url, name, value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where(name)}: {exc}") from None
    return {"dsn": dsn, "kwargs": section}


def _async_engine(url: URL, kwargs: dict[str, Any], shown: str) -> AsyncEngine:
    """An AsyncEngine, for a DSN that names an asyncio driver."""
    if importlib.util.find_spec("greenlet") is None:
        raise ImportError(
            f"{shown} names an asyncio driver, and SQLAlchemy's asyncio support needs "
            "the greenlet library; install it with: pip install 'sparc.sa[async]'"
        )
    from sqlalchemy.ext.asyncio import create_async_engine

    # aiosqlite: a block's BEGIN rides on its first statement's trip to the
    # driver's thread (sparc.sa.tx.sqlitebegin).
    beginning = sqlitebegin.use_beginning_connections(url, kwargs)
    engine: Any = _create_engine(url, kwargs, shown, create_async_engine)
    if beginning:
        sqlitebegin.mark(engine)
    resets.install(engine.sync_engine)
    if kwargs.get("pool_pre_ping") is True:
        liveness.install(engine.sync_engine, trust_recent=False)
    fork.track_engine(engine.sync_engine)
    logger.info(
        "created SQLAlchemy asyncio engine for %s (pool %s)",
        shown,
        type(engine.sync_engine.pool).__name__,
    )
    zope.event.notify(EngineCreatedEvent(engine, {"dsn": shown, "kwargs": options.redact(kwargs)}))
    mismatch.install_hints()
    return engine  # type: ignore[no-any-return]


def _given_config(
    configuration: Mapping[str, Any] | None,
    prefix: str | None,
    SQLAlchemyEngine: Mapping[str, Any] | None,
    kwargs: dict[str, Any],
) -> Any:
    """The engine config :func:`engine_from_config` was given, in whichever
    of its shapes: positional, ``SQLAlchemyEngine=``, or prefixed keys."""
    config = configuration
    if SQLAlchemyEngine is not None:
        if config is not None:
            raise TypeError(
                "pass the engine config either positionally or as SQLAlchemyEngine=..., not both"
            )
        config = SQLAlchemyEngine
    if prefix is not None or kwargs or _is_prefixed(config):
        config = from_prefixed(config, "sqlalchemy." if prefix is None else prefix, kwargs)
    return config


def _sync_engine(
    url: URL, kwargs: dict[str, Any], shown: str, config: Any, replica_options: Any
) -> Engine:
    """The synchronous engine of :func:`engine_from_config`, with its
    listeners, replicas and event."""
    # SQLAlchemy's pre-ping with sparc.sa.tx.liveness's additions: a block's
    # BEGIN as its ping (PostgreSQL), and the Zope-request shortcut unless
    # the configuration asked for pool_pre_ping itself.
    asked = "pool_pre_ping" in (options.unwrap(config).get("kwargs") or {})
    engine = _create_engine(url, kwargs, shown)
    resets.install(engine)
    if kwargs.get("pool_pre_ping") is True:
        liveness.install(engine, trust_recent=not asked)
    fork.track_engine(engine)
    if replica_options is not None:
        replicas.attach(engine, replica_options, engine_from_config)
    logger.info(
        "created SQLAlchemy engine for %s (pool %s, liveness check %s)",
        shown,
        type(engine.pool).__name__,
        "on" if liveness.is_checked(engine) else "off",
    )
    zope.event.notify(EngineCreatedEvent(engine, {"dsn": shown, "kwargs": options.redact(kwargs)}))
    # Where no manager adapter is registered, a lookup with this engine says
    # what to include instead of a bare ComponentLookupError.
    mismatch.install_hints()
    return engine


def _create_engine(
    url: URL, kwargs: dict[str, Any], shown: str, create: Any = sqlalchemy.create_engine
) -> Engine:
    error: str | None = None
    kind: type[Exception] = ValueError
    try:
        return create(url, **kwargs)  # type: ignore[no-any-return]
    except TypeError as exc:
        error = _unaccepted_options(exc, shown)
        if error is None:
            raise
        kind = TypeError
    except sqlalchemy.exc.NoSuchModuleError as exc:
        if "sqlalchemy.plugins" in str(exc):
            error = (
                f"create_engine option 'plugins' names a plugin SQLAlchemy cannot load "
                f"({exc}); expected names registered under the 'sqlalchemy.plugins' "
                "entry point"
            )
        else:
            error = (
                f"'dsn' names a dialect or driver SQLAlchemy cannot load: {shown}; "
                "check the 'dialect+driver://' prefix and that the driver is installed"
            )
    except sqlalchemy.exc.ArgumentError as exc:
        given = ", ".join(repr(name) for name in sorted(kwargs)) or "none"
        reason = re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"\1", str(exc))
        error = (
            f"create_engine() refused the configuration for {shown} "
            f"(options given: {given}): {reason}"
        )
    except ImportError as exc:
        error = f"the database driver for {shown} cannot be imported: {exc}"
        error += driver_hint(url.get_driver_name())
        kind = ImportError
    except Exception as exc:
        # Anything else is a value create_engine() could not use (a module or
        # callable of the wrong kind, say): report it as such.
        given = ", ".join(repr(name) for name in sorted(kwargs)) or "none"
        reason = options.hide_secrets_in_text(f"{type(exc).__name__}: {exc}")
        error = (
            f"create_engine() could not build an engine for {shown} "
            f"(options given: {given}): {reason}"
        )
    raise kind(error)


def _unaccepted_options(exc: TypeError, shown: str) -> str | None:
    """The message for create_engine()'s refusal of options it does not
    accept, with a guess at what was meant; None for another TypeError."""
    match = _INVALID_ARGS.search(str(exc))
    if match is None:
        return None
    names = re.findall(r"'([^']*)'", match.group("names"))
    combo = _CONFIGURATION.search(str(exc))
    error = (
        f"create_engine() does not accept option(s) {', '.join(map(repr, names))} "
        f"for {shown}" + (f" ({combo.group('combo')})" if combo else "")
    )
    hints = {name: _suggest(name) for name in names}
    hints = {name: hint if hint != name else None for name, hint in hints.items()}
    if len(names) == 1 and hints[names[0]]:
        error += f"; did you mean {hints[names[0]]!r}?"
    elif any(hints.values()):
        error += (
            "; did you mean "
            + ", ".join(f"{hint!r} for {name!r}" for name, hint in hints.items() if hint)
            + "?"
        )
    error += " Check the spelling, and that the option applies to this dialect and pool."
    return error


#: The package that provides each driver (SQLAlchemy's driver name), the
#: sparc.sa extra that installs it if there is one, and what else to say.
_DRIVER_PACKAGES: dict[str, tuple[str, str | None, str]] = {
    "psycopg": ("'psycopg[binary]'", "postgresql", ""),
    "psycopg_async": ("'psycopg[binary]'", "async", ""),
    "psycopg2": (
        "psycopg2",
        None,
        " (or psycopg2-binary); or name psycopg 3 in the dsn, postgresql+psycopg://, "
        "and pip install 'sparc.sa[postgresql]'",
    ),
    "psycopg2cffi": ("psycopg2cffi", None, ""),
    "pg8000": ("pg8000", None, ""),
    "asyncpg": ("asyncpg", "async", ""),
    "pymysql": ("PyMySQL", "mysql", ""),
    "mysqldb": (
        "mysqlclient",
        None,
        " (it provides the MySQLdb module, the default driver of mysql:// and "
        "mariadb://); or name PyMySQL in the dsn, mysql+pymysql://, and pip install "
        "'sparc.sa[mysql]'",
    ),
    "mysqlconnector": ("mysql-connector-python", None, ""),
    "mariadbconnector": ("mariadb", None, ""),
    "aiomysql": ("aiomysql", "async", ""),
    "asyncmy": ("asyncmy", "async", ""),
    "aiosqlite": ("aiosqlite", "async", ""),
    "pyodbc": ("pyodbc", None, " (and an ODBC driver for the database)"),
    "aioodbc": ("aioodbc", "async", ""),
    "pymssql": ("pymssql", None, ""),
    "cx_oracle": (
        "cx_Oracle",
        None,
        "; or its successor, oracledb: name it in the dsn, oracle+oracledb://, "
        "and pip install oracledb",
    ),
    "oracledb": ("oracledb", None, ""),
    "oracledb_async": ("oracledb", "async", ""),
}


def driver_hint(driver: str) -> str:
    """What to install for SQLAlchemy's *driver* (``'mysqldb'``, ``'psycopg'``
    ...), as the end of an error message; empty for a driver not listed."""
    if driver == "pysqlite":
        return (
            "; the sqlite3 module comes with Python, and this Python was built "
            "without it: install the SQLite development files and rebuild Python, "
            "or use a Python that has it"
        )
    known = _DRIVER_PACKAGES.get(driver)
    if known is None:
        return ""
    package, extra, more = known
    if extra == "async":
        return (
            f"; the {driver} driver is provided by {package}: "
            f"pip install 'sparc.sa[async]' {package}{more}"
        )
    if extra is not None:
        return (
            f"; the {driver} driver is provided by {package}: pip install {package}, "
            f"or pip install 'sparc.sa[{extra}]'{more}"
        )
    return f"; the {driver} driver is provided by {package}: pip install {package}{more}"


def _suggest(name: str) -> str | None:
    close = difflib.get_close_matches(name, sorted(options.KNOWN_OPTIONS), n=1)
    return close[0] if close else None


def SAEngineFromConfig(SQLAlchemyEngine: Mapping[str, Any]) -> Engine | AsyncEngine:
    """The sparc.sa 1.x name of :func:`engine_from_config`."""
    return engine_from_config(SQLAlchemyEngine)


SAEngineFromConfigFactory = Factory(
    engine_from_config,
    title="SQLAlchemy engine from a {'dsn': ..., 'kwargs': {...}} mapping",
    description=engine_from_config.__doc__,
    interfaces=(ISAEngine,),
)
