"""CI's speed guard: fail when a hot path of sparc.sa doubles its cost
relative to plain SQLAlchemy on an engine of its own.

    python bench/guard.py [--inject-us N]

Not a timed unit test and not part of pytest: a short paired measurement
(about half a minute) that .ci/run runs after the tests. For each hot path
it times rounds of one-row transactions of ``plain`` (``sessionmaker.begin()``
on its own ``create_engine()``, with the options sparc.sa's factory would
give it) and of sparc.sa, interleaved, and takes the median over rounds of
the paired ratio sparc.sa / plain. Time is this process's CPU time, which
neighbours on a shared 2-core machine do not inflate the way they inflate
wall time; a server's own work is the same for both and not counted.

A hot path fails when its ratio exceeds twice the figure docs/benchmarks.rst
documents (LIMITS below), or when it sends other statements than the
documented ones (counted from the engine's events). A failing timing is
measured once more before the guard gives up, so one noisy burst does not
fail CI. Hot paths: in-memory SQLite, manager held and looked up per
transaction; PostgreSQL (manager held) when TEST_PG_DSN is set.

``--inject-us N`` adds N microseconds of busy work to every sparc.sa
transaction: a way to see the guard fail (docs/benchmarks.rst shows it).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import Models, counting_pings, own_engine, ping_begins_merged

#: Documented ratios (sparc.sa / plain on its own engine, CPU time), the
#: medians of the full run in docs/benchmarks.rst (2026-11-30, inserts); a
#: hot path fails above FACTOR times its figure.
LIMITS: dict[str, float] = {
    "sqlite, held": 0.90,
    "sqlite, lookup": 0.93,
    "postgresql, held": 0.83,
}
FACTOR = 2.0
#: What each contender sends per one-row insert transaction: on PostgreSQL
#: sparc.sa's BEGIN is also its ping (sparc.sa.tx.liveness).
SENT = {
    ("sqlite", "plain"): "BEGIN INSERT COMMIT",
    ("sqlite", "sparc.sa"): "BEGIN INSERT COMMIT",
    ("postgresql", "plain"): "ping BEGIN INSERT COMMIT",
    ("postgresql", "sparc.sa"): "BEGIN(ping) INSERT COMMIT",
}

Txn = Callable[[], None]


def contenders(
    dsn: str, inject_us: float
) -> tuple[dict[str, Txn], list[sa.engine.Engine], Callable[[], None]]:
    from sqlalchemy.orm import sessionmaker
    from zope import component

    from sparc.sa.engine import engine_from_config
    from sparc.sa.interfaces import ISAScopedTransaction

    ours = engine_from_config({"dsn": dsn})
    assert isinstance(ours, sa.engine.Engine)
    theirs = own_engine(dsn)
    models = Models()
    Item, Base = models.Item, models.Base
    for engine in (ours, theirs):
        Base.metadata.create_all(engine)  # in-memory SQLite: one database each
    plain_sessions = sessionmaker(theirs)
    held = component.getMultiAdapter((ours, Base), ISAScopedTransaction)

    def burn() -> None:
        if inject_us:
            end = time.process_time() + inject_us / 1e6
            while time.process_time() < end:
                pass

    def plain() -> None:
        with plain_sessions.begin() as session:
            session.add(Item(name="x"))

    def sparc_held() -> None:
        with held():
            held.session.add(Item(name="x"))
            burn()

    def sparc_lookup() -> None:
        tx = component.getMultiAdapter((ours, Base), ISAScopedTransaction)
        with tx():
            tx.session.add(Item(name="x"))
            burn()

    def cleanup() -> None:
        for engine in (ours, theirs):
            Base.metadata.drop_all(engine)
            engine.dispose()

    txns = {"plain": plain, "held": sparc_held, "lookup": sparc_lookup}
    return txns, [theirs, ours], cleanup


def sent(engine: sa.engine.Engine, txn: Txn, n: int = 20) -> str:
    """The statements *txn* sends, per transaction, in order."""
    seen: Counter[str] = Counter()

    def on_begin(*args: Any) -> None:
        seen["BEGIN"] += 1

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen[statement.split(None, 1)[0].upper()] += 1

    def on_commit(*args: Any) -> None:
        seen["COMMIT"] += 1

    hooks = [("begin", on_begin), ("before_cursor_execute", on_execute), ("commit", on_commit)]
    for name, fn in hooks:
        sa.event.listen(engine, name, fn)
    try:
        with counting_pings(engine, seen):
            for _ in range(n):
                txn()
    finally:
        for name, fn in hooks:
            sa.event.remove(engine, name, fn)
    shown = ping_begins_merged(seen, "BEGIN(ping)")
    return " ".join(k if v == n else f"{k}x{v / n:g}" for k, v in shown.items())


def paired_ratios(txns: dict[str, Txn], rounds: int, batch: int) -> dict[str, float]:
    """Median over interleaved rounds of each contender's CPU time / plain's."""
    cpu: dict[str, list[float]] = {name: [] for name in txns}
    order = list(txns)
    shuffle = random.Random(11).shuffle
    for txn in txns.values():  # warm up
        for _ in range(batch):
            txn()
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            txn = txns[name]
            gc.collect()
            start = time.process_time()
            for _ in range(batch):
                txn()
            cpu[name].append(time.process_time() - start)
    return {
        name: statistics.median(x / p for x, p in zip(times, cpu["plain"], strict=True))
        for name, times in cpu.items()
        if name != "plain"
    }


def check(backend: str, dsn: str, rounds: int, batch: int, inject_us: float) -> list[str]:
    """Failures on *backend*, measured once more if the first try fails."""
    txns, (theirs, ours), cleanup = contenders(dsn, inject_us)
    if backend != "sqlite":
        del txns["lookup"]  # the same manager code; the server adds only noise
    failures: list[str] = []
    try:
        for name, txn in txns.items():
            expected = SENT[backend, "plain" if name == "plain" else "sparc.sa"]
            got = sent(theirs if name == "plain" else ours, txn)
            status = "ok" if got == expected else "FAILED"
            print(f"  {backend}, {name}: sends {got} (expected {expected}) {status}")
            if got != expected:
                failures.append(f"{backend}, {name} sends {got}, expected {expected}")
        for attempt in (1, 2):
            ratios = paired_ratios(txns, rounds, batch)
            over = []
            for name, ratio in ratios.items():
                key = f"{backend}, {name}"
                limit = FACTOR * LIMITS[key]
                verdict = "ok" if ratio <= limit else "OVER"
                print(
                    f"  {key}: sparc.sa / plain = {ratio:.3f} (CPU, median of {rounds} "
                    f"paired rounds; documented {LIMITS[key]:.2f}, limit {limit:.2f}) {verdict}"
                )
                if ratio > limit:
                    over.append(f"{key}: {ratio:.3f} > {limit:.2f}")
            if not over:
                break
            if attempt == 1:
                print("  over the limit: measuring once more")
        failures += over
    finally:
        cleanup()
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inject-us", type=float, default=0.0, metavar="N")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # peers' deprecation warnings are not ours to fix here
    from zope.configuration import xmlconfig

    import sparc.sa

    xmlconfig.file("configure.zcml", package=sparc.sa)
    started = time.perf_counter()
    backends = {"sqlite": ("sqlite://", 200)}
    pg = os.environ.get("TEST_PG_DSN")
    if pg:
        backends["postgresql"] = (pg, 20)
    else:
        print("speed guard: TEST_PG_DSN is not set, PostgreSQL is skipped")
    failures: list[str] = []
    for backend, (dsn, batch) in backends.items():
        failures += check(backend, dsn, args.rounds, batch, args.inject_us)
    took = time.perf_counter() - started
    if failures:
        print(f"speed guard FAILED after {took:.0f} s:\n  " + "\n  ".join(failures))
        return 1
    print(f"speed guard passed in {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
