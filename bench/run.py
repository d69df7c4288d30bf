"""Benchmarks: sparc.sa against plain SQLAlchemy and the Zope stack, side by side.

    pip install -e '.[bench]'
    TEST_PG_DSN=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
    TEST_MYSQL_DSN=mysql+pymysql://root@127.0.0.1:3306/test \\
        python bench/run.py [--quick] [--only WORKLOAD ...]

Every contender runs in this one process. The reference, ``plain``, is what a
user who leaves sparc.sa gets: plain SQLAlchemy on an engine of its own from
``create_engine()``, with the options sparc.sa's factory would give it (the
same pool class, and ``pool_pre_ping=True`` where sparc.sa checks liveness).
The Zope stack has an engine of its own built the same way. Rounds of the
contenders are interleaved in a shuffled order, so that a noisy neighbour
hurts them all alike. A ratio is the median, over rounds, of the contender's
time divided by ``plain``'s in the same round, with a 95% confidence interval
from the order statistics. Nothing here is asserted: this is a measuring
tool, not a test (bench/guard.py is the CI's short version).

Contenders, each running a one-row transaction:

    plain           with sessionmaker.begin() as session: ...   (own engine)
    zope            with transaction.manager: Session()...       (own engine;
                    z3c.saconfig + zope.sqlalchemy + transaction)
    sparc.sa        with transaction(): transaction.session...   (manager held)
    sparc.sa/lookup the same, with getMultiAdapter() on every transaction
                    (the per-request pattern)
    plain@sparc     plain SQLAlchemy on sparc.sa's engine: the engine's own
                    cost, next to plain on its own engine

and, on in-memory SQLite only, a reference that is not a contender:

    bare            one reused session per thread on sparc.sa's engine: add,
                    commit, close, with none of sparc.sa's guarantees.
                    sparc.sa / bare is what the guarantees cost.

Beside each time it prints what each contender sends per transaction,
counted from its engine's events (on SQLite from SQLite's own trace
callback, so the BEGIN the driver sends by itself is counted too), and the
pings of the liveness check.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator, Mapping
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


@dataclass
class Engines:
    """The engines of one workload: sparc.sa's, and one of its own for plain
    SQLAlchemy and for the Zope stack, built with the options sparc.sa's
    factory would give them."""

    sparc: Engine
    plain: Engine
    zope: Engine
    #: Those that hold a database of their own (each in-memory SQLite engine)
    databases: list[Engine] = field(default_factory=list)

    def of(self, contender: str) -> Engine:
        if contender in ("plain", "zope"):
            return getattr(self, contender)  # type: ignore[no-any-return]
        return self.sparc  # sparc.sa, sparc.sa/lookup, plain@sparc, bare

    def distinct(self) -> list[Engine]:
        return [self.sparc, self.plain, self.zope]


def own_engine(dsn: str, **kwargs: Any) -> Engine:
    """A plain create_engine(): the options sparc.sa's factory would pass
    (pool class, pool_pre_ping), and nothing else of sparc.sa's."""
    from sparc.sa import options

    url, options_ = options.normalize({"dsn": dsn, "kwargs": kwargs})
    return sa.create_engine(url, **options_)


def make_contenders(
    engines: Engines, models: Models, n_rows: int, bare: bool = False
) -> list[Contender]:
    """Build every contender; their get() reads random existing rows."""
    import transaction as zope_transaction
    from z3c.saconfig import GloballyScopedSession, named_scoped_session
    from z3c.saconfig.interfaces import IScopedSession
    from zope import component

    from sparc.sa.interfaces import ISAScopedTransaction

    Item, Base = models.Item, models.Base
    engine = engines.sparc
    ids = list(range(1, n_rows + 1))
    pick = random.Random(7).choice

    def plain_on(bind: Engine) -> tuple[Txn, Txn]:
        plain_sessions = sessionmaker(bind)

        def plain_insert() -> None:
            with plain_sessions.begin() as session:
                session.add(Item(name="x"))

        def plain_get() -> str:
            with plain_sessions.begin() as session:
                return session.get(Item, pick(ids)).name  # type: ignore[union-attr]

        return plain_insert, plain_get

    # the Zope stack, on its own engine
    utility_name = f"bench-{id(engines.zope)}-{Item.__tablename__}"
    component.provideUtility(GloballyScopedSession(bind=engines.zope), IScopedSession, utility_name)
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
        Contender("plain", *plain_on(engines.plain)),
        Contender("zope", zope_insert, zope_get),
        Contender("sparc.sa", sparc_insert, sparc_get),
        Contender("sparc.sa/lookup", lookup_insert, lookup_get),
        Contender("plain@sparc", *plain_on(engine)),
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
    #: The same rounds timed by this process's CPU clock: what the client
    #: itself spent, which a neighbour's load does not inflate.
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    sent: dict[str, dict[str, float]] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.per_txn_us.items()}

    def paired(self, reference: str = "plain", cpu: bool = False) -> dict[str, list[float]]:
        """Per round, each contender's time over *reference*'s in that round:
        pairing cancels the slow drifts of a shared machine's load."""
        times = self.cpu_us if cpu else self.per_txn_us
        ref = times[reference]
        return {k: sorted(x / p for x, p in zip(v, ref, strict=True)) for k, v in times.items()}

    def ratios(self, reference: str = "plain", cpu: bool = False) -> dict[str, float]:
        """Median over rounds of (contender / reference) within the same round."""
        return {k: statistics.median(v) for k, v in self.paired(reference, cpu).items()}

    def intervals(
        self, reference: str = "plain", cpu: bool = False
    ) -> dict[str, tuple[float, float]]:
        """95% confidence interval of each median ratio."""
        return {k: median_interval(v) for k, v in self.paired(reference, cpu).items()}


