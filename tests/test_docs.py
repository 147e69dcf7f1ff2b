"""The README and the docs site: the README short, starting with its two commands, its links resolving; the
generated pages (results, CLI and API reference) equal to what tools/gen_docs.py writes now; every public name
in the API reference; every snippet the pages include present in its file."""

from __future__ import annotations

import re
from pathlib import Path

import gen_docs  # tools/gen_docs.py: tools/ is on pytest's pythonpath (pyproject.toml)
import pytest

import asr_fx
from asr_fx.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]

README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_readme_starts_with_the_two_commands():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    assert README.index("```bash") < README.index("\n## ")
    assert first_block.splitlines() == ['pip install -c constraints.txt -e ".[test]" && asr-fx demo',
                                        "python -m pytest -q"]


def relative_links(text: str) -> list[str]:
    """The relative link targets of a markdown text, outside code blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [t for t in LINK.findall(prose) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def slugs(markdown: str) -> set[str]:
    """The anchors of a page's headings, as mkdocs' toc makes them (lower case, words joined by '-')."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M)
    return {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}


def test_readme_links_resolve():
    links = relative_links(README)
    assert len(links) >= 10  # the docs pages and the examples
    broken = [t for t in links if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not broken, f"README links to missing files: {broken}"
    anchored = [t.split("#", 1) for t in links if "#" in t]
    assert anchored
    missing = [f"{path}#{anchor}" for path, anchor in anchored if anchor not in slugs((ROOT / path).read_text())]
    assert not missing, f"README links to missing headings: {missing}"


def test_slugs_are_mkdocs_anchors():
    assert slugs("# Title\n## Model zoos\n```\n# not a heading\n```\n### DDP, torch.compile and more") == \
        {"title", "model-zoos", "ddp-torchcompile-and-more"}


def test_relative_links_finds_a_broken_one():
    text = "see [a](docs/no-such-page.md) and [b](https://example.org) and ```\n[c](x.md)\n```"
    assert relative_links(text) == ["docs/no-such-page.md"]


def test_generated_pages_are_up_to_date(capsys):
    """Regenerating from tools/results/* and the code gives exactly the committed pages."""
    assert gen_docs.main(["--check"]) == 0, capsys.readouterr().out
    assert gen_docs.unlisted() == []


def test_check_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    page = tmp_path / "cli-reference.md"
    page.write_text("stale\n")
    monkeypatch.setattr(gen_docs, "pages", lambda: {page: "fresh\n"})
    assert gen_docs.main(["--check"]) == 1
    assert "cli-reference.md" in capsys.readouterr().out
    assert page.read_text() == "stale\n"


def test_results_pages_keep_machine_date_and_command():
    for result in gen_docs.RESULTS_FILES:
        page = (ROOT / "docs" / "results" / f"{result.stem}.md").read_text()
        assert f"- regenerate: `{result.command}`" in page
        assert "- date: " in page and "- machine: " in page
        source = (ROOT / "tools" / "results" / f"{result.stem}.md").read_text()
        for row in [line for line in source.splitlines() if line.startswith("| ")][:3]:
            assert row in page, result.stem


def test_cli_reference_has_every_option_of_every_command():
    _, commands = build_parser()
    page = (ROOT / "docs" / "cli-reference.md").read_text()
    for name, parser in commands.items():
        assert f"## asr-fx {name}" in page
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in page, (name, option)


def test_api_reference_names_every_public_name():
    page = (ROOT / "docs" / "api.md").read_text()
    documented = re.findall(r"^::: asr_fx\.(\w+)$", page, flags=re.M)
    assert sorted(documented) == sorted(asr_fx.__all__)
    for name in documented:  # each directive names the object asr_fx exports
        assert getattr(asr_fx, name) is not None


@pytest.mark.parametrize("page", sorted((ROOT / "docs").rglob("*.md")), ids=lambda p: p.name)
def test_included_snippets_exist(page):
    for path, section in re.findall(r'^--8<-- "([^":]+)(?::(\w+))?"', page.read_text(), flags=re.M):
        text = (ROOT / path).read_text()
        if section:
            assert f"--8<-- [start:{section}]" in text and f"--8<-- [end:{section}]" in text, (path, section)
