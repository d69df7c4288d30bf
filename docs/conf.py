"""Sphinx configuration for the sparc.sa documentation.

Build it (offline; nothing here fetches anything)::

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -b html docs docs/_build/html

The front page includes README.rst, so the README on GitHub and PyPI and the
site's front page are one text. The README links to files of the repository
by their GitHub addresses (which work on GitHub and on PyPI); inside the site
:func:`repository_links` turns every such link to a page the site has into a
link to that page, and Sphinx warns (failing the build) when the page is
missing.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import re
from importlib.metadata import version as _version
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx

project = "sparc.sa"
author = "the sparc.sa contributors"
copyright = "2017-2026, David Davis and the sparc.sa contributors"
release = _version("sparc.sa")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "repoze.sphinx.autointerface",
    "myst_parser",
]

# No intersphinx: the build must not need the network.
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"sparc.sa {release}"
html_static_path: list[str] = []
pygments_style = "sphinx"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

#: Where the README's links to repository files point (pyproject's Source URL).
REPOSITORY = "https://github.com/davisd50/sparc.sa/blob/main/"

#: Repository files that are pages of this site, by path in the repository.
SITE_PAGES = {"README.rst": "index", "CHANGES.rst": "changes", "DEVELOPERS.md": "developers"}


def page_for(uri: str) -> str | None:
    """The site's document for a link to a repository file, or None."""
    if not uri.startswith(REPOSITORY):
        return None
    path, _, _ = uri[len(REPOSITORY) :].partition("#")
    if path in SITE_PAGES:
        return SITE_PAGES[path]
    found = re.fullmatch(r"docs/([\w/-]+)\.rst", path)
    return found.group(1) if found else None


def repository_links(app: Sphinx, doctree: nodes.document) -> None:
    """Make each link to a repository page that the site has a :doc: reference."""
    for ref in list(doctree.findall(nodes.reference)):
        page = page_for(ref.get("refuri", ""))
        if page is None:
            continue
        xref = addnodes.pending_xref(
            "",
            refdomain="std",
            reftype="doc",
            reftarget="/" + page,
            refexplicit=True,
            refwarn=True,
        )
        xref += nodes.inline("", ref.astext())
        ref.replace_self(xref)


#: Modules whose interfaces the API page documents.
INTERFACE_MODULES = ("sparc.sa.interfaces", "sparc.sa.zcml")


def interface_signatures(app: Sphinx) -> None:
    """Give interface methods the signatures their source declares.

    zope.interface records a method's signature from its code object and
    takes the first keyword-only argument for the name of ``*args``
    (``run(fn, *args, attempts=3, **kwargs)`` would read
    ``run(fn, *attempts, **args)``); repoze.sphinx.autointerface prints what
    it recorded. The source says what was meant, without the annotations, as
    Zope projects show interface methods.
    """
    from zope.interface.interface import InterfaceClass

    for name in INTERFACE_MODULES:
        module = importlib.import_module(name)
        for node in ast.parse(inspect.getsource(module)).body:
            iface = getattr(module, getattr(node, "name", ""), None)
            if not isinstance(node, ast.ClassDef) or not isinstance(iface, InterfaceClass):
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    args = copy.deepcopy(item.args)
                    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                        arg.annotation = None
                    for arg in (args.vararg, args.kwarg):
                        if arg is not None:
                            arg.annotation = None
                    signature = f"({ast.unparse(args)})"
                    iface[item.name].getSignatureString = lambda s=signature: s


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", interface_signatures)
    app.connect("doctree-read", repository_links)
    return {"parallel_read_safe": True}