def median_interval(ordered: list[float]) -> tuple[float, float]:
    """A 95% confidence interval of the median from the order statistics of
    sorted samples (the count below the median is binomial(n, 1/2))."""
    n = len(ordered)
    half_width = 1.96 * (n**0.5) / 2
    lo = max(0, int(n / 2 - half_width))
    hi = min(n - 1, int(n / 2 + half_width + 1) - 1)
    return ordered[lo], ordered[hi]


def interleaved(
    workload: str,
    contenders: list[Contender],
    pick: Callable[[Contender], Txn],
    rounds: int,
    batch: int,
    between: Callable[[], None] = lambda: None,
) -> Result:
    """Time *batch* transactions of each contender per round, in a shuffled order."""
    result = Result(workload, {c.name: [] for c in contenders}, {c.name: [] for c in contenders})
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
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(batch):
                txn()
            cpu = time.process_time() - cpu_start
            elapsed = time.perf_counter() - start
            result.per_txn_us[contender.name].append(elapsed / batch * 1e6)
            result.cpu_us[contender.name].append(cpu / batch * 1e6)
        between()
    return result


@contextlib.contextmanager
def counting_at(engine: Engine, name: str, count: Callable[[Any], None]) -> Iterator[None]:
    """Call *count* with the connection each time the method *name* of
    *engine*'s dialect class runs, before it runs; the class is restored
    after. sparc.sa's per-engine wrappers (liveness, resets) call the class's
    method, so only what reaches the driver is counted."""
    cls = type(engine.dialect)
    own = cls.__dict__.get(name)
    inner = getattr(cls, name)

    def counted(self: Any, dbapi_connection: Any) -> Any:
        count(dbapi_connection)
        return inner(self, dbapi_connection)

    setattr(cls, name, counted)
    try:
        yield
    finally:
        if own is None:
            delattr(cls, name)
        else:
            setattr(cls, name, own)


@contextlib.contextmanager
def counting_pings(engine: Engine, counts: Counter[str]) -> Iterator[None]:
    """Count the pings *engine*'s dialect sends, as ``counts["ping"]``: at the
    dialect class's do_ping, which SQLAlchemy's pre-ping and sparc.sa's
    liveness check both call only when they do ping. A checkout that
    sparc.sa checks with the transaction's BEGIN instead (PostgreSQL) counts
    as ``counts["ping=BEGIN"]``: that BEGIN is counted as a BEGIN too, where
    BEGINs are counted, and it is the only one the transaction sends."""
    from sparc.sa.tx import liveness

    def count(dbapi_connection: Any) -> None:
        counts["ping"] += 1

    own = dict(liveness.BEGINS)

    def counted(begin: Callable[[Any], bool]) -> Callable[[Any], bool]:
        def begins(dbapi_connection: Any) -> bool:
            if begin(dbapi_connection):
                counts["ping=BEGIN"] += 1
                return True
            return False

        return begins

    liveness.BEGINS.update({driver: counted(begin) for driver, begin in own.items()})
    try:
        with counting_at(engine, "do_ping", count):
            yield
    finally:
        liveness.BEGINS.update(own)


def counting_rollbacks(
    engine: Engine, counts: Counter[str]
) -> contextlib.AbstractContextManager[None]:
    """Count the ROLLBACKs *engine*'s driver sends, as ``counts["ROLLBACK"]``:
    at the dialect class's do_rollback, which both a session's rollback and
    the pool's reset on return call. psycopg sends nothing when no
    transaction is open, so there only a rollback of an open one counts."""
    psycopg = engine.dialect.driver == "psycopg"

    def count(dbapi_connection: Any) -> None:
        if not psycopg or dbapi_connection.dbapi_connection.info.transaction_status != 0:
            counts["ROLLBACK"] += 1

    return counting_at(engine, "do_rollback", count)


