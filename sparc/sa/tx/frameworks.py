"""Which framework began the transaction a block joined, to name it in messages.

A message that tells a Pyramid developer what "the Zope request" will do is
no help; :func:`framework_in_use` says who owns the current transaction of
the ``transaction`` package, as the thread sees it now:

* ``"pyramid_tm"``: a Pyramid request that pyramid_tm is running
  (``request.environ['tm.active']``);
* ``"zope"``: a Zope request (``zope.globalrequest`` holds one);
* ``"transaction"``: anything else, the application's own
  ``transaction.begin()``, ``with transaction.manager:``, ``attempts()`` or
  a ``TransactionManager`` of its own.

Nothing is imported here: a framework that is not loaded is not in use.
"""

from __future__ import annotations

import sys
from typing import Any, Final, Literal

__all__ = ["commit_refusal", "framework_in_use", "owner_phrase"]

Framework = Literal["pyramid_tm", "zope", "transaction"]

#: Who commits, and when, in each case: (the owner, when its work commits).
_OWNERS: Final[dict[str, tuple[str, str]]] = {
    "pyramid_tm": (
        "pyramid_tm, for this Pyramid request (request.tm)",
        "when the request does (pyramid_tm commits after the view returns; "
        "request.tm.doom() makes it abort instead)",
    ),
    "zope": (
        "the Zope publisher, for this Zope request",
        "when the request does (transaction.doom() makes it abort instead)",
    ),
    "transaction": (
        "the code that began it (transaction.begin(), `with transaction.manager:`, "
        "attempts() or a TransactionManager of its own)",
        "when that code commits it (transaction.commit(), or the end of its `with` block)",
    ),
}


def _pyramid_tm_request() -> bool:
    threadlocal: Any = sys.modules.get("pyramid.threadlocal")
    if threadlocal is None:
        return False
    request = threadlocal.get_current_request()
    environ = getattr(request, "environ", None)
    return isinstance(environ, dict) and bool(environ.get("tm.active"))


def _zope_request() -> bool:
    globalrequest: Any = sys.modules.get("zope.globalrequest")
    return globalrequest is not None and globalrequest.getRequest() is not None


def framework_in_use() -> Framework:
    """``"pyramid_tm"``, ``"zope"`` or ``"transaction"``: who owns the
    current thread's transaction (see the module's docstring)."""
    if _pyramid_tm_request():
        return "pyramid_tm"
    if _zope_request():
        return "zope"
    return "transaction"


def owner_phrase(framework: str | None = None) -> str:
    """Who commits the transaction, in words: ``"pyramid_tm, for this
    Pyramid request (request.tm)"`` ..."""
    return _OWNERS[framework or framework_in_use()][0]


def commit_refusal(framework: str | None = None) -> str:
    """The message of the refused ``session.commit()`` in a joined
    transaction, naming the framework in use."""
    owner, when = _OWNERS[framework or framework_in_use()]
    return (
        "this session belongs to a transaction of the `transaction` package "
        f"owned by {owner}, which commits it: do not call session.commit(); end the "
        f"`with tx():` block, and its work commits {when}"
    )
