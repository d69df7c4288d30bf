"""The documentation tells the truth: named tests exist, and CI runs the README's commands."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.rst").read_text()


def functions_in(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


GUARANTEES = (ROOT / "docs" / "guarantees.rst").read_text()
REFERENCES = re.findall(r"``(tests/[\w/]+\.py)::(\w+)``", GUARANTEES)


def test_the_guarantees_table_names_tests() -> None:
    assert len(REFERENCES) >= 20


@pytest.mark.parametrize(("path", "name"), REFERENCES)
def test_every_guarantee_names_a_real_test(path: str, name: str) -> None:
    file = ROOT / path
    assert file.is_file(), path
    assert name in functions_in(file), f"{path}::{name} does not exist"


def section(text: str, title: str) -> str:
    """The body of the section *title*, up to the next section title."""
    body = text.split(f"\n{title}\n{'=' * len(title)}\n")[1]
    return re.split(r"\n[^\n]+\n=+\n", body)[0]


def quick_start_commands() -> list[str]:
    section_text = section(README, "Quick start")
    return [
        line.strip() for line in section_text.splitlines() if line.startswith("    python3 -m venv")
    ]


def test_readme_gives_two_fresh_machine_commands() -> None:
    main_job, tests = quick_start_commands()
    assert main_job.endswith("sparc-sa check")
    assert "[test]" in tests and tests.endswith("pytest")


def test_ci_installs_and_tests_exactly_as_the_readme_says() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    _, tests = quick_start_commands()
    install = re.search(r"pip install (-e '\.\[test\]')", tests)
    assert install is not None
    assert f"pip install {install.group(1)}" in ci
    assert re.search(r"^\s*\S*pytest\b", ci, re.M), "CI does not run pytest"


@pytest.mark.parametrize("name", ["README.rst", "CHANGES.rst"])
def test_rst_is_valid(name: str) -> None:
    """PyPI shows README.rst as plain text if it has an error; catch it here.

    The pages under docs/ use Sphinx's roles, which plain docutils does not
    know: CI builds them with ``sphinx-build -W``, which fails on any error."""
    import io

    import docutils.core

    warnings = io.StringIO()
    docutils.core.publish_doctree(
        (ROOT / name).read_text(),
        source_path=name,
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": warnings},
    )
    assert warnings.getvalue() == ""


def test_benchmarks_page_shows_the_plot() -> None:
    page = (ROOT / "docs" / "benchmarks.rst").read_text()
    assert ".. image:: benchmarks/threads.png" in page
    assert (ROOT / "docs" / "benchmarks" / "threads.png").is_file()
    assert "python bench/run.py" in page


def test_every_engine_option_is_documented() -> None:
    from sparc.sa import options

    page = (ROOT / "docs" / "engines.rst").read_text()
    missing = sorted(name for name in options.KNOWN_OPTIONS if f"``{name}``" not in page)
    assert missing == []


def test_every_page_is_in_the_site() -> None:
    index = (ROOT / "docs" / "index.rst").read_text()
    pages = {path.stem for path in (ROOT / "docs").glob("*.rst")} - {"index"}
    listed = set(re.findall(r"^   ([\w-]+)$", index, re.M))
    assert pages - listed == set()


def repository_prefix() -> str:
    """The address the README's links to repository files start with (docs/conf.py)."""
    tree = ast.parse((ROOT / "docs" / "conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "REPOSITORY":
            return str(ast.literal_eval(node.value))
    raise AssertionError("docs/conf.py defines no REPOSITORY")


def test_the_readme_links_to_files_that_exist() -> None:
    """The README's links work on GitHub and PyPI (absolute), and in the site,
    where docs/conf.py makes each a link to the page (sphinx-build -W checks it)."""
    prefix = repository_prefix()
    source = re.search(r'^Source = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert source is not None and prefix == source.group(1) + "/blob/main/"
    links = re.findall(r"<(https?://[^>]+)>`_", README)
    into_repository = [link[len(prefix) :] for link in links if link.startswith(prefix)]
    assert len(into_repository) >= 10
    missing = [path for path in into_repository if not (ROOT / path.partition("#")[0]).is_file()]
    assert missing == []
    pages = {path.stem for path in (ROOT / "docs").glob("*.rst")} - {"index", "changes"}
    pages -= {"developers"}  # DEVELOPERS.md is linked as itself
    linked = {
        path[len("docs/") : -len(".rst")] for path in into_repository if path.startswith("docs/")
    }
    assert pages - linked == set(), "pages the README does not point to"


def test_the_readme_is_a_front_door() -> None:
    assert len(README.splitlines()) <= 180
    install = section(README, "Installing")
    assert "pip install -e ." in install and "1.3.2" in install
