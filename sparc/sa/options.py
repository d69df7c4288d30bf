"""Engine configuration: from a YAML/INI/ZCML/environment mapping to create_engine().

Configuration usually arrives as text, so string values are converted to the
type each ``create_engine()`` option expects. Only options the user set are
passed on; SQLAlchemy keeps its own defaults for everything else, apart from
the two defaults documented in :func:`normalize`.

Every error raised here names the offending key and the expected form, and
never contains a password.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL, make_url

__all__ = [
    "WRAPPER_KEY",
    "QuerySecretsHiddenURL",
    "expand_env",
    "hide_dsn",
    "hide_secrets_in_text",
    "hiding_query_secrets",
    "is_memory_sqlite",
    "load_yaml",
    "normalize",
    "read_config_file",
    "redact",
    "unwrap",
]

#: The key of the 1.x ``configure.yaml`` shape, ``{'SQLAlchemyEngine': {...}}``.
WRAPPER_KEY = "SQLAlchemyEngine"

_CONFIG_KEYS = ("dsn", "kwargs", "replicas", "replica_max_lag", "replica_wait")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
# The words that make a key look secret, wherever secrets are hidden: keys of
# mappings and URL queries, and key=value or key: value pairs in free text.
_SECRET_WORDS = r"pass|pwd|secret|token|credential|api_?key|ssl_?key"
_SECRET_KEY = re.compile(_SECRET_WORDS, re.I)
_HIDDEN = "***"

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
_QUEUE_POOL_OPTIONS = frozenset({"pool_size", "max_overflow", "pool_timeout", "pool_use_lifo"})

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


# -- the config mapping -------------------------------------------------------


def unwrap(config: object) -> Mapping[str, Any]:
    """Return the engine section of *config*, checking its shape.

    Accepts ``{'dsn': ..., 'kwargs': {...}}`` and the same mapping wrapped as
    ``{'SQLAlchemyEngine': {...}}``.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            "engine config must be a mapping like {'dsn': 'dialect+driver://...', "
            "'kwargs': {...}} or {'SQLAlchemyEngine': {...}}, "
            f"got {type(config).__name__}"
        )
    if WRAPPER_KEY in config and "dsn" not in config:
        extra = sorted(str(k) for k in config if k != WRAPPER_KEY)
        if extra:
            raise ValueError(
                f"engine config wrapped in {WRAPPER_KEY!r} must have no other "
                f"keys, got {', '.join(map(repr, extra))}"
            )
        inner = config[WRAPPER_KEY]
        if not isinstance(inner, Mapping):
            raise TypeError(
                f"{WRAPPER_KEY!r} must be a mapping like {{'dsn': ..., "
                f"'kwargs': {{...}}}}, got {type(inner).__name__}"
            )
        config = inner
    unknown = sorted(str(k) for k in config if k not in _CONFIG_KEYS)
    if unknown:
        # Settings in SQLAlchemy's shape under another prefix ('db.url'):
        # say how to pass them.
        prefixes = sorted({k[: -len("url")] for k in unknown if k.endswith(".url")})
        raise ValueError(
            f"unknown engine config key(s) {', '.join(map(repr, unknown))}: "
            "expected 'dsn' and optionally 'kwargs' (the create_engine() options), "
            "'replicas', 'replica_max_lag' and 'replica_wait'"
            + (
                f"; for settings in SQLAlchemy's shape, name their prefix: "
                f"engine_from_config(settings, {prefixes[0]!r})"
                if prefixes
                else ""
            )
        )
    return config