def sent_per_call(call: Callable[[], Any], engine: Engine, n: int = 50) -> dict[str, float]:
    """What one *call* (a request, say) sends through *engine*, averaged over
    *n*: statements by first word, COMMITs, ROLLBACKs and pings actually
    sent (the pool's reset ROLLBACK included)."""
    counts: Counter[str] = Counter()

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counts[statement.split(None, 1)[0].upper()] += 1

    def on_commit(conn: Any) -> None:
        counts["COMMIT"] += 1

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    sa.event.listen(engine, "commit", on_commit)
    try:
        with counting_pings(engine, counts), counting_rollbacks(engine, counts):
            for _ in range(n):
                call()
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_execute)
        sa.event.remove(engine, "commit", on_commit)
    return {k: round(v / n, 2) for k, v in sorted(counts.items())}


def statements(
    engines: Engines, contenders: list[Contender], kinds: tuple[str, ...], n: int = 50
) -> dict[str, dict[str, dict[str, float]]]:
    """What each contender sends per transaction, counted on its own engine:
    on SQLite from SQLite's trace callback (the driver's own BEGIN included),
    elsewhere from the engine's events and the driver calls: BEGIN where
    the driver sends one (psycopg; PyMySQL begins implicitly), and every
    ROLLBACK sent, the pool's reset on return included; ``ping`` is the
    liveness check."""
    counts: Counter[str] = Counter()

    def on_begin(conn: Any) -> None:
        counts["BEGIN"] += 1

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counts[statement.split(None, 1)[0].upper()] += 1

    def on_commit(conn: Any) -> None:
        counts["COMMIT"] += 1

    traced: list[Any] = []

    def trace(sql: str) -> None:
        counts[sql.split(None, 1)[0].upper()] += 1

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        dbapi_connection.set_trace_callback(trace)
        traced.append(dbapi_connection)

    out: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in kinds}
    for engine in engines.distinct():
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            listeners = [("checkout", on_checkout)]
        else:
            listeners = [("before_cursor_execute", on_execute), ("commit", on_commit)]
            if engine.dialect.name == "postgresql":
                listeners.append(("begin", on_begin))
        for name, fn in listeners:
            sa.event.listen(engine, name, fn)
        pinging = contextlib.ExitStack()
        pinging.enter_context(counting_pings(engine, counts))
        if not sqlite:
            pinging.enter_context(counting_rollbacks(engine, counts))
        try:
            for kind in kinds:
                for contender in contenders:
                    if engines.of(contender.name) is not engine:
                        continue
                    txn = getattr(contender, kind)
                    txn()  # the first on a new connection may differ
                    counts.clear()
                    for _ in range(n):
                        txn()
                    out[kind][contender.name] = {k: v / n for k, v in counts.items()}
        finally:
            for name, fn in listeners:
                sa.event.remove(engine, name, fn)
            pinging.close()
            for dbapi_connection in traced:
                dbapi_connection.set_trace_callback(None)
            traced.clear()
    return out


def ping_begins_merged(
    counts: Mapping[str, float], label: str = "BEGIN (ping)"
) -> dict[str, float]:
    """*counts* with a BEGIN that was also the liveness check (``ping=BEGIN``,
    counted as a BEGIN too) shown once, as *label*, in the BEGIN's place."""
    shown = dict(counts)
    as_ping = shown.pop("ping=BEGIN", 0)
    if as_ping and shown.get("BEGIN") == as_ping:
        return {(label if k == "BEGIN" else k): v for k, v in shown.items()}
    if as_ping:
        shown["ping=BEGIN"] = as_ping
    return shown


def sent(counts: dict[str, float]) -> str:
    """*counts* in order, as text (see :func:`ping_begins_merged`)."""
    shown = ping_begins_merged(counts)
    return ", ".join(k if v == 1 else f"{k} x{v:g}" for k, v in shown.items()) or "nothing"


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
    # docs/benchmarks.rst pastes these tables: an escaped @ keeps Sphinx from
    # making "plain@sparc" a mailto: link.
    header = [str(x).replace("@", "\\@") for x in header]
    rows = [[str(x).replace("@", "\\@") for x in r] for r in rows]
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


