"""What the documentation pages render as, beyond what the doctests run."""

from __future__ import annotations

import pathlib

import docutils.core
import docutils.nodes
import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.rst"))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_accidental_mailto_links(page: pathlib.Path) -> None:
    """A contender's name such as plain@sparc in a table renders as text, not
    as a mailto: link (docutils takes any a@b it sees for an address)."""
    tree = docutils.core.publish_doctree(
        page.read_text(encoding="utf-8"),
        source_path=str(page),
        settings_overrides={"report_level": 5, "halt_level": 5, "file_insertion_enabled": False},
    )
    mailto = [
        node.astext()
        for node in tree.findall(docutils.nodes.reference)
        if str(node.get("refuri", "")).startswith("mailto:")
    ]
    assert mailto == [], f"{page.name} renders mailto: links for {sorted(set(mailto))}"


@pytest.mark.parametrize(
    "variable", ["TEST_PG_DSN", "TEST_MYSQL_DSN", "TEST_PG_REPLICA_DSN", "SPARC_SA_ORIGINAL_1X"]
)
def test_every_variable_a_skip_reason_names_is_documented(variable: str) -> None:
    """A skip reason that says "set X" points to DEVELOPERS.md, which says
    what X holds."""
    text = (DOCS.parent / "DEVELOPERS.md").read_text(encoding="utf-8")
    assert f"export {variable}=" in text


def test_the_1x_doctests_skip_reason_points_to_its_section() -> None:
    developers = (DOCS.parent / "DEVELOPERS.md").read_text(encoding="utf-8")
    legacy = (DOCS.parent / "tests" / "test_legacy.py").read_text(encoding="utf-8")
    section = "sparc.sa 1.3.2's own doctests"
    assert f"## {section}" in developers
    assert section in legacy and "DEVELOPERS.md" in legacy


def _references() -> list[tuple[str, str, str]]:
    import re

    found = []
    for page in PAGES:
        for path, name in re.findall(r"``(tests/[\w/]+\.py)::(\w+)``", page.read_text()):
            found.append((page.name, path, name))
    return found


@pytest.mark.parametrize(("page", "path", "name"), _references())
def test_every_test_a_page_names_exists(page: str, path: str, name: str) -> None:
    """The tests named beside a claim, on any page, exist (as on the
    Guarantees page, which tests/test_docs.py checks)."""
    import ast

    file = DOCS.parent / path
    assert file.is_file(), f"{page}: {path} does not exist"
    tree = ast.parse(file.read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert name in names, f"{page}: {path}::{name} does not exist"
