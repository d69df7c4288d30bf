"""Messages a migrating user meets: which package provides a missing driver,
what a misspelt or renamed ZCML attribute should be, which framework owns
the transaction, and ``sparc-sa --version``."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import transaction
import webtest
from zope.configuration import xmlconfig
from zope.configuration.exceptions import ConfigurationError

from sparc.sa.engine import engine_from_config
from sparc.sa.tx.frameworks import commit_refusal, framework_in_use

# -- a missing driver names its package ------------------------------------------------

# (dsn, the module SQLAlchemy imports for it, words the message must hold)
DRIVERS = [
    (
        "mysql://app:s3cr3t@db/app",
        "MySQLdb",
        ["mysqlclient", "mysql+pymysql://", "sparc.sa[mysql]"],
    ),
    ("mysql+mysqldb://app:s3cr3t@db/app", "MySQLdb", ["pip install mysqlclient"]),
    ("mariadb+mysqldb://app:s3cr3t@db/app", "MySQLdb", ["pip install mysqlclient"]),
    ("mysql+pymysql://app:s3cr3t@db/app", "pymysql", ["PyMySQL", "'sparc.sa[mysql]'"]),
    (
        "postgresql+psycopg2://app:s3cr3t@db/app",
        "psycopg2",
        ["pip install psycopg2", "psycopg2-binary", "postgresql+psycopg://"],
    ),
    (
        "postgresql+psycopg://app:s3cr3t@db/app",
        "psycopg",
        ["'psycopg[binary]'", "sparc.sa[postgresql]"],
    ),
    ("postgresql+asyncpg://app:s3cr3t@db/app", "asyncpg", ["'sparc.sa[async]' asyncpg"]),
    ("mysql+aiomysql://app:s3cr3t@db/app", "aiomysql", ["'sparc.sa[async]' aiomysql"]),
    ("mysql+asyncmy://app:s3cr3t@db/app", "asyncmy", ["'sparc.sa[async]' asyncmy"]),
    ("sqlite+aiosqlite:///x.db", "aiosqlite", ["'sparc.sa[async]' aiosqlite"]),
    ("mssql+pyodbc://app:s3cr3t@dsn", "pyodbc", ["pip install pyodbc"]),
    ("oracle+cx_oracle://app:s3cr3t@db/app", "cx_Oracle", ["cx_Oracle", "oracle+oracledb://"]),
    ("oracle+oracledb://app:s3cr3t@db/app", "oracledb", ["pip install oracledb"]),
]


@pytest.mark.parametrize(
    ("dsn", "module", "words"), DRIVERS, ids=[d[0].split(":")[0] for d in DRIVERS]
)
def test_a_missing_driver_names_the_package_that_provides_it(
    dsn: str, module: str, words: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # an import of it fails
    with pytest.raises(ImportError) as info:
        engine_from_config({"dsn": dsn})
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert "s3cr3t" not in message


# -- ZCML attributes ------------------------------------------------------------------


def _load(tmp_path: pathlib.Path, body: str) -> str:
    path = tmp_path / "site.zcml"
    path.write_text(
        '<configure xmlns="http://namespaces.zope.org/zope"\n'
        '           xmlns:sa="http://namespaces.zope.org/sparc.sa">\n'
        '  <include package="sparc.sa" />\n'
        f"  {body}\n"
        "</configure>\n"
    )
    with pytest.raises(ConfigurationError) as info:
        xmlconfig.file(str(path))
    return str(info.value)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            '<sa:engine url="sqlite://" />',
            ["has no attribute 'url'", "did you mean 'dsn'", "z3c.saconfig"],
        ),
        ('<sa:engine dns="sqlite://" />', ["has no attribute 'dns'", "did you mean 'dsn'"]),
        ('<sa:engine dsn="sqlite://" confg="x.yaml" />', ["'confg'", "did you mean 'config'"]),
        (
            '<sa:engine dsn="sqlite://" />'
            '<sa:transaction base="sqlalchemy.orm.DeclarativeBase" two_phase="true" />',
            ["has no attribute 'two_phase'", "did you mean 'twophase'"],
        ),
        (
            '<sa:transaction bse="sqlalchemy.orm.DeclarativeBase" base="x.Base" />',
            ["'bse'", "did you mean 'base'"],
        ),
        (
            '<sa:transaction base="x.Base" jion="always" />',
            ["'jion'", "did you mean 'join'"],
        ),
        (
            '<sa:transaction base="x.Base" colour="blue" />',
            ["has no attribute 'colour'", "'name', 'engine', 'base', 'join', 'twophase'"],
        ),
    ],
)
def test_zcml_attributes_other_tools_use_or_misspelt(
    tmp_path: pathlib.Path, body: str, words: list[str]
) -> None:
    message = _load(tmp_path, body)
    for word in words:
        assert word in message, message
    assert "Unrecognized parameters" not in message
    assert "site.zcml" in message  # where: the file and line


def test_a_dialect_option_is_still_an_attribute(tmp_path: pathlib.Path) -> None:
    """Only names close to sparc.sa's own attributes are taken for typos;
    create_engine() options pass through as before."""
    path = tmp_path / "site.zcml"
    path.write_text(
        '<configure xmlns="http://namespaces.zope.org/zope"\n'
        '           xmlns:sa="http://namespaces.zope.org/sparc.sa">\n'
        '  <include package="sparc.sa" />\n'
        '  <sa:engine name="opt" dsn="sqlite://" echo="false" pool_recycle="60" />\n'
        "</configure>\n"
    )
    xmlconfig.file(str(path))
    from zope.component import getUtility

    from sparc.sa.interfaces import ISAEngine

    engine = getUtility(ISAEngine, "opt")
    assert engine.pool._recycle == 60
    engine.dispose()


# -- which framework owns the transaction -----------------------------------------------


def test_framework_in_use_outside_any_request() -> None:
    with transaction.manager:
        assert framework_in_use() == "transaction"
    assert "transaction.commit()" in commit_refusal()
    assert "Zope" not in commit_refusal()


def test_framework_in_use_in_a_zope_request() -> None:
    from zope.globalrequest import clearRequest, setRequest
    from zope.publisher.browser import TestRequest

    setRequest(TestRequest())
    try:
        assert framework_in_use() == "zope"
        assert "Zope request" in commit_refusal()
    finally:
        clearRequest()
    assert framework_in_use() == "transaction"


@pytest.mark.parametrize("with_tm", [True, False], ids=["pyramid_tm", "no-pyramid_tm"])
def test_framework_in_use_in_a_pyramid_request(with_tm: bool) -> None:
    from pyramid.config import Configurator
    from pyramid.response import Response

    def view(request: Any) -> Response:
        return Response(f"{framework_in_use()}\n{commit_refusal()}")

    with Configurator(settings={"tm.manager_hook": "pyramid_tm.explicit_manager"}) as config:
        if with_tm:
            config.include("pyramid_tm")
        config.add_route("who", "/who")
        config.add_view(view, route_name="who")
        app = webtest.TestApp(config.make_wsgi_app())
    who, message = app.get("/who").text.split("\n")
    if with_tm:
        assert who == "pyramid_tm"
        assert "pyramid_tm, for this Pyramid request (request.tm)" in message
        assert "request.tm.doom()" in message
    else:
        assert who == "transaction"
    assert "Zope" not in message


# -- sparc-sa --version -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["script", "module"])
def test_version(how: str) -> None:
    script = pathlib.Path(sys.executable).with_name("sparc-sa")
    command = [str(script)] if how == "script" else [sys.executable, "-m", "sparc.sa"]
    done = subprocess.run(
        [*command, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"sparc-sa {importlib.metadata.version('sparc.sa')}"
