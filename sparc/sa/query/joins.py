"""Queries: the graph of related models, and outer joins along it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper, Query, Session
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement
from zope.component.factory import Factory
from zope.interface import implementer

from sparc.sa.interfaces import (
    IORMRelatedModelsAdder,
    ISAQuery,
)

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
