"""asyncio benchmark: ``async with tx()`` against plain ``async_sessionmaker.begin()``.

    pip install -e '.[bench]'
    TEST_PG_DSN=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        python bench/async_run.py [--rounds 30] [--batch 200]

The contenders run in one event loop: ``plain`` is
``async_sessionmaker(expire_on_commit=False).begin()`` on an AsyncEngine of
its own from ``create_async_engine()``, with the options sparc.sa's factory
would give it (the same pool class, ``pool_pre_ping=True`` on a server);
``sparc.sa`` is ``async with tx()`` on the factory's engine; ``plain@sparc``
is plain on the factory's engine, the engine's own cost. Each round times a
batch of one-row transactions of each contender, in a shuffled order, and
the ratio is taken within the round: the reported figure is the median over
rounds of contender / plain, with a 95% confidence interval from the order
statistics. Two workloads: ``insert`` (add one row) and
``get`` (read one row by primary key). The statements each contender sends
per transaction are counted from the engine's events and printed beside the
times (on SQLite, as SQLite's own trace callback saw them, the driver's
implicit BEGIN included). ``ping`` is SQLAlchemy's liveness check on
checkout: on asyncpg, since SQLAlchemy 2.0.21, a BEGIN, a ``;`` and a
ROLLBACK, three round trips. ``ping=BEGIN`` marks sparc.sa's check of a
block's checkout, which is the transaction's own BEGIN (sparc.sa.tx.liveness).
Backends: aiosqlite on a file, and asyncpg when TEST_PG_DSN is set.
Nothing is asserted: this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.util import await_only

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import counting_pings, sent  # noqa: E402

DEFAULT_JSON = HERE / "results" / "async-latest.json"

Txn = Callable[[], Awaitable[Any]]


def build(engine: AsyncEngine, own: AsyncEngine) -> tuple[Any, Any, dict[str, dict[str, Txn]]]:
    from sparc.sa.aio import async_scoped_transaction

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = f"sparc_abench_{uuid.uuid4().hex[:10]}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(40))

    plain = async_sessionmaker(own, expire_on_commit=False)
    on_ours = async_sessionmaker(engine, expire_on_commit=False)
    tx = async_scoped_transaction(engine, Base)
    rng = random.Random(7)

    async def plain_insert() -> None:
        async with plain.begin() as session:
            session.add(Item(name="x"))

    async def sparc_insert() -> None:
        async with tx() as session:
            session.add(Item(name="x"))

    async def plain_get() -> None:
        async with plain.begin() as session:
            await session.get(Item, rng.randint(1, 100))

    async def sparc_get() -> None:
        async with tx() as session:
            await session.get(Item, rng.randint(1, 100))

    async def ours_insert() -> None:
        async with on_ours.begin() as session:
            session.add(Item(name="x"))

    async def ours_get() -> None:
        async with on_ours.begin() as session:
            await session.get(Item, rng.randint(1, 100))

    contenders = {
        "plain": {"insert": plain_insert, "get": plain_get},
        "sparc.sa": {"insert": sparc_insert, "get": sparc_get},
        "plain@sparc": {"insert": ours_insert, "get": ours_get},
    }
    return Base, Item, contenders


# What SQLite itself executed, from its trace callback: this includes the
# BEGIN the driver sends on its own before DML, and any a contender sends
# straight through the cursor, neither of which SQLAlchemy's events show.
SQLITE_TRACE: Counter[str] = Counter()


def trace_sqlite(engine: AsyncEngine) -> None:
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        driver = dbapi_connection.driver_connection  # aiosqlite.Connection
        callback = lambda sql: SQLITE_TRACE.update([sql.split(None, 1)[0].upper()])  # noqa: E731
        await_only(driver.set_trace_callback(callback))

    sa.event.listen(engine.sync_engine, "connect", on_connect)


async def count_statements(engine: AsyncEngine, txn: Txn, n: int = 20) -> dict[str, float]:
    counts: Counter[str] = Counter()

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counts[statement.split(None, 1)[0].upper()] += 1

    def on_commit(conn: Any) -> None:
        counts["COMMIT"] += 1

    def on_rollback(conn: Any) -> None:
        counts["ROLLBACK"] += 1

    def on_begin(conn: Any) -> None:
        counts["BEGIN"] += 1  # asyncpg and psycopg send one for each transaction

    sync = engine.sync_engine
    is_sqlite = sync.dialect.name == "sqlite"
    listeners = [("before_cursor_execute", on_execute), ("commit", on_commit)]
    listeners += [("rollback", on_rollback), ("begin", on_begin)]
    if not is_sqlite:
        for name, fn in listeners:
            sa.event.listen(sync, name, fn)
    await txn()  # the first on a new connection may differ
    await asyncio.sleep(0.05)
    SQLITE_TRACE.clear()
    counts.clear()
    try:
        with counting_pings(sync, counts):
            for _ in range(n):
                await txn()
        await asyncio.sleep(0.05)  # the trace callback runs in aiosqlite's thread
    finally:
        if not is_sqlite:
            for name, fn in listeners:
                sa.event.remove(sync, name, fn)
    found = Counter(SQLITE_TRACE) if is_sqlite else counts
    if is_sqlite:
        found["ping"] = counts["ping"]
    return {k: v / n for k, v in found.items() if v}


def median_interval(ordered: list[float]) -> tuple[float, float]:
    """A 95% confidence interval of the median from the order statistics."""
    n = len(ordered)
    half_width = 1.96 * (n**0.5) / 2
    lo = max(0, int(n / 2 - half_width))
    hi = min(n - 1, int(n / 2 + half_width + 1) - 1)
    return ordered[lo], ordered[hi]


async def measure(
    engines: dict[str, AsyncEngine],
    contenders: dict[str, dict[str, Txn]],
    kind: str,
    rounds: int,
    batch: int,
) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for txns in contenders.values():  # warm up
        for _ in range(max(20, batch // 5)):
            await txns[kind]()
    order = list(contenders)
    shuffle = random.Random(42).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            txn = contenders[name][kind]
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(batch):
                await txn()
            times[name].append((time.perf_counter() - start) / batch * 1e6)
            cpu[name].append((time.process_time() - start_cpu) / batch * 1e6)

    def paired(samples: dict[str, list[float]]) -> dict[str, list[float]]:
        return {
            name: sorted(s / p for s, p in zip(v, samples["plain"], strict=True))
            for name, v in samples.items()
        }

    wall, own_cpu = paired(times), paired(cpu)
    return {
        "per_txn_us": {name: statistics.median(v) for name, v in times.items()},
        "ratio": {name: statistics.median(v) for name, v in wall.items()},
        "ratio_95ci": {name: median_interval(v) for name, v in wall.items()},
        # This process's CPU time (aiosqlite's worker thread included):
        # what neighbours on a shared machine inflate far less than wall time.
        "cpu_ratio": {name: statistics.median(v) for name, v in own_cpu.items()},
        "cpu_ratio_95ci": {name: median_interval(v) for name, v in own_cpu.items()},
        "statements": {
            name: await count_statements(engines[name], txns[kind])
            for name, txns in contenders.items()
        },
        "samples_us": times,
        "cpu_samples_us": cpu,
    }


async def run_backend(dsn: str, rounds: int, batch: int) -> dict[str, Any]:
    from sqlalchemy.ext.asyncio import create_async_engine

    from sparc.sa import options
    from sparc.sa.engine import engine_from_config

    engine = engine_from_config({"dsn": dsn})
    assert isinstance(engine, AsyncEngine)
    url, kwargs = options.normalize({"dsn": dsn})
    own = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        trace_sqlite(engine)
        trace_sqlite(own)
    Base, Item, contenders = build(engine, own)
    engines = {"plain": own, "sparc.sa": engine, "plain@sparc": engine}
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.insert(Item), [{"name": "seed"} for _ in range(100)])
        return {
            kind: await measure(engines, contenders, kind, rounds, batch)
            for kind in ("insert", "get")
        }
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await engine.dispose()
        await own.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--json", type=pathlib.Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    backends: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        backends["aiosqlite (file)"] = f"sqlite+aiosqlite:///{tmp}/bench.db"
        pg = os.environ.get("TEST_PG_DSN")
        if pg:
            url = sa.make_url(pg).set(drivername="postgresql+asyncpg")
            backends["asyncpg"] = url.render_as_string(hide_password=False)
        else:
            print("TEST_PG_DSN is not set: asyncpg is skipped", file=sys.stderr)
        results = {
            name: asyncio.run(run_backend(dsn, args.rounds, args.batch))
            for name, dsn in backends.items()
        }
    print(
        f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}: contender / plain "
        f"async_sessionmaker.begin() on its own engine, median of {args.rounds} paired rounds"
    )
    print(
        f"{'backend':18} {'workload':8} {'contender':12} {'us':>8}  "
        f"{'wall ratio (95% CI)':24}  {'CPU ratio (95% CI)':24}  sends"
    )
    for name, kinds in results.items():
        for kind, found in kinds.items():
            for contender, us in found["per_txn_us"].items():
                low, high = found["ratio_95ci"][contender]
                cpu_low, cpu_high = found["cpu_ratio_95ci"][contender]
                sends = sent(found["statements"][contender])
                print(
                    f"{name:18} {kind:8} {contender:12} {us:8.1f}  "
                    f"{found['ratio'][contender]:.3f} [{low:.3f}, {high:.3f}]     "
                    f"{found['cpu_ratio'][contender]:.3f} [{cpu_low:.3f}, {cpu_high:.3f}]     "
                    f"{sends}"
                )
    meta = {
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "rounds": args.rounds,
        "batch": args.batch,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
