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

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import ColumnProperty, Mapper, Query, Session
from sqlalchemy.orm import registry as orm_registry
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement
from zope.component import adapter, queryAdapter
from zope.component.factory import Factory
from zope.interface import alsoProvides, implementer
from zope.interface.common.sequence import IFiniteSequence

from sparc.sa.exceptions import InvalidFilterError
from sparc.sa.interfaces import (
    CONDITIONS,
    CONJUNCTIONS,
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
from sparc.sa.query.values import (
    MAX_FILTER_TEXT,
    MAX_FILTER_VALUES,
    Budget,
    check_length,
    check_like_pattern,
    coerce,
    column_type,
    kind,
    python_type,
)

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

#: Groups nest at most this deep in a filter container (the outermost group is 1).
MAX_FILTER_DEPTH = 8
#: A filter container holds at most this many expressions and groups in all.
MAX_FILTER_EXPRESSIONS = 200
#: An 'in' or 'not in' expression takes at most this many values (and all the
#: expressions of a container at most MAX_FILTER_VALUES, see sparc.sa.query.values).
MAX_IN_VALUES = 1000


# -- the graph of related models ----------------------------------------------


@implementer(IORMRelatedModelsAdder)
class ORMRelatedModelsAdder:
    """Mapped classes linked to their neighbours in the sequences added.

    ``flattened(seed)`` walks the graph breadth first from ``seed``; a class's
    neighbours are visited in the order they were first linked, so the same
    graph always flattens the same way.
    """

    def __init__(self, models: Sequence[Any] | None = None) -> None:
        # dicts with None values keep the order neighbours were added in
        self._models: dict[Any, dict[Any, None]] = {}
        if models:
            self.add_sequence(models)

    def add_sequence(self, sequence: Sequence[Any]) -> None:
        models = list(sequence)
        for i, model in enumerate(models):
            neighbours = self._models.setdefault(model, {})
            if i:
                neighbours[models[i - 1]] = None
            if i < len(models) - 1:
                neighbours[models[i + 1]] = None

    def flattened(self, seed: Any) -> tuple[Any, ...]:
        if seed not in self._models:
            raise KeyError(f"{_name(seed)} was never added to this graph of related models")
        seen = {seed: None}
        queue = [seed]
        for model in queue:  # the list grows while it is walked: breadth first
            for neighbour in self._models[model]:
                if neighbour not in seen:
                    seen[neighbour] = None
                    queue.append(neighbour)
        return tuple(seen)


ORMRelatedModelsAdderFactory = Factory(
    ORMRelatedModelsAdder,
    title="Graph of related ORM models",
    description="sparc.sa.orm.query.orm_related_models_adder([models])",
)


# -- outer joins ---------------------------------------------------------------


def _name(model: Any) -> str:
    return getattr(model, "__name__", None) or repr(model)


def _mapper(model: Any, where: str) -> Mapper[Any]:
    mapper = sa_inspect(model, raiseerr=False)
    if not isinstance(mapper, Mapper):
        raise TypeError(f"{where}: expected a mapped class, got {model!r}")
    return mapper


def _foreign_key_on(left: Mapper[Any], right: Mapper[Any]) -> list[ColumnElement[bool]]:
    """The ON clauses of every foreign key constraint between two mappers' tables."""
    constraints: dict[Any, list[ColumnElement[bool]]] = {}
    tables: list[Any] = [*left.tables, *right.tables]
    for a in tables[: len(left.tables)]:
        for b in tables[len(left.tables) :]:
            for source, target in ((a, b), (b, a)):
                for fk in source.foreign_keys:
                    if fk.references(target):
                        clause = fk.parent == fk.column
                        constraints.setdefault(fk.constraint, []).append(clause)
    return [sa.and_(*clauses) for clauses in constraints.values()]


def _join_plan(models: Sequence[Any]) -> list[tuple[Any, ColumnElement[bool]]]:
    """(model, ON clause) for every model after the first, joined to an earlier one."""
    if not models:
        raise ValueError("models: expected at least one mapped class, got none")
    mappers = [_mapper(model, f"models[{i}]") for i, model in enumerate(models)]
    if len(set(mappers)) != len(mappers):
        raise ValueError("models: each class may appear once; " + ", ".join(map(_name, models)))
    plan = []
    for i in range(1, len(models)):
        for j in range(i):
            clauses = _foreign_key_on(mappers[j], mappers[i])
            if len(clauses) > 1:
                raise ValueError(
                    f"{_name(models[i])} and {_name(models[j])} are linked by "
                    f"{len(clauses)} foreign keys, so the join between them is ambiguous"
                )
            if clauses:
                plan.append((models[i], clauses[0]))
                break
        else:
            before = ", ".join(_name(m) for m in models[:i])
            raise ValueError(
                f"{_name(models[i])} has no foreign key to or from any model "
                f"joined before it ({before}); order the models so that each "
                f"relates to an earlier one"
            )
    return plan


def outer_joined_query(session: Session, models: Sequence[Any], select: Any = None) -> Query[Any]:
    """A legacy ``Query`` from ``models[0]``, LEFT OUTER JOINed to the rest in order.

    Each model is joined to the first earlier model it shares a foreign key
    with, with that key as an explicit ON clause; a model that shares one with
    none of them raises ValueError naming it. ``select`` lists what the rows
    hold (default: every model, in order).
    """
    models = list(models)
    plan = _join_plan(models)
    query = session.query(*(list(select) if select else models)).select_from(models[0])
    for model, onclause in plan:
        query = query.outerjoin(model, onclause)
    return query  # type: ignore[no-any-return]


def outer_joined_select(models: Sequence[Any], select: Any = None) -> Select[Any]:
    """The 2.0 style ``select()`` form of :func:`outer_joined_query`."""
    models = list(models)
    plan = _join_plan(models)
    statement = sa.select(*(list(select) if select else models)).select_from(models[0])
    for model, onclause in plan:
        statement = statement.outerjoin(model, onclause)
    return statement


@implementer(ISAQuery)
class SAOuterJoinQuery:
    """sparc.sa 1.x's name for :func:`outer_joined_query`."""

    def __new__(cls, session: Session, models: Sequence[Any], select: Any = None) -> Any:
        return outer_joined_query(session, models, select)


SAOuterJoinQueryFactory = Factory(
    SAOuterJoinQuery,
    title="Outer-joined query",
    description="sparc.sa.orm.query.outer_joined_query(session, models, select=None)",
)


# -- attributes by name ----------------------------------------------------------


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _classes_by_name(base: Any) -> dict[str, list[type[Any]]]:
    registry = getattr(base, "registry", None)
    if not isinstance(registry, orm_registry):
        raise TypeError(
            f"expected a declarative base with a registry of mapped classes, got {base!r}"
        )
    names: dict[str, list[type[Any]]] = {}
    for mapper in registry.mappers:
        names.setdefault(mapper.class_.__name__, []).append(mapper.class_)
    return names


def _resolve(names: dict[str, list[type[Any]]], dotted: object, path: str) -> Any:
    if not isinstance(dotted, str):
        raise InvalidFilterError(path, f"expected a string 'Class.attribute', got {kind(dotted)}")
    class_name, dot, key = dotted.partition(".")
    if not dot or not class_name or not key or "." in key:
        raise InvalidFilterError(path, f"expected 'Class.attribute', got {_quote(dotted)}")
    classes = names.get(class_name, [])
    if not classes:
        raise InvalidFilterError(
            path, f"expected the name of a class mapped by this Base, got {_quote(class_name)}"
        )
    if len(classes) > 1:
        where = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in classes))
        raise InvalidFilterError(path, f"class name {_quote(class_name)} is ambiguous: {where}")
    mapper = sa_inspect(classes[0])
    if key not in mapper.column_attrs:
        columns = ", ".join(sorted(mapper.column_attrs.keys()))
        raise InvalidFilterError(
            path, f"expected a mapped column of {class_name} ({columns}), got {_quote(key)}"
        )
    return mapper.all_orm_descriptors[key]


