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
import traceback
import types
import weakref
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


# Where a leaked socket came from. A socket nobody closed is reported when it
# is freed ("Exception ignored in: <socket.socket ...>", a ResourceWarning),
# often during a later, unrelated test. Every socket made during the run
# remembers the test that made it and the code that made it, so that the
# report names the culprit rather than the victim.
# Keyed by id(), with a weak reference that is not used to drop the entry
# when the socket dies: a socket in a reference cycle has its weak references
# cleared before its __del__ reports it, so the entry must outlive it; dead
# entries are dropped as each test starts.
_socket_origins: dict[int, tuple[str, str, weakref.ref[socket.socket]]] = {}
#: How such a report begins (pyproject.toml's filterwarnings matches it).
LEAKED_ELSEWHERE = "A socket made by an earlier test"
#: How the report of a socket closed with its reader open begins (the same).
HALF_CLOSED = "A socket closed while a reader of it was open"
_PYTEST_CODE = re.compile(r"[/\\](_pytest|pluggy)[/\\]")
_current_test = "(no test: collection or session set-up)"


def _remember_socket_origin(sock: socket.socket) -> None:
    key = id(sock)
    frames = traceback.extract_stack(limit=40)[:-2]
    stack = "".join(
        traceback.format_list([f for f in frames if not _PYTEST_CODE.search(f.filename)][-14:])
    )
    _socket_origins[key] = (_current_test, stack, weakref.ref(sock))


def _forget_dead_sockets() -> None:
    for key in [key for key, (_, _, ref) in _socket_origins.items() if ref() is None]:
        del _socket_origins[key]


_socket_init = socket.socket.__init__


def _socket_init_remembering(self: socket.socket, *args: Any, **kwargs: Any) -> None:
    _socket_init(self, *args, **kwargs)
    _remember_socket_origin(self)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    global _current_test
    _forget_dead_sockets()
    _current_test = item.nodeid
    yield


def _install_socket_origins() -> None:
    socket.socket.__init__ = _socket_init_remembering  # type: ignore[method-assign]
    reporting = sys.unraisablehook

    def report_origin(unraisable: Any) -> None:
        origin = _socket_origins.get(id(unraisable.object))
        if origin is not None and origin[2]() not in (None, unraisable.object):
            origin = None  # another socket's entry under a reused id
        if isinstance(unraisable.object, socket.socket):
            if origin is None:
                # Its entry is gone: pruned after its weak reference was
                # cleared by a collection that did not free it (an object
                # of its cycle came back to life, as a file object's close
                # in its finaliser can make it). Seen once in CI, on a
                # PyMySQL socket closed with its reader still open. Whose
                # it was is not known, so it is not charged to this test.
                made_by, stack = "a test not recorded", "  (unknown)\n"
            else:
                made_by, stack, _ = origin
            if getattr(unraisable.object, "_closed", False):
                # Its owner closed it ("[closed]"), but a makefile() reader of
                # it was still open, so its file descriptor stayed open until
                # the reader was freed. A driver's close interrupted between
                # its reader's close and the socket's leaves this (PyMySQL,
                # under the SIGALRM storm of test_blocks.py), and it is freed
                # whenever its connection is: seen in CI during the set-up of
                # an unrelated test that was charged with it. Nobody forgot to
                # close it: a warning that says where it came from.
                why = f"{HALF_CLOSED} (made by {made_by}, at:\n{stack}), freed here"
            elif made_by != _current_test:
                # Not this test's socket: reported as a warning that names the
                # test that made it (pyproject.toml keeps these visible in the
                # warnings summary, not errors of the test that happened to run
                # when the garbage was freed).
                why = f"{LEAKED_ELSEWHERE} ({made_by}, at:\n{stack}), freed unclosed here"
            else:
                why = None
            if why is not None:
                unraisable = types.SimpleNamespace(
                    exc_type=unraisable.exc_type,
                    exc_value=unraisable.exc_value,
                    exc_traceback=unraisable.exc_traceback,
                    err_msg=why,
                    object=unraisable.object,
                )
        reporting(unraisable)

    sys.unraisablehook = report_origin


def pytest_sessionstart(session: pytest.Session) -> None:
    # After pytest's own unraisable hook is in place (it calls no other):
    # ours names a leaked socket's origin, then hands over to it.
    _install_socket_origins()


def pytest_sessionfinish(session: pytest.Session) -> None:
    socket.socket.__init__ = _socket_init  # type: ignore[method-assign]


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


def share_pymysql_tls_context() -> None:
    """PyMySQL (1.1 and later) builds a fresh default SSLContext for every
    connection made without TLS options, to use if the server offers TLS;
    loading the system's CA certificates into it costs about 20 ms of CPU,
    more than everything else a local connection costs together (0.5 ms).
    Hundreds of tests connect to MariaDB, many of them more than once (a
    pool replaced after an interruption connects again). Here every such
    connection gets one context, built the same way the first time it is
    needed: a context holds no per-connection state, and the server decides
    as before whether it is used."""
    try:
        from pymysql import connections
    except ImportError:
        return
    build = connections.Connection._create_ssl_ctx
    if getattr(build, "shares_default", False):
        return
    made: list[Any] = []

    def create_ssl_ctx(self: Any, sslp: Any) -> Any:
        if isinstance(sslp, dict) and not sslp:  # no TLS option given
            if not made:
                made.append(build(self, sslp))
            return made[0]
        return build(self, sslp)

    create_ssl_ctx.shares_default = True  # type: ignore[attr-defined]
    connections.Connection._create_ssl_ctx = create_ssl_ctx


def pytest_configure(config: pytest.Config) -> None:
    """An unset server variable is set to the usual local address when a
    server answers there; set (even empty), it is left alone."""
    share_pymysql_tls_context()
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
