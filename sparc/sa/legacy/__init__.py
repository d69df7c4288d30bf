"""The import paths of sparc.sa 1.x, kept working.

In 1.x, ``sparc.sa.orm`` and ``sparc.sa.engine`` were packages with
submodules (``sparc.sa.orm.query``, ``sparc.sa.engine.engine``, ...). In 2.x
they are single modules, as the project layout asks, and the code of those
submodules lives in flat modules: :mod:`sparc.sa.query`,
:mod:`sparc.sa.attributes`, :mod:`sparc.sa.testing` and
:mod:`sparc.sa.interfaces`.

How the old dotted paths still import:

1. ``sparc/sa/orm.py``, ``engine.py`` and ``ext.py`` set a module
   ``__path__``. That makes each of them a package to the import system,
   while staying a single file. Their ``__path__`` is the directory of the
   same name in this package (``sparc/sa/legacy/orm/``), which holds only
   ZCML, so that
   ``<include package="sparc.sa.orm" />`` finds its ``configure.zcml`` there
   as it did in 1.x.
2. :class:`LegacyFinder`, installed on ``sys.meta_path`` when ``sparc.sa``
   is imported, answers for the names in :data:`ALIASES` only. For each, it
   makes a small forwarding module (:class:`Alias`) whose attributes are
   looked up in the flat module that now holds the code. The flat module is
   imported only then, so importing ``sparc.sa`` stays cheap.

Forwarding modules, rather than the flat modules themselves under a second
name, keep the import system's bookkeeping away from the real modules:
importing ``sparc.sa.orm.query.filter`` binds ``filter`` as an attribute of
its parent, which must not shadow the builtin inside :mod:`sparc.sa.query`.
Every alias is a distinct module object, but every class, function and
interface reached through it is the one object of the flat module, so
``isinstance`` checks, adapters and pickles agree whichever path was used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["ALIASES", "MODULE_PACKAGES", "Alias", "LegacyFinder", "install", "is_submodule"]

_HERE = os.path.dirname(os.path.abspath(__file__))  # sparc/sa/legacy: the 1.x ZCML folders
_SA = os.path.dirname(_HERE)  # sparc/sa

#: 1.x module path -> the module that now holds its names.
ALIASES: dict[str, str] = {
    "sparc.sa.engine.engine": "sparc.sa.engine",
    "sparc.sa.engine.interfaces": "sparc.sa.interfaces",
    "sparc.sa.ext.interfaces": "sparc.sa.interfaces",
    "sparc.sa.orm.interfaces": "sparc.sa.interfaces",
    "sparc.sa.orm.session": "sparc.sa.orm",
    "sparc.sa.orm.testing": "sparc.sa.testing",
    "sparc.sa.orm.attributes": "sparc.sa.attributes",
    "sparc.sa.orm.attributes.interfaces": "sparc.sa.attributes",
    "sparc.sa.orm.attributes.mapping": "sparc.sa.attributes",
    "sparc.sa.orm.mapper": "sparc.sa.interfaces",
    "sparc.sa.orm.mapper.interfaces": "sparc.sa.interfaces",
    "sparc.sa.orm.query": "sparc.sa.query",
    "sparc.sa.orm.query.interfaces": "sparc.sa.query",
    "sparc.sa.orm.query.query": "sparc.sa.query",
    "sparc.sa.orm.query.filter": "sparc.sa.query",
    "sparc.sa.orm.query.result": "sparc.sa.query",
    "sparc.sa.orm.query.sequence": "sparc.sa.query",
    "sparc.sa.orm.query.testing": "sparc.sa.testing",
}

# The aliases that were packages in 1.x: their 1.x directory (ZCML only).
_PACKAGES = {"sparc.sa.orm.attributes", "sparc.sa.orm.mapper", "sparc.sa.orm.query"}


#: The modules that are 1.x packages too: their spec gives them ``__path__``.
MODULE_PACKAGES = ("sparc.sa.engine", "sparc.sa.ext", "sparc.sa.orm")


def is_submodule(name: str) -> bool:
    """Whether ``sparc.sa.<name>`` is a module or sub-package of sparc.sa."""
    return name.isidentifier() and (
        os.path.isfile(os.path.join(_SA, f"{name}.py"))
        or os.path.isfile(os.path.join(_SA, name, "__init__.py"))
    )


def package_path(name: str) -> list[str]:
    """The ``__path__`` of 1.x package ``name``: its directory under sparc/sa/legacy/."""
    parts = name.split(".")[2:]  # drop "sparc", "sa"
    return [os.path.join(_HERE, *parts)]


class Alias(types.ModuleType):
    """A module that forwards attribute lookups to the module holding the code."""

    def __init__(self, name: str, target: types.ModuleType) -> None:
        super().__init__(name, f"sparc.sa 1.x's {name}; its names are those of {target.__name__}.")
        self.__dict__["_sparc_target"] = target

    def __getattr__(self, name: str) -> Any:  # only for names not set on the alias itself
        if name.startswith("__") and name != "__all__":
            # __spec__, __path__, __file__ ... describe the alias, not its target
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        try:
            return getattr(self.__dict__["_sparc_target"], name)
        except AttributeError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self.__dict__["_sparc_target"])) | set(self.__dict__))


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return Alias(spec.name, importlib.import_module(ALIASES[spec.name]))

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the alias forwards to a module that is already loaded."""


class LegacyFinder(importlib.abc.MetaPathFinder):
    """Finds the 1.x module paths listed in :data:`ALIASES`, and nothing else."""

    _loader = _AliasLoader()

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        _repair()
        if fullname in MODULE_PACKAGES:
            return self._module_package(fullname, path)
        if fullname not in ALIASES:
            return None
        spec = importlib.machinery.ModuleSpec(
            fullname, self._loader, is_package=fullname in _PACKAGES
        )
        if fullname in _PACKAGES:
            spec.submodule_search_locations = package_path(fullname)
        return spec

    @staticmethod
    def _module_package(
        fullname: str, path: Sequence[str] | None
    ) -> importlib.machinery.ModuleSpec | None:
        # sparc/sa/orm.py, found as usual, but with its __path__ in the spec:
        # the module has it from the moment it exists, so a thread importing
        # sparc.sa.orm.query while orm.py still runs does not find "'sparc.sa.orm'
        # is not a package". (The module sets the same __path__ itself too.)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations is None:
            spec.submodule_search_locations = package_path(fullname)
        return spec


_install_lock = threading.Lock()


def install() -> None:
    """Put one :class:`LegacyFinder` first on ``sys.meta_path`` (idempotent).

    Repairs what a thread may have imported before the finder was there: a
    1.x package module without its ``__path__`` yet, and a 1.x path the
    default finders took for an empty namespace package (a directory of ZCML).
    """
    with _install_lock:  # two threads importing sparc.sa must not add two finders
        if not any(isinstance(finder, LegacyFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, LegacyFinder())
        _repair()
        for name in ALIASES:
            module = sys.modules.get(name)
            if module is not None and not isinstance(module, Alias):
                del sys.modules[name]  # a namespace package made of a ZCML directory


def _repair() -> None:
    """Give a 1.x package module that a thread loaded before the finder was
    installed its ``__path__`` now, not when its own line sets it."""
    for name in MODULE_PACKAGES:
        module = sys.modules.get(name)
        if module is not None and "__path__" not in module.__dict__:
            module.__path__ = package_path(name)


# Installed as soon as this module is loaded, which sparc/sa/__init__.py does
# first: from then on every 1.x path, and the __path__ of orm, engine and ext,
# come from the finder, whichever thread imports them.
install()
