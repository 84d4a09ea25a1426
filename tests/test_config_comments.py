"""The comments of the Hydra configs point at documents and sections that exist: a reader sent to
``README, "Results"`` or ``docs/x.md`` must find it there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "conf").rglob("*.yaml"))
#: ``README`` / ``README.md`` / ``docs/name.md``, optionally followed by ``, "Section"`` or ``"Section"``.
REFERENCE = re.compile(r'(README(?:\.md)?|docs/[\w.-]+\.md)(?:,?\s*"([^"]+)")?')


def _references() -> list[tuple[str, str, str | None]]:
    found = []
    for path in CONFIGS:
        for line in path.read_text().splitlines():
            comment = line.partition("#")[2]
            for doc, section in REFERENCE.findall(comment):
                found.append((str(path.relative_to(REPO)), "README.md" if doc.startswith("README") else doc,
                              section or None))
    return found


def _headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines() if re.match(r"#{1,6} ", line)]


def test_the_configs_do_point_at_documents() -> None:
    """The scan below finds what it is meant to find (else the next test would pass on nothing)."""
    refs = _references()
    assert ("conf/experiment/real_cpu.yaml", "docs/experiments.md", "Model quality in detail") in refs
    assert REFERENCE.findall('# see README, "Results":') == [("README", "Results")]


@pytest.mark.parametrize("config, doc, section", _references())
def test_referenced_document_and_section_exist(config: str, doc: str, section: str | None) -> None:
    target = REPO / doc
    assert target.is_file(), f"{config} refers to {doc}, which does not exist"
    if section is not None:
        headings = _headings(target)
        assert any(h == section or h.startswith(section) for h in headings), \
            f"{config} refers to {doc}, section {section!r}; its headings: {headings}"
