"""Query helpers (sparc.sa 1.x's ``sparc.sa.orm.query``), rebuilt for SQLAlchemy 2.

* :class:`ORMRelatedModelsAdder`: a graph of mapped classes, walked breadth
  first by ``flattened(seed)``;
* :func:`outer_joined_query` / :func:`outer_joined_select`: one query over a
  chain of classes, each LEFT OUTER JOINed to an earlier one through their
  foreign key, with an explicit ON clause;
* filter expressions and groups, adapted to SQL by the registry, and
  :func:`expression_group_from_container`, which builds them from a plain
  container such as a JSON search form, treating it as untrusted input;
* :class:`ModelSequenceForQuery`: a query as a finite sequence, answered with
  COUNT, LIMIT and OFFSET;
* :class:`SAResultRowModel`: picks an ORM object out of a result row.

Filter containers look like this::

    {"conjunction": "and",
     "expressions": [
         {"attribute": "Item.name", "condition": "like", "value": "a%"},
         {"conjunction": "or",
          "expressions": [
              {"attribute": "Item.size", "condition": "in", "value": [1, 2]},
              {"attribute": "Item.size", "condition": "is null"}]}]}

An ``attribute`` names a mapped column of a class the Base maps, and nothing
else. A malformed container raises :class:`~sparc.sa.exceptions.InvalidFilterError`
before any SQL is sent; the container itself is never changed.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparc.sa.exceptions import (
        InvalidFilterError,
    )
    from sparc.sa.interfaces import CONDITIONS as CONDITIONS
    from sparc.sa.interfaces import CONJUNCTIONS as CONJUNCTIONS
    from sparc.sa.interfaces import (
        IORMRelatedModels,
        IORMRelatedModelsAdder,
        ISAConjunction,
        ISAExpression,
        ISAInstrumentedAttribute,
        ISAModelFilterExpression,
        ISAModelFilterExpressionGroup,
        ISAQuery,
        ISAResultRowModel,
    )
    from sparc.sa.query.dotted import (
        SAInstrumentedAttributeFromDottedString,
        SAInstrumentedAttributeFromDottedStringFactory,
        resolve_attribute,
    )
    from sparc.sa.query.expressions import (
        MAX_FILTER_DEPTH,
        MAX_FILTER_EXPRESSIONS,
        MAX_IN_VALUES,
        SAConjunctionFromSAModelFilterExpressionGroup,
        SAExpressionFromSAModelFilterExpression,
        SAModelFilterExpression,
        SAModelFilterExpressionFactory,
        SAModelFilterExpressionGroup,
        SAModelFilterExpressionGroupFactory,
        SAModelFilterExpressionGroupFromContainer,
        SAModelFilterExpressionGroupFromContainerFactory,
        expression_group_from_container,
    )
    from sparc.sa.query.expressions import conjunction_for as conjunction_for
    from sparc.sa.query.expressions import expression_for as expression_for
    from sparc.sa.query.joins import (
        ORMRelatedModelsAdder,
        ORMRelatedModelsAdderFactory,
        SAOuterJoinQuery,
        SAOuterJoinQueryFactory,
        outer_joined_query,
        outer_joined_select,
    )
    from sparc.sa.query.results import (
        ModelSequenceForQuery,
        SAResultRowModel,
    )
    from sparc.sa.query.results import sequence_for_select as sequence_for_select
    from sparc.sa.query.values import (
        MAX_FILTER_TEXT,
        MAX_FILTER_VALUES,
    )
    from sparc.sa.query.values import Budget as Budget
    from sparc.sa.query.values import check_length as check_length
    from sparc.sa.query.values import check_like_pattern as check_like_pattern
    from sparc.sa.query.values import coerce as coerce
    from sparc.sa.query.values import column_type as column_type
    from sparc.sa.query.values import kind as kind
    from sparc.sa.query.values import python_type as python_type

__all__ = [
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_EXPRESSIONS",
    "MAX_FILTER_TEXT",
    "MAX_FILTER_VALUES",
    "MAX_IN_VALUES",
    "IORMRelatedModels",
    "IORMRelatedModelsAdder",
    "ISAConjunction",
    "ISAExpression",
    "ISAInstrumentedAttribute",
    "ISAModelFilterExpression",
    "ISAModelFilterExpressionGroup",
    "ISAQuery",
    "ISAResultRowModel",
    "InvalidFilterError",
    "ModelSequenceForQuery",
    "ORMRelatedModelsAdder",
    "ORMRelatedModelsAdderFactory",
    "SAConjunctionFromSAModelFilterExpressionGroup",
    "SAExpressionFromSAModelFilterExpression",
    "SAInstrumentedAttributeFromDottedString",
    "SAInstrumentedAttributeFromDottedStringFactory",
    "SAModelFilterExpression",
    "SAModelFilterExpressionFactory",
    "SAModelFilterExpressionGroup",
    "SAModelFilterExpressionGroupFactory",
    "SAModelFilterExpressionGroupFromContainer",
    "SAModelFilterExpressionGroupFromContainerFactory",
    "SAOuterJoinQuery",
    "SAOuterJoinQueryFactory",
    "SAResultRowModel",
    "expression_group_from_container",
    "outer_joined_query",
    "outer_joined_select",
    "resolve_attribute",
]


# Every name this module had before its parts moved beside it (the public
# ones, __all__, and those 1.x code reaches through sparc.sa.orm.query), by
# the module that holds it. They are imported on first use, as sparc.sa's
# own names are: this module runs no import, so a thread importing one of
# its modules never waits for another thread's import of this one (which
# would wait for it in turn: Python then hands one of them a module half
# made, see sparc.sa.replicas).
_HOMES = {
    "InvalidFilterError": "sparc.sa.exceptions",
    "CONDITIONS": "sparc.sa.interfaces",
    "CONJUNCTIONS": "sparc.sa.interfaces",
    "IORMRelatedModels": "sparc.sa.interfaces",
    "IORMRelatedModelsAdder": "sparc.sa.interfaces",
    "ISAConjunction": "sparc.sa.interfaces",
    "ISAExpression": "sparc.sa.interfaces",
    "ISAInstrumentedAttribute": "sparc.sa.interfaces",
    "ISAModelFilterExpression": "sparc.sa.interfaces",
    "ISAModelFilterExpressionGroup": "sparc.sa.interfaces",
    "ISAQuery": "sparc.sa.interfaces",
    "ISAResultRowModel": "sparc.sa.interfaces",
    "SAInstrumentedAttributeFromDottedString": "sparc.sa.query.dotted",
    "SAInstrumentedAttributeFromDottedStringFactory": "sparc.sa.query.dotted",
    "resolve_attribute": "sparc.sa.query.dotted",
    "MAX_FILTER_DEPTH": "sparc.sa.query.expressions",
    "MAX_FILTER_EXPRESSIONS": "sparc.sa.query.expressions",
    "MAX_IN_VALUES": "sparc.sa.query.expressions",
    "SAConjunctionFromSAModelFilterExpressionGroup": "sparc.sa.query.expressions",
    "SAExpressionFromSAModelFilterExpression": "sparc.sa.query.expressions",
    "SAModelFilterExpression": "sparc.sa.query.expressions",
    "SAModelFilterExpressionFactory": "sparc.sa.query.expressions",
    "SAModelFilterExpressionGroup": "sparc.sa.query.expressions",
    "SAModelFilterExpressionGroupFactory": "sparc.sa.query.expressions",
    "SAModelFilterExpressionGroupFromContainer": "sparc.sa.query.expressions",
    "SAModelFilterExpressionGroupFromContainerFactory": "sparc.sa.query.expressions",
    "conjunction_for": "sparc.sa.query.expressions",
    "expression_for": "sparc.sa.query.expressions",
    "expression_group_from_container": "sparc.sa.query.expressions",
    "ORMRelatedModelsAdder": "sparc.sa.query.joins",
    "ORMRelatedModelsAdderFactory": "sparc.sa.query.joins",
    "SAOuterJoinQuery": "sparc.sa.query.joins",
    "SAOuterJoinQueryFactory": "sparc.sa.query.joins",
    "outer_joined_query": "sparc.sa.query.joins",
    "outer_joined_select": "sparc.sa.query.joins",
    "ModelSequenceForQuery": "sparc.sa.query.results",
    "SAResultRowModel": "sparc.sa.query.results",
    "sequence_for_select": "sparc.sa.query.results",
    "Budget": "sparc.sa.query.values",
    "MAX_FILTER_TEXT": "sparc.sa.query.values",
    "MAX_FILTER_VALUES": "sparc.sa.query.values",
    "check_length": "sparc.sa.query.values",
    "check_like_pattern": "sparc.sa.query.values",
    "coerce": "sparc.sa.query.values",
    "column_type": "sparc.sa.query.values",
    "kind": "sparc.sa.query.values",
    "python_type": "sparc.sa.query.values",
}


def __getattr__(name: str) -> Any:
    """A name of this module, or a module of this package not imported yet."""
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(_importlib.import_module(home), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
