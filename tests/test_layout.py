"""The single file stays a book: its docstring's contents page names the
`# === name ===` banners in the order they stand, and only the storage section
knows the database driver."""
from __future__ import annotations

import re

from conftest import SERVER_SCRIPT

SOURCE = SERVER_SCRIPT.read_text(encoding="utf-8")
BANNER = re.compile(r"^# =+ ([A-Za-z ]+) ===$", re.MULTILINE)


def sections() -> list[tuple[str, str]]:
    """(name, text) of each banner's section, in file order."""
    matches = list(BANNER.finditer(SOURCE))
    ends = [match.start() for match in matches[1:]] + [len(SOURCE)]
    return [(match.group(1), SOURCE[match.end():end]) for match, end in zip(matches, ends)]


def test_the_contents_page_lists_every_section_in_order():
    contents = re.search(r"Sections, top to bottom[^:]*:\n(.*?)\.\n", SOURCE, re.DOTALL)
    assert contents, "the module docstring lost its contents page"
    listed = [name.strip() for name in contents.group(1).replace("\n", " ").split(",")]
    assert listed == [name for name, _ in sections()]


def test_only_the_storage_section_names_the_driver():
    naming = [name for name, text in sections() if re.search(r"\bsqlite3\b", text)]
    assert naming == ["storage"]
    before_first_section = SOURCE[:BANNER.search(SOURCE).start()]
    assert not re.search(r"\bimport sqlite3\b", before_first_section)
