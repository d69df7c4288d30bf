"""A mapped column as a read-only mapping (sparc.sa 1.x's ``sparc.sa.orm.attributes``).

``getMultiAdapter((Model.name, session), IIterableMapping)`` maps each value
of ``Model.name`` to the row that holds it: ``mapping['x']`` is the ``Model``
whose ``name`` is ``'x'``. The column is expected to be unique; a key held by
several rows raises ``sqlalchemy.orm.exc.MultipleResultsFound``.

A key is checked and converted as a filter value is
(:func:`sparc.sa.query.values.coerce`): a key no supported server could compare
with the column (a string with a NUL, an integer beyond the column's range
...) raises :class:`~sparc.sa.exceptions.InvalidFilterError` with the path
``key``, before any SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import ColumnProperty, Session
from zope.component import adapter
from zope.interface import implementer
from zope.interface.common.mapping import IIterableMapping

from sparc.sa.interfaces import ISAInstrumentedAttribute, ISASession
from sparc.sa.query.values import coerce

__all__ = ["ISAInstrumentedAttribute", "ModelMappingForUniqueInstrumentedAttribute"]


@implementer(IIterableMapping)
@adapter(ISAInstrumentedAttribute, ISASession)
class ModelMappingForUniqueInstrumentedAttribute:
    """The rows of a mapped class, keyed by one of its (unique) columns.

    Every lookup is a query in ``session``, so the mapping always shows what
    the session sees, pending changes included (they are flushed first).
    Rows come in primary key order.
    """

    def __init__(self, attribute: Any, session: Session) -> None:
        if not isinstance(getattr(attribute, "property", None), ColumnProperty):
            raise TypeError(
                f"expected a mapped column attribute such as Model.name, got {attribute!r}"
            )
        self.attribute = attribute
        self.session = session
        self.attribute_model_type = attribute.class_
        self.attribute_name = attribute.key
        mapper = sa.inspect(self.attribute_model_type)
        self._order = list(mapper.primary_key)
        # 1.x exposed the legacy Query over the whole class; kept for its users.
        self.query = session.query(self.attribute_model_type)

    def _rows(self) -> sa.Select[Any]:
        return sa.select(self.attribute_model_type).order_by(*self._order)

    def _row(self, key: Any) -> Any:
        key = coerce(self.attribute, key, "key")
        statement = sa.select(self.attribute_model_type).where(self.attribute == key)
        return self.session.execute(statement).scalar_one_or_none()

    # IItemMapping
    def __getitem__(self, key: Any) -> Any:
        row = self._row(key)
        if row is None:
            raise KeyError(key)
        return row

    # IReadMapping
    def get(self, key: Any, default: Any = None) -> Any:
        row = self._row(key)
        return default if row is None else row

    def __contains__(self, key: object) -> bool:
        key = coerce(self.attribute, key, "key")
        exists = sa.select(self.attribute).where(self.attribute == key).limit(1)
        return self.session.execute(exists).first() is not None

    # IEnumerableMapping
    def keys(self) -> list[Any]:
        return list(self)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.session.scalars(sa.select(self.attribute).order_by(*self._order)).all())

    def values(self) -> list[Any]:
        return list(self.itervalues())

    def items(self) -> list[tuple[Any, Any]]:
        return list(self.iteritems())

    def __len__(self) -> int:
        if self.session.autoflush:  # a Core count does not autoflush on every 2.0.x
            self.session.flush()
        counted = sa.select(sa.func.count()).select_from(self.attribute_model_type)
        return int(self.session.execute(counted).scalar_one())

    # IIterableMapping (the Python 2 names of 1.x)
    def iterkeys(self) -> Iterator[Any]:
        return iter(self)

    def itervalues(self) -> Iterator[Any]:
        return iter(self.session.scalars(self._rows()).all())

    def iteritems(self) -> Iterator[tuple[Any, Any]]:
        name = self.attribute_name
        return ((getattr(row, name), row) for row in self.itervalues())
