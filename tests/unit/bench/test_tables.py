"""tests/bench/README.md's tables are what the results files say (regenerate with `python -m tests.bench.tables`)."""

from __future__ import annotations

import pytest

from tests.bench import tables


@pytest.mark.parametrize("doc", tables.DOCS, ids=lambda p: str(p.relative_to(tables.USER_README.parent)))
def test_readme_tables_match_the_results_files(doc):
    text = doc.read_text()
    names = {m.group("name") for m in tables.BLOCK.finditer(text)}
    assert names, f"{doc} has no generated table blocks"
    assert tables.render_readme(text) == text, (
        f"{doc} is stale: run .venv/bin/python -m tests.bench.tables after re-running a benchmark"
    )


def test_render_fills_a_block_and_refuses_an_unknown_one():
    filled = tables.render_readme("before\n<!-- table:spine -->\nSTALE-BODY\n<!-- /table -->\nafter\n")
    assert filled.startswith("before\n<!-- table:spine -->\n| ") and filled.endswith("<!-- /table -->\nafter\n")
    assert "STALE-BODY" not in filled and "0.122" in filled  # the cold-start accuracy spine.json holds
    with pytest.raises(KeyError, match="no_such"):
        tables.render_readme("<!-- table:no_such -->\n<!-- /table -->")
