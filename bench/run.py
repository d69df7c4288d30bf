"""Benchmarks: sparc.sa against plain SQLAlchemy and the Zope stack, side by side.

    pip install -e '.[bench]'
    TEST_PG_DSN=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
    TEST_MYSQL_DSN=mysql+pymysql://root@127.0.0.1:3306/test \\
        python bench/run.py [--quick] [--only WORKLOAD ...]

Every contender runs in this one process on the *same* engine object, so
engine settings are identical, and rounds of the contenders are interleaved
in a shuffled order, so that a noisy neighbour hurts them all alike. Times
are medians over rounds; a ratio is the median, over rounds, of the
contender's time divided by plain SQLAlchemy's in the same round. Nothing
here is asserted: this is a measuring tool, not a test.

Contenders, each running a one-row transaction:

    plain           with sessionmaker.begin() as session: ...
    zope            with transaction.manager: Session()...   (z3c.saconfig +
                    zope.sqlalchemy + transaction)
    sparc.sa        with transaction(): transaction.session... (manager held)
    sparc.sa/lookup the same, with getMultiAdapter() on every transaction
                    (the per-request pattern)

and, on in-memory SQLite only, a reference that is not a contender:

    bare            one reused session per thread: add, commit, close, with
                    none of sparc.sa's guarantees. sparc.sa / bare is what
                    the guarantees cost.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_PLOT = ROOT / "docs" / "benchmarks" / "threads.png"
DEFAULT_JSON = HERE / "results" / "latest.json"

Txn = Callable[[], Any]


# -- the database -------------------------------------------------------------------


class Models:
    """A Base and an Item model in a uniquely named table (servers are shared)."""

    def __init__(self) -> None:
        class Base(DeclarativeBase):
            pass

        class Item(Base):
            __tablename__ = f"sparc_bench_{uuid.uuid4().hex[:10]}"
            id: Mapped[int] = mapped_column(primary_key=True)
            name: Mapped[str] = mapped_column(sa.String(40))

        self.Base, self.Item = Base, Item


# -- contenders -----------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    insert: Txn
    get: Txn


def make_contenders(
    engine: Engine, models: Models, n_rows: int, bare: bool = False
) -> list[Contender]:
    """Build every contender on *engine*; their get() reads random existing rows."""
    import transaction as zope_transaction
    from z3c.saconfig import GloballyScopedSession, named_scoped_session
    from z3c.saconfig.interfaces import IScopedSession
    from zope import component

    from sparc.sa.interfaces import ISAScopedTransaction

    Item, Base = models.Item, models.Base
    ids = list(range(1, n_rows + 1))
    pick = random.Random(7).choice

    # plain SQLAlchemy
    plain_sessions = sessionmaker(engine)

    def plain_insert() -> None:
        with plain_sessions.begin() as session:
            session.add(Item(name="x"))

    def plain_get() -> str:
        with plain_sessions.begin() as session:
            return session.get(Item, pick(ids)).name  # type: ignore[union-attr]

    # the Zope stack
    utility_name = f"bench-{id(engine)}-{Item.__tablename__}"
    component.provideUtility(GloballyScopedSession(bind=engine), IScopedSession, utility_name)
    zope_session = named_scoped_session(utility_name)
    manager = zope_transaction.manager

    def zope_insert() -> None:
        with manager:
            zope_session().add(Item(name="x"))

    def zope_get() -> str:
        with manager:
            return zope_session().get(Item, pick(ids)).name  # type: ignore[no-any-return]

    # sparc.sa, manager held
    held = component.getMultiAdapter((engine, Base), ISAScopedTransaction)

    def sparc_insert() -> None:
        with held():
            held.session.add(Item(name="x"))

    def sparc_get() -> str:
        with held():
            return held.session.get(Item, pick(ids)).name  # type: ignore[no-any-return]

    # sparc.sa, looked up on every transaction
    lookup = component.getMultiAdapter

    def lookup_insert() -> None:
        transaction = lookup((engine, Base), ISAScopedTransaction)
        with transaction():
            transaction.session.add(Item(name="x"))

    def lookup_get() -> str:
        transaction = lookup((engine, Base), ISAScopedTransaction)
        with transaction():
            return transaction.session.get(Item, pick(ids)).name  # type: ignore[no-any-return]

    contenders = [
        Contender("plain", plain_insert, plain_get),
        Contender("zope", zope_insert, zope_get),
        Contender("sparc.sa", sparc_insert, sparc_get),
        Contender("sparc.sa/lookup", lookup_insert, lookup_get),
    ]
    if not bare:
        return contenders

    # the reference: the session reuse sparc.sa does, without its guarantees
    local = threading.local()
    bare_sessions = sessionmaker(engine, expire_on_commit=False)

    def bare_session() -> Any:
        try:
            return local.session
        except AttributeError:
            local.session = bare_sessions()
            return local.session

    def bare_insert() -> None:
        session = bare_session()
        try:
            session.add(Item(name="x"))
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def bare_get() -> str:
        session = bare_session()
        try:
            name: str = session.get(Item, pick(ids)).name  # type: ignore[union-attr]
            session.commit()
            return name
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    return [*contenders, Contender("bare", bare_insert, bare_get)]


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    per_txn_us: dict[str, list[float]] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.per_txn_us.items()}

    def ratios(self) -> dict[str, float]:
        """Median over rounds of (contender / plain) within the same round:
        pairing cancels the slow drifts of a shared machine's load."""
        plain = self.per_txn_us["plain"]
        return {
            k: statistics.median(x / p for x, p in zip(v, plain, strict=True))
            for k, v in self.per_txn_us.items()
        }


