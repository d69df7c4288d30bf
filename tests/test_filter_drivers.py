"""One answer on every driver: the same filter values through all six drivers.

The same table, the same rows and the same generated filter values run through
pysqlite and aiosqlite (one SQLite file), psycopg and asyncpg (PostgreSQL),
PyMySQL and asyncmy (MariaDB/MySQL); the async drivers through an asyncio
engine, as an application would use them. Each answer is the ids selected or
the InvalidFilterError (its path); any other exception fails the test, and so
does a transaction that no longer works after the filter ran.

Compared across the drivers of one server: every answer. Across servers: that
the value was refused or not (and where), and the rows for the columns whose
comparisons mean the same on every server (integers, ``Numeric(12, 2)``,
booleans, dates, times and datetimes); strings follow each server's collation
and ``Float`` is single precision on MariaDB, so those rows are compared per
server only.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import pathlib
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sparc.sa import query
from sparc.sa.engine import engine_from_config
from sparc.sa.exceptions import InvalidFilterError

from .conftest import CheckoutCounter

UTC = datetime.timezone.utc
# family: (variable, sync driver, async driver); None: SQLite on a file
FAMILIES: dict[str, tuple[str | None, str, str]] = {
    "sqlite": (None, "sqlite+pysqlite", "sqlite+aiosqlite"),
    "postgresql": ("TEST_PG_DSN", "postgresql+psycopg", "postgresql+asyncpg"),
    "mysql": ("TEST_MYSQL_DSN", "mysql+pymysql", "mysql+asyncmy"),
}
# Columns whose comparisons mean the same on every server.
PORTABLE = {"id", "small", "big", "amount", "whole", "flag", "day", "when", "stamp", "clock"}


def build_table() -> SimpleNamespace:
    token = uuid.uuid4().hex[:10]

    class Base(DeclarativeBase):
        pass

    class Sample(Base):
        __tablename__ = f"sparc_drivers_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        small: Mapped[int | None] = mapped_column(sa.SmallInteger)
        big: Mapped[int | None] = mapped_column(sa.BigInteger)
        ratio: Mapped[float | None] = mapped_column(sa.Float)
        single: Mapped[float | None] = mapped_column(sa.REAL)
        amount: Mapped[decimal.Decimal | None] = mapped_column(sa.Numeric(12, 2))
        exact: Mapped[decimal.Decimal | None] = mapped_column(sa.Numeric)
        name: Mapped[str | None] = mapped_column(sa.String(20))
        note: Mapped[str | None] = mapped_column(sa.Text)
        flag: Mapped[bool | None] = mapped_column(sa.Boolean)
        when: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime)
        stamp: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime(timezone=True))
        day: Mapped[datetime.date | None] = mapped_column(sa.Date)
        clock: Mapped[datetime.time | None] = mapped_column(sa.Time)
        code: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid)
        whole: Mapped[decimal.Decimal | None] = mapped_column(sa.Numeric(5))
        color: Mapped[str | None] = mapped_column(sa.Enum("red", "green", name=f"color_{token}"))
        blob: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
        data: Mapped[Any] = mapped_column(sa.JSON, nullable=True)

    columns = [column.key for column in Sample.__table__.columns]
    rows = [
        dict(
            id=1,
            small=-7,
            big=2**40,
            ratio=0.5,
            single=1.5,
            amount=decimal.Decimal("12.50"),
            exact=decimal.Decimal("3"),
            name="alpha",
            note="Alpha beta",
            flag=True,
            when=datetime.datetime(2030, 1, 1),
            stamp=datetime.datetime(2030, 1, 1, tzinfo=UTC),
            day=datetime.date(2030, 1, 1),
            clock=datetime.time(12, 30),
            code=uuid.UUID(int=1),
            whole=decimal.Decimal("99999"),
            color="red",
            blob=b"\x00\x01",
            data={"x": 1},
        ),
        dict(
            id=2,
            small=32767,
            big=-(2**63),
            ratio=-2.25,
            single=-0.25,
            amount=decimal.Decimal("9999999999.99"),
            exact=decimal.Decimal("-12"),
            name="b%c_d",
            note="",
            flag=False,
            when=datetime.datetime(1999, 12, 31, 23, 59, 59),
            stamp=datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
            day=datetime.date(1999, 12, 31),
            clock=datetime.time(0, 0, 1),
            code=uuid.UUID(int=2**127),
            whole=decimal.Decimal("-3"),
            color="green",
            blob=b"",
            data=[1, 2],
        ),
        dict.fromkeys(columns, None) | {"id": 3},
        dict(
            id=4,
            small=0,
            big=0,
            ratio=0.0,
            single=0.0,
            amount=decimal.Decimal("-0.01"),
            exact=decimal.Decimal("0"),
            name="",
            note="x" * 300,
            flag=True,
            when=datetime.datetime(2030, 1, 1, 5, 0),
            stamp=datetime.datetime(2030, 1, 1, 5, 0, tzinfo=UTC),
            day=datetime.date(2000, 2, 29),
            clock=datetime.time(23, 59, 59),
            code=uuid.UUID(int=0),
            whole=decimal.Decimal("0"),
            color="green",
            blob=b"\xff",
            data="x",
        ),
    ]
    return SimpleNamespace(Base=Base, Sample=Sample, rows=rows)


class Driver:
    """One driver's engine (sync or asyncio), answering filters on the table."""

    def __init__(self, name: str, family: str, dsn: str, loop: asyncio.AbstractEventLoop):
        self.name = name
        self.family = family
        self.loop = loop
        self.engine: Any = engine_from_config({"dsn": dsn})
        self.is_async = isinstance(self.engine, AsyncEngine)
        # pools without checkedout() (NullPool) are counted through events
        self.counter = CheckoutCounter(self.engine.sync_engine if self.is_async else self.engine)

    def answer(self, table: SimpleNamespace, where: Any) -> list[int]:
        statement = sa.select(table.Sample.id).where(where).order_by(table.Sample.id)
        check = sa.select(sa.literal(1))
        if not self.is_async:
            with self.engine.begin() as conn:
                found = list(conn.execute(statement).scalars())
                # the transaction the filter ran in still works
                assert conn.execute(check).scalar_one() == 1
            return found

        async def main() -> list[int]:
            async with self.engine.begin() as conn:
                found = list((await conn.execute(statement)).scalars())
                assert (await conn.execute(check)).scalar_one() == 1
            return found

        return self.loop.run_until_complete(main())

    def checked_out(self) -> int:
        return self.counter.out

    def dispose(self) -> None:
        if self.is_async:
            self.loop.run_until_complete(self.engine.dispose())
        else:
            self.engine.dispose()