def normalize(config: object) -> tuple[URL, dict[str, Any]]:
    """Return ``(url, kwargs)`` ready for ``sqlalchemy.create_engine()``.

    Values are converted (see the module docstring), then two defaults are
    applied, each only where the user set nothing:

    * an in-memory SQLite database is shared by all threads:
      ``poolclass=StaticPool`` and ``connect_args={'check_same_thread': False}``;
    * a server database gets ``pool_pre_ping=True``, so a connection the server
      closed while it sat in the pool is replaced before it is used.
    """
    section = unwrap(config)
    if section.get("dsn") in (None, ""):
        raise ValueError(
            "engine config has no 'dsn': expected a SQLAlchemy URL such as "
            "'postgresql+psycopg://user:password@host/dbname' or 'sqlite://'"
        )
    url = parse_dsn(section["dsn"])
    raw = section.get("kwargs")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise TypeError(
            f"'kwargs' must be a mapping of create_engine() options, got {type(raw).__name__}"
        )
    kwargs = {str(name): convert_option(url, str(name), value) for name, value in raw.items()}
    _check_pool_kind(url, kwargs.get("poolclass"))
    _apply_defaults(url, kwargs)
    return hiding_query_secrets(url), kwargs


class QuerySecretsHiddenURL(URL):
    """A URL whose secret-looking query values (``?password=``,
    ``?sslpassword=``, ...) are hidden wherever SQLAlchemy hides the password:
    ``repr()``, ``str()``, ``render_as_string()``, and so ``repr(engine)``.

    The values stay in ``query`` as they were, so the dialect passes them to
    the driver exactly as before: the connection works on every driver.
    ``render_as_string(hide_password=False)`` shows everything, as SQLAlchemy's
    own URL does. Methods that derive a URL (``set()``, ``update_query_dict()``
    ...) keep the class.
    """

    __slots__ = ()

    def render_as_string(self, hide_password: bool = True) -> str:
        url = self
        if hide_password:
            query = {k: (_HIDDEN if _SECRET_KEY.search(k) else v) for k, v in self.query.items()}
            url = self._replace(query=URL.create("x", query=query).query)
        return URL.render_as_string(url, hide_password=hide_password)

    def __repr__(self) -> str:
        return self.render_as_string()


def hiding_query_secrets(url: URL) -> URL:
    """*url* as a :class:`QuerySecretsHiddenURL` if its query holds a
    secret-looking key, else *url* itself."""
    if isinstance(url, QuerySecretsHiddenURL) or not any(map(_SECRET_KEY.search, url.query)):
        return url
    return QuerySecretsHiddenURL(*url)


def parse_dsn(dsn: object) -> URL:
    """Parse *dsn* into a URL; the error never shows the password."""
    if isinstance(dsn, URL):
        return dsn
    if not isinstance(dsn, str):
        raise TypeError(f"'dsn' must be a string or sqlalchemy URL, got {type(dsn).__name__}")
    failed = False
    try:
        url = make_url(dsn.strip())
    except Exception:  # SQLAlchemy's message repeats the raw string
        failed = True
    if failed:
        # Raised outside the except block so the original, which may quote the
        # password, is not chained onto it. Everything up to the last "@" is
        # hidden: a malformed password has no reliable end.
        raise ValueError(
            f"'dsn' is not a valid SQLAlchemy URL: {_hide_userinfo(dsn)!r}; expected "
            "dialect[+driver]://[user[:password]@]host[:port]/database"
        )
    if url.host and "@" in url.host:
        # "user:p@ss@host": the password ends at its first "@" and the rest
        # of it would be taken for the host name, and shown as such.
        raise ValueError(
            "'dsn' has more than one '@' before its host: a password that holds "
            "'@' (or '/', '?', '#', quotes or spaces) must be percent-encoded, "
            "e.g. with urllib.parse.quote(password, safe='')"
        )
    return url


def _hide_userinfo(dsn: str) -> str:
    head, sep, tail = dsn.partition("://")
    if not sep or "@" not in tail:
        return hide_secrets_in_text(dsn)
    return hide_secrets_in_text(f"{head}://***@{tail.rpartition('@')[2]}")


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


def _check_pool_kind(url: URL, poolclass: Any) -> None:
    """An asyncio pool needs an asyncio driver (SQLAlchemy 2.0.0 accepts the
    mismatch and fails at first use)."""
    if poolclass is None or not getattr(poolclass, "_is_asyncio", False):
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
        lookup = getattr(url.get_dialect(), "_isolation_lookup", None)
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


# -- defaults -----------------------------------------------------------------


