"""ZCML directives (placeholder, completed below)."""

from zope.interface import Interface


class IEngineDirective(Interface):
    pass


class ITransactionDirective(Interface):
    pass


def engine(_context, **kw):  # type: ignore[no-untyped-def]
    raise NotImplementedError


def transaction(_context, **kw):  # type: ignore[no-untyped-def]
    raise NotImplementedError
