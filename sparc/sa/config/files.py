"""Engine configuration: configuration files, YAML read within bounds, and
``${VAR}`` references to the environment."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from sparc.sa.config.mapping import WRAPPER_KEY

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
