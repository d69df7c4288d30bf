"""Engine configuration: hiding passwords and secret-looking values in DSNs,
mappings and free text."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL

# The words that make a key look secret, wherever secrets are hidden: keys of
# mappings and URL queries, and key=value or key: value pairs in free text.
_SECRET_WORDS = r"pass|pwd|secret|token|credential|api_?key|ssl_?key"
SECRET_KEY = re.compile(_SECRET_WORDS, re.I)
HIDDEN = "***"


# -- hiding secrets -----------------------------------------------------------


def hide_dsn(dsn: str | URL) -> str:
    """Render *dsn* with its password (and secret query values) hidden."""
    if isinstance(dsn, URL):
        query = {k: (HIDDEN if SECRET_KEY.search(k) else v) for k, v in dsn.query.items()}
        return dsn.set(query=query).render_as_string(hide_password=True)
    return hide_secrets_in_text(dsn)


def hide_secrets_in_text(text: str) -> str:
    """Hide passwords in free text: URLs' ``user:password@``, secret query
    parameters, and ``password="..."``-like attributes or ``password: ...``."""
    text = re.sub(r"(://[^:/@\s\"']*:)[^@\s\"']*@", rf"\g<1>{HIDDEN}@", text)
    text = re.sub(
        rf"([?&][^=&\s]*(?:{_SECRET_WORDS})[^=&\s]*=)[^&\s\"']*",
        rf"\g<1>{HIDDEN}",
        text,
        flags=re.I,
    )
    text = re.sub(
        rf"""([\w.-]*(?:{_SECRET_WORDS})[\w.-]*\s*=\s*)(["'])(.*?)\2""",
        rf"\g<1>\g<2>{HIDDEN}\g<2>",
        text,
        flags=re.I,
    )
    return re.sub(
        rf"^(\s*[\w.-]*(?:{_SECRET_WORDS})[\w.-]*\s*:\s*)(\S.*)$",
        rf"\g<1>{HIDDEN}",
        text,
        flags=re.I | re.M,
    )


def redact(value: Any) -> Any:
    """A deep copy of an options mapping with secret-looking values hidden."""
    if isinstance(value, Mapping):
        return {
            k: (HIDDEN if isinstance(k, str) and SECRET_KEY.search(k) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, URL):
        return hide_dsn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
