"""Which transactions of the ``transaction`` package the application began.

In implicit mode (the thread's ``transaction.manager`` by default) a
transaction exists as soon as anything calls ``transaction.get()``: opening a
ZODB connection does, and so does ``transaction.commit()`` followed by any
``get()``. Nobody promises to commit such a transaction. A transaction that
``begin()`` started (``with transaction.manager:``, ``attempts()``, Zope's
publisher, pyramid_tm) has an owner that commits or aborts it.

``join="auto"`` joins only the second kind. The ``transaction`` package tells
its synchronizers about every ``begin()`` (``ISynchronizer.newTransaction``)
and about nothing that ``get()`` creates, so a synchronizer registered on a
thread's manager tells the two apart from then on. It is registered when
sparc.sa is imported (for the importing thread) and by the first block of
every other thread. A transaction that already existed when the synchronizer
arrived on its manager is *unknown*: it is treated as begun, because a thread
whose first sparc.sa block runs inside ``with transaction.manager:`` is far
more common than one that strands a block in a transaction nobody commits;
that rare case still gets a warning (:func:`warn_unended`).

Only public API of the ``transaction`` package is used here:
``registerSynch()`` and the synchronizer protocol.
"""

from __future__ import annotations

import atexit
import logging
import threading
import warnings
import weakref
from typing import Any, Final

from sparc.sa.foreign import of_transaction

__all__ = [
    "BEGUN",
    "NOT_BEGUN",
    "UNKNOWN",
    "began",
    "note_open",
    "warn_left",
    "warn_unended",
    "watch",
    "watching",
]

logger = logging.getLogger("sparc.sa.begun")  # its name before the move

#: What :func:`began` answers.
BEGUN: Final = "begun"
NOT_BEGUN: Final = "not begun"
UNKNOWN: Final = "unknown"


class _Watcher:
    """An ``ISynchronizer`` that notes the transactions ``begin()`` starts."""

    __slots__ = ("__weakref__",)

    def newTransaction(self, txn: Any) -> None:
        if getattr(_registering, "on", False):
            _unknown.add(txn)  # existed before we watched: registerSynch() reports it
        else:
            _begun.add(txn)

    def beforeCompletion(self, txn: Any) -> None:
        pass

    def afterCompletion(self, txn: Any) -> None:
        pass


# Managers hold their synchronizers weakly: this one lives as long as the module.
_WATCHER: Final = _Watcher()
_begun: weakref.WeakSet[Any] = weakref.WeakSet()
_unknown: weakref.WeakSet[Any] = weakref.WeakSet()
_watched: weakref.WeakSet[Any] = weakref.WeakSet()
_registering = threading.local()


def watch(manager: Any) -> None:
    """Watch *manager* (a ``TransactionManager``, or the thread-local
    ``transaction.manager``, whose current thread's manager is watched) for
    the transactions it begins. Cheap when it is watched already."""
    inner = getattr(manager, "manager", manager)
    if inner in _watched:
        return
    register = getattr(inner, "registerSynch", None)
    if register is None:
        return  # not a manager of the `transaction` package: nothing to watch
    _watched.add(inner)
    _registering.on = True
    try:
        register(_WATCHER)
    finally:
        _registering.on = False


def watching(manager: Any) -> bool:
    """Whether *manager*'s begins are noted."""
    return getattr(manager, "manager", manager) in _watched


def began(txn: Any, manager: Any) -> str:
    """:data:`BEGUN` if *txn* was started by ``begin()`` while *manager* (its
    manager, which :func:`watch` was given) was watched, :data:`UNKNOWN` if
    it existed before, else :data:`NOT_BEGUN` (it exists because something
    called ``get()``)."""
    if txn in _begun:
        return BEGUN
    if txn in _unknown:
        return UNKNOWN
    # Test layers and ZODB call clearSynchs(), which drops our synchronizer
    # too: begins since then went unseen. Checked only on this rare path;
    # TransactionManager has no public way to ask for one (DEVELOPERS.md,
    # other packages' private names).
    synchs = of_transaction.synchronizers(manager)
    if synchs is not None and _WATCHER not in synchs:
        _watched.discard(manager)
        watch(manager)
        return UNKNOWN
    return NOT_BEGUN


# -- joined work that nobody committed -------------------------------------------------

# The data managers of joined transactions that have not ended yet.
_open: weakref.WeakSet[Any] = weakref.WeakSet()


def note_open(data_manager: Any) -> None:
    """Remember a data manager until its transaction ends, so that one left
    running at exit is reported (:func:`warn_unended`)."""
    _open.add(data_manager)


UNENDED: Final = (
    "%d sparc.sa block(s) joined a transaction of the `transaction` package "
    "that never ended (%s): their work was not committed. Commit that "
    "transaction (transaction.commit()), open it with `with transaction.manager:`, "
    "or give the manager join='never' so that its blocks commit by themselves"
)


def warn_unended() -> None:
    """At exit: warn about joined work whose transaction never ended."""
    pending = [dm for dm in list(_open) if dm.may_lose_work()]
    if not pending:
        return
    where = ", ".join(sorted({repr(dm.txn) for dm in pending})[:3])
    message = UNENDED % (len(pending), where)
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=1)


def warn_left(data_manager: Any) -> None:
    """A thread ended while its work belonged to *data_manager*'s transaction,
    which has not ended: with the thread's manager gone, most likely nothing
    will commit it."""
    message = (
        "a thread ended while its sparc.sa blocks belonged to a transaction of "
        f"the `transaction` package that had not ended ({data_manager.txn!r}): "
        "unless another thread commits it, their work is lost. Commit or abort "
        "the transaction before the thread ends"
    )
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=1)


atexit.register(warn_unended)

try:  # watch the importing thread's manager before anything calls get()
    import transaction as _transaction
except ImportError:  # pragma: no cover - joined mode is never entered without it
    pass
else:
    watch(_transaction.manager)
