"""The ``transaction`` package's private names that sparc.sa relies on
(see the package). This module does not import ``transaction``: sparc.sa
works without it."""

from __future__ import annotations

from typing import Any, Final

__all__ = ["ENDING_HOOKS", "RUNNING", "ending_hooks_pending", "running", "synchronizers"]

#: The attribute of a ``TransactionManager`` that holds its running
#: transaction, or None: ``get()`` would begin one in implicit mode. A name,
#: read as ``manager.__dict__.get(RUNNING)``, since a block reads it inline.
RUNNING: Final = "_txn"

#: The methods of ``Transaction`` that run its after-commit and after-abort
#: hooks; a block looks for them up the stack (sparc.sa.tx.joined).
ENDING_HOOKS: Final = frozenset({"_callAfterCommitHooks", "_callAfterAbortHooks"})


def running(manager: Any) -> Any:
    """*manager*'s running transaction, or None; never begins one."""
    return getattr(manager, RUNNING, None)


def ending_hooks_pending(txn: Any) -> bool:
    """Whether *txn* holds after-commit or after-abort hooks that have not
    run yet: ``Transaction`` keeps them in ``_after_commit`` and
    ``_after_abort`` until they have all run, then empties both."""
    return bool(getattr(txn, "_after_commit", True) or getattr(txn, "_after_abort", True))


def synchronizers(manager: Any) -> Any:
    """*manager*'s registered synchronizers (a WeakSet), or None for a
    manager that keeps none."""
    return getattr(manager, "_synchs", None)
