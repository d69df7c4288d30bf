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
