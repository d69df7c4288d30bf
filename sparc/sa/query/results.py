"""Queries: result rows as models, and a query or select as a finite
sequence."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Query, Session
from sqlalchemy.sql import Select
from zope.component import adapter
from zope.interface import implementer
from zope.interface.common.sequence import IFiniteSequence

from sparc.sa.foreign.of_sqlalchemy import limit_clause
from sparc.sa.interfaces import (
    ISAQuery,
    ISAResultRowModel,
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
        if limit_clause(self.query) is not None:
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
