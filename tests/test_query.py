"""The query helpers: outer joins, filter containers (untrusted input) and sequences,
on every backend."""

from __future__ import annotations

import copy
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
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from zope.component import getMultiAdapter
from zope.interface.common.mapping import IIterableMapping
from zope.interface.common.sequence import IFiniteSequence

from sparc.sa import query
from sparc.sa.exceptions import InvalidFilterError
from sparc.sa.interfaces import ISAConjunction, ISAExpression, ISAQuery
from sparc.sa.orm import scoped_transaction

from .conftest import ReadOnlyTables, shared_engine


def build_library() -> SimpleNamespace:
    token = uuid.uuid4().hex[:10]

    class Base(DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = f"sparc_author_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(50), unique=True)
        born: Mapped[datetime.date | None] = mapped_column(sa.Date)
        rating: Mapped[decimal.Decimal | None] = mapped_column(sa.Numeric(4, 2))
        active: Mapped[bool] = mapped_column(default=True)
        books: Mapped[list[Book]] = relationship(back_populates="author")

        def secret(self) -> str:
            return "never"

    class Book(Base):
        __tablename__ = f"sparc_book_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        title: Mapped[str] = mapped_column(sa.String(50))
        author_id: Mapped[int | None] = mapped_column(sa.ForeignKey(Author.id))
        pages: Mapped[int | None]
        author: Mapped[Author | None] = relationship(back_populates="books")

    class Review(Base):
        __tablename__ = f"sparc_review_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        book_id: Mapped[int] = mapped_column(sa.ForeignKey(Book.id))
        stars: Mapped[int]

    class Shelf(Base):  # relates to nothing
        __tablename__ = f"sparc_shelf_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    return SimpleNamespace(Base=Base, Author=Author, Book=Book, Review=Review, Shelf=Shelf)


def fill_library(engine: Engine) -> SimpleNamespace:
    """A new library's tables on *engine*, with its rows."""
    ns = build_library()
    ns.Base.metadata.create_all(engine)
    A, B, R = ns.Author, ns.Book, ns.Review
    with Session(engine) as session, session.begin():
        session.add_all(
            [
                A(id=1, name="Ann", born=datetime.date(1970, 1, 2), rating=4.5),
                A(id=2, name="bob", born=datetime.date(1980, 5, 6), rating=3.25, active=False),
                A(id=3, name="Cy", born=None, rating=None),  # has no books
            ]
        )
        session.flush()
        session.add_all(
            [
                B(id=10, title="Alpha", author_id=1, pages=100),
                B(id=11, title="beta", author_id=1, pages=250),
                B(id=12, title="Gamma", author_id=2, pages=None),
                B(id=13, title="Orphan", author_id=None, pages=50),
            ]
        )
        session.flush()
        session.add_all(
            [
                R(id=100, book_id=10, stars=5),
                R(id=101, book_id=10, stars=3),
                R(id=102, book_id=12, stars=1),
            ]
        )
    return ns


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadOnlyTables]:
    """The library, made once per backend for this module's tests: they only
    read it (the one test that adds a row has tables of its own)."""
    tables = ReadOnlyTables(fill_library, tmp_path_factory.mktemp("query"))
    yield tables
    tables.close()


@pytest.fixture
def engine(backend: str, shared: ReadOnlyTables) -> Iterator[Engine]:
    yield from shared_engine(shared, backend)


@pytest.fixture
def lib(backend: str, engine: Engine, shared: ReadOnlyTables) -> SimpleNamespace:
    return shared.filled(backend)


@pytest.fixture
def own_lib(engine: Engine) -> Iterator[SimpleNamespace]:
    """A library of the test's own, for a test that writes to it."""
    ns = fill_library(engine)
    yield ns
    ns.Base.metadata.drop_all(engine)


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[str]]:
    sent: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    yield sent
    event.remove(engine, "before_cursor_execute", note)


# -- outer joins -------------------------------------------------------------------


