"""mkdocs hooks for the API reference.

- The source tree mkdocstrings reads: ``asr_fx.passes`` lives in ``passes/`` (pyproject's
  ``[tool.setuptools.package-dir]``), which a static reader does not find under ``asr_fx/``. So the build reads
  ``build/docs-src/asr_fx``: links to every entry of ``asr_fx/`` and to each package-dir folder, made from
  pyproject.toml before the build (``build/`` is git-ignored).
- The docstrings use Sphinx roles (:class:`Site`); the pages show them as plain code.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "build" / "docs-src"
ROLE = re.compile(r":(?:class|func|data|mod|meth|attr|exc|obj):(?=<code>)")


def package_dirs(pyproject: str) -> dict[str, str]:
    """``[tool.setuptools.package-dir]`` of pyproject.toml: package -> folder (no tomllib on Python 3.10)."""
    section = pyproject.split("[tool.setuptools.package-dir]", 1)[1:] or [""]
    body = section[0].split("\n[", 1)[0]
    return dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', body, flags=re.M))


def link_source_tree() -> None:
    """``build/docs-src/asr_fx``: the package as it is installed, as links into this checkout."""
    remapped = package_dirs((ROOT / "pyproject.toml").read_text())
    if SOURCE.exists():
        shutil.rmtree(SOURCE)
    package = SOURCE / "asr_fx"
    package.mkdir(parents=True)
    targets = {entry.name: entry for entry in (ROOT / "asr_fx").iterdir() if entry.name != "__pycache__"}
    for dotted, folder in remapped.items():  # e.g. "asr_fx.passes" = "passes"
        parts = dotted.split(".")
        if parts[0] == "asr_fx" and len(parts) == 2:
            targets[parts[1]] = ROOT / folder
    for name, target in targets.items():
        (package / name).symlink_to(target.resolve(), target_is_directory=target.is_dir())


def on_startup(**kwargs) -> None:
    """Link the source tree before mkdocstrings loads anything."""
    link_source_tree()


def on_page_content(html: str, **kwargs) -> str:
    """Drop the role prefix before each code span mkdocstrings rendered."""
    return ROLE.sub("", html)
