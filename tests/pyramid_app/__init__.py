"""A Pyramid app as pyramid-cookiecutter-starter's sqlalchemy variant makes it
(pyramid_tm, pyramid_retry, a request-bound transaction), in two wirings:

* ``wiring="sparc"``: the README's lookup, ``getMultiAdapter((engine, Base),
  ISAScopedTransaction)``, and ``with tx():`` blocks in the views; nothing
  else is configured for sparc.sa (auto mode joins ``request.tm``).
* ``wiring="zsa"``: the cookiecutter's own ``models/__init__.py`` wiring, a
  session per request registered with ``zope.sqlalchemy.register(session,
  transaction_manager=request.tm)``; the reference.

The views are the same five in both, each writing one ``Item`` row:

=============  =============================================================
``/write``     a write
``/fail``      a write, then an exception (the request aborts)
``/transient`` a write, then a TransientError on the first attempt only
``/serialize`` a write that meets a real serialization failure (SQLSTATE
               40001) on the first attempt: between the view's read and its
               write, another connection updates and commits the row it read
``/always``    a write, then a TransientError on every attempt
``/doom``      a write, then ``request.tm.doom()``, and the view returns
=============  =============================================================

``included_main(settings, models=..., lookup=...)`` is the cookiecutter app
migrated to ``config.include("sparc.sa")``: the engine comes from the
``sqlalchemy.`` settings, and views reach the manager as ``request.tx``
(``lookup="request"``) or, after ``config.hook_zca()``, with
zope.component's plain ``getMultiAdapter`` (``lookup="hook_zca"``).

``main(engine=..., wiring=..., manager=...)`` builds the WSGI app;
``manager="explicit"`` sets the cookiecutter's ``tm.manager_hook =
pyramid_tm.explicit_manager``, ``manager="default"`` leaves pyramid_tm's
default (the thread's ``transaction.manager``).
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from transaction.interfaces import TransientError
from zope.component import getMultiAdapter
from zope.configuration import xmlconfig

from sparc.sa.interfaces import ISAScopedTransaction

__all__ = ["LOOKUPS", "WIRINGS", "ViewFailure", "included_main", "main", "make_models"]

WIRINGS = ("sparc", "zsa")
MANAGERS = ("explicit", "default")
LOOKUPS = ("request", "hook_zca")


class ViewFailure(Exception):
    """What ``/fail`` raises after its write."""


def make_models() -> SimpleNamespace:
    """A Base with ``Item`` (one row per successful write) and ``Counter``
    (the row ``/serialize`` reads and updates), in uniquely named tables:
    test runs share the server databases."""

    class Base(DeclarativeBase):
        pass

    token = uuid.uuid4().hex[:10]

    class Item(Base):
        __tablename__ = f"pyr_item_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
        name: Mapped[str] = mapped_column(sa.String(50))

    class Counter(Base):
        __tablename__ = f"pyr_counter_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        value: Mapped[int] = mapped_column(default=0)

    return SimpleNamespace(Base=Base, Item=Item, Counter=Counter, token=token)


def _first_attempt(request: Request) -> bool:
    return request.environ.get("retry.attempt", 0) == 0


def _interfere(engine: Engine, models: SimpleNamespace) -> None:
    """Another transaction updates and commits the counter the request read."""
    counter = models.Counter.__table__
    with engine.connect() as conn:
        conn.execute(sa.update(counter).where(counter.c.id == 1).values(value=counter.c.value + 1))
        conn.commit()


def _serialize_steps(
    request: Request, session: Session, engine: Engine, models: SimpleNamespace
) -> None:
    """Read the counter, let another transaction change it on the first
    attempt, then write: under SERIALIZABLE the UPDATE fails with 40001."""
    counter = models.Counter.__table__
    session.execute(sa.select(counter.c.value).where(counter.c.id == 1)).scalar_one()
    if _first_attempt(request):
        _interfere(engine, models)
    session.add(models.Item(name="serialize"))
    session.execute(sa.update(counter).where(counter.c.id == 1).values(value=counter.c.value + 1))


# -- the sparc.sa views --------------------------------------------------------------


def _tx(request: Request) -> Any:
    # The README's lookup: the engine and Base are all the view needs.
    return getMultiAdapter(
        (request.registry["dbengine"], request.registry["models"].Base), ISAScopedTransaction
    )


def _sparc_write(request: Request, name: str) -> None:
    tx = _tx(request)
    with tx():
        tx.session.add(request.registry["models"].Item(name=name))


def sparc_write(request: Request) -> Response:
    _sparc_write(request, "write")
    return Response("ok")


def sparc_fail(request: Request) -> Response:
    _sparc_write(request, "fail")
    raise ViewFailure("the view failed after its write")


def sparc_transient(request: Request) -> Response:
    _sparc_write(request, "transient")
    if _first_attempt(request):
        raise TransientError("try again")
    return Response("ok")


def sparc_serialize(request: Request) -> Response:
    tx = _tx(request)
    with tx():
        _serialize_steps(
            request, tx.session, request.registry["dbengine"], request.registry["models"]
        )
    return Response("ok")


def sparc_always(request: Request) -> Response:
    _sparc_write(request, "always")
    raise TransientError("never works")


def sparc_doom(request: Request) -> Response:
    _sparc_write(request, "doom")
    request.tm.doom()
    return Response("ok")


# -- the zope.sqlalchemy views (the cookiecutter's wiring) ------------------------------


def _zsa_write(request: Request, name: str) -> None:
    request.dbsession.add(request.registry["models"].Item(name=name))
    request.dbsession.flush()


def zsa_write(request: Request) -> Response:
    _zsa_write(request, "write")
    return Response("ok")


def zsa_fail(request: Request) -> Response:
    _zsa_write(request, "fail")
    raise ViewFailure("the view failed after its write")


def zsa_transient(request: Request) -> Response:
    _zsa_write(request, "transient")
    if _first_attempt(request):
        raise TransientError("try again")
    return Response("ok")


def zsa_serialize(request: Request) -> Response:
    _serialize_steps(
        request, request.dbsession, request.registry["dbengine"], request.registry["models"]
    )
    request.dbsession.flush()
    return Response("ok")


def zsa_always(request: Request) -> Response:
    _zsa_write(request, "always")
    raise TransientError("never works")


def zsa_doom(request: Request) -> Response:
    _zsa_write(request, "doom")
    request.tm.doom()
    return Response("ok")


VIEWS = ("write", "fail", "transient", "serialize", "always", "doom")


def _include_zsa(config: Configurator, engine: Engine) -> None:
    """The cookiecutter's models/__init__.py: a session factory, and a
    request-bound session registered with ``request.tm``."""
    import zope.sqlalchemy

    factory = sessionmaker(bind=engine)

    def dbsession(request: Request) -> Session:
        session = factory(info={"request": request})
        zope.sqlalchemy.register(session, transaction_manager=request.tm)
        return session

    config.add_request_method(dbsession, reify=True)


def main(
    *, engine: Engine, models: SimpleNamespace, wiring: str, manager: str, attempts: int = 3
) -> Any:
    """The WSGI app; *attempts* is pyramid_retry's ``retry.attempts``."""
    if wiring not in WIRINGS:
        raise ValueError(f"wiring must be one of {WIRINGS}, got {wiring!r}")
    if manager not in MANAGERS:
        raise ValueError(f"manager must be one of {MANAGERS}, got {manager!r}")
    settings: dict[str, Any] = {"retry.attempts": attempts}
    if manager == "explicit":
        settings["tm.manager_hook"] = "pyramid_tm.explicit_manager"
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include("pyramid_retry")
        config.registry["dbengine"] = engine
        config.registry["models"] = models
        if wiring == "zsa":
            _include_zsa(config, engine)
        else:
            # sparc.sa's adapters, as a site loads them (a Pyramid app may
            # equally call zope.component.provideAdapter(scoped_transaction)).
            import sparc.sa

            xmlconfig.file("configure.zcml", package=sparc.sa)
        views = globals()
        for name in VIEWS:
            config.add_route(name, f"/{name}")
            config.add_view(views[f"{wiring}_{name}"], route_name=name)
        return config.make_wsgi_app()


