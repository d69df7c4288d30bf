"""``engine_from_config`` with SQLAlchemy's signature, ``(configuration,
prefix="sqlalchemy.", **kwargs)``, as Pyramid's cookiecutter calls it, beside
sparc.sa 1.x's ``{'dsn': ..., 'kwargs': {...}}``: text values converted as the
factory converts them, errors that name the setting and never the password."""

from __future__ import annotations

import pathlib

import pytest
from sqlalchemy.pool import QueuePool, StaticPool
from zope.component import createObject

from sparc.sa.engine import engine_from_config


def _file_settings(tmp_path: pathlib.Path, prefix: str = "sqlalchemy.") -> dict[str, str]:
    return {
        f"{prefix}url": f"sqlite:///{tmp_path / 'app.db'}",
        f"{prefix}pool_size": "3",
        f"{prefix}echo": "false",
        "pyramid.reload_templates": "true",  # not the engine's: ignored
    }


def test_settings_and_prefix_positionally(tmp_path: pathlib.Path) -> None:
    engine = engine_from_config(_file_settings(tmp_path), "sqlalchemy.")
    try:
        assert isinstance(engine.pool, QueuePool)
        assert engine.pool.size() == 3
        assert engine.echo is False
        assert engine.url.database == str(tmp_path / "app.db")
    finally:
        engine.dispose()


def test_settings_and_prefix_by_keyword_with_overrides(tmp_path: pathlib.Path) -> None:
    settings = _file_settings(tmp_path, prefix="db.")
    engine = engine_from_config(configuration=settings, prefix="db.", pool_size=7, echo="true")
    try:
        assert engine.pool.size() == 7
        assert engine.echo is True
    finally:
        engine.dispose()


def test_default_prefix_without_naming_it() -> None:
    """A mapping of ``sqlalchemy.`` settings, as the cookiecutter passes it, is
    recognised; the in-memory default (StaticPool) applies as for a dsn."""
    engine = engine_from_config({"sqlalchemy.url": "sqlite://"})
    try:
        assert isinstance(engine.pool, StaticPool)
    finally:
        engine.dispose()


def test_through_the_registered_factory(zcml: None, tmp_path: pathlib.Path) -> None:
    engine = createObject(
        "sparc.sa.engine.engine_from_config", _file_settings(tmp_path), "sqlalchemy."
    )
    try:
        assert engine.pool.size() == 3
    finally:
        engine.dispose()


def test_the_1x_mapping_still_works() -> None:
    engine = engine_from_config({"dsn": "sqlite://", "kwargs": {"echo": "false"}})
    try:
        assert engine.echo is False
    finally:
        engine.dispose()


def test_a_bad_value_names_the_setting_not_the_password() -> None:
    settings = {
        "sqlalchemy.url": "postgresql+psycopg://app:s3cr3t@db.invalid/app",
        "sqlalchemy.pool_size": "five",
    }
    with pytest.raises(ValueError, match=r"setting 'sqlalchemy\.pool_size'.*integer") as info:
        engine_from_config(settings, "sqlalchemy.")
    assert "s3cr3t" not in str(info.value)


def test_a_bad_keyword_override_is_named_as_such() -> None:
    with pytest.raises(ValueError, match=r"keyword argument 'pool_size'"):
        engine_from_config({"sqlalchemy.url": "sqlite:///x.db"}, "sqlalchemy.", pool_size="x")


def test_a_missing_url_names_the_key_and_what_was_found() -> None:
    with pytest.raises(ValueError, match=r"no 'sqlalchemy\.url'.*'sqlalchemy\.echo'"):
        engine_from_config({"sqlalchemy.echo": "true"}, "sqlalchemy.")
    with pytest.raises(ValueError, match=r"no 'db\.url'.*no setting starts with 'db\.'"):
        engine_from_config({"sqlalchemy.url": "sqlite://"}, prefix="db.")


def test_a_bad_url_names_the_setting_not_the_password() -> None:
    with pytest.raises(ValueError, match=r"setting 'sqlalchemy\.url'") as info:
        engine_from_config({"sqlalchemy.url": "postgresql://app:s3cr3t@db:notaport/x"})
    assert "s3cr3t" not in str(info.value)


def test_settings_that_are_not_a_mapping() -> None:
    with pytest.raises(TypeError, match=r"needs a mapping of settings"):
        engine_from_config(["sqlalchemy.url=sqlite://"], "sqlalchemy.")  # type: ignore[arg-type]


def test_settings_under_another_prefix_without_it_say_to_name_it() -> None:
    with pytest.raises(
        ValueError, match=r"name their prefix: engine_from_config\(settings, 'db\.'\)"
    ):
        engine_from_config({"db.url": "sqlite://", "db.echo": "true"})