def interleaved(
    workload: str,
    contenders: list[Contender],
    pick: Callable[[Contender], Txn],
    rounds: int,
    batch: int,
    between: Callable[[], None] = lambda: None,
) -> Result:
    """Time *batch* transactions of each contender per round, in a shuffled order."""
    result = Result(workload, {c.name: [] for c in contenders})
    order = list(contenders)
    shuffle = random.Random(42).shuffle
    for contender in contenders:  # warm up caches, pools and compiled statements
        txn = pick(contender)
        for _ in range(max(20, batch // 10)):
            txn()
    for _ in range(rounds):
        shuffle(order)
        for contender in order:
            txn = pick(contender)
            gc.collect()
            start = time.perf_counter()
            for _ in range(batch):
                txn()
            elapsed = time.perf_counter() - start
            result.per_txn_us[contender.name].append(elapsed / batch * 1e6)
        between()
    return result


def statements(
    engine: Engine, contenders: list[Contender], n: int = 50
) -> dict[str, dict[str, dict[str, float]]]:
    """What each contender sends per transaction, counted from the engine's events."""
    counts: Counter[str] = Counter()

    def on_begin(conn: Any) -> None:
        counts["BEGIN"] += 1

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counts[statement.split(None, 1)[0].upper()] += 1

    def on_commit(conn: Any) -> None:
        counts["COMMIT"] += 1

    def on_rollback(conn: Any) -> None:
        counts["ROLLBACK"] += 1

    original_ping = engine.dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        counts["ping"] += 1
        return original_ping(dbapi_connection)

    listeners = [
        ("begin", on_begin),
        ("before_cursor_execute", on_execute),
        ("commit", on_commit),
        ("rollback", on_rollback),
    ]
    for name, fn in listeners:
        sa.event.listen(engine, name, fn)
    engine.dialect.do_ping = counting_ping  # type: ignore[method-assign]
    out: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for kind in ("insert", "get"):
            out[kind] = {}
            for contender in contenders:
                txn = getattr(contender, kind)
                counts.clear()
                for _ in range(n):
                    txn()
                out[kind][contender.name] = {k: v / n for k, v in sorted(counts.items())}
    finally:
        for name, fn in listeners:
            sa.event.remove(engine, name, fn)
        engine.dialect.do_ping = original_ping  # type: ignore[method-assign]
    return out


def memory(
    contenders: list[Contender], total: int, checkpoints: int, between: Callable[[], None]
) -> dict[str, dict[str, Any]]:
    """Traced Python memory while each contender runs *total* insert transactions."""
    out: dict[str, dict[str, Any]] = {}
    step = total // checkpoints
    for contender in contenders:
        gc.collect()
        tracemalloc.start()
        samples = []
        try:
            for _ in range(checkpoints):
                for _ in range(step):
                    contender.insert()
                between()
                gc.collect()
                samples.append(tracemalloc.get_traced_memory()[0])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Caches fill and drain in a sawtooth, so growth is the least-squares
        # slope over all checkpoints, not the last sample minus the first.
        xs = [step * (i + 1) for i in range(len(samples))]
        slope = statistics.linear_regression(xs, samples).slope
        out[contender.name] = {
            "transactions": step * checkpoints,
            "checkpoints_kib": [s / 1024 for s in samples],
            "min_kib": min(samples) / 1024,
            "max_kib": max(samples) / 1024,
            "growth_kib_per_100k": slope * 100_000 / 1024,
            "peak_kib": peak / 1024,
        }
    return out


def threads(
    engine: Engine, contenders: list[Contender], counts: list[int], seconds: float, rounds: int
) -> dict[str, dict[int, list[float]]]:
    """Insert transactions per second with N threads, per round, contenders interleaved."""
    out: dict[str, dict[int, list[float]]] = {c.name: {n: [] for n in counts} for c in contenders}
    shuffle = random.Random(3).shuffle
    order = list(contenders)
    for _ in range(rounds):
        for n in counts:
            shuffle(order)
            for contender in order:
                done = [0] * n
                stop = threading.Event()
                ready = threading.Barrier(n + 1)

                def work(
                    slot: int,
                    txn: Txn = contender.insert,
                    ready: threading.Barrier = ready,
                    stop: threading.Event = stop,
                    done: list[int] = done,
                ) -> None:
                    ready.wait()
                    count = 0
                    while not stop.is_set():
                        txn()
                        count += 1
                    done[slot] = count

                workers = [threading.Thread(target=work, args=(i,)) for i in range(n)]
                for w in workers:
                    w.start()
                gc.collect()
                ready.wait()
                start = time.perf_counter()
                time.sleep(seconds)
                stop.set()
                for w in workers:
                    w.join()
                out[contender.name][n].append(sum(done) / (time.perf_counter() - start))
    return out


# -- reporting -------------------------------------------------------------------------------


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("=" * w for w in widths)  # a reStructuredText simple table
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line, fmt.format(*header), line, *(fmt.format(*r) for r in rows), line])