# -- the cookiecutter app migrated: config.include("sparc.sa") ---------------------


def _included_tx(request: Request) -> Any:
    if request.registry["lookup"] == "request":
        return request.tx
    # After config.hook_zca(), zope.component's lookups use the request's
    # registry: the README's lookup works unchanged.
    from zope.component import getUtility

    from sparc.sa.interfaces import ISAEngine

    return getMultiAdapter(
        (getUtility(ISAEngine), request.registry["models"].Base), ISAScopedTransaction
    )


def _included_write(request: Request, name: str) -> None:
    tx = _included_tx(request)
    with tx():
        tx.session.add(request.registry["models"].Item(name=name))


def included_write(request: Request) -> Response:
    _included_write(request, "write")
    return Response("ok")


def included_fail(request: Request) -> Response:
    _included_write(request, "fail")
    raise ViewFailure("the view failed after its write")


def included_transient(request: Request) -> Response:
    _included_write(request, "transient")
    if _first_attempt(request):
        raise TransientError("try again")
    return Response("ok")


def included_serialize(request: Request) -> Response:
    tx = _included_tx(request)
    with tx():
        _serialize_steps(request, tx.session, tx.engine, request.registry["models"])
    return Response("ok")


def included_always(request: Request) -> Response:
    _included_write(request, "always")
    raise TransientError("never works")


def included_doom(request: Request) -> Response:
    _included_write(request, "doom")
    request.tm.doom()
    return Response("ok")


def included_main(
    settings: dict[str, Any], *, models: SimpleNamespace, lookup: str, attempts: int = 3
) -> Any:
    """The cookiecutter's ``main()`` and ``models/__init__.py`` ``includeme``,
    migrated: *settings* hold ``sqlalchemy.url`` and the engine options."""
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    settings = dict(settings)
    settings["tm.manager_hook"] = "pyramid_tm.explicit_manager"
    settings["retry.attempts"] = attempts
    settings["sparc.sa.base"] = models.Base
    with Configurator(settings=settings) as config:
        if lookup == "hook_zca":
            config.hook_zca()
        config.include("pyramid_tm")
        config.include("pyramid_retry")
        config.include("sparc.sa")
        config.registry["models"] = models
        config.registry["lookup"] = lookup
        views = globals()
        for name in VIEWS:
            config.add_route(name, f"/{name}")
            config.add_view(views[f"included_{name}"], route_name=name)
        return config.make_wsgi_app()