def is_async_url(url: URL) -> bool:
    """True when the URL names an asyncio driver (postgresql+asyncpg, ...)."""
    try:
        return bool(getattr(url.get_dialect(), "is_async", False))
    except Exception:  # an unknown dialect is reported by create_engine()
        return False


def is_memory_sqlite(url: URL) -> bool:
    """True for a SQLite URL whose database lives only in memory."""
    if url.get_backend_name() != "sqlite":
        return False
    return url.database in (None, "", ":memory:", "file::memory:") or (
        url.query.get("mode") == "memory"
    )


def _apply_defaults(url: URL, kwargs: dict[str, Any]) -> None:
    if url.get_backend_name() == "sqlite":
        if is_memory_sqlite(url):
            sizing = sorted(_QUEUE_POOL_OPTIONS.intersection(kwargs))
            if sizing and "poolclass" not in kwargs and "pool" not in kwargs:
                raise ValueError(
                    f"create_engine option(s) {', '.join(map(repr, sizing))} size a pool of "
                    "many connections, but each connection to an in-memory SQLite "
                    "database has a database of its own, so every thread would see "
                    "an empty one. Leave them out (sparc.sa then shares one database "
                    "through StaticPool), or use a SQLite file"
                )
            user_chose_pool = "poolclass" in kwargs or "pool" in kwargs or "creator" in kwargs
            if not user_chose_pool:
                kwargs["poolclass"] = sa_pool.StaticPool
            if url.get_driver_name() in ("pysqlite", "pysqlcipher"):
                connect_args = dict(kwargs.get("connect_args") or {})
                connect_args.setdefault("check_same_thread", False)
                kwargs["connect_args"] = connect_args
    else:
        kwargs.setdefault("pool_pre_ping", True)


# -- hiding secrets -----------------------------------------------------------


def hide_dsn(dsn: str | URL) -> str:
    """Render *dsn* with its password (and secret query values) hidden."""
    if isinstance(dsn, URL):
        query = {k: (_HIDDEN if _SECRET_KEY.search(k) else v) for k, v in dsn.query.items()}
        return dsn.set(query=query).render_as_string(hide_password=True)
    return hide_secrets_in_text(dsn)


def hide_secrets_in_text(text: str) -> str:
    """Hide passwords in free text: URLs' ``user:password@``, secret query
    parameters, and ``password="..."``-like attributes or ``password: ...``."""
    text = re.sub(r"(://[^:/@\s\"']*:)[^@\s\"']*@", rf"\g<1>{_HIDDEN}@", text)
    text = re.sub(
        rf"([?&][^=&\s]*(?:{_SECRET_WORDS})[^=&\s]*=)[^&\s\"']*",
        rf"\g<1>{_HIDDEN}",
        text,
        flags=re.I,
    )
    text = re.sub(
        rf"""([\w.-]*(?:{_SECRET_WORDS})[\w.-]*\s*=\s*)(["'])(.*?)\2""",
        rf"\g<1>\g<2>{_HIDDEN}\g<2>",
        text,
        flags=re.I,
    )
    return re.sub(
        rf"^(\s*[\w.-]*(?:{_SECRET_WORDS})[\w.-]*\s*:\s*)(\S.*)$",
        rf"\g<1>{_HIDDEN}",
        text,
        flags=re.I | re.M,
    )


