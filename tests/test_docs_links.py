"""Every relative link in README.md, CONTRIBUTING.md and docs/**/*.md points at a file that exists (and at a
heading, with #anchor)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def doc_files(root: Path = REPO) -> list[Path]:
    tops = [root / "README.md", *[p for p in [root / "CONTRIBUTING.md"] if p.is_file()]]
    return [*tops, *sorted((root / "docs").rglob("*.md"))]


def _prose(text: str) -> str:
    """The text with fenced blocks and inline code removed (links in code are examples, not links)."""
    return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, code marks dropped, lower case, punctuation out, spaces -> -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """``FILE: target (why)`` for each relative link of ``path`` that does not resolve."""
    problems = []
    for target in _LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path}: {target} (no heading with that anchor in {dest.name})")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_every_doc_is_reachable_from_the_readme() -> None:
    linked = {REPO / "README.md"}
    frontier = [REPO / "README.md"]
    while frontier:
        page = frontier.pop()
        for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            dest = (page.parent / target.partition("#")[0]).resolve()
            if dest.suffix == ".md" and dest.is_file() and dest not in linked:
                linked.add(dest)
                frontier.append(dest)
    assert [str(p.relative_to(REPO)) for p in doc_files() if p.resolve() not in linked] == []


def test_the_checker_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Two words `here`\n\n## Two words here\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#two-words-here) [ok](docs/a.md#two-words-here-1) [web](https://x.org/y)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#three) `[in code](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n"
    )
    assert broken_links(readme) == [
        f"{readme}: docs/b.md (no such file)",
        f"{readme}: docs/a.md#three (no heading with that anchor in a.md)",
    ]
    assert doc_files(tmp_path) == [readme, tmp_path / "docs" / "a.md"]
