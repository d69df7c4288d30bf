"""``async with atx(readonly=True)`` on a real PostgreSQL streaming replica
(on the primary: tests/test_behaviour.py, with the threaded manager's)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

pytest.importorskip("greenlet")

from sparc.sa.aio import AsyncScopedTransaction
from sparc.sa.engine import engine_from_config
from sparc.sa.replicas import replica_set, replicas
from tests.conftest import build_models
from tests.test_replicas import wait_caught_up


def test_async_readonly_on_replica_reads_own_writes() -> None:
    pytest.importorskip("asyncpg")
    primary = os.environ.get("TEST_PG_DSN")
    replica = os.environ.get("TEST_PG_REPLICA_DSN")
    if not primary or not replica:
        pytest.skip("TEST_PG_DSN and TEST_PG_REPLICA_DSN are not both set: no streaming replica")

    def to_async(dsn: str) -> str:
        return make_url(dsn).set(drivername="postgresql+asyncpg").render_as_string(False)

    engine: Any = engine_from_config({"dsn": to_async(primary), "replicas": [to_async(replica)]})
    models = build_models()
    Item = models.Item
    atx = AsyncScopedTransaction(engine, models.Base)
    standby = sa.text("SELECT pg_is_in_recovery()")

    async def main() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(models.Base.metadata.create_all)
        try:
            sync_primary = sa.create_engine(primary)
            try:  # the replica replays the new table
                await asyncio.to_thread(wait_caught_up, sync_primary, replica)
            finally:
                sync_primary.dispose()

            async def fresh_task_reads() -> tuple[bool, list[str]]:
                async with atx(readonly=True) as session:
                    return (
                        bool((await session.execute(standby)).scalar()),
                        (await session.scalars(sa.select(Item.name))).all(),
                    )

            assert await asyncio.create_task(fresh_task_reads()) == (True, [])
            async with atx() as session:
                session.add(Item(name="mine"))
            rs = replica_set(engine)
            assert rs is not None and rs.position() > 0  # the task noted its commit
            async with atx(readonly=True) as session:  # sees its own write, wherever
                assert (await session.scalars(sa.select(Item.name))).all() == ["mine"]
        finally:
            async with engine.begin() as conn:
                await conn.run_sync(models.Base.metadata.drop_all)
            for each in (engine, *replicas(engine)):
                assert each.sync_engine.pool.checkedout() == 0
                await each.dispose()

    asyncio.run(main())