def family_dsns(family: str, tmp: pathlib.Path) -> tuple[str, str]:
    var, sync_driver, async_driver = FAMILIES[family]
    if var is None:
        path = tmp / f"drivers-{uuid.uuid4().hex[:6]}.db"
        return f"{sync_driver}:///{path}", f"{async_driver}:///{path}"
    dsn = os.environ.get(var)
    if not dsn:
        pytest.skip(f"{var} is not set, so there is no {family} server to test against")
    url = sa.make_url(dsn)
    return tuple(  # type: ignore[return-value]
        url.set(drivername=driver).render_as_string(hide_password=False)
        for driver in (sync_driver, async_driver)
    )


@pytest.fixture(scope="module", params=["sqlite", "every server"])
def drivers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """The table on every family's database, and the two drivers of each.
    ``every server`` needs both server variables, and skips with the reason
    without them."""
    families = ["sqlite"] if request.param == "sqlite" else list(FAMILIES)
    tmp = tmp_path_factory.mktemp("drivers")
    dsns = {family: family_dsns(family, tmp) for family in families}
    table = build_table()
    loop = asyncio.new_event_loop()
    found: list[Driver] = []
    setups: list[Engine] = []
    try:
        for family, (sync_dsn, async_dsn) in dsns.items():
            setup = sa.create_engine(sync_dsn)
            setups.append(setup)
            table.Base.metadata.create_all(setup)
            with setup.begin() as conn:
                conn.execute(sa.insert(table.Sample.__table__), table.rows)
            for dsn in (sync_dsn, async_dsn):
                name = sa.make_url(dsn).drivername.split("+")[1]
                found.append(Driver(name, family, dsn, loop))
        yield SimpleNamespace(table=table, drivers=found)
        left = {driver.name: driver.checked_out() for driver in found}
        assert set(left.values()) == {0}, f"connections still checked out: {left}"
    finally:
        for driver in found:
            driver.dispose()
        loop.close()
        for setup in setups:
            table.Base.metadata.drop_all(setup)
            setup.dispose()


def answer(driver: Driver, table: SimpleNamespace, container: dict[str, Any]) -> Any:
    """('rows', ids) or ('refused', path); anything else propagates and fails."""
    try:
        group = query.expression_group_from_container(table.Base, container)
    except InvalidFilterError as exc:
        return ("refused", exc.path, exc)
    where = query.SAConjunctionFromSAModelFilterExpressionGroup(group)
    return ("rows", driver.answer(table, where), None)


