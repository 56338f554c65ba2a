"""The documents' references resolve: every relative link, and every results file they name, exists."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = (
    "README.md",
    "RESULTS.md",
    "benchmarks/README.md",
    "results/README.md",
    "docs/server.md",
    "docs/architecture.md",
    "docs/python-api.md",
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")
RESULT_NAME = re.compile(r"(?:decode_limit|efficiency|engine|hf_cache|serving|sandbox)[\w.-]*\.json")


def references(document: Path) -> list[tuple[str, Path]]:
    """(as written, the path it names) for the document's relative links, the repository paths it quotes
    (`results/...`, `src/...`, `benchmarks/...`, `tests/...`) and the bare results file names it quotes."""
    text = document.read_text()
    found = []
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # not http:, mailto:
            path = target.split("#")[0]
            if path:
                found.append((target, document.parent / path))
    for quoted in CODE.findall(text):
        quoted = quoted.rstrip(".,;:)")
        if quoted.startswith(("results/", "src/", "benchmarks/", "tests/")) and "*" not in quoted:
            found.append((quoted, REPO / quoted))
        elif RESULT_NAME.fullmatch(quoted):
            found.append((quoted, REPO / "results" / quoted))
    return found


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_reference_resolves(name):
    document = REPO / name
    missing = [written for written, path in references(document) if not path.exists()]
    assert not missing, f"{name} names what does not exist: {missing}"


def test_the_checker_sees_links_and_quoted_paths(tmp_path):
    (tmp_path / "here.md").write_text("x")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](here.md) [b](gone.md#part) [c](https://x.org) `results/nothing.json` `engine_none.json`.")
    written = [w for w, path in references(doc) if not path.exists()]
    assert written == ["gone.md#part", "results/nothing.json", "engine_none.json"]


def test_every_result_has_its_line_in_the_index():
    """results/README.md names every JSON and run directory under results/ (archive/ has its own rows)."""
    index = (REPO / "results" / "README.md").read_text()
    entries = [p for p in (REPO / "results").iterdir() if p.name not in ("README.md", "archive")]
    entries += list((REPO / "results" / "archive").iterdir())
    linked = set(re.findall(r"\]\(([^)#\s]+?)/?\)", index))
    unlisted = [
        str(p.relative_to(REPO / "results")) for p in entries if str(p.relative_to(REPO / "results")) not in linked
    ]
    assert not unlisted, f"results/README.md has no line for {unlisted}"
