"""What a reader of the site looks for is there: every page listed on the home page, every results file reachable
from the Results page (served with the site), a citing page that agrees with README, CITATION.cff and LICENSE,
and the audit's advice for every check."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def nav_pages() -> list[str]:
    return re.findall(r"^\s+- .*?:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)


def links(page: str) -> set[str]:
    return {m.split("#")[0] for m in re.findall(r"\]\(([^)\s]+)\)", (DOCS / page).read_text())}


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_home_page_lists_every_page_of_the_site():
    pages = nav_pages()
    assert len(pages) == len(list(DOCS.glob("*.md"))) and "citing.md" in pages
    missing = [p for p in pages if p != "index.md" and p not in links("index.md")]
    assert not missing, f"docs/index.md does not link {missing}"


def test_every_results_file_is_served_with_the_site_and_linked_from_the_results_page():
    served = DOCS / "results-files"
    assert served.is_symlink() and served.resolve() == (ROOT / "benchmarks" / "results").resolve()
    linked = links("results.md")
    files = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_file() and p.name[0] != ".")
    missing = [f for f in files if f"results-files/{f}" not in linked]
    assert files and not missing, f"docs/results.md does not link {missing}"


def test_the_citing_page_agrees_with_readme_citation_cff_and_license():
    page = (DOCS / "citing.md").read_text()
    assert fenced(page, "text")[0].strip() == (ROOT / "LICENSE").read_text().strip()
    paper = fenced(page, "bibtex")[0]
    assert paper in (ROOT / "README.md").read_text()
    cff = (ROOT / "CITATION.cff").read_text()
    software = fenced(page, "bibtex")[1]
    for field, key in (("title", "title"), ("version", "version"), ("date", "date-released"), ("license", "license")):
        want = re.search(rf"^{key}: \"?([^\"\n]+)\"?$", cff, re.M).group(1)
        assert re.search(rf"{field}\s*=\s*\{{{re.escape(want)}\}}", software), (field, want)
    assert "repository-code" not in cff or "github.com" in cff  # no address is given that does not exist


def test_the_audit_says_what_to_do_and_what_to_report_for_every_check():
    page = (DOCS / "audit.md").read_text()
    checks = re.split(r"(?m)^### ", page.split("## The checks", 1)[1])[1:12]
    assert len(checks) == 11
    for text in checks:
        head = text.splitlines()[0]
        assert "- **If it flags**:" in text and "- **Report**:" in text, head
