"""Test fixtures of sparc.sa 1.x, for applications' own tests.

Three 1.x modules share this one (see :mod:`sparc.sa.legacy`):

``sparc.sa.testing``
    :data:`SPARC_SA_INTEGRATION_LAYER`, a zope.component test layer that
    loads ``sparc/sa/ftesting.zcml`` (zope.component and sparc.sa) into the
    global registry for the tests of the layer, and empties it afterwards.
``sparc.sa.orm.testing``
    Four related models, Test1 to Test4, each with a marker interface;
    :func:`get_transaction`, a manager over a new in-memory SQLite database
    holding their tables; :func:`populate_tables` and :func:`create_model`.
``sparc.sa.orm.query.testing``
    :data:`related_models`, the graph Test3 - Test2 - Test4 - Test1.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.orm import declarative_base
from sqlalchemy.pool import StaticPool
from zope import interface
from zope.component import globalregistry
from zope.component.testlayer import ZCMLFileLayer

import sparc.sa
from sparc.sa.engine import SAEngineFromConfigFactory
from sparc.sa.orm import ScopedTransaction
from sparc.sa.query import ORMRelatedModelsAdderFactory

__all__ = [
    "SPARC_SA_INTEGRATION_LAYER",
    "Base",
    "ITest1",
    "ITest2",
    "ITest3",
    "ITest4",
    "SparcSAZCMLLayer",
    "Test1",
    "Test2",
    "Test3",
    "Test4",
    "create_model",
    "get_transaction",
    "populate_tables",
    "related_models",
]


class SparcSAZCMLLayer(ZCMLFileLayer):
    """Loads a package's ftesting.zcml on set-up; empties the global registry on tear-down.

    zope.component's own layer leaves the registry to zope.testing's clean-up,
    which does nothing where zope.testing is not installed.
    """

    def setUp(self) -> None:
        globalregistry.base.__init__("base")
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        globalregistry.base.__init__("base")


SPARC_SA_INTEGRATION_LAYER = SparcSAZCMLLayer(sparc.sa, "ftesting.zcml")

# -- the models of 1.x's sparc.sa.orm.testing ---------------------------------

Base: Any = declarative_base()


class ITest1(interface.Interface):
    """Marker"""


class ITest2(interface.Interface):
    """Marker"""


class ITest3(interface.Interface):
    """Marker"""


class ITest4(interface.Interface):
    """Marker"""


@interface.implementer(ITest1)
class Test1(Base):
    __tablename__ = "test1"
    id = sqlalchemy.Column(sqlalchemy.Integer, nullable=False, primary_key=True, autoincrement=True)
    name = sqlalchemy.Column(sqlalchemy.String, nullable=True, unique=False)


@interface.implementer(ITest2)
class Test2(Base):
    __tablename__ = "test2"
    id = sqlalchemy.Column(sqlalchemy.Integer, nullable=False, primary_key=True, autoincrement=True)
    name = sqlalchemy.Column(sqlalchemy.String, nullable=True, unique=False)


@interface.implementer(ITest3)
class Test3(Base):
    """Links Test1 and Test2. As in 1.x, ``test1_id`` is a String column."""

    __tablename__ = "test3"
    __table_args__ = (sqlalchemy.PrimaryKeyConstraint("test2_id", "test1_id", name="test3_pk"),)
    test1_id = sqlalchemy.Column(
        sqlalchemy.String, sqlalchemy.ForeignKey("test1.id"), nullable=False
    )
    test2_id = sqlalchemy.Column(
        sqlalchemy.Integer, sqlalchemy.ForeignKey("test2.id"), nullable=False
    )


@interface.implementer(ITest4)
class Test4(Base):
    __tablename__ = "test4"
    __table_args__ = (sqlalchemy.UniqueConstraint("name", "test2_id", name="test4_name_un"),)
    id = sqlalchemy.Column(sqlalchemy.Integer, nullable=False, primary_key=True, autoincrement=True)
    name = sqlalchemy.Column(sqlalchemy.String, nullable=False)
    test2_id = sqlalchemy.Column(
        sqlalchemy.Integer, sqlalchemy.ForeignKey("test2.id"), nullable=False
    )


def _foreign_keys_on(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("pragma foreign_keys=ON")
    cursor.close()


def get_transaction() -> ScopedTransaction:
    """A new manager over a new in-memory SQLite database with Test1-Test4's tables.

    One connection serves every thread (StaticPool), with foreign keys enforced.
    """
    engine = SAEngineFromConfigFactory(
        {
            "dsn": "sqlite:///:memory:",
            "kwargs": {"connect_args": {"check_same_thread": False}, "poolclass": StaticPool},
        }
    )
    event.listen(engine, "connect", _foreign_keys_on)
    transaction = ScopedTransaction(engine, Base)
    Base.metadata.create_all(bind=engine)
    return transaction


def create_model(transaction: Any, class_: type[Any], **attributes: Any) -> Any:
    """Add a ``class_`` with these attributes to the current session, and flush it."""
    session = transaction.session
    model = class_()
    for name, value in attributes.items():
        setattr(model, name, value)
    session.add(model)
    session.flush()
    return model


def populate_tables(transaction: Any) -> None:
    """Three Test1 and three Test2 rows, three Test3 links and two Test4 rows, flushed."""
    for i in (1, 2, 3):
        create_model(transaction, Test1, name=f"test1_{i}")
    for i in (1, 2, 3):
        create_model(transaction, Test2, name=f"test2_{i}")
    for test1_id, test2_id in ((1, 1), (1, 2), (2, 2)):
        create_model(transaction, Test3, test1_id=test1_id, test2_id=test2_id)
    create_model(transaction, Test4, name="test4_1", test2_id=1)
    create_model(transaction, Test4, name="test4_2", test2_id=3)


#: 1.x's sparc.sa.orm.query.testing.related_models
related_models = ORMRelatedModelsAdderFactory([Test3, Test2, Test4, Test1])
