"""Engine configuration: each create_engine() option converted from text to
the type it expects, with an error naming the key and the expected form."""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL

from sparc.sa.foreign.of_sqlalchemy import isolation_lookup, pool_class_is_asyncio

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})

_INT_OPTIONS = frozenset(
    {
        "pool_size",
        "max_overflow",
        "pool_recycle",
        "query_cache_size",
        "label_length",
        "max_identifier_length",
        "insertmanyvalues_page_size",
    }
)
_FLOAT_OPTIONS = frozenset({"pool_timeout"})
_BOOL_OPTIONS = frozenset(
    {
        "pool_pre_ping",
        "hide_parameters",
        "pool_use_lifo",
        "future",
        "implicit_returning",
        "use_insertmanyvalues",
        "enable_from_linting",
        "skip_autocommit_rollback",
    }
)
_ECHO_OPTIONS = frozenset({"echo", "echo_pool"})
_MAPPING_OPTIONS = frozenset({"connect_args", "execution_options"})
_OBJECT_OPTIONS = frozenset({"module", "creator", "json_serializer", "json_deserializer", "pool"})
_TEXT_OPTIONS = frozenset({"logging_name", "pool_logging_name", "paramstyle"})
#: Options that size or time a QueuePool; StaticPool accepts none of them.
QUEUE_POOL_OPTIONS = frozenset({"pool_size", "max_overflow", "pool_timeout", "pool_use_lifo"})

#: Every option create_engine() itself documents, for suggestions on typos.
KNOWN_OPTIONS = frozenset(
    _INT_OPTIONS
    | _FLOAT_OPTIONS
    | _BOOL_OPTIONS
    | _ECHO_OPTIONS
    | _MAPPING_OPTIONS
    | _OBJECT_OPTIONS
    | _TEXT_OPTIONS
    | {"poolclass", "isolation_level", "pool_reset_on_return", "plugins"}
)

# -- conversions --------------------------------------------------------------


#: The least value each numeric option takes (-1: "no limit" where it means that).
_MINIMUM = {
    "pool_size": 0,
    "max_overflow": -1,
    "pool_recycle": -1,
    "pool_timeout": 0,
    "query_cache_size": 0,
    "label_length": 1,
    "max_identifier_length": 1,
    "insertmanyvalues_page_size": 1,
}
#: Isolation levels any dialect may accept, besides its own (_isolation_lookup).
_ISOLATION_LEVELS = frozenset(
    {"SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"}
)


def convert_option(url: URL, name: str, value: Any) -> Any:
    """Convert one create_engine() option given as text to its real type."""
    if name in _INT_OPTIONS or name in _FLOAT_OPTIONS:
        number: float = _to_int(name, value) if name in _INT_OPTIONS else _to_float(name, value)
        least = _MINIMUM.get(name)
        if least is not None and number < least:
            meaning = " (-1 for no limit)" if least == -1 else ""
            raise ValueError(
                f"create_engine option {name!r} must be at least {least}{meaning}, got {value!r}"
            )
        return number
    if name in _BOOL_OPTIONS:
        return _to_bool(name, value)
    if name in _ECHO_OPTIONS:
        if isinstance(value, str) and value.strip().lower() == "debug":
            return "debug"
        return _to_bool(name, value, extra="or 'debug'")
    if name in _MAPPING_OPTIONS:
        return _to_mapping(name, value)
    if name == "poolclass":
        return _to_poolclass(value)
    if name in _OBJECT_OPTIONS:
        return _check_object(name, resolve(name, value) if isinstance(value, str) else value)
    if name == "isolation_level":
        return _check_isolation_level(url, _to_isolation_level(value))
    if name == "pool_reset_on_return":
        return _to_reset_on_return(value)
    if name == "plugins":
        return _to_list(name, value)
    if isinstance(value, str):
        # A dialect-specific option: its type is that of the dialect's default.
        default = _dialect_defaults(url).get(name)
        if isinstance(default, bool):
            return _to_bool(name, value)
        if isinstance(default, int):
            return _to_int(name, value)
        if isinstance(default, float):
            return _to_float(name, value)
    return value


def _to_bool(name: str, value: Any, extra: str = "") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    suffix = f" {extra}" if extra else ""
    raise ValueError(
        f"create_engine option {name!r} must be a boolean "
        f"(true/false, yes/no, on/off, 1/0){suffix}, got {value!r}"
    )


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"create_engine option {name!r} must be an integer, got {value!r}")


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"create_engine option {name!r} must be a number, got {value!r}")


