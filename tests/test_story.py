"""The seed story (tests/session.txt), told against PostgreSQL and MariaDB.

The seed's own text is run, with only what a server needs changed: the DSN,
no SQLite-only engine options, a table name of our own (the servers are
shared), and a length for the VARCHAR column, which MySQL requires.
"""

from __future__ import annotations

import doctest
import uuid

import pytest
import sqlalchemy as sa

from .conftest import SERVERS, server_dsn

SEED = __import__("pathlib").Path(__file__).with_name("session.txt")


def substitute(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the seed no longer contains {old!r} exactly once"
    return text.replace(old, new)


@pytest.mark.usefixtures("zcml")
@pytest.mark.parametrize("backend", SERVERS)
def test_seed_story_on_server(backend: str) -> None:
    dsn = server_dsn(backend)
    table = f"sparc_story_{uuid.uuid4().hex[:10]}"
    text = SEED.read_text()
    text = substitute(text, "'sqlite:///:memory:'", repr(dsn))
    text = substitute(text, "{'connect_args':{'check_same_thread':False},", "{")
    text = substitute(text, "'poolclass':StaticPool}", "}")
    text = substitute(text, "__tablename__ = 'test'", f"__tablename__ = {table!r}")
    text = substitute(text, "sqlalchemy.Unicode,", "sqlalchemy.Unicode(64),")

    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, f"session.txt on {backend}", str(SEED), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with pytest.warns(sa.exc.MovedIn20Warning):  # the seed's legacy import
        runner.run(test, clear_globs=False)
    engine = test.globs.get("engine")
    try:
        assert runner.failures == 0, f"{runner.failures} example(s) failed on {backend}"
        assert runner.tries > 20
        test.globs["transaction"].session.close()
        assert engine.pool.checkedout() == 0
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"select id, name from {table}")).all()
        assert [tuple(r) for r in rows] == [(1, None)]
    finally:
        if engine is not None:
            test.globs["transaction"].session.close()
            test.globs["Base"].metadata.drop_all(engine)
            engine.dispose()
