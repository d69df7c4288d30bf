"""Read-only blocks on every backend: ``tx(readonly=True)`` without replicas
runs on the primary in a READ ONLY transaction; writes fail with one error;
nesting rules. What both managers do alike is in tests/test_behaviour.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sparc.sa.exceptions import ReadOnlyTransactionError
from sparc.sa.orm import ThreadLocalSASessionTransaction
from tests.conftest import names


def test_readonly_blocks_give_back_the_session_they_set_aside_as_it_was(
    engine: Engine, models: SimpleNamespace, transaction: ThreadLocalSASessionTransaction
) -> None:
    """Each read-only block sets the thread's session aside and gives it back
    untouched: the objects loaded in it outside blocks stay there, however
    many read-only blocks run (the watch that closes it if the thread ends
    inside such a block closed it at every block from the second on)."""
    with transaction() as Session:
        Session.add(models.Item(name="a"))
    session = transaction.session  # used outside any block
    item = session.scalars(sa.select(models.Item)).one()
    session.commit()
    for _ in range(3):
        with transaction(readonly=True) as Session:
            assert Session() is not session
            assert Session.scalars(sa.select(models.Item.name)).all() == ["a"]
        assert transaction.session is session and item in session


def test_readonly_blocks_never_join_until_a_joined_write(
    engine: Engine, models: SimpleNamespace, transaction: ThreadLocalSASessionTransaction
) -> None:
    """In a request (a `transaction` transaction): a read-only block ends by
    itself and joins nothing; after a joined write it runs in the request's
    transaction and sees the uncommitted write."""
    txn_pkg = pytest.importorskip("transaction")
    with transaction() as Session:
        Session.add(models.Item(name="before"))
    txn_pkg.manager.explicit = True  # as pyramid_tm and Zope run requests
    txn = txn_pkg.manager.begin()
    try:
        with transaction(readonly=True) as Session:
            assert Session.scalars(sa.select(models.Item.name)).all() == ["before"]
        assert txn._resources == []  # not joined: nothing to commit or vote
        with transaction() as Session:  # a joined write, not yet committed
            Session.add(models.Item(name="joined"))
        assert len(txn._resources) == 1
        with transaction(readonly=True) as Session:
            assert sorted(Session.scalars(sa.select(models.Item.name))) == ["before", "joined"]
            with pytest.raises(ReadOnlyTransactionError):
                Session.execute(sa.delete(models.Item))
        assert len(txn._resources) == 1  # the same data manager, no other
        txn_pkg.manager.commit()
    except BaseException:
        txn_pkg.manager.abort()
        raise
    finally:
        txn_pkg.manager.explicit = False
    assert names(engine, models.Item) == ["before", "joined"]
