"""sparc.sa: SQLAlchemy engines and scoped transactions as Zope components.

Include the package in a site's ZCML (``<include package="sparc.sa" />``),
then::

    engine = component.createObject('sparc.sa.engine.engine_from_config',
                                    {'dsn': 'sqlite://'})
    transaction = component.getMultiAdapter((engine, Base), ISAScopedTransaction)
    with transaction():
        transaction.session.add(obj)
"""

# sparc.sa 1.x's module paths (sparc.sa.orm.query, sparc.sa.engine.engine, ...),
# before anything else: a thread may import one while this module still runs.
from sparc.sa import legacy

legacy.install()

# The public names below are imported on first use (PEP 562), not here. A
# package whose __init__ imports its submodules deadlocks with a thread that
# imports one of them meanwhile: each holds the lock the other waits for, and
# Python breaks the tie by handing one of them a half-initialised module
# ("cannot import name ... from partially initialized module"). This module
# imports nothing but the stdlib-only legacy finder, so it never waits for one.
import importlib as _importlib  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    from sparc.sa.engine import SAEngineFromConfigFactory, engine_from_config
    from sparc.sa.events import EngineCreatedEvent
    from sparc.sa.exceptions import (
        AbortedTransactionError,
        DoomedTransactionError,
        ForkedTransactionError,
        InterleavedTransactionError,
    )
    from sparc.sa.interfaces import (
        IEngineCreatedEvent,
        ISADeclarativeMeta,
        ISAEngine,
        ISAScopedSession,
        ISAScopedTransaction,
        ISASession,
    )
    from sparc.sa.orm import (
        ScopedTransaction,
        ThreadLocalSASessionTransaction,
        configure_transaction,
        is_retryable,
        scoped_transaction,
    )

__all__ = [
    "AbortedTransactionError",
    "DoomedTransactionError",
    "EngineCreatedEvent",
    "ForkedTransactionError",
    "IEngineCreatedEvent",
    "ISADeclarativeMeta",
    "ISAEngine",
    "ISAScopedSession",
    "ISAScopedTransaction",
    "ISASession",
    "InterleavedTransactionError",
    "SAEngineFromConfigFactory",
    "ScopedTransaction",
    "ThreadLocalSASessionTransaction",
    "configure_transaction",
    "engine_from_config",
    "is_retryable",
    "scoped_transaction",
]

_HOMES = {
    "AbortedTransactionError": "sparc.sa.exceptions",
    "DoomedTransactionError": "sparc.sa.exceptions",
    "EngineCreatedEvent": "sparc.sa.events",
    "ForkedTransactionError": "sparc.sa.exceptions",
    "IEngineCreatedEvent": "sparc.sa.interfaces",
    "ISADeclarativeMeta": "sparc.sa.interfaces",
    "ISAEngine": "sparc.sa.interfaces",
    "ISAScopedSession": "sparc.sa.interfaces",
    "ISAScopedTransaction": "sparc.sa.interfaces",
    "ISASession": "sparc.sa.interfaces",
    "InterleavedTransactionError": "sparc.sa.exceptions",
    "SAEngineFromConfigFactory": "sparc.sa.engine",
    "ScopedTransaction": "sparc.sa.orm",
    "ThreadLocalSASessionTransaction": "sparc.sa.orm",
    "configure_transaction": "sparc.sa.orm",
    "engine_from_config": "sparc.sa.engine",
    "is_retryable": "sparc.sa.orm",
    "scoped_transaction": "sparc.sa.orm",
}


def includeme(config: Any) -> None:
    """``config.include("sparc.sa")`` in a Pyramid application; see
    :mod:`sparc.sa.pyramid` (imported here, not at ``import sparc.sa``)."""
    _importlib.import_module("sparc.sa.pyramid").includeme(config)


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``sparc.sa.orm`` after ``import sparc.sa``)."""
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(_importlib.import_module(home), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and legacy.is_submodule(name):
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