def report_ratios(results: list[Result]) -> str:
    """The paired ratios with their 95% intervals, and what each contender sends."""
    rows = []
    for r in results:
        rat, ci = r.ratios(), r.intervals()
        cpu, cpu_ci = r.ratios(cpu=True), r.intervals(cpu=True)
        against_zope, zope_ci = r.ratios("zope"), r.intervals("zope")
        for n in r.per_txn_us:
            if n == "plain":
                continue
            cells = [
                r.workload,
                n,
                f"{rat[n]:.3f} [{ci[n][0]:.3f}, {ci[n][1]:.3f}]",
                f"{cpu[n]:.3f} [{cpu_ci[n][0]:.3f}, {cpu_ci[n][1]:.3f}]",
                "-"
                if n == "zope"
                else f"{against_zope[n]:.3f} [{zope_ci[n][0]:.3f}, {zope_ci[n][1]:.3f}]",
                sent(r.sent.get(n, {})),
            ]
            rows.append(cells)
        rows.insert(
            len(rows) - len(r.per_txn_us) + 1,
            [r.workload, "plain", "1", "1", "-", sent(r.sent.get("plain", {}))],
        )
    return table(
        rows,
        [
            "workload",
            "contender",
            "/ plain, wall (95% CI)",
            "/ plain, CPU (95% CI)",
            "/ zope, wall (95% CI)",
            "sent per transaction",
        ],
    )


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


WORKLOADS = ("sqlite", "sqlite-file", "postgresql", "mysql", "memory", "threads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds: a smoke run, not a measurement"
    )
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply batches and rounds by F (a loaded machine: 0.5 is a quarter of the work)",
    )
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
        + ("5 (quick)" if quick else f"41 on SQLite, 61 on servers, scaled by {args.scale}")
        + "; contenders interleaved; times are medians, ratios paired per round\n"
    )
    results: list[Result] = []
    extra: dict[str, Any] = {}

    def setup(
        dsn: str, n_rows: int, bare: bool = False, **kwargs: Any
    ) -> tuple[Engines, Models, list[Contender], Callable[[], None]]:
        sparc_engine = engine_from_config({"dsn": dsn, "kwargs": kwargs})
        assert isinstance(sparc_engine, Engine)
        engines = Engines(sparc_engine, own_engine(dsn, **kwargs), own_engine(dsn, **kwargs))
        models = Models()
        table_ = models.Item.__table__
        # An in-memory SQLite database belongs to its engine: each gets the
        # table and its rows. Elsewhere the three engines share them.
        databases = (
            engines.distinct() if sparc_engine.url.database in (None, "") else [sparc_engine]
        )
        for engine in databases:
            models.Base.metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(sa.insert(table_), [{"name": f"row-{i}"} for i in range(n_rows)])

        def trim() -> None:  # keep tables small between rounds; not timed
            for engine in databases:
                with engine.begin() as conn:
                    conn.execute(sa.delete(table_).where(table_.c.id > n_rows))

        engines.databases = databases
        return engines, models, make_contenders(engines, models, n_rows, bare), trim

    def teardown(engines: Engines, models: Models) -> None:
        for engine in engines.databases:
            models.Base.metadata.drop_all(engine)
        for engine in engines.distinct():
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
            "sqlite": (500, 41),
            "sqlite-file": (40, 41),
            "postgresql": (60, 61),
            "mysql": (60, 61),
        }[name]
        if quick:
            batch, n_rounds = batch // 4, 5
        elif args.scale != 1.0:
            batch, n_rounds = max(1, int(batch * args.scale)), max(5, int(n_rounds * args.scale))
        engines, models, contenders, trim = setup(dsn, 1000, bare=name == "sqlite")
        try:
            kinds = ("insert", "get")
            for kind in kinds:
                label = f"{name}, one-row {kind}"
                print(f"running {label} ...", file=sys.stderr)
                results.append(
                    interleaved(
                        label, contenders, lambda c, k=kind: getattr(c, k), n_rounds, batch, trim
                    )
                )
            counted = statements(engines, contenders, kinds)
            for result, kind in zip(results[-2:], kinds, strict=True):
                result.sent = counted[kind]
            trim()
        finally:
            teardown(engines, models)
    if results:
        print(report_times(results))
        print()
        print(report_ratios(results))
        print()

    if "memory" in args.only:
        total = 20_000 if quick else 100_000
        engines, models, contenders, trim = setup("sqlite://", 10)
        print(f"running memory, {total} transactions per contender ...", file=sys.stderr)
        try:
            mem = memory(contenders, total, 10, trim)
        finally:
            teardown(engines, models)
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
            engines, models, contenders, trim = setup(dsn, 10, pool_size=16, max_overflow=0)
            print("running threads ...", file=sys.stderr)
            try:
                per_round = threads(
                    engines.sparc, contenders, counts, 0.5 if quick else 1.0, 1 if quick else 9
                )
            finally:
                teardown(engines, models)
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
                        "ratio_95ci": r.intervals(),
                        "ratio_to_zope": r.ratios("zope"),
                        "cpu_ratio": r.ratios(cpu=True),
                        "cpu_ratio_95ci": r.intervals(cpu=True),
                        "cpu_samples_us": r.cpu_us,
                        "sent_per_txn": r.sent,
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
