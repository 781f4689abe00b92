"""Every relative link in README.md and docs/*.md names a file of the repository, and a heading it has.

Anchors follow GitHub's slugs: the heading's text lower-cased, markup and punctuation dropped, spaces
turned into hyphens, and `-1`, `-2`, ... after repeated headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code spans removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"(`+).*?\1", "", line))
    return lines


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)  # GitHub keeps letters, digits, `_`, `-` and spaces
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(1).replace("`", ""))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    return [target for line in prose_lines(page.read_text()) for target in LINK.findall(line)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)]  # http:, mailto:, ... are not checked


def test_the_pages_exist_and_have_links():
    assert (ROOT / "README.md").exists() and len(PAGES) > 1
    assert any(relative_links(page) for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if ROOT not in file.parents and file != ROOT:
            broken.append(f"{target}: outside the repository")
        elif not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: {file.name} has no heading with the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("heading, expected", [
    ("Install on a cluster", "install-on-a-cluster"),
    ("Failures, resume and exactly-once", "failures-resume-and-exactly-once"),
    ("Validate before spending GPUs", "validate-before-spending-gpus"),
    ("The `engine` knobs (v2)", "the-engine-knobs-v2"),
])
def test_slugs_are_githubs(heading: str, expected: str):
    assert slug(heading.replace("`", "")) == expected


def test_a_broken_link_is_found(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](#nowhere) `[code](nope.md)`\n\n```\n[x](nope.md)\n```\n")
    assert relative_links(page) == ["#title", "#nowhere"]
    assert anchors(page) == {"title"}


# A config's comments point at the docs as `docs/<page>.md#anchor` or `docs/<page>.md, "Heading"` (the
# heading's text; a YAML comment may break the line before it).
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".py", ".json"))
DOC_REFERENCE = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+)|,\s*(?:#\s*)?\"([^\"\n]+)\")?")


def doc_references(text: str) -> list[tuple[str, str | None]]:
    """(page, anchor or None) of every docs/ page a text names; a quoted heading as its anchor."""
    return [(page, anchor or (slug(heading.replace("`", "")) if heading else None))
            for page, anchor, heading in DOC_REFERENCE.findall(text)]


def test_the_configs_name_docs():
    assert any(doc_references(p.read_text()) for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_comments_name_existing_sections(config: Path):
    broken = []
    for page, anchor in doc_references(config.read_text()):
        file = ROOT / "docs" / page
        if not file.exists():
            broken.append(f"docs/{page}: no such page")
        elif anchor and anchor not in anchors(file):
            broken.append(f"docs/{page}#{anchor}: {page} has no such heading")
    assert not broken, f"{config.relative_to(ROOT)}: " + "; ".join(broken)


def test_a_config_reference_to_a_missing_section_is_found():
    text = ('# see docs/configuration.md#install-on-a-cluster and docs/evaluation.md, "Multiple choice"\n'
            '# (docs/evaluation.md,\n#  "lm-evaluation-harness tasks") docs/nope.md\n')
    assert doc_references(text) == [("configuration.md", "install-on-a-cluster"), ("evaluation.md", "multiple-choice"),
                                    ("evaluation.md", "lm-evaluation-harness-tasks"), ("nope.md", None)]
    assert "lm-evaluation-harness-tasks" not in anchors(ROOT / "docs" / "evaluation.md")
