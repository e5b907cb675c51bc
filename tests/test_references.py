"""Citations resolve: every ``[KEY]`` that code cites is defined in ``docs/references.md``, and nothing points at
notes outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCES = ROOT / "docs" / "references.md"
CODE_DIRS = ("zoo", "runtime", "registry", "storage", "tests")
# A citation key: ``SF-paper``, ``SF-iss#10``, ``SRA2SF`` (a capital, then a hyphen/# part or a digit), ``note:x-y``.
KEY = r"[A-Z][A-Za-z0-9]*(?:[-#][A-Za-z0-9]+)+|[A-Z][A-Za-z]*[0-9][A-Za-z0-9]*|note:[a-z0-9-]+"
CITATION = re.compile(rf"\[({KEY})\]")
DEFINITION = re.compile(rf"^- `\[({KEY})\]` ", re.M)
OUTSIDE_NOTES = "method" + ".md"  # the reference notes the citations once pointed at; not part of the repository


def defined_keys() -> list[str]:
    return DEFINITION.findall(REFERENCES.read_text(encoding="utf-8"))


def cited_keys() -> dict[str, set[str]]:
    """Cited key -> the files (relative paths) that cite it, over the Python files of :data:`CODE_DIRS`."""
    out: dict[str, set[str]] = {}
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            if path == Path(__file__).resolve():  # its patterns are not citations
                continue
            for key in CITATION.findall(path.read_text(encoding="utf-8")):
                out.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    return out


def test_keys_are_defined_once() -> None:
    keys = defined_keys()
    assert len(keys) > 20
    assert sorted(k for k in set(keys) if keys.count(k) > 1) == []


def test_every_citation_resolves() -> None:
    cited = cited_keys()
    assert {"SF-paper", "REPA-code", "note:selfflow-step"} <= set(cited)  # the scan sees the citations
    defined = set(defined_keys())
    missing = {k: sorted(files) for k, files in cited.items() if k not in defined}
    assert missing == {}, "cited but not defined in docs/references.md"


def test_references_cite_only_defined_keys() -> None:
    text = REFERENCES.read_text(encoding="utf-8")
    assert sorted(set(CITATION.findall(text)) - set(defined_keys())) == []


def test_no_file_points_at_outside_notes() -> None:
    files = [p for d in (*CODE_DIRS, "docs", "specs") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".md", ".json", ".toml", ".yaml")]
    files += [p for p in ROOT.glob("*") if p.is_file() and p.suffix in (".md", ".toml")]
    hits = [str(p.relative_to(ROOT)) for p in files if OUTSIDE_NOTES in p.read_text(encoding="utf-8", errors="replace")]
    assert len(files) > 50
    assert hits == []
