"""Pyramid: ``config.include("sparc.sa")``.

In the application's ``main()`` (or the cookiecutter's ``models/__init__.py``
``includeme``)::

    config.include("pyramid_tm")
    config.include("sparc.sa")

does three things:

* builds the engine from the settings whose keys start with ``sqlalchemy.``
  (``sqlalchemy.url`` and any create_engine() option, text values converted
  as :func:`sparc.sa.engine.engine_from_config` converts them), and
  registers it as the application registry's unnamed ``ISAEngine`` utility
  (``ISAAsyncEngine`` for an asyncio driver). No ``sqlalchemy.`` setting,
  no engine: register your own;
* registers sparc.sa's factory and adapters in the application's registry,
  as ``<include package="sparc.sa" />`` does in a Zope site
  (:mod:`sparc.sa.components`). ``request.registry.getMultiAdapter((engine,
  Base), ISAScopedTransaction)`` finds the manager; so does
  ``zope.component.getMultiAdapter(...)`` inside requests after
  ``config.hook_zca()``, or with ``context=request.registry``;
* adds ``request.tx``, the transaction manager of that engine and of the
  declarative base named by the ``sparc.sa.base`` setting (a dotted name,
  or the class itself). :func:`request_transaction` gives the manager of
  any other base.

Under pyramid_tm, blocks join the request's transaction (``request.tm``),
which commits or aborts them with the request; see docs/pyramid.rst.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparc.sa import components, mismatch
from sparc.sa.engine import DEFAULT_PREFIX, engine_from_config
from sparc.sa.interfaces import (
    ISAAsyncEngine,
    ISAAsyncScopedTransaction,
    ISAEngine,
    ISAScopedTransaction,
)

if TYPE_CHECKING:
    from pyramid.config import Configurator
    from pyramid.request import Request

__all__ = [
    "BASE_SETTING",
    "ENGINE_SETTING",
    "PREFIX_SETTING",
    "get_engine",
    "includeme",
    "request_transaction",
]

#: The setting naming the declarative base of ``request.tx``.
BASE_SETTING = "sparc.sa.base"
#: The setting that changes the engine settings' prefix from ``sqlalchemy.``.
PREFIX_SETTING = "sparc.sa.prefix"
#: The setting that hands over an engine made elsewhere (a test fixture's,
#: as the cookiecutter's ``dbengine`` setting does): no engine is built.
ENGINE_SETTING = "sparc.sa.engine"


def includeme(config: Configurator) -> None:
    """``config.include("sparc.sa")``: the engine, the components, ``request.tx``."""
    settings = config.get_settings() or {}
    registry = config.registry
    components.register(registry)
    # A bare getMultiAdapter() without hook_zca looks in zope.component's
    # global registry: let it say where the adapters are.
    mismatch.note_pyramid_registry()
    mismatch.install_hints()
    prefix = settings.get(PREFIX_SETTING, DEFAULT_PREFIX)
    engine = settings.get(ENGINE_SETTING)
    if engine is None and any(isinstance(key, str) and key.startswith(prefix) for key in settings):
        engine = engine_from_config(settings, prefix)
    if engine is not None:
        if not (ISAEngine.providedBy(engine) or ISAAsyncEngine.providedBy(engine)):
            raise TypeError(
                f"setting {ENGINE_SETTING!r} must be an engine (sqlalchemy.engine.Engine "
                f"or AsyncEngine), got {type(engine).__name__}"
            )
        kind = ISAAsyncEngine if hasattr(engine, "sync_engine") else ISAEngine
        registry.registerUtility(engine, kind)
    base = settings.get(BASE_SETTING)
    if base is not None:
        registry[BASE_SETTING] = config.maybe_dotted(base)
    config.add_request_method(_tx, "tx", reify=True)


def get_engine(registry: Any) -> Any:
    """The engine ``config.include("sparc.sa")`` registered in *registry*."""
    engine = registry.queryUtility(ISAEngine)
    if engine is None:
        engine = registry.queryUtility(ISAAsyncEngine)
    if engine is None:
        raise LookupError(
            "no engine is registered in this Pyramid application's registry: set "
            f"'{DEFAULT_PREFIX}url' (and any '{DEFAULT_PREFIX}' create_engine() options) "
            'in the settings before config.include("sparc.sa"), or register one with '
            "config.registry.registerUtility(engine, ISAEngine)"
        )
    return engine


def request_transaction(request: Request, base: type[Any]) -> Any:
    """The transaction manager of the application's engine and *base*,
    looked up in the request's registry (no ``hook_zca()`` needed)."""
    engine = get_engine(request.registry)
    interface = (
        ISAAsyncScopedTransaction if hasattr(engine, "sync_engine") else ISAScopedTransaction
    )
    return request.registry.getMultiAdapter((engine, base), interface)


def _tx(request: Request) -> Any:
    try:
        base = request.registry[BASE_SETTING]
    except KeyError:
        raise LookupError(
            f"request.tx needs the declarative base: set {BASE_SETTING!r} "
            "(e.g. 'myapp.models.meta.Base') in the settings before "
            'config.include("sparc.sa"), or call '
            "sparc.sa.pyramid.request_transaction(request, Base)"
        ) from None
    return request_transaction(request, base)
