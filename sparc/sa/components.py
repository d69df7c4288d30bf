"""What ``configure.zcml`` registers, for a registry that loads no ZCML.

A Pyramid application (``config.include("sparc.sa")``, see
:mod:`sparc.sa.pyramid`), or any other that keeps its own
``zope.interface.registry.Components``, registers sparc.sa's components in
it with one call::

    from sparc.sa import components
    components.register(registry)   # register() alone: the global registry

The registrations are those of ``configure.zcml`` and the files it includes,
one for one (``tests/test_pyramid_include.py`` compares them), so a lookup
finds the same factory and adapters whichever way they were made.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from sqlalchemy.sql import Select
from zope.component import getGlobalSiteManager
from zope.component.interfaces import IFactory
from zope.interface.common.mapping import IIterableMapping
from zope.interface.common.sequence import IFiniteSequence

from sparc.sa import attributes, mismatch, orm, query
from sparc.sa.engine import FACTORY_NAME, SAEngineFromConfigFactory
from sparc.sa.interfaces import (
    ISAAsyncEngine,
    ISAAsyncScopedTransaction,
    ISAConjunction,
    ISADeclarativeMeta,
    ISAEngine,
    ISAExpression,
    ISAInstrumentedAttribute,
    ISAModelFilterExpression,
    ISAModelFilterExpressionGroup,
    ISAQuery,
    ISAResultRowModel,
    ISAScopedTransaction,
    ISASession,
)

__all__ = ["register"]

#: The named IFactory utilities (sparc/sa/engine/ and sparc/sa/orm/query/).
_FACTORIES: tuple[tuple[str, Any], ...] = (
    (FACTORY_NAME, SAEngineFromConfigFactory),
    ("sparc.sa.orm.query.orm_related_models_adder", query.ORMRelatedModelsAdderFactory),
    (
        "sparc.sa.orm.query.instrumented_attribute",
        query.SAInstrumentedAttributeFromDottedStringFactory,
    ),
    ("sparc.sa.orm.query.outer_joined_query", query.SAOuterJoinQueryFactory),
    ("sparc.sa.orm.query.filter_expression", query.SAModelFilterExpressionFactory),
    ("sparc.sa.orm.query.filter_expression_group", query.SAModelFilterExpressionGroupFactory),
    (
        "sparc.sa.orm.query.filter_expression_group_from_container",
        query.SAModelFilterExpressionGroupFromContainerFactory,
    ),
)

#: (factory, required, provided) of each adapter.
_ADAPTERS: tuple[tuple[Any, tuple[Any, ...], Any], ...] = (
    (orm.scoped_transaction, (ISAEngine, ISADeclarativeMeta), ISAScopedTransaction),
    (
        mismatch.sync_manager_for_async_engine,
        (ISAAsyncEngine, ISADeclarativeMeta),
        ISAScopedTransaction,
    ),
    (
        mismatch.async_manager_for_sync_engine,
        (ISAEngine, ISADeclarativeMeta),
        ISAAsyncScopedTransaction,
    ),
    (
        attributes.ModelMappingForUniqueInstrumentedAttribute,
        (ISAInstrumentedAttribute, ISASession),
        IIterableMapping,
    ),
    (query.SAExpressionFromSAModelFilterExpression, (ISAModelFilterExpression,), ISAExpression),
    (
        query.SAConjunctionFromSAModelFilterExpressionGroup,
        (ISAModelFilterExpressionGroup,),
        ISAConjunction,
    ),
    (query.ModelSequenceForQuery, (ISAQuery,), IFiniteSequence),
    (query.sequence_for_select, (Select, ISASession), IFiniteSequence),
)


def register(registry: Any = None) -> None:
    """Register sparc.sa's engine factory, adapters and query helpers in
    *registry* (a ``zope.interface.registry.Components``, such as a Pyramid
    application's ``config.registry``; by default zope.component's global
    registry), as ``<include package="sparc.sa" />`` does in a Zope site.

    Registering twice replaces the first registrations with equal ones.
    """
    target = getGlobalSiteManager() if registry is None else registry
    for name, factory in _FACTORIES:
        target.registerUtility(factory, IFactory, name)
    target.registerUtility(query.SAResultRowModel(), ISAResultRowModel)
    for factory, required, provided in _ADAPTERS:
        target.registerAdapter(factory, required, provided)
    # As configure.zcml's zcml:condition: SQLAlchemy's asyncio needs greenlet.
    if importlib.util.find_spec("greenlet") is not None:
        from sparc.sa.aio import async_scoped_transaction

        target.registerAdapter(
            async_scoped_transaction,
            (ISAAsyncEngine, ISADeclarativeMeta),
            ISAAsyncScopedTransaction,
        )
