"""Queries: filter expressions and groups, and the SQL they make; a plain
container of filters checked and converted to them (untrusted input)."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import ColumnProperty
from sqlalchemy.sql.elements import ColumnElement
from zope.component import adapter, queryAdapter
from zope.component.factory import Factory
from zope.interface import alsoProvides, implementer

from sparc.sa.exceptions import InvalidFilterError
from sparc.sa.interfaces import (
    CONDITIONS,
    CONJUNCTIONS,
    ISAConjunction,
    ISAExpression,
    ISAInstrumentedAttribute,
    ISAModelFilterExpression,
    ISAModelFilterExpressionGroup,
)
from sparc.sa.query.dotted import classes_by_name, quote, resolve
from sparc.sa.query.values import (
    MAX_FILTER_TEXT,
    MAX_FILTER_VALUES,
    Budget,
    check_comparable,
    check_length,
    check_like_pattern,
    coerce,
    column_type,
    kind,
    python_type,
)

#: Groups nest at most this deep in a filter container (the outermost group is 1).
MAX_FILTER_DEPTH = 8
#: A filter container holds at most this many expressions and groups in all.
MAX_FILTER_EXPRESSIONS = 200
#: An 'in' or 'not in' expression takes at most this many values (and all the
#: expressions of a container at most MAX_FILTER_VALUES, see sparc.sa.query.values).
MAX_IN_VALUES = 1000

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
        found = quote(condition)
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
        check_comparable(attribute, path)  # also when the list is empty
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
    found = quote(conjunction) if isinstance(conjunction, str) else kind(conjunction)
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
        self.names = classes_by_name(base)
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
                found = quote(key) if isinstance(key, str) else kind(key)
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
        attribute = resolve(self.names, node["attribute"], f"{at}attribute")
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
