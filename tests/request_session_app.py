"""A Pyramid app as pyramid-cookiecutter-starter makes it, migrated to
``config.include("sparc.sa")``, whose views write through
``request.dbsession`` with no ``with tx():`` block, as the cookiecutter's
views do: for tests/test_request_session.py.

``request.dbsession`` is the manager's session (``request.tx.session``),
reified per request as the cookiecutter's ``dbsession`` request method is.
Used outside any block during a request that pyramid_tm manages, that
session goes with the request's transaction.

=================  ==========================================================
``/write``         ``request.dbsession.add(...)``, then 200
``/fail``          an add and a flush, then an exception (the request aborts);
                   ``?pending=1``: the add stays pending, unflushed
``/handled``       an add, then an exception that an exception view renders
                   (500); that view adds a row too
``/doom``          an add, then ``request.tm.doom()``, then 200
``/transient``     an add, then a TransientError on the first attempt only
``/serialize``     a read, another connection's committed update of the row
                   read (first attempt only), then an add and an UPDATE: a
                   real serialization failure (SQLSTATE 40001) on
                   PostgreSQL SERIALIZABLE
``/read``          a read-only view: counts the rows
``/mixed``         an add outside any block, then a block that adds a row and
                   raises; the view catches the error and returns 200
``/duplicate``     an add, and an add of a row whose primary key exists,
                   unflushed: the flush at the request's commit fails
``/late``          a finished callback that adds a row through
                   ``request.dbsession`` after pyramid_tm ended the request's
                   transaction (``?flush=1``: and flushes)
``/block``         a view with a block: ``with request.tx():`` adds a
                   row named ``block``
=================  ==========================================================

Every response carries ``X-Worker``, the id of the thread that served it.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from pyramid.config import Configurator
from pyramid.events import NewResponse
from pyramid.request import Request
from pyramid.response import Response
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from transaction.interfaces import TransientError

__all__ = ["MANAGERS", "VIEWS", "HandledFailure", "ViewFailure", "main"]

MANAGERS = ("explicit", "default")
VIEWS = (
    "write",
    "fail",
    "handled",
    "doom",
    "transient",
    "serialize",
    "read",
    "mixed",
    "duplicate",
    "late",
    "block",
)


class ViewFailure(Exception):
    """What ``/fail`` raises after its write."""


class HandledFailure(Exception):
    """What ``/handled`` raises after its write; an exception view renders it."""


def _first_attempt(request: Request) -> bool:
    return request.environ.get("retry.attempt", 0) == 0


def _models(request: Request) -> SimpleNamespace:
    return request.registry["models"]  # type: ignore[no-any-return]


def _add(request: Request, name: str) -> None:
    request.dbsession.add(_models(request).Item(name=name))


def write(request: Request) -> Response:
    _add(request, "write")
    return Response("ok")


def fail(request: Request) -> Response:
    _add(request, "fail")
    if "pending" not in request.params:
        request.dbsession.flush()  # the INSERT reaches the database, then the view fails
    raise ViewFailure("the view failed after its write")


def handled(request: Request) -> Response:
    _add(request, "handled")
    raise HandledFailure("an exception view renders this one")


def error_page(exc: HandledFailure, request: Request) -> Response:
    # An error page that writes too, as one that logs errors in a table
    # does: pyramid_tm aborts the request all the same.
    _add(request, "error-page")
    return Response("error", status=500)


def doom(request: Request) -> Response:
    _add(request, "doom")
    request.tm.doom()
    return Response("ok")


def transient(request: Request) -> Response:
    _add(request, "transient")
    if _first_attempt(request):
        raise TransientError("try again")
    return Response("ok")


def serialize(request: Request) -> Response:
    session: Session = request.dbsession
    models = _models(request)
    counter = models.Counter.__table__
    session.execute(sa.select(counter.c.value).where(counter.c.id == 1)).scalar_one()
    if _first_attempt(request):
        engine: Engine = request.tx.engine
        with engine.connect() as conn:  # another transaction changes what was read
            conn.execute(
                sa.update(counter).where(counter.c.id == 1).values(value=counter.c.value + 1)
            )
            conn.commit()
    session.add(models.Item(name="serialize"))
    session.execute(sa.update(counter).where(counter.c.id == 1).values(value=counter.c.value + 1))
    return Response("ok")


def read(request: Request) -> Response:
    item = _models(request).Item
    count = request.dbsession.execute(sa.select(sa.func.count()).select_from(item)).scalar_one()
    return Response(str(count))


def mixed(request: Request) -> Response:
    _add(request, "outside")
    tx = request.tx
    try:
        with tx():
            tx.session.add(_models(request).Item(name="inner"))
            raise ViewFailure("the block fails; the view goes on")
    except ViewFailure:
        pass
    return Response("ok")


def duplicate(request: Request) -> Response:
    _add(request, "duplicate")
    # The counter's row exists: the INSERT fails when pyramid_tm commits.
    request.dbsession.add(_models(request).Counter(id=1, value=0))
    return Response("ok")


def late(request: Request) -> Response:
    def write_late(request: Request) -> None:
        # After pyramid_tm ended the request's transaction.
        _add(request, "late")
        if "flush" in request.params:
            request.dbsession.flush()

    request.add_finished_callback(write_late)
    return Response("ok")


def block(request: Request) -> Response:
    tx = request.tx
    with tx():
        tx.session.add(_models(request).Item(name="block"))
    return Response("ok")


def _dbsession(request: Request) -> Session:
    # The cookiecutter's request.dbsession, reified: the manager's session.
    return request.tx.session  # type: ignore[no-any-return]


def _note_worker(event: NewResponse) -> None:
    event.response.headers["X-Worker"] = str(threading.get_ident())


def main(*, engine: Engine, models: SimpleNamespace, manager: str, attempts: int = 3) -> Any:
    """The WSGI app on *engine* (handed over as the cookiecutter's tests hand
    over ``dbengine``), with pyramid_tm's *manager* (``"explicit"``: the
    cookiecutter's ``tm.manager_hook = pyramid_tm.explicit_manager``;
    ``"default"``: the thread's ``transaction.manager``) and pyramid_retry's
    *attempts*."""
    if manager not in MANAGERS:
        raise ValueError(f"manager must be one of {MANAGERS}, got {manager!r}")
    settings: dict[str, Any] = {
        "retry.attempts": attempts,
        "sparc.sa.engine": engine,
        "sparc.sa.base": models.Base,
    }
    if manager == "explicit":
        settings["tm.manager_hook"] = "pyramid_tm.explicit_manager"
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include("pyramid_retry")
        config.include("sparc.sa")
        config.add_request_method(_dbsession, "dbsession", reify=True)
        config.add_subscriber(_note_worker, NewResponse)
        config.add_exception_view(error_page, HandledFailure)
        config.registry["models"] = models
        views = globals()
        for name in VIEWS:
            config.add_route(name, f"/{name}")
            config.add_view(views[name], route_name=name)
        return config.make_wsgi_app()