# -- the values: of every column type, in their typed and text forms, and hostile ----------

NUMBERS = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([2**15 - 1, 2**15, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e12, max_value=1e12),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(min_value=-(10**12), max_value=10**12, places=2),
    st.decimals(min_value=-(10**12), max_value=10**12, places=4),
    st.sampled_from(
        [
            "1e9999999999999999999",
            "0e999999999999999999999",
            "0e-20000000",
            "0e-99999999999",
            "-0e+0",
            "1e1000",
            "1e-1000",
            "3.4e39",
            "1e-40",
            "9999999999.99",
            "10000000000",
            "12.500",
            "-0.01",
            "0.001",
            100000000000,
        ]
    ),
)
NUMBER_TEXT = NUMBERS.map(str)
MOMENTS = st.one_of(
    st.datetimes(timezones=st.none() | st.timezones()),
    st.datetimes(
        min_value=datetime.datetime(1999, 12, 31),
        max_value=datetime.datetime(2030, 1, 2),
        timezones=st.none() | st.just(UTC) | st.timezones(),
    ),
    st.dates(),
    st.times(timezones=st.none() | st.timezones()),
    st.sampled_from(
        [
            datetime.datetime(2030, 1, 1),
            datetime.datetime(2030, 1, 1, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=5))),
            datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
            datetime.datetime(
                9999, 12, 31, 23, tzinfo=datetime.timezone(-datetime.timedelta(hours=2))
            ),
            datetime.date(2030, 1, 1),
            datetime.time(12, 30),
        ]
    ),
)
MOMENT_TEXT = st.one_of(
    MOMENTS.map(lambda m: m.isoformat()),
    st.sampled_from(
        [
            "2030-01-01T00:00:00.000Z",
            "2030-01-01T05:00:00+05:00",
            "1999-12-31 23:59:59",
            "2000-02-29",
            "12:30:00",
            "12:30:00+01:00",
            "0001-01-01T00:00:00+01:00",
        ]
    ),
)
TEXTS = st.one_of(
    st.text(max_size=25),
    st.text(alphabet="ab%_\\xAB", max_size=25),
    st.sampled_from(
        ["alpha", "ALPHA", "a%", "b\\%c%", "x" * 21, "x" * 300, "a\\", "\x00", "\ud800"]
    ),
)
SCALARS = st.one_of(
    NUMBERS,
    NUMBER_TEXT,
    MOMENTS,
    MOMENT_TEXT,
    TEXTS,
    st.booleans(),
    st.none(),
    st.uuids(),
    st.uuids().map(str),
    st.binary(max_size=4),
    st.sampled_from(["red", "green", "blue", "RED"]),
)
CONDITIONS = ["==", "!=", "<", "<=", ">", ">=", "like", "ilike", "in", "not in"]
CONDITIONS += ["is null", "is not null"]


INTEGERS = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.integers(min_value=-10, max_value=40000),
    st.sampled_from([2**15 - 1, 2**15, 2**31 - 1, 2**31, 2**40, 2**63 - 1, 2**63, -(2**63)]),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1.5, -2.25, -0.25, 0.0, 3.4e38, 3.5e38, 1e-38, 1e-46, 1e308]),
)
DECIMALS = st.one_of(
    st.decimals(min_value=-(10**11), max_value=10**11, places=2),
    st.decimals(min_value=-(10**11), max_value=10**11, places=3),
    st.sampled_from(["12.50", "12.5", "12.500", "9999999999.99", "-0.01", "3", "-12"]).map(
        decimal.Decimal
    ),
)
# What each column is most often given: its own kind of value, typed or as text.
OWN: dict[str, Any] = {
    "id": INTEGERS,
    "small": INTEGERS,
    "big": INTEGERS,
    "ratio": FLOATS | FLOATS.map(repr) | DECIMALS,
    "single": FLOATS | FLOATS.map(repr) | DECIMALS,
    "amount": DECIMALS | DECIMALS.map(str) | INTEGERS | NUMBERS,
    "exact": DECIMALS | DECIMALS.map(str) | INTEGERS | NUMBERS,
    "name": TEXTS,
    "note": TEXTS,
    "flag": st.booleans(),
    "when": MOMENTS | MOMENT_TEXT,
    "stamp": MOMENTS | MOMENT_TEXT,
    "day": st.dates() | st.dates().map(str) | MOMENT_TEXT,
    "clock": st.times(timezones=st.none() | st.timezones()) | MOMENT_TEXT,
    "code": st.uuids() | st.uuids().map(str) | st.just(uuid.UUID(int=1)),
    "whole": DECIMALS | DECIMALS.map(str) | INTEGERS | st.sampled_from(["99999", "1e5", "-3.0"]),
    "color": st.sampled_from(["red", "green", "blue", "RED", "red "]),
    "blob": st.binary(max_size=4) | st.sampled_from([b"\x00\x01", b"", b"\xff"]),
    "data": SCALARS,
}
COLUMNS = sorted(OWN)