def test_outer_join_keeps_every_row_of_the_first_model(engine: Engine, lib: Any) -> None:
    A, B, R = lib.Author, lib.Book, lib.Review
    tx = scoped_transaction(engine, lib.Base)
    with tx() as Session_:
        q = query.outer_joined_query(Session_(), [A, B, R]).order_by(A.id, B.id, R.id)
        rows = [(a.id, b and b.id, r and r.id) for a, b, r in q]
    assert rows == [
        (1, 10, 100),
        (1, 10, 101),
        (1, 11, None),
        (2, 12, 102),
        (3, None, None),
    ]


def test_outer_join_from_a_middle_model_joins_each_to_an_earlier_one(
    engine: Engine, lib: Any
) -> None:
    A, B, R = lib.Author, lib.Book, lib.Review
    statement = query.outer_joined_select([B, R, A], select=[B.title, A.name])
    statement = statement.where(A.name.is_(None)).order_by(B.id)
    with engine.connect() as conn:
        assert conn.execute(statement).all() == [("Orphan", None)]
    sql = str(statement.compile(engine))
    assert sql.count("LEFT OUTER JOIN") == 2
    assert "ON" in sql


def test_a_model_related_to_none_before_it_is_named(engine: Engine, lib: Any) -> None:
    with pytest.raises(ValueError, match=r"Shelf has no foreign key .* \(Author, Book\)"):
        query.outer_joined_select([lib.Author, lib.Book, lib.Shelf])
    with pytest.raises(ValueError, match="at least one"):
        query.outer_joined_select([])
    with pytest.raises(TypeError, match=r"models\[1\]: expected a mapped class"):
        query.outer_joined_select([lib.Author, "Book"])


# -- filter containers --------------------------------------------------------------


def ids(engine: Engine, lib: Any, container: Any, model: Any = None) -> list[int]:
    model = model or lib.Book
    group = query.expression_group_from_container(lib.Base, container)
    conjunction = query.SAConjunctionFromSAModelFilterExpressionGroup(group)
    assert ISAConjunction.providedBy(conjunction) or isinstance(
        conjunction, (sa.sql.elements.True_, sa.sql.elements.False_)
    )
    statement = query.outer_joined_select([model, lib.Author] if model is lib.Book else [model])
    statement = statement.with_only_columns(model.id).where(conjunction).order_by(model.id)
    with engine.connect() as conn:
        return list(conn.execute(statement).scalars())


def expr(attribute: str, condition: str, *value: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"attribute": attribute, "condition": condition}
    if value:
        found["value"] = value[0]
    return found


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        (expr("Book.pages", "==", 100), [10]),
        (expr("Book.pages", "equals", "100"), [10]),
        (expr("Book.pages", "!=", 100), [11, 13]),
        (expr("Book.pages", "<", 100), [13]),
        (expr("Book.pages", "less than equal", 100), [10, 13]),
        (expr("Book.pages", ">", 100), [11]),
        (expr("Book.pages", ">=", 100), [10, 11]),
        (expr("Book.title", "like", "%a"), [10, 11, 12]),
        (expr("Book.title", "ILIKE", "b%"), [11]),
        (expr("Book.title", "ilike", "ALPHA"), [10]),
        (expr("Book.pages", "in", [50, 250]), [11, 13]),
        (expr("Book.pages", "not in", [50, 250]), [10]),
        (expr("Book.pages", "is null"), [12]),
        (expr("Book.pages", "is not null"), [10, 11, 13]),
        (expr("Book.pages", "==", None), [12]),
        (expr("Author.born", ">", "1975-01-01"), [12]),
        (expr("Author.rating", ">=", "4"), [10, 11]),
        (expr("Author.active", "==", False), [12]),
        (expr("Author.name", "in", []), []),
    ],
)
def test_each_condition_selects_the_right_rows(
    engine: Engine, lib: Any, expression: dict[str, Any], expected: list[int]
) -> None:
    assert ids(engine, lib, {"conjunction": "and", "expressions": [expression]}) == expected