def resolve_attribute(base: Any, dotted_name: str) -> Any:
    """The mapped column attribute ``'Class.attribute'`` of a class ``base`` maps.

    Only mapped columns resolve: never a method, a relationship, a dunder or
    anything importable. An unknown or ambiguous name raises InvalidFilterError.
    """
    return _resolve(_classes_by_name(base), dotted_name, "attribute")


@implementer(ISAInstrumentedAttribute)
class SAInstrumentedAttributeFromDottedString:
    """sparc.sa 1.x's name for :func:`resolve_attribute`."""

    def __new__(cls, Base: Any, dotted_name: str) -> Any:
        return resolve_attribute(Base, dotted_name)


SAInstrumentedAttributeFromDottedStringFactory = Factory(
    SAInstrumentedAttributeFromDottedString,
    title="Mapped attribute from 'Class.attribute'",
    description="sparc.sa.orm.query.instrumented_attribute(Base, 'Class.attribute')",
)


# -- filter expressions ------------------------------------------------------------

_MISSING: Any = object()
_OPERATIONS = {
    "==": "eq",
    "equals": "eq",
    "!=": "ne",
    "not equals": "ne",
    "<": "lt",
    "less than": "lt",
    "<=": "le",
    "less than equal": "le",
    ">": "gt",
    "greater than": "gt",
    ">=": "ge",
    "greater than equal": "ge",
    "like": "like",
    "ilike": "ilike",
    "in": "in",
    "not in": "not in",
    "is null": "is null",
    "is not null": "is not null",
}
_COMPARISONS = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}


