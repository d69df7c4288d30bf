"""Queries: model attributes named by a dotted string (``"Model.attribute"``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import registry as orm_registry
from zope.component.factory import Factory
from zope.interface import implementer

from sparc.sa.exceptions import InvalidFilterError
from sparc.sa.interfaces import (
    ISAInstrumentedAttribute,
)
from sparc.sa.query.values import (
    kind,
)

# -- attributes by name ----------------------------------------------------------


def quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def classes_by_name(base: Any) -> dict[str, list[type[Any]]]:
    registry = getattr(base, "registry", None)
    if not isinstance(registry, orm_registry):
        raise TypeError(
            f"expected a declarative base with a registry of mapped classes, got {base!r}"
        )
    names: dict[str, list[type[Any]]] = {}
    for mapper in registry.mappers:
        names.setdefault(mapper.class_.__name__, []).append(mapper.class_)
    return names


def resolve(names: dict[str, list[type[Any]]], dotted: object, path: str) -> Any:
    if not isinstance(dotted, str):
        raise InvalidFilterError(path, f"expected a string 'Class.attribute', got {kind(dotted)}")
    class_name, dot, key = dotted.partition(".")
    if not dot or not class_name or not key or "." in key:
        raise InvalidFilterError(path, f"expected 'Class.attribute', got {quote(dotted)}")
    classes = names.get(class_name, [])
    if not classes:
        raise InvalidFilterError(
            path, f"expected the name of a class mapped by this Base, got {quote(class_name)}"
        )
    if len(classes) > 1:
        where = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in classes))
        raise InvalidFilterError(path, f"class name {quote(class_name)} is ambiguous: {where}")
    mapper = sa_inspect(classes[0])
    if key not in mapper.column_attrs:
        columns = ", ".join(sorted(mapper.column_attrs.keys()))
        raise InvalidFilterError(
            path, f"expected a mapped column of {class_name} ({columns}), got {quote(key)}"
        )
    return mapper.all_orm_descriptors[key]


def resolve_attribute(base: Any, dotted_name: str) -> Any:
    """The mapped column attribute ``'Class.attribute'`` of a class ``base`` maps.

    Only mapped columns resolve: never a method, a relationship, a dunder or
    anything importable. An unknown or ambiguous name raises InvalidFilterError.
    """
    return resolve(classes_by_name(base), dotted_name, "attribute")


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
