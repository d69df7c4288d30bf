"""Root test configuration: a clean component registry for every test.

The doctests under ``tests/`` run the way a site would run them: with
sparc.sa's ``configure.zcml`` loaded, as sparc.sa 1.x's test layer did.
README.rst and the docs load the ZCML themselves, in the text, so readers see
how.
"""

from __future__ import annotations

import gc
import os
import pathlib
import re
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import zope.event
from zope.component import globalregistry

from sparc.sa.interfaces import IEngineCreatedEvent

ROOT = pathlib.Path(__file__).parent
SEED = ROOT / "tests" / "session.txt"


def reset_component_registry() -> None:
    """Forget every global component registration (what zope.testing does)."""
    globalregistry.base.__init__("base")


def load_zcml() -> None:
    """Load sparc.sa's configure.zcml into the global registry."""
    from zope.configuration import xmlconfig

    import sparc.sa

    xmlconfig.file("configure.zcml", package=sparc.sa)


@pytest.fixture(autouse=True)
def clean_component_registry(request: pytest.FixtureRequest) -> Iterator[None]:
    reset_component_registry()
    node = request.node
    is_doctest = node.__class__.__name__ == "DoctestItem"
    if is_doctest and node.path.parent == ROOT / "tests":
        load_zcml()
    engines: list[Any] = []

    def collect(event: object) -> None:
        if IEngineCreatedEvent.providedBy(event):
            engines.append(event.engine)  # type: ignore[attr-defined]

    if is_doctest:
        zope.event.subscribers.append(collect)
    yield
    if is_doctest:
        zope.event.subscribers.remove(collect)
        # A doctest's globals are cleared when it ends, not closed: let its
        # managers' thread scopes close their sessions, then close the pools,
        # so nothing is left for a later test's garbage collection to find.
        gc.collect()
        for engine in engines:
            if hasattr(engine, "sync_engine"):  # an AsyncEngine: its loop is gone
                engine.sync_engine.dispose(close=False)
            else:
                engine.dispose()
    reset_component_registry()


@pytest.fixture(autouse=True, scope="module")
def frozen_heap() -> Iterator[None]:
    """What earlier modules left alive is moved out of the collector's sight
    while a module runs (gc.freeze). A long run keeps hundreds of thousands
    of objects alive (imported packages, caches); without this every full
    collection walks them all, and the tests that make garbage fast (an
    interruption at every line, SIGALRM at random) ran ten times slower in
    the whole suite than alone. The collection first means no garbage is
    frozen; what a module makes is collected as before."""
    # Garbage that earlier modules left is collected here, at the start of
    # an unrelated module's first test: what its finalisers report ("Exception
    # ignored in": a leaked driver socket's ResourceWarning, say) goes to
    # stderr, where it is seen, rather than failing that unrelated test.
    hook = sys.unraisablehook
    sys.unraisablehook = sys.__unraisablehook__
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def zcml() -> None:
    """sparc.sa's configure.zcml, loaded into the (clean) global registry."""
    load_zcml()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.__class__.__name__ == "DoctestItem" and item.path == SEED:
            # The seed is kept verbatim, and it imports declarative_base from
            # its pre-2.0 location; that one warning is expected there only.
            item.add_marker(pytest.mark.filterwarnings("ignore::sqlalchemy.exc.MovedIn20Warning"))


#: The variables that name the servers the skipped cases would run against.
SERVER_VARIABLES = {"TEST_PG_DSN": "PostgreSQL", "TEST_MYSQL_DSN": "MariaDB/MySQL"}
_UNSET_SERVER = re.compile(r"\b(TEST_\w+_DSN) is not set\b")


#: Where the servers usually answer (DEVELOPERS.md): with a variable unset,
#: the server there is used if it answers at once.
USUAL_SERVERS = {
    "TEST_PG_DSN": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "TEST_MYSQL_DSN": "mysql+pymysql://root@127.0.0.1:3306/test",
}
#: What the probe found for each unset variable: True, it answered and the
#: variable now names it; False, nothing answered.
PROBED: dict[str, bool] = {}


def answers(dsn: str) -> bool:
    """Whether a server accepts a connection and a SELECT at *dsn*, within
    about two seconds (half a second when nothing listens at all)."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    url = sa.make_url(dsn)
    try:
        with socket.create_connection((url.host or "127.0.0.1", url.port or 0), timeout=0.5):
            pass
    except OSError:
        return False
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    """An unset server variable is set to the usual local address when a
    server answers there; set (even empty), it is left alone."""
    for variable, dsn in USUAL_SERVERS.items():
        if variable in os.environ:
            continue
        PROBED[variable] = answers(dsn)
        if PROBED[variable]:
            os.environ[variable] = dsn


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for variable, found in PROBED.items():
        what = SERVER_VARIABLES[variable]
        if found:
            lines.append(
                f"{variable} was unset; {what} answers at {USUAL_SERVERS[variable]}, so its "
                f"cases run there ({variable}= empty skips them)"
            )
    return lines


def skip_reason(report: pytest.TestReport) -> str:
    """The reason a test was skipped, as ``pytest -rs`` would show it."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_summary(reports: list[pytest.TestReport]) -> list[str]:
    """One line per reason, the most frequent first; the server cases one line
    per unset variable, saying what setting it runs."""
    counts: Counter[str] = Counter()
    for report in reports:
        reason = skip_reason(report)
        server = _UNSET_SERVER.search(reason)
        if server is not None:
            variable = server.group(1)
            what = SERVER_VARIABLES.get(variable, "server")
            reason = f"{variable} is not set: set it to run the {what} cases (DEVELOPERS.md)"
            if PROBED.get(variable) is False:
                reason = (
                    f"{variable} is not set and nothing answers at "
                    f"{USUAL_SERVERS[variable]}: set it to run the {what} cases (DEVELOPERS.md)"
                )
        counts[reason] += 1
    width = len(str(max(counts.values(), default=0)))
    return [f"{count:>{width}} {reason}" for reason, count in counts.most_common()]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Skipped tests grouped by reason: without the server variables hundreds
    of cases skip for the same two reasons, and ``-rs`` would list each one."""
    reports = [r for r in terminalreporter.stats.get("skipped", []) if r.skipped]
    if reports:
        terminalreporter.write_sep("=", "skipped, by reason")
        for line in skip_summary(reports):
            terminalreporter.write_line(line)
