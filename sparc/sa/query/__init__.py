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

# Every name this module had before its parts moved beside it: the public
# ones (__all__), and those 1.x code reaches through sparc.sa.orm.query.
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
