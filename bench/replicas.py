"""Read replicas: what a read-only block costs, and what positions prevent.

    TEST_PG_DSN=... TEST_PG_REPLICA_DSN=... .venv/bin/python bench/replicas.py [--quick] [--cost]

(``--cost``: part 1 only, which changes nothing on the replica. Part 2 delays
the replica's replay: point TEST_PG_REPLICA_DSN at a replica of your own.)

    TEST_MYSQL_PRIMARY_DSN=... TEST_MYSQL_REPLICA_DSN=... \
    TEST_MYSQL_REPLICA_ADMIN_DSN=... .venv/bin/python bench/replicas.py --mariadb [--quick] [--cost]

(``--mariadb``: the same on a MariaDB pair, as ``.ci/mariadb-replica.sh``
makes; the position check there is ``SELECT @@gtid_slave_pos, @@read_only``.
Part 2 sets the replica's ``MASTER_DELAY`` through the admin DSN.)

1. A one-row ``get`` on the replica through ``tx(readonly=True)`` (a scope
   that never wrote: no position check) against plain SQLAlchemy: a
   ``sessionmaker`` bound to an engine of its own, made by ``create_engine()``
   on the replica's URL with the pool options sparc.sa's factory gives the
   replica engine (pool class and size, ``pool_pre_ping=True``), and against
   ``alike``, the same plain session made to send what the block sends (on
   PostgreSQL without the ping, whose place the block's BEGIN takes; on
   MariaDB without the pool's reset ROLLBACK, which sparc.sa leaves out).
   In each round the contenders take turns, one block each in a shuffled
   order, every block timed alone by the wall clock and by this process's
   CPU clock; a contender's time in a round is the median of its blocks',
   and a ratio is the median over rounds of the block's time over the
   reference's in the same round, printed with its 95% interval and range.
   Then the block when the position must be checked (one more query),
   against plain.
2. Replay lag against stale reads: users write a row and read it back 0 to
   5 s later, while the replica's replay is delayed by 0.5 to 4 s (MariaDB:
   1 to 4 s); reads routed by position (``after=token``) against reads routed
   by the clock (primary for 2 s after a write, as Rails does). Draws
   ``docs/replicas/lag.png`` (MariaDB: ``lag-mariadb.png``) and prints the
   table of docs/replicas.rst.

Part 2 needs ``ALTER SYSTEM`` on the PostgreSQL replica (the postgres user),
or ``CHANGE MASTER`` on the MariaDB replica (its admin DSN).
"""

from __future__ import annotations

import gc
import itertools
import os
import pathlib
import queue
import random
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa
from run import median_interval, own_engine, sent_per_call
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sparc.sa.engine import engine_from_config
from sparc.sa.orm import ScopedTransaction
from sparc.sa.replicas import lsn_to_int, replica_set, replicas, token_check
from sparc.sa.replicas.gtid import Gtid, format_token

QUICK = "--quick" in sys.argv
COST_ONLY = "--cost" in sys.argv  # part 1 only: no replay delay set on the replica
MARIADB = "--mariadb" in sys.argv  # part 1 on a MariaDB pair
_batches = itertools.count(1)
ROOT = pathlib.Path(__file__).parent.parent


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = f"bench_replica_{uuid.uuid4().hex[:8]}"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))


def control(dsn: str, *statements: str) -> None:
    engine = sa.create_engine(dsn, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def set_delay(dsn: str, seconds: float) -> None:
    """Delay the replica's replay by *seconds* (0: none). On MariaDB *dsn*
    is the replica's admin DSN; the delay is MASTER_DELAY, whole seconds."""
    if MARIADB:
        control(
            dsn,
            "STOP SLAVE",
            f"CHANGE MASTER TO MASTER_DELAY = {round(seconds)}",
            "START SLAVE",
        )
        return
    control(
        dsn,
        f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(seconds * 1000)}ms'"
        if seconds
        else "ALTER SYSTEM RESET recovery_min_apply_delay",
        "SELECT pg_reload_conf()",
    )


