"""Inside a Pyramid request: sparc.sa against the cookiecutter's zope.sqlalchemy wiring.

    pip install -e '.[test]'
    python bench/pyramid_run.py [--rounds 30] [--batch 200] [--profile N]
    TEST_PG_DSN=postgresql+psycopg://postgres@127.0.0.1:5432/test python bench/pyramid_run.py

The app is ``tests/pyramid_app``, built as pyramid-cookiecutter-starter
builds it (pyramid_tm with ``pyramid_tm.explicit_manager``, pyramid_retry
with 3 attempts), once per wiring, and called in process through WebTest (no
network). Both serve the same view, ``/write``, which inserts one row:
``sparc`` in a ``with tx():`` block of the manager the README's lookup
returns, ``zsa`` through the request's session that
``zope.sqlalchemy.register(session, transaction_manager=request.tm)`` joined.
A third contender, ``include``, is the cookiecutter app migrated to
``config.include("sparc.sa")`` (``tests/request_session_app.py``): its view
calls ``request.dbsession.add(...)`` with no block, ``request.dbsession``
being the manager's session, which goes with the request's transaction.
Each app has an engine of its own, built alike (same DSN, pool size); both keep
the guarantee that a connection that died idle in the pool is never handed
to a request (``pool_pre_ping`` for the cookiecutter app, sparc.sa's liveness
check for sparc.sa; ``--no-pre-ping`` drops the zsa app's, as the
cookiecutter's default does). Neither waits for the disk at COMMIT
(``synchronous_commit=off``, ``PRAGMA synchronous=OFF``), so that a shared
machine's fsyncs do not drown what the libraries cost; ``--durable`` waits.

Rounds alternate the apps in a shuffled order; each ratio is the median over
rounds of a sparc.sa app's time per request divided by zsa's in the same round, with a
95% interval of that median. Runs on a SQLite file, and on PostgreSQL when
TEST_PG_DSN is set (or --dsn names it). It prints the statements each app
sends per request, and warns when sparc.sa's block did not join the
request's transaction (then the two do not do the same work). Nothing is
asserted: this measures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import sqlalchemy as sa

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import sent_per_call  # noqa: E402

from sparc.sa.engine import engine_from_config  # noqa: E402
from tests.pyramid_app import ViewFailure, main, make_models  # noqa: E402
from tests.request_session_app import ViewFailure as IncludedViewFailure  # noqa: E402
from tests.request_session_app import main as included_main  # noqa: E402


def median_interval(ordered: list[float]) -> tuple[float, float]:
    """A 95% confidence interval of the median, from order statistics (the
    number of samples below the median is binomial(n, 1/2))."""
    n = len(ordered)
    half_width = 1.96 * (n**0.5) / 2
    lo = max(0, int(n / 2 - half_width))
    hi = min(n - 1, int(n / 2 + half_width + 1) - 1)
    return ordered[lo], ordered[hi]


def _no_sync(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=OFF")


def rows(engine: sa.engine.Engine, model: Any) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(model.__table__)).scalar_one()
        )


def joins(app: Any, engine: sa.engine.Engine, model: Any) -> bool:
    """Whether a view that writes and then fails leaves no row behind."""
    before = rows(engine, model)
    with contextlib.suppress(ViewFailure, IncludedViewFailure):
        app.get("/fail")
    return rows(engine, model) == before


def profile(apps: dict[str, Any], n: int) -> None:
    import cProfile
    import pstats

    for name, app in apps.items():
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(n):
            app.get("/write")
        profiler.disable()
        print(f"  --- {name}: functions by own time, {n} requests")
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(15)


def measure(dsn: str, args: argparse.Namespace) -> None:
    import webtest

    sqlite = dsn.startswith("sqlite")
    pool: dict[str, Any] = {} if sqlite else {"pool_size": 4}
    if not args.durable and not sqlite:
        pool["connect_args"] = {"options": "-c synchronous_commit=off"}
    ours = engine_from_config({"dsn": dsn, "kwargs": pool})
    included = engine_from_config({"dsn": dsn, "kwargs": pool})
    theirs = sa.create_engine(dsn, pool_pre_ping=args.pre_ping, **pool)
    if not args.durable and sqlite:
        for engine in (ours, included, theirs):
            sa.event.listen(engine, "connect", _no_sync)
    models = make_models()
    models.Base.metadata.create_all(ours)
    apps = {
        "sparc.sa": webtest.TestApp(
            main(engine=ours, models=models, wiring="sparc", manager=args.manager)
        ),
        "include": webtest.TestApp(
            included_main(engine=included, models=models, manager=args.manager)
        ),
        "zsa": webtest.TestApp(
            main(engine=theirs, models=models, wiring="zsa", manager=args.manager)
        ),
    }
    engines = {"sparc.sa": ours, "include": included, "zsa": theirs}
    try:
        for name, app in apps.items():
            if not joins(app, engines[name], models.Item):
                print(
                    f"  WARNING: {name}'s write outlived the request's abort: it did not "
                    "join request.tm, so the two apps do not do the same work"
                )
            for _ in range(100):  # warm up
                app.get("/write")
        per_request: dict[str, list[float]] = {name: [] for name in apps}
        order = list(apps)
        shuffle = random.Random(42).shuffle
        for _ in range(args.rounds):
            shuffle(order)
            for name in order:
                app = apps[name]
                gc.collect()
                start = time.perf_counter()
                for _ in range(args.batch):
                    app.get("/write")
                per_request[name].append((time.perf_counter() - start) / args.batch * 1e6)
        version = ".".join(map(str, ours.dialect.server_version_info or ()))
        print(
            f"{ours.dialect.name} {version}, manager {args.manager}, zsa pre-ping "
            f"{args.pre_ping}, {'durable' if args.durable else 'no wait for the disk'}, "
            f"{args.rounds} rounds x {args.batch} requests"
        )
        for name, samples in per_request.items():
            print(f"  {name:9} {statistics.median(samples):8.1f} us per request (median)")
        for name in ("sparc.sa", "include"):
            ratios = sorted(
                s / z for s, z in zip(per_request[name], per_request["zsa"], strict=True)
            )
            low, high = median_interval(ratios)
            print(
                f"  {name} / zsa: {statistics.median(ratios):.3f} [{low:.3f}-{high:.3f}], "
                f"{name} faster in {sum(r < 1 for r in ratios)} of {len(ratios)} rounds"
            )
        if args.profile:
            profile(apps, args.profile)
        print("  statements per request:")
        for name, app in apps.items():
            sent = sent_per_call(functools.partial(app.get, "/write"), engines[name])
            print(f"    {name:9} {sent}")
    finally:
        models.Base.metadata.drop_all(ours)
        ours.dispose()
        included.dispose()
        theirs.dispose()


def run() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("TEST_PG_DSN"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--manager", choices=("explicit", "default"), default="explicit")
    parser.add_argument("--no-pre-ping", dest="pre_ping", action="store_false")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument(
        "--durable",
        action="store_true",
        help="wait for the disk at each COMMIT (by default neither app does: "
        "synchronous_commit=off / PRAGMA synchronous=OFF on both engines, so that "
        "the time measured is the libraries', not the disk's)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N requests of each app and print where the time goes",
    )
    args = parser.parse_args()
    import pyramid
    import zope.sqlalchemy  # noqa: F401

    print(
        f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}, "
        f"Pyramid {_version('pyramid')}, pyramid_tm {_version('pyramid_tm')}, "
        f"zope.sqlalchemy {_version('zope.sqlalchemy')}"
    )
    del pyramid
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            measure(f"sqlite:///{pathlib.Path(tmp) / 'bench.db'}", args)
    if args.dsn:
        measure(args.dsn, args)
    else:
        print("PostgreSQL: skipped, TEST_PG_DSN is not set")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    run()
