"""The README is a front door and the docs hold the rest: every link resolves (files and #anchors, as
GitHub renders them), every page is reachable from the README, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
README_MOST_LINES = 250


def anchors(page: Path) -> set[str]:
    """The #anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text())
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_every_link_of_the_readme_and_the_docs_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_every_docs_page_is_reachable_from_the_readme():
    reached, frontier = {README}, [README]
    while frontier:
        page = frontier.pop()
        for target in links(page):
            path = target.partition("#")[0]
            if path.endswith(".md") and not path.startswith("http"):
                linked = (page.parent / path).resolve()
                if linked.exists() and linked not in reached:
                    reached.add(linked)
                    frontier.append(linked)
    assert sorted(str(p.relative_to(ROOT)) for p in set(PAGES) - reached) == []


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MOST_LINES
    # Reference lives in docs/: no settings table, no measured figures.
    assert "| key | default |" not in text and "tokens/s" not in text.lower()
    for section in ("## Two commands", "## Ten minutes to a bot in your Discord server", "## Ten minutes to a bot in your Slack workspace",
                    "## Architecture", "## Production on Inferentia2", "## Documentation"):
        assert section in text