def caught_up(primary: Any, replica: Any) -> None:
    if MARIADB:
        with primary.connect() as conn:
            position = conn.exec_driver_sql("SELECT @@gtid_binlog_pos").scalar()
        with replica.connect() as conn:
            reached = conn.exec_driver_sql("SELECT MASTER_GTID_WAIT(%s, 30)", (position,)).scalar()
        assert reached == 0, "the replica did not catch up"
        return
    with primary.connect() as conn:
        target = lsn_to_int(conn.exec_driver_sql("SELECT pg_current_wal_lsn()::text").scalar())
    while True:
        with replica.connect() as conn:
            done = conn.exec_driver_sql("SELECT pg_last_wal_replay_lsn()::text").scalar()
        if lsn_to_int(done) >= target:
            return
        time.sleep(0.05)


def in_thread(fn: Any) -> Any:
    """*fn*'s result in a new thread: a scope that wrote nothing."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def spread(ratios: list[float]) -> str:
    """The median of *ratios*, its 95% interval and the range."""
    ordered = sorted(ratios)
    lo, hi = median_interval(ordered)
    return (
        f"{statistics.median(ordered):.3f} (95% CI {lo:.3f}-{hi:.3f}; "
        f"range {ordered[0]:.3f}-{ordered[-1]:.3f})"
    )


def cost(tx: ScopedTransaction, replica: Any, replica_dsn: str) -> None:
    """Part 1: paired, interleaved rounds of plain SQLAlchemy on an engine of
    its own (create_engine() on the replica's URL, with the pool options
    sparc.sa's factory gives the replica engine) and of read-only blocks."""
    theirs = own_engine(replica_dsn)
    for option in ("__class__", "_pre_ping", "_pool_size", "_max_overflow", "_recycle"):
        mine, other = getattr(replica.pool, option, None), getattr(theirs.pool, option, None)
        assert mine == other, f"pool {option}: replica engine {mine!r}, plain {other!r}"
    plain = sessionmaker(bind=theirs, expire_on_commit=False)
    # The same, sending what a read-only block sends: on PostgreSQL no ping
    # (the block's BEGIN checks its checkout), on MariaDB no reset ROLLBACK
    # after the COMMIT (sparc.sa.connections.resets).
    alike = own_engine(
        replica_dsn, **({"pool_reset_on_return": None} if MARIADB else {"pool_pre_ping": False})
    )
    unchecked = sessionmaker(bind=alike, expire_on_commit=False)
    rs = replica_set(tx.engine)
    assert rs is not None
    rounds, batch = (12, 100) if QUICK else (40, 200)

    # A token for position 1, with the check it must carry.
    if MARIADB:
        token = format_token(Gtid.parse("0-1-1"))
    else:
        token = f"pg:0/1.{token_check(1, rs.load_identity()[0])}"

    def plain_read() -> None:
        with plain.begin() as session:
            session.get(Row, 1)

    def alike_read() -> None:
        with unchecked.begin() as session:
            session.get(Row, 1)

    def ours() -> None:
        with tx(readonly=True) as S:
            S.get(Row, 1)

    def checked() -> None:
        rs.replicas[0].replayed = 0  # as if a newer commit had to be awaited
        with tx(readonly=True, after=token) as S:
            S.get(Row, 1)

    contenders = {"plain": plain_read, "alike": alike_read, "ours": ours, "checked": checked}
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}

    def measure() -> dict[str, dict[str, float]]:
        sent = {"plain": sent_per_call(plain_read, theirs)}
        sent["alike"] = sent_per_call(alike_read, alike)
        sent["ours"] = sent_per_call(ours, replica)
        sent["checked"] = sent_per_call(checked, replica)
        order = list(contenders)
        shuffle = random.Random(42).shuffle
        for call in contenders.values():  # warm up pools and compiled statements
            for _ in range(50):
                call()
        clock, cpu_clock = time.perf_counter, time.process_time
        for _ in range(rounds):
            # One block of each contender in turn, in a shuffled order, each
            # timed alone: a neighbour's burst lands on single blocks of
            # every contender alike, and the round's median per contender
            # leaves those blocks out.
            times: dict[str, list[float]] = {name: [] for name in contenders}
            cpu_times: dict[str, list[float]] = {name: [] for name in contenders}
            gc.collect()
            for _ in range(batch):
                shuffle(order)
                for name in order:
                    call = contenders[name]
                    start, cpu_start = clock(), cpu_clock()
                    call()
                    cpu_times[name].append(cpu_clock() - cpu_start)
                    times[name].append(clock() - start)
            for name in contenders:
                wall[name].append(statistics.median(times[name]) * 1e6)
                cpu[name].append(statistics.median(cpu_times[name]) * 1e6)
        return sent

    load = os.getloadavg()[0]
    sent = in_thread(measure)  # a new thread: a scope that never wrote
    theirs.dispose()
    alike.dispose()
    print(
        f"\none-row read on the replica ({'MariaDB' if MARIADB else 'PostgreSQL'}), "
        f"{rounds} rounds x {batch} blocks of each contender, one of each in turn "
        "in a shuffled order; "
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        "  sent per block (ping=BEGIN: the checkout checked by the BEGIN; ROLLBACK: "
        "actually sent); 'alike' is plain with "
        + ("pool_reset_on_return=None" if MARIADB else "pool_pre_ping=False")
    )
    for name, counts in sent.items():
        print(f"    {name:8s} " + ", ".join(f"{k} {v:g}" for k, v in counts.items()))
    print("  per block, median over rounds of each round's median, wall / CPU (µs):")
    for name in contenders:
        print(
            f"    {name:8s} {statistics.median(wall[name]):8.1f} "
            f"/ {statistics.median(cpu[name]):8.1f}"
        )
    for name, label, reference in (
        ("ours", "never wrote", "plain"),
        ("checked", "position checked", "plain"),
        ("ours", "never wrote", "alike"),
    ):
        w = [a / b for a, b in zip(wall[name], wall[reference], strict=True)]
        c = [a / b for a, b in zip(cpu[name], cpu[reference], strict=True)]
        print(f"  tx(readonly=True), {label:16s} wall {spread(w)} x {reference}")
        print(f"  {'':35s} CPU  {spread(c)} x {reference}")


