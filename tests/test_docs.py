"""The documentation cannot drift from what it documents: the benchmark page is the rendering of
the committed results, the README stays short, links resolve and every `DESIGN §n` cited in code
exists in docs/architecture.md."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))


def _tables_module():
    spec = importlib.util.spec_from_file_location("benchmark_tables", REPO / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_page_is_the_rendering_of_the_committed_results():
    rendered = _tables_module().render(REPO / "benchmarks" / "results")
    assert (REPO / "docs" / "benchmarks.md").read_text() == rendered, "run `make docs`"


def test_benchmark_tables_render_any_result_file(tmp_path):
    (tmp_path / "new_bench.json").write_text(
        '{"rounds": 2, "rows": [{"mode": "a", "tok_s": 12.345}, {"mode": "b|c", "extra": null}]}'
    )
    text = _tables_module().render(tmp_path)
    assert "## new_bench" in text and "| rounds | 2 |" in text
    assert "| mode | tok_s | extra |" in text and "| a | 12.3 | - |" in text and "| b\\|c | - | - |" in text


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target, anchor in re.findall(r"\]\(([^)#:\s]+)(?:#([^)]*))?\)", page.read_text()):
        linked = page.parent / target
        assert linked.exists(), f"{page.name} links to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name} links to missing {target}#{anchor}"


def test_design_sections_cited_in_code_exist():
    cited = set()
    for path in [*(REPO / "sedac_ray").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        cited |= set(re.findall(r"DESIGN §(\d+)", path.read_text()))
    headings = set(re.findall(r"^## §(\d+)\b", (REPO / "docs" / "architecture.md").read_text(), re.M))
    assert cited and cited <= headings, f"cited {sorted(cited)}, docs/architecture.md has {sorted(headings)}"
