"""Inside a real Zope request: sparc.sa against z3c.saconfig + zope.sqlalchemy.

    pip install -e '.[test,bench]'
    TEST_PG_DSN=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        python bench/zope_publish.py [--rounds 30] [--batch 200] [--dsn URL] [--ping MODE]

One Zope instance, in process: ZPublisher publishes two browser views that
each insert one row, through WebTest. ``sparc`` writes in a ``with tx():``
block of the ISAScopedTransaction that ``<sa:transaction>`` registered;
``zope`` adds to z3c.saconfig's scoped session, which zope.sqlalchemy joins
to the request. Each view has an engine of its own, built alike; both keep
the guarantee that a connection the server killed while it was idle in the
pool is never seen by a request. How they check, ``--ping``:

    same       both check every checkout: both engines are configured with
               pool_pre_ping (sparc.sa's with pool_pre_ping="true"). On
               PostgreSQL sparc.sa's check of a block's checkout is the
               transaction's BEGIN (sparc.sa.tx.liveness), the Zope stack's a
               ping of its own
    sqlalchemy as ``same``, with sparc.sa's liveness wrapper taken off its
               engine: both run SQLAlchemy's own ping, call for call
    default    the Zope stack pings every checkout; sparc.sa's engine has its
               default liveness check: the BEGIN on PostgreSQL, elsewhere no
               ping for a connection a request took a moment ago (the
               publisher retries if it died meanwhile)

Rounds alternate the two in a shuffled order; the ratio is the median over
rounds of sparc's time per request divided by zope's in the same round, with
a 95% interval from the rounds' ratios, by the wall clock and by this
process's CPU clock (what the client spends; the servers' share of a round
trip is in the wall time only). It also prints the statements each view
sends per request. ``--control`` replaces sparc.sa's view by a second copy
of the Zope stack's, on an engine of its own built alike: the ratio of two
identical stacks shows how far this machine's noise alone moves the figure.
Nothing is asserted: this measures.
"""

from __future__ import annotations

import argparse
import gc
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
from typing import Any

import sqlalchemy as sa

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import sent, sent_per_call  # noqa: E402

SITE = """<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:browser="http://namespaces.zope.org/browser"
           xmlns:sa="http://namespaces.zope.org/sparc.sa">
  <include package="Zope2.App" />
  <include package="Products.Five" file="meta.zcml" />
  <include package="Products.Five" />
  <include package="sparc.sa" />
  <sa:engine name="bench" dsn="{dsn}" pool_size="4" {ping}/>
  <sa:transaction name="bench" engine="bench" base="benchapp.Base" />
  <browser:page for="*" name="sparc" class="benchapp.SparcInsert" permission="zope.Public" />
  <browser:page for="*" name="zope" class="benchapp.ZopeInsert" permission="zope.Public" />
  <browser:page for="*" name="control" class="benchapp.ControlInsert" permission="zope.Public" />
</configure>
"""

CONF = """instancehome {home}
<zodb_db main>
   <mappingstorage>
   </mappingstorage>
   mount-point /
</zodb_db>
"""

APP = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from z3c.saconfig import named_scoped_session
from zope.component import getUtility
from sparc.sa.interfaces import ISAScopedTransaction

class Base(DeclarativeBase):
    pass

class Item(Base):
    __tablename__ = "sparc_bench_zope_{token}"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40))

class SparcInsert:
    def __init__(self, context, request):
        self.context, self.request = context, request
    def __call__(self):
        tx = getUtility(ISAScopedTransaction, name="bench")
        with tx():
            tx.session.add(Item(name="sparc"))
        return "ok"

ZopeSession = named_scoped_session("bench-zope")
ControlSession = named_scoped_session("bench-control")

class ZopeInsert:
    session = ZopeSession
    def __init__(self, context, request):
        self.context, self.request = context, request
    def __call__(self):
        self.session().add(Item(name="zope"))
        return "ok"

class ControlInsert(ZopeInsert):
    session = ControlSession