def stale_reads(
    tx: ScopedTransaction,
    primary: Any,
    replica: Any,
    delay: float,
    mode: str,
    pairs: int,
) -> tuple[int, int]:
    """(stale reads, reads served by the replica) of *pairs* write-then-read pairs."""
    rng = random.Random(int(delay * 10))
    think = [rng.uniform(0, 5.0) for _ in range(pairs)]
    base_id = next(_batches) * 100_000  # row 1 is the cost workload's
    reads: queue.PriorityQueue[tuple[float, int, Any, float]] = queue.PriorityQueue()
    stale = [0]
    on_replica = [0]
    lock = threading.Lock()
    rs = replica_set(primary)
    assert rs is not None
    before = rs.stats["replica"]
    todo: queue.Queue[int | None] = queue.Queue()
    for i in range(pairs):
        todo.put(i)
    start = time.monotonic()

    def writer() -> None:
        while (i := todo.get()) is not None:
            time.sleep(max(0.0, start + i * 0.004 - time.monotonic()))
            with tx() as S:
                S.add(Row(id=base_id + i, name="x"))
            now = time.monotonic()
            reads.put((now + think[i], i, tx.commit_token, now))

    def reader() -> None:
        while True:
            due, i, token, written = reads.get()
            if i < 0:
                return
            time.sleep(max(0.0, due - time.monotonic()))
            if mode == "position":
                found = tx.run(Session.get, Row, base_id + i, readonly=True, after=token)
            else:
                engine = primary if time.monotonic() - written < 2.0 else replica
                with Session(engine) as session:
                    found = session.get(Row, base_id + i)
                with lock:
                    on_replica[0] += engine is replica
            with lock:
                stale[0] += found is None

    writers = [threading.Thread(target=writer) for _ in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(4)]
    for _ in writers:
        todo.put(None)
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join()
    for _ in readers:
        reads.put((float("inf"), -1, None, 0.0))
    for thread in readers:
        thread.join()
    served = rs.stats["replica"] - before if mode == "position" else on_replica[0]
    return stale[0], served