@st.composite
def expressions(draw: Any) -> dict[str, Any]:
    column = draw(st.sampled_from(COLUMNS))
    values = st.one_of(OWN[column], OWN[column], OWN[column], SCALARS)
    condition = draw(st.sampled_from(CONDITIONS))
    value: Any = draw(values)
    if condition in ("in", "not in"):
        value = draw(st.lists(values, min_size=1, max_size=3))
    if condition in ("is null", "is not null"):
        return {"attribute": f"Sample.{column}", "condition": condition}
    return {"attribute": f"Sample.{column}", "condition": condition, "value": value}


def compare(table: SimpleNamespace, drivers: list[Driver], node: dict[str, Any]) -> None:
    container = {"conjunction": "and", "expressions": [node]}
    answers = {driver.name: answer(driver, table, container) for driver in drivers}
    outcomes = {name: found[:2] for name, found in answers.items()}
    column = node["attribute"].split(".")[1]
    for found in answers.values():
        if found[0] == "refused":
            # the error names the attribute as well as the place
            assert node["attribute"] in str(found[2]), str(found[2])
    # refused or not, and where: the same on every driver
    kinds = {
        name: (found[0], found[1] if found[0] == "refused" else None)
        for name, found in outcomes.items()
    }
    first = next(iter(outcomes.values()))
    event(f"{first[0]} {'(some rows)' if first[0] == 'rows' and first[1] else ''}")
    assert len(set(kinds.values())) == 1, kinds
    families = {driver.family for driver in drivers}
    for family in families:
        same = {d.name: outcomes[d.name] for d in drivers if d.family == family}
        assert len(set(map(repr, same.values()))) == 1, same
    if column in PORTABLE:
        assert len(set(map(repr, outcomes.values()))) == 1, outcomes


def node(attribute: str, condition: str, value: Any) -> dict[str, Any]:
    return {"attribute": f"Sample.{attribute}", "condition": condition, "value": value}


@settings(
    max_examples=int(os.environ.get("SPARC_DRIVER_EXAMPLES", "800")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(expression=expressions())
# the cases of issue 28, measured on the code before it
@example(expression=node("exact", "<", "1e9999999999999999999"))
@example(expression=node("ratio", "<", "0e999999999999999999999"))
@example(expression=node("exact", "==", "0e-20000000"))
@example(expression=node("exact", "==", "0e-99999999999"))
@example(expression=node("when", "<", "2030-01-01T00:00:00.000Z"))
@example(expression=node("when", "==", "2030-01-01T05:00:00+05:00"))
@example(expression=node("amount", "<", 100000000000))
@example(expression=node("amount", "==", "12.505"))
@example(expression=node("name", "==", "x" * 21))
@example(expression=node("single", "<", 1e300))
@example(expression=node("clock", "<", "12:30:00+01:00"))
@example(expression=node("color", "like", "red"))  # found by this test
@example(expression=node("flag", "<", False))  # found by this test
def test_every_driver_gives_the_same_answer(drivers: SimpleNamespace, expression: Any) -> None:
    compare(drivers.table, drivers.drivers, expression)


def test_an_aware_value_on_a_naive_column_is_compared_in_utc(drivers: SimpleNamespace) -> None:
    """The choice the docs name: 05:00+05:00 is midnight UTC, which a naive
    column is taken to hold; on an aware column a naive value is UTC."""
    for column, value in [
        ("when", "2030-01-01T05:00:00+05:00"),
        ("when", "2030-01-01T00:00:00.000Z"),
        ("stamp", "2030-01-01T00:00:00"),
        ("stamp", "2030-01-01T01:00:00+01:00"),
    ]:
        container = {"conjunction": "and", "expressions": [node(column, "==", value)]}
        for driver in drivers.drivers:
            assert answer(driver, drivers.table, container)[:2] == ("rows", [1]), (
                driver.name,
                column,
                value,
            )