def test_nested_groups_and_empty_groups(engine: Engine, lib: Any) -> None:
    container = {
        "conjunction": "and",
        "expressions": [
            expr("Book.pages", "is not null"),
            {
                "conjunction": "or",
                "expressions": [
                    expr("Author.name", "==", "Ann"),
                    {"conjunction": "and", "expressions": [expr("Book.pages", "<", 60)]},
                ],
            },
        ],
    }
    assert ids(engine, lib, container) == [10, 11, 13]
    assert ids(engine, lib, {"conjunction": "and", "expressions": []}) == [10, 11, 12, 13]
    assert ids(engine, lib, {"conjunction": "or", "expressions": []}) == []


def test_the_conjunction_works_in_query_filter_too(engine: Engine, lib: Any) -> None:
    container = {"conjunction": "OR", "expressions": [expr("Review.stars", ">", 4)]}
    group = query.expression_group_from_container(lib.Base, container)
    tx = scoped_transaction(engine, lib.Base)
    with tx() as Session_:
        q = query.outer_joined_query(Session_(), [lib.Review, lib.Book])
        rows = q.filter(query.SAConjunctionFromSAModelFilterExpressionGroup(group)).all()
        assert [(r.id, b.id) for r, b in rows] == [(100, 10)]


def test_the_container_is_never_changed(lib: Any) -> None:
    container = {
        "conjunction": "and",
        "expressions": [
            expr("Book.title", "in", ["a", "b"]),
            {"conjunction": "or", "expressions": [expr("Book.pages", "==", "3")]},
        ],
    }
    before = copy.deepcopy(container)
    query.expression_group_from_container(lib.Base, container)
    assert container == before


def test_filter_expressions_adapt_through_the_registry(zcml: None, lib: Any) -> None:
    expression = query.SAModelFilterExpression(lib.Book.pages, "==", 3)
    clause = ISAExpression(expression)
    assert ISAExpression.providedBy(clause)
    group = query.SAModelFilterExpressionGroup("or", [expression, expression])
    assert ISAConjunction.providedBy(ISAConjunction(group))


BAD = [
    ([], "", "expected a group"),
    ({"conjunction": "xor", "expressions": []}, "conjunction", "'and' or 'or'"),
    ({"expressions": []}, "conjunction", "missing"),
    ({"conjunction": "and", "expressions": "Book.id"}, "expressions", "expected a list"),
    ({"conjunction": "and", "expressions": [1]}, "expressions[0]", "got an int"),
    (
        {"conjunction": "and", "expressions": [{"attribute": "Book.id"}]},
        "expressions[0].condition",
        "missing",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "==", 1) | {"valeu": 1}]},
        "expressions[0]",
        "unexpected key 'valeu'",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Nope.id", "==", 1)]},
        "expressions[0].attribute",
        "class mapped by this Base",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.nope", "==", 1)]},
        "expressions[0].attribute",
        "mapped column of Book",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book", "==", 1)]},
        "expressions[0].attribute",
        "'Class.attribute'",
    ),
    (
        {"conjunction": "and", "expressions": [expr(["Book.id"], "==", 1)]},
        "expressions[0].attribute",
        "got a list",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "~=", 1)]},
        "expressions[0].condition",
        "expected one of",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "==")]},
        "expressions[0].value",
        "needs a value",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "in", 3)]},
        "expressions[0].value",
        "needs a list",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "in", "3")]},
        "expressions[0].value",
        "needs a list",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "in", [1, "x"])]},
        "expressions[0].value[1]",
        "integer",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "is null", 3)]},
        "expressions[0].value",
        "takes no value",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "==", "abc")]},
        "expressions[0].value",
        "expected an integer",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "==", 10**30)]},
        "expressions[0].value",
        "32 bits",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "==", True)]},
        "expressions[0].value",
        "integer",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "==", [1])]},
        "expressions[0].value",
        "single value",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "<", None)]},
        "expressions[0].value",
        "other than null",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.id", "like", "1%")]},
        "expressions[0].value",
        "string columns",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.title", "like", 1)]},
        "expressions[0].value",
        "string pattern",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Book.title", "==", 1)]},
        "expressions[0].value",
        "expected a string",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Author.born", "==", "yesterday")]},
        "expressions[0].value",
        "ISO 8601 date",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Author.rating", "==", "nan")]},
        "expressions[0].value",
        "number",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Author.rating", "==", float("inf"))]},
        "expressions[0].value",
        "finite",
    ),
    (
        {"conjunction": "and", "expressions": [expr("Author.active", "==", "yes")]},
        "expressions[0].value",
        "true or false",
    ),
    (
        {
            "conjunction": "and",
            "expressions": [{"conjunction": "or", "expressions": [expr("Book.x", "==", 1)]}],
        },
        "expressions[0].expressions[0].attribute",
        "mapped column",
    ),
]


