"""mkdocs hook: the docstrings use Sphinx roles (:class:`Site`); show them as plain code in the API pages."""

import re

ROLE = re.compile(r":(?:class|func|data|mod|meth|attr|exc|obj):(?=<code>)")


def on_page_content(html, **kwargs):
    """Drop the role prefix before each code span mkdocstrings rendered."""
    return ROLE.sub("", html)
