"""What checking a filter value costs: microseconds per value.

    python bench/values.py [--quick]

For each kind of value, times three ways to turn a request's value into the
WHERE clause of a filter, with no database involved (the checks run before
any SQL, so a database would only add the same query time to each):

``checked``
    ``expression_group_from_container()`` and the group's conjunction: the
    container walked, the value checked against its column's type and
    converted, the SQL expression built;
``unchecked``
    the same SQL expression built directly from the already converted value
    (``Part.price == Decimal('12.50')``, ``and_()``): what a filter costs
    with no checks at all;
``coerce``
    ``sparc.sa.query.values.coerce()`` alone: the check and conversion of one value.

Each figure is the median over rounds of the per-value CPU time of this
process (``time.process_time``), so neighbours on a shared machine inflate
it less than wall time; still, run it on a quiet machine for figures to
compare. ``in`` lists count each of their values.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sparc.sa import query
from sparc.sa.query import values


class Base(DeclarativeBase):
    pass


class Part(Base):
    __tablename__ = "bench_part"
    id: Mapped[int] = mapped_column(primary_key=True)
    price: Mapped[decimal.Decimal | None] = mapped_column(sa.Numeric(12, 2))
    weight: Mapped[float | None] = mapped_column(sa.Float)
    name: Mapped[str | None] = mapped_column(sa.String(50))
    made: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime)


# (label, attribute, condition, value as a request holds it, the converted value)
WORKLOADS: list[tuple[str, Any, str, Any, Any]] = [
    ("int on Integer", Part.id, "==", 12345, 12345),
    ("numeric text on Numeric(12, 2)", Part.price, "<", "12.50", decimal.Decimal("12.50")),
    ("float on Float", Part.weight, ">", 0.25, 0.25),
    ("string on String(50)", Part.name, "==", "a bolt", "a bolt"),
    (
        "ISO text on DateTime (aware: to UTC)",
        Part.made,
        "<",
        "2030-01-01T00:00:00.000Z",
        datetime.datetime(2030, 1, 1),
    ),
    (
        "ISO text on DateTime (naive)",
        Part.made,
        "<",
        "2030-01-01T00:00:00",
        datetime.datetime(2030, 1, 1),
    ),
    ("100 ints in an 'in' list", Part.id, "in", list(range(100)), list(range(100))),
]
_SQL = {"==": "__eq__", "<": "__lt__", ">": "__gt__"}


def per_value(fn: Callable[[], Any], count: int, values_per_call: int, rounds: int) -> float:
    """Median over rounds of the CPU microseconds per value."""
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(count):
            fn()
        samples.append((time.process_time() - start) / (count * values_per_call) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    args = parser.parse_args()
    count, rounds = (200, 3) if args.quick else (3000, 15)
    print(
        f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}, "
        f"{platform.machine()}; {rounds} rounds of {count} filters; CPU µs per value"
    )
    print(f"{'workload':40} {'checked':>9} {'unchecked':>10} {'coerce':>8} {'checks add':>11}")
    for label, attribute, condition, raw, converted in WORKLOADS:
        n = len(raw) if isinstance(raw, list) else 1
        container = {
            "conjunction": "and",
            "expressions": [
                {"attribute": f"Part.{attribute.key}", "condition": condition, "value": raw}
            ],
        }

        def checked(container: dict[str, Any] = container) -> Any:
            group = query.expression_group_from_container(Base, container)
            return query.conjunction_for(group)

        unchecked: Callable[[], Any]
        coerce: Callable[[], Any]
        if condition == "in":
            unchecked = partial(lambda a, c: sa.and_(a.in_(c)), attribute, converted)
            coerce = partial(
                lambda a, items: [values.coerce(a, item, "value") for item in items],
                attribute,
                raw,
            )
        else:
            unchecked = partial(
                lambda a, m, c: sa.and_(getattr(a, m)(c)), attribute, _SQL[condition], converted
            )
            coerce = partial(values.coerce, attribute, raw, "value")
        assert str(checked()) == str(unchecked()), label  # the same SQL
        with_checks = per_value(checked, count, n, rounds)
        without = per_value(unchecked, count, n, rounds)
        alone = per_value(coerce, count, n, rounds)
        print(
            f"{label:40} {with_checks:9.2f} {without:10.2f} {alone:8.2f} "
            f"{with_checks - without:+11.2f}"
        )


if __name__ == "__main__":
    main()