def _check_attribute(attribute: Any, path: str) -> None:
    prop = getattr(attribute, "property", None)
    if not ISAInstrumentedAttribute.providedBy(attribute) or not isinstance(prop, ColumnProperty):
        raise InvalidFilterError(path, f"expected a mapped column attribute, got {attribute!r}")


def _attribute_name(attribute: Any) -> str:
    return f"{getattr(attribute.class_, '__name__', '?')}.{attribute.key}"


def _operation(condition: object, path: str) -> str:
    if isinstance(condition, str):
        operation = _OPERATIONS.get(condition.strip().lower())
        if operation is not None:
            return operation
        found = _quote(condition)
    else:
        found = kind(condition)
    raise InvalidFilterError(path, f"expected one of {', '.join(CONDITIONS)}; got {found}")


def _value(attribute: Any, operation: str, value: Any, path: str) -> Any:
    """The checked, converted value of one expression (``path`` names the value)."""
    if operation in ("is null", "is not null"):
        if value is not _MISSING and value is not None:
            raise InvalidFilterError(path, f"'{operation}' takes no value")
        return None
    if value is _MISSING:
        raise InvalidFilterError(path, f"'{operation}' needs a value")
    if operation in ("in", "not in"):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise InvalidFilterError(path, f"'{operation}' needs a list, got {kind(value)}")
        if len(value) > MAX_IN_VALUES:
            raise InvalidFilterError(path, f"'{operation}' takes at most {MAX_IN_VALUES} values")
        return [coerce(attribute, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if value is None:
        if operation in ("eq", "ne"):
            return None  # == None is IS NULL, != None IS NOT NULL, as in SQLAlchemy
        raise InvalidFilterError(path, f"'{operation}' needs a value other than null")
    if isinstance(value, (list, tuple, set, Mapping)):
        raise InvalidFilterError(path, f"expected a single value, got {kind(value)}")
    if operation in ("like", "ilike"):
        if python_type(attribute) not in (str, None) or getattr(
            column_type(attribute), "enums", None
        ):
            # PostgreSQL has no LIKE for an ENUM type: a driver error that aborts the transaction
            raise InvalidFilterError(path, f"'{operation}' applies to string columns only")
        if not isinstance(value, str):
            raise InvalidFilterError(
                path, f"'{operation}' needs a string pattern, got {kind(value)}"
            )
        return check_length(attribute, check_like_pattern(value, path), path)
    if operation in ("lt", "le", "gt", "ge") and python_type(attribute) is bool:
        # SQLAlchemy refuses to build `flag < false` (an ArgumentError)
        symbol = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}[operation]
        raise InvalidFilterError(path, f"'{symbol}' does not apply to true/false columns")
    return coerce(attribute, value, path)


@implementer(ISAModelFilterExpression)
class SAModelFilterExpression:
    """``attribute <condition> value`` on one mapped column, checked when built.

    The condition is stored in its canonical spelling (lower case), and the
    value as the column's type takes it.
    """

    def __init__(self, attribute: Any, condition: str, value: Any = _MISSING) -> None:
        self._set(attribute, condition, value, "")

    def _set(self, attribute: Any, condition: Any, value: Any, path: str) -> None:
        at = f"{path}." if path else ""
        _check_attribute(attribute, f"{at}attribute")
        operation = _operation(condition, f"{at}condition")
        self.attribute = attribute
        self.condition = condition.strip().lower()
        try:
            self.value = _value(attribute, operation, value, f"{at}value")
        except InvalidFilterError as exc:
            # a value from a request: say which column refused it, not only where
            raise InvalidFilterError(exc.path, exc.expected, _attribute_name(attribute)) from None
        self._operation = operation

    def __repr__(self) -> str:
        return f"<filter {self.attribute} {self.condition} {type(self.value).__name__}>"


SAModelFilterExpressionFactory = Factory(
    SAModelFilterExpression,
    title="Filter expression",
    description="sparc.sa.orm.query.filter_expression(attribute, condition, value)",
)


def expression_for(expression: Any) -> ColumnElement[bool]:
    """The SQL of one ISAModelFilterExpression provider."""
    attribute = expression.attribute
    operation = getattr(expression, "_operation", None) or _operation(
        expression.condition, "condition"
    )
    value = expression.value
    if operation in _COMPARISONS:
        if value is not None:
            clause = _COMPARISONS[operation](attribute, value)
        elif operation == "eq":
            clause = attribute.is_(None)
        elif operation == "ne":
            clause = attribute.is_not(None)
        else:
            raise InvalidFilterError("value", f"'{operation}' needs a value other than null")
    elif operation == "like":
        # Backslash escapes on every server: PostgreSQL and MariaDB by default,
        # SQLite only when told, so a pattern means the same thing on all three.
        clause = attribute.like(value, escape="\\")
    elif operation == "ilike":
        clause = attribute.ilike(value, escape="\\")
    elif operation == "in":
        clause = attribute.in_(value)
    elif operation == "not in":
        clause = attribute.not_in(value)
    elif operation == "is null":
        clause = attribute.is_(None)
    else:
        clause = attribute.is_not(None)
    return clause  # type: ignore[no-any-return]


@implementer(ISAExpression)
@adapter(ISAModelFilterExpression)
class SAExpressionFromSAModelFilterExpression:
    """Adapter: a filter expression to its SQL (which then provides ISAExpression)."""

    def __new__(cls, context: Any) -> Any:
        clause = expression_for(context)
        alsoProvides(clause, ISAExpression)
        return clause


@implementer(ISAModelFilterExpressionGroup)
class SAModelFilterExpressionGroup:
    """Expressions and groups, in order, under one conjunction ('AND' or 'OR')."""

    def __init__(self, conjunction: str, expressions: Iterable[Any] = ()) -> None:
        self.conjunction = _conjunction(conjunction, "conjunction")
        items = tuple(expressions)
        for i, item in enumerate(items):
            if not (
                ISAModelFilterExpression.providedBy(item)
                or ISAModelFilterExpressionGroup.providedBy(item)
            ):
                raise InvalidFilterError(
                    f"expressions[{i}]", f"expected a filter expression or group, got {kind(item)}"
                )
        self.expressions = items

    def __repr__(self) -> str:
        return f"<filter group {self.conjunction} of {len(self.expressions)}>"


SAModelFilterExpressionGroupFactory = Factory(
    SAModelFilterExpressionGroup,
    title="Filter expression group",
    description="sparc.sa.orm.query.filter_expression_group(conjunction, expressions)",
)


def _conjunction(conjunction: object, path: str) -> str:
    if isinstance(conjunction, str) and conjunction.strip().upper() in CONJUNCTIONS:
        return conjunction.strip().upper()
    found = _quote(conjunction) if isinstance(conjunction, str) else kind(conjunction)
    raise InvalidFilterError(path, f"expected 'and' or 'or', got {found}")


def conjunction_for(group: Any, _depth: int = 1) -> ColumnElement[bool]:
    """The SQL of an ISAModelFilterExpressionGroup provider, nested groups included."""
    if _depth > MAX_FILTER_DEPTH:
        raise InvalidFilterError("expressions", f"groups nest at most {MAX_FILTER_DEPTH} deep")
    clauses = []
    for item in group.expressions:
        if ISAModelFilterExpressionGroup.providedBy(item):
            clauses.append(conjunction_for(item, _depth + 1))
        else:
            clause = queryAdapter(item, ISAExpression)
            clauses.append(expression_for(item) if clause is None else clause)
    if str(group.conjunction).upper() == "OR":
        return sa.or_(*clauses) if clauses else sa.false()
    return sa.and_(*clauses) if clauses else sa.true()


@implementer(ISAConjunction)
@adapter(ISAModelFilterExpressionGroup)
class SAConjunctionFromSAModelFilterExpressionGroup:
    """Adapter: a filter group to its ``and_()``/``or_()`` (which then provides ISAConjunction).

    Usable in ``Query.filter()`` and ``select().where()`` alike. An empty
    'AND' group is TRUE, an empty 'OR' group FALSE.
    """

    def __new__(cls, context: Any) -> Any:
        clause = conjunction_for(context)
        if not isinstance(clause, (sa.sql.elements.True_, sa.sql.elements.False_)):
            # true() and false() are shared constants: leave them unmarked
            alsoProvides(clause, ISAConjunction)
        return clause


class _Converter:
    """Builds filter groups from an untrusted container, checking every part."""

    def __init__(self, base: Any, max_depth: int, max_expressions: int) -> None:
        self.names = _classes_by_name(base)
        self.max_depth = max_depth
        self.max_expressions = max_expressions
        self.count = 0
        self.budget = Budget(MAX_FILTER_VALUES, MAX_FILTER_TEXT)

    def node(self, node: object, path: str, depth: int) -> Any:
        if not isinstance(node, Mapping):
            raise InvalidFilterError(
                path,
                "expected a group {'conjunction', 'expressions'} or an expression "
                f"{{'attribute', 'condition', 'value'}}, got {kind(node)}",
            )
        if "conjunction" in node or "expressions" in node:
            return self.group(node, path, depth)
        return self.expression(node, path)

    def keys(self, node: Mapping[Any, Any], allowed: tuple[str, ...], path: str) -> None:
        for key in node:
            if key not in allowed:
                found = _quote(key) if isinstance(key, str) else kind(key)
                raise InvalidFilterError(
                    path, f"unexpected key {found}; expected {', '.join(allowed)}"
                )

    def group(self, node: Mapping[Any, Any], path: str, depth: int) -> SAModelFilterExpressionGroup:
        at = f"{path}." if path else ""
        if depth > self.max_depth:
            raise InvalidFilterError(path, f"groups nest at most {self.max_depth} deep")
        self.keys(node, ("conjunction", "expressions"), path)
        if "conjunction" not in node:
            raise InvalidFilterError(f"{at}conjunction", "missing; expected 'and' or 'or'")
        conjunction = _conjunction(node["conjunction"], f"{at}conjunction")
        expressions = node.get("expressions", _MISSING)
        if isinstance(expressions, (str, bytes, Mapping)) or not isinstance(
            expressions, (list, tuple)
        ):
            got = "nothing" if expressions is _MISSING else kind(expressions)
            raise InvalidFilterError(f"{at}expressions", f"expected a list, got {got}")
        items = []
        for i, item in enumerate(expressions):
            self.count += 1
            where = f"{at}expressions[{i}]"
            if self.count > self.max_expressions:
                raise InvalidFilterError(
                    where, f"a filter holds at most {self.max_expressions} expressions and groups"
                )
            items.append(self.node(item, where, depth + 1))
        return SAModelFilterExpressionGroup(conjunction, items)

    def expression(self, node: Mapping[Any, Any], path: str) -> SAModelFilterExpression:
        at = f"{path}." if path else ""
        self.keys(node, ("attribute", "condition", "value"), path)
        for key in ("attribute", "condition"):
            if key not in node:
                raise InvalidFilterError(f"{at}{key}", "missing")
        attribute = _resolve(self.names, node["attribute"], f"{at}attribute")
        expression = SAModelFilterExpression.__new__(SAModelFilterExpression)
        expression._set(attribute, node["condition"], node.get("value", _MISSING), path)
        value = expression.value
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.budget.charge(item, f"{at}value[{i}]")
        elif value is not None:  # None is IS NULL: no parameter
            self.budget.charge(value, f"{at}value")
        return expression


def expression_group_from_container(
    base: Any,
    container: object,
    *,
    max_depth: int = MAX_FILTER_DEPTH,
    max_expressions: int = MAX_FILTER_EXPRESSIONS,
) -> SAModelFilterExpressionGroup:
    """An ISAModelFilterExpressionGroup built from a plain, untrusted container.

    Raises :class:`~sparc.sa.exceptions.InvalidFilterError` for anything
    malformed, naming where in the container it is. ``container`` is only read.
    """
    converter = _Converter(base, max_depth, max_expressions)
    if not isinstance(container, Mapping) or not (
        "conjunction" in container or "expressions" in container
    ):
        raise InvalidFilterError(
            "", f"expected a group {{'conjunction', 'expressions'}}, got {kind(container)}"
        )
    return converter.group(container, "", 1)


@implementer(ISAModelFilterExpressionGroup)
class SAModelFilterExpressionGroupFromContainer:
    """sparc.sa 1.x's name for :func:`expression_group_from_container`."""

    def __new__(cls, Base: Any, container: object) -> Any:
        return expression_group_from_container(Base, container)


SAModelFilterExpressionGroupFromContainerFactory = Factory(
    SAModelFilterExpressionGroupFromContainer,
    title="Filter expression group from a container",
    description="sparc.sa.orm.query.filter_expression_group_from_container(Base, container)",
)


# -- results -------------------------------------------------------------------------


@implementer(ISAResultRowModel)
class SAResultRowModel:
    """The ISAResultRowModel utility."""

    def first(self, iface: Any, row: Iterable[Any]) -> Any:
        for entry in row:
            if iface.providedBy(entry):
                return entry
        raise ValueError(f"no entry of the row provides {iface.__identifier__}")


_NO_ROWS_BEYOND = 2**62


@implementer(IFiniteSequence)
@adapter(ISAQuery)
class ModelSequenceForQuery:
    """A query as a read-only sequence: ``len()``, indexes and slices.

    ``len()`` runs a COUNT; an index or a slice fetches only its rows, with
    LIMIT and OFFSET composed with any the query already has. Negative
    indexes and open-ended slices first count. Nothing loads the whole result
    unless the slice asks for all of it.

    A ``Query`` carries its session. A ``Select`` does not: adapt it together
    with one, ``getMultiAdapter((select, session), IFiniteSequence)``.
    """

    def __init__(self, query: Any, session: Session | None = None) -> None:
        if isinstance(query, Select):
            if session is None:
                raise TypeError(
                    "a select() has no session to run in: adapt it together with one, "
                    "getMultiAdapter((select, session), IFiniteSequence)"
                )
            description = query.column_descriptions
            self._scalars = (
                len(description) == 1 and description[0]["expr"] is description[0]["entity"]
            )
        elif not isinstance(query, Query):
            raise TypeError(f"expected a Query or a select(), got {query!r}")
        self.query = query
        self.session = session

    def _rows(self, start: int, stop: int) -> list[Any]:
        # No table holds 2**62 rows: a window beyond that is empty, and clipping
        # it there keeps LIMIT and OFFSET (plus any OFFSET the query has) in the
        # 64 bits every server takes, so that seq[10**20] is an IndexError.
        if start >= _NO_ROWS_BEYOND:
            return []
        stop = min(stop, _NO_ROWS_BEYOND)
        # SQLAlchemy's slice() adds to an OFFSET the query already has but
        # replaces its LIMIT: keep the window inside that LIMIT here.
        if getattr(self.query, "_limit_clause", None) is not None:
            stop = min(stop, len(self))
            if stop <= start:
                return []
        if self.session is None:
            return self.query.slice(start, stop).all()  # type: ignore[no-any-return]
        result = self.session.execute(self.query.slice(start, stop))
        return list(result.scalars() if self._scalars else result)

    def __len__(self) -> int:
        if self.session is None:
            return self.query.count()  # type: ignore[no-any-return]
        counted = sa.select(sa.func.count()).select_from(self.query.subquery())
        return int(self.session.execute(counted).scalar_one())

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._slice(index)
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"sequence indices must be integers or slices, not {type(index).__name__}"
            ) from None
        if i < 0:
            i += len(self)
            if i < 0:
                raise IndexError("list index out of range")
        rows = self._rows(i, i + 1)
        if not rows:
            raise IndexError("list index out of range")
        return rows[0]

    def _slice(self, index: slice) -> list[Any]:
        step = 1 if index.step is None else operator.index(index.step)
        if step == 0:
            raise ValueError("slice step cannot be zero")
        start = 0 if index.start is None else operator.index(index.start)
        stop = None if index.stop is None else operator.index(index.stop)
        if step > 0 and start >= 0 and stop is not None and stop >= 0:
            if stop <= start:
                return []
            return self._rows(start, stop)[::step]  # no COUNT needed
        wanted = range(*index.indices(len(self)))
        if not wanted:
            return []
        low, high = min(wanted), max(wanted)
        rows = self._rows(low, high + 1)
        return [rows[i - low] for i in wanted if i - low < len(rows)]

    def __iter__(self) -> Iterator[Any]:
        if self.session is None:
            return iter(self.query)
        result = self.session.execute(self.query)
        return iter(result.scalars() if self._scalars else result)


def sequence_for_select(select: Select[Any], session: Session) -> ModelSequenceForQuery:
    """Adapter (registered in ZCML): (``select()``, ISASession) to IFiniteSequence."""
    return ModelSequenceForQuery(select, session)
