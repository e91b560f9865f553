"""The README and docs stay true to the code: every option they name exists, every link resolves."""

from __future__ import annotations

import re

from conftest import REPO

from ckptflow.flows.cli import build_parser


def _options(parser) -> set[str]:
    """Every --option of `parser` and of its subcommands, at any depth."""
    found = set()
    for action in parser._actions:  # argparse keeps no public list of them
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action.choices, dict):  # a subcommand's parsers
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def test_every_option_the_readme_names_is_an_option_of_the_cli():
    known = _options(build_parser())
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+[a-z]", (REPO / "README.md").read_text()))
    named -= {"--all", "--pool", "--type", "--param", "--no-prompt"}  # Prefect's own
    assert named and not named - known, sorted(named - known)


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "bench" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and \
                    not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_the_readme_is_a_five_minute_read():
    assert len((REPO / "README.md").read_text().split()) <= 1500
