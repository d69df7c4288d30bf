"""The interfaces of sparc.sa, and the SQLAlchemy classes that provide them.

Importing this module declares, once per process, that SQLAlchemy's own
classes implement the marker interfaces, so that any engine, declarative base,
session or scoped session can be adapted through the component registry.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import InstrumentedAttribute, Mapper, Query, Session, scoped_session
from sqlalchemy.orm.decl_api import DeclarativeAttributeIntercept, DeclarativeMeta
from sqlalchemy.sql import Select
from zope.interface import Attribute, Interface, classImplements
from zope.schema import Choice, Field, Tuple

__all__ = [
    "CONDITIONS",
    "CONJUNCTIONS",
    "IEngineCreatedEvent",
    "IORMRelatedModels",
    "IORMRelatedModelsAdder",
    "ISAAsyncEngine",
    "ISAAsyncScopedTransaction",
    "ISAConjunction",
    "ISADeclarativeMeta",
    "ISAEngine",
    "ISAExpression",
    "ISAInstrumentedAttribute",
    "ISAMapper",
    "ISAModelFilterExpression",
    "ISAModelFilterExpressionGroup",
    "ISAQuery",
    "ISAResultRowModel",
    "ISAScopedSession",
    "ISAScopedTransaction",
    "ISASession",
]


class ISAEngine(Interface):
    """A SQLAlchemy :class:`sqlalchemy.engine.Engine`.

    Every ``Engine`` provides this interface, whoever created it: the
    ``sparc.sa.engine.engine_from_config`` factory, ``<sa:engine>`` in ZCML or
    a plain ``sqlalchemy.create_engine()`` call.
    """


class ISADeclarativeMeta(Interface):
    """A SQLAlchemy declarative base class (and every class mapped from it).

    Provided by every base built with ``sqlalchemy.orm.declarative_base()``,
    the legacy ``sqlalchemy.ext.declarative.declarative_base()``,
    ``registry().generate_base()``, and by subclasses of
    ``sqlalchemy.orm.DeclarativeBase`` and ``MappedAsDataclass``, because the
    interface is declared on their metaclasses.

    A base built on ``DeclarativeBaseNoMeta`` has no such metaclass; it opts
    in explicitly::

        @zope.interface.provider(ISADeclarativeMeta)
        class Base(DeclarativeBaseNoMeta):
            pass
    """


class ISASession(Interface):
    """A SQLAlchemy :class:`sqlalchemy.orm.Session`."""


class ISAScopedSession(Interface):
    """A SQLAlchemy :class:`sqlalchemy.orm.scoped_session`.

    Calling it returns the current scope's :class:`ISASession`; every
    ``Session`` method called on it is forwarded to that session.
    """


class ISAScopedTransaction(Interface):
    """Commit-or-roll-back blocks over a scoped session registry.

    Obtained by adapting an engine and a declarative base::

        transaction = getMultiAdapter((engine, Base), ISAScopedTransaction)

    Every lookup for the same engine and base returns the same object, so the
    whole application shares one registry of sessions.

    The *current scope* is the running asyncio task when there is one, and the
    current thread otherwise. Each scope has its own session; two threads, or
    two tasks in one thread, never share a session or a transaction.
    """

    Base = Attribute("The ISADeclarativeMeta provider this transaction serves.")
    engine = Attribute("The ISAEngine provider sessions are bound to.")
    session = Attribute(
        "The current scope's ISASession. It exists outside blocks too; work "
        "done through it outside a block is committed by the next block of the "
        "same scope, and discarded when its thread or task ends."
    )

    def __call__(savepoint: bool = True) -> Any:
        """Return a context manager for one block of work.

        ``__enter__()`` returns the ISAScopedSession provider. On normal exit
        the block commits; on any exception, ``BaseException`` included, it
        rolls back and the original exception propagates unchanged. Either way
        the session is then reset and its connection returned to the pool.

        A block opened while another block of the same scope is open is
        nested: with ``savepoint`` true it runs in a SAVEPOINT, so a failure
        undoes only its own work; with ``savepoint`` false it joins the outer
        transaction, and a failure in it dooms the outer block to roll back.
        """

    def run(fn: Any, *args: Any, attempts: int = 3, **kwargs: Any) -> Any:
        """Call ``fn(session, *args, **kwargs)`` in a block and return its result.

        When the database aborts the transaction for a serialization failure
        or a deadlock (SQLSTATE 40001 or 40P01; MySQL/MariaDB errors 1213,
        1205 and 1020), the whole block is run again in a fresh transaction
        after a jittered exponential backoff, at most ``attempts`` times in
        all; then the last error propagates. No other error is retried.

        Inside an already open block of the same scope, ``fn`` runs once, in a
        SAVEPOINT, without retries: an aborted transaction can only be retried
        from its outermost block.

        .. versionadded:: 2.0
        """


class ISAAsyncEngine(Interface):
    """A SQLAlchemy :class:`sqlalchemy.ext.asyncio.AsyncEngine`.

    The engine factory builds one for a DSN that names an asyncio driver
    (``postgresql+asyncpg``, ``postgresql+psycopg_async``,
    ``sqlite+aiosqlite``, ``mysql+asyncmy``, ``mysql+aiomysql``). It needs
    the greenlet library: ``pip install 'sparc.sa[async]'``.

    .. versionadded:: 2.0
    """


class ISAAsyncScopedTransaction(Interface):
    """Commit-or-roll-back ``async with`` blocks, one session per asyncio task.

    Obtained by adapting an async engine and a declarative base::

        tx = getMultiAdapter((async_engine, Base), ISAAsyncScopedTransaction)
        async with tx() as session:
            session.add(obj)

    Every lookup for the same engine and base returns the same object.

    .. versionadded:: 2.0
    """

    Base = Attribute("The ISADeclarativeMeta provider this transaction serves.")
    engine = Attribute("The ISAAsyncEngine provider sessions are bound to.")
    session = Attribute(
        "The current task's AsyncSession: the one of its innermost open block. "
        "Outside any block of the task it raises CrossScopeSessionError."
    )
    commit_token = Attribute(
        "The position of the current task's latest commit on an engine with "
        "replicas, as a string for ``tx(readonly=True, after=token)`` in another "
        "task, request or process; None when the task wrote nothing."
    )

    def __call__(savepoint: bool = True) -> Any:
        """Return an asynchronous context manager for one block of work.

        ``__aenter__()`` returns the task's ``AsyncSession`` (created with
        ``expire_on_commit=False``). On normal exit the block commits; on any
        exception, cancellation included, it rolls back and the exception
        propagates. Either way the session is closed and its connection
        returned to the pool, even when the task is cancelled meanwhile.

        Nested blocks run in a SAVEPOINT, or join the outer transaction with
        ``savepoint=False`` (a failure there dooms the outer block).
        """

    def run(fn: Any, *args: Any, attempts: int = 3, **kwargs: Any) -> Any:
        """Await ``fn(session, *args, **kwargs)`` in a block; return its result.

        Retries serialization failures and deadlocks as
        ``ISAScopedTransaction.run()`` does, at most ``attempts`` times in all.
        """


class IEngineCreatedEvent(Interface):
    """Notified through ``zope.event`` after the factory has built an engine.

    Subscribers may attach SQLAlchemy event listeners to the engine, for
    example a connection pragma, before any connection is made.

    .. versionadded:: 2.0
    """

    engine = Attribute("The new ISAEngine provider.")
    config = Attribute(
        "The configuration the engine was built from, normalised: a dict with "
        "'dsn' (a string, password hidden) and 'kwargs' (the create_engine "
        "options, secrets hidden)."
    )


class ISAMapper(Interface):
    """A SQLAlchemy ORM :class:`sqlalchemy.orm.Mapper` (``Model.attr.parent``)."""


class ISAInstrumentedAttribute(Interface):
    """A mapped attribute of an ORM class, such as ``Model.name``.

    Adapted together with an :class:`ISASession` to
    ``zope.interface.common.mapping.IIterableMapping``: a read-only mapping
    from the attribute's values to the rows holding them.
    """


class ISAQuery(Interface):
    """A query that selects ORM rows.

    Provided by the legacy :class:`sqlalchemy.orm.Query` (``session.query()``)
    and by the 2.0 style :class:`sqlalchemy.sql.Select` (``select()``). A
    ``Query`` adapts to ``zope.interface.common.sequence.IFiniteSequence``; a
    ``Select``, which has no session, adapts together with an ISASession.
    """


class ISAExpression(Interface):
    """A SQL boolean expression that can stand in a WHERE clause or a conjunction."""


class ISAConjunction(Interface):
    """The ``and_()`` or ``or_()`` of expressions, for ``Query.filter()`` or ``Select.where()``."""


class ISAResultRowModel(Interface):
    """Picks the ORM object out of a result row by the interface it provides."""

    def first(iface: Any, row: Any) -> Any:
        """Return the first entry of ``row`` that provides ``iface``.

        Raises ValueError when no entry does.
        """


#: The conditions of a filter expression (compared case-insensitively).
CONDITIONS = (
    "==",
    "equals",
    "!=",
    "not equals",
    "<",
    "less than",
    "<=",
    "less than equal",
    ">",
    "greater than",
    ">=",
    "greater than equal",
    "like",
    "ilike",
    "in",
    "not in",
    "is null",
    "is not null",
)
#: The conjunctions of a filter expression group (compared case-insensitively).
CONJUNCTIONS = ("AND", "OR")


class ISAModelFilterExpression(Interface):
    """One condition on one mapped column: ``Model.attribute <condition> value``.

    Adapts to :class:`ISAExpression`.
    """

    attribute = Attribute("The ISAInstrumentedAttribute (a mapped column) to filter by.")
    condition = Choice(
        title="Condition",
        description="How the column is compared with the value; one of CONDITIONS.",
        values=CONDITIONS,
        required=True,
    )
    value = Field(
        title="Value",
        description=(
            "What the column is compared with: a list for 'in' and 'not in', "
            "nothing for 'is null' and 'is not null'."
        ),
        required=False,
    )


class ISAModelFilterExpressionGroup(Interface):
    """Expressions and nested groups joined by one conjunction.

    Adapts to :class:`ISAConjunction`. An empty 'AND' group matches every row,
    an empty 'OR' group none.
    """

    conjunction = Choice(title="Conjunction", values=CONJUNCTIONS, required=True)
    expressions = Tuple(
        title="Expressions",
        description="Filter expressions and nested groups, in order.",
        required=True,
    )


class IORMRelatedModels(Interface):
    """A graph of mapped classes that relate to each other through foreign keys."""

    def flattened(seed: Any) -> Any:
        """Return the classes reachable from ``seed``, breadth first, ``seed`` first.

        Each class appears once, and neighbours come in the order they were
        added, so the result is the same on every call.
        """


class IORMRelatedModelsAdder(IORMRelatedModels):
    """An :class:`IORMRelatedModels` that can grow."""

    def add_sequence(sequence: Any) -> None:
        """Add the classes of ``sequence``, each linked to its neighbours in it."""


# SQLAlchemy's classes are declared to implement the markers, so the instances
# users already have can be looked up in the registry without wrapping.
classImplements(Engine, ISAEngine)
try:  # SQLAlchemy's asyncio module needs greenlet (the extra sparc.sa[async])
    from sqlalchemy.ext.asyncio import AsyncEngine
except ImportError:  # then no AsyncEngine can be built either
    pass
else:
    classImplements(AsyncEngine, ISAAsyncEngine)
# Declared on the metaclasses of declarative_base() (DeclarativeMeta) and of
# DeclarativeBase and MappedAsDataclass (DeclarativeAttributeIntercept and its
# subclass DCTransformDeclarative). In early 2.0 releases (2.0.0 among them)
# DeclarativeMeta does not derive from DeclarativeAttributeIntercept.
classImplements(DeclarativeMeta, ISADeclarativeMeta)
classImplements(DeclarativeAttributeIntercept, ISADeclarativeMeta)
classImplements(Session, ISASession)
classImplements(scoped_session, ISAScopedSession)
classImplements(Mapper, ISAMapper)
classImplements(InstrumentedAttribute, ISAInstrumentedAttribute)
classImplements(Query, ISAQuery)
classImplements(Select, ISAQuery)
