"""Hostile filter values, sizes and indexes: rows or InvalidFilterError, on every backend.

A value that SQLite, PostgreSQL or MariaDB would refuse, or that the driver
could not send, is refused before any SQL with InvalidFilterError and its path;
everything else runs, and the surrounding transaction stays usable.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from zope.component import getMultiAdapter
from zope.interface.common.mapping import IIterableMapping

from sparc.sa import query
from sparc.sa.exceptions import InvalidFilterError
from sparc.sa.query import values

from .conftest import ReadOnlyTables, shared_engine


def build_samples() -> SimpleNamespace:
    token = uuid.uuid4().hex[:10]

    class Base(DeclarativeBase):
        pass

    class Sample(Base):
        __tablename__ = f"sparc_sample_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        small: Mapped[int | None] = mapped_column(sa.SmallInteger)
        big: Mapped[int | None] = mapped_column(sa.BigInteger)
        ratio: Mapped[float | None] = mapped_column(sa.Float)
        amount: Mapped[decimal.Decimal | None] = mapped_column(sa.Numeric(10, 2))
        exact: Mapped[decimal.Decimal | None] = mapped_column(sa.Numeric)
        name: Mapped[str | None] = mapped_column(sa.String(50))
        note: Mapped[str | None] = mapped_column(sa.Text)
        data: Mapped[Any] = mapped_column(sa.JSON, nullable=True)
        blob: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
        when: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime)
        day: Mapped[datetime.date | None] = mapped_column(sa.Date)

    return SimpleNamespace(Base=Base, Sample=Sample)


def fill_samples(engine: Engine) -> SimpleNamespace:
    """A new Sample table on *engine*, with its two rows."""
    ns = build_samples()
    ns.Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(
            [
                ns.Sample(
                    id=1,
                    small=1,
                    big=2**40,
                    ratio=0.5,
                    amount=decimal.Decimal("12.50"),
                    exact=decimal.Decimal("1.5"),
                    name="a\\b%c",
                    data={"x": 1},
                    blob=b"\x00\x01",
                    when=datetime.datetime(2020, 1, 2, 3, 4, 5),
                    day=datetime.date(2020, 1, 2),
                ),
                ns.Sample(id=2, name="plain"),
            ]
        )
    return ns


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadOnlyTables]:
    """The samples, made once per backend for this module's tests, which
    only read them."""
    tables = ReadOnlyTables(fill_samples, tmp_path_factory.mktemp("values"))
    yield tables
    tables.close()


@pytest.fixture
def engine(backend: str, shared: ReadOnlyTables) -> Iterator[Engine]:
    yield from shared_engine(shared, backend)


@pytest.fixture
def samples(backend: str, engine: Engine, shared: ReadOnlyTables) -> SimpleNamespace:
    return shared.filled(backend)


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[str]]:
    sent: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    yield sent
    event.remove(engine, "before_cursor_execute", note)


def container(*expressions: dict[str, Any], conjunction: str = "or") -> dict[str, Any]:
    return {"conjunction": conjunction, "expressions": list(expressions)}


def expr(attribute: str, condition: str, *value: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"attribute": f"Sample.{attribute}", "condition": condition}
    if value:
        found["value"] = value[0]
    return found


def run(session: Session, ns: SimpleNamespace, filter_container: Any) -> list[int]:
    """The ids the filter selects, inside the session's transaction."""
    group = query.expression_group_from_container(ns.Base, filter_container)
    where = query.SAConjunctionFromSAModelFilterExpressionGroup(group)
    statement = sa.select(ns.Sample.id).where(where).order_by(ns.Sample.id)
    return list(session.execute(statement).scalars())


def outcome(engine: Engine, ns: SimpleNamespace, filter_container: Any) -> Any:
    """The ids, or the InvalidFilterError; anything else propagates and fails the
    test. The transaction the filter ran in must still work afterwards."""
    with Session(engine) as session, session.begin():
        try:
            found: Any = run(session, ns, filter_container)
        except InvalidFilterError as exc:
            found = exc
        assert session.execute(sa.select(sa.literal(1))).scalar_one() == 1
    return found


