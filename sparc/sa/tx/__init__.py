"""The transaction core: what a block is and how it ends.

Private to sparc.sa: applications use :mod:`sparc.sa.orm` and
:mod:`sparc.sa.aio`, which build on these modules. The scope (a session per
thread, task or greenlet), the gate (one shared connection, in turns), the
block's state machine, the steps on a session, joined mode and the data
manager, the retry policy, and the read-only blocks.

The core imports :mod:`sparc.sa.connections`, :mod:`sparc.sa.exceptions` and
:mod:`sparc.sa.interfaces`, and no feature module (replicas, query,
pyramid...): ``tests/test_layout.py`` checks it.
"""
