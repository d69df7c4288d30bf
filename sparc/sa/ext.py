"""Declarative-extension interfaces, at their sparc.sa 1.x import path."""

from sparc.sa.interfaces import ISADeclarativeMeta
from sparc.sa.legacy import package_path

__all__ = ["ISADeclarativeMeta"]

# A package to the import system, for sparc.sa 1.x's submodule paths
# (``sparc.sa.ext.interfaces``); see sparc.sa.legacy.
__path__ = package_path(__name__)