# Values the servers or drivers used to refuse with a driver error: each is
# refused before any SQL, naming the value.
REFUSED = [
    ("ratio", "==", int("9" * 401), "between"),
    ("ratio", "<", "1e400", "between"),
    ("ratio", "<", decimal.Decimal("-1e400"), "between"),
    ("name", "==", "\ud800", "lone surrogate"),
    ("name", "like", "a\udfff%", "lone surrogate"),
    ("name", "==", "a\x00b", "without NUL"),
    ("name", "like", "a\\", "unescaped backslash"),
    ("name", "ilike", "%a\\\\\\", "unescaped backslash"),
    ("id", "==", 2**31, "32 bits"),
    ("id", "<", -(2**31) - 1, "32 bits"),
    ("small", ">", 2**15, "16 bits"),
    ("small", "in", [1, -(2**15) - 1], "16 bits"),
    ("big", "==", 2**63, "64 bits"),
    ("exact", "<", decimal.Decimal("1e200000"), "magnitude"),
    ("exact", "<", decimal.Decimal("1e-20000"), "magnitude"),
    ("exact", "<", 10**5000, "digits"),
    ("exact", "<", "1" * 2000, "digits"),
    # the column's own type: Numeric(10, 2), String(50), a naive time
    ("amount", "<", decimal.Decimal("1e1000"), "at most 8 digits before"),
    ("amount", "<", int("9" * 1000), "at most 8 digits before"),
    ("amount", "<", 100_000_000, "at most 8 digits before"),
    ("amount", ">", decimal.Decimal("1e-1000"), "at most 2 digits after"),
    ("amount", "==", "12.505", "at most 2 digits after"),
    ("name", "==", "x" * 51, "at most 50 characters"),
    ("name", "like", "%" * 51, "at most 50 characters"),
    # exponents no driver writes out in bounded space, zero included
    ("exact", "<", "1e9999999999999999999", "magnitude"),
    ("ratio", "<", "0e999999999999999999999", "magnitude"),
    ("exact", "==", "0e-20000000", "magnitude"),
    ("exact", "==", "0e-99999999999", "magnitude"),
    ("ratio", "==", decimal.Decimal("0e-99999999999"), "magnitude"),
    ("when", "<", "0001-01-01T00:00:00+01:00", "converted to UTC"),
    ("small", "<", True, "integer"),
    ("big", ">", "1.5", "integer"),
    ("data", "==", "x", "takes only 'is null'"),
    ("data", "in", ["x"], "takes only 'is null'"),
    # found by Hypothesis: an empty list reached PostgreSQL ("json = unknown")
    ("data", "in", [], "takes only 'is null'"),
    ("data", "not in", [], "takes only 'is null'"),
]


def names(cases: list[tuple[Any, ...]]) -> list[str]:
    return [f"{case[0]}-{case[1]}-{i}" for i, case in enumerate(cases)]


@pytest.mark.parametrize(("column", "condition", "value", "message"), REFUSED, ids=names(REFUSED))
def test_values_servers_refuse_are_refused_before_any_sql(
    engine: Engine,
    samples: Any,
    statements: list[str],
    column: str,
    condition: str,
    value: Any,
    message: str,
) -> None:
    statements.clear()
    found = outcome(
        engine, samples, container(expr("name", "==", "plain"), expr(column, condition, value))
    )
    assert isinstance(found, InvalidFilterError), found
    assert found.path.startswith("expressions[1].value"), found.path
    assert message in str(found)
    assert not [s for s in statements if "sparc_sample" in s]  # no SQL for the filter


