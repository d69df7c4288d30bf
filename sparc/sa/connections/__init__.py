"""Connections: what sparc.sa adds to SQLAlchemy's pool and dialect.

Private to sparc.sa. The checkout ping (liveness), the pool reset after a
block's own end (resets), the BEGIN an aiosqlite block sends (sqlitebegin),
what a forked child must not touch (fork), and the one shared SQLite
connection that survives interruptions (keep).

These modules import nothing of the transaction core (:mod:`sparc.sa.tx`):
``tests/test_layout.py`` checks it.
"""
