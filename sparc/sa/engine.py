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

from sparc.sa import fork, liveness, options, replicas, resets, sqlitebegin
from sparc.sa.events import EngineCreatedEvent
from sparc.sa.interfaces import ISAEngine
from sparc.sa.legacy import package_path

if TYPE_CHECKING:  # needs greenlet at run time
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "FACTORY_NAME",
    "ISAEngine",
    "SAEngineFromConfig",
    "SAEngineFromConfigFactory",
    "engine_from_config",
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
    config: Mapping[str, Any] | None = None,
    /,
    *,
    SQLAlchemyEngine: Mapping[str, Any] | None = None,
) -> Engine | AsyncEngine:
    """Build a SQLAlchemy engine from ``{'dsn': ..., 'kwargs': {...}}``.

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
    if SQLAlchemyEngine is not None:
        if config is not None:
            raise TypeError(
                "pass the engine config either positionally or as SQLAlchemyEngine=..., not both"
            )
        config = SQLAlchemyEngine
    section, replica_options = replicas.split_config(options.unwrap(config))
    url, kwargs = options.normalize(section)
    shown = options.hide_dsn(url)
    if options.is_async_url(url):
        aengine = _async_engine(url, kwargs, shown)
        if replica_options is not None:
            replicas.attach(aengine.sync_engine, replica_options, engine_from_config)
        return aengine
    # SQLAlchemy's pre-ping with sparc.sa.liveness's additions: a block's
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
    return engine


def _async_engine(url: URL, kwargs: dict[str, Any], shown: str) -> AsyncEngine:
    """An AsyncEngine, for a DSN that names an asyncio driver."""
    if importlib.util.find_spec("greenlet") is None:
        raise ImportError(
            f"{shown} names an asyncio driver, and SQLAlchemy's asyncio support needs "
            "the greenlet library; install it with: pip install 'sparc.sa[async]'"
        )
    from sqlalchemy.ext.asyncio import create_async_engine

    # aiosqlite: a block's BEGIN rides on its first statement's trip to the
    # driver's thread (sparc.sa.sqlitebegin).
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
    return engine  # type: ignore[no-any-return]


def _create_engine(
    url: URL, kwargs: dict[str, Any], shown: str, create: Any = sqlalchemy.create_engine
) -> Engine:
    error: str | None = None
    kind: type[Exception] = ValueError
    try:
        return create(url, **kwargs)  # type: ignore[no-any-return]
    except TypeError as exc:
        match = _INVALID_ARGS.search(str(exc))
        if match is None:
            raise
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
        package = _ASYNC_DRIVERS.get(url.get_driver_name())
        extra = _DRIVER_EXTRAS.get(url.get_backend_name())
        if package:
            error += f"; install it, e.g. with: pip install 'sparc.sa[async]' {package}"
        elif extra:
            error += f"; install it, e.g. with: pip install 'sparc.sa[{extra}]'"
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


#: The extra of sparc.sa that installs a driver for each backend.
_DRIVER_EXTRAS = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}
#: The package that provides each asyncio driver.
_ASYNC_DRIVERS = {
    "asyncpg": "asyncpg",
    "psycopg_async": "'psycopg[binary]'",
    "aiosqlite": "aiosqlite",
    "asyncmy": "asyncmy",
    "aiomysql": "aiomysql",
}


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