# Values at the edge of what every server takes: they run, and select the right rows.
ACCEPTED = [
    ("id", "<", 2**31 - 1, [1, 2]),
    ("id", ">", -(2**31), [1, 2]),
    ("small", "<", 2**15 - 1, [1]),
    ("small", "in", [-(2**15), 1], [1]),
    ("big", "==", 2**40, [1]),
    ("big", "<", 2**63 - 1, [1]),
    ("ratio", "<", 1e308, [1]),
    ("ratio", ">", -1e308, [1]),
    ("ratio", ">", 1e-320, [1]),
    ("ratio", "<", int("9" * 300), [1]),
    ("ratio", "<", "1e300", [1]),
    ("amount", "<", decimal.Decimal("99999999.99"), [1]),
    ("amount", ">", decimal.Decimal("-99999999.99"), [1]),
    ("amount", "==", "12.500000", [1]),
    ("amount", ">=", 12, [1]),
    ("amount", "<", decimal.Decimal("1E+2"), [1]),
    ("exact", ">", "1.4999", [1]),  # MariaDB stores 2: NUMERIC is DECIMAL(10, 0)
    ("exact", "<", "1e1000", [1]),
    ("exact", "<", decimal.Decimal("9" * 1000), [1]),
    ("exact", ">", decimal.Decimal("0." + "0" * 900 + "1"), [1]),
    ("name", "==", "\U0001f600\ufffe\u200b", []),
    ("name", "like", "a\\\\b\\%c", [1]),
    ("name", "like", "%\\\\", []),
    ("name", "ilike", "PLAIN", [2]),
    ("name", "==", "x" * 50, []),
    ("note", "==", "x" * 10_000, []),
    ("blob", "==", b"\x00\x01", [1]),
    ("when", "<", "9999-12-31T23:59:59.999999", [1]),
    ("when", ">", "0001-01-01", [1]),
    ("when", "==", "2020-01-02T08:04:05+05:00", [1]),  # compared in UTC
    ("when", "==", "2020-01-02T03:04:05Z", [1]),
    ("day", ">", "0001-01-01", [1]),
    ("data", "is null", None, [2]),
    ("data", "is not null", None, [1]),
]


@pytest.mark.parametrize(
    ("column", "condition", "value", "expected"), ACCEPTED, ids=names(ACCEPTED)
)
def test_values_at_the_edge_run_on_every_server(
    engine: Engine, samples: Any, column: str, condition: str, value: Any, expected: Any
) -> None:
    if condition in ("is null", "is not null"):
        found = outcome(engine, samples, container(expr(column, condition)))
    else:
        found = outcome(engine, samples, container(expr(column, condition, value)))
    assert not isinstance(found, InvalidFilterError), found
    if expected is not None:
        assert found == expected


