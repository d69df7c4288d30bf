"""os.fork(): the child never uses, resets or closes what the parent holds."""

from __future__ import annotations

import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sparc.sa.exceptions import ForkedTransactionError

from .conftest import SERVERS, backend_dsn, build_models, names

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX-only"),
    # Python 3.12+ warns about fork() in a multi-threaded process; our tests
    # fork with no other thread alive, but pytest plugins may own one.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


def in_child(fn: Callable[[], Any], timeout: float = 60) -> Any:
    """Run *fn* in a forked child; return its JSON result or raise its error.
    A child that does not answer within *timeout* seconds is killed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            payload = {"ok": True, "result": fn()}
        except BaseException as exc:
            payload = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        os.write(write, json.dumps(payload).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the child did not finish within {timeout}s")
            chunk = os.read(read, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    payload = json.loads(b"".join(chunks))
    if not payload["ok"]:
        raise AssertionError(f"in the child: {payload['error']}")
    return payload["result"]


def connection_id(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return session.execute(sa.text("select pg_backend_pid()")).scalar()
    if dialect == "mysql":
        return session.execute(sa.text("select connection_id()")).scalar()
    return id(session.connection().connection.dbapi_connection)


def test_fork_inside_an_open_block(engine: Engine, models: Any, transaction: Any) -> None:
    memory = engine.url.database in (None, "", ":memory:")
    sqlite = engine.dialect.name == "sqlite"
    with transaction():
        transaction.session.add(models.Item(name="parent-before"))
        transaction.session.flush()
        parent_session = transaction.session
        parent_connection = connection_id(parent_session)
        parent_pool = id(engine.pool)

        def child() -> dict[str, Any]:
            session = transaction.session
            result = {
                "fresh_session": session is not parent_session,
                "fresh_pool": id(engine.pool) != parent_pool,
                "connection": connection_id(session),
            }
            if not memory:  # an in-memory database is not shared with the child
                with transaction():
                    # SQLite has one writer, the parent: the child only reads
                    if not sqlite:
                        transaction.session.add(models.Item(name="child"))
                    result["rows_seen"] = sorted(
                        transaction.session.scalars(sa.select(models.Item.name))
                    )
            session.close()
            return result

        seen = in_child(child)
        # the parent's block carries on over its untouched connection
        assert connection_id(transaction.session) == parent_connection
        transaction.session.add(models.Item(name="parent-after"))

    assert seen["fresh_session"] and seen["fresh_pool"]
    assert seen["connection"] != parent_connection
    if not memory:
        # the child cannot see the parent's uncommitted row
        assert "parent-before" not in seen["rows_seen"]
    expected = ["parent-after", "parent-before"]
    if not memory and not sqlite:
        expected = ["child", *expected]
    assert names(engine, models.Item) == expected


def test_child_cannot_finish_a_block_the_parent_opened(
    engine: Engine, models: Any, transaction: Any
) -> None:
    block = transaction()
    block.__enter__()
    transaction.session.add(models.Item(name="parents"))
    transaction.session.flush()

    def child() -> str:
        try:
            block.__exit__(None, None, None)
        except ForkedTransactionError as exc:
            return str(exc)
        return "no error"

    message = in_child(child)
    assert "before os.fork()" in message
    block.__exit__(None, None, None)  # the parent's own exit commits
    assert names(engine, models.Item) == ["parents"]


def test_child_error_in_an_inherited_block_propagates_untouched(
    engine: Engine, models: Any, transaction: Any
) -> None:
    block = transaction()
    block.__enter__()

    def child() -> str:
        try:
            with pytest.raises(KeyError):
                block.__exit__(KeyError, KeyError("k"), None)
                raise KeyError("k")  # __exit__ returned without suppressing
        except BaseException as exc:  # pragma: no cover
            return repr(exc)
        return "propagated"

    assert in_child(child) == "propagated"
    transaction.session.add(models.Item(name="p"))
    block.__exit__(None, None, None)
    assert names(engine, models.Item) == ["p"]


SCRIPT = textwrap.dedent(
    """
    import os, sys, uuid
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
    from sparc.sa.engine import engine_from_config
    from sparc.sa.orm import scoped_transaction

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "sparc_fork_" + uuid.uuid4().hex[:10]
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(40))

    engine = engine_from_config({"dsn": sys.argv[1], "kwargs": {"pool_size": 2}})
    Base.metadata.create_all(engine)
    transaction = scoped_transaction(engine, Base)
    parent = os.getpid()
    try:
        with engine.connect() as conn:  # leaves an idle connection in the pool
            conn.exec_driver_sql("select 1")
        with transaction():
            transaction.session.add(Item(name="before-fork"))
            transaction.session.flush()
            pid = os.fork()
            if pid == 0:
                with transaction():
                    transaction.session.execute(sa.select(sa.literal(1)))
                # Leave the way gunicorn workers do: a normal interpreter
                # shutdown, running every finaliser still pending. SystemExit
                # passes through the inherited block untouched.
                sys.exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
            transaction.session.add(Item(name="after-fork"))
        with engine.connect() as conn:
            rows = sorted(conn.execute(sa.select(Item.name)).scalars())
        assert rows == ["after-fork", "before-fork"], rows
        print("OK", rows)
    finally:
        if os.getpid() == parent:  # the child's SystemExit passes through here too
            transaction.session.close()
            Base.metadata.drop_all(engine)
            engine.dispose()
    """
)


@pytest.mark.parametrize("backend", ["sqlite-file", *SERVERS])
def test_child_exiting_normally_leaves_the_parents_connections_alone(
    backend: str, tmp_path: pathlib.Path
) -> None:
    dsn = backend_dsn(backend, tmp_path)
    script = tmp_path / "fork_script.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(script), dsn],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "Exception ignored" not in result.stderr, result.stderr


def test_locks_held_by_another_thread_at_fork_do_not_block_the_child(
    engine: Engine, models: Any
) -> None:
    """A thread inside the manager cache's lock at fork time does not exist
    in the child; the child must not wait for it. (Gates are made without a
    lock, see sparc.sa.tx.gate.gate_for.)"""
    import threading

    from sparc.sa.orm import scoped_transaction
    from sparc.sa.tx import cache

    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache._lock:
            holding.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    try:

        def child() -> str:
            other = build_models()  # a Base never looked up: needs the cache lock
            manager = scoped_transaction(engine, other.Base)
            with manager():
                pass
            return "done"

        assert in_child(child, timeout=10) == "done"
    finally:
        release.set()
        holder.join()
