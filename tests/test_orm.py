"""The ISAScopedTransaction adapter: lookup, blocks, sessions, on every backend."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session
from zope import component
from zope.interface.verify import verifyObject

from sparc.sa.interfaces import ISAScopedSession, ISAScopedTransaction, ISASession
from sparc.sa.orm import ThreadLocalSASessionTransaction, scoped_transaction

from .conftest import STYLES, build_models, checked_out, make_engine, names


class Boom(Exception):
    pass


def test_manager_provides_its_interface(transaction: ThreadLocalSASessionTransaction) -> None:
    assert verifyObject(ISAScopedTransaction, transaction)


@pytest.mark.usefixtures("zcml")
def test_every_lookup_returns_the_same_manager(engine: Engine, models: Any) -> None:
    first = component.getMultiAdapter((engine, models.Base), ISAScopedTransaction)
    second = component.getMultiAdapter((engine, models.Base), ISAScopedTransaction)
    assert first is second
    assert isinstance(first, ThreadLocalSASessionTransaction)
    assert first.engine is engine and first.Base is models.Base

    other = build_models()
    third = component.getMultiAdapter((engine, other.Base), ISAScopedTransaction)
    assert third is not first and third.Base is other.Base


@pytest.mark.usefixtures("zcml")
def test_lookups_from_many_threads_agree(engine: Engine, models: Any) -> None:
    seen: list[Any] = []
    start = threading.Barrier(8)

    def look() -> None:
        start.wait()
        seen.append(component.getMultiAdapter((engine, models.Base), ISAScopedTransaction))

    threads = [threading.Thread(target=look) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and all(m is seen[0] for m in seen)


@pytest.mark.usefixtures("zcml")
def test_engines_and_bases_are_held_weakly() -> None:
    engine = make_engine("sqlite://")
    ns = build_models()
    manager = component.getMultiAdapter((engine, ns.Base), ISAScopedTransaction)
    engine_ref, base_ref, manager_ref = (
        weakref.ref(engine),
        weakref.ref(ns.Base),
        weakref.ref(manager),
    )
    engine.dispose()
    ns.Base.registry.dispose()
    del manager, ns
    gc.collect()
    assert base_ref() is None, "the registry kept the declarative base alive"
    del engine
    gc.collect()
    assert engine_ref() is None, "the registry kept the engine alive"
    assert manager_ref() is None


def test_block_yields_the_scoped_session(engine: Engine, models: Any, transaction: Any) -> None:
    with transaction() as Session_:
        assert isinstance(Session_, scoped_session)
        assert ISAScopedSession.providedBy(Session_)
        assert Session_() is transaction.session
        assert ISASession.providedBy(Session_())
        Session_.add(models.Item(name="via-scoped"))
    assert names(engine, models.Item) == ["via-scoped"]


def test_session_is_reset_and_connection_returned_after_every_block(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with transaction():
        item = models.Item(name="a")
        transaction.session.add(item)
    session = transaction.session
    assert item not in session and not session.in_transaction()
    assert checked_out(engine) == 0
    with pytest.raises(Boom), transaction():
        transaction.session.add(models.Item(name="b"))
        transaction.session.flush()
        raise Boom
    assert len(list(transaction.session)) == 0 and not transaction.session.in_transaction()
    assert checked_out(engine) == 0


def test_objects_stay_readable_after_their_block(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with transaction():
        item = models.Item(name="readable")
        transaction.session.add(item)
    state = sa.inspect(item)
    assert state.detached  # the session was reset...
    assert item.name == "readable" and isinstance(item.id, int)  # ...and item still reads


def test_expire_on_commit_can_be_asked_for(engine: Engine, models: Any) -> None:
    manager = ThreadLocalSASessionTransaction(engine, models.Base, expire_on_commit=True)
    with manager():
        item = models.Item(name="expired")
        manager.session.add(item)
    with pytest.raises(sa.orm.exc.DetachedInstanceError):
        item.name  # noqa: B018


def test_session_outside_a_block_is_the_thread_session(
    engine: Engine, models: Any, transaction: Any
) -> None:
    main_session = transaction.session
    assert isinstance(main_session, Session)
    assert transaction.session is main_session
    other: list[Session] = []
    t = threading.Thread(target=lambda: other.append(transaction.session))
    t.start()
    t.join()
    assert other[0] is not main_session
    # outside-block work is picked up and committed by the next block (1.x)
    transaction.session.add(models.Item(name="added-before"))
    with transaction():
        pass
    assert names(engine, models.Item) == ["added-before"]


def test_scoped_session_api_works_on_the_current_scope(
    engine: Engine, models: Any, transaction: Any
) -> None:
    Session_ = transaction.scoped_session
    first = transaction.session
    assert Session_.registry.has()
    first.scalars(sa.select(models.Item)).all()  # holds a connection now
    Session_.remove()  # closes and forgets this scope's session
    assert checked_out(engine) == 0
    assert transaction.session is not first
    with pytest.raises(sa.exc.InvalidRequestError):
        Session_(autoflush=False)  # a session exists already: SQLAlchemy's rule
    Session_.remove()
    custom = Session_(autoflush=False)  # scoped_session(**kw) sets the scope's session
    assert transaction.session is custom and custom.autoflush is False
    with transaction():
        assert transaction.session is custom
        transaction.session.add(models.Item(name="custom"))
    assert names(engine, models.Item) == ["custom"]


def test_block_session_is_the_session_attribute(models: Any, transaction: Any) -> None:
    with transaction():
        assert transaction.session is transaction.scoped_session()


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_declarative_style(engine: Engine, style: str) -> None:
    ns = build_models(style)
    ns.Base.metadata.create_all(engine)
    try:
        component.provideAdapter(scoped_transaction)
        transaction = component.getMultiAdapter((engine, ns.Base), ISAScopedTransaction)
        with transaction():
            transaction.session.add(ns.Item(name=style))
        with pytest.raises(Boom), transaction():
            transaction.session.add(ns.Item(name="rolled back"))
            raise Boom
        assert names(engine, ns.Item) == [style]
        assert transaction.session.scalars(sa.select(ns.Item.name)).all() == [style]
    finally:
        transaction.session.close()
        ns.Base.metadata.drop_all(engine)


def test_repr_hides_the_password() -> None:
    engine = sa.create_engine("postgresql+psycopg://app:s3cr3t@db.invalid/app")
    ns = build_models()
    manager = ThreadLocalSASessionTransaction(engine, ns.Base)
    assert "s3cr3t" not in repr(manager)
    assert "***" in repr(manager)
