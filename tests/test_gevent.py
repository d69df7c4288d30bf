"""Under gevent, an ended greenlet gives its connection back at once.

gevent's monkey-patching is process-wide, so the check runs in a child
Python process on each backend with a real pool.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("gevent")

from .conftest import backend_dsn

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import gc, sys, uuid
    import gevent
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase
    from sparc.sa.engine import engine_from_config
    from sparc.sa.orm import scoped_transaction

    gc.disable()  # the garbage collector must not be what frees them
    engine = engine_from_config(
        {"dsn": sys.argv[1], "kwargs": {"pool_size": 2, "max_overflow": 0, "pool_timeout": 3}}
    )

    class Base(DeclarativeBase):
        pass

    tx = scoped_transaction(engine, Base)

    def read_outside_a_block(n):
        tx.session.execute(sa.text("select 1")).scalar()  # holds a connection

    def write_in_a_block(n):
        with tx():
            tx.session.execute(sa.text("select 1"))

    greenlets = []  # the Greenlet objects stay referenced, as a server's would
    for round in range(10):
        batch = [gevent.spawn(read_outside_a_block, i) for i in range(2)]
        gevent.joinall(batch, raise_error=True)
        greenlets.extend(batch)
        batch = [gevent.spawn(write_in_a_block, i) for i in range(2)]
        gevent.joinall(batch, raise_error=True)
        greenlets.extend(batch)
    # the last ended greenlets' sessions are being closed by greenlets of
    # their own (a ROLLBACK each): let them run, without waiting for the GC
    for _ in range(200):
        if engine.pool.checkedout() == 0:
            break
        gevent.sleep(0.005)
    assert engine.pool.checkedout() == 0, engine.pool.checkedout()
    print("OK", len(greenlets))
    """
)


@pytest.mark.parametrize("backend", ["sqlite-file", "postgresql", "mysql"])
def test_an_ended_greenlet_gives_its_connection_back_at_once(
    backend: str, tmp_path: pathlib.Path
) -> None:
    dsn = backend_dsn(backend, tmp_path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, dsn],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "OK 40"
