"""Other packages' private names, each reached from one module here.

sparc.sa relies on a few names that ``transaction``, SQLAlchemy (with the
drivers under it), asyncio and zope.configuration do not make public. Each
is reached only from the module here named for its package, which imports
nothing of sparc.sa, so that every layer may use it.
``tests/test_foreign.py`` pins each name on every supported version, and
``tests/test_layout.py`` fails when one is reached from anywhere else;
docs/developers.rst lists them with the reason for each.
"""
