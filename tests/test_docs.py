"""The front page and the manual: short README, every relative link and image resolves.

Links are checked the way GitHub renders them: a path relative to the page, and an anchor
made from a heading of the target page (lowercase, punctuation except '-' and '_' dropped,
spaces to '-', a repeated heading gets -1, -2, ...). Code is skipped: a link inside a code
block or an inline code span is text, not a link.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 250
# The two commands a newcomer copies; CI and reviewers check them word for word.
TOP_COMMANDS = (
    "pip install -r requirements.txt && python main.py            "
    "# train on the bundled digits, offline, under a CPU minute",
    "pip install -r requirements.txt && python -m pytest -q       "
    "# the test suite (CPU only, a few minutes)",
)

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text):
    """The page without its code, where brackets and '#' are not markdown."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.lower())
    return text.replace(" ", "-")


def anchors(page):
    seen, result = {}, set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(page):
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked
            yield target


def broken(page, target):
    """Why `target`, linked from `page`, does not resolve; None if it does."""
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.is_file():
        return f"{page.name}: {target}: no file {path}"
    if anchor and anchor not in anchors(file):
        return f"{page.name}: {target}: no heading #{anchor} in {file.name}"
    return None


def test_slug_follows_githubs_rules():
    assert slug("`representations`: mixup features (Fisher et al. 2024, Fig. 1)") == \
        "representations-mixup-features-fisher-et-al-2024-fig-1"
    assert slug("Figures and tables: `utils.py`") == "figures-and-tables-utilspy"
    assert slug("nc_layers and per-layer NC") == "nc_layers-and-per-layer-nc"


def test_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section\n\n```\n[not a link](nowhere.md)\n```\n"
                    "[ok](#a-section) [ok too](page.md#title) `[code](gone.md)`\n"
                    "[bad](#no-such) [gone](gone.md) ![img](gone.png)\n", encoding="utf-8")
    targets = list(relative_links(page))
    assert targets == ["#a-section", "page.md#title", "#no-such", "gone.md", "gone.png"]
    problems = [target for target in targets if broken(page, target.replace("page.md", str(page)))]
    assert problems == ["#no-such", "gone.md", "gone.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    problems = [problem for target in relative_links(page) if (problem := broken(page, target))]
    assert problems == []


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    first_block = FENCE.search(text).group(0).splitlines()[1:-1]
    assert first_block == list(TOP_COMMANDS)


def test_every_image_in_docs_is_shown_on_some_page():
    shown = {(page.parent / target).resolve() for page in PAGES for target in relative_links(page)}
    unused = [image.name for image in sorted((ROOT / "docs").glob("*.png")) if image.resolve() not in shown]
    assert unused == []
