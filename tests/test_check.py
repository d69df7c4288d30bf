"""``python -m sparc.sa check`` and the ``sparc-sa`` console script, run as a user would."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import sqlalchemy as sa

from .conftest import SERVERS, server_dsn

SCRIPT = pathlib.Path(sys.executable).with_name("sparc-sa")


def run(*args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "sparc.sa"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def tables(dsn: str) -> set[str]:
    engine = sa.create_engine(dsn)
    try:
        return {t for t in sa.inspect(engine).get_table_names() if t.startswith("sparc_sa_check_")}
    finally:
        engine.dispose()


def test_check_with_no_argument_uses_memory_sqlite() -> None:
    result = run("check")
    assert result.returncode == 0, result.stderr
    assert "engine: OK" in result.stdout
    for field in (
        "url             sqlite://",
        "dialect         sqlite (driver pysqlite)",
        "server version",
        "pool            StaticPool",
        "pre-ping        off",
        "isolation level SERIALIZABLE",
        "round trip",
        "table holds 1 row",
    ):
        assert field in result.stdout, field
    assert result.stderr == ""


def test_console_script_does_the_same() -> None:
    assert SCRIPT.exists(), "the sparc-sa console script is not installed"
    result = run("check", script=True)
    assert result.returncode == 0, result.stderr
    assert "engine: OK" in result.stdout


@pytest.mark.parametrize("backend", SERVERS)
def test_check_against_servers(backend: str) -> None:
    dsn = server_dsn(backend)
    before = tables(dsn)
    result = run("check", dsn)
    assert result.returncode == 0, result.stderr
    assert "pre-ping        on" in result.stdout and "QueuePool, size 5" in result.stdout
    assert tables(dsn) == before, "the check left its table behind"


def test_check_a_yaml_config_in_the_1x_shape(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "configure.yaml"
    config.write_text(
        "SQLAlchemyEngine:\n"
        f"  dsn: sqlite:///{tmp_path / 'app.db'}\n"
        "  kwargs:\n"
        "    pool_size: '3'\n"
        "    pool_pre_ping: yes\n"
        "OtherSection: {ignored: true}\n"
    )
    result = run("check", str(config))
    assert result.returncode == 0, result.stderr
    assert "QueuePool, size 3" in result.stdout and "pre-ping        on" in result.stdout


def test_unreachable_server_fails_in_one_line_without_the_password() -> None:
    result = run("check", "postgresql+psycopg://app:t0p-s3cret@127.0.0.1:9/app")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "FAILED" in lines[0] and "OperationalError" in lines[0]
    assert "t0p-s3cret" not in result.stderr and "app:***@" in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["nosuchdialect://x"], ["configuration error", "nosuchdialect"]),
        (["missing.yaml"], ["configuration error", "missing.yaml"]),
        (["missing.zcml"], ["configuration error", "missing.zcml"]),
    ],
)
def test_bad_config_exits_2_in_one_line(args: list[str], words: list[str]) -> None:
    result = run("check", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr


def test_bad_yaml_names_the_file_and_line(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("SQLAlchemyEngine:\n  dsn: sqlite://\n  kwargs: [unclosed\n")
    result = run("check", str(config))
    assert result.returncode == 2
    assert "broken.yaml" in result.stderr and "line" in result.stderr


def test_usage_errors() -> None:
    assert run().returncode == 2
    assert "check" in run("--help").stdout


@pytest.mark.parametrize("backend", SERVERS)
def test_check_lists_prepared_transactions_a_crash_left_behind(backend: str) -> None:
    """A two-phase transaction prepared and then abandoned, as by a process
    that crashed between PREPARE and COMMIT, is listed until resolved."""
    dsn = server_dsn(backend)
    engine = sa.create_engine(dsn)
    gid = f"sparc-sa-check-{os.getpid()}"
    table = f"sparc_check_xa_{os.getpid()}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)")
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1)")
                conn.exec_driver_sql(f"PREPARE TRANSACTION '{gid}'")
                conn.commit()
            else:
                conn.exec_driver_sql(f"XA START '{gid}'")
                conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1)")
                conn.exec_driver_sql(f"XA END '{gid}'")
                conn.exec_driver_sql(f"XA PREPARE '{gid}'")
                conn.invalidate()  # the connection dies; the prepared branch stays
        done = run("check", dsn)
        assert done.returncode == 0, done.stderr
        assert "prepared transaction(s) left behind" in done.stdout
        assert gid in done.stdout
    finally:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"ROLLBACK PREPARED '{gid}'")
            else:
                conn.exec_driver_sql(f"XA ROLLBACK '{gid}'")
            conn.exec_driver_sql(f"DROP TABLE {table}")
        engine.dispose()
    assert gid not in run("check", dsn).stdout


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('<include package="sparc.sa"\n', ["line 4", "not well-formed"]),
        ('<utility nonsense="1" />\n', ["line 3", "Unrecognized parameters: nonsense"]),
        (
            '<adapter factory="no.such.Thing" for="*" provides="zope.interface.Interface" />\n',
            ["line 3", "Invalid value for 'factory'", "Couldn't import no"],
        ),
    ],
)
def test_bad_zcml_names_the_file_line_and_problem(
    tmp_path: pathlib.Path, body: str, words: list[str]
) -> None:
    site = tmp_path / "site.zcml"
    site.write_text(
        '<configure xmlns="http://namespaces.zope.org/zope">\n'
        '<include package="sparc.sa" />\n' + body + "</configure>\n"
    )
    done = run("check", str(site))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{site}, line" in lines[0]
    for word in words:
        assert word in lines[0]
    for junk in ("TextIOWrapper", "('", "<_io"):
        assert junk not in lines[0]


ASYNC_CHECKS = {
    "aiosqlite": ("", "sqlite+aiosqlite://"),
    "asyncpg": ("TEST_PG_DSN", "postgresql+asyncpg"),
    "psycopg_async": ("TEST_PG_DSN", "postgresql+psycopg_async"),
    "asyncmy": ("TEST_MYSQL_DSN", "mysql+asyncmy"),
    "aiomysql": ("TEST_MYSQL_DSN", "mysql+aiomysql"),
}


@pytest.mark.parametrize("driver", sorted(ASYNC_CHECKS))
def test_check_works_on_async_dsns(driver: str) -> None:
    var, name = ASYNC_CHECKS[driver]
    if var:
        dsn = os.environ.get(var)
        if not dsn:
            pytest.skip(f"{var} is not set, so there is no server for {driver}")
        target = sa.make_url(dsn).set(drivername=name).render_as_string(hide_password=False)
    else:
        target = name
    done = run("check", target)
    assert done.returncode == 0, done.stderr
    assert "engine: OK" in done.stdout
    assert f"driver {sa.make_url(target).get_driver_name().replace('_async', '')}, asyncio" in (
        done.stdout
    )
    assert "committed 1 row, rolled back 1 row" in done.stdout


def test_check_on_an_unreachable_async_server_hides_the_password() -> None:
    done = run("check", "postgresql+asyncpg://app:s3cret@127.0.0.1:1/app")
    assert done.returncode == 1
    assert "s3cret" not in done.stderr and "FAILED" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_sparc_sa_works_without_greenlet() -> None:
    """greenlet is only in the async extra: without it, everything synchronous
    works, and an async DSN says which extra to install."""
    script = (
        "import sys; sys.modules['greenlet'] = None\n"
        "from sparc.sa.check import main\n"
        "assert main(['check']) == 0\n"
        "from sparc.sa.engine import engine_from_config\n"
        "try:\n"
        "    engine_from_config({'dsn': 'sqlite+aiosqlite://'})\n"
        "except ImportError as exc:\n"
        "    assert 'sparc.sa[async]' in str(exc), exc\n"
        "    print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


# -- hostile files and pipes: one line, never a traceback -----------------------------

LAUGHS = "l: &a0 [l,l,l,l,l,l,l,l,l]\n" + "".join(
    f"l{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)
)
HOSTILE_YAML = {
    # nine levels of nine aliases: 9**9 values once expanded, from ~450 bytes
    "alias bomb": (LAUGHS + "dsn: sqlite://\n", "more than 10000 values"),
    "self-referencing alias": ("dsn: sqlite://\nkwargs: &k {connect_args: *k}\n", "contains it"),
    "self-referencing list": ("dsn: sqlite://\nx: &a [*a]\n", "contains it"),
    "deep lists": ("dsn: sqlite://\nx: " + "[" * 5000 + "]" * 5000 + "\n", "deeper than 64"),
    "deep mappings": ("dsn: sqlite://\nx: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "deeper"),
    "deep by aliases": (
        "a0: &a0 "
        + "[" * 40
        + "]" * 40
        + "\na1: &a1 "
        + "[" * 30
        + "*a0"
        + "]" * 30
        + "\ndsn: sqlite://\n",
        "once aliases are expanded",
    ),
}


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("name", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_refused_in_one_line(tmp_path: pathlib.Path, name: str) -> None:
    text, words = HOSTILE_YAML[name]
    if name == "alias bomb":
        assert len(text.encode()) <= 450
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    result = run("check", str(config))
    assert result.returncode == 2
    line = one_line(result)
    assert "configuration error" in line and "hostile.yaml" in line and words in line


def test_hostile_yaml_in_zcml_is_refused_in_one_line(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "hostile.yaml"
    config.write_text(HOSTILE_YAML["alias bomb"][0])
    site = tmp_path / "site.zcml"
    site.write_text(
        '<configure xmlns="http://namespaces.zope.org/zope"\n'
        '           xmlns:sa="http://namespaces.zope.org/sparc.sa">\n'
        '<include package="sparc.sa" />\n'
        f'<sa:engine config="{config}" />\n'
        "</configure>\n"
    )
    result = run("check", str(site))
    assert result.returncode == 2
    line = one_line(result)
    assert "site.zcml, line 4" in line and "more than 10000 values" in line


def test_a_file_that_is_not_utf8_is_refused_in_one_line(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "latin.yaml"
    config.write_bytes(b"dsn: sqlite://\nx: \xff\xfe\n")
    result = run("check", str(config))
    assert result.returncode == 2
    assert "not UTF-8" in one_line(result)


def test_a_bogus_charset_on_mysql_is_one_line() -> None:
    dsn = sa.make_url(server_dsn("mysql")).set(password="t0p-s3cret")
    bogus = dsn.update_query_dict({"charset": "bogus"}).render_as_string(hide_password=False)
    result = run("check", bogus)
    assert result.returncode in (1, 2)
    line = one_line(result)
    assert "charset=bogus" in line and "t0p-s3cret" not in result.stderr


def test_a_closed_stdout_is_no_traceback() -> None:
    """``sparc-sa check | head -1``: the reader leaves before the report is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sparc.sa", "check"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=120) == 1
    assert stderr == ""
