"""sparc.sa: SQLAlchemy engines and scoped transactions as Zope components.

Include the package in a site's ZCML (``<include package="sparc.sa" />``),
then::

    engine = component.createObject('sparc.sa.engine.engine_from_config',
                                    {'dsn': 'sqlite://'})
    transaction = component.getMultiAdapter((engine, Base), ISAScopedTransaction)
    with transaction():
        transaction.session.add(obj)
"""

from sparc.sa import legacy
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
    "ThreadLocalSASessionTransaction",
    "configure_transaction",
    "engine_from_config",
    "is_retryable",
    "scoped_transaction",
]

# sparc.sa 1.x's module paths (sparc.sa.orm.query, sparc.sa.engine.engine, ...)
legacy.install()