@pytest.mark.parametrize(("container", "path", "message"), BAD)
def test_a_malformed_container_names_where_and_what(
    engine: Engine, lib: Any, statements: list[str], container: Any, path: str, message: str
) -> None:
    with pytest.raises(InvalidFilterError) as caught:
        query.expression_group_from_container(lib.Base, container)
    assert caught.value.path == path
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert statements == []  # nothing was sent


@pytest.mark.parametrize(
    "attribute",
    [
        "Author.secret",  # a method
        "Author.books",  # a relationship
        "Author.__class__",
        "Author.__init__",
        "Author.__table__",
        "Author.metadata",
        "Author.registry",
        "Author._sa_class_manager",
        "os.system",
        "Author.name.__class__",
        "DeclarativeBase.metadata",
        "Base.metadata",
    ],
)
def test_attribute_strings_resolve_to_mapped_columns_only(lib: Any, attribute: str) -> None:
    container = {"conjunction": "and", "expressions": [expr(attribute, "is null")]}
    with pytest.raises(InvalidFilterError) as caught:
        query.expression_group_from_container(lib.Base, container)
    assert caught.value.path == "expressions[0].attribute"
    with pytest.raises(InvalidFilterError):
        query.resolve_attribute(lib.Base, attribute)


def test_an_ambiguous_class_name_is_refused() -> None:
    class Base(DeclarativeBase):
        pass

    def make(module: str) -> type[Any]:
        return type(
            "Thing",
            (Base,),
            {
                "__module__": module,
                "__tablename__": f"thing_{module}",
                "id": mapped_column(sa.Integer, primary_key=True),
            },
        )

    make("app_a"), make("app_b")
    with pytest.raises(InvalidFilterError, match=r"ambiguous: app_a.Thing, app_b.Thing"):
        query.resolve_attribute(Base, "Thing.id")


def test_limits_on_depth_count_and_list_size(lib: Any) -> None:
    leaf = expr("Book.id", "==", 1)
    deep: dict[str, Any] = {"conjunction": "and", "expressions": [leaf]}
    for _ in range(query.MAX_FILTER_DEPTH - 1):
        deep = {"conjunction": "and", "expressions": [deep]}
    query.expression_group_from_container(lib.Base, deep)  # exactly at the limit
    with pytest.raises(InvalidFilterError, match=f"at most {query.MAX_FILTER_DEPTH} deep"):
        query.expression_group_from_container(
            lib.Base, {"conjunction": "and", "expressions": [deep]}
        )
    wide = {"conjunction": "or", "expressions": [leaf] * query.MAX_FILTER_EXPRESSIONS}
    query.expression_group_from_container(lib.Base, wide)
    wide["expressions"] = [leaf] * (query.MAX_FILTER_EXPRESSIONS + 1)
    with pytest.raises(InvalidFilterError) as caught:
        query.expression_group_from_container(lib.Base, wide)
    assert caught.value.path == f"expressions[{query.MAX_FILTER_EXPRESSIONS}]"
    many = {"conjunction": "or", "expressions": [expr("Book.id", "in", list(range(1001)))]}
    with pytest.raises(InvalidFilterError, match="at most 1000 values"):
        query.expression_group_from_container(lib.Base, many)


# -- sequences ---------------------------------------------------------------------