def _to_mapping(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    # The value is not shown: connection arguments often hold a password.
    raise ValueError(
        f"create_engine option {name!r} must be a mapping (or a JSON object "
        f"in a string), got {type(value).__name__}"
    )


def _to_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return [str(item) for item in value]
    raise ValueError(
        f"create_engine option {name!r} must be a list or a comma-separated string, got {value!r}"
    )


def _pool_class_names() -> list[str]:
    return sorted(
        name
        for name, obj in vars(sa_pool).items()
        if isinstance(obj, type) and issubclass(obj, sa_pool.Pool) and obj is not sa_pool.Pool
    )


def _to_poolclass(value: Any) -> type[sa_pool.Pool]:
    cls = value
    if isinstance(value, str):
        text = value.strip()
        if "." in text or ":" in text:
            cls = resolve("poolclass", text)
        else:
            cls = getattr(sa_pool, text, None)
    if not (isinstance(cls, type) and issubclass(cls, sa_pool.Pool)):
        raise ValueError(
            "create_engine option 'poolclass' must be a Pool subclass, given by "
            f"name ({', '.join(_pool_class_names())}) or dotted path, got {value!r}"
        )
    return cls


def _to_isolation_level(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z _-]+", value.strip()):
        raise ValueError(
            "create_engine option 'isolation_level' must be a level name such as "
            f"'READ COMMITTED', 'SERIALIZABLE' or 'AUTOCOMMIT', got {value!r}"
        )
    return re.sub(r"[\s_-]+", " ", value.strip()).upper()


def check_pool_kind(url: URL, poolclass: Any) -> None:
    """An asyncio pool needs an asyncio driver (SQLAlchemy 2.0.0 accepts the
    mismatch and fails at first use)."""
    if poolclass is None or not pool_class_is_asyncio(poolclass):
        return
    try:
        is_async = bool(getattr(url.get_dialect(), "is_async", False))
    except Exception:  # an unknown dialect is reported by create_engine()
        return
    if not is_async:
        raise ValueError(
            f"create_engine option 'poolclass' is {poolclass.__name__}, which needs an "
            f"asyncio driver, but {url.drivername!r} is a synchronous driver; expected "
            "a pool such as QueuePool, NullPool or StaticPool"
        )


def _check_object(name: str, obj: Any) -> Any:
    """The objects create_engine() takes as they are: check what they are."""
    if name == "pool":
        if isinstance(obj, type) and issubclass(obj, sa_pool.Pool):
            raise ValueError(
                f"create_engine option 'pool' takes a Pool instance, got the class "
                f"{obj.__name__}; to choose a pool class use 'poolclass'"
            )
        if not isinstance(obj, sa_pool.Pool):
            raise ValueError(
                "create_engine option 'pool' takes a Pool instance (or the dotted "
                f"name of one), got {type(obj).__name__}"
            )
    elif name == "module":
        if isinstance(obj, type) or not (
            callable(getattr(obj, "connect", None)) and hasattr(obj, "paramstyle")
        ):
            raise ValueError(
                "create_engine option 'module' takes a DB-API module (one with a "
                "connect() function and a paramstyle), or its dotted name, got "
                f"{type(obj).__name__}"
            )
    elif not callable(obj):
        raise ValueError(
            f"create_engine option {name!r} takes a callable, or its dotted name, "
            f"got {type(obj).__name__}"
        )
    return obj


def _check_isolation_level(url: URL, level: str) -> str:
    known = set(_ISOLATION_LEVELS)
    try:
        lookup = isolation_lookup(url.get_dialect())
    except Exception:  # an unknown dialect is reported by create_engine()
        lookup = None
    if isinstance(lookup, (set, frozenset, dict)):
        known |= {str(k) for k in lookup}
    if level not in known:
        close = difflib.get_close_matches(level, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"create_engine option 'isolation_level' must be one of "
            f"{', '.join(sorted(known))}, got {level!r}{hint}"
        )
    return level


def _to_reset_on_return(value: Any) -> str | None:
    if value is None:
        return None
    word = str(value).strip().lower()
    if word in ("rollback", "commit", "none"):
        return word
    raise ValueError(
        "create_engine option 'pool_reset_on_return' must be 'rollback', "
        f"'commit' or 'none', got {value!r}"
    )


def resolve(name: str, dotted: str) -> Any:
    """Import the object named by *dotted* (``pkg.mod.attr`` or ``pkg.mod:attr``)."""
    text = dotted.strip()
    module_name, sep, attr = text.partition(":")
    if not sep:
        module_name, _, attr = text.rpartition(".")
    error = None
    if module_name and attr:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        except (ImportError, AttributeError) as exc:
            error = str(exc)
    raise ValueError(
        f"create_engine option {name!r} must name an importable object as "
        f"'package.module.attribute', got {dotted!r}" + (f" ({error})" if error else "")
    )


_DIALECT_DEFAULTS: dict[str, dict[str, Any]] = {}


def _dialect_defaults(url: URL) -> dict[str, Any]:
    """The keyword defaults of the URL's dialect class, to type its own options."""
    key = url.drivername
    found = _DIALECT_DEFAULTS.get(key)
    if found is None:
        found = {}
        try:
            dialect_cls = url.get_dialect()
        except Exception:  # an unknown dialect is reported by create_engine()
            return found
        for cls in dialect_cls.__mro__:
            init = cls.__dict__.get("__init__")
            if init is None:
                continue
            for param in inspect.signature(init).parameters.values():
                if param.default is not param.empty:
                    found.setdefault(param.name, param.default)
        # Concurrent fills compute the same dict; the last one wins harmlessly.
        _DIALECT_DEFAULTS[key] = found
    return found
