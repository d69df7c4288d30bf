"""Declarative-extension interfaces, at their sparc.sa 1.x import path."""

from sparc.sa.interfaces import ISADeclarativeMeta

__all__ = ["ISADeclarativeMeta"]
