"""ZCML directives: ``<sa:engine>`` and ``<sa:transaction>``.

Namespace: ``http://namespaces.zope.org/sparc.sa`` (:data:`NAMESPACE`)::

    <configure xmlns="http://namespaces.zope.org/zope"
               xmlns:sa="http://namespaces.zope.org/sparc.sa">
      <include package="sparc.sa" />
      <sa:engine name="main" dsn="${DATABASE_URL}" pool_size="10"
                 connect_args.connect_timeout="5" />
      <sa:transaction name="main" engine="main" base="myapp.models.Base" />
    </configure>

Every ``create_engine()`` option can be given as an attribute and is converted
as the engine factory converts strings. Options that take a mapping
(``connect_args``, ``execution_options``) are written one key per attribute,
``connect_args.KEY="VALUE"``; each VALUE is read as a JSON literal when it is
one (``5``, ``true``, ``"5"``) and as text otherwise. Every attribute may use
``${NAME}`` (and ``${NAME:-default}``) to read the environment.

Errors in the configuration are reported by zope.configuration with the file
and line of the directive, at configuration time.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

from zope.component import getUtilitiesFor, queryMultiAdapter, queryUtility
from zope.component.interfaces import IFactory
from zope.component.zcml import handler
from zope.configuration.exceptions import ConfigurationError
from zope.configuration.xmlconfig import ParserInfo
from zope.interface import Interface
from zope.schema import TextLine

from sparc.sa import options
from sparc.sa.engine import FACTORY_NAME, SAEngineFromConfigFactory
from sparc.sa.interfaces import (
    ISAAsyncEngine,
    ISAAsyncScopedTransaction,
    ISADeclarativeMeta,
    ISAEngine,
    ISAScopedTransaction,
)
from sparc.sa.mismatch import NotRegisteredError
from sparc.sa.orm import (
    JOIN_MODES,
    ScopedTransaction,
    configure_shared,
    scoped_transaction,
)
from sparc.sa.replicas.config import REPLICA_KEYS, split_config

__all__ = ["NAMESPACE", "IEngineDirective", "ITransactionDirective", "engine", "transaction"]

#: The XML namespace of the directives, as meta.zcml declares it.
NAMESPACE = "http://namespaces.zope.org/sparc.sa"

# Engines are built after everything of the default order (0) is registered,
# the factory and event subscribers included; transactions after the engines.
_ENGINE_ORDER = 1
_TRANSACTION_ORDER = 2


class IEngineDirective(Interface):
    """Build an engine with the registered factory and register it as a
    named ISAEngine utility.

    Besides the attributes below, every create_engine() option may be given
    as an attribute, and ``connect_args.KEY`` / ``execution_options.KEY`` for
    the entries of those mappings; ``replicas`` (space-separated DSNs),
    ``replica_max_lag`` and ``replica_wait`` configure read replicas
    (:mod:`sparc.sa.replicas`).
    """

    name = TextLine(
        title="Name",
        description="The name of the ISAEngine utility (default: the unnamed one).",
        required=False,
        default="",
    )
    dsn = TextLine(
        title="Database URL",
        description="The SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db. "
        "Overrides the dsn of the config file.",
        required=False,
    )
    config = TextLine(
        title="Configuration file",
        description="A YAML file in the configure.yaml shape "
        "(SQLAlchemyEngine: {dsn: ..., kwargs: {...}}), relative to this ZCML "
        "file. Attributes override its values.",
        required=False,
    )


# Any other attribute is a create_engine() option.
IEngineDirective.setTaggedValue("keyword_arguments", True)


class ITransactionDirective(Interface):
    """Register the ISAScopedTransaction of an engine and a declarative base as
    a named utility: the very object ``getMultiAdapter((engine, Base),
    ISAScopedTransaction)`` returns."""

    name = TextLine(
        title="Name",
        description="The name of the ISAScopedTransaction utility.",
        required=False,
        default="",
    )
    engine = TextLine(
        title="Engine",
        description="The name of an engine declared with <sa:engine>.",
        required=False,
        default="",
    )
    base = TextLine(
        title="Declarative base",
        description="The dotted name of the declarative base class.",
        required=True,
    )
    join = TextLine(
        title="Join mode",
        description="When blocks join a transaction of the `transaction` package: "
        "'auto' (default: inside a Zope request or an explicit transaction), "
        "'always' or 'never'. Sets the mode of the shared manager for this "
        "engine and base.",
        required=False,
    )
    twophase = TextLine(
        title="Two-phase commit",
        description="'true' to PREPARE at vote and commit at finish (PostgreSQL, "
        "MySQL/MariaDB); not on SQLite.",
        required=False,
    )


# Unknown attributes reach the handler, which says what was meant (instead of
# zope.configuration's bare "Unrecognized parameters").
ITransactionDirective.setTaggedValue("keyword_arguments", True)

#: Attribute names other tools use, and what sparc.sa calls them.
_RENAMED = {
    ("engine", "url"): ("dsn", " (z3c.saconfig's <db:engine url=...> is <sa:engine dsn=...>)"),
    ("transaction", "two_phase"): ("twophase", ""),
    ("transaction", "engine_name"): ("engine", ""),
}


def _did_you_mean(directive: str, attribute: str, known: list[str]) -> str:
    renamed = _RENAMED.get((directive, attribute))
    if renamed is not None:
        return f"; did you mean {renamed[0]!r}{renamed[1]}?"
    close = difflib.get_close_matches(attribute, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "."


def _unknown_attribute(directive: str, attribute: str, known: list[str]) -> ConfigurationError:
    return ConfigurationError(
        f"<sa:{directive}> has no attribute {attribute!r}"
        + _did_you_mean(directive, attribute, known)
        + f" Its attributes are {', '.join(map(repr, known))}"
        + (", and any create_engine() option" if directive == "engine" else "")
        + "."
    )


class _SecretFreeInfo(ParserInfo):
    """The directive's location and source, as zope.configuration shows them
    in errors and conflicts, with passwords hidden: a DSN in the ZCML file
    must not reach the logs through an error message."""

    def __str__(self) -> str:
        return options.hide_secrets_in_text(super().__str__())


def _protect(context: Any) -> None:
    info = getattr(context, "info", None)
    if type(info) is ParserInfo:
        info.__class__ = _SecretFreeInfo


def _expand(attribute: str, value: str) -> str:
    try:
        return options.expand_env(value)
    except KeyError as exc:
        raise ConfigurationError(
            f"attribute {attribute!r} uses environment variable {exc.args[0]!r}, which is not set"
        ) from None


def _literal(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _check_engine_attributes(attributes: Mapping[str, str]) -> None:
    """Refuse a misspelt attribute of ``<sa:engine>``."""
    for attribute in attributes:
        # An attribute that is no create_engine() option and looks like one
        # of ours, or that z3c.saconfig calls differently: a misspelling.
        own = ["dsn", "config", "name"]
        if attribute in options.KNOWN_OPTIONS or attribute in REPLICA_KEYS or "." in attribute:
            continue
        if ("engine", attribute) in _RENAMED or difflib.get_close_matches(
            attribute, own, n=1, cutoff=0.6
        ):
            raise _unknown_attribute("engine", attribute, own)


def engine(
    _context: Any,
    name: str = "",
    dsn: str | None = None,
    config: str | None = None,
    **attributes: str,
) -> None:
    """Handle ``<sa:engine>``: check everything now, build the engine later."""
    _protect(_context)
    section: Mapping[str, Any] = {}
    if config:
        path = _context.path(_expand("config", config))
        try:
            section = options.read_config_file(path)
        except ValueError as exc:
            raise ConfigurationError(f"attribute 'config': {exc}") from None
    _check_engine_attributes(attributes)
    dsn = _expand("dsn", dsn) if dsn else section.get("dsn")
    if not dsn:
        raise ConfigurationError(
            "<sa:engine> needs a 'dsn' attribute, or a 'config' file that has a dsn"
        )
    kwargs: dict[str, Any] = dict(section.get("kwargs") or {})
    # replicas="dsn1 dsn2", replica_max_lag, replica_wait (sparc.sa.replicas)
    replica_options = {key: section[key] for key in REPLICA_KEYS if key in section}
    for attribute, raw in attributes.items():
        value = _expand(attribute, raw)
        if attribute in REPLICA_KEYS:
            replica_options[attribute] = value
            continue
        option, dot, key = attribute.partition(".")
        if not dot:
            kwargs[option] = value
            continue
        if option not in ("connect_args", "execution_options") or not key:
            raise ConfigurationError(
                f"attribute {attribute!r}: only connect_args.KEY and "
                "execution_options.KEY may name a key of an option"
            )
        nested = kwargs.get(option)
        nested = dict(nested) if isinstance(nested, Mapping) else {}
        nested[key] = _literal(value)
        kwargs[option] = nested
    engine_config = {"dsn": dsn, "kwargs": kwargs, **replica_options}
    try:
        # Convert now, so a bad value is reported at this directive; options
        # that create_engine() rejects are reported when the engine is built.
        url, _ = options.normalize(split_config(engine_config)[0])
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from None
    provides = ISAAsyncEngine if options.is_async_url(url) else ISAEngine
    _context.action(
        discriminator=("utility", provides, name),
        callable=_register_engine,
        args=(name, engine_config, _context.info, provides),
        order=_ENGINE_ORDER,
    )


def _register_engine(
    name: str, config: dict[str, Any], info: Any, provides: Any = ISAEngine
) -> None:
    # The factory a site registered, so an override applies here too; without
    # sparc.sa's configure.zcml, the package's own.
    factory = queryUtility(IFactory, FACTORY_NAME) or SAEngineFromConfigFactory
    try:
        built = factory(config)
    except (TypeError, ValueError, ImportError) as exc:
        label = f"<sa:engine name={name!r}>" if name else "<sa:engine>"
        raise ConfigurationError(f"{label}: {exc}") from None
    handler("registerUtility", built, provides, name, info)


def transaction(
    _context: Any,
    base: str,
    name: str = "",
    engine: str = "",
    join: str | None = None,
    twophase: str | None = None,
    **unknown: str,
) -> None:
    """Handle ``<sa:transaction>``."""
    _protect(_context)
    for attribute in sorted(unknown):
        raise _unknown_attribute("transaction", attribute, list(ITransactionDirective.names()))
    base = _expand("base", base)
    engine = _expand("engine", engine)
    name = _expand("name", name)
    mode = _expand("join", join).strip().lower() if join is not None else None
    if mode is not None and mode not in JOIN_MODES:
        raise ConfigurationError(
            f"attribute 'join' must be 'auto', 'always' or 'never', got {join!r}"
        )
    two: bool | None = None
    if twophase is not None:
        word = _expand("twophase", twophase).strip().lower()
        if word not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            raise ConfigurationError(
                f"attribute 'twophase' must be true or false, got {twophase!r}"
            )
        two = word in ("true", "yes", "on", "1")
    try:
        resolved = _context.resolve(base)
    except ConfigurationError as exc:
        raise ConfigurationError(f"attribute 'base': cannot import {base!r}: {exc}") from None
    if not ISADeclarativeMeta.providedBy(resolved):
        raise ConfigurationError(
            f"attribute 'base': {base!r} is not a declarative base; expected a class "
            "made by declarative_base() or a subclass of DeclarativeBase (a "
            "DeclarativeBaseNoMeta base must declare @provider(ISADeclarativeMeta))"
        )
    _context.action(
        discriminator=("utility", ISAScopedTransaction, name),
        callable=_register_transaction,
        args=(name, engine, resolved, _context.info, mode, two),
        order=_TRANSACTION_ORDER,
    )


def _query_manager(engine: Any, base: type[Any], interface: Any) -> Any:
    """The registered manager, or None where only sparc.sa's explaining
    adapter (sparc.sa.mismatch.install_hints) stands."""
    try:
        return queryMultiAdapter((engine, base), interface)
    except NotRegisteredError:
        return None


def _register_transaction(
    name: str,
    engine_name: str,
    base: type[Any],
    info: Any,
    mode: str | None = None,
    twophase: bool | None = None,
) -> None:
    found = queryUtility(ISAEngine, engine_name)
    if found is None:
        found_async = queryUtility(ISAAsyncEngine, engine_name)
        if found_async is not None:
            _register_async_transaction(name, engine_name, found_async, base, info, mode, twophase)
            return
        known = sorted(
            repr(n) for iface in (ISAEngine, ISAAsyncEngine) for n, _ in getUtilitiesFor(iface)
        )
        raise ConfigurationError(
            f"attribute 'engine': no <sa:engine> named {engine_name!r} is registered"
            + (f"; registered engines: {', '.join(known)}" if known else "")
        )
    manager = _query_manager(found, base, ISAScopedTransaction)
    if manager is None:  # sparc.sa's adapter is not registered in this site
        manager = scoped_transaction(found, base)
    if isinstance(manager, ScopedTransaction):
        try:
            configure_shared(manager, mode, twophase, where=str(info))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"<sa:transaction>: {exc}") from None
    handler("registerUtility", manager, ISAScopedTransaction, name, info)


def _register_async_transaction(
    name: str,
    engine_name: str,
    engine: Any,
    base: type[Any],
    info: Any,
    mode: str | None,
    twophase: bool | None,
) -> None:
    from sparc.sa.aio import async_scoped_transaction

    if mode not in (None, "never") or twophase:
        raise ConfigurationError(
            "<sa:transaction>: 'join' and 'twophase' apply to synchronous engines; "
            f"engine {engine_name or '(unnamed)'!r} is an AsyncEngine, whose blocks "
            "commit by themselves"
        )
    manager = _query_manager(engine, base, ISAAsyncScopedTransaction)
    if manager is None:  # sparc.sa's adapter is not registered in this site
        manager = async_scoped_transaction(engine, base)
    handler("registerUtility", manager, ISAAsyncScopedTransaction, name, info)
