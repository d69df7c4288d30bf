"""Connections: what sparc.sa does to SQLAlchemy's pooled connections.

Private to sparc.sa. No pool reset ROLLBACK after a block's own COMMIT or
ROLLBACK (resets), what a forked child must not touch (fork), and the one
shared SQLite connection that survives interruptions, with the cursors
of interrupted statements closed (keep).

These modules know nothing of sessions or blocks: they import nothing of
:mod:`sparc.sa.tx`, and ``tests/test_layout.py`` checks it.
"""