def sweep(tx: ScopedTransaction, primary: Any, replica: Any, replica_dsn: str) -> None:
    rs = replica_set(primary)
    assert rs is not None
    rs.wait = 0.0
    if MARIADB:  # MASTER_DELAY counts whole seconds
        delays = [1.0, 3.0] if QUICK else [1.0, 2.0, 3.0, 4.0]
    else:
        delays = [1.0, 3.0] if QUICK else [0.5, 1.0, 2.0, 3.0, 4.0]
    pairs = 100 if QUICK else 300
    table = []
    try:
        for delay in delays:
            set_delay(replica_dsn, delay)
            row = [delay]
            for mode in ("clock", "position"):
                row.extend(stale_reads(tx, primary, replica, delay, mode, pairs))
            table.append(row)
            set_delay(replica_dsn, 0)
            caught_up(primary, replica)
    finally:
        set_delay(replica_dsn, 0)
    print(f"\n{pairs} write-then-read pairs per delay, read 0-5 s after the write")
    print("  replay delay | clock (2 s): stale, on replica | positions: stale, on replica")
    for delay, c_stale, c_rep, p_stale, p_rep in table:
        print(f"  {delay:10.1f} s | {c_stale:12d} {c_rep:12d} | {p_stale:12d} {p_rep:12d}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [row[0] for row in table]
    ax.plot(xs, [row[1] for row in table], "o-", label="routed by the clock (2 s): stale reads")
    kind = "GTID" if MARIADB else "WAL"
    ax.plot(xs, [row[3] for row in table], "s-", label=f"routed by {kind} position: stale reads")
    ax.plot(
        xs, [row[4] for row in table], "^--", label=f"routed by {kind} position: served by replica"
    )
    ax.set_xlabel("replica replay delay (s)")
    ax.set_ylabel(f"reads of {pairs}")
    ax.set_title("Stale reads prevented, by replay lag")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "replicas" / ("lag-mariadb.png" if MARIADB else "lag.png")
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"figure: {out.relative_to(ROOT)}")


def main() -> None:
    names = (
        ("TEST_MYSQL_PRIMARY_DSN", "TEST_MYSQL_REPLICA_DSN")
        if MARIADB
        else ("TEST_PG_DSN", "TEST_PG_REPLICA_DSN")
    )
    primary_dsn, replica_dsn = (os.environ.get(name) for name in names)
    if not primary_dsn or not replica_dsn:
        print(f"{names[0]} and {names[1]} must name a primary and its replica")
        sys.exit(2)
    primary = engine_from_config({"dsn": primary_dsn, "replicas": [replica_dsn]})
    replica = replicas(primary)[0]
    Base.metadata.create_all(primary)
    try:
        with Session(primary) as session, session.begin():
            session.add(Row(id=1, name="one"))
        caught_up(primary, replica)
        tx = ScopedTransaction(primary, Base)
        print(f"SQLAlchemy {sa.__version__}, Python {sys.version.split()[0]}")
        cost(tx, replica, replica_dsn)
        if COST_ONLY:
            return
        if not MARIADB:
            sweep(tx, primary, replica, replica_dsn)
        elif os.environ.get("TEST_MYSQL_REPLICA_ADMIN_DSN"):
            sweep(tx, primary, replica, os.environ["TEST_MYSQL_REPLICA_ADMIN_DSN"])
        else:
            print("\npart 2 on MariaDB needs TEST_MYSQL_REPLICA_ADMIN_DSN (MASTER_DELAY)")
    finally:
        Base.metadata.drop_all(primary)
        primary.dispose()
        replica.dispose()


if __name__ == "__main__":
    main()
