"""Engine configuration: from a YAML/INI/ZCML/environment mapping to create_engine().

Configuration usually arrives as text, so string values are converted to the
type each ``create_engine()`` option expects. Only options the user set are
passed on; SQLAlchemy keeps its own defaults for everything else, apart from
the two defaults documented in :func:`normalize`.

Every error raised here names the offending key and the expected form, and
never contains a password.
"""

from __future__ import annotations

# The public names (__all__), and what engine.py and zcml.py use through
# this module: the parts live in sparc/sa/config/.
from sparc.sa.config.conversions import KNOWN_OPTIONS as KNOWN_OPTIONS
from sparc.sa.config.conversions import convert_option as convert_option
from sparc.sa.config.defaults import is_async_url as is_async_url
from sparc.sa.config.defaults import is_memory_sqlite
from sparc.sa.config.files import expand_env, load_yaml, read_config_file
from sparc.sa.config.mapping import (
    WRAPPER_KEY,
    QuerySecretsHiddenURL,
    hiding_query_secrets,
    normalize,
    unwrap,
)
from sparc.sa.config.mapping import parse_dsn as parse_dsn
from sparc.sa.config.secrets import hide_dsn, hide_secrets_in_text, redact

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
