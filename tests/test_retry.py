"""transaction.run(): retry serialization failures and deadlocks, and nothing else."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sparc.sa.orm import is_retryable, scoped_transaction

from .conftest import (
    SERVERS,
    backend_dsn,
    build_models,
    count_rows,
    make_engine,
    names,
)


class FakeDriverError(Exception):
    def __init__(self, *args: Any, sqlstate: str | None = None, pgcode: str | None = None) -> None:
        super().__init__(*args)
        self.sqlstate = sqlstate
        self.pgcode = pgcode


def db_error(
    *args: Any, cls: type[sa.exc.DBAPIError] = sa.exc.OperationalError, **codes: Any
) -> sa.exc.DBAPIError:
    return cls("UPDATE counter ...", {}, FakeDriverError(*args, **codes))


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (db_error("could not serialize access", sqlstate="40001"), True),
        (db_error("deadlock detected", sqlstate="40P01"), True),
        (db_error("could not serialize access", pgcode="40001"), True),  # psycopg2
        (db_error(1213, "Deadlock found when trying to get lock"), True),
        (db_error(1205, "Lock wait timeout exceeded"), True),
        (db_error(1020, "Record has changed since last read"), True),
        (db_error(1062, "Duplicate entry"), False),
        (db_error("duplicate key", sqlstate="23505", cls=sa.exc.IntegrityError), False),
        (db_error("server closed the connection", sqlstate="08006"), False),
        (db_error("database is locked"), False),  # not from sqlite3: no code to go by
        (ValueError("not a database error"), False),
    ],
)
def test_is_retryable(error: BaseException, retryable: bool) -> None:
    assert is_retryable(error) is retryable


def test_invalidated_connection_is_not_retried() -> None:
    error = db_error("deadlock", sqlstate="40P01")
    error.connection_invalidated = True
    assert not is_retryable(error)


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    delays: list[float] = []
    monkeypatch.setattr(time, "sleep", delays.append)
    return delays


def test_run_returns_the_result_and_passes_arguments(
    engine: Engine, models: Any, transaction: Any
) -> None:
    def add(session: Any, name: str, *, suffix: str) -> int:
        item = models.Item(name=name + suffix)
        session.add(item)
        session.flush()
        return item.id

    new_id = transaction.run(add, "row", suffix="-1")
    assert isinstance(new_id, int)
    assert names(engine, models.Item) == ["row-1"]


def test_retryable_failure_reruns_the_whole_block_in_a_fresh_transaction(
    engine: Engine, models: Any, transaction: Any, no_sleep: list[float]
) -> None:
    calls: list[Any] = []

    def work(session: Any) -> str:
        calls.append(session)
        session.add(models.Item(name=f"attempt-{len(calls)}"))
        session.flush()
        if len(calls) < 3:
            raise db_error("could not serialize access", sqlstate="40001")
        return "done"

    assert transaction.run(work, attempts=3) == "done"
    assert len(calls) == 3 and len(no_sleep) == 2
    assert names(engine, models.Item) == ["attempt-3"]  # failed attempts left nothing


def test_gives_up_after_attempts_and_reraises_the_last_error(
    engine: Engine, models: Any, transaction: Any, no_sleep: list[float]
) -> None:
    errors = [db_error("deadlock", sqlstate="40P01") for _ in range(4)]
    calls = iter(errors)

    def work(session: Any) -> None:
        session.add(models.Item(name="x"))
        raise next(calls)

    with pytest.raises(sa.exc.OperationalError) as raised:
        transaction.run(work, attempts=4)
    assert raised.value is errors[3]
    assert len(no_sleep) == 3
    assert count_rows(engine, models.Item) == 0


@pytest.mark.parametrize(
    "error",
    [
        ValueError("application error"),
        db_error("duplicate", sqlstate="23505", cls=sa.exc.IntegrityError),
        db_error("server closed the connection", sqlstate="08006"),
    ],
)
def test_other_errors_are_not_retried(
    models: Any, transaction: Any, no_sleep: list[float], error: BaseException
) -> None:
    calls = []

    def work(session: Any) -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)) as raised:
        transaction.run(work, attempts=5)
    assert raised.value is error and calls == [1] and no_sleep == []


def test_backoff_is_exponential_with_jitter(
    models: Any, transaction: Any, no_sleep: list[float]
) -> None:
    transaction.retry_delay = 0.1
    transaction.retry_max_delay = 0.5

    def work(session: Any) -> None:
        raise db_error(1213, "Deadlock")

    with pytest.raises(sa.exc.OperationalError):
        transaction.run(work, attempts=6)
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert len(no_sleep) == 5
    for delay, cap in zip(no_sleep, caps, strict=True):
        assert cap / 2 <= delay <= cap


@pytest.mark.parametrize("attempts", [0, -1, 1.5, "3", True])
def test_attempts_must_be_a_positive_integer(transaction: Any, attempts: Any) -> None:
    with pytest.raises(ValueError, match="'attempts'"):
        transaction.run(lambda session: None, attempts=attempts)


def test_inside_an_open_block_run_is_a_savepoint_without_retries(
    engine: Engine, models: Any, transaction: Any, no_sleep: list[float]
) -> None:
    calls = []

    def failing(session: Any) -> None:
        calls.append(1)
        session.add(models.Item(name="inner"))
        session.flush()
        raise db_error("could not serialize access", sqlstate="40001")

    with transaction():
        transaction.session.add(models.Item(name="outer"))
        with pytest.raises(sa.exc.OperationalError):
            transaction.run(failing, attempts=5)
        assert calls == [1] and no_sleep == []
        # and a successful inner run() returns its result in the outer session
        assert transaction.run(lambda session: session is transaction.session) is True
    assert names(engine, models.Item) == ["outer"]


# -- real contention on real servers ---------------------------------------------


@pytest.fixture(params=("sqlite-file", *SERVERS))
def serializable(
    request: pytest.FixtureRequest, tmp_path: Any
) -> Iterator[tuple[Engine, Any, Any]]:
    # SQLite serialises writers itself: its conflicts are "database is locked"
    # (SQLITE_BUSY), which run() retries like a serialization failure.
    engine = make_engine(
        backend_dsn(request.param, tmp_path),
        isolation_level="SERIALIZABLE",
        pool_size=8,
        max_overflow=0,
    )
    ns = build_models()
    ns.Base.metadata.create_all(engine)
    transaction = scoped_transaction(engine, ns.Base)
    transaction.retry_delay = 0.005
    transaction.retry_max_delay = 0.2
    yield engine, ns, transaction
    ns.Base.metadata.drop_all(engine)
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_concurrent_increments_at_serializable_lose_no_update(
    serializable: tuple[Engine, Any, Any],
) -> None:
    """8 threads x 10 read-modify-write increments of one counter."""
    engine, ns, transaction = serializable
    with transaction():
        transaction.session.add(ns.Counter(id=1, value=0))
    tries = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def increment(session: Any) -> None:
        tries.append(1)
        counter = session.get(ns.Counter, 1)
        time.sleep(0.001)  # widen the race window
        counter.value = counter.value + 1

    def worker() -> None:
        start.wait()
        try:
            for _ in range(10):
                transaction.run(increment, attempts=100)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    with engine.connect() as conn:
        assert conn.execute(sa.select(ns.Counter.value)).scalar_one() == 80
    assert len(tries) > 80, "no transaction was ever retried: the test proved nothing"
    print(f"{engine.dialect.name}: 80 increments took {len(tries)} attempts")


def test_a_real_deadlock_is_retried(serializable: tuple[Engine, Any, Any]) -> None:
    """Two threads lock two rows in opposite orders; the server kills one."""
    engine, ns, transaction = serializable
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite locks the whole database, not rows: writers queue, none deadlock")
    with transaction():
        transaction.session.add_all([ns.Counter(id=1), ns.Counter(id=2)])
    both_locked_first = threading.Barrier(2)
    attempts: list[int] = []
    errors: list[BaseException] = []

    def swap(session: Any, first: int, second: int) -> None:
        attempts.append(first)
        session.execute(
            sa.update(ns.Counter).where(ns.Counter.id == first).values(value=ns.Counter.value + 1)
        )
        if len(attempts) <= 2:
            with contextlib.suppress(threading.BrokenBarrierError):
                both_locked_first.wait(timeout=5)
        session.execute(
            sa.update(ns.Counter).where(ns.Counter.id == second).values(value=ns.Counter.value + 1)
        )

    def worker(first: int, second: int) -> None:
        try:
            transaction.run(swap, first, second, attempts=10)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=p) for p in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert len(attempts) >= 3, "no deadlock happened"
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(ns.Counter.value)).scalars()) == [2, 2]
