"""The examples of the README and docs/, as the pages write them: tests run them."""

from __future__ import annotations

import re

from testkit.server import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_block(language: str, containing: str) -> str:
    """The one ```language block of the README or a docs/ page that contains `containing`."""
    found = [block for page in PAGES for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)
             if containing in block]
    assert len(found) == 1, f"{len(found)} {language} blocks containing {containing!r} in README.md and docs/"
    return found[0]
