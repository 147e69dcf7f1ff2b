"""The installed package holds every folder of the source tree: each package under asr_fx/ and passes/
(passes/ installs as asr_fx.passes) is listed in pyproject.toml, so a wheel or editable install has it."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _source_packages() -> set[str]:
    found = set()
    for base, name in (("asr_fx", "asr_fx"), ("passes", "asr_fx.passes")):
        for init in (ROOT / base).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / base)
            if "passes" in rel.parts and base == "asr_fx":  # asr_fx/passes is a link to passes/ in a checkout
                continue
            found.add(".".join((name, *rel.parts)))
    return found


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _source_packages() - listed == set()
    assert listed - _source_packages() == set()


def test_passes_folders_are_the_phases():
    folders = {p.name for p in (ROOT / "passes").iterdir() if (p / "__init__.py").exists()}
    assert folders == {"capture", "placement", "layers", "forms", "fold", "graph", "export"}
    root_modules = {p.stem for p in (ROOT / "passes").glob("*.py")}
    assert root_modules == {"__init__", "infra", "pipelines"}
