"""The documents a newcomer reads hold together.

Every relative link in README.md and docs/*.md leads to a file of this repository (and,
with a ``#anchor``, to a heading of that file, slugged as GitHub renders it), no link
leaves the repository, and README stays short enough to read on a few screens.

Links and headings are read with markdown-it-py (a CommonMark parser), not with regular
expressions, so a link inside a code block or inline code is not mistaken for one.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt

CHECKOUT = Path(__file__).resolve().parents[2]
# README holds what a new user needs (what it is, the picture, the two commands, where
# to go next); everything else lives in docs/. 120 lines is about two screens.
README_LINE_BUDGET = 120
# Written on other branches at the same time as this index links them; checked like any
# other file as soon as they exist. Remove an entry once its file is merged.
PENDING: set[str] = set()

_parser = MarkdownIt("commonmark").enable("table")


def documents() -> list[Path]:
    return [CHECKOUT / "README.md", *sorted((CHECKOUT / "docs").glob("*.md"))]


def _inline_text(inline) -> str:
    return "".join(child.content for child in inline.children or () if child.type in ("text", "code_inline"))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file (a repeated heading gets -1, -2, ...)."""
    tokens = _parser.parse(path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        slug = github_slug(_inline_text(inline))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    """Every link target in a Markdown file, in order."""
    return [child.attrs["href"]
            for token in _parser.parse(path.read_text()) if token.type == "inline"
            for child in token.children or () if child.type == "link_open"]


def broken_links(path: Path, checkout: Path = CHECKOUT, pending: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``file: target: reason`` for each relative link of ``path`` that leads nowhere."""
    problems = []
    for target in links(path):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            continue  # a web address: not this test's business
        where = f"{path.relative_to(checkout)}: {target}"
        if parts.path.startswith("/"):
            problems.append(f"{where}: an absolute path; link relative to the document")
            continue
        file = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        if not file.is_relative_to(checkout):
            problems.append(f"{where}: leads outside the repository")
            continue
        if not file.exists():
            if file.relative_to(checkout).as_posix() not in pending:
                problems.append(f"{where}: no such file")
            continue
        if parts.fragment:
            if file.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif unquote(parts.fragment) not in anchors(file):
                problems.append(f"{where}: {file.name} has no heading with anchor #{parts.fragment}")
    return problems


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(CHECKOUT).as_posix())
def test_every_relative_link_resolves(doc):
    assert broken_links(doc, pending=PENDING) == []


def test_readme_stays_short():
    lines = (CHECKOUT / "README.md").read_text().count("\n")
    assert lines <= README_LINE_BUDGET, (
        f"README.md has {lines} lines, the budget is {README_LINE_BUDGET}: move detail into docs/")


def test_readme_indexes_every_document_in_docs():
    linked = {urlsplit(target).path for target in links(CHECKOUT / "README.md")}
    documented = {p.relative_to(CHECKOUT).as_posix() for p in (CHECKOUT / "docs").glob("*.md")}
    assert documented - linked == set(), "docs/ files README's index does not link"


def test_the_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Installing on a host\n\n## Tokens: `hnv-controller token`\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/guide.md) [ok](docs/guide.md#installing-on-a-host) "
        "[ok](docs/guide.md#tokens-hnv-controller-token) [web](https://example.org/x.md)\n"
        "[gone](docs/missing.md) [anchor](docs/guide.md#uninstalling) [out](../elsewhere.md) "
        "[abs](/etc/passwd) [later](docs/later.md)\n\n"
        "`[code](docs/nothing.md)` is not a link\n")
    assert broken_links(readme, tmp_path, pending={"docs/later.md"}) == [
        "README.md: docs/missing.md: no such file",
        "README.md: docs/guide.md#uninstalling: guide.md has no heading with anchor #uninstalling",
        "README.md: ../elsewhere.md: leads outside the repository",
        "README.md: /etc/passwd: an absolute path; link relative to the document",
    ]


def test_github_slugs():
    assert github_slug("The multi-kernel lab (what proves the Vagrant shape here)") == \
        "the-multi-kernel-lab-what-proves-the-vagrant-shape-here"
    assert github_slug("The controller: state, TLS, tokens") == "the-controller-state-tls-tokens"
    assert github_slug("`POST /v1/fabric/apply`") == "post-v1fabricapply"