def report_times(results: list[Result]) -> str:
    names: list[str] = []
    for r in results:
        names += [n for n in r.per_txn_us if n not in names]
    rows = []
    for r in results:
        med, rat = r.medians(), r.ratios()
        cells = [f"{med[n]:.1f} us ({rat[n]:.3f})" if n in med else "-" for n in names]
        rows.append([r.workload, *cells])
    return table(rows, ["workload (median per transaction, ratio to plain)", *names])


def plot(scaling: dict[str, dict[int, float]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, per in scaling.items():
        xs = sorted(per)
        ax.plot(xs, [per[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(next(iter(scaling.values()))))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("threads")
    ax.set_ylabel("one-row insert transactions per second")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------


WORKLOADS = ("sqlite", "sqlite-file", "postgresql", "mysql", "statements", "memory", "threads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds: a smoke run, not a measurement"
    )
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--json", type=pathlib.Path, default=DEFAULT_JSON)
    parser.add_argument("--plot", type=pathlib.Path, default=DEFAULT_PLOT)
    args = parser.parse_args(argv)

    import warnings

    warnings.simplefilter("ignore")  # peers' deprecation warnings are not ours to fix here
    from zope.configuration import xmlconfig

    import sparc.sa
    from sparc.sa.engine import engine_from_config

    xmlconfig.file("configure.zcml", package=sparc.sa)
    quick = args.quick
    servers = {
        "postgresql": os.environ.get("TEST_PG_DSN"),
        "mysql": os.environ.get("TEST_MYSQL_DSN"),
    }
    tmp = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"sparc-bench-{os.getpid()}.db"
    dsns = {"sqlite": "sqlite://", "sqlite-file": f"sqlite:///{tmp}", **servers}
    print(
        f"sparc.sa benchmarks: Python {platform.python_version()}, "
        f"SQLAlchemy {sa.__version__}, {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        "rounds: "
        + ("5 (quick)" if quick else "41 on SQLite, 91 on servers")
        + "; contenders interleaved; times are medians, ratios paired per round\n"
    )
    results: list[Result] = []
    extra: dict[str, Any] = {}

    def setup(
        dsn: str, n_rows: int, bare: bool = False, **kwargs: Any
    ) -> tuple[Engine, Models, list[Contender], Callable[[], None]]:
        engine = engine_from_config({"dsn": dsn, "kwargs": kwargs})
        models = Models()
        models.Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                sa.insert(models.Item.__table__), [{"name": f"row-{i}"} for i in range(n_rows)]
            )
        table_ = models.Item.__table__

        def trim() -> None:  # keep tables small between rounds; not timed
            with engine.begin() as conn:
                conn.execute(sa.delete(table_).where(table_.c.id > n_rows))

        return engine, models, make_contenders(engine, models, n_rows, bare), trim

    def teardown(engine: Engine, models: Models) -> None:
        models.Base.metadata.drop_all(engine)
        engine.dispose()

    for name in ("sqlite", "sqlite-file", "postgresql", "mysql"):
        if name not in args.only:
            continue
        dsn = dsns[name]
        if not dsn:
            var = "TEST_PG_DSN" if name == "postgresql" else "TEST_MYSQL_DSN"
            print(f"{name}: skipped, {var} is not set\n")
            continue
        # Short batches and many rounds: a ratio is paired within a round, and
        # pairing cancels drift best when rounds are short. Server round trips
        # and fsync are noisier than CPU work, so servers get the most rounds.
        batch, n_rounds = {
            "sqlite": (1000, 41),
            "sqlite-file": (60, 41),
            "postgresql": (100, 91),
            "mysql": (100, 91),
        }[name]
        if quick:
            batch, n_rounds = batch // 4, 5
        engine, models, contenders, trim = setup(dsn, 1000, bare=name == "sqlite")
        try:
            for kind in ("insert", "get"):
                label = f"{name}, one-row {kind}"
                print(f"running {label} ...", file=sys.stderr)
                results.append(
                    interleaved(
                        label, contenders, lambda c, k=kind: getattr(c, k), n_rounds, batch, trim
                    )
                )
        finally:
            teardown(engine, models)
    if results:
        print(report_times(results))
        print()

    if "statements" in args.only:
        dsn = servers["postgresql"] or "sqlite://"
        engine, models, contenders, _ = setup(dsn, 100)
        try:
            sent = statements(engine, contenders)
        finally:
            teardown(engine, models)
        extra["statements"] = {"dsn": engine.url.render_as_string(hide_password=True), **sent}
        rows = []
        for kind, per in sent.items():
            for cname, counts in per.items():
                rows.append([kind, cname, ", ".join(f"{k} x{v:g}" for k, v in counts.items())])
        print(f"statements per transaction ({engine.dialect.name}):")
        print(table(rows, ["transaction", "contender", "sent"]))
        for kind, per in sent.items():
            shapes = {json.dumps(v, sort_keys=True) for v in per.values()}
            verdict = "all send the same" if len(shapes) == 1 else "DIFFERENT across contenders"
            print(f"  {kind}: {verdict}")
        print()

    if "memory" in args.only:
        total = 20_000 if quick else 100_000
        engine, models, contenders, trim = setup("sqlite://", 10)
        print(f"running memory, {total} transactions per contender ...", file=sys.stderr)
        try:
            mem = memory(contenders, total, 10, trim)
        finally:
            teardown(engine, models)
        extra["memory"] = mem
        rows = [
            [
                n,
                str(m["transactions"]),
                f"{m['min_kib']:.0f} - {m['max_kib']:.0f}",
                f"{m['growth_kib_per_100k']:+.1f}",
                f"{m['peak_kib']:.0f}",
            ]
            for n, m in mem.items()
        ]
        print("traced Python memory, in-memory SQLite inserts (KiB), sampled at 10 checkpoints:")
        print(
            table(
                rows,
                [
                    "contender",
                    "transactions",
                    "range at checkpoints",
                    "trend per 100k txns",
                    "peak",
                ],
            )
        )
        print()

    if "threads" in args.only:
        dsn = servers["postgresql"]
        if not dsn:
            print("threads: skipped, TEST_PG_DSN is not set\n")
        else:
            counts = [1, 2, 4, 8, 16]
            engine, models, contenders, trim = setup(dsn, 10, pool_size=16, max_overflow=0)
            print("running threads ...", file=sys.stderr)
            try:
                per_round = threads(
                    engine, contenders, counts, 0.5 if quick else 1.0, 1 if quick else 9
                )
            finally:
                teardown(engine, models)
            scaling = {
                c: {n: statistics.median(v) for n, v in per.items()} for c, per in per_round.items()
            }
            paired = {
                c: {
                    n: statistics.median(
                        x / p for x, p in zip(v, per_round["plain"][n], strict=True)
                    )
                    for n, v in per.items()
                }
                for c, per in per_round.items()
            }
            extra["threads"] = {
                c: {str(n): {"tps": scaling[c][n], "ratio": paired[c][n]} for n in counts}
                for c in scaling
            }
            rows = [
                [str(n), *(f"{scaling[c][n]:.0f} ({paired[c][n]:.2f})" for c in scaling)]
                for n in counts
            ]
            print("PostgreSQL, one-row inserts per second by threads (ratio to plain, paired):")
            print(table(rows, ["threads", *scaling]))
            plot(scaling, args.plot, f"PostgreSQL, SQLAlchemy {sa.__version__}")
            print(f"plot: {args.plot}")
            print()

    tmp.unlink(missing_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "sqlalchemy": sa.__version__,
                "quick": quick,
                "times": {
                    r.workload: {
                        "median_us": r.medians(),
                        "ratio": r.ratios(),
                        "samples_us": r.per_txn_us,
                    }
                    for r in results
                },
                **extra,
            },
            indent=1,
        )
    )
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
