"""Interfaces: who provides them, where they import from, and that they document themselves."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from zope import component
from zope.configuration import xmlconfig
from zope.interface import Interface
from zope.interface.interface import Method
from zope.interface.interfaces import IInterface
from zope.interface.verify import verifyClass, verifyObject

import sparc.sa
from sparc.sa import interfaces
from sparc.sa.events import EngineCreatedEvent
from sparc.sa.orm import ThreadLocalSASessionTransaction

from .conftest import STYLES, build_models


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("sparc.sa.engine", "ISAEngine"),
        ("sparc.sa.ext", "ISADeclarativeMeta"),
        ("sparc.sa.orm", "ISAScopedTransaction"),
        ("sparc.sa.orm", "ISASession"),
        ("sparc.sa.orm", "ISAScopedSession"),
        ("sparc.sa", "ISAScopedTransaction"),
    ],
)
def test_original_import_paths(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(interfaces, name)


def test_sparc_is_a_native_namespace_package() -> None:
    import sparc

    assert not hasattr(sparc, "__file__") or sparc.__file__ is None
    assert "sa" in sparc.sa.__name__


def test_every_public_name_is_listed() -> None:
    for module in (
        "sparc.sa",
        "sparc.sa.engine",
        "sparc.sa.orm",
        "sparc.sa.interfaces",
        "sparc.sa.ext",
        "sparc.sa.query",
        "sparc.sa.attributes",
        "sparc.sa.testing",
        "sparc.sa.legacy",
    ):
        mod = importlib.import_module(module)
        for name in mod.__all__:
            assert hasattr(mod, name), f"{module}.{name}"


@pytest.mark.parametrize(
    "name", [n for n in interfaces.__all__ if IInterface.providedBy(getattr(interfaces, n))]
)
def test_interfaces_document_themselves(name: str) -> None:
    iface = getattr(interfaces, name)
    assert iface.__doc__ and len(iface.__doc__.strip()) > 20
    for attr in iface.names():
        doc = iface[attr].getDoc()
        assert doc.strip(), f"{name}.{attr} has no documentation"
        if isinstance(iface[attr], Method):
            assert "self" not in iface[attr].getSignatureString()


def test_sqlalchemy_objects_provide_the_markers() -> None:
    engine = sa.create_engine("sqlite://")
    assert interfaces.ISAEngine.providedBy(engine)
    assert interfaces.ISASession.providedBy(Session())
    assert interfaces.ISASession.providedBy(sessionmaker()())
    assert interfaces.ISAScopedSession.providedBy(scoped_session(sessionmaker()))
    assert not interfaces.ISADeclarativeMeta.providedBy(object)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_declarative_style_provides_ISADeclarativeMeta(style: str) -> None:
    ns = build_models(style)
    assert interfaces.ISADeclarativeMeta.providedBy(ns.Base)
    # mapped classes are instances of the same metaclass, as in 1.x
    if style != "DeclarativeBaseNoMeta":
        assert interfaces.ISADeclarativeMeta.providedBy(ns.Item)


def test_no_meta_base_without_opt_in_is_not_a_declarative_base() -> None:
    from sqlalchemy.orm import DeclarativeBaseNoMeta

    class Plain(DeclarativeBaseNoMeta):
        pass

    assert not interfaces.ISADeclarativeMeta.providedBy(Plain)


def test_implementations_verify() -> None:
    assert verifyClass(interfaces.ISAScopedTransaction, ThreadLocalSASessionTransaction)
    ns = build_models()
    manager = ThreadLocalSASessionTransaction(sa.create_engine("sqlite://"), ns.Base)
    assert verifyObject(interfaces.ISAScopedTransaction, manager)
    event = EngineCreatedEvent(sa.create_engine("sqlite://"), {"dsn": "sqlite://", "kwargs": {}})
    assert verifyObject(interfaces.IEngineCreatedEvent, event)


def test_configure_zcml_loads_on_its_own_in_a_site() -> None:
    """A site that includes only sparc.sa (no zope.component meta first)."""
    xmlconfig.string(
        """<configure xmlns="http://namespaces.zope.org/zope">
             <include package="sparc.sa" />
           </configure>"""
    )
    engine = component.createObject("sparc.sa.engine.engine_from_config", {"dsn": "sqlite://"})
    ns = build_models()
    manager = component.getMultiAdapter((engine, ns.Base), interfaces.ISAScopedTransaction)
    assert isinstance(manager, ThreadLocalSASessionTransaction)


def test_adapter_lookup_needs_both_markers() -> None:
    xmlconfig.file("configure.zcml", package=sparc.sa)
    engine: Any = sa.create_engine("sqlite://")
    with pytest.raises(component.ComponentLookupError):
        component.getMultiAdapter((engine, object), interfaces.ISAScopedTransaction)
    with pytest.raises(component.ComponentLookupError):
        component.getMultiAdapter((object(), build_models().Base), interfaces.ISAScopedTransaction)
    assert issubclass(interfaces.ISAScopedTransaction, Interface)