"""


def start_zope(dsn: str, ping: str) -> tuple[Any, tuple[sa.Engine, sa.Engine, sa.Engine], Any]:
    import webtest
    from z3c.saconfig import GloballyScopedSession
    from z3c.saconfig.interfaces import IScopedSession
    from zope.component import getUtility, provideUtility
    from Zope2.Startup.run import make_wsgi_app

    from sparc.sa.interfaces import ISAEngine

    home = pathlib.Path(tempfile.mkdtemp(prefix="sparc-bench-zope-"))
    (home / "etc").mkdir()
    (home / "benchapp.py").write_text(APP.format(token=uuid.uuid4().hex[:10]))
    sys.path.insert(0, str(home))
    same = 'pool_pre_ping="true" ' if ping != "default" else ""
    (home / "etc" / "site.zcml").write_text(SITE.format(dsn=dsn, ping=same))
    (home / "etc" / "zope.conf").write_text(CONF.format(home=home))
    app = make_wsgi_app({}, str(home / "etc" / "zope.conf"))
    import benchapp

    ours = getUtility(ISAEngine, name="bench")
    # The Zope stack's engine: the same settings, SQLAlchemy's pre-ping.
    theirs = sa.create_engine(dsn, pool_size=4, pool_pre_ping=True)
    provideUtility(GloballyScopedSession(bind=theirs), IScopedSession, "bench-zope")
    # --control's second copy of the Zope stack, on an engine of its own.
    control = sa.create_engine(dsn, pool_size=4, pool_pre_ping=True)
    provideUtility(GloballyScopedSession(bind=control), IScopedSession, "bench-control")
    benchapp.Base.metadata.create_all(ours)
    return webtest.TestApp(app), (ours, theirs, control), benchapp


def median_interval(ordered: list[float]) -> tuple[float, float]:
    """A 95% confidence interval of the median, from order statistics (the
    number of samples below the median is binomial(n, 1/2))."""
    n = len(ordered)
    half_width = 1.96 * (n**0.5) / 2
    lo = max(0, int(n / 2 - half_width))
    hi = min(n - 1, int(n / 2 + half_width + 1) - 1)
    return ordered[lo], ordered[hi]


def profile(app: Any, urls: dict[str, str], n: int) -> None:
    import cProfile
    import pstats

    for name, url in urls.items():
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(n):
            app.get(url)
        profiler.disable()
        print(f"  --- {name}: functions by own time, {n} requests")
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(12)


def layers(app: Any, urls: dict[str, str], n: int) -> None:
    """Time each stack's own entry points inside the request: the view, a
    block's entry and exit, each data manager's two-phase steps, and
    zope.sqlalchemy's join; the rest of a request is Zope's, alike for both."""
    import functools

    import benchapp
    import zope.sqlalchemy.datamanager as zsa_dm

    import sparc.sa.tx.block as sparc_block
    import sparc.sa.tx.datamanager as sparc_dm

    spent: Counter[str] = Counter()

    def clock(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter_ns() - start

        setattr(owner, name, timed)

    steps = ("tpc_begin", "commit", "tpc_vote", "tpc_finish", "abort")
    for name in ("__enter__", "__exit__"):
        clock(sparc_block.Block, name, f"sparc.sa block {name}")
    for name in steps:
        clock(sparc_dm.SessionDataManager, name, f"sparc.sa data manager {name}")
        clock(zsa_dm.SessionDataManager, name, f"zope.sqlalchemy data manager {name}")
    clock(zsa_dm, "join_transaction", "zope.sqlalchemy join_transaction")
    clock(benchapp.SparcInsert, "__call__", "sparc.sa view")
    clock(benchapp.ZopeInsert, "__call__", "zope view")
    whole: Counter[str] = Counter()
    for _ in range(2):
        for name, url in urls.items():
            start = time.perf_counter_ns()
            for _ in range(n // 2):
                app.get(url)
            whole[name] += time.perf_counter_ns() - start
    print(f"  --- inside the request, us per request over {n} of each (wall clock):")
    for label in sorted(spent):
        print(f"    {label:40} {spent[label] / n / 1000:8.1f}")
    for name, total in whole.items():
        print(f"    {name + ' request, whole':40} {total / n / 1000:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("TEST_PG_DSN"))
    parser.add_argument("--ping", choices=("same", "sqlalchemy", "default"), default="same")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument(
        "--control",
        action="store_true",
        help="measure a second copy of the Zope stack in sparc.sa's place (the noise alone)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N requests of each view and print where the time goes",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=0,
        metavar="N",
        help="also time N requests of each view at each stack's entry points",
    )
    args = parser.parse_args()
    if not args.dsn:
        sys.exit("give --dsn, or set TEST_PG_DSN")
    app, (ours, theirs, control), benchapp = start_zope(args.dsn, args.ping)
    if args.ping == "sqlalchemy":
        del ours.dialect.do_ping  # sparc.sa.tx.liveness's wrapper: SQLAlchemy's own again
    try:
        first, first_engine = ("control", control) if args.control else ("sparc.sa", ours)
        urls = {first: f"/@@{first.split('.')[0]}", "zope": "/@@zope"}
        for url in urls.values():  # warm up
            for _ in range(100):
                app.get(url)
        wall: dict[str, list[float]] = {name: [] for name in urls}
        cpu: dict[str, list[float]] = {name: [] for name in urls}
        order = list(urls)
        shuffle = random.Random(42).shuffle
        for _ in range(args.rounds):
            shuffle(order)
            for name in order:
                url = urls[name]
                gc.collect()
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(args.batch):
                    app.get(url)
                cpu[name].append((time.process_time() - start_cpu) / args.batch * 1e6)
                wall[name].append((time.perf_counter() - start) / args.batch * 1e6)
        print(
            f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}, "
            f"{ours.dialect.name} {'.'.join(map(str, ours.dialect.server_version_info or ()))}, "
            f"{args.rounds} rounds x {args.batch} requests, --ping {args.ping}"
            + (", --control" if args.control else "")
        )
        for clock, per_request in (("wall", wall), ("CPU", cpu)):
            ratios = sorted(
                s / z for s, z in zip(per_request[first], per_request["zope"], strict=True)
            )
            low, high = median_interval(ratios)
            times = ", ".join(
                f"{name} {statistics.median(samples):.1f}" for name, samples in per_request.items()
            )
            print(
                f"  {clock:4} us per request (median): {times}\n"
                f"       {first} / zope: {statistics.median(ratios):.3f} "
                f"[{low:.3f}-{high:.3f}], {first} faster in "
                f"{sum(r < 1 for r in ratios)} of {len(ratios)} rounds"
            )
        if args.profile:
            profile(app, urls, args.profile)
        if args.layers:
            layers(app, urls, args.layers)
        print("  statements per request:")
        print(f"    {first:8} {sent(sent_per_call(lambda: app.get(urls[first]), first_engine))}")
        print(f"    zope     {sent(sent_per_call(lambda: app.get(urls['zope']), theirs))}")
    finally:
        benchapp.Base.metadata.drop_all(ours)
        for engine in (ours, theirs, control):
            engine.dispose()


if __name__ == "__main__":
    main()