def redact(value: Any) -> Any:
    """A deep copy of an options mapping with secret-looking values hidden."""
    if isinstance(value, Mapping):
        return {
            k: (_HIDDEN if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, URL):
        return hide_dsn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


# -- configuration files and the environment ------------------------------------

_ENV_REF = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


def expand_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` with the environment variable NAME.

    ``${NAME:-default}`` uses *default* when NAME is unset or empty, and ``$$``
    is a literal ``$``. A variable that is unset, with no default, raises
    ``KeyError`` naming it.
    """
    env = os.environ if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:
            return "$"
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is not None:
            return value
        raise KeyError(name)

    return _ENV_REF.sub(substitute, text)


def _expand_tree(value: Any, where: str) -> Any:
    if isinstance(value, str):
        try:
            return expand_env(value)
        except KeyError as exc:
            raise ValueError(f"{where}: environment variable {exc.args[0]!r} is not set") from None
    if isinstance(value, Mapping):
        return {k: _expand_tree(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_tree(v, where) for v in value]
    return value


def _yaml_problem(exc: Exception) -> str:
    parts = []
    for what, mark_name in (("context", "context_mark"), ("problem", "problem_mark")):
        text, mark = getattr(exc, what, None), getattr(exc, mark_name, None)
        if text:
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            parts.append(f"{text}{where}")
    return "; ".join(parts) or "invalid YAML"


#: A configuration file nests at most this deep, aliases expanded.
MAX_YAML_DEPTH = 64
#: ... and holds at most this many values, aliases expanded: a few hundred
#: bytes of nested aliases (a "billion laughs") would otherwise expand to
#: more than any memory holds.
MAX_YAML_NODES = 10_000


def load_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML by PyYAML's safe loader, within bounds.

    Aliases are allowed, but the document with every alias expanded must nest
    at most :data:`MAX_YAML_DEPTH` deep and hold at most
    :data:`MAX_YAML_NODES` values, and no alias may contain itself. Anything
    else raises ValueError with one line naming *where*. Every YAML file
    sparc.sa reads (``sparc-sa check``, ``engine_from_config`` callers,
    ``<sa:engine file="...">``) goes through here.
    """
    import yaml

    loader = _bounded_loader(yaml)(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    except _TooBig as exc:
        raise ValueError(f"{where}: {exc}") from None
    finally:
        loader.dispose()


class _TooBig(Exception):
    pass


def _bounded_loader(yaml: Any) -> Any:
    class BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]
        """The safe loader, refusing documents too deep or too large once expanded."""

        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            # The composer recurses once per level: stop before Python's limit.
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise _TooBig(f"nests deeper than {MAX_YAML_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_document(self, node: Any) -> Any:
            _measure(node, 1, {}, set())
            return super().construct_document(node)

    return BoundedLoader


def _measure(node: Any, depth: int, sizes: dict[int, tuple[int, int]], open_: set[int]) -> int:
    """The number of values under *node* once aliases are expanded (memoized,
    so that an alias bomb is measured in the time it takes to read it)."""
    key = id(node)
    if key in open_:
        raise _TooBig("an alias refers to a value that contains it")
    if key in sizes:
        size, height = sizes[key]
    else:
        if depth > MAX_YAML_DEPTH:
            raise _TooBig(f"nests deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
        children: list[Any] = []
        if isinstance(node.value, list):
            for item in node.value:
                children.extend(item if isinstance(item, tuple) else (item,))
        open_.add(key)
        size, height = 1, 1
        for child in children:
            size += _measure(child, depth + 1, sizes, open_)
            height = max(height, 1 + sizes[id(child)][1])
            if size > MAX_YAML_NODES:
                break
        open_.discard(key)
        sizes[key] = (size, height)
    if size > MAX_YAML_NODES:
        raise _TooBig(f"holds more than {MAX_YAML_NODES} values once aliases are expanded")
    if depth - 1 + height > MAX_YAML_DEPTH:
        raise _TooBig(f"nests deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
    return size


def read_config_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """Read the engine section of a YAML file in the ``configure.yaml`` shape.

    The file holds ``SQLAlchemyEngine: {dsn: ..., kwargs: {...}}`` (other
    top-level sections are the application's own and are ignored) or the flat
    ``{dsn: ..., kwargs: ...}``. String values may use ``${NAME}``.
    """
    file = pathlib.Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read engine config file {str(file)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{str(file)!r} is not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    data = load_yaml(text, repr(str(file)))
    if isinstance(data, Mapping) and WRAPPER_KEY in data:
        data = data[WRAPPER_KEY]
    if not isinstance(data, Mapping) or "dsn" not in data:
        raise ValueError(
            f"{str(file)!r} holds no engine config: expected a mapping with 'dsn' "
            f"(and optionally 'kwargs'), at the top level or under {WRAPPER_KEY!r}"
        )
    return _expand_tree(dict(data), repr(str(file)))  # type: ignore[no-any-return]
