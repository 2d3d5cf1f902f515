"""The documentation a user reads: every relative link resolves, and the README stays short.

Links are checked the way GitHub renders them: a relative target must name a file or folder
of the repository, and a ``#fragment`` must be the slug of a heading in the target Markdown
file. Code blocks and inline code are not links. The checker is tested on broken input too,
so a checker that finds nothing cannot pass for a clean tree.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, docs/*.md, and any Markdown under clients/ and config/."""
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for folder in ("clients", "config"):
        files += sorted((root / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


# --- Markdown, as far as links need it ---------------------------------------------------------

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+).+?\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match:
            marker = match[1]
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    found = []
    for number, line in prose_lines(text):
        definition = _REFERENCE_DEF.match(line)
        if definition:
            found.append((number, definition[1]))
            continue
        for match in _INLINE_LINK.finditer(_INLINE_CODE.sub("", line)):
            found.append((number, match[1]))
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Problems with the relative links of one Markdown file, each with its line number."""
    problems = []
    text = path.read_text(encoding="utf-8")
    for number, target in links(text):
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue  # external: not checked here (no network in tests)
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not resolved.is_relative_to(root):
            problems.append(f"{where}: points outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}: {resolved.relative_to(root)} does not exist")
            continue
        if fragment:
            if resolved.suffix.lower() != ".md" or not resolved.is_file():
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif unquote(fragment).lower() not in anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading #{fragment} in {resolved.relative_to(root)}")
    return problems


def section(text: str, title: str) -> str:
    """The text of the level-2 section ``title``, up to the next level-1 or level-2 heading."""
    start = end = None
    for number, line in prose_lines(text):
        heading = _HEADING.match(line)
        if not heading or len(heading[1]) > 2:
            continue
        if start is not None:
            end = number - 1
            break
        if len(heading[1]) == 2 and heading[2] == title:
            start = number
    assert start is not None, f"no '## {title}' section"
    return "\n".join(text.splitlines()[start:end])


def commands(markdown: str) -> list[str]:
    """Shell commands in the fenced code blocks of ``markdown``, comments and blank lines dropped."""
    found, fence = [], None
    for line in markdown.splitlines():
        match = _FENCE.match(line)
        if match:
            fence = None if fence else match[1]
            continue
        if fence:
            command = line.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


# --- the repository's documents ----------------------------------------------------------------


def test_the_documents_are_found():
    names = {f.relative_to(ROOT).as_posix() for f in doc_files()}
    assert {"README.md", "docs/signing.md", "docs/configuration.md"} <= names


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_readme_links_every_page_of_docs():
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in links(README.read_text(encoding="utf-8"))
        if not _SCHEME.match(target)
    }
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked] == []


def test_the_readme_stays_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move depth into docs/"


def test_quick_start_is_exactly_two_make_targets_that_exist():
    quick_start = section(README.read_text(encoding="utf-8"), "Quick start")
    assert commands(quick_start) == ["make demo", "make test"]
    targets = re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert {"demo", "test"} <= set(targets)


# Class defaults that are never answered as such (every raise names a code), and the admin
# listener's 404, which users of the public listener never see.
UNDOCUMENTED_CODES = {"bad_request", "forbidden", "rate_limited", "not_found"}
_CODE = re.compile(r"\bcode(?:\s*:\s*str)?\s*=\s*\"([a-z_]+)\"")


def error_codes_in_source(root: Path = ROOT) -> set[str]:
    """Every literal error code in ``proxy/`` (``code="..."`` arguments and class attributes)."""
    return {code for path in (root / "proxy").rglob("*.py") for code in _CODE.findall(path.read_text())}


def test_every_error_code_is_in_the_readme_table():
    table = section(README.read_text(encoding="utf-8"), "Errors")
    rows = "\n".join(line for line in table.splitlines() if line.startswith("|"))
    documented = set(re.findall(r"`([a-z_]+)`", rows))
    codes = error_codes_in_source()
    assert len(codes) > 20, "the scan of proxy/ for error codes found almost nothing"
    assert sorted(codes - UNDOCUMENTED_CODES - documented) == []


# --- the checker itself, on broken input -----------------------------------------------------


def test_slugs_follow_github():
    assert slug("The `/ai` prefix") == "the-ai-prefix"
    assert slug("`[credentials.headers]`") == "credentialsheaders"
    assert slug("Round 2: on httpx2") == "round-2-on-httpx2"
    assert slug("Signed URLs: the `SW1-HMAC-SHA256` format") == "signed-urls-the-sw1-hmac-sha256-format"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_broken_links_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.md").write_text("# Title\n\n## Some section\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[fine](docs/ok.md#some-section) [external](https://example.com/nowhere) [self](#readme)\n"
        "# README\n"
        "[gone](docs/missing.md) and [bad anchor](docs/ok.md#no-such-section)\n"
        "![image](img/missing.png) `[in code](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n"
        "[ref]: ../outside.md\n"
    )
    problems = broken_links(page, tmp_path)
    assert len(problems) == 4, problems
    assert "README.md:3: docs/missing.md: docs/missing.md does not exist" in problems
    assert "README.md:3: docs/ok.md#no-such-section: no heading #no-such-section in docs/ok.md" in problems
    assert any(p.startswith("README.md:4: img/missing.png") for p in problems)
    assert any(p.startswith("README.md:8: ../outside.md") and "outside" in p for p in problems)


def test_quick_start_commands_are_counted():
    text = (
        "## Quick start\n\n```sh\nmake demo   # one\n# a comment\n\nmake test\nmake lint\n```\n## Next\n```\nx\n```\n"
    )
    assert commands(section(text, "Quick start")) == ["make demo", "make test", "make lint"]


# --- paths the documents name ------------------------------------------------------------------

# Code and tests only: other folders are also named for what is not in the repository (a Rails
# app's config/routes.rb, load-test output, experiments since removed).
_REPO_PATH = re.compile(r"(?<![\w/.~-])((?:proxy|tests)/[\w./-]*[\w/])")
_TREE_LINE = re.compile(r"^( *)([\w.]+/?)(?= {2,}|$)")


def named_paths(text: str) -> set[str]:
    """Repository paths a document names: in prose and code (``proxy/gateway/handler.py``), and
    the entries of a drawn tree (``proxy/`` then indented ``http/``, ``connection.py``)."""
    found = set(_REPO_PATH.findall(text))
    in_fence, stack = False, []
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence, stack = not in_fence, []
            continue
        tree = _TREE_LINE.match(line) if in_fence else None
        if tree is None:
            continue
        indent, name = len(tree[1]), tree[2]
        stack = [(i, n) for i, n in stack if i < indent]
        parent = stack[-1][1] if stack else ""
        if parent.startswith(("proxy/", "tests/")) or name in ("proxy/", "tests/"):
            found.add(parent + name)
        if name.endswith("/"):
            stack.append((indent, parent + name))
    return found


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_a_document_names_exists(path):
    """A module that moved must not live on in the docs (docs/development.md draws the tree)."""
    missing = sorted(p for p in named_paths(path.read_text()) if not (ROOT / p).exists())
    assert not missing, f"{path.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_named_paths_finds_moved_modules_in_prose_and_in_trees():
    text = "See `proxy/handler.py` and proxy/cache/policy.py.\n```\nproxy/\n  http/\n    server.py   the server\n  cache_policy.py  gone\n```\n"
    assert named_paths(text) == {
        "proxy/handler.py",
        "proxy/cache/policy.py",
        "proxy/",
        "proxy/http/",
        "proxy/http/server.py",
        "proxy/cache_policy.py",
    }