def test_sequence_answers_with_count_limit_and_offset(
    zcml: None, engine: Engine, lib: Any, statements: list[str]
) -> None:
    tx = scoped_transaction(engine, lib.Base)
    with tx() as Session_:
        q = Session_().query(lib.Book).order_by(lib.Book.id)
        assert ISAQuery.providedBy(q)
        seq = IFiniteSequence(q)
        statements.clear()
        assert len(seq) == 4
        assert seq[0].id == 10 and seq[3].id == 13
        assert seq[-1].id == 13 and seq[-4].id == 10
        assert [b.id for b in seq[1:3]] == [11, 12]
        assert [b.id for b in seq[0::2]] == [10, 12]
        assert [b.id for b in seq[::-1]] == [13, 12, 11, 10]
        assert [b.id for b in seq[-1:0:-2]] == [13, 11]
        assert seq[3:3] == [] and seq[5:9] == [] and seq[2:1] == []
        for bad in (4, -5):
            with pytest.raises(IndexError, match="list index out of range"):
                seq[bad]
        with pytest.raises(TypeError, match="not str"):
            seq["1"]
        assert [b.id for b in seq] == [10, 11, 12, 13]
        # every statement that fetched rows was bounded, except the full iteration
        fetching = [s for s in statements[:-1] if s.startswith("SELECT") and "count(" not in s]
        assert fetching and all("LIMIT" in s.upper() for s in fetching)


def test_sequence_composes_with_a_limited_query(engine: Engine, lib: Any) -> None:
    tx = scoped_transaction(engine, lib.Base)
    with tx() as Session_:
        q = Session_().query(lib.Book).order_by(lib.Book.id).offset(1).limit(2)
        seq = query.ModelSequenceForQuery(q)
        assert len(seq) == 2
        assert [b.id for b in seq[0:5]] == [11, 12]
        assert seq[-1].id == 12
        with pytest.raises(IndexError):
            seq[2]


def test_a_select_is_a_sequence_with_a_session(zcml: None, engine: Engine, lib: Any) -> None:
    statement = sa.select(lib.Book).order_by(lib.Book.id.desc())
    assert ISAQuery.providedBy(statement)
    with pytest.raises(TypeError, match="adapt it together with one"):
        IFiniteSequence(statement)
    tx = scoped_transaction(engine, lib.Base)
    with tx() as Session_:
        seq = getMultiAdapter((statement, Session_()), IFiniteSequence)
        assert len(seq) == 4
        assert seq[0].id == 13
        assert [b.id for b in seq[1:3]] == [12, 11]
        rows = getMultiAdapter(
            (sa.select(lib.Book.id, lib.Book.title), Session_()), IFiniteSequence
        )
        assert tuple(rows[0]) in {(10, "Alpha"), (11, "beta"), (12, "Gamma"), (13, "Orphan")}


# -- the attribute mapping -------------------------------------------------------------


def test_a_unique_column_as_a_mapping(zcml: None, engine: Engine, own_lib: Any) -> None:
    lib = own_lib  # it adds a row
    tx = scoped_transaction(engine, lib.Base)
    with tx() as Session_:
        mapping = getMultiAdapter((lib.Author.name, Session_()), IIterableMapping)
        assert len(mapping) == 3
        assert mapping.keys() == ["Ann", "bob", "Cy"]  # primary key order
        assert [a.id for a in mapping.values()] == [1, 2, 3]
        assert [(k, a.id) for k, a in mapping.items()] == [("Ann", 1), ("bob", 2), ("Cy", 3)]
        assert "bob" in mapping
        # MariaDB's default collation compares case-insensitively
        assert ("Bob" in mapping) is (engine.dialect.name == "mysql")
        assert mapping["Cy"].id == 3
        assert mapping.get("nobody", "default") == "default"
        with pytest.raises(KeyError):
            mapping["nobody"]
        Session_.add(lib.Author(id=4, name="Dee"))
        assert "Dee" in mapping and len(mapping) == 4  # pending rows are seen
    with pytest.raises(TypeError, match="mapped column"):
        getMultiAdapter((lib.Author.books, tx.session), IIterableMapping)
