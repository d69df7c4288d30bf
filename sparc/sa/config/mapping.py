"""Engine configuration: the mapping (its 1.x wrapper, its keys), and the DSN
parsed into a URL whose secrets stay hidden."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL, make_url

from sparc.sa.config.conversions import check_pool_kind, convert_option
from sparc.sa.config.defaults import apply_defaults
from sparc.sa.config.secrets import HIDDEN, SECRET_KEY, hide_secrets_in_text

#: The key of the 1.x ``configure.yaml`` shape, ``{'SQLAlchemyEngine': {...}}``.
WRAPPER_KEY = "SQLAlchemyEngine"

_CONFIG_KEYS = ("dsn", "kwargs", "replicas", "replica_max_lag", "replica_wait")

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
    check_pool_kind(url, kwargs.get("poolclass"))
    apply_defaults(url, kwargs)
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
            query = {k: (HIDDEN if SECRET_KEY.search(k) else v) for k, v in self.query.items()}
            url = self._replace(query=URL.create("x", query=query).query)
        return URL.render_as_string(url, hide_password=hide_password)

    def __repr__(self) -> str:
        return self.render_as_string()


def hiding_query_secrets(url: URL) -> URL:
    """*url* as a :class:`QuerySecretsHiddenURL` if its query holds a
    secret-looking key, else *url* itself."""
    if isinstance(url, QuerySecretsHiddenURL) or not any(map(SECRET_KEY.search, url.query)):
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