def test_the_value_budget_fits_every_server(engine: Engine, samples: Any) -> None:
    per = query.MAX_IN_VALUES
    lists = [
        expr("id", "in", list(range(i * per, (i + 1) * per)))
        for i in range(query.MAX_FILTER_VALUES // per)
    ]
    assert outcome(engine, samples, container(*lists)) == [1, 2]  # exactly at the limit
    found = outcome(engine, samples, container(*lists, expr("id", "==", 1)))
    assert isinstance(found, InvalidFilterError)
    assert found.path == f"expressions[{len(lists)}].value"
    assert f"at most {query.MAX_FILTER_VALUES} values" in str(found)
    # 200 x 1000 values were within the old limits, and PostgreSQL refuses them
    many = container(*(expr("id", "in", list(range(per))) for _ in range(200)))
    found = outcome(engine, samples, many)
    assert isinstance(found, InvalidFilterError)
    assert found.path == f"expressions[{query.MAX_FILTER_VALUES // per}].value[0]"


def test_the_text_budget_fits_every_server(engine: Engine, samples: Any) -> None:
    # four-byte characters: the most bytes a character takes in UTF-8
    word = "\U0001f600" * 1000
    count = query.MAX_FILTER_TEXT // len(word)
    words = [word[:-1] + chr(0x1F600 + i % 50) for i in range(count)]
    assert outcome(engine, samples, container(expr("note", "in", words))) == []
    found = outcome(engine, samples, container(expr("note", "in", words), expr("note", "==", "x")))
    assert isinstance(found, InvalidFilterError)
    assert found.path == "expressions[1].value"
    assert f"at most {query.MAX_FILTER_TEXT} characters" in str(found)


# -- sequences ---------------------------------------------------------------------


HUGE = [10**20, 2**63, 2**64 + 1, 10**400]


def test_sequence_indexes_beyond_64_bits_behave_as_a_list(engine: Engine, samples: Any) -> None:
    with Session(engine) as session, session.begin():
        for seq in (
            query.ModelSequenceForQuery(session.query(samples.Sample).order_by(samples.Sample.id)),
            query.ModelSequenceForQuery(
                sa.select(samples.Sample).order_by(samples.Sample.id), session
            ),
        ):
            ids = [1, 2]
            for huge in HUGE:
                for index in (huge, -huge):
                    with pytest.raises(IndexError):
                        seq[index]
                for window in (
                    slice(0, huge),
                    slice(huge, None),
                    slice(-huge, huge),
                    slice(1, huge, huge),
                    slice(huge, -huge, -1),
                    slice(None, None, -huge),
                    slice(-huge, 1),
                    slice(huge, huge + 5),
                ):
                    got = [row.id for row in seq[window]]
                    assert got == ids[window], window
            assert session.execute(sa.select(sa.literal(1))).scalar_one() == 1


# -- the mapping adapter ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "key", "message"),
    [
        ("name", "\ud800", "lone surrogate"),
        ("name", "a\x00", "without NUL"),
        ("id", 2**31, "32 bits"),
        ("id", "x", "integer"),
        ("amount", 10**5000, "digits"),
        ("ratio", 10**400, "between"),
    ],
    ids=["surrogate", "nul", "int32", "text", "digits", "double"],
)
def test_a_mapping_refuses_keys_no_server_takes(
    zcml: None, engine: Engine, samples: Any, column: str, key: Any, message: str
) -> None:
    with Session(engine) as session, session.begin():
        mapping = getMultiAdapter((getattr(samples.Sample, column), session), IIterableMapping)
        for lookup in (mapping.__getitem__, mapping.get, mapping.__contains__):
            with pytest.raises(InvalidFilterError, match=message) as caught:
                lookup(key)
            assert caught.value.path == "key"
        assert "plain" in getMultiAdapter((samples.Sample.name, session), IIterableMapping)
        assert session.execute(sa.select(sa.literal(1))).scalar_one() == 1


def test_the_limits_are_those_the_docs_name() -> None:
    assert (query.MAX_FILTER_VALUES, query.MAX_FILTER_TEXT) == (10_000, 100_000)
    assert (values.MAX_DIGITS, values.MAX_EXPONENT) == (1000, 1000)


# -- property: whatever a request holds, rows or InvalidFilterError --------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COLUMNS = ["id", "small", "big", "ratio", "amount", "exact", "name", "data", "when", "day", "x"]
CONDITIONS = ["==", "!=", "<", ">=", "like", "ilike", "in", "not in", "is null", "is not null"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**15, 2**31, 2**63, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["1e400", "-1e-400", "9" * 1200, "2020-01-02", "a\\", "%\\\\", "\x00", "\ud800"]
    ),
    st.text(max_size=20),
    st.binary(max_size=8),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=5),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
)


@st.composite
def containers(draw: Any, depth: int = 0) -> dict[str, Any]:
    items: list[Any] = []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        if depth < 2 and draw(st.integers(0, 4)) == 0:
            items.append(draw(containers(depth + 1)))
        else:
            node: dict[str, Any] = {
                "attribute": f"Sample.{draw(st.sampled_from(COLUMNS))}",
                "condition": draw(st.sampled_from(CONDITIONS)),
            }
            if draw(st.booleans()):
                node["value"] = draw(VALUES)
            items.append(node)
    return {"conjunction": draw(st.sampled_from(["and", "or", "AND", "xor"])), "expressions": items}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(container=containers())
def test_any_container_gives_rows_or_invalid_filter_error(
    engine: Engine, samples: Any, container: dict[str, Any]
) -> None:
    """Generated containers and values, on SQLite, PostgreSQL and MariaDB: the
    only outcomes are rows and InvalidFilterError, and the transaction the
    filter ran in still works (``outcome`` checks it)."""
    found = outcome(engine, samples, container)
    assert isinstance(found, (list, InvalidFilterError))
