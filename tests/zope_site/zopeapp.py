"""A Zope application for tests/test_zope.py: models and browser views.

The views do what a site's views do: write rows in `with tx():` blocks. Some
also take part in the request's transaction the way ZODB does, to fail its
vote on demand.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import sqlalchemy as sa
import transaction
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from ZODB.POSException import ConflictError
from zope.component import getUtility

from sparc.sa.interfaces import ISAScopedTransaction

TOKEN = "placeholder"  # replaced by the driver before the ZCML is loaded


class Base(DeclarativeBase):
    pass


def define_models(token: str, deferred_unique: bool = False) -> None:
    """The tables, named uniquely; *deferred_unique* adds a table with a
    deferred unique constraint (PostgreSQL only)."""
    global Row, Counter, Unique

    class Row(Base):  # type: ignore[no-redef]
        __tablename__ = f"zope_row_{token}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(40))

    class Counter(Base):  # type: ignore[no-redef]
        __tablename__ = f"zope_counter_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        value: Mapped[int] = mapped_column(default=0)

    if not deferred_unique:
        return

    class Unique(Base):  # type: ignore[no-redef]
        """A deferred unique constraint: PostgreSQL checks it at PREPARE."""

        __tablename__ = f"zope_unique_{token}"
        id: Mapped[int] = mapped_column(primary_key=True)
        code: Mapped[int] = mapped_column()

    Unique.__table__.append_constraint(
        sa.UniqueConstraint("code", deferrable=True, initially="DEFERRED")
    )


# attempts per request key, to fail the first N of them
attempts: dict[str, int] = {}
attempts_lock = threading.Lock()
increments = itertools.count()


def attempt(key: str) -> int:
    with attempts_lock:
        attempts[key] = attempts.get(key, 0) + 1
        return attempts[key]


class VoteFails:
    """Takes part in the transaction as ZODB does (it sorts first) and fails
    its vote with a ConflictError, as a real ZODB conflict does at commit."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.transaction_manager = transaction.manager

    def sortKey(self) -> str:
        return "/var/zodb/Data.fs"

    def abort(self, txn: Any) -> None:
        pass

    def tpc_begin(self, txn: Any) -> None:
        pass

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        raise self.error

    def tpc_finish(self, txn: Any) -> None:
        pass

    def tpc_abort(self, txn: Any) -> None:
        pass


class View:
    def __init__(self, context: Any, request: Any) -> None:
        self.context, self.request = context, request

    @property
    def tx(self) -> Any:
        return getUtility(ISAScopedTransaction)


class Write(View):
    """?name=...  [&fail=1: raise after the block]  [&conflicts=N: a
    ConflictError at commit on the first N attempts]  [&zodb=1: also write
    to ZODB]  [&code=N: a row with a deferred unique code]"""

    def __call__(self) -> str:
        form = self.request.form
        key = form.get("key", "")
        number = attempt(key)
        tx = self.tx
        with tx():
            tx.session.add(Row(name=form.get("name", "row")))
            if "code" in form:
                tx.session.add(Unique(code=int(form["code"])))
        if form.get("zodb"):
            self.context._sparc_sa_zodb_write = form.get("name", "row")
        if number <= int(form.get("conflicts", 0)):
            transaction.get().join(VoteFails(ConflictError("simulated ZODB conflict")))
        if form.get("zodb_vote_fails"):
            transaction.get().join(VoteFails(ValueError("ZODB's vote failed")))
        if form.get("fail"):
            raise ValueError("the view failed after its block")
        return "ok"


class WriteOutside(View):
    """?name=...: a write through ``tx.session`` outside any block, as
    zope.sqlalchemy's registered session is used  [&fail=1: then raise]
    [&doom=1: then doom the request's transaction]"""

    def __call__(self) -> str:
        form = self.request.form
        self.tx.session.add(Row(name=form.get("name", "outside")))
        if form.get("flush"):
            self.tx.session.flush()
        if form.get("doom"):
            transaction.get().doom()
        if form.get("fail"):
            raise ValueError("the view failed after its write")
        return "ok"


class Increment(View):
    """A read-modify-write of one counter (SERIALIZABLE on the server)."""

    def __call__(self) -> str:
        attempt("increment")
        tx = self.tx
        with tx():
            counter = tx.session.get(Counter, 1)
            counter.value = counter.value + 1
        return "ok"


class ServerPid(View):
    """The server's id for this request's connection."""

    def __call__(self) -> str:
        tx = self.tx
        with tx():
            connection = tx.session.connection()
            if connection.dialect.name == "postgresql":
                return str(connection.exec_driver_sql("SELECT pg_backend_pid()").scalar())
            return str(connection.exec_driver_sql("SELECT CONNECTION_ID()").scalar())


class ZodbValue(View):
    def __call__(self) -> str:
        return str(getattr(self.context, "_sparc_sa_zodb_write", None))
